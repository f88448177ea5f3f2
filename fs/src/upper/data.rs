//! File content in the upper: opening (copy-up), reading, writing, truncating, allocating,
//! syncing. A file's data file is sparse and as long as the file; while a copy-up is partial,
//! blocks not written yet are read from the lower file.

use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rustix::fs::{FallocateFlags, SeekFrom};

use super::node::{Body, Data, Node};
use super::{errno, now, MountTree, SetAttr, Stat, TimeSet, Tree, COPY_UP_BLOCK};
use crate::error::{FsError, FsResult};

fn blocks(len: u64) -> usize {
    len.div_ceil(COPY_UP_BLOCK) as usize
}

fn block_range(b: usize, lower_len: u64) -> Range<u64> {
    let start = b as u64 * COPY_UP_BLOCK;
    start..(start + COPY_UP_BLOCK).min(lower_len)
}

/// The lower blocks a change of `range` must copy up first: those it touches but does not
/// cover and that are not copied up yet.
/// `done(b)`: block `b` is copied up.
fn fills(done: impl Fn(usize) -> bool, lower_len: u64, range: Range<u64>) -> Vec<Range<u64>> {
    let first = (range.start / COPY_UP_BLOCK) as usize;
    let last = blocks(range.end.min(lower_len));
    (first..last)
        .filter(|&b| !done(b))
        .map(|b| block_range(b, lower_len))
        .filter(|r| !(range.start <= r.start && range.end >= r.end))
        .collect()
}

/// What a read of an upper file needs, taken under the tree lock.
struct ReadPlan {
    file: Arc<std::fs::File>,
    size: u64,
    /// `None` when all of the file is in the data file.
    lower: Option<(u64, Vec<bool>)>,
}

/// Bytes on disk the data file takes.
fn allocated(file: &std::fs::File) -> u64 {
    file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Bytes of `range` that are holes in `file` (would take new space if written).
fn holes_in(file: &std::fs::File, range: Range<u64>) -> u64 {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut holes = range.end.saturating_sub(len.max(range.start));
    let mut pos = range.start;
    let end = range.end.min(len);
    while pos < end {
        let hole = match rustix::fs::seek(file, SeekFrom::Hole(pos)) {
            Ok(hole) if hole < end => hole,
            _ => break,
        };
        let hole_end = match rustix::fs::seek(file, SeekFrom::Data(hole)) {
            Ok(data) => data.min(end),
            Err(_) => end,
        };
        holes += hole_end - hole;
        pos = hole_end;
    }
    holes
}

fn io_err(what: &str, e: std::io::Error) -> FsError {
    FsError::io(what, e)
}

impl MountTree {
    fn open_data(&self, ino: u64) -> FsResult<Arc<std::fs::File>> {
        let path = self.data_path(ino)?;
        std::fs::File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map(Arc::new)
            .map_err(|e| FsError::io(path, e))
    }

    /// Starts the copy-up of a lower file: an empty sparse data file as long as the file; its
    /// blocks are copied when first written.
    fn copy_up(&self, ino: u64, n: &mut Node) -> FsResult<()> {
        let Body::File { data, .. } = &mut n.body else {
            return Err(errno(libc::EISDIR));
        };
        if !matches!(data, Data::Lower) {
            return Ok(());
        }
        let path = self.data_path(ino)?;
        let f = std::fs::File::create(&path).map_err(|e| FsError::io(&path, e))?;
        f.set_len(n.stat.size).map_err(|e| FsError::io(&path, e))?;
        *data = if n.stat.size == 0 {
            Data::Local
        } else {
            Data::Partial {
                lower_len: n.stat.size,
                present: vec![false; blocks(n.stat.size)],
            }
        };
        Ok(())
    }

    /// Opens `ino`; for writing, the file is copied up first. Every successful open of a
    /// writable tree must be followed by [`MountTree::release`]: an open file outlives its
    /// names.
    pub fn open(&self, ino: u64, write: bool) -> FsResult<()> {
        if self.upper.is_none() {
            return if write {
                Err(errno(libc::EROFS))
            } else {
                Ok(())
            };
        }
        let mut tree = self.lock();
        if write || tree.nodes.contains_key(&ino) {
            let n = self.node_mut(&mut tree, ino)?;
            if write {
                match n.body {
                    Body::File { .. } => self.copy_up(ino, n)?,
                    Body::Dir { .. } => return Err(errno(libc::EISDIR)),
                    _ => {}
                }
            }
            if let Body::File { data, file, .. } = &mut n.body {
                if !matches!(data, Data::Lower) && file.is_none() {
                    *file = Some(self.open_data(ino)?);
                }
            }
        }
        if write {
            tree.mark_unsynced(ino);
            tree.dir_unsynced = true; // a copy-up may have made its data file
        }
        *tree.opens.entry(ino).or_insert(0) += 1;
        Ok(())
    }

    pub fn release(&self, ino: u64) {
        if self.upper.is_none() {
            return;
        }
        let mut tree = self.lock();
        let Some(count) = tree.opens.get_mut(&ino) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        tree.opens.remove(&ino);
        if let Some(Body::File { file, .. }) = tree.nodes.get_mut(&ino).map(|n| &mut n.body) {
            *file = None;
        }
        self.drop_if_unused(&mut tree, ino);
    }

    fn read_plan(&self, ino: u64) -> FsResult<Option<ReadPlan>> {
        let tree = self.lock();
        let Some(n) = tree.nodes.get(&ino) else {
            return Ok(None);
        };
        let Body::File { data, file, .. } = &n.body else {
            return Err(errno(libc::EISDIR));
        };
        let lower = match data {
            Data::Lower => return Ok(None),
            Data::Local => None,
            Data::Partial { lower_len, present } => Some((*lower_len, present.clone())),
        };
        let file = match file {
            Some(f) => f.clone(),
            None => self.open_data(ino)?,
        };
        Ok(Some(ReadPlan {
            file,
            size: n.stat.size,
            lower,
        }))
    }

    /// Reads an upper file's bytes if that needs no lower data; `None` otherwise (and for
    /// files whose bytes are all the layers': see [`MountTree::reads_from_layers`]).
    pub fn read_local(&self, ino: u64, offset: u64, size: u32) -> Option<FsResult<Bytes>> {
        let plan = match self.read_plan(ino) {
            Ok(Some(p)) => p,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        let end = (offset + size as u64).min(plan.size);
        if let Some((lower_len, present)) = &plan.lower {
            let first = (offset / COPY_UP_BLOCK) as usize;
            let last = blocks(end.min(*lower_len));
            if (first..last).any(|b| !present[b]) {
                return None;
            }
        }
        Some(pread(&plan.file, offset..end))
    }

    /// Reads an upper file's bytes, taking the blocks not copied up yet from the layers.
    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let Some(plan) = self.read_plan(ino)? else {
            return self.stack.read(ino, offset, size).await;
        };
        let end = (offset + size as u64).min(plan.size);
        let Some((lower_len, present)) = plan.lower else {
            return pread(&plan.file, offset..end);
        };
        let mut out = BytesMut::with_capacity(end.saturating_sub(offset) as usize);
        let mut pos = offset;
        while pos < end {
            let b = (pos / COPY_UP_BLOCK) as usize;
            let block_end = ((b as u64 + 1) * COPY_UP_BLOCK).min(end);
            if pos >= lower_len || present.get(b).copied().unwrap_or(true) {
                out.extend_from_slice(&pread(&plan.file, pos..block_end)?);
            } else {
                // Not copied up: the layers' bytes up to lower_len, zeros after (a truncate
                // cut the lower file short and extended it again).
                let from_lower = block_end.min(lower_len);
                let got = self.stack.read(ino, pos, (from_lower - pos) as u32).await?;
                out.extend_from_slice(&got);
                out.resize(out.len() + (block_end - pos - got.len() as u64) as usize, 0);
            }
            pos = block_end;
        }
        Ok(out.freeze())
    }

    fn write_lock(&self, ino: u64) -> FsResult<Arc<tokio::sync::Mutex<()>>> {
        let mut tree = self.lock();
        let n = self.node_mut(&mut tree, ino)?;
        match &mut n.body {
            Body::File { write_lock, .. } => {
                Ok(write_lock.get_or_insert_with(Default::default).clone())
            }
            Body::Dir { .. } => Err(errno(libc::EISDIR)),
            _ => Err(errno(libc::EINVAL)),
        }
    }

    /// Takes `bytes` of the quota for a change under way.
    fn reserve(&self, tree: &mut Tree, bytes: u64) -> FsResult<()> {
        if let Some(q) = self.upper()?.quota {
            if tree.used + bytes > q {
                return Err(errno(libc::ENOSPC));
            }
        }
        tree.used += bytes;
        Ok(())
    }

    /// Settles a reservation: the node now takes what its data file holds.
    fn settle(&self, ino: u64, reserved: u64) {
        let mut tree = self.lock();
        let charged = tree.nodes.get(&ino).and_then(|n| match &n.body {
            Body::File { file: Some(f), .. } => Some((n.charged, allocated(f))),
            _ => None,
        });
        tree.used = tree.used.saturating_sub(reserved);
        if let Some((old, new)) = charged {
            tree.used = tree.used.saturating_sub(old) + new;
            tree.nodes.get_mut(&ino).expect("present").charged = new;
        }
    }

    /// Whether a write of `len` bytes at `offset` must first copy up blocks of the layers'
    /// bytes, which may wait on the store: such a write is better served off the thread that
    /// took it, so the mount's other requests need not wait behind a fetch.
    pub fn write_copies_up(&self, ino: u64, offset: u64, len: u64) -> bool {
        if self.upper.is_none() {
            return false;
        }
        let range = offset..offset.saturating_add(len);
        let tree = self.lock();
        let (size, body) = match tree.nodes.get(&ino) {
            Some(n) => (n.stat.size, &n.body),
            // Not recorded yet: a layer file, copied up on its first change.
            None => return true,
        };
        match body {
            Body::File {
                data: Data::Lower, ..
            } => !fills(|_| false, size, range).is_empty(),
            Body::File {
                data: Data::Partial { lower_len, present },
                ..
            } => !fills(
                |b| present.get(b).copied().unwrap_or(true),
                *lower_len,
                range,
            )
            .is_empty(),
            _ => false,
        }
    }

    pub async fn write(&self, ino: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let _pass = self.gate.pass();
        self.upper()?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(errno(libc::EFBIG))?;
        self.change_range(ino, offset..end, true, true, |file| {
            file.write_all_at(data, offset)
                .map_err(|e| io_err("writing to the upper", e))
        })
        .await?;
        Ok(data.len() as u32)
    }

    /// Changes bytes `range` of a file through `change` (on its data file), under the file's
    /// write lock: first the blocks the range touches but does not cover are copied up, and
    /// the quota is reserved for them and for the holes of the range; afterwards every block
    /// the range touches counts as copied up. `grows`: the file's size becomes at least
    /// `range.end`; `touches`: the change counts as a modification (mtime, ctime).
    async fn change_range(
        &self,
        ino: u64,
        range: Range<u64>,
        grows: bool,
        touches: bool,
        change: impl FnOnce(&std::fs::File) -> FsResult<()>,
    ) -> FsResult<()> {
        let (offset, end) = (range.start, range.end);
        let lock = self.write_lock(ino)?;
        let _writing = lock.lock().await;
        let (file, fills, reserved) = {
            let mut tree = self.lock();
            let n = self.node_mut(&mut tree, ino)?;
            self.copy_up(ino, n)?;
            let Body::File { data: d, file, .. } = &mut n.body else {
                return Err(errno(libc::EISDIR));
            };
            let file = match file {
                Some(f) => f.clone(),
                None => {
                    let f = self.open_data(ino)?;
                    *file = Some(f.clone());
                    f
                }
            };
            let fills = match d {
                Data::Partial { lower_len, present } => fills(
                    |b| present.get(b).copied().unwrap_or(true),
                    *lower_len,
                    offset..end,
                ),
                _ => Vec::new(),
            };
            let need = fills.iter().map(|r| r.end - r.start).sum::<u64>()
                + holes_in(&file, offset..end)
                + 4096;
            self.reserve(&mut tree, need)?;
            (file, fills, need)
        };
        let result = async {
            for r in fills {
                let bytes = self
                    .stack
                    .read(ino, r.start, (r.end - r.start) as u32)
                    .await?;
                file.write_all_at(&bytes, r.start)
                    .map_err(|e| io_err("copying a block up", e))?;
            }
            change(&file)
        }
        .await;
        self.settle(ino, reserved);
        result?;
        let mut tree = self.lock();
        tree.mark_unsynced(ino);
        let n = tree.nodes.get_mut(&ino).ok_or(errno(libc::ENOENT))?;
        if let Body::File { data: d, .. } = &mut n.body {
            if let Data::Partial { lower_len, present } = d {
                let last = blocks(end.min(*lower_len));
                for p in present
                    .iter_mut()
                    .take(last)
                    .skip((offset / COPY_UP_BLOCK) as usize)
                {
                    *p = true;
                }
                if present.iter().all(|p| *p) {
                    *d = Data::Local;
                }
            }
        }
        if grows {
            n.stat.size = n.stat.size.max(end);
        }
        if touches {
            let t = now();
            n.stat.mtime = t;
            n.stat.ctime = t;
        }
        Ok(())
    }

    /// chmod, chown, truncate, utimes.
    pub async fn setattr(&self, ino: u64, s: SetAttr) -> FsResult<Stat> {
        let _pass = self.gate.pass();
        self.upper()?;
        let lock = match s.size {
            Some(_) => Some(self.write_lock(ino)?),
            None => None,
        };
        let _writing = match &lock {
            Some(l) => Some(l.lock().await),
            None => None,
        };
        let t = now();
        let mut tree = self.lock();
        if let Some(size) = s.size {
            self.truncate(&mut tree, ino, size)?;
        }
        let n = self.node_mut(&mut tree, ino)?;
        if let Some(mode) = s.mode {
            n.stat.perm = mode & 0o7777;
        }
        if let Some(uid) = s.uid {
            n.stat.uid = uid;
        }
        if let Some(gid) = s.gid {
            n.stat.gid = gid;
        }
        let at = |v: TimeSet| match v {
            TimeSet::Now => t,
            TimeSet::At(x) => x,
        };
        if let Some(a) = s.atime {
            n.stat.atime = at(a);
        }
        if let Some(m) = s.mtime {
            n.stat.mtime = at(m);
        } else if s.size.is_some() {
            n.stat.mtime = t;
        }
        n.stat.ctime = s.ctime.unwrap_or(t);
        Ok(n.stat.clone())
    }

    fn truncate(&self, tree: &mut Tree, ino: u64, size: u64) -> FsResult<()> {
        let n = self.node_mut(tree, ino)?;
        if !matches!(n.body, Body::File { .. }) {
            return Err(errno(if n.is_dir() {
                libc::EISDIR
            } else {
                libc::EINVAL
            }));
        }
        self.copy_up(ino, n)?;
        let Body::File { data, .. } = &mut n.body else {
            unreachable!("checked above");
        };
        if let Data::Partial { lower_len, present } = data {
            if size < *lower_len {
                *lower_len = size;
                present.truncate(blocks(size));
                if present.iter().all(|p| *p) {
                    *data = Data::Local;
                }
            }
        }
        let path = self.data_path(ino)?;
        let f = std::fs::File::options()
            .write(true)
            .open(&path)
            .map_err(|e| FsError::io(&path, e))?;
        f.set_len(size).map_err(|e| FsError::io(&path, e))?;
        let new_charge = allocated(&f);
        n.stat.size = size;
        let old_charge = std::mem::replace(&mut n.charged, new_charge);
        tree.used = tree.used.saturating_sub(old_charge) + new_charge;
        tree.mark_unsynced(ino);
        Ok(())
    }

    /// fallocate: allocation (mode 0, or keeping the size), hole punching and zeroing a
    /// range (`FALLOC_FL_PUNCH_HOLE`, `FALLOC_FL_ZERO_RANGE`).
    pub async fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        let _pass = self.gate.pass();
        self.upper()?;
        let supported =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !supported != 0 {
            return Err(errno(libc::EOPNOTSUPP));
        }
        let end = offset.checked_add(len).ok_or(errno(libc::EFBIG))?;
        let grows = mode & libc::FALLOC_FL_KEEP_SIZE == 0;
        // Plain allocation inside the file changes no bytes, and no times.
        let zeroes = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        let touches = zeroes || (grows && end > self.getattr(ino)?.size);
        // The mode as the kernel gave it (checked above): its bits pass through unchanged.
        let flags = FallocateFlags::from_bits_retain(mode as u32);
        self.change_range(ino, offset..end, grows, touches, |file| {
            rustix::fs::fallocate(file, flags, offset, len)
                .map_err(|e| io_err("fallocate", e.into()))
        })
        .await
    }

    pub fn fsync(&self, ino: u64, datasync: bool) -> FsResult<()> {
        if self.upper.as_ref().is_some_and(|u| u.journal) {
            // The journal update syncs every data file written since the last one (this one
            // included) and records the metadata: syncing the file here as well would sync
            // it twice.
            return self.save_journal();
        }
        let file = {
            let tree = self.lock();
            match tree.nodes.get(&ino).map(|n| &n.body) {
                Some(Body::File { file: Some(f), .. }) => f.clone(),
                _ => return Ok(()),
            }
        };
        let r = if datasync {
            file.sync_data()
        } else {
            file.sync_all()
        };
        r.map_err(|e| io_err("fsync", e))
    }

    /// fsync of a directory: its entries are durable once the journal holds them.
    pub fn fsyncdir(&self) -> FsResult<()> {
        self.save_journal()
    }
}

fn pread(file: &std::fs::File, range: Range<u64>) -> FsResult<Bytes> {
    if range.start >= range.end {
        return Ok(Bytes::new());
    }
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], range.start + done as u64) {
            Ok(0) => break, // past the data file's end: zeros
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("reading the upper", e)),
        }
    }
    Ok(Bytes::from(buf))
}
