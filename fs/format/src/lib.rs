//! strata-fs-format: the layer manifest, a versioned, fixed-layout binary format (see
//! `docs/FORMAT.md`). No I/O and no runtime: this is the surface that decodes untrusted bytes.
//!
//! The decoded manifest is a flat buffer that is used in place: entries are fixed-size records
//! addressed by index, so a manifest can be memory-mapped from the local cache and a layer of a
//! million files costs no heap per entry. [`Manifest::parse`] validates every record once, so
//! accessors afterwards index without re-checking and never panic on what the store sent.
//!
//! Entries are numbered in breadth-first order with each directory's children contiguous and
//! sorted by name bytes, so a lookup is a binary search and a readdir is a slice.

use std::ops::{Deref, Range};

use strata_cache_format::Digest;

pub const MAGIC: &[u8; 8] = b"STRATALY";
pub const VERSION: u32 = 2;
pub const HEADER_LEN: usize = 64;
pub const ENTRY_LEN: usize = 80;
pub const CHUNK_LEN: usize = 64;
pub const PACK_LEN: usize = 32;
/// Largest manifest strata will decode (2^32 entries would need far more than this anyway).
pub const MAX_MANIFEST_LEN: usize = 4 << 30;
pub const MAX_NAME_LEN: usize = 255;
pub const MAX_SYMLINK_LEN: usize = 4096;
pub const MAX_CHUNK_LEN: u32 = 16 << 20;
/// A stored (enveloped, maybe compressed) chunk is at most this long: zstd is only kept when it
/// shrinks a chunk, so the envelope byte is all it can add; the slack leaves room for writers
/// whose codecs expand incompressible data by a little.
pub const MAX_STORED_LEN: u32 = MAX_CHUNK_LEN + (64 << 10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Dir = 1,
    File = 2,
    Symlink = 3,
    /// Hides the entry of the same name in lower layers.
    Whiteout = 4,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Dir,
            2 => Kind::File,
            3 => Kind::Symlink,
            4 => Kind::Whiteout,
            _ => return None,
        })
    }
}

/// Directory flag: lower layers' entries under this directory are hidden.
pub const FLAG_OPAQUE: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("not a strata layer manifest (bad magic)")]
    BadMagic,
    #[error("unsupported manifest version {0} (this strata reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error(
        "manifest is truncated or has trailing bytes: header says {expected} bytes, got {actual}"
    )]
    BadLength { expected: u128, actual: usize },
    #[error("manifest entry {index}: {reason}")]
    BadEntry { index: u64, reason: String },
    #[error("manifest chunk {index}: {reason}")]
    BadChunk { index: u64, reason: String },
    #[error("manifest: {0}")]
    Invalid(String),
}

fn bad_entry(index: usize, reason: impl Into<String>) -> ManifestError {
    ManifestError::BadEntry {
        index: index as u64,
        reason: reason.into(),
    }
}

/// Checks one path component as it may appear in a manifest.
pub fn check_name(name: &[u8]) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("name longer than {MAX_NAME_LEN} bytes"));
    }
    if name == b"." || name == b".." {
        return Err(format!(
            "name {:?} is not allowed",
            String::from_utf8_lossy(name)
        ));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(format!(
            "name {:?} contains '/' or NUL",
            String::from_utf8_lossy(name)
        ));
    }
    Ok(())
}

/// An extended attribute: (name, value).
pub type Xattr<'a> = (&'a [u8], &'a [u8]);

/// The bytes behind a manifest: owned, or mapped from the local cache.
pub enum ManifestBytes {
    Owned(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl Deref for ManifestBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ManifestBytes::Owned(v) => v,
            ManifestBytes::Mapped(m) => m,
        }
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// A validated manifest.
pub struct Manifest {
    bytes: ManifestBytes,
    entry_count: usize,
    chunk_count: usize,
    pack_count: usize,
    blob_start: usize,
    content_len: u64,
}

/// One entry, read from its record.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub index: u32,
    pub kind: Kind,
    pub flags: u8,
    pub name: &'a [u8],
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub parent: u32,
    pub size: u64,
    data_off: u64,
    a: u32,
    b: u32,
    xattr: Range<usize>,
}

impl Entry<'_> {
    pub fn is_opaque(&self) -> bool {
        self.kind == Kind::Dir && self.flags & FLAG_OPAQUE != 0
    }
    /// Children of a directory: entry indices.
    pub fn children(&self) -> Range<u32> {
        if self.kind == Kind::Dir {
            self.a..self.a + self.b
        } else {
            0..0
        }
    }
    /// The entry holding this file's inode (itself unless it is a further hard link).
    pub fn inode_entry(&self) -> u32 {
        if self.kind == Kind::File {
            self.a
        } else {
            self.index
        }
    }
    pub fn nlink(&self) -> u32 {
        if self.kind == Kind::File {
            self.b
        } else {
            1
        }
    }
    /// Where a file's bytes sit in the layer's content stream.
    pub fn content_range(&self) -> Range<u64> {
        self.data_off..self.data_off + self.size
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub digest: Digest,
    /// Offset of the chunk in the layer's content stream.
    pub offset: u64,
    /// Plain length.
    pub len: u32,
    /// Where its stored bytes are: `stored_len` bytes at `pack_offset` of pack object `pack`.
    pub pack: Digest,
    pub pack_offset: u64,
    pub stored_len: u32,
}

impl ChunkRef {
    /// What the chunk cache needs to fetch this chunk.
    pub fn location(&self) -> strata_cache_format::ChunkLoc {
        strata_cache_format::ChunkLoc {
            digest: self.digest,
            len: self.len,
            pack: self.pack,
            pack_offset: self.pack_offset,
            stored_len: self.stored_len,
        }
    }
}

impl Manifest {
    /// Validates `bytes` as a manifest. Every malformed input is an error, never a panic.
    pub fn parse(bytes: ManifestBytes) -> Result<Manifest, ManifestError> {
        let b: &[u8] = &bytes;
        if b.len() < HEADER_LEN || &b[..8] != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(ManifestError::UnsupportedVersion(version));
        }
        let entry_count = u64_at(b, 16);
        let chunk_count = u64_at(b, 24);
        let blob_len = u64_at(b, 32);
        let content_len = u64_at(b, 40);
        let pack_count = u64_at(b, 48);
        let expected = HEADER_LEN as u128
            + entry_count as u128 * ENTRY_LEN as u128
            + chunk_count as u128 * CHUNK_LEN as u128
            + pack_count as u128 * PACK_LEN as u128
            + blob_len as u128;
        if expected != b.len() as u128 {
            return Err(ManifestError::BadLength {
                expected,
                actual: b.len(),
            });
        }
        if entry_count == 0 || entry_count > u32::MAX as u64 {
            return Err(ManifestError::Invalid(format!(
                "absurd entry count {entry_count}"
            )));
        }
        if pack_count > chunk_count {
            return Err(ManifestError::Invalid(format!(
                "{pack_count} packs for {chunk_count} chunks"
            )));
        }
        let entry_count = entry_count as usize;
        let chunk_count = chunk_count as usize;
        let pack_count = pack_count as usize;
        let manifest = Manifest {
            blob_start: HEADER_LEN
                + entry_count * ENTRY_LEN
                + chunk_count * CHUNK_LEN
                + pack_count * PACK_LEN,
            bytes,
            entry_count,
            chunk_count,
            pack_count,
            content_len,
        };
        manifest.validate_chunks()?;
        manifest.validate_entries()?;
        Ok(manifest)
    }

    /// Moves a validated manifest onto other bytes with the same content (its memory-mapped
    /// cache file), without validating again. Gives the manifest back if the bytes differ.
    pub fn rehome(self, bytes: ManifestBytes) -> Result<Manifest, Manifest> {
        if *bytes != *self.bytes {
            return Err(self);
        }
        Ok(Manifest { bytes, ..self })
    }

    fn blob(&self) -> &[u8] {
        &self.bytes[self.blob_start..]
    }

    fn blob_range(&self, off: u64, len: u64) -> Option<Range<usize>> {
        let end = off.checked_add(len)?;
        if end > self.blob().len() as u64 {
            return None;
        }
        Some(off as usize..end as usize)
    }

    fn validate_chunks(&self) -> Result<(), ManifestError> {
        let mut offset = 0u64;
        for i in 0..self.chunk_count {
            let pack = u32_at(self.chunk_record(i), 56) as usize;
            if pack >= self.pack_count {
                return Err(ManifestError::BadChunk {
                    index: i as u64,
                    reason: format!("pack {pack} of {}", self.pack_count),
                });
            }
            let c = self.chunk(i);
            let bad = |reason: String| ManifestError::BadChunk {
                index: i as u64,
                reason,
            };
            if c.offset != offset {
                return Err(bad(format!(
                    "offset {} but previous chunks end at {offset}",
                    c.offset
                )));
            }
            if c.len == 0 || c.len > MAX_CHUNK_LEN {
                return Err(bad(format!("length {} out of range", c.len)));
            }
            if c.stored_len == 0 || c.stored_len > MAX_STORED_LEN {
                return Err(bad(format!("stored length {} out of range", c.stored_len)));
            }
            if c.pack_offset.checked_add(c.stored_len as u64).is_none() {
                return Err(bad(format!("pack offset {} out of range", c.pack_offset)));
            }
            offset += c.len as u64;
        }
        if offset != self.content_len {
            return Err(ManifestError::Invalid(format!(
                "chunks cover {offset} bytes but the content stream is {} bytes",
                self.content_len
            )));
        }
        Ok(())
    }

    fn validate_entries(&self) -> Result<(), ManifestError> {
        let n = self.entry_count;
        // Children ranges must tile 1..n in order (breadth-first numbering).
        let mut next_child = 1usize;
        for i in 0..n {
            let rec = self.record(i);
            let kind = Kind::from_u8(rec[0])
                .ok_or_else(|| bad_entry(i, format!("unknown kind {}", rec[0])))?;
            let e = self
                .decode_entry(i, kind)
                .ok_or_else(|| bad_entry(i, "name or xattrs outside the manifest"))?;
            if i == 0 {
                if kind != Kind::Dir || !e.name.is_empty() {
                    return Err(bad_entry(
                        0,
                        "the root must be a directory with an empty name",
                    ));
                }
            } else {
                check_name(e.name).map_err(|r| bad_entry(i, r))?;
                let parent = e.parent as usize;
                // Only earlier (already validated) entries may be looked at.
                if parent >= i || !self.entry(parent).children().contains(&(i as u32)) {
                    return Err(bad_entry(i, format!("not a child of its parent {parent}")));
                }
                if i as u32 > self.entry(parent).children().start
                    && self.entry(i - 1).name >= e.name
                {
                    return Err(bad_entry(i, "names in a directory are not strictly sorted"));
                }
            }
            if e.mode & !0o7777 != 0 {
                return Err(bad_entry(
                    i,
                    format!("mode {:#o} has bits outside 0o7777", e.mode),
                ));
            }
            if e.flags & !FLAG_OPAQUE != 0 || (e.flags != 0 && kind != Kind::Dir) {
                return Err(bad_entry(i, format!("unknown flags {:#x}", e.flags)));
            }
            if e.mtime_nsec >= 1_000_000_000 {
                return Err(bad_entry(i, "mtime nanoseconds out of range"));
            }
            match kind {
                Kind::Dir => {
                    let (first, count) = (e.a as usize, e.b as usize);
                    if count > 0 {
                        if first != next_child || first <= i {
                            return Err(bad_entry(
                                i,
                                format!("children start at {first}, expected {next_child}"),
                            ));
                        }
                        next_child = first
                            .checked_add(count)
                            .filter(|&end| end <= n)
                            .ok_or_else(|| bad_entry(i, "children beyond the last entry"))?;
                    }
                    if e.size != 0 {
                        return Err(bad_entry(i, "directory with a size"));
                    }
                }
                Kind::File => {
                    if e.data_off
                        .checked_add(e.size)
                        .is_none_or(|end| end > self.content_len)
                    {
                        return Err(bad_entry(i, "file bytes beyond the content stream"));
                    }
                    let target = e.a as usize;
                    if target > i {
                        return Err(bad_entry(i, "hard link to a later entry"));
                    }
                    if target != i {
                        let t = self.entry(target);
                        if t.kind != Kind::File
                            || t.a as usize != target
                            || t.size != e.size
                            || t.data_off != e.data_off
                        {
                            return Err(bad_entry(
                                i,
                                format!("hard link to {target}, which is not a matching file"),
                            ));
                        }
                    }
                    if e.b == 0 {
                        return Err(bad_entry(i, "file with zero links"));
                    }
                }
                Kind::Symlink => {
                    if e.size == 0 || e.size > MAX_SYMLINK_LEN as u64 {
                        return Err(bad_entry(i, "symlink target length out of range"));
                    }
                    let target = self
                        .blob_range(e.data_off, e.size)
                        .ok_or_else(|| bad_entry(i, "symlink target outside the manifest"))?;
                    if self.blob()[target].contains(&0) {
                        return Err(bad_entry(i, "symlink target contains NUL"));
                    }
                }
                Kind::Whiteout => {
                    if e.size != 0 {
                        return Err(bad_entry(i, "whiteout with a size"));
                    }
                }
            }
            self.parse_xattrs(&e).map_err(|r| bad_entry(i, r))?;
        }
        if next_child != n {
            return Err(ManifestError::Invalid(format!(
                "{} entries are not in any directory",
                n - next_child
            )));
        }
        Ok(())
    }

    fn record(&self, i: usize) -> &[u8] {
        let off = HEADER_LEN + i * ENTRY_LEN;
        &self.bytes[off..off + ENTRY_LEN]
    }

    fn decode_entry(&self, i: usize, kind: Kind) -> Option<Entry<'_>> {
        let r = self.record(i);
        let name_len = u16_at(r, 2) as u64;
        let name = self.blob_range(u64_at(r, 32), name_len)?;
        let xattr = self.blob_range(u64_at(r, 64), u32_at(r, 72) as u64)?;
        Some(Entry {
            index: i as u32,
            kind,
            flags: r[1],
            name: &self.blob()[name],
            mode: u32_at(r, 4),
            uid: u32_at(r, 8),
            gid: u32_at(r, 12),
            mtime_sec: u64_at(r, 16) as i64,
            mtime_nsec: u32_at(r, 24),
            parent: u32_at(r, 28),
            size: u64_at(r, 40),
            data_off: u64_at(r, 48),
            a: u32_at(r, 56),
            b: u32_at(r, 60),
            xattr,
        })
    }

    pub fn entry_count(&self) -> usize {
        self.entry_count
    }

    pub fn chunk_count(&self) -> usize {
        self.chunk_count
    }

    pub fn content_len(&self) -> u64 {
        self.content_len
    }

    /// Entry `i`. Panics if `i` is out of range (indices come from this manifest's own
    /// validated records).
    pub fn entry(&self, i: usize) -> Entry<'_> {
        let kind = Kind::from_u8(self.record(i)[0]).expect("validated kind");
        self.decode_entry(i, kind).expect("validated entry")
    }

    pub fn root(&self) -> Entry<'_> {
        self.entry(0)
    }

    /// Binary search for `name` among a directory's children.
    pub fn lookup(&self, dir: &Entry<'_>, name: &[u8]) -> Option<Entry<'_>> {
        let children = dir.children();
        let (mut lo, mut hi) = (children.start, children.end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.entry(mid as usize);
            match e.name.cmp(name) {
                std::cmp::Ordering::Equal => return Some(e),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        None
    }

    pub fn symlink_target(&self, e: &Entry<'_>) -> &[u8] {
        match e.kind {
            Kind::Symlink => &self.blob()[e.data_off as usize..(e.data_off + e.size) as usize],
            _ => &[],
        }
    }

    fn parse_xattrs<'a>(&'a self, e: &Entry<'a>) -> Result<Vec<Xattr<'a>>, String> {
        let mut b = &self.blob()[e.xattr.clone()];
        let mut out = Vec::new();
        let take = |b: &mut &'a [u8], n: usize| -> Result<&'a [u8], String> {
            if b.len() < n {
                return Err("xattr list is truncated".to_string());
            }
            let (head, rest) = b.split_at(n);
            *b = rest;
            Ok(head)
        };
        while !b.is_empty() {
            let name_len = u16::from_le_bytes(take(&mut b, 2)?.try_into().unwrap()) as usize;
            let name = take(&mut b, name_len)?;
            let value_len = u32::from_le_bytes(take(&mut b, 4)?.try_into().unwrap()) as usize;
            let value = take(&mut b, value_len)?;
            if name.is_empty() || name.contains(&0) {
                return Err("xattr with an empty name or a NUL in it".into());
            }
            out.push((name, value));
        }
        Ok(out)
    }

    /// Extended attributes of an entry, as (name, value) pairs.
    pub fn xattrs<'a>(&'a self, e: &Entry<'a>) -> Vec<Xattr<'a>> {
        self.parse_xattrs(e).unwrap_or_default()
    }

    fn chunk_record(&self, i: usize) -> &[u8] {
        let off = HEADER_LEN + self.entry_count * ENTRY_LEN + i * CHUNK_LEN;
        &self.bytes[off..off + CHUNK_LEN]
    }

    pub fn pack_count(&self) -> usize {
        self.pack_count
    }

    pub fn pack(&self, i: usize) -> Digest {
        let off =
            HEADER_LEN + self.entry_count * ENTRY_LEN + self.chunk_count * CHUNK_LEN + i * PACK_LEN;
        Digest(self.bytes[off..off + PACK_LEN].try_into().unwrap())
    }

    pub fn chunk(&self, i: usize) -> ChunkRef {
        let r = self.chunk_record(i);
        ChunkRef {
            digest: Digest(r[..32].try_into().unwrap()),
            offset: u64_at(r, 32),
            len: u32_at(r, 40),
            stored_len: u32_at(r, 44),
            pack_offset: u64_at(r, 48),
            pack: self.pack(u32_at(r, 56) as usize),
        }
    }

    /// Indices of the chunks overlapping `range` of the content stream.
    pub fn chunks_for(&self, range: Range<u64>) -> Range<usize> {
        if range.start >= range.end || self.chunk_count == 0 {
            return 0..0;
        }
        // First chunk ending after range.start; first chunk starting at or after range.end.
        let first = self.partition_chunks(|c| c.offset + c.len as u64 <= range.start);
        let last = self.partition_chunks(|c| c.offset < range.end);
        first..last.max(first)
    }

    /// The number of leading chunks for which `pred` holds (chunks are sorted by offset).
    fn partition_chunks(&self, pred: impl Fn(&ChunkRef) -> bool) -> usize {
        let (mut lo, mut hi) = (0usize, self.chunk_count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(&self.chunk(mid)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// An entry to encode; the builder in `publish` produces these in final (breadth-first) order.
#[derive(Debug, Clone, Default)]
pub struct EntrySpec {
    pub kind: Option<Kind>,
    pub flags: u8,
    pub name: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub parent: u32,
    pub size: u64,
    /// File: content stream offset. Symlink: unused (the target is `symlink_target`).
    pub data_off: u64,
    /// Dir: first child. File: inode entry.
    pub a: u32,
    /// Dir: child count. File: link count.
    pub b: u32,
    pub symlink_target: Vec<u8>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Encodes a manifest. The caller supplies entries in breadth-first order with sorted siblings
/// and the chunk table in stream order; [`Manifest::parse`] is the judge of the result.
pub fn encode(entries: &[EntrySpec], chunks: &[ChunkRef]) -> Vec<u8> {
    let mut blob = Vec::new();
    let mut records = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        let name_off = blob.len() as u64;
        blob.extend_from_slice(&e.name);
        let mut data_off = e.data_off;
        let mut size = e.size;
        if e.kind == Some(Kind::Symlink) {
            data_off = blob.len() as u64;
            size = e.symlink_target.len() as u64;
            blob.extend_from_slice(&e.symlink_target);
        }
        let xattr_off = blob.len() as u64;
        for (name, value) in &e.xattrs {
            blob.extend_from_slice(&(name.len() as u16).to_le_bytes());
            blob.extend_from_slice(name);
            blob.extend_from_slice(&(value.len() as u32).to_le_bytes());
            blob.extend_from_slice(value);
        }
        let xattr_len = (blob.len() as u64 - xattr_off) as u32;
        records.push(e.kind.map_or(0, |k| k as u8));
        records.push(e.flags);
        records.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        records.extend_from_slice(&e.mode.to_le_bytes());
        records.extend_from_slice(&e.uid.to_le_bytes());
        records.extend_from_slice(&e.gid.to_le_bytes());
        records.extend_from_slice(&e.mtime_sec.to_le_bytes());
        records.extend_from_slice(&e.mtime_nsec.to_le_bytes());
        records.extend_from_slice(&e.parent.to_le_bytes());
        records.extend_from_slice(&name_off.to_le_bytes());
        records.extend_from_slice(&size.to_le_bytes());
        records.extend_from_slice(&data_off.to_le_bytes());
        records.extend_from_slice(&e.a.to_le_bytes());
        records.extend_from_slice(&e.b.to_le_bytes());
        records.extend_from_slice(&xattr_off.to_le_bytes());
        records.extend_from_slice(&xattr_len.to_le_bytes());
        records.extend_from_slice(&[0u8; 4]);
    }
    let content_len: u64 = chunks.iter().map(|c| c.len as u64).sum();
    // The pack table: each pack once, in order of first use.
    let mut packs: Vec<Digest> = Vec::new();
    let mut pack_index = std::collections::HashMap::new();
    let chunk_packs: Vec<u32> = chunks
        .iter()
        .map(|c| {
            *pack_index.entry(c.pack).or_insert_with(|| {
                packs.push(c.pack);
                packs.len() as u32 - 1
            })
        })
        .collect();
    let mut out = Vec::with_capacity(
        HEADER_LEN + records.len() + chunks.len() * CHUNK_LEN + packs.len() * PACK_LEN + blob.len(),
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    out.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
    out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    out.extend_from_slice(&content_len.to_le_bytes());
    out.extend_from_slice(&(packs.len() as u64).to_le_bytes());
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&records);
    for (c, pack) in chunks.iter().zip(chunk_packs) {
        out.extend_from_slice(&c.digest.0);
        out.extend_from_slice(&c.offset.to_le_bytes());
        out.extend_from_slice(&c.len.to_le_bytes());
        out.extend_from_slice(&c.stored_len.to_le_bytes());
        out.extend_from_slice(&c.pack_offset.to_le_bytes());
        out.extend_from_slice(&pack.to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
    }
    for p in &packs {
        out.extend_from_slice(&p.0);
    }
    out.extend_from_slice(&blob);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dir(name: &str, parent: u32, first: u32, count: u32) -> EntrySpec {
        EntrySpec {
            kind: Some(Kind::Dir),
            name: name.as_bytes().to_vec(),
            mode: 0o755,
            parent,
            a: first,
            b: count,
            ..Default::default()
        }
    }

    fn file(name: &str, parent: u32, index: u32, off: u64, size: u64) -> EntrySpec {
        EntrySpec {
            kind: Some(Kind::File),
            name: name.as_bytes().to_vec(),
            mode: 0o644,
            parent,
            size,
            data_off: off,
            a: index,
            b: 1,
            xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
            ..Default::default()
        }
    }

    /// / { a/ { x }, b, l -> b }
    fn sample() -> (Vec<EntrySpec>, Vec<ChunkRef>) {
        let mut link = EntrySpec {
            kind: Some(Kind::Symlink),
            name: b"l".to_vec(),
            mode: 0o777,
            symlink_target: b"b".to_vec(),
            ..Default::default()
        };
        link.parent = 0;
        let entries = vec![
            dir("", 0, 1, 3),
            dir("a", 0, 4, 1),
            file("b", 0, 2, 0, 10),
            link,
            file("x", 1, 4, 10, 5),
        ];
        let chunks = vec![ChunkRef {
            digest: strata_cache_format::Digest::of(b"fifteen bytes!!"),
            offset: 0,
            len: 15,
            pack: strata_cache_format::Digest::of(b"a pack"),
            pack_offset: 0,
            stored_len: 16,
        }];
        (entries, chunks)
    }

    fn parse(bytes: Vec<u8>) -> Result<Manifest, ManifestError> {
        Manifest::parse(ManifestBytes::Owned(bytes))
    }

    #[test]
    fn sample_round_trips() {
        let (entries, chunks) = sample();
        let m = parse(encode(&entries, &chunks)).unwrap();
        let root = m.root();
        let a = m.lookup(&root, b"a").unwrap();
        let x = m.lookup(&a, b"x").unwrap();
        assert_eq!(x.content_range(), 10..15);
        assert_eq!(m.xattrs(&x), vec![(&b"user.k"[..], &b"v"[..])]);
        let l = m.lookup(&root, b"l").unwrap();
        assert_eq!(m.symlink_target(&l), b"b");
        assert!(m.lookup(&root, b"zz").is_none());
        assert_eq!(m.chunks_for(12..14), 0..1);
        assert_eq!(m.chunks_for(15..15), 0..0);
    }

    #[test]
    fn rehome_keeps_validation_only_for_identical_bytes() {
        let (entries, chunks) = sample();
        let bytes = encode(&entries, &chunks);
        let m = parse(bytes.clone()).unwrap();
        let m = m
            .rehome(ManifestBytes::Owned(bytes.clone()))
            .ok()
            .expect("same bytes");
        let mut other = bytes;
        other[HEADER_LEN] ^= 0xff;
        assert!(
            m.rehome(ManifestBytes::Owned(other)).is_err(),
            "different bytes are refused"
        );
    }

    fn rejects(entries: Vec<EntrySpec>, chunks: Vec<ChunkRef>, what: &str) {
        let err = parse(encode(&entries, &chunks))
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(!err.to_string().is_empty());
    }

    #[test]
    fn malformed_manifests_are_errors() {
        for bad in ["x/y", "", ".", "..", "nul\0"] {
            let (mut e, c) = sample();
            e[2].name = bad.as_bytes().to_vec();
            rejects(e, c, &format!("name {bad:?}"));
        }
        let (mut e, c) = sample();
        e[2].name = b"a".to_vec(); // duplicate of the dir "a"
        rejects(e, c, "duplicate names");
        let (mut e, c) = sample();
        e[4].size = 100; // beyond the content stream
        rejects(e, c, "file past the stream");
        let (mut e, c) = sample();
        e[1].a = 1; // a directory that contains itself
        rejects(e, c, "cycle");
        let (mut e, c) = sample();
        e[0].b = 4000; // more children than entries
        rejects(e, c, "child count");
        let (e, mut c) = sample();
        c[0].len = 14; // chunks do not add up to the stream
        c.push(ChunkRef {
            offset: 20,
            len: 1,
            ..c[0]
        });
        rejects(e, c, "chunk offsets");
        let (mut e, c) = sample();
        e[4].mode = 0o170644;
        rejects(e, c, "mode bits");
        let (mut e, c) = sample();
        e[4].a = 2; // hard link to a file with another size
        rejects(e, c, "hard link");

        let (e, c) = sample();
        let good = encode(&e, &c);
        assert_eq!(
            parse(good[..good.len() - 1].to_vec())
                .err()
                .map(|e| matches!(e, ManifestError::BadLength { .. })),
            Some(true)
        );
        assert_eq!(
            parse(b"not a manifest".to_vec()).err(),
            Some(ManifestError::BadMagic)
        );
        let mut v1 = good.clone();
        v1[8] = 1;
        assert_eq!(parse(v1).err(), Some(ManifestError::UnsupportedVersion(1)));
        // A chunk naming a pack past the pack table.
        let mut bad_pack = good.clone();
        let pack_field = HEADER_LEN + e.len() * ENTRY_LEN + 56;
        bad_pack[pack_field..pack_field + 4].copy_from_slice(&1u32.to_le_bytes());
        assert!(
            matches!(parse(bad_pack).err(), Some(ManifestError::BadChunk { .. })),
            "pack index out of range"
        );
        let (e2, mut c2) = sample();
        c2[0].stored_len = 0;
        rejects(e2, c2, "stored length");
        // Absurd counts must not overflow or allocate.
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(huge).is_err());
    }

    /// Walks everything a reader could touch.
    fn exercise(m: &Manifest) {
        for i in 0..m.entry_count() {
            let e = m.entry(i);
            let _ = m.xattrs(&e);
            let _ = m.symlink_target(&e);
            for c in e.children() {
                let child = m.entry(c as usize);
                assert!(m.lookup(&e, child.name).is_some());
            }
            let _ = m.chunks_for(e.content_range());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whatever the store sends, parsing never panics, and what parses can be walked.
        #[test]
        fn corrupted_manifests_never_panic(flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8), cut in 0usize..4096) {
            let (e, c) = sample();
            let mut bytes = encode(&e, &c);
            for (pos, val) in flips {
                let n = bytes.len();
                bytes[pos % n] = val;
            }
            if cut % 5 == 0 {
                bytes.truncate(cut % (bytes.len() + 1));
            }
            if let Ok(m) = parse(bytes) {
                exercise(&m);
            }
        }
    }
}
