//! strata-fuse: the FUSE adapter. It translates kernel requests into calls on a
//! [`MountTree`] and its [`Handles`] (which hold the policies an embedder shares: read
//! scheduling, passthrough opens, directory listings, absent names) and errors into errnos.
//!
//! Reads that wait on the store run as tasks on the tokio runtime and reply when their chunks
//! arrive, so a slow fetch does not hold one of the session's threads; reads of local bytes
//! are answered on the session thread. Changes run on the session thread too, but for those
//! that must first copy blocks of a layer file up (which may wait on the store): they run on
//! the runtime's blocking pool and reply from there.
//! The kernel sees every change go through it, so entries and attributes get long TTLs; files
//! of the read-only layers keep the kernel's page cache across opens.
//!
//! A large file of the layers whose local copy in the disk cache is complete is
//! opened in passthrough mode (see [`Handles`]): the kernel reads the local copy itself and
//! strata sees none of the reads. An open for writing that waits for passthrough readers'
//! releases waits on the runtime and answers when they arrive (or ETXTBSY after
//! [`RELEASE_WAIT`]).

mod errno_counts;
mod session;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

pub use errno_counts::ErrnoCounts;
pub use session::{
    bind, check_mountpoint, clean_stale_mounts, is_busy, is_stale_mount, is_strata_mount, mount,
    mounted_dev, resolve_mountpoint, strata_mounts, unmount, unmount_exact, MountedSession,
    MountpointOwner,
};

use strata_fs::error::{FsError, FsResult};
use strata_fs::handles::{Handles, OpenKind, Opened, Read, ENTRY_TTL, RELEASE_WAIT};
use strata_fs::permit::Permit;
use strata_fs::upper::{Caller, MountTree, NodeKind, SetAttr, Stat, TimeSet};

/// The kernel sees every change to the tree, so it may cache what it learns for long.
const TTL: Duration = ENTRY_TTL;
const BLOCK_SIZE: u32 = 4096;
/// File handles: opens of unchanged layer files, passthrough opens, and opens the upper
/// counts (its files, and layer files it has records of).
const FH_LAYERS: u64 = 0;
const FH_PASSTHROUGH: u64 = 1;
const FH_UPPER: u64 = 2;

/// Changes that wait on the store off their session thread, host-wide, at most (tokio's
/// blocking pool has 512 threads for every mount and every upload).
const MAX_OFFLOADED: usize = 64;

/// Changes under way on the blocking pool, host-wide (see `StrataFs::offload`).
static UNDER_WAY: AtomicUsize = AtomicUsize::new(0);

/// Prefills under way at once per session, at most (see [`StrataFs::prefill`]): half its
/// threads, so prefills alone never keep it from answering the reads they may wait for.
const MAX_PREFILLING: usize = 4;

/// Inodes of a session remembered as prefilled, at most: past it, files are read through
/// strata as before (the set shrinks as the kernel forgets inodes).
const MAX_PREFILLED: usize = 1 << 18;

/// One change counted in [`UNDER_WAY`] until dropped.
struct Slot;

impl Slot {
    /// Counted even past the cap: for a change that is already off the session thread.
    fn take() -> Slot {
        UNDER_WAY.fetch_add(1, Ordering::Relaxed);
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        UNDER_WAY.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An open for writing that a truncate takes while it runs; released when dropped.
struct OpenForChange(Arc<MountTree>, u64);

impl Drop for OpenForChange {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

/// Runs the handler of one kernel request. A panic in it (a bug) is logged and costs that
/// request alone: its reply, dropped while unwinding, answers EIO, and the session thread
/// goes on serving the mount.
fn guarded(errors: &ErrnoCounts, op: &'static str, handler: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(handler)) {
        // Bugs are the EIOs an operator most needs to see counted.
        errors.count(libc::EIO);
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!("internal error in {op}: {why}; answered EIO");
    }
}

/// Debug builds only: a lookup of the name in `STRATA_TEST_PANIC_LOOKUP` panics, so that the
/// end-to-end tests can show what a bug costs (one request, answered EIO).
fn panic_hook_for_tests(name: &OsStr) {
    if cfg!(debug_assertions) {
        static NAME: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();
        let wanted = NAME.get_or_init(|| std::env::var_os("STRATA_TEST_PANIC_LOOKUP"));
        if wanted.as_deref() == Some(name) {
            panic!("test hook: lookup of {name:?}");
        }
    }
}

pub struct StrataFs {
    tree: Arc<MountTree>,
    runtime: tokio::runtime::Handle,
    handles: Arc<Handles<BackingId>>,
    /// Opens of files are not sent at all (see `init`).
    zero_message_opens: bool,
    /// Error replies by errno.
    errors: Arc<ErrnoCounts>,
    /// How the session hands bytes to the kernel's page cache; set once it has started.
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// Inodes whose bytes the kernel's page cache took since the kernel last forgot them (see
    /// [`StrataFs::prefill`]).
    prefilled: Mutex<HashSet<u64>>,
    prefilling: Arc<AtomicUsize>,
}

fn fh_of(kind: OpenKind) -> FileHandle {
    FileHandle(match kind {
        OpenKind::Layer => FH_LAYERS,
        OpenKind::Passthrough => FH_PASSTHROUGH,
        OpenKind::Upper => FH_UPPER,
    })
}

fn kind_of(fh: FileHandle) -> OpenKind {
    match fh.0 {
        FH_LAYERS => OpenKind::Layer,
        FH_PASSTHROUGH => OpenKind::Passthrough,
        _ => OpenKind::Upper,
    }
}

/// The errno the error carries, logged as loudly as the error says (the function sees only
/// the errno; the log says what happened).
fn errno(counts: &ErrnoCounts, e: &FsError) -> Errno {
    counts.count(e.errno());
    match e.level() {
        tracing::Level::ERROR => tracing::error!("{e}"),
        tracing::Level::WARN => tracing::warn!("{e}"),
        tracing::Level::INFO => tracing::info!("{e}"),
        tracing::Level::DEBUG => tracing::debug!("{e}"),
        tracing::Level::TRACE => tracing::trace!("{e}"),
    }
    Errno::from_i32(e.errno())
}

fn file_type(k: NodeKind) -> FileType {
    match k {
        NodeKind::Dir => FileType::Directory,
        NodeKind::File => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::CharDevice => FileType::CharDevice,
        NodeKind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(s: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(s.ino),
        size: s.size,
        blocks: s.size.div_ceil(512),
        atime: s.atime,
        mtime: s.mtime,
        ctime: s.ctime,
        crtime: UNIX_EPOCH,
        kind: file_type(s.kind),
        perm: s.perm as u16,
        nlink: s.nlink,
        uid: s.uid,
        gid: s.gid,
        rdev: s.rdev,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

fn reply_xattr(errors: &ErrnoCounts, reply: ReplyXattr, data: &[u8], size: u32) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        errors.count(libc::ERANGE);
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(data);
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(t),
    }
}

fn reply_empty(errors: &ErrnoCounts, reply: ReplyEmpty, r: FsResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(errors, &e)),
    }
}

impl StrataFs {
    /// `passthrough`: open fully cached large layer files in passthrough mode where the kernel
    /// allows it (Linux 6.9 and later, and root).
    pub fn new(
        tree: Arc<MountTree>,
        runtime: tokio::runtime::Handle,
        passthrough: bool,
        errors: Arc<ErrnoCounts>,
    ) -> StrataFs {
        let handles = Arc::new(Handles::new(tree.clone(), runtime.clone(), passthrough));
        StrataFs {
            tree,
            runtime,
            handles,
            zero_message_opens: false,
            errors,
            notifier: Arc::default(),
            prefilled: Mutex::new(HashSet::new()),
            prefilling: Arc::default(),
        }
    }

    /// Answers with an entry, which the kernel counts until it forgets it.
    fn reply_entry(&self, reply: ReplyEntry, r: FsResult<Stat>) {
        match r {
            Ok(s) => {
                self.tree.remember(s.ino);
                reply.entry(&TTL, &file_attr(&s), Generation(0))
            }
            Err(e) => reply.error(errno(&self.errors, &e)),
        }
    }

    /// Opens for writing: the upper copies the file up. Passthrough readers must let go of it
    /// first (the kernel reads the layer's copy for them); their late releases are awaited on
    /// the runtime, which answers.
    fn open_for_write(&self, ino: u64, reply: ReplyOpen) {
        let errors = self.errors.clone();
        let answer = move |reply: ReplyOpen, r: FsResult<()>| match r {
            Ok(()) => reply.opened(fh_of(OpenKind::Upper), FopenFlags::empty()),
            Err(e) => reply.error(errno(&errors, &e)),
        };
        match self.handles.try_open_write(ino) {
            Some(r) => answer(reply, r),
            None => {
                let handles = self.handles.clone();
                self.runtime.spawn(async move {
                    answer(reply, handles.open_write(ino, RELEASE_WAIT).await)
                });
            }
        }
    }

    /// Opens for reading. No read-only open asks for a FLUSH at close (strata has nothing to
    /// flush for it): that spares every `close` a round trip through the daemon.
    fn open_for_read(&self, ino: u64, reply: ReplyOpen) {
        let no_flush = FopenFlags::FOPEN_NOFLUSH;
        match self.handles.open_read(ino, |file| reply.open_backing(file)) {
            Ok(Opened::Passthrough(id)) => {
                reply.opened_passthrough(fh_of(OpenKind::Passthrough), no_flush, &id)
            }
            // Layer files keep the kernel's page cache across opens: their bytes never change.
            Ok(Opened::Through(OpenKind::Layer)) => {
                self.prefill(ino);
                reply.opened(
                    fh_of(OpenKind::Layer),
                    FopenFlags::FOPEN_KEEP_CACHE | no_flush,
                )
            }
            Ok(Opened::Through(kind)) => reply.opened(fh_of(kind), no_flush),
            Err(e) => reply.error(errno(&self.errors, &e)),
        }
    }

    /// Where the session's notifier goes once the session exists.
    pub(crate) fn notifier_slot(&self) -> Arc<OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Hands the bytes of small layer file `ino`, if they are all here, to the kernel's page
    /// cache before its open is answered: the open keeps the page cache, so the reads that
    /// follow cost no round trip through the daemon (on a VM, each one wakes two vCPUs). Once
    /// per kernel inode: the kernel keeps them until it drops the inode (and with it its page
    /// cache: then it sends FORGET). A file whose bytes were not all here at its first open is
    /// offered at a later one, which is a wasted copy if its reads filled the cache meanwhile.
    fn prefill(&self, ino: u64) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        let prefilled = || {
            self.prefilled
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        {
            let done = prefilled();
            if done.len() >= MAX_PREFILLED || done.contains(&ino) {
                return;
            }
        }
        // The kernel's store waits for any read in flight on the pages it fills, which session
        // threads answer: never let most of them wait so (the wait is bounded by that read).
        let Some(_permit) = Permit::try_take(&self.prefilling, MAX_PREFILLING) else {
            return;
        };
        // Bytes not all here come to the page cache with the read that fetches them.
        let Some(prefill) = self.handles.prefill(ino) else {
            return;
        };
        match notifier.store(INodeNo(ino), 0, prefill.bytes()) {
            Ok(()) => {
                prefill.delivered();
                prefilled().insert(ino);
            }
            Err(e) => tracing::debug!("prefilling inode {ino}: {e}"),
        }
    }

    /// Runs a change that may wait on the store (a copy-up) on the runtime's blocking pool,
    /// which answers it, so the session thread goes on serving the mount. Past
    /// [`MAX_OFFLOADED`] such changes under way on the host it runs here instead: the pool
    /// is shared by every mount, and a volume commit that writers wait for (the commit gate)
    /// needs threads of it to upload.
    fn offload(&self, change: impl FnOnce(&tokio::runtime::Handle) + Send + 'static) {
        if UNDER_WAY.fetch_add(1, Ordering::Relaxed) >= MAX_OFFLOADED {
            UNDER_WAY.fetch_sub(1, Ordering::Relaxed);
            return change(&self.runtime);
        }
        let slot = Slot;
        let runtime = self.runtime.clone();
        self.runtime.spawn_blocking(move || {
            let _slot = slot;
            change(&runtime)
        });
    }

    /// Answers a read once `read` (waiting on the store) is done, off the session thread.
    fn reply_when_read(
        &self,
        reply: ReplyData,
        read: impl std::future::Future<Output = FsResult<bytes::Bytes>> + Send + 'static,
    ) {
        let errors = self.errors.clone();
        self.runtime.spawn(async move {
            match read.await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&errors, &e)),
            }
        });
    }
}

/// Positions in a listing: 0 is ".", 1 is "..", 2 + i is entry i of the handle's listing; each
/// entry carries the position of the one after it, where a listing given that offset resumes.
/// The dot entries a listing from `offset` still sends, with the offsets they carry.
fn dots_from(offset: u64) -> impl Iterator<Item = (u64, &'static str)> {
    [(1, "."), (2, "..")]
        .into_iter()
        .filter(move |&(next, _)| next > offset)
}

/// The index in the handle's listing of the first entry a listing from `offset` sends (see
/// [`dots_from`]).
fn entries_from(offset: u64) -> usize {
    usize::try_from(offset.saturating_sub(2)).unwrap_or(usize::MAX)
}

impl Filesystem for StrataFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large readahead lets the kernel ask for whole chunks' worth in one request.
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        // A listing that carries each entry's attributes spares a LOOKUP per entry a program
        // then stats or opens (a Python import lists a package, then opens its modules;
        // `find` stats what it lists). "Auto": the kernel asks for them in a listing's first
        // reply, and in later ones only while the entries listed are being looked up, so a
        // listing nobody stats costs no lookup per entry.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        // A read-only tree needs nothing from an open of a file: its bytes never change, and
        // nothing can be opened for writing. Where the kernel allows it, opens then cost no
        // round trip through strata at all (the kernel keeps the page cache across them); the
        // price is passthrough, which needs an open to hand the kernel its local copy, so
        // large files of read-only mounts are read through strata (and the page cache).
        if !self.tree.is_writable()
            && config
                .add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT)
                .is_ok()
        {
            self.zero_message_opens = true;
            self.handles.disable_passthrough();
        }
        if self.handles.passthrough() {
            // Depth 1: the cache dir must be on a plain filesystem, and strata itself may sit
            // under an overlayfs.
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!("the kernel has no FUSE passthrough; all reads go through strata");
                self.handles.disable_passthrough();
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guarded(&self.errors, "lookup", || {
            panic_hook_for_tests(name);
            match self.handles.lookup(parent.0, name.as_bytes()) {
                Ok(Some(s)) => reply.entry(&TTL, &file_attr(&s), Generation(0)),
                // A negative entry (inode 0), kept as long as entries are (see `ENTRY_TTL`);
                // the caller sees ENOENT.
                Ok(None) => {
                    self.errors.count(libc::ENOENT);
                    let mut absent = file_attr(&Stat::absent());
                    absent.ino = INodeNo(0);
                    reply.entry(&TTL, &absent, Generation(0))
                }
                Err(e) => reply.error(errno(&self.errors, &e)),
            }
        })
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        guarded(&self.errors, "forget", || {
            // The kernel drops an inode's page cache with the inode.
            let mut prefilled = self
                .prefilled
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if prefilled.remove(&ino.0) && prefilled.capacity() > 4 * prefilled.len() + 1024 {
                prefilled.shrink_to_fit();
            }
            drop(prefilled);
            self.tree.forget(ino.0, nlookup);
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        guarded(&self.errors, "getattr", || match self.tree.getattr(ino.0) {
            Ok(s) => reply.attr(&TTL, &file_attr(&s)),
            Err(e) => reply.error(errno(&self.errors, &e)),
        })
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        guarded(&self.errors, "setattr", || {
            let changes = SetAttr {
                mode,
                uid,
                gid,
                size,
                atime: atime.map(time_set),
                mtime: mtime.map(time_set),
                ctime,
            };
            let ino = ino.0;
            if size.is_none() {
                return match self.runtime.block_on(self.tree.setattr(ino, changes)) {
                    Ok(s) => reply.attr(&TTL, &file_attr(&s)),
                    Err(e) => reply.error(errno(&self.errors, &e)),
                };
            }
            // A truncate changes the bytes: it is an open for writing while it runs (see
            // `open_for_write`), and may wait for a write that copies blocks up from the
            // store, off this thread.
            let errors = self.errors.clone();
            let truncate =
                move |open: OpenForChange, runtime: &tokio::runtime::Handle, reply: ReplyAttr| {
                    let done = runtime.block_on(open.0.setattr(ino, changes));
                    drop(open);
                    match done {
                        Ok(s) => reply.attr(&TTL, &file_attr(&s)),
                        Err(e) => reply.error(errno(&errors, &e)),
                    }
                };
            match self.handles.try_open_write(ino) {
                Some(Err(e)) => reply.error(errno(&self.errors, &e)),
                Some(Ok(())) => {
                    // Released however the truncate ends, a panic included.
                    let open = OpenForChange(self.tree.clone(), ino);
                    self.offload(move |runtime| truncate(open, runtime, reply));
                }
                None => {
                    let (handles, tree) = (self.handles.clone(), self.tree.clone());
                    let errors = self.errors.clone();
                    self.runtime.spawn(async move {
                        match handles.open_write(ino, RELEASE_WAIT).await {
                            Ok(()) => {
                                let open = OpenForChange(tree, ino);
                                let runtime = tokio::runtime::Handle::current();
                                let slot = Slot::take();
                                let _ = tokio::task::spawn_blocking(move || {
                                    let _slot = slot;
                                    truncate(open, &runtime, reply)
                                })
                                .await;
                            }
                            Err(e) => reply.error(errno(&errors, &e)),
                        }
                    });
                }
            }
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guarded(&self.errors, "readlink", || {
            match self.tree.readlink(ino.0) {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(errno(&self.errors, &e)),
            }
        })
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        guarded(&self.errors, "mknod", || {
            let r = self
                .tree
                .mknod(parent.0, name.as_bytes(), mode, rdev, caller(req));
            self.reply_entry(reply, r)
        })
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        guarded(&self.errors, "mkdir", || {
            self.reply_entry(
                reply,
                self.tree
                    .mkdir(parent.0, name.as_bytes(), mode, caller(req)),
            )
        })
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded(&self.errors, "unlink", || {
            reply_empty(
                &self.errors,
                reply,
                self.tree.unlink(parent.0, name.as_bytes()),
            )
        })
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded(&self.errors, "rmdir", || {
            reply_empty(
                &self.errors,
                reply,
                self.tree.rmdir(parent.0, name.as_bytes()),
            )
        })
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        guarded(&self.errors, "symlink", || {
            let r = self.tree.symlink(
                parent.0,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
                caller(req),
            );
            self.reply_entry(reply, r)
        })
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        guarded(&self.errors, "rename", || {
            let r = self.tree.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.bits(),
            );
            reply_empty(&self.errors, reply, r)
        })
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        guarded(&self.errors, "link", || {
            self.reply_entry(
                reply,
                self.tree.link(ino.0, newparent.0, newname.as_bytes()),
            )
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guarded(&self.errors, "open", || {
            let write = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
            if write && !self.tree.is_writable() {
                self.errors.count(libc::EROFS);
                return reply.error(Errno::EROFS);
            }
            if self.zero_message_opens {
                // The kernel opens the file itself from now on (keeping the page cache) and
                // sends no more opens; a write is refused later by the read-only mount.
                return reply.error(Errno::ENOSYS);
            }
            if write {
                self.open_for_write(ino.0, reply)
            } else {
                self.open_for_read(ino.0, reply)
            }
        })
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        guarded(&self.errors, "create", || {
            let made = self
                .tree
                .create(parent.0, name.as_bytes(), mode, caller(req))
                .and_then(|s| self.tree.open(s.ino, true).map(|_| s));
            match made {
                Ok(s) => {
                    self.tree.remember(s.ino);
                    reply.created(
                        &TTL,
                        &file_attr(&s),
                        Generation(0),
                        FileHandle(FH_UPPER),
                        FopenFlags::empty(),
                    )
                }
                Err(e) => reply.error(errno(&self.errors, &e)),
            }
        })
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        guarded(&self.errors, "read", || {
            match self.handles.read(ino.0, offset, size) {
                Read::Ready(Ok(data)) => reply.data(&data),
                Read::Ready(Err(e)) => reply.error(errno(&self.errors, &e)),
                Read::Wait(read) => self.reply_when_read(reply, read),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        guarded(&self.errors, "write", || {
            let ino = ino.0;
            if !self.tree.write_copies_up(ino, offset, data.len() as u64) {
                return match self.runtime.block_on(self.tree.write(ino, offset, data)) {
                    Ok(n) => reply.written(n),
                    Err(e) => reply.error(errno(&self.errors, &e)),
                };
            }
            // Copying blocks up may wait on the store: not on a session thread, which the
            // mount's other requests (reads of other files) are waiting for.
            let (tree, data) = (self.tree.clone(), data.to_vec());
            let errors = self.errors.clone();
            self.offload(
                move |runtime| match runtime.block_on(tree.write(ino, offset, &data)) {
                    Ok(n) => reply.written(n),
                    Err(e) => reply.error(errno(&errors, &e)),
                },
            );
        })
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        guarded(&self.errors, "fallocate", || {
            let ino = ino.0;
            if !self.tree.write_copies_up(ino, offset, length) {
                let r = self
                    .runtime
                    .block_on(self.tree.fallocate(ino, offset, length, mode));
                return reply_empty(&self.errors, reply, r);
            }
            // As for writes: a copy-up waits off the session thread.
            let (tree, errors) = (self.tree.clone(), self.errors.clone());
            self.offload(move |runtime| {
                reply_empty(
                    &errors,
                    reply,
                    runtime.block_on(tree.fallocate(ino, offset, length, mode)),
                )
            });
        })
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        guarded(&self.errors, "flush", || {
            // Strata has nothing to flush at a close (writes reach the upper when made, and
            // fsync is its own request). ENOSYS tells the kernel so once for the whole session:
            // it sends no more FLUSH, which spares every close of a file (opened with or
            // without a round trip) a wait on the daemon.
            reply.error(Errno::ENOSYS);
        })
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded(&self.errors, "fsync", || {
            reply_empty(&self.errors, reply, self.tree.fsync(ino.0, datasync))
        })
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        guarded(&self.errors, "release", || {
            reply.ok();
            self.handles.release(ino.0, kind_of(fh));
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guarded(&self.errors, "opendir", || {
            match self.handles.open_dir(ino.0) {
                // The kernel may keep listings: it drops one when the directory changes through
                // this mount (and every change does), checked at each opendir and rewind.
                Ok(fh) => reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                ),
                Err(e) => reply.error(errno(&self.errors, &e)),
            }
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        guarded(&self.errors, "readdir", || {
            let entries = match self.handles.dir_listing(fh.0, ino.0, offset) {
                Ok(l) => l,
                Err(e) => return reply.error(errno(&self.errors, &e)),
            };
            for (next, name) in dots_from(offset) {
                if reply.add(ino, next, FileType::Directory, name) {
                    return reply.ok();
                }
            }
            for (i, (child, name, kind)) in entries.iter().enumerate().skip(entries_from(offset)) {
                if reply.add(
                    INodeNo(*child),
                    i as u64 + 3,
                    file_type(*kind),
                    OsStr::from_bytes(name),
                ) {
                    break;
                }
            }
            reply.ok();
        })
    }

    /// A listing with each entry's attributes. Each entry is looked up as a LOOKUP would be;
    /// the kernel enters it in its dentry cache and counts it as looked up, so the entries
    /// sent are counted here too, just before the reply goes (a FORGET can only follow it). An
    /// entry that no longer resolves (removed or renamed since the listing was taken) is left
    /// out; one that fails to resolve ends the reply early with what it holds.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        guarded(&self.errors, "readdirplus", || {
            let entries = match self.handles.dir_listing(fh.0, ino.0, offset) {
                Ok(l) => l,
                Err(e) => return reply.error(errno(&self.errors, &e)),
            };
            if offset < 2 {
                // "." and "..": the kernel links neither, and takes no count of them.
                let own = match self.tree.getattr(ino.0) {
                    Ok(s) => file_attr(&s),
                    Err(e) => return reply.error(errno(&self.errors, &e)),
                };
                for (next, name) in dots_from(offset) {
                    if reply.add(ino, next, name, &TTL, &own, Generation(0)) {
                        return reply.ok();
                    }
                }
            }
            let mut sent = Vec::new();
            for (i, (_, name, _)) in entries.iter().enumerate().skip(entries_from(offset)) {
                let stat = match self.tree.lookup(ino.0, name) {
                    Ok(s) => s,
                    Err(e) if e.errno() == libc::ENOENT => continue,
                    // Nothing sent in this reply yet: the error is this request's.
                    Err(e) if sent.is_empty() && offset >= 2 => {
                        return reply.error(errno(&self.errors, &e))
                    }
                    Err(_) => break, // the next request starts at this entry, and reports it
                };
                let full = reply.add(
                    INodeNo(stat.ino),
                    i as u64 + 3,
                    OsStr::from_bytes(name),
                    &TTL,
                    &file_attr(&stat),
                    Generation(0),
                );
                if full {
                    break;
                }
                sent.push(stat.ino);
            }
            for child in sent {
                self.tree.remember(child);
            }
            reply.ok();
        })
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        guarded(&self.errors, "releasedir", || {
            self.handles.release_dir(fh.0);
            reply.ok();
        })
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded(&self.errors, "fsyncdir", || {
            reply_empty(&self.errors, reply, self.tree.fsyncdir())
        })
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        guarded(&self.errors, "statfs", || {
            let st = self.tree.statfs();
            let b = BLOCK_SIZE as u64;
            reply.statfs(
                st.bytes.div_ceil(b),
                st.free_bytes / b,
                st.free_bytes / b,
                st.files,
                st.free_files,
                BLOCK_SIZE,
                255,
                BLOCK_SIZE,
            );
        })
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        guarded(&self.errors, "setxattr", || {
            reply_empty(
                &self.errors,
                reply,
                self.tree.setxattr(ino.0, name.as_bytes(), value, flags),
            )
        })
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guarded(&self.errors, "getxattr", || {
            match self.handles.getxattr(ino.0, name.as_bytes()) {
                Ok(value) => reply_xattr(&self.errors, reply, &value, size),
                Err(e) => reply.error(errno(&self.errors, &e)),
            }
        })
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guarded(&self.errors, "listxattr", || {
            match self.tree.listxattr(ino.0) {
                Ok(names) => {
                    let mut data = Vec::new();
                    for n in names {
                        data.extend_from_slice(&n);
                        data.push(0);
                    }
                    reply_xattr(&self.errors, reply, &data, size);
                }
                Err(e) => reply.error(errno(&self.errors, &e)),
            }
        })
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded(&self.errors, "removexattr", || {
            reply_empty(
                &self.errors,
                reply,
                self.tree.removexattr(ino.0, name.as_bytes()),
            )
        })
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        guarded(&self.errors, "access", || {
            reply_empty(
                &self.errors,
                reply,
                self.handles.access(ino.0, mask.contains(AccessFlags::W_OK)),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{dots_from, entries_from};

    /// A listing resumed at any offset sends what follows it once: the dots, then the entries.
    #[test]
    fn a_listing_resumes_after_the_offset_it_was_given() {
        let dots = |o| dots_from(o).collect::<Vec<_>>();
        assert_eq!(dots(0), [(1, "."), (2, "..")]);
        assert_eq!(dots(1), [(2, "..")]);
        assert!(dots(2).is_empty() && dots(7).is_empty());
        assert_eq!(
            [0, 1, 2, 3, 9].map(entries_from),
            [0, 0, 0, 1, 7],
            "entry i, at position 2 + i, carries 3 + i"
        );
        assert_eq!(
            entries_from(u64::MAX),
            usize::try_from(u64::MAX - 2).unwrap_or(usize::MAX)
        );
    }
}
