//! The FUSE adapter: translates kernel requests into [`MountTree`] calls and errors into
//! errnos. It holds no filesystem logic of its own.
//!
//! Reads that wait on the store run as tasks on the tokio runtime and reply when their chunks
//! arrive, so a slow fetch does not hold one of the session's threads; reads of local bytes
//! are answered on the session thread. Changes run on the session thread too, but for those
//! that must first copy blocks of a layer file up (which may wait on the store): they run on
//! the runtime's blocking pool and reply from there.
//! The kernel sees every change go through it, so entries and attributes get long TTLs; files
//! of the read-only layers keep the kernel's page cache across opens.
//!
//! A large file of the layers whose whole content has been assembled in the disk cache is
//! opened in passthrough mode: the kernel reads the local copy itself and strata sees none of
//! the reads. The kernel refuses to mix passthrough and cached opens of one inode, so an inode
//! goes passthrough only when none of its cached opens is left, and a passthrough file cannot
//! be opened for writing until its readers are gone (ETXTBSY).

mod session;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

pub use session::{
    check_mountpoint, clean_stale_mounts, is_stale_mount, is_strata_mount, mount,
    resolve_mountpoint, strata_mounts, unmount, MountedSession,
};

use strata_fs::error::{FsError, FsResult};
use strata_fs::upper::{Caller, MountTree, NodeKind, SetAttr, Stat, TimeSet};

/// The kernel sees every change to the tree, so it may cache what it learns for long.
const TTL: Duration = Duration::from_secs(24 * 3600);
const BLOCK_SIZE: u32 = 4096;

/// Files smaller than this are never read in passthrough mode: a few FUSE reads cost less than
/// a second copy of the file in the cache.
const PASSTHROUGH_MIN_SIZE: u64 = 1 << 20;
/// File handles: opens of unchanged layer files, passthrough opens, and opens the upper
/// counts (its files, and layer files it has records of).
const FH_LAYERS: u64 = 0;
const FH_PASSTHROUGH: u64 = 1;
const FH_UPPER: u64 = 2;

/// Changes that wait on the store off their session thread, host-wide, at most (tokio's
/// blocking pool has 512 threads for every mount and every upload).
const MAX_OFFLOADED: usize = 64;

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
fn guarded(op: &'static str, handler: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(handler)) {
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

/// A directory's entries as one open handle sees them: (inode, name, kind).
type Listing = Arc<Vec<(u64, Vec<u8>, NodeKind)>>;

pub struct StrataFs {
    tree: Arc<MountTree>,
    runtime: tokio::runtime::Handle,
    dirs: Mutex<HashMap<u64, Listing>>,
    next_handle: AtomicU64,
    /// Whether opens may go passthrough: asked for, and the kernel and our privileges allow it.
    passthrough: AtomicBool,
    /// Open handles of large layer files, per inode.
    opens: Mutex<HashMap<u64, Opens>>,
}

#[derive(Default)]
struct Opens {
    /// Opens served through strata (the kernel's page cache over FUSE reads).
    cached: u32,
    passthrough: Option<Passthrough>,
}

struct Passthrough {
    /// Registered with the kernel; dropping it unregisters the file.
    id: BackingId,
    /// Keeps the local copy in the cache (pinned) while the kernel reads it.
    _file: cache::AssembledFile,
    count: u32,
}

fn errno(e: &FsError) -> Errno {
    if e.errno() == libc::EIO {
        // Store and integrity trouble: the function sees EIO, the log says what happened.
        tracing::error!("{e}");
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

fn reply_xattr(reply: ReplyXattr, data: &[u8], size: u32) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
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

fn reply_empty(reply: ReplyEmpty, r: FsResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

impl StrataFs {
    /// `passthrough`: open fully cached large layer files in passthrough mode where the kernel
    /// allows it (Linux 6.9 and later, and root).
    pub fn new(
        tree: Arc<MountTree>,
        runtime: tokio::runtime::Handle,
        passthrough: bool,
    ) -> StrataFs {
        StrataFs {
            tree,
            runtime,
            dirs: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            passthrough: AtomicBool::new(passthrough),
            opens: Mutex::new(HashMap::new()),
        }
    }

    /// Answers with an entry, which the kernel counts until it forgets it.
    fn reply_entry(&self, reply: ReplyEntry, r: FsResult<Stat>) {
        match r {
            Ok(s) => {
                self.tree.remember(s.ino);
                reply.entry(&TTL, &file_attr(&s), Generation(0))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Locks the open-handle table once `ino` has no passthrough readers: closed readers'
    /// releases reach us a moment after `close` returned, so this waits a little for them.
    /// `None`: readers still hold it open in passthrough mode.
    fn opens_without_passthrough(
        &self,
        ino: u64,
    ) -> Option<std::sync::MutexGuard<'_, HashMap<u64, Opens>>> {
        for _ in 0..40 {
            let opens = self
                .opens
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if opens.get(&ino).is_none_or(|o| o.passthrough.is_none()) {
                return Some(opens);
            }
            drop(opens);
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Opens a large, unchanged layer file: in passthrough mode if it can, else through
    /// strata. The open is counted in the tree already.
    fn open_large(&self, opens: &mut HashMap<u64, Opens>, ino: u64, reply: ReplyOpen) {
        let stack = self.tree.stack();
        let o = opens.entry(ino).or_default();
        if let Some(p) = &mut o.passthrough {
            p.count += 1;
            stack.cache().record_passthrough_open();
            return reply.opened_passthrough(
                FileHandle(FH_PASSTHROUGH),
                FopenFlags::empty(),
                &p.id,
            );
        }
        if o.cached == 0 && self.passthrough.load(Ordering::Relaxed) {
            match stack.assembled(ino) {
                Some(file) => match reply.open_backing(&file.file) {
                    Ok(id) => {
                        stack.cache().record_passthrough_open();
                        reply.opened_passthrough(
                            FileHandle(FH_PASSTHROUGH),
                            FopenFlags::empty(),
                            &id,
                        );
                        o.passthrough = Some(Passthrough {
                            id,
                            _file: file,
                            count: 1,
                        });
                        return;
                    }
                    Err(e) => {
                        tracing::info!(
                            "FUSE passthrough unavailable ({e}); all reads go through strata"
                        );
                        self.passthrough.store(false, Ordering::Relaxed);
                    }
                },
                // Missing, or found at start and not verified yet: see to it.
                None => {
                    let _runtime = self.runtime.enter();
                    stack.assemble(ino);
                }
            }
        }
        o.cached += 1;
        reply.opened(FileHandle(FH_LAYERS), FopenFlags::FOPEN_KEEP_CACHE);
    }

    /// Opens for writing: the upper copies the file up. Not while readers hold it in
    /// passthrough mode: the kernel reads the layer's copy for them and cannot switch them
    /// over to the upper's.
    fn open_for_write(&self, ino: u64, reply: ReplyOpen) {
        let Some(_opens) = self.opens_without_passthrough(ino) else {
            return reply.error(Errno::from_i32(libc::ETXTBSY));
        };
        match self.tree.open(ino, true) {
            Ok(()) => reply.opened(FileHandle(FH_UPPER), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open_for_read(&self, ino: u64, reply: ReplyOpen) {
        // One lock over the decision, so a writer cannot copy the file up between "its bytes
        // are the layer's" and "hand the layer's copy to the kernel".
        let mut opens = self
            .opens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = self.tree.open(ino, false) {
            return reply.error(errno(&e));
        }
        if !self.tree.reads_from_layers(ino) {
            return reply.opened(FileHandle(FH_UPPER), FopenFlags::empty());
        }
        match self.tree.getattr(ino) {
            Ok(s) if s.kind == NodeKind::File && s.size >= PASSTHROUGH_MIN_SIZE => {
                self.open_large(&mut opens, ino, reply)
            }
            Ok(_) => reply.opened(FileHandle(FH_LAYERS), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => {
                drop(opens);
                self.tree.release(ino);
                reply.error(errno(&e))
            }
        }
    }

    fn release_layer_file(&self, ino: u64, fh: u64) {
        let mut opens = self
            .opens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(o) = opens.get_mut(&ino) else {
            return;
        };
        if fh == FH_PASSTHROUGH {
            if let Some(p) = &mut o.passthrough {
                p.count -= 1;
                if p.count == 0 {
                    o.passthrough = None;
                }
            }
        } else {
            o.cached = o.cached.saturating_sub(1);
            if self.passthrough.load(Ordering::Relaxed) && self.tree.reads_from_layers(ino) {
                // After a full read all the chunks are here: make the local copy the next open
                // can hand to the kernel.
                let _runtime = self.runtime.enter();
                self.tree.stack().assemble(ino);
            }
        }
        if o.cached == 0 && o.passthrough.is_none() {
            opens.remove(&ino);
        }
    }

    /// Runs a change that may wait on the store (a copy-up) on the runtime's blocking pool,
    /// which answers it, so the session thread goes on serving the mount. Past
    /// [`MAX_OFFLOADED`] such changes under way on the host it runs here instead: the pool
    /// is shared by every mount, and a volume commit that writers wait for (the commit gate)
    /// needs threads of it to upload.
    fn offload(&self, change: impl FnOnce(&tokio::runtime::Handle) + Send + 'static) {
        static UNDER_WAY: AtomicUsize = AtomicUsize::new(0);
        struct Slot;
        impl Drop for Slot {
            fn drop(&mut self) {
                UNDER_WAY.fetch_sub(1, Ordering::Relaxed);
            }
        }
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
        self.runtime.spawn(async move {
            match read.await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn listing(&self, ino: u64) -> FsResult<Listing> {
        Ok(Arc::new(self.tree.readdir(ino)?))
    }
}

impl Filesystem for StrataFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large readahead lets the kernel ask for whole chunks' worth in one request.
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        if self.passthrough.load(Ordering::Relaxed) {
            // Depth 1: the cache dir must be on a plain filesystem, and strata itself may sit
            // under an overlayfs.
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!("the kernel has no FUSE passthrough; all reads go through strata");
                self.passthrough.store(false, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guarded("lookup", || {
            panic_hook_for_tests(name);
            match self.tree.lookup(parent.0, name.as_bytes()) {
                // A negative entry (inode 0): the kernel remembers the name is absent, so a
                // program probing for files (Python's imports) asks once. Names only appear
                // through this mount, and the kernel drops the entry when one does.
                Err(e) if e.errno() == libc::ENOENT => {
                    let mut absent = file_attr(&Stat::absent());
                    absent.ino = INodeNo(0);
                    reply.entry(&TTL, &absent, Generation(0))
                }
                r => self.reply_entry(reply, r),
            }
        })
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        guarded("forget", || {
            self.tree.forget(ino.0, nlookup);
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        guarded("getattr", || match self.tree.getattr(ino.0) {
            Ok(s) => reply.attr(&TTL, &file_attr(&s)),
            Err(e) => reply.error(errno(&e)),
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
        guarded("setattr", || {
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
                    Err(e) => reply.error(errno(&e)),
                };
            }
            // A truncate changes the bytes: not under readers who read the layer's copy. It
            // is an open for writing while it runs: the file is copied up under the open
            // table's lock, so no passthrough open can begin after the check; the truncate
            // itself may wait for a write that copies up blocks from the store, and waits
            // off this thread.
            {
                let Some(_opens) = self.opens_without_passthrough(ino) else {
                    return reply.error(Errno::from_i32(libc::ETXTBSY));
                };
                if let Err(e) = self.tree.open(ino, true) {
                    return reply.error(errno(&e));
                }
            }
            // Released however the truncate ends, a panic included.
            let open = OpenForChange(self.tree.clone(), ino);
            self.offload(move |runtime| {
                let done = runtime.block_on(open.0.setattr(ino, changes));
                drop(open);
                match done {
                    Ok(s) => reply.attr(&TTL, &file_attr(&s)),
                    Err(e) => reply.error(errno(&e)),
                }
            });
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guarded("readlink", || match self.tree.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(&e)),
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
        guarded("mknod", || {
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
        guarded("mkdir", || {
            self.reply_entry(
                reply,
                self.tree
                    .mkdir(parent.0, name.as_bytes(), mode, caller(req)),
            )
        })
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("unlink", || {
            reply_empty(reply, self.tree.unlink(parent.0, name.as_bytes()))
        })
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("rmdir", || {
            reply_empty(reply, self.tree.rmdir(parent.0, name.as_bytes()))
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
        guarded("symlink", || {
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
        guarded("rename", || {
            let r = self.tree.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.bits(),
            );
            reply_empty(reply, r)
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
        guarded("link", || {
            self.reply_entry(
                reply,
                self.tree.link(ino.0, newparent.0, newname.as_bytes()),
            )
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guarded("open", || {
            if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
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
        guarded("create", || {
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
                Err(e) => reply.error(errno(&e)),
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
        guarded("read", || {
            let ino = ino.0;
            if !self.tree.reads_from_layers(ino) {
                match self.tree.read_local(ino, offset, size) {
                    Some(Ok(data)) => return reply.data(&data),
                    Some(Err(e)) => return reply.error(errno(&e)),
                    None => {}
                }
                let tree = self.tree.clone();
                return self
                    .reply_when_read(reply, async move { tree.read(ino, offset, size).await });
            }
            // Data already here (memory, or a verified chunk file) is served from this thread; only
            // reads that wait on the store go through the async runtime. Readahead spawns its
            // fetches on the runtime, hence the enter.
            let stack = self.tree.stack().clone();
            let _runtime = self.runtime.enter();
            match stack.read_local(ino, offset, size) {
                Some(Ok(data)) => return reply.data(&data),
                Some(Err(e)) => return reply.error(errno(&e)),
                None => {}
            }
            self.reply_when_read(
                reply,
                async move { stack.read_fetch(ino, offset, size).await },
            );
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
        guarded("write", || {
            let ino = ino.0;
            if !self.tree.write_copies_up(ino, offset, data.len() as u64) {
                return match self.runtime.block_on(self.tree.write(ino, offset, data)) {
                    Ok(n) => reply.written(n),
                    Err(e) => reply.error(errno(&e)),
                };
            }
            // Copying blocks up may wait on the store: not on a session thread, which the
            // mount's other requests (reads of other files) are waiting for.
            let (tree, data) = (self.tree.clone(), data.to_vec());
            self.offload(
                move |runtime| match runtime.block_on(tree.write(ino, offset, &data)) {
                    Ok(n) => reply.written(n),
                    Err(e) => reply.error(errno(&e)),
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
        guarded("fallocate", || {
            let ino = ino.0;
            if !self.tree.write_copies_up(ino, offset, length) {
                let r = self
                    .runtime
                    .block_on(self.tree.fallocate(ino, offset, length, mode));
                return reply_empty(reply, r);
            }
            // As for writes: a copy-up waits off the session thread.
            let tree = self.tree.clone();
            self.offload(move |runtime| {
                reply_empty(
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
        guarded("flush", || {
            reply.ok();
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
        guarded("fsync", || {
            reply_empty(reply, self.tree.fsync(ino.0, datasync))
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
        guarded("release", || {
            reply.ok();
            if fh.0 != FH_UPPER {
                self.release_layer_file(ino.0, fh.0);
            }
            self.tree.release(ino.0);
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guarded("opendir", || {
            // The listing is taken once per open (and again on a rewind), so offsets stay valid
            // across readdir calls and no entry shows twice while the directory changes.
            match self.listing(ino.0) {
                Ok(entries) => {
                    let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
                    self.dirs
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(fh, entries);
                    // The kernel may keep listings: it drops one when the directory changes
                    // through this mount (and every change does), checked at each opendir and
                    // rewind.
                    reply.opened(
                        FileHandle(fh),
                        FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                    );
                }
                Err(e) => reply.error(errno(&e)),
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
        guarded("readdir", || {
            if offset == 0 && self.tree.is_writable() {
                match self.listing(ino.0) {
                    Ok(fresh) => {
                        self.dirs
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(fh.0, fresh);
                    }
                    Err(e) => return reply.error(errno(&e)),
                }
            }
            let Some(entries) = self
                .dirs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&fh.0)
                .cloned()
            else {
                return reply.error(Errno::from_i32(libc::EBADF));
            };
            // Offsets: 1 = ".", 2 = "..", 3 + i = entries[i]; each entry carries the next offset.
            let mut position = offset;
            while position < 2 {
                let name = if position == 0 { "." } else { ".." };
                if reply.add(ino, position + 1, FileType::Directory, name) {
                    return reply.ok();
                }
                position += 1;
            }
            for (i, (child, name, kind)) in entries.iter().enumerate().skip((position - 2) as usize)
            {
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

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        guarded("releasedir", || {
            self.dirs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&fh.0);
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
        guarded("fsyncdir", || reply_empty(reply, self.tree.fsyncdir()))
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        guarded("statfs", || {
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
        guarded("setxattr", || {
            reply_empty(
                reply,
                self.tree.setxattr(ino.0, name.as_bytes(), value, flags),
            )
        })
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guarded("getxattr", || {
            match self.tree.getxattr(ino.0, name.as_bytes()) {
                Ok(Some(value)) => reply_xattr(reply, &value, size),
                Ok(None) => reply.error(Errno::from_i32(libc::ENODATA)),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guarded("listxattr", || match self.tree.listxattr(ino.0) {
            Ok(names) => {
                let mut data = Vec::new();
                for n in names {
                    data.extend_from_slice(&n);
                    data.push(0);
                }
                reply_xattr(reply, &data, size);
            }
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("removexattr", || {
            reply_empty(reply, self.tree.removexattr(ino.0, name.as_bytes()))
        })
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        guarded("access", || {
            if mask.contains(AccessFlags::W_OK) && !self.tree.is_writable() {
                return reply.error(Errno::from_i32(libc::EROFS));
            }
            match self.tree.getattr(ino.0) {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }
}
