//! FUSE sessions and mountpoints: mounting a tree, unmounting, and finding strata mounts
//! (live or left stale by a crashed process).

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::Arc;

use crate::error::FsError;
use crate::upper::MountTree;

use super::StrataFs;

/// Checks that `path` can take a mount: it exists, is a directory, is empty, and is not a
/// dead FUSE mount left by a crashed process.
pub fn check_mountpoint(path: &Path) -> Result<(), FsError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(FsError::InvalidInput(format!(
                "mountpoint {} is a stale mount (transport endpoint is not connected); \
                 run `strata unmount {}` first",
                path.display(),
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FsError::InvalidInput(format!(
                "mountpoint {} does not exist",
                path.display()
            )))
        }
        Err(e) => return Err(FsError::io(path, e)),
    };
    if !meta.is_dir() {
        return Err(FsError::InvalidInput(format!(
            "mountpoint {} is not a directory",
            path.display()
        )));
    }
    let mut listing = std::fs::read_dir(path).map_err(|e| FsError::io(path, e))?;
    if listing.next().is_some() {
        return Err(FsError::InvalidInput(format!(
            "mountpoint {} is not empty",
            path.display()
        )));
    }
    Ok(())
}

/// A FUSE session serving a [`MountTree`] on its own threads.
pub struct MountedSession {
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl MountedSession {
    /// Blocks until the session ends (unmounted by us, `strata unmount` or `fusermount3 -u`).
    pub fn wait(self) -> std::io::Result<()> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("FUSE session thread panicked")))
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
}

/// Mounts `tree` at `mountpoint` (read-only unless it has an upper); `passthrough`: see
/// [`StrataFs::new`].
pub fn mount(
    tree: Arc<MountTree>,
    mountpoint: &Path,
    runtime: tokio::runtime::Handle,
    passthrough: bool,
) -> Result<MountedSession, FsError> {
    check_mountpoint(mountpoint)?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("strata".into()),
        fuser::MountOption::Subtype("strata".into()),
        if tree.is_writable() {
            fuser::MountOption::RW
        } else {
            fuser::MountOption::RO
        },
        fuser::MountOption::NoDev,
        // Layers come from a shared store; their setuid bits must not grant privileges.
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoAtime,
        fuser::MountOption::DefaultPermissions,
    ];
    // Root mounts serve every user in the sandbox; the kernel still checks modes.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        config.acl = fuser::SessionACL::All;
    }
    // Reads served from local chunk files block their thread on the disk; eight let 16
    // concurrent random readers overlap their IO (measured: QD1 p50 117 → 104 µs against 4).
    config.n_threads = Some(8);
    config.clone_fd = true;
    let fs = StrataFs::new(tree, runtime, passthrough);
    let session = fuser::Session::new(fs, mountpoint, &config).map_err(|e| {
        FsError::io(
            mountpoint,
            std::io::Error::new(e.kind(), format!("mounting: {e}")),
        )
    })?;
    let thread = std::thread::Builder::new()
        .name("strata-fuse".into())
        .spawn(move || session.run())
        .map_err(|e| FsError::io(mountpoint, e))?;
    Ok(MountedSession { thread })
}

/// Decodes the octal escapes (`\040` for a space...) of a /proc/self/mountinfo path.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The path the kernel records for a mountpoint: absolute, symlinks and `..` resolved. A stale
/// mount cannot be resolved itself, so its parent is.
pub fn resolve_mountpoint(path: &Path) -> std::io::Result<std::path::PathBuf> {
    let path = std::path::absolute(path)?;
    match std::fs::canonicalize(&path) {
        Ok(p) => Ok(p),
        Err(e) => match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => Ok(std::fs::canonicalize(parent)?.join(name)),
            _ => Err(e),
        },
    }
}

/// Every strata FUSE mount (live or stale) in this mount namespace, per /proc/self/mountinfo.
pub fn strata_mounts() -> std::io::Result<Vec<std::path::PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let (mp, fstype, source) = (fields.get(4)?, fields.get(sep + 1)?, fields.get(sep + 2)?);
            // Depending on how it was mounted the type is `fuse.strata`, or `fuse` with source
            // `strata`.
            let ours =
                *fstype == "fuse.strata" || (fstype.starts_with("fuse") && *source == "strata");
            ours.then(|| {
                std::path::PathBuf::from(std::ffi::OsString::from_vec(unescape_mountinfo(mp)))
            })
        })
        .collect())
}

/// Whether `path` is a strata FUSE mount (live or stale).
pub fn is_strata_mount(path: &Path) -> std::io::Result<bool> {
    let wanted = resolve_mountpoint(path)?;
    Ok(strata_mounts()?.contains(&wanted))
}

/// Whether the process serving the mount at `path` is gone ("transport endpoint is not
/// connected").
pub fn is_stale_mount(path: &Path) -> bool {
    matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
}

/// Detaches every strata mount whose serving process is gone (a crashed daemon leaves them
/// behind); returns the ones cleaned up. Live mounts, ours or another process's, are left.
pub fn clean_stale_mounts() -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut cleaned = Vec::new();
    for mp in strata_mounts()? {
        if is_stale_mount(&mp) {
            match unmount(&mp, true) {
                Ok(()) => cleaned.push(mp),
                Err(e) => tracing::warn!("cleaning up stale mount {}: {e}", mp.display()),
            }
        }
    }
    Ok(cleaned)
}

/// Unmounts a strata mount. `lazy` detaches it even while files are open (MNT_DETACH).
pub fn unmount(path: &Path, lazy: bool) -> Result<(), FsError> {
    if !is_strata_mount(path).map_err(|e| FsError::io(path, e))? {
        return Err(FsError::InvalidInput(format!(
            "{} is not a strata mount",
            path.display()
        )));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| FsError::InvalidInput("mountpoint contains NUL".into()))?;
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        // SAFETY: a valid C string and flags.
        if unsafe { libc::umount2(c_path.as_ptr(), flags) } != 0 {
            let e = std::io::Error::last_os_error();
            let hint = if e.raw_os_error() == Some(libc::EBUSY) {
                " (files are open there; --lazy detaches it anyway)"
            } else {
                ""
            };
            return Err(FsError::io(
                path,
                std::io::Error::new(e.kind(), format!("unmount: {e}{hint}")),
            ));
        }
        return Ok(());
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd
        .arg(path)
        .output()
        .map_err(|e| FsError::io("fusermount3", e))?;
    if !out.status.success() {
        return Err(FsError::InvalidInput(format!(
            "fusermount3 -u {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
