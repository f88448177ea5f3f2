//! What a client of a [`MountTree`] keeps per open file and directory, and how it schedules
//! reads: the policies the FUSE adapter and an embedder share, so that both see the same
//! behaviour.
//!
//! - **Reads**: bytes already here (the upper's data, a chunk in memory or a verified chunk
//!   file) are answered at once ([`Read::Ready`]); only reads that wait on the store are
//!   futures ([`Read::Wait`]), for the caller to run where waiting costs nothing.
//! - **Opens of layer files**: a large file whose local copy is complete in the disk cache
//!   may be handed to the kernel to read itself (passthrough). The kernel refuses to mix that
//!   with reads through strata on one inode, so a file goes passthrough only when none of its
//!   other opens is left; and it cannot be opened for writing (or truncated) while passthrough
//!   readers hold it, since the kernel reads the layer's copy for them. The kernel sends the
//!   RELEASE of a closed file a moment after `close` returned, so an open for writing waits
//!   for those releases, up to [`RELEASE_WAIT`], before it answers ETXTBSY.
//! - **Opens of small layer files**: their bytes may be handed to the kernel's page cache with
//!   the open ([`Handles::prefill`]), when every one of them is here, so that the first read
//!   costs no trip through the daemon. While that is under way no change to the file's bytes
//!   (a copy-up, a truncate) begins: the kernel could otherwise keep the layer's bytes over
//!   the change's.
//! - **Directory listings**: taken once per open handle (and again on a rewind of a writable
//!   tree), so offsets stay valid across calls and no entry shows twice while the directory
//!   changes.
//! - **Absent names**: see [`ENTRY_TTL`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::error::{FsError, FsResult};
use crate::upper::{MountTree, NodeKind, Stat};

/// How long the kernel may keep entries, attributes and absent names. Every change to a mount
/// goes through it (layers are immutable and the upper is the mount's own), and the kernel
/// drops what a change invalidates, so they may be kept long. That includes absent names: a
/// program probing for files (Python's imports) asks once, and a name made later through this
/// mount replaces the kernel's negative entry.
pub const ENTRY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Files smaller than this are never read in passthrough mode: a few reads through strata cost
/// less than a second copy of the file in the cache.
pub const PASSTHROUGH_MIN_SIZE: u64 = 1 << 20;

/// How long an open for writing waits for passthrough readers' late releases.
pub const RELEASE_WAIT: Duration = Duration::from_millis(200);

/// A read's answer: now, or once the store has answered.
pub enum Read {
    Ready(FsResult<Bytes>),
    Wait(Pin<Box<dyn Future<Output = FsResult<Bytes>> + Send + 'static>>),
}

/// How an open file is served; give it back to [`Handles::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenKind {
    /// The upper's copy (or a file of a read-only tree's upper-less stack), through strata.
    Upper,
    /// A layer file through strata; the caller may keep its page cache across opens.
    Layer,
    /// A layer file the kernel reads itself from the local copy.
    Passthrough,
}

/// An open of a file for reading.
pub enum Opened<B> {
    Through(OpenKind),
    /// Passthrough, with the backing the caller registered for the file.
    Passthrough(Arc<B>),
}

/// A directory's entries as one open handle sees them: (inode, name, kind).
pub type Listing = Arc<Vec<(u64, Vec<u8>, NodeKind)>>;

/// The open files and directories of one client of a tree. `B` is what the client registers
/// to let the kernel read a file itself (FUSE's backing id); an embedder uses `()`.
pub struct Handles<B> {
    tree: Arc<MountTree>,
    runtime: tokio::runtime::Handle,
    passthrough: AtomicBool,
    files: Mutex<HashMap<u64, LayerOpens<B>>>,
    /// Woken when the last passthrough open of a file is released.
    released: Notify,
    dirs: Mutex<HashMap<u64, Listing>>,
    next_dir: AtomicU64,
}

struct LayerOpens<B> {
    /// Opens read through strata.
    through: u32,
    passthrough: Option<PassthroughOpens<B>>,
    /// Prefills under way ([`Handles::prefill`]).
    prefilling: u32,
}

impl<B> LayerOpens<B> {
    fn new() -> Self {
        LayerOpens {
            through: 0,
            passthrough: None,
            prefilling: 0,
        }
    }

    fn unused(&self) -> bool {
        self.through == 0 && self.passthrough.is_none() && self.prefilling == 0
    }
}

/// What keeps a file from being opened for writing now.
enum Holder {
    /// Readers the kernel serves from the layer's copy: they let go when they close.
    Passthrough,
    /// A prefill: it ends on its own, soon.
    Prefill,
}

/// Files up to this size have their bytes handed to the kernel with their open (see
/// [`Handles::prefill`]): the kernel would ask for all of such a file in its first read (its
/// readahead window is 128 KiB).
pub const PREFILL_MAX_SIZE: u64 = 128 << 10;

/// The bytes of a small layer file for the kernel's page cache, from [`Handles::prefill`]. No
/// change to the file's bytes begins until it is dropped.
pub struct Prefill<'a, B: Send + Sync + 'static> {
    handles: &'a Handles<B>,
    ino: u64,
    bytes: Bytes,
}

impl<B: Send + Sync + 'static> Prefill<'_, B> {
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The bytes reached the kernel: they count as a read of the whole file (in the stats
    /// and the start record), and the open as prefilled.
    pub fn delivered(self) {
        let stack = self.handles.tree.stack();
        stack.count_whole_read(self.ino, self.bytes.len() as u64);
        stack.cache().record_prefilled_open();
    }
}

impl<B: Send + Sync + 'static> Drop for Prefill<'_, B> {
    fn drop(&mut self) {
        self.handles.end_prefill(self.ino);
    }
}

struct PassthroughOpens<B> {
    /// Registered with the kernel; dropping it unregisters the file.
    backing: Arc<B>,
    /// Keeps the local copy in the cache (pinned) while the kernel reads it.
    _file: cache::AssembledFile,
    count: u32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B: Send + Sync + 'static> Handles<B> {
    /// `passthrough`: whether large, fully cached layer files may be handed to the kernel.
    pub fn new(tree: Arc<MountTree>, runtime: tokio::runtime::Handle, passthrough: bool) -> Self {
        Handles {
            tree,
            runtime,
            passthrough: AtomicBool::new(passthrough),
            files: Mutex::new(HashMap::new()),
            released: Notify::new(),
            dirs: Mutex::new(HashMap::new()),
            next_dir: AtomicU64::new(1),
        }
    }

    pub fn tree(&self) -> &Arc<MountTree> {
        &self.tree
    }

    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// No more passthrough opens (the kernel cannot do them).
    pub fn disable_passthrough(&self) {
        self.passthrough.store(false, Ordering::Relaxed);
    }

    /// Looks `name` up in `parent`; `None` when it is absent, an answer the caller may keep for
    /// [`ENTRY_TTL`]. A found node is remembered until the caller forgets it.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Option<Stat>> {
        match self.tree.lookup(parent, name) {
            Ok(s) => {
                self.tree.remember(s.ino);
                Ok(Some(s))
            }
            Err(e) if e.errno() == libc::ENOENT => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether `ino` exists and may be changed (when `write`); EROFS on a tree without an upper.
    pub fn access(&self, ino: u64, write: bool) -> FsResult<()> {
        if write && !self.tree.is_writable() {
            return Err(FsError::Errno(libc::EROFS));
        }
        self.tree.getattr(ino).map(|_| ())
    }

    /// The value of extended attribute `name`; ENODATA when `ino` has none of that name.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        self.tree
            .getxattr(ino, name)?
            .ok_or(FsError::Errno(libc::ENODATA))
    }

    /// Reads up to `size` bytes at `offset`: at once from what is here, else a future that
    /// waits on the store.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Read {
        if !self.tree.reads_from_layers(ino) {
            if let Some(r) = self.tree.read_local(ino, offset, size) {
                return Read::Ready(r);
            }
            let tree = self.tree.clone();
            return Read::Wait(Box::pin(async move { tree.read(ino, offset, size).await }));
        }
        // Readahead spawns its fetches on the runtime.
        let _runtime = self.runtime.enter();
        let stack = self.tree.stack().clone();
        if let Some(r) = stack.read_local(ino, offset, size) {
            return Read::Ready(r);
        }
        Read::Wait(Box::pin(async move {
            stack.read_fetch(ino, offset, size).await
        }))
    }

    /// Opens `ino` for reading. `register` hands a fully cached file to the kernel (it is
    /// asked only when passthrough may be used); an error from it turns passthrough off for
    /// the mount.
    pub fn open_read(
        &self,
        ino: u64,
        register: impl FnOnce(&std::fs::File) -> std::io::Result<B>,
    ) -> FsResult<Opened<B>> {
        // One lock over the decision, so a writer cannot copy the file up between "its bytes
        // are the layer's" and "hand the layer's copy to the kernel".
        let mut files = lock(&self.files);
        self.tree.open(ino, false)?;
        if !self.tree.reads_from_layers(ino) {
            return Ok(Opened::Through(OpenKind::Upper));
        }
        let size = match self.tree.getattr(ino) {
            Ok(s) if s.kind == NodeKind::File => s.size,
            Ok(_) => 0,
            Err(e) => {
                drop(files);
                self.tree.release(ino);
                return Err(e);
            }
        };
        if size < PASSTHROUGH_MIN_SIZE {
            return Ok(Opened::Through(OpenKind::Layer));
        }
        let stack = self.tree.stack();
        let o = files.entry(ino).or_insert_with(LayerOpens::new);
        if let Some(p) = &mut o.passthrough {
            p.count += 1;
            stack.cache().record_passthrough_open();
            stack.note_whole_file(ino);
            return Ok(Opened::Passthrough(p.backing.clone()));
        }
        if o.through == 0 && self.passthrough() {
            match stack.assembled(ino) {
                Some(file) => match register(&file.file) {
                    Ok(backing) => {
                        stack.cache().record_passthrough_open();
                        stack.note_whole_file(ino);
                        let backing = Arc::new(backing);
                        o.passthrough = Some(PassthroughOpens {
                            backing: backing.clone(),
                            _file: file,
                            count: 1,
                        });
                        return Ok(Opened::Passthrough(backing));
                    }
                    Err(e) => {
                        tracing::info!(
                            "FUSE passthrough unavailable ({e}); all reads go through strata"
                        );
                        self.disable_passthrough();
                    }
                },
                // Missing, or found at start and not verified yet: see to it.
                None => {
                    let _runtime = self.runtime.enter();
                    stack.assemble(ino);
                }
            }
        }
        o.through += 1;
        Ok(Opened::Through(OpenKind::Layer))
    }

    /// The whole of small layer file `ino` (at most [`PREFILL_MAX_SIZE`] bytes), as it is
    /// opened for reading, if every byte of it is here, so that the caller can hand the bytes
    /// to the kernel's page cache and spare the first read a trip through the daemon; once
    /// they are there, [`Prefill::delivered`] counts them as the read they replace. `None` if
    /// the file is the upper's, larger, or not all here (then nothing is fetched or noted).
    pub fn prefill(&self, ino: u64) -> Option<Prefill<'_, B>> {
        let size;
        {
            let mut files = lock(&self.files);
            // Under the lock: a copy-up either happened before (no prefill) or waits for it.
            if !self.tree.reads_from_layers(ino) {
                return None;
            }
            // A layer file's size holds while it is the layer's; the layer's entry must say
            // the same (the kernel would take a longer prefill as the file growing).
            size = match self.tree.getattr(ino) {
                Ok(s) if s.kind == NodeKind::File && s.size <= PREFILL_MAX_SIZE => s.size,
                _ => return None,
            };
            files.entry(ino).or_insert_with(LayerOpens::new).prefilling += 1;
        }
        let mut prefill = Prefill {
            handles: self,
            ino,
            bytes: Bytes::new(),
        };
        prefill.bytes = self.tree.stack().read_whole_local(ino, size)?;
        Some(prefill)
    }

    fn end_prefill(&self, ino: u64) {
        let mut files = lock(&self.files);
        let Some(o) = files.get_mut(&ino) else {
            return;
        };
        o.prefilling = o.prefilling.saturating_sub(1);
        if o.prefilling == 0 {
            self.released.notify_waiters();
        }
        if o.unused() {
            files.remove(&ino);
        }
    }

    /// Opens `ino` for writing (the upper copies it up) if no passthrough reader or prefill
    /// holds it; `None` if one does.
    pub fn try_open_write(&self, ino: u64) -> Option<FsResult<()>> {
        self.open_write_or_holder(ino).ok()
    }

    fn open_write_or_holder(&self, ino: u64) -> Result<FsResult<()>, Holder> {
        let files = lock(&self.files);
        match files.get(&ino) {
            Some(o) if o.passthrough.is_some() => Err(Holder::Passthrough),
            Some(o) if o.prefilling > 0 => Err(Holder::Prefill),
            // Under the lock: no passthrough open or prefill can begin until the file is the
            // upper's.
            _ => Ok(self.tree.open(ino, true)),
        }
    }

    /// Opens `ino` for writing, waiting up to `wait` for passthrough readers' releases (and
    /// for a prefill, however long it takes: it needs no one to end); ETXTBSY if passthrough
    /// readers still hold it then.
    pub async fn open_write(&self, ino: u64, wait: Duration) -> FsResult<()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release between the two is not missed.
            released.as_mut().enable();
            match crate::blocking::blocking(|| self.open_write_or_holder(ino)) {
                Ok(r) => return r,
                Err(Holder::Prefill) => {
                    released.await;
                    continue;
                }
                Err(Holder::Passthrough) => {}
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                match crate::blocking::blocking(|| self.open_write_or_holder(ino)) {
                    Ok(r) => return r,
                    Err(Holder::Passthrough) => return Err(FsError::Errno(libc::ETXTBSY)),
                    // Waited for above (the deadline is for passthrough readers).
                    Err(Holder::Prefill) => {}
                }
            }
        }
    }

    /// Closes an open of `ino` made by [`Handles::open_read`], [`Handles::open_write`] or a
    /// create.
    pub fn release(&self, ino: u64, kind: OpenKind) {
        if kind != OpenKind::Upper {
            self.release_layer_file(ino, kind);
        }
        self.tree.release(ino);
    }

    fn release_layer_file(&self, ino: u64, kind: OpenKind) {
        let mut files = lock(&self.files);
        let Some(o) = files.get_mut(&ino) else {
            return;
        };
        if kind == OpenKind::Passthrough {
            if let Some(p) = &mut o.passthrough {
                p.count -= 1;
                if p.count == 0 {
                    o.passthrough = None;
                    self.released.notify_waiters();
                }
            }
        } else {
            o.through = o.through.saturating_sub(1);
            if self.passthrough() && self.tree.reads_from_layers(ino) {
                // After a full read all the chunks are here: make the local copy the next open
                // can hand to the kernel.
                let _runtime = self.runtime.enter();
                self.tree.stack().assemble(ino);
            }
        }
        if o.unused() {
            files.remove(&ino);
        }
    }

    /// Opens directory `ino`: its listing, taken now, under the returned handle.
    pub fn open_dir(&self, ino: u64) -> FsResult<u64> {
        let listing = Arc::new(self.tree.readdir(ino)?);
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(fh, listing);
        Ok(fh)
    }

    /// The listing of directory handle `fh`; at offset 0 of a writable tree (a rewind) it is
    /// taken again. EBADF for a handle that is not open.
    pub fn dir_listing(&self, fh: u64, ino: u64, offset: u64) -> FsResult<Listing> {
        if offset == 0 && self.tree.is_writable() {
            let fresh = Arc::new(self.tree.readdir(ino)?);
            let mut dirs = lock(&self.dirs);
            return match dirs.get_mut(&fh) {
                Some(l) => {
                    *l = fresh.clone();
                    Ok(fresh)
                }
                None => Err(FsError::Errno(libc::EBADF)),
            };
        }
        lock(&self.dirs)
            .get(&fh)
            .cloned()
            .ok_or(FsError::Errno(libc::EBADF))
    }

    pub fn release_dir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::stack::tests::{stack_with_cache, write};
    use crate::stack::ROOT_INO;
    use crate::upper::{Caller, UpperConfig};

    const BIG: usize = 3 << 20;

    async fn handles(tmp: &std::path::Path) -> Arc<Handles<u32>> {
        write(tmp, "lower/big.bin", &vec![5u8; BIG]);
        write(tmp, "lower/dir/a.txt", b"a");
        let stack = stack_with_cache(tmp, &["lower"], Some(tmp.join("cache"))).await;
        let upper = UpperConfig::scratch(tmp.join("upper"));
        let tree = Arc::new(MountTree::new(Arc::new(stack), Some(upper)).unwrap());
        Arc::new(Handles::new(tree, tokio::runtime::Handle::current(), true))
    }

    async fn read(h: &Handles<u32>, ino: u64, offset: u64, size: u32) -> Bytes {
        match h.read(ino, offset, size) {
            Read::Ready(r) => r.unwrap(),
            Read::Wait(f) => f.await.unwrap(),
        }
    }

    /// Reads `big.bin` whole through strata so that its local copy is complete, then
    /// opens it in passthrough mode (backing 7).
    async fn passthrough_open(h: &Handles<u32>) -> u64 {
        let ino = h.lookup(ROOT_INO, b"big.bin").unwrap().unwrap().ino;
        let first = h.open_read(ino, |_| Ok(7)).unwrap();
        assert!(matches!(first, Opened::Through(OpenKind::Layer)));
        assert_eq!(read(h, ino, 0, BIG as u32).await.len(), BIG);
        h.release(ino, OpenKind::Layer);
        let started = Instant::now();
        while h.tree().stack().assembled(ino).is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "its local copy never completed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match h.open_read(ino, |_| Ok(7)).unwrap() {
            Opened::Passthrough(b) => assert_eq!(*b, 7),
            _ => panic!("a fully cached large file opens in passthrough mode"),
        }
        ino
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_for_writing_waits_for_the_late_release_of_passthrough_readers() {
        let tmp = tempfile::tempdir().unwrap();
        let h = handles(tmp.path()).await;
        let ino = passthrough_open(&h).await;
        assert!(
            h.try_open_write(ino).is_none(),
            "a passthrough reader holds it"
        );
        // The reader's release arrives a moment after its close, as the kernel's does.
        let releaser = h.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            releaser.release(ino, OpenKind::Passthrough);
        });
        let started = Instant::now();
        h.open_write(ino, Duration::from_secs(10)).await.unwrap();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(40), "{waited:?}");
        assert!(
            waited < Duration::from_secs(5),
            "woken by the release: {waited:?}"
        );
        // The file is the upper's now: reads and later opens go there.
        assert!(!h.tree().reads_from_layers(ino));
        assert!(matches!(
            h.open_read(ino, |_| Ok(7)).unwrap(),
            Opened::Through(OpenKind::Upper)
        ));
        assert_eq!(read(&h, ino, BIG as u64 - 3, 10).await.as_ref(), &[5, 5, 5]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prefill_hands_over_a_small_files_bytes_and_holds_off_changes_until_done() {
        let tmp = tempfile::tempdir().unwrap();
        let small: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        write(tmp.path(), "lower/small.txt", &small);
        write(
            tmp.path(),
            "lower/mid.bin",
            &[3u8; PREFILL_MAX_SIZE as usize + 1],
        );
        let stack = stack_with_cache(tmp.path(), &["lower"], Some(tmp.path().join("cache"))).await;
        let upper = UpperConfig::scratch(tmp.path().join("upper"));
        let tree = Arc::new(MountTree::new(Arc::new(stack), Some(upper)).unwrap());
        let h = Arc::new(Handles::<u32>::new(
            tree,
            tokio::runtime::Handle::current(),
            true,
        ));
        let ino = |name: &[u8]| h.lookup(ROOT_INO, name).unwrap().unwrap().ino;
        let (small_ino, mid_ino) = (ino(b"small.txt"), ino(b"mid.bin"));
        let gets = || h.tree().stack().cache().stats().store_gets;

        assert!(h.prefill(small_ino).is_none(), "nothing is here yet");
        assert_eq!(gets(), 0, "a prefill fetches nothing");
        assert_eq!(read(&h, small_ino, 0, 1 << 20).await.as_ref(), &small[..]);
        let reads = h.tree().stack().cache().stats().reads;
        let counts = || {
            let s = h.tree().stack().cache().stats();
            (s.reads - reads, s.prefilled_opens)
        };
        // Bytes that never reach the kernel count as no read.
        let undelivered = h.prefill(small_ino).expect("all of it is here now");
        drop(undelivered);
        assert_eq!(counts(), (0, 0));
        let prefill = h.prefill(small_ino).expect("all of it is here now");
        assert_eq!(prefill.bytes().as_ref(), &small[..]);

        // While the bytes are on their way to the kernel, a change to them waits, past the
        // wait for passthrough readers too: the kernel would keep the layer's bytes over it.
        assert!(h.try_open_write(small_ino).is_none());
        let writer = {
            let h = h.clone();
            tokio::spawn(async move { h.open_write(small_ino, Duration::ZERO).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!writer.is_finished(), "the copy-up waits for the prefill");
        prefill.delivered();
        assert_eq!(
            counts(),
            (1, 1),
            "one read of the whole file, one prefilled open"
        );
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("the copy-up goes on once the prefill is done")
            .unwrap()
            .unwrap();
        assert!(!h.tree().reads_from_layers(small_ino));
        assert!(
            h.prefill(small_ino).is_none(),
            "the upper's files are not prefilled"
        );

        // A file larger than a prefill takes is never one, all here or not.
        let mid = read(&h, mid_ino, 0, 1 << 20).await;
        assert_eq!(mid.len(), PREFILL_MAX_SIZE as usize + 1);
        assert!(h.prefill(mid_ino).is_none());
        assert!(lock(&h.files).is_empty(), "nothing is left registered");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_for_writing_under_a_passthrough_reader_is_refused_after_the_wait() {
        let tmp = tempfile::tempdir().unwrap();
        let h = handles(tmp.path()).await;
        let ino = passthrough_open(&h).await;
        let started = Instant::now();
        let e = h
            .open_write(ino, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::ETXTBSY);
        assert!(started.elapsed() >= Duration::from_millis(100));
        // The reader still reads the layer's bytes.
        assert!(h.tree().reads_from_layers(ino));
        h.release(ino, OpenKind::Passthrough);
        h.open_write(ino, Duration::ZERO).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_listing_holds_still_until_it_is_rewound() {
        let tmp = tempfile::tempdir().unwrap();
        let h = handles(tmp.path()).await;
        let names = |l: &Listing| -> Vec<String> {
            l.iter()
                .map(|(_, n, _)| String::from_utf8_lossy(n).into_owned())
                .collect()
        };
        let fh = h.open_dir(ROOT_INO).unwrap();
        let before = h.dir_listing(fh, ROOT_INO, 3).unwrap();
        assert_eq!(names(&before), ["big.bin", "dir"]);
        h.tree()
            .create(ROOT_INO, b"new.txt", 0o644, Caller { uid: 0, gid: 0 })
            .unwrap();
        // Mid-listing, the snapshot holds: offsets stay valid, nothing shows twice.
        assert_eq!(
            names(&h.dir_listing(fh, ROOT_INO, 4).unwrap()),
            names(&before)
        );
        // A rewind sees the change.
        let rewound = h.dir_listing(fh, ROOT_INO, 0).unwrap();
        assert_eq!(names(&rewound), ["big.bin", "dir", "new.txt"]);
        h.release_dir(fh);
        let e = h.dir_listing(fh, ROOT_INO, 3).unwrap_err();
        assert_eq!(e.errno(), libc::EBADF);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn absent_names_are_answered_as_absent_and_local_bytes_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let h = handles(tmp.path()).await;
        assert!(h.lookup(ROOT_INO, b"missing").unwrap().is_none());
        let e = h.lookup(ROOT_INO, &[b'x'; 300]).unwrap_err();
        assert_eq!(e.errno(), libc::ENAMETOOLONG);
        let dir = h.lookup(ROOT_INO, b"dir").unwrap().unwrap();
        let a = h.lookup(dir.ino, b"a.txt").unwrap().unwrap();
        // Cold: the chunk is in the store.
        assert!(matches!(h.read(a.ino, 0, 10), Read::Wait(_)));
        assert_eq!(read(&h, a.ino, 0, 10).await.as_ref(), b"a");
        // Now in memory: answered without waiting.
        match h.read(a.ino, 0, 10) {
            Read::Ready(r) => assert_eq!(r.unwrap().as_ref(), b"a"),
            Read::Wait(_) => panic!("a cached chunk is read at once"),
        }
    }
}
