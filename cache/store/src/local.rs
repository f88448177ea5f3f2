//! `file:///path`: a store in a local directory. Keys map to files under the root; every write
//! goes to a temp file in `<root>/.tmp` and is renamed into place, so a reader never sees a
//! partial object. Compare-and-swap holds an exclusive `flock` on a per-key lock file, so it is
//! safe across processes on one host.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use rustix::fs::{flock, FlockOperation};

use crate::{check_key, Store, StoreError, StoreErrorKind, StoreResult, Version};
use strata_cache_format::Digest;

const TMP_DIR: &str = ".tmp";
const LOCK_DIR: &str = ".locks";

#[derive(Debug)]
pub struct LocalStore {
    url: String,
    root: PathBuf,
}

impl LocalStore {
    pub fn open(url: &str, path: &str) -> StoreResult<LocalStore> {
        let root = PathBuf::from(path);
        let err = |e: io::Error| {
            StoreError::new(
                url,
                "open",
                "",
                StoreErrorKind::Io,
                format!("{}: {e}", root.display()),
            )
        };
        // Directories are made on the first write, so reading a mistyped path does not leave
        // an empty store behind.
        match fs::metadata(&root) {
            Ok(m) if !m.is_dir() => {
                return Err(StoreError::new(
                    url,
                    "open",
                    "",
                    StoreErrorKind::Invalid,
                    format!("{} is not a directory", root.display()),
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        Ok(LocalStore {
            url: url.to_string(),
            root,
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn error(&self, op: &'static str, key: &str, e: io::Error) -> StoreError {
        let kind = match e.kind() {
            io::ErrorKind::NotFound => StoreErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => StoreErrorKind::Denied,
            _ => StoreErrorKind::Io,
        };
        StoreError::new(&self.url, op, key, kind, e)
    }

    fn temp_path(&self) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        self.root
            .join(TMP_DIR)
            .join(format!("{}-{}-{}", std::process::id(), nanos, n))
    }

    /// Writes `data` to a fresh temp file (synced), returning its path.
    fn write_temp(&self, data: &[u8]) -> io::Result<PathBuf> {
        let tmp = self.temp_path();
        fs::create_dir_all(self.root.join(TMP_DIR))?;
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
        Ok(tmp)
    }

    /// Writes `key` durably: once this returns, a power cut leaves either the old object or the
    /// new one, never a missing key. The data is synced before the rename, and the directory
    /// holding the new name (and every directory this call created on the way) is synced after,
    /// since a rename lives in the directory, not in the file.
    fn put_blocking(&self, key: &str, data: &[u8]) -> io::Result<()> {
        let dest = self.path(key);
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        create_dirs_durably(&parent)?;
        let tmp = self.write_temp(data)?;
        fs::rename(&tmp, &dest).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        sync_dir(&parent)
    }

    fn lock(&self, key: &str) -> io::Result<File> {
        let name = Digest::of(key.as_bytes()).to_hex();
        fs::create_dir_all(self.root.join(LOCK_DIR))?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(LOCK_DIR).join(name))?;
        // Blocks until it is ours; released when the file is closed.
        flock(&f, FlockOperation::LockExclusive)?;
        Ok(f)
    }

    fn read_versioned(&self, key: &str) -> io::Result<Option<(Vec<u8>, Version)>> {
        match fs::read(self.path(key)) {
            Ok(data) => {
                let version = Version(Digest::of(&data).to_hex());
                Ok(Some((data, version)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Creates `dir` and its missing ancestors, syncing the parent of each directory it creates so
/// that the new entries survive a crash.
fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut at = dir;
    // A relative root ends in "", which is the current directory.
    while !at.as_os_str().is_empty() && !at.is_dir() {
        missing.push(at.to_path_buf());
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    for d in missing.iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {}
            // Another writer created it between our check and now.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => sync_dir(p)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn list_recursive(dir: &Path, rel: &str, prefix: &str, out: &mut Vec<String>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue; // not a key strata could have written
        };
        if rel.is_empty() && (name == TMP_DIR || name == LOCK_DIR) {
            continue;
        }
        let key = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        // Only descend where the prefix can still match.
        let comparable = key.len().min(prefix.len());
        if key.as_bytes()[..comparable] != prefix.as_bytes()[..comparable] {
            continue;
        }
        if entry.file_type()?.is_dir() {
            list_recursive(&entry.path(), &key, prefix, out)?;
        } else if key.starts_with(prefix) {
            out.push(key);
        }
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| panic!("store worker panicked: {e}"))
}

#[async_trait]
impl Store for LocalStore {
    fn url(&self) -> &str {
        &self.url
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        check_key(&self.url, "get", key)?;
        let path = self.path(key);
        let data = tokio::fs::read(&path)
            .await
            .map_err(|e| self.error("get", key, e))?;
        Ok(Bytes::from(data))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        check_key(&self.url, "get", key)?;
        let path = self.path(key);
        let this_key = key.to_string();
        let url = self.url.clone();
        blocking(move || {
            let read = || -> io::Result<Vec<u8>> {
                let mut f = File::open(&path)?;
                f.seek(SeekFrom::Start(range.start))?;
                let mut out = Vec::new();
                f.take(range.end.saturating_sub(range.start))
                    .read_to_end(&mut out)?;
                Ok(out)
            };
            read().map(Bytes::from).map_err(|e| {
                let kind = if e.kind() == io::ErrorKind::NotFound {
                    StoreErrorKind::NotFound
                } else {
                    StoreErrorKind::Io
                };
                StoreError::new(&url, "get", &this_key, kind, e)
            })
        })
        .await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        check_key(&self.url, "head", key)?;
        match tokio::fs::metadata(self.path(key)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.error("head", key, e)),
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        check_key(&self.url, "put", key)?;
        let this = self.clone_handle();
        let key = key.to_string();
        blocking(move || {
            this.put_blocking(&key, &data)
                .map_err(|e| this.error("put", &key, e))
        })
        .await
    }

    async fn get_versioned(&self, key: &str) -> StoreResult<Option<(Bytes, Version)>> {
        check_key(&self.url, "get", key)?;
        let this = self.clone_handle();
        let key = key.to_string();
        blocking(move || {
            this.read_versioned(&key)
                .map(|o| o.map(|(d, v)| (Bytes::from(d), v)))
                .map_err(|e| this.error("get", &key, e))
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&Version>,
        data: Bytes,
    ) -> StoreResult<Version> {
        check_key(&self.url, "compare-and-swap", key)?;
        let this = self.clone_handle();
        let key = key.to_string();
        let expected = expected.cloned();
        blocking(move || {
            let io_err = |e| this.error("compare-and-swap", &key, e);
            let _lock = this.lock(&key).map_err(io_err)?;
            let current = this.read_versioned(&key).map_err(io_err)?.map(|(_, v)| v);
            if current != expected {
                return Err(StoreError::new(
                    &this.url,
                    "compare-and-swap",
                    &key,
                    StoreErrorKind::Conflict,
                    format!("expected version {expected:?}, found {current:?}"),
                ));
            }
            this.put_blocking(&key, &data).map_err(io_err)?;
            Ok(Version(Digest::of(&data).to_hex()))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let this = self.clone_handle();
        let prefix = prefix.to_string();
        blocking(move || {
            let mut out = Vec::new();
            list_recursive(&this.root, "", &prefix, &mut out)
                .map_err(|e| this.error("list", &prefix, e))?;
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn list_info(&self, prefix: &str) -> StoreResult<Vec<crate::ObjectInfo>> {
        let keys = self.list(prefix).await?;
        let this = self.clone_handle();
        blocking(move || {
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                match fs::metadata(this.path(&key)) {
                    Ok(m) => out.push(crate::ObjectInfo {
                        size: m.len(),
                        modified: m.modified().map_err(|e| this.error("list", &key, e))?,
                        key,
                    }),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {} // deleted meanwhile
                    Err(e) => return Err(this.error("list", &key, e)),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        check_key(&self.url, "delete", key)?;
        match tokio::fs::remove_file(self.path(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.error("delete", key, e)),
        }
    }
}

impl LocalStore {
    fn clone_handle(&self) -> LocalStore {
        LocalStore {
            url: self.url.clone(),
            root: self.root.clone(),
        }
    }
}
