//! strata-sandbox: the sandbox `strata run` puts a command in, built with Linux namespaces directly.
//!
//! `strata run` starts `strata __sandbox SPEC` in new mount, PID, IPC and UTS namespaces
//! (`unshare` before exec). That helper, single-threaded, builds a new root on a tmpfs:
//!
//! - the host's system directories (`/usr`, `/bin`, `/lib*`, `/etc`, `/opt`) bound read-only,
//!   with `/etc/strata` hidden;
//! - a minimal `/dev` (null, zero, full, random, urandom, tty), a private `/tmp` and
//!   `/dev/shm`, and a fresh `/proc` of the new PID namespace;
//! - the run's strata mounts (served by the daemon on the host) bound at their paths.
//!
//! Its child, PID 1 of the namespace, mounts `/proc`, pivots into the new root and detaches
//! the old one (the host's tree, the daemon's socket and state, other runs' mounts are gone
//! from its view) and drops to the run's uid/gid. It stays as a small init: it starts the
//! command with only the environment it was given, passes signals on, reaps orphans, and
//! exits with the command's status. The kernel then kills whatever was left running in the
//! namespace, and the mounts' copies go with it.
//!
//! Namespaces rather than bubblewrap: the daemon host needs nothing installed beyond strata,
//! and the mounts are the daemon's FUSE mounts, which bubblewrap would only bind like this.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::{MountFlags, MountPropagationFlags};
use rustix::process::{Pid, Signal, WaitOptions, WaitStatus};
use serde::{Deserialize, Serialize};

/// The helper's argv[1].
pub const HELPER_ARG: &str = "__sandbox";

/// Host directories the sandbox sees, read-only (those that exist).
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];
/// Bound trees in which whatever not every user may read is masked (`/etc/shadow`, private
/// keys...): even as uid 0, the command sees only what any user of the host could. (`/usr` is
/// left alone: walking it would cost every run a few hundred milliseconds.)
const MASKED_TREES: &[&str] = &["/etc", "/opt"];
/// Host directories hidden inside those (strata's own configuration).
const HIDDEN_DIRS: &[&str] = &["/etc/strata"];
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// What the helper builds and runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// An empty host directory the new root is mounted on.
    pub root: PathBuf,
    /// (host path, path in the sandbox): the run's strata mounts.
    pub binds: Vec<(PathBuf, PathBuf)>,
    pub workdir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub env: Vec<(String, String)>,
    pub argv: Vec<String>,
    /// Keep the host's network (else a network namespace of its own, loopback only).
    pub network: bool,
    /// The pid of `strata run`: if it is gone before the helper watches it, the helper stops.
    pub parent: u32,
}

fn cstr(p: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| io::Error::other("path with a NUL byte"))
}

fn context(e: io::Error, what: impl FnOnce() -> String) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", what()))
}

/// A libc call's return code: 0, or -1 with errno set.
fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(context(io::Error::last_os_error(), what))
    }
}

/// A rustix call's result, its error told as `what` failing.
fn checked<T>(r: rustix::io::Result<T>, what: impl FnOnce() -> String) -> io::Result<T> {
    r.map_err(|e| context(e.into(), what))
}

fn mounting(target: &Path) -> impl FnOnce() -> String + Copy + '_ {
    move || format!("mounting {}", target.display())
}

/// Binds `source` at `target` (`MS_BIND`); `recursive`: the mounts below it too (`MS_REC`).
fn bind(source: &Path, target: &Path, recursive: bool) -> io::Result<()> {
    let (s, t) = (cstr(source)?, cstr(target)?);
    let r = if recursive {
        rustix::mount::mount_bind_recursive(s.as_c_str(), t.as_c_str())
    } else {
        rustix::mount::mount_bind(s.as_c_str(), t.as_c_str())
    };
    checked(r, mounting(target))
}

/// Remounts the bind mount at `target` with `MS_REMOUNT | MS_BIND | flags`: only its
/// per-mount flags change. libc rather than rustix: rustix's `mount_remount` always passes a
/// data string, where this call has always passed none (NULL).
fn remount_bind(
    target: &CStr,
    flags: libc::c_ulong,
    what: impl FnOnce() -> String,
) -> io::Result<()> {
    let null = std::ptr::null();
    // SAFETY: `target` is a NUL-terminated string that outlives the call, and the source,
    // type and data pointers are null, which mount(2) takes for a remount; the kernel only
    // reads through them.
    let rc = unsafe {
        libc::mount(
            null,
            target.as_ptr(),
            null,
            libc::MS_REMOUNT | libc::MS_BIND | flags,
            null.cast(),
        )
    };
    check(rc, what)
}

/// Mounts a tmpfs at `target`.
fn tmpfs(target: &Path, flags: MountFlags, options: &str) -> io::Result<()> {
    let (t, options) = (cstr(target)?, cstr(options)?);
    let r = rustix::mount::mount(
        c"tmpfs",
        t.as_c_str(),
        c"tmpfs",
        flags,
        Some(options.as_c_str()),
    );
    checked(r, mounting(target))
}

/// Hides directory `target` behind an empty read-only one.
fn hide_dir(target: &Path) -> io::Result<()> {
    tmpfs(
        target,
        MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        "mode=0755,size=4k",
    )
}

/// `path` (absolute, in the sandbox) under the new root.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// Binds `source` at `target` read-only (and without setuid or devices), the mounts below it
/// too (a host's `/usr/local` or `/etc/resolv.conf` may be mounts of their own).
fn bind_read_only(source: &Path, target: &Path) -> io::Result<()> {
    bind(source, target, true)?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let t = cstr(target)?;
    // SAFETY: mount_setattr(2), which neither libc nor rustix wraps: a NUL-terminated path and
    // a `struct mount_attr` (repr(C), the kernel's layout) of the size passed, both outliving
    // the call; the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // Kernels before 5.12: the top mount only.
    remount_bind(
        &t,
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        mounting(target),
    )
}

/// Masks, under the new root, what in host tree `tree` not every user may read: files (and
/// sockets, FIFOs, devices) with an empty one, directories not world-searchable with an empty
/// directory. A tree that is a symlink is left alone (its target is bound elsewhere or not at
/// all), and mounts below it (another file system) are masked or walked by the same rule only
/// where they are files; their directories are not walked.
fn mask_private(tree: &Path, root: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(tree) else {
        return Ok(());
    };
    if !meta.is_dir() {
        return Ok(());
    }
    let mut masks = 0;
    walk_masks(tree, meta.dev(), root, &mut masks)
}

/// More masks than this: something is off with the host's tree; refuse rather than leak.
const MAX_MASKS: usize = 512;

fn walk_masks(dir: &Path, dev: u64, root: &Path, masks: &mut usize) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = path.symlink_metadata() else {
            continue; // gone meanwhile
        };
        let mode = meta.permissions().mode();
        let private = if meta.is_dir() {
            mode & 0o005 != 0o005
        } else if meta.is_file() {
            mode & 0o004 == 0
        } else {
            // Sockets, FIFOs and devices: a read-only mount does not stop a connect.
            !meta.file_type().is_symlink()
        };
        if !private {
            if meta.is_dir() && meta.dev() == dev {
                walk_masks(&path, dev, root, masks)?;
            }
            continue;
        }
        *masks += 1;
        if *masks > MAX_MASKS {
            return Err(io::Error::other(format!(
                "more than {MAX_MASKS} private entries to hide under {}",
                dir.display()
            )));
        }
        let target = inside(root, &path);
        let masked = if meta.is_dir() {
            hide_dir(&target)
        } else {
            bind(Path::new("/dev/null"), &target, false)
                .and_then(|()| remount_bind(&cstr(&target)?, libc::MS_RDONLY, mounting(&target)))
        };
        match masked {
            Ok(()) => {}
            // Removed between the listing and the mount: nothing left to hide.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Builds the new root under `spec.root` (in the helper's own mount namespace).
fn build_root(spec: &SandboxSpec) -> io::Result<()> {
    let root = &spec.root;
    // Nothing done here may reach the host, and nothing the host mounts later reaches here.
    let private = MountPropagationFlags::REC | MountPropagationFlags::PRIVATE;
    checked(
        rustix::mount::mount_change(c"/", private),
        mounting(Path::new("/")),
    )?;
    tmpfs(
        root,
        MountFlags::NOSUID | MountFlags::NODEV,
        "mode=0755,size=1m",
    )?;
    for dir in SYSTEM_DIRS {
        let host = Path::new(dir);
        let target = inside(root, host);
        match std::fs::symlink_metadata(host) {
            Ok(m) if m.file_type().is_symlink() => {
                std::os::unix::fs::symlink(std::fs::read_link(host)?, &target)?;
            }
            Ok(m) if m.is_dir() => {
                std::fs::create_dir_all(&target)?;
                bind_read_only(host, &target)?;
            }
            _ => {}
        }
    }
    for dir in MASKED_TREES {
        mask_private(Path::new(dir), root)?;
    }
    for dir in HIDDEN_DIRS {
        let target = inside(root, Path::new(dir));
        if target.is_dir() {
            hide_dir(&target)?;
        }
    }
    let dev = inside(root, Path::new("/dev"));
    std::fs::create_dir_all(&dev)?;
    // Its device nodes are binds of the host's (mounts of their own); nothing made here may
    // act as a device.
    let flags = MountFlags::NOSUID | MountFlags::NOEXEC | MountFlags::NODEV;
    tmpfs(&dev, flags, "mode=0755,size=64k")?;
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if host.exists() {
            let target = dev.join(name);
            std::fs::File::create(&target)?;
            bind(&host, &target, false)?;
        }
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name))?;
    }
    for (dir, options) in [("/dev/shm", "mode=1777"), ("/tmp", "mode=1777")] {
        let target = inside(root, Path::new(dir));
        std::fs::create_dir_all(&target)?;
        tmpfs(&target, MountFlags::NOSUID | MountFlags::NODEV, options)?;
    }
    std::fs::create_dir_all(inside(root, Path::new("/proc")))?;
    for (host, path) in &spec.binds {
        // The daemon's mount must still be there: binding the bare directory would let the
        // command write into the host's run dir.
        if !strata_fuse::is_strata_mount(host).unwrap_or(false) {
            return Err(io::Error::other(format!(
                "{} is no longer mounted (for {})",
                host.display(),
                path.display()
            )));
        }
        let target = inside(root, path);
        std::fs::create_dir_all(&target)?;
        bind(host, &target, false)?;
    }
    // The root itself: read-only from here on (its mountpoints are made).
    let flags = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV;
    checked(
        rustix::mount::mount_remount(cstr(root)?.as_c_str(), flags, c"mode=0755"),
        mounting(root),
    )
}

/// In the command's process (PID 1 of the new namespace), before exec: its `/proc`, the
/// switch of root, and the drop of privileges.
///
/// This process is the child the single-threaded helper forked, and is single-threaded
/// itself: rustix's per-thread credential calls (raw setgroups, setgid and setuid syscalls,
/// changing the calling thread only) do here what glibc's do for a whole process, since glibc
/// only adds the same change on every other thread, and there is none.
fn enter(
    root: &CString,
    proc_dir: &CString,
    workdir: &CString,
    uid: u32,
    gid: u32,
    network: bool,
) -> io::Result<()> {
    use rustix::fs::Access;
    use rustix::mount::UnmountFlags;
    use rustix::thread::{CapabilitySet, Gid, Uid};
    let proc_flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    checked(
        rustix::mount::mount(
            c"proc",
            proc_dir.as_c_str(),
            c"proc",
            proc_flags,
            None::<&CStr>,
        ),
        || "mounting /proc".into(),
    )?;
    checked(rustix::process::chdir(root.as_c_str()), || {
        "entering the new root".into()
    })?;
    checked(rustix::process::pivot_root(c".", c"."), || {
        "pivot_root".into()
    })?;
    // The old root is now stacked under the new one: detach it, and the host with it.
    checked(rustix::mount::unmount(c".", UnmountFlags::DETACH), || {
        "detaching the host's root".into()
    })?;
    // The kernel's knobs stay out of reach: root-owned files there are writable by uid 0
    // without any capability (IRQ affinity, for one). Docker's list.
    for path in [
        c"/proc/sys",
        c"/proc/sysrq-trigger",
        c"/proc/irq",
        c"/proc/bus",
        c"/proc/fs",
        c"/proc/acpi",
    ] {
        if rustix::fs::access(path, Access::EXISTS).is_err() {
            continue;
        }
        let what = || format!("making {path:?} read-only");
        checked(rustix::mount::mount_bind_recursive(path, path), what)?;
        remount_bind(path, libc::MS_RDONLY, what)?;
    }
    if !network {
        loopback_up();
    }
    checked(rustix::process::chdir(workdir.as_c_str()), || {
        format!("entering the working directory {workdir:?}")
    })?;
    // No capabilities, ever: none kept, none to gain (setuid binaries, file caps). A
    // command running as uid 0 can then not remount, mount, make devices or load modules.
    // Every number up to 63, not only the capabilities rustix names; the kernel refuses
    // those past its last one (EINVAL), which is ignored.
    for cap in 0..64 {
        let cap = CapabilitySet::from_bits_retain(1 << cap);
        let _ = rustix::thread::remove_capability_from_bounding_set(cap);
    }
    checked(rustix::thread::set_thread_groups(&[]), || {
        "setgroups".into()
    })?;
    // `from_raw_unchecked`: every id is passed on as given (`from_raw` asserts it is not -1);
    // the kernel refuses -1 with EINVAL, as before.
    checked(
        rustix::thread::set_thread_gid(Gid::from_raw_unchecked(gid)),
        || format!("setgid {gid}"),
    )?;
    checked(
        rustix::thread::set_thread_uid(Uid::from_raw_unchecked(uid)),
        || format!("setuid {uid}"),
    )?;
    drop_capabilities()?;
    checked(rustix::thread::set_no_new_privs(true), || {
        "no_new_privs".into()
    })?;
    // Set after setuid, which clears it: the command dies with its helper.
    checked(
        rustix::process::set_parent_process_death_signal(Some(Signal::KILL)),
        || "prctl".into(),
    )?;
    Ok(())
}

/// Clears the effective, permitted, inheritable and ambient capability sets (setuid to a
/// non-zero uid clears most of them already; uid 0 keeps them without this).
fn drop_capabilities() -> io::Result<()> {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    let _ = rustix::thread::clear_ambient_capability_set();
    // capset with a version-3 header (this process) and its two data records, all zero.
    let none = CapabilitySets {
        effective: CapabilitySet::empty(),
        permitted: CapabilitySet::empty(),
        inheritable: CapabilitySet::empty(),
    };
    checked(rustix::thread::set_capabilities(None, none), || {
        "dropping capabilities".into()
    })
}

/// Brings up `lo` in a new network namespace (it starts down), so the command can still
/// talk to itself on 127.0.0.1.
fn loopback_up() {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _rest: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _rest: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: `fd` is a new socket, closed at the end and used for nothing else; SIOCGIFFLAGS
    // and SIOCSIFFLAGS read and write one `struct ifreq` (16-byte name, then the flags, 40
    // bytes in all), the layout of `req`, which outlives the calls. (rustix would not make
    // this sound by itself: its ioctl takes the same buffer on the same terms.)
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req as *mut IfReq) == 0 {
            req.flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req as *const IfReq);
        }
        libc::close(fd);
    }
}

/// The helper's main: builds the root, runs the command, exits with its status.
pub fn helper_main(spec_json: &str) -> i32 {
    let spec: SandboxSpec = match serde_json::from_str(spec_json) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("strata run: bad sandbox spec: {e}");
            return 125;
        }
    };
    match run_helper(&spec) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("strata run: {e}");
            125
        }
    }
}

fn run_helper(spec: &SandboxSpec) -> io::Result<i32> {
    // The helper dies with `strata run`, and if that already happened (before the prctl), it
    // stops here.
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    if Pid::as_raw(rustix::process::getppid()) as u32 != spec.parent {
        return Err(io::Error::other("strata run is gone"));
    }
    build_root(spec)?;
    if spec.argv.is_empty() {
        return Err(io::Error::other("no command to run"));
    }
    // Everything the forked processes need is made before the fork.
    let root = cstr(&spec.root)?;
    let proc_dir = cstr(inside(&spec.root, Path::new("/proc")))?;
    let workdir = cstr(&spec.workdir)?;
    let argv: Vec<CString> = spec.argv.iter().map(cstr).collect::<io::Result<_>>()?;
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}")))
        .collect::<io::Result<_>>()?;
    let exec = Exec::new(&argv, &envp);
    // SAFETY: fork (libc's, which runs the atfork handlers; rustix's only fork is the raw
    // one of its runtime module) in a single-threaded process: `strata __sandbox` goes to
    // `helper_main` before anything in it starts a thread (see the CLI's main), so no lock is
    // held by a thread the child lacks, and the child may allocate. It only makes syscalls and
    // runs `init`, and leaves through `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    let Some(pid) = Pid::from_raw(pid) else {
        // The child (fork returned 0).
        let code = match enter(&root, &proc_dir, &workdir, spec.uid, spec.gid, spec.network) {
            Ok(()) => init(&exec),
            Err(e) => {
                eprintln!("strata run: {e}");
                125
            }
        };
        // SAFETY: _exit only ends the process: the forked child leaves without running the
        // helper's destructors or atexit handlers (std::process::exit would run them).
        unsafe { libc::_exit(code) };
    };
    // A signal for the run goes to the sandbox's init, which passes it on to the command.
    forward_signals_to(pid);
    let status = wait_for(pid)?;
    Ok(exit_code(status))
}

/// argv and envp as exec wants them (null-terminated pointer arrays).
struct Exec {
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl Exec {
    fn new(argv: &[CString], envp: &[CString]) -> Exec {
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|c| c.as_ptr())
                .chain([std::ptr::null()])
                .collect()
        };
        Exec {
            argv: ptrs(argv),
            envp: ptrs(envp),
        }
    }
}

static FORWARD_TO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The signal handler: async-signal-safe (an atomic load, and rustix's kill, one raw syscall
/// that does not even touch errno).
extern "C" fn forward(sig: libc::c_int) {
    let pid = FORWARD_TO.load(std::sync::atomic::Ordering::SeqCst);
    if pid <= 0 {
        return;
    }
    // Installed for named signals only (see forward_signals_to).
    if let (Some(pid), Some(sig)) = (Pid::from_raw(pid), Signal::from_named_raw(sig)) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

fn forward_signals_to(pid: Pid) {
    FORWARD_TO.store(
        pid.as_raw_nonzero().get(),
        std::sync::atomic::Ordering::SeqCst,
    );
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: signal(2) installs `forward`, an extern "C" fn(c_int) that is
        // async-signal-safe (above), for catchable signals. libc's, not rustix's: rustix's
        // only sigaction is the raw one of its runtime module, without glibc's restorer and
        // SA_RESTART semantics.
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
}

fn wait_for(pid: Pid) -> io::Result<WaitStatus> {
    loop {
        match rustix::process::waitpid(Some(pid), WaitOptions::empty()) {
            Ok(Some((_, status))) => return Ok(status),
            // None: only with WNOHANG.
            Ok(None) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn exit_code(status: WaitStatus) -> i32 {
    if let Some(code) = status.exit_status() {
        code
    } else if let Some(sig) = status.terminating_signal() {
        128 + sig
    } else {
        125
    }
}

/// PID 1 of the sandbox: starts the command, passes signals on to it, reaps orphans, and
/// returns the command's status. Its exit ends the namespace: the kernel kills whatever is
/// left in it.
fn init(exec: &Exec) -> i32 {
    // SAFETY: fork in a single-threaded process (the helper's child, see `run_helper`); the
    // child makes syscalls, then execs or exits at once.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return 125;
    }
    let Some(pid) = Pid::from_raw(pid) else {
        // The child (fork returned 0).
        // A session of its own: no controlling terminal to push input into (TIOCSTI).
        let _ = rustix::process::setsid();
        // SAFETY: close_range (which rustix does not wrap) takes plain integers; execvpe
        // (libc's: the PATH search is glibc's) gets null-terminated arrays of pointers to
        // NUL-terminated strings, all of which live until the exec; after a failed exec,
        // argv[0] is still such a string, and _exit ends the child without running the
        // helper's destructors.
        unsafe {
            // Nothing inherited but stdin, stdout and stderr: a stray descriptor of a host
            // directory would be a way out of the new root.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            libc::execvpe(exec.argv[0], exec.argv.as_ptr(), exec.envp.as_ptr());
            let e = io::Error::last_os_error();
            let name = std::ffi::CStr::from_ptr(exec.argv[0]).to_string_lossy();
            eprintln!("strata run: starting {name}: {e}");
            libc::_exit(if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    forward_signals_to(pid);
    loop {
        // Any child of ours: the command, or an orphan of the namespace to reap.
        match rustix::process::wait(WaitOptions::empty()) {
            Ok(Some((reaped, status))) if reaped == pid => return exit_code(status),
            Ok(_) | Err(Errno::INTR) => {}
            Err(_) => return 125,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_spec_is_refused_before_anything_is_made() {
        // 125: what `strata run` reports as the sandbox failing to start.
        assert_eq!(helper_main("not json"), 125);
        assert_eq!(helper_main("{\"root\":\"/tmp\"}"), 125);
    }

    #[test]
    fn paths_of_the_sandbox_land_under_its_root() {
        let root = Path::new("/run/strata/r1/root");
        assert_eq!(
            inside(root, Path::new("/data/sub")),
            Path::new("/run/strata/r1/root/data/sub")
        );
        assert_eq!(inside(root, Path::new("/")), root);
    }
}
