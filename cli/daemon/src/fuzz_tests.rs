//! Bounded fuzzing of the control protocol (see [`strata_testkit::fuzz`]): the daemon decodes and
//! checks request lines from any local root process, and clients decode the daemon's reply
//! lines. Neither may panic on any line. Kept inputs: `cli/fuzz/corpus/<target>/`.

use std::path::{Path, PathBuf};

use crate::error::{DaemonError, ErrorKind};
use crate::protocol::{
    decode_reply, decode_request, encode_reply, encode_request, CommitReply, KeptInfo, LayerInfo,
    MountInfo, MountSpec, Request, StatsReply, PROTOCOL_VERSION,
};

fn fuzz(name: &str, made: Vec<Vec<u8>>, target: impl Fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    strata_testkit::fuzz::run(name, &dir, made, target)
}

fn line(request: &Request) -> Vec<u8> {
    encode_request(request).unwrap()
}

fn spec() -> MountSpec {
    MountSpec {
        store: "s3://bucket/prefix".into(),
        endpoint_url: Some("http://127.0.0.1:3900".into()),
        layers: vec!["base:v1".into(), "delta:v2".into()],
        mountpoint: PathBuf::from("/mnt/data"),
        read_only: false,
        scratch_size: Some(1 << 30),
        scratch_inodes: Some(1000),
        volume: Some("team/vol".into()),
        unmount_with_client: true,
        no_prefetch_record: false,
        no_prefetch_replay: false,
        trusted_keys: Vec::new(),
        tenant: None,
    }
}

fn mount_info() -> MountInfo {
    MountInfo {
        id: 7,
        mountpoint: PathBuf::from("/mnt/data"),
        store: "file:///srv/store".into(),
        layers: vec![LayerInfo {
            dataset: "base:v1".into(),
            digest: format!("{}", strata_cache_format::Digest::of(b"layer")),
        }],
        mounted_at: 1_800_000_000,
        writable: true,
        scratch_size: None,
        volume: Some("team/vol".into()),
        commit_error: Some("conflict".into()),
        shared_with: Some(1),
        tenant: Some("alice".into()),
    }
}

#[test]
fn request_lines_never_panic_the_daemon() {
    let made = vec![
        line(&Request::Mount(spec())),
        line(&Request::Unmount {
            mountpoint: "/mnt/data".into(),
            lazy: true,
        }),
        line(&Request::Commit {
            mountpoint: "/mnt/data".into(),
        }),
        line(&Request::Mounts),
        line(&Request::Stats),
    ];
    let n = fuzz("control-request", made, |b| {
        // The daemon reads one line of UTF-8 (read_line refuses anything else).
        let Ok(text) = std::str::from_utf8(b) else {
            return;
        };
        if let Ok(Request::Mount(spec)) = decode_request(text).request {
            let _ = spec.check();
        }
    });
    assert!(n > 0);
}

#[test]
fn reply_lines_never_panic_a_client() {
    let stats = StatsReply {
        total: Default::default(),
        store_requests: Default::default(),
        manifest_bytes: 12,
        mounts: Vec::new(),
        kept: vec![KeptInfo {
            path: "/var/lib/strata/kept/1".into(),
            volume: "team/vol".into(),
            attempts: 3,
            last_error: "store unreachable".into(),
            quarantined: false,
            next_try_at: Some(1_800_000_000),
        }],
        local_integrity: "x".into(),
        commits: Default::default(),
        errors: [("ENOENT".to_string(), 2)].into(),
    };
    let commit = CommitReply {
        volume: "team/vol".into(),
        layer: None,
        changes: 3,
        bytes_uploaded: 4096,
        conflict: Some("team/vol conflict 1-ab".into()),
    };
    let ok = |v: serde_json::Value| encode_reply(PROTOCOL_VERSION, &Ok(v));
    let made = vec![
        ok(serde_json::to_value(mount_info()).unwrap()),
        ok(serde_json::to_value(vec![mount_info()]).unwrap()),
        ok(serde_json::to_value(&stats).unwrap()),
        ok(serde_json::to_value(&commit).unwrap()),
        encode_reply(
            PROTOCOL_VERSION,
            &Err(DaemonError::new(ErrorKind::Permission, "permission denied")),
        ),
        // What a daemon of version 0 sent.
        b"{\"error\":\"permission denied\"}\n".to_vec(),
    ];
    let n = fuzz("control-reply", made, |b| {
        let Ok(text) = std::str::from_utf8(b) else {
            return;
        };
        let _ = decode_reply::<MountInfo>(text);
        let _ = decode_reply::<Vec<MountInfo>>(text);
        let _ = decode_reply::<StatsReply>(text);
        let _ = decode_reply::<CommitReply>(text);
    });
    assert!(n > 0);
}

/// What the daemon answers to the checks a request fails, before it opens anything.
#[test]
fn a_mount_request_is_checked_before_anything_is_opened() {
    let errs = |f: fn(&mut MountSpec)| {
        let mut s = spec();
        f(&mut s);
        s.check().map_err(|e| e.to_string()).unwrap_err()
    };
    assert!(spec().check().is_ok());
    assert!(errs(|s| s.mountpoint = "rel/dir".into()).contains("absolute"));
    assert!(errs(|s| {
        s.layers.clear();
        s.volume = None
    })
    .contains("at least one"));
    assert!(errs(|s| s.read_only = true).contains("exclude"));
    assert!(errs(|s| s.layers[1] = "a/b:v1".into()).contains("a/b"));
    assert!(errs(|s| s.volume = Some("../x".into())).contains("invalid volume scope"));
}
