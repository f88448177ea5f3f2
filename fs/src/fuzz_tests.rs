//! Bounded fuzzing of every decoder of bytes that come from the store or the disk: manifests,
//! blob envelopes, chunk locators, volume heads and records, and upper journals, through
//! [`strata_testkit::fuzz`]: every decoder must answer `Ok` or `Err`, never panic. Each target's corpus
//! is the valid encodings made here plus the inputs kept under `fs/fuzz/corpus/<target>/`.
//! Journal frames are checksummed, so their mutated payloads get a fresh checksum, or only the
//! checksum would ever be tested. Seeds and run lengths: see [`strata_testkit::fuzz`].

use std::sync::Arc;

use strata_cache_format::{blob, Digest};

use crate::manifest::{Manifest, ManifestBytes};
use crate::stack::tests::{stack_of, write};
use crate::stack::ROOT_INO;
use crate::upper::{Caller, MountTree, UpperConfig};
use crate::volume::{ConflictRecord, KeptRecord, VolumeHead};

/// Runs one target with its kept corpus under `fs/fuzz/corpus/<name>`.
fn fuzz(name: &str, made: &[Vec<u8>], target: impl Fn(&[u8])) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name.replace(' ', "-"));
    strata_testkit::fuzz::run(name, &dir, made.to_vec(), target)
}

/// Uses every part of a manifest that parsed, as a mount would.
fn walk_manifest(m: &Manifest) {
    let mut stack = vec![0usize];
    let mut seen = 0;
    while let Some(i) = stack.pop() {
        seen += 1;
        if seen > m.entry_count() {
            break;
        }
        let e = m.entry(i);
        let _ = m.xattrs(&e);
        if e.kind == crate::manifest::Kind::Symlink {
            let _ = m.symlink_target(&e);
        }
        let _ = m.lookup(&e, b"x");
        let _ = m.chunks_for(e.content_range());
        for c in e.children() {
            if (c as usize) < m.entry_count() && c as usize > i {
                stack.push(c as usize);
            }
        }
    }
}

#[tokio::test]
async fn decoders_of_store_bytes_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "l/a/b.txt", b"hello");
    write(tmp.path(), "l/a/c.bin", &vec![7u8; 300_000]);
    write(tmp.path(), "l/d", b"");
    let s = stack_of(tmp.path(), &["l"]).await;
    let manifest = s.layers()[0].manifest.as_bytes().to_vec();

    let n = fuzz("manifest", std::slice::from_ref(&manifest), |b| {
        if let Ok(m) = Manifest::parse(ManifestBytes::Owned(b.to_vec())) {
            walk_manifest(&m);
        }
    });
    assert!(n > 0);

    let envelopes = vec![
        blob::encode(&manifest),
        blob::encode(b"short"),
        blob::encode(&vec![0u8; 100_000]),
    ];
    fuzz("blob envelope", &envelopes, |b| {
        let _ = blob::decode(b, 1 << 20);
        let _ = blob::decode_verified(&bytes::Bytes::copy_from_slice(b), &Digest::of(b"short"), 5);
    });

    let loc = strata_cache_format::ChunkLoc {
        digest: Digest::of(b"x"),
        pack: Digest::of(b"p"),
        pack_offset: 12,
        stored_len: 34,
        len: 56,
    };
    fuzz(
        "chunk locator",
        &[strata_cache_format::Locator::encode(&loc)],
        |b| {
            let _ = strata_cache_format::Locator::parse(Digest::of(b"x"), b);
        },
    );

    let head = br#"{"version":1,"commits":[{"layer":"blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262","committed_at":1,"changes":2,"bytes_uploaded":3,"paths":["a","b/c"],"attrs":[""],"squashed":[]}]}"#.to_vec();
    let conflict = br#"{"id":"1-ab","layers":["blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"],"paths":["a"],"committed_at":1}"#.to_vec();
    let kept = br#"{"id":"h-1","host":"h","path":"/x","since":1,"attempts":2,"last_error":"e","quarantined":false,"layers":[]}"#.to_vec();
    let sealed = crate::record::seal(&head).to_vec();
    fuzz("volume records", &[head, conflict, kept, sealed], |b| {
        if let Ok(h) = serde_json::from_slice::<VolumeHead>(b) {
            let _ = h.layers();
        }
        let _ = serde_json::from_slice::<ConflictRecord>(b);
        let _ = serde_json::from_slice::<KeptRecord>(b);
        if let Ok(body) = crate::record::open(&bytes::Bytes::copy_from_slice(b)) {
            let _ = serde_json::from_slice::<VolumeHead>(&body);
        }
    });
}

/// Frames of a journal: (payload) list, after the magic.
fn frames(journal: &[u8]) -> Vec<Vec<u8>> {
    let mut rest = &journal[8..];
    let mut out = Vec::new();
    while rest.len() >= 20 {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        out.push(rest[20..20 + len].to_vec());
        rest = &rest[20 + len..];
    }
    out
}

fn journal_of(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut out = b"STRATAJ2".to_vec();
    for p in payloads {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(&blake3::hash(p).as_bytes()[..16]);
        out.extend_from_slice(p);
    }
    out
}

#[tokio::test]
async fn journal_recovery_never_panics_on_damaged_frames() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "l/a/b.txt", b"hello");
    let s = Arc::new(stack_of(tmp.path(), &["l"]).await);
    let upper = |dir: &str| UpperConfig::journaled(tmp.path().join(dir));
    // A journal with a snapshot and change frames: files, a directory, a symlink, xattrs.
    let t = MountTree::new(s.clone(), Some(upper("u"))).unwrap();
    let caller = Caller { uid: 0, gid: 0 };
    let f = t.create(ROOT_INO, b"f", 0o644, caller).unwrap();
    t.open(f.ino, true).unwrap();
    t.write(f.ino, 0, b"data").await.unwrap();
    t.release(f.ino);
    t.save_journal().unwrap();
    let d = t.mkdir(ROOT_INO, b"dir", 0o755, caller).unwrap();
    t.symlink(d.ino, b"ln", b"../f", caller).unwrap();
    t.setxattr(f.ino, b"user.k", b"v", 0).unwrap();
    t.save_journal().unwrap();
    let journal = std::fs::read(tmp.path().join("u").join("journal")).unwrap();
    drop(t);
    let payloads = frames(&journal);
    assert!(payloads.len() >= 2, "{} frames", payloads.len());
    let corpus: Vec<Vec<u8>> = payloads.clone();
    let dir = tmp.path().join("fuzzed");
    let n = fuzz("journal frame", &corpus, |payload| {
        // The damaged payload in each place of the journal, with a good checksum.
        let mut all = payloads.clone();
        let at = payload.len() % all.len();
        all[at] = payload.to_vec();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("journal"), journal_of(&all)).unwrap();
        let _ = MountTree::recover(s.clone(), UpperConfig::journaled(dir.clone()));
        let _ = std::fs::remove_dir_all(&dir);
    });
    assert!(n > 0);
}

/// Found by the journal fuzzer: a frame naming inode u64::MAX overflowed the next inode
/// number at recovery.
#[tokio::test]
async fn a_journal_naming_the_last_inode_number_recovers_without_overflow() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "l/a/b.txt", b"hello");
    let s = Arc::new(stack_of(tmp.path(), &["l"]).await);
    let hex = "81a74368616e67657393cf01000000000000039492cf0100000000000002949bcf0100000000000002a753796d6c696e6b04cd01ff0100000092ce6b13330ace2e4de86492ce6b13330ace2e4de86492ce6b13330ace2e4de8648081a753796d6c696e6b942e2e2f66009201949b01a344697200cd01ed0400000092ce6b13330ace2d6ad7d292ce6b13330ace2e4dd20e92ce6b13330ace2e4dd20e8081a34469729201839161cf000000010000000193646972cf01000000000000019166cf01000000000000000092cf0100000000000001949bcf0100000000000001a344697200cd01ed0200000092ce6b13330ace2e4dd20e92ce6b13330ace2e4de86492ce6b13330ace2e4de8648081a344697292c081926c6ecf01000000000000020092cfffffffffffffffff949bcf0100000000000000a446696c6504cd01a40100000092ce6b13330ace2e2cc02b92ce6b13330ace2e2dbede92ce6b13330ace2e4e1cf28196757365722e6b917681a446696c6591a54c6f63616ccd100090";
    let payload: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    // A snapshot frame from a real journal first, then the damaged changes frame.
    let t = MountTree::new(
        s.clone(),
        Some(UpperConfig::journaled(tmp.path().join("u"))),
    )
    .unwrap();
    let f = t
        .create(ROOT_INO, b"f", 0o644, Caller { uid: 0, gid: 0 })
        .unwrap();
    t.release(f.ino);
    t.save_journal().unwrap();
    let snapshot = frames(&std::fs::read(tmp.path().join("u").join("journal")).unwrap())[0].clone();
    drop(t);
    let dir = tmp.path().join("damaged");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("journal"), journal_of(&[snapshot, payload])).unwrap();
    // Recovered or refused, but answered.
    let _ = MountTree::recover(
        s,
        UpperConfig {
            dir,
            quota: None,
            inodes: None,
            journal: true,
        },
    );
}
