//! FUSE sessions and mountpoints: mounting a tree, unmounting, and finding strata mounts
//! (live or left stale by a crashed process).

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::Arc;

use strata_fs::error::FsError;
use strata_fs::upper::MountTree;

use super::{ErrnoCounts, StrataFs};

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
    /// The kernel's id of the mount (when mounted as root): what [`unmount_exact`] checks.
    pub mount_id: Option<u64>,
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

/// Who may have a mount made on a directory: anyone, or only the directory's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountpointOwner {
    Any,
    /// The directory must be owned by `uid`, reachable by `uid` and `gid` (the path is
    /// resolved with their permissions, not root's), with no symlink on its path.
    Uid {
        uid: u32,
        gid: u32,
    },
}

/// Mounts `tree` at `mountpoint` (read-only unless it has an upper); `passthrough`: see
/// [`StrataFs::new`]. As root the directory is opened once and the mount attached to what
/// was opened (after `owner` is checked on it), so a path swapped meanwhile (a renamed
/// parent, a symlink) cannot move the mount elsewhere.
pub fn mount(
    tree: Arc<MountTree>,
    mountpoint: &Path,
    owner: MountpointOwner,
    runtime: tokio::runtime::Handle,
    passthrough: bool,
    errors: Arc<ErrnoCounts>,
) -> Result<MountedSession, FsError> {
    let root = rustix::process::geteuid().is_root();
    if !root && owner != MountpointOwner::Any {
        return Err(FsError::Errno(libc::EPERM));
    }
    // An owner-checked path is looked at only through the directory opened as the owner
    // (`mount_on_fd`): root following it first would tell anyone what is where.
    if owner == MountpointOwner::Any {
        check_mountpoint(mountpoint)?;
    }
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
    if rustix::process::geteuid().is_root() {
        config.acl = fuser::SessionACL::All;
    }
    // Reads served from local chunk files block their thread on the disk; eight let 16
    // concurrent random readers overlap their IO (measured: QD1 p50 117 → 104 µs against 4).
    config.n_threads = Some(8);
    config.clone_fd = true;
    let writable = tree.is_writable();
    let fs = StrataFs::new(tree, runtime, passthrough, errors);
    let notifier = fs.notifier_slot();
    let mounting = |e: std::io::Error| {
        FsError::io(
            mountpoint,
            std::io::Error::new(e.kind(), format!("mounting: {e}")),
        )
    };
    let (session, mount_id) = if root {
        let (dev_fuse, attached) = mount_on_fd(mountpoint, owner, writable)?;
        // Without asking the filesystem: nothing serves it until the session starts (older
        // kernels would send it a GETATTR and wait for ever).
        let mount_id = rustix::fs::statx(
            &attached,
            "",
            rustix::fs::AtFlags::EMPTY_PATH | rustix::fs::AtFlags::STATX_DONT_SYNC,
            rustix::fs::StatxFlags::MNT_ID,
        )
        .ok()
        .filter(|st| st.stx_mask & rustix::fs::StatxFlags::MNT_ID.bits() != 0)
        .map(|st| st.stx_mnt_id);
        // An open file on the mount would keep it busy.
        drop(attached);
        let acl = config.acl;
        match fuser::Session::from_fd(fs, dev_fuse, acl, config) {
            Ok(session) => (session, mount_id),
            Err(e) => {
                // Mounted, but the session did not start: take the mount away again.
                detach_failed(mountpoint, mount_id);
                return Err(mounting(e));
            }
        }
    } else {
        (
            fuser::Session::new(fs, mountpoint, &config).map_err(mounting)?,
            None,
        )
    };
    // Before the session runs, so before any open needs it.
    let _ = notifier.set(session.notifier());
    let at = mountpoint.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("strata-fuse".into())
        .spawn(move || {
            let ended = session.run();
            // Unlike a session fuser mounted itself, one on a connection it was handed does
            // not unmount on its way out: one that failed detaches its mount here.
            if ended.is_err() {
                detach_failed(&at, mount_id);
            }
            ended
        });
    match thread {
        Ok(thread) => Ok(MountedSession { thread, mount_id }),
        Err(e) => {
            detach_failed(mountpoint, mount_id);
            Err(FsError::io(mountpoint, e))
        }
    }
}

/// Detaches mount `id` at `mountpoint`, whose session failed (nothing would serve it).
fn detach_failed(mountpoint: &Path, id: Option<u64>) {
    if id.is_none() {
        return;
    }
    if let Err(e) = unmount_exact(mountpoint, id, true) {
        tracing::warn!(
            "detaching {} after its session failed: {e}",
            mountpoint.display()
        );
    }
}

/// Mounts a FUSE filesystem on directory `mountpoint` with the kernel's mount API: the
/// directory is opened once (without following a symlink: anywhere on the path when `owner`
/// is a uid, else in its last component), checked (a directory, empty, owned by `owner`),
/// and the new mount is attached to exactly what was opened. Returns the `/dev/fuse`
/// connection to serve and the attached mount.
fn mount_on_fd(
    mountpoint: &Path,
    owner: MountpointOwner,
    writable: bool,
) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd), FsError> {
    use rustix::fs::{Mode, OFlags};
    use rustix::mount::{
        fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount,
        FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags,
    };
    use std::os::fd::AsRawFd;
    let io = |e: std::io::Error| FsError::io(mountpoint, e);
    let at = match owner {
        MountpointOwner::Uid { uid, gid } => open_dir_as(mountpoint, uid, gid).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                FsError::InvalidInput(format!(
                    "mountpoint {}: a symlink is on its path",
                    mountpoint.display()
                ))
            } else {
                io(e)
            }
        })?,
        MountpointOwner::Any => rustix::fs::open(
            mountpoint,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io(e.into()))?,
    };
    let st = rustix::fs::fstat(&at).map_err(|e| io(e.into()))?;
    if let MountpointOwner::Uid { uid, .. } = owner {
        if st.st_uid != uid {
            return Err(FsError::io(
                mountpoint,
                std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("the mountpoint is not owned by uid {uid}"),
                ),
            ));
        }
    }
    let opened = format!("/proc/self/fd/{}", at.as_raw_fd());
    if std::fs::read_dir(&opened).map_err(io)?.next().is_some() {
        return Err(FsError::InvalidInput(format!(
            "mountpoint {} is not empty",
            mountpoint.display()
        )));
    }
    let dev_fuse = rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| FsError::io(Path::new("/dev/fuse"), e.into()))?;
    let config = || -> rustix::io::Result<std::os::fd::OwnedFd> {
        let fs = fsopen("fuse", FsOpenFlags::FSOPEN_CLOEXEC)?;
        fsconfig_set_string(&fs, "source", "strata")?;
        fsconfig_set_string(&fs, "subtype", "strata")?;
        fsconfig_set_string(&fs, "fd", dev_fuse.as_raw_fd().to_string())?;
        fsconfig_set_string(&fs, "rootmode", format!("{:o}", st.st_mode))?;
        fsconfig_set_string(
            &fs,
            "user_id",
            rustix::process::getuid().as_raw().to_string(),
        )?;
        fsconfig_set_string(
            &fs,
            "group_id",
            rustix::process::getgid().as_raw().to_string(),
        )?;
        fsconfig_set_flag(&fs, "default_permissions")?;
        // Root mounts serve every user in the sandbox; the kernel still checks modes.
        fsconfig_set_flag(&fs, "allow_other")?;
        if !writable {
            fsconfig_set_flag(&fs, "ro")?;
        }
        fsconfig_create(&fs)?;
        let mut attrs = MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NOATIME;
        if !writable {
            attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY;
        }
        let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?;
        move_mount(
            &mnt,
            "",
            &at,
            "",
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
        )?;
        Ok(mnt)
    };
    let attached = config().map_err(|e| {
        FsError::io(
            mountpoint,
            std::io::Error::new(std::io::Error::from(e).kind(), format!("mounting: {e}")),
        )
    })?;
    Ok((dev_fuse, attached))
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
    Ok(strata_mount_ids()?.into_iter().map(|(_, p)| p).collect())
}

/// Every strata FUSE mount in this mount namespace: (mount id, mountpoint).
fn strata_mount_ids() -> std::io::Result<Vec<(u64, std::path::PathBuf)>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let id: u64 = fields.first()?.parse().ok()?;
            let (mp, fstype, source) = (fields.get(4)?, fields.get(sep + 1)?, fields.get(sep + 2)?);
            // Depending on how it was mounted the type is `fuse.strata`, or `fuse` with source
            // `strata`.
            let ours =
                *fstype == "fuse.strata" || (fstype.starts_with("fuse") && *source == "strata");
            ours.then(|| {
                let path = std::ffi::OsString::from_vec(unescape_mountinfo(mp));
                (id, std::path::PathBuf::from(path))
            })
        })
        .collect())
}

/// [`open_dir_no_symlinks`] with the file-system identity of `uid`:`gid` and no supplementary
/// groups, so the path is resolved with their permissions. On a thread of its own: the
/// identity is the thread's, and goes with it.
fn open_dir_as(path: &Path, uid: u32, gid: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("strata-open-as".into())
        .spawn(move || {
            // The raw system calls: they change this thread only (libc's wrappers of
            // setgroups would change every thread of the daemon).
            // SAFETY: no pointers are read (an empty list), and the identity changed is this
            // thread's own, which ends right after.
            let rc = unsafe {
                libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>())
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: plain system calls on this thread's credentials.
            unsafe {
                libc::syscall(libc::SYS_setfsgid, gid as libc::c_long);
                libc::syscall(libc::SYS_setfsuid, uid as libc::c_long);
                // Each returns the identity before the call: asking again tells whether the
                // change took.
                let now_gid = libc::syscall(libc::SYS_setfsgid, gid as libc::c_long);
                let now_uid = libc::syscall(libc::SYS_setfsuid, uid as libc::c_long);
                if now_gid != gid as libc::c_long || now_uid != uid as libc::c_long {
                    return Err(std::io::Error::from_raw_os_error(libc::EPERM));
                }
            }
            open_dir_no_symlinks(&path)
        })?
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the opening thread panicked")))
}

/// Opens directory `path` (O_PATH) without following a symlink anywhere on the way.
fn open_dir_no_symlinks(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::fs::openat2(
        rustix::fs::CWD,
        c.as_c_str(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS,
    )?)
}

/// The id of the mount whose root is `name` in directory `dir`, without following `name` if
/// it is a symlink and without asking the filesystem (`None`: `name` is not a mount's root).
fn mount_root_id(
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::CStr,
) -> std::io::Result<Option<u64>> {
    use rustix::fs::{AtFlags, StatxAttributes, StatxFlags};
    let st = rustix::fs::statx(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::STATX_DONT_SYNC,
        StatxFlags::MNT_ID,
    )?;
    let root = st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT);
    Ok(root.then_some(st.stx_mnt_id))
}

/// Whether `path` is a strata FUSE mount (live or stale).
pub fn is_strata_mount(path: &Path) -> std::io::Result<bool> {
    let wanted = resolve_mountpoint(path)?;
    Ok(strata_mounts()?.contains(&wanted))
}

/// Unmounts the mount at `path` only if it is still mount `id` (see
/// [`MountedSession::mount_id`]), resolving `path` without following any symlink: a path
/// renamed or swapped since the mount was made cannot make another mount go. Without an
/// id, as [`unmount`].
///
/// A mount no longer at `path` (a parent of it was renamed) is looked for by its id in the
/// mount table and unmounted where it is now, with the same checks.
pub fn unmount_exact(path: &Path, id: Option<u64>, lazy: bool) -> Result<(), FsError> {
    let Some(id) = id.filter(|_| rustix::process::geteuid().is_root()) else {
        return unmount(path, lazy);
    };
    match unmount_as_root_checked(path, Some(id), lazy) {
        Err(e) if !is_busy(&e) => {
            let now = strata_mount_ids()
                .map_err(|e| FsError::io("/proc/self/mountinfo", e))?
                .into_iter()
                .find(|(m, _)| *m == id)
                .map(|(_, p)| p);
            match now {
                Some(moved) if moved != path => unmount_as_root_checked(&moved, Some(id), lazy),
                _ => Err(e),
            }
        }
        done => done,
    }
}

/// Whether an unmount failed because the mount is busy (files open in it).
pub fn is_busy(e: &FsError) -> bool {
    match e {
        FsError::Errno(n) => *n == libc::EBUSY,
        FsError::Io { source, .. } => {
            source.raw_os_error() == Some(libc::EBUSY)
                || source.kind() == std::io::ErrorKind::ResourceBusy
        }
        _ => false,
    }
}

fn unmount_as_root(path: &Path, lazy: bool) -> Result<(), FsError> {
    unmount_as_root_checked(path, None, lazy)
}

fn unmount_as_root_checked(path: &Path, expected: Option<u64>, lazy: bool) -> Result<(), FsError> {
    use std::os::fd::AsRawFd;
    let not_ours = || FsError::InvalidInput(format!("{} is not a strata mount", path.display()));
    let abs = std::path::absolute(path).map_err(|e| FsError::io(path, e))?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Err(not_ours());
    };
    // Symlinks in the path as given are the caller's to use (unless the mount is named by
    // its id); from here on nothing is followed, and the entry must still be a strata
    // mount's root (that very mount, given its id) when it is unmounted.
    let parent = match expected {
        Some(_) => parent.to_path_buf(),
        None => std::fs::canonicalize(parent).map_err(|e| FsError::io(parent, e))?,
    };
    let abs = parent.join(name);
    let dir = open_dir_no_symlinks(&parent).map_err(|e| {
        FsError::io(
            path,
            std::io::Error::new(
                e.kind(),
                format!("opening its parent without symlinks: {e}"),
            ),
        )
    })?;
    let c_name = std::ffi::CString::new(name.as_bytes())
        .map_err(|_| FsError::InvalidInput("mountpoint contains NUL".into()))?;
    let mounts = strata_mount_ids().map_err(|e| FsError::io("/proc/self/mountinfo", e))?;
    let wanted = |m: u64| expected.is_none_or(|e| e == m);
    let ours = match mount_root_id(&dir, &c_name) {
        Ok(Some(id)) => wanted(id) && mounts.iter().any(|(m, _)| *m == id),
        Ok(None) => false,
        // A mount whose serving process is gone cannot be asked: mountinfo must list it at
        // exactly this path (the unmount below still resolves it through the open parent).
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            mounts.iter().any(|(m, p)| *p == abs && wanted(*m))
        }
        Err(e) => return Err(FsError::io(path, e)),
    };
    if !ours {
        return Err(not_ours());
    }
    let via = format!("/proc/self/fd/{}/", dir.as_raw_fd());
    let mut target = via.into_bytes();
    target.extend_from_slice(name.as_bytes());
    let target = std::ffi::CString::new(target)
        .map_err(|_| FsError::InvalidInput("mountpoint contains NUL".into()))?;
    let mut flags = rustix::mount::UnmountFlags::NOFOLLOW;
    if lazy {
        flags |= rustix::mount::UnmountFlags::DETACH;
    }
    if let Err(e) = rustix::mount::unmount(target.as_c_str(), flags) {
        let e = std::io::Error::from(e);
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
    Ok(())
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

/// Makes `target` a second mountpoint of the strata mount at `source` (a bind mount): both
/// are then one FUSE session, with one kernel page cache and one set of inodes, and the
/// session lives until the last of its mountpoints is unmounted. Root only.
///
/// `dev` is the session's device number, taken when it was mounted: the mount found at
/// `source` is cloned first (`open_tree`, which pins it) and used only if it is that session,
/// so neither a path swapped by a user (a renamed parent, a symlink) nor a mountpoint
/// unmounted meanwhile can make `target` show another tree. `target` must be an empty
/// directory (see [`check_mountpoint`]); it is opened without following a symlink, and the
/// clone is attached to what was opened.
pub fn bind(source: &Path, dev: u64, target: &Path) -> Result<(), FsError> {
    use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};
    if !rustix::process::geteuid().is_root() {
        return Err(FsError::Errno(libc::EPERM));
    }
    let clone = open_tree(
        rustix::fs::CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| FsError::io(source, e.into()))?;
    let found = rustix::fs::fstat(&clone).map_err(|e| FsError::io(source, e.into()))?;
    if found.st_dev != dev {
        return Err(FsError::InvalidInput(format!(
            "{} is no longer the session to share",
            source.display()
        )));
    }
    check_mountpoint(target)?;
    let at = rustix::fs::open(
        target,
        rustix::fs::OFlags::PATH
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| FsError::io(target, e.into()))?;
    move_mount(
        &clone,
        "",
        &at,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(|e| FsError::io(target, e.into()))
}

/// The device number of the filesystem mounted at `path` (a session's, right after mounting),
/// for [`bind`].
pub fn mounted_dev(path: &Path) -> Result<u64, FsError> {
    rustix::fs::stat(path)
        .map(|st| st.st_dev)
        .map_err(|e| FsError::io(path, e.into()))
}

/// Unmounts a strata mount. `lazy` detaches it even while files are open (MNT_DETACH).
///
/// As root, nothing on the way is followed that a user could swap: the parent directory is
/// opened without following symlinks, the entry there must be the root of a mount that
/// /proc/self/mountinfo lists as strata's, and the unmount goes through that open directory
/// (`/proc/self/fd/N/NAME`) with `UMOUNT_NOFOLLOW`.
pub fn unmount(path: &Path, lazy: bool) -> Result<(), FsError> {
    if rustix::process::geteuid().is_root() {
        return unmount_as_root(path, lazy);
    }
    if !is_strata_mount(path).map_err(|e| FsError::io(path, e))? {
        return Err(FsError::InvalidInput(format!(
            "{} is not a strata mount",
            path.display()
        )));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded_and_other_bytes_kept() {
        assert_eq!(
            unescape_mountinfo("/mnt/with\\040space\\011tab\\134back"),
            b"/mnt/with space\ttab\\back"
        );
        // Not an escape: a backslash without three octal digits, or cut short.
        assert_eq!(unescape_mountinfo("/a\\08b\\04"), b"/a\\08b\\04");
    }
}
