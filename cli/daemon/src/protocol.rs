//! The daemon's control protocol, version [`PROTOCOL_VERSION`]: one JSON request line and one
//! JSON reply line per connection, on a unix socket. Root, the daemon's own user and the
//! platform group may ask anything; tenants' agents (by uid) only for their own mounts.
//!
//! A request is a [`Request`] under the protocol version:
//! `{"version":1,"request":{"op":"unmount","mountpoint":"/mnt/x","lazy":false}}`. A reply is
//! `{"version":1,"ok":VALUE}` or `{"version":1,"error":{"kind":"not_found","message":"…"}}`
//! (see [`ErrorKind`](crate::ErrorKind)). A daemon answers a request of another version with an
//! `unsupported_version` error and does nothing; a client refuses a reply of another version.
//! Lines written before versions existed carry none and count as version 0: such a client gets
//! its refusal in its own shape (`{"error":"…"}`), and such a daemon refuses a nested request
//! (it has no `op`), so neither side acts on a line it does not understand.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cache::{CacheStats, ReadStats};
use serde::{Deserialize, Serialize};
use strata_fs::prefetch::ReplayReport;
use strata_fs::volume::lifecycle::CommitStats;
use strata_store::StoreCounts;

use crate::error::{DaemonError, DaemonResult, ErrorKind};

/// The version of the protocol this library speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Requests are small; a client that sends more is not speaking this protocol.
pub const MAX_REQUEST: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Mount(MountSpec),
    Unmount { mountpoint: PathBuf, lazy: bool },
    Commit { mountpoint: PathBuf },
    Mounts,
    Stats,
}

/// What to mount where. Store credentials are the daemon's own; only the endpoint may come from
/// the client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountSpec {
    pub store: String,
    pub endpoint_url: Option<String>,
    /// Dataset refs, bottom to top.
    pub layers: Vec<String>,
    /// Absolute, symlinks resolved.
    pub mountpoint: PathBuf,
    /// No writable upper: every change answers EROFS.
    #[serde(default)]
    pub read_only: bool,
    /// Bytes the scratch upper may take on disk.
    #[serde(default)]
    pub scratch_size: Option<u64>,
    /// Records the upper may hold (nodes made or changed, and names made by hard links); the
    /// daemon's default ([`DEFAULT_SCRATCH_INODES`]) when unset.
    #[serde(default)]
    pub scratch_inodes: Option<u64>,
    /// A persistent volume `SCOPE/NAME`: its committed chain is stacked on the layers, and the
    /// upper's changes are committed to it when the mount ends.
    #[serde(default)]
    pub volume: Option<String>,
    /// Unmount when the client that asked exits, however it exits (`strata run` killed with
    /// SIGKILL leaves nothing mounted). The daemon learns the client from the socket.
    #[serde(default)]
    pub unmount_with_client: bool,
    /// Do not record what this mount's function reads first (the layers' start records stay
    /// as they are).
    #[serde(default)]
    pub no_prefetch_record: bool,
    /// Do not fetch what the layers' start records say starts read first.
    #[serde(default)]
    pub no_prefetch_replay: bool,
    /// Mount only refs one of these publishers (`ed25519:<hex>`) signed, on top of what the
    /// daemon's own `trusted_keys` require (a daemon with keys of its own mounts only refs
    /// signed by a key in both).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_keys: Vec<String>,
    /// Mount on behalf of this tenant of the daemon's config: with its credential (and
    /// endpoint), and only what it is granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl MountSpec {
    /// What can be checked of a request before anything is opened or mounted: a client's
    /// mistake gets a clear error at once.
    pub fn check(&self) -> DaemonResult<()> {
        if !self.mountpoint.is_absolute() {
            return Err(DaemonError::bad_request(format!(
                "mountpoint {} must be an absolute path",
                self.mountpoint.display()
            )));
        }
        if self.layers.is_empty() && self.volume.is_none() {
            return Err(DaemonError::bad_request(
                "a mount needs at least one --layer (or a --volume)",
            ));
        }
        if self.volume.is_some() && self.read_only {
            return Err(DaemonError::bad_request(
                "a volume mount is writable: --volume and --read-only exclude each other",
            ));
        }
        for layer in &self.layers {
            strata_fs::refs::DatasetRef::parse(layer)?;
        }
        if let Some(v) = &self.volume {
            strata_fs::volume::VolumeRef::parse(v)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerInfo {
    pub dataset: String,
    pub digest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountInfo {
    pub id: u64,
    pub mountpoint: PathBuf,
    pub store: String,
    /// Bottom to top.
    pub layers: Vec<LayerInfo>,
    /// Seconds since the epoch.
    pub mounted_at: u64,
    /// Whether the mount has a scratch upper (else it is read-only).
    #[serde(default)]
    pub writable: bool,
    #[serde(default)]
    pub scratch_size: Option<u64>,
    #[serde(default)]
    pub volume: Option<String>,
    /// In an unmount's reply: what went wrong committing the volume (a conflict, or the
    /// upper kept for a retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_error: Option<String>,
    /// A read-only mount of the same stack as mount N shares its FUSE session (a bind mount:
    /// one kernel page cache, one set of counters); this is N.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_with: Option<u64>,
    /// The tenant it was made for (`--tenant`, or the tenant of the agent that asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// What `strata commit` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitReply {
    pub volume: String,
    /// The new delta layer; `None` when there was nothing new, or on a conflict.
    pub layer: Option<String>,
    pub changes: u64,
    pub bytes_uploaded: u64,
    /// Set when a newer commit changed the same paths (the changes are kept as a conflict).
    pub conflict: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountStats {
    #[serde(flatten)]
    pub mount: MountInfo,
    pub stats: ReadStats,
    /// What the mount fetched ahead from the layers' start records (its GETs and bytes are
    /// in `stats` too).
    #[serde(default)]
    pub prefetch: ReplayReport,
    /// Every request the mount sent its store, by kind, with the bytes moved: reads, fetches
    /// ahead, start records, volume commits.
    #[serde(default)]
    pub store_requests: StoreCounts,
    /// Requests of the mount's function answered with an error, by errno (`ENOENT`: 3).
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsReply {
    pub total: CacheStats,
    /// Every request the daemon sent any store since it started, by kind, with the bytes
    /// moved (mounts gone since included).
    #[serde(default)]
    pub store_requests: StoreCounts,
    /// Cached layer manifests under the cache dir (outside the chunk budget).
    pub manifest_bytes: u64,
    pub mounts: Vec<MountStats>,
    /// Volume uppers whose commit failed, kept on this host (retried, or quarantined).
    #[serde(default)]
    pub kept: Vec<KeptInfo>,
    /// How the cache's files (chunk files, local copies of large files) are protected.
    #[serde(default)]
    pub local_integrity: String,
    /// How this daemon's volume commits ended.
    #[serde(default)]
    pub commits: CommitStats,
    /// Every mount's error replies by errno, mounts gone since included.
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
}

/// What protects the cache's local copies: no fs-verity (strata does not use it), but a hash
/// on first use and the file's identity afterwards.
pub const LOCAL_INTEGRITY: &str = "BLAKE3 of each chunk file, and of each part of a local copy, \
on its first use after a start (or as written), then the file's inode, size and ctime around \
each read and when a copy is handed to the kernel; a file changed since is hashed again before \
use; no fs-verity";

/// A kept volume upper, as the daemon lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeptInfo {
    pub path: PathBuf,
    pub volume: String,
    pub attempts: u32,
    pub last_error: String,
    pub quarantined: bool,
    /// Seconds since the epoch of its next try (none once quarantined).
    pub next_try_at: Option<u64>,
}

/// A request line, as a client sends it: `{"version":1,"request":{"op":…}}` (an error only for
/// a path that is not UTF-8). The request is nested so that a daemon of version 0, which would
/// ignore an unknown `version` field beside `op`, refuses the line instead of acting on it.
pub fn encode_request(request: &Request) -> Result<Vec<u8>, serde_json::Error> {
    let request = serde_json::to_value(request)?;
    Ok(line(
        &serde_json::json!({"version": PROTOCOL_VERSION, "request": request}),
    ))
}

/// A request line as the daemon read it.
#[derive(Debug)]
pub struct Incoming {
    /// The version the client speaks: its reply is written in that version's shape where
    /// this daemon knows it ([`encode_reply`]).
    pub version: u32,
    /// The request, or why it is refused (another version, a malformed line).
    pub request: DaemonResult<Request>,
}

/// A request line, as the daemon reads it: the version first, so that a client of another
/// version gets told so, whatever it asked, and nothing is done.
pub fn decode_request(line: &str) -> Incoming {
    let malformed =
        |e: serde_json::Error| DaemonError::bad_request(format!("malformed request: {e}"));
    let mut value: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return Incoming {
                version: PROTOCOL_VERSION,
                request: Err(malformed(e)),
            }
        }
    };
    let version = version_of(&value);
    if version != PROTOCOL_VERSION {
        return Incoming {
            version,
            request: Err(DaemonError::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "the client speaks protocol version {version} and this daemon version \
                     {PROTOCOL_VERSION}: use the strata client that matches the daemon"
                ),
            )),
        };
    }
    let request = match value.get_mut("request") {
        Some(r) => serde_json::from_value(r.take()).map_err(malformed),
        None => Err(DaemonError::bad_request(
            "malformed request: no `request` in it",
        )),
    };
    Incoming { version, request }
}

/// A reply line, as the daemon sends it to a client of `version`: version 0 clients (from
/// before versions existed) only ever get a refusal, in their shape `{"error":"…"}`.
pub fn encode_reply(version: u32, reply: &DaemonResult<serde_json::Value>) -> Vec<u8> {
    let value = match (version, reply) {
        (0, Err(e)) => serde_json::json!({"error": e.message}),
        (0, Ok(_)) => serde_json::json!({"error": "unsupported protocol version 0"}),
        (_, Ok(v)) => serde_json::json!({"version": PROTOCOL_VERSION, "ok": v}),
        (_, Err(e)) => serde_json::json!({"version": PROTOCOL_VERSION, "error": e}),
    };
    line(&value)
}

/// Why a reply line could not be taken as an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The daemon answered with an error.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The line is not a reply of this protocol.
    #[error("the daemon's reply is not understood: {0}")]
    Malformed(String),
    /// The daemon speaks another version (and did nothing).
    #[error(
        "the daemon speaks protocol version {daemon} and this client version {client}: \
         use the strata client that matches the daemon (or restart the daemon from this one)"
    )]
    Version { daemon: u32, client: u32 },
}

/// A reply line: the value asked for, or the daemon's error.
pub fn decode_reply<T: serde::de::DeserializeOwned>(line: &str) -> Result<T, ReplyError> {
    let malformed = |e: serde_json::Error| ReplyError::Malformed(e.to_string());
    let mut value: serde_json::Value = serde_json::from_str(line).map_err(malformed)?;
    let version = version_of(&value);
    let error = value.get_mut("error").map(serde_json::Value::take);
    if version != PROTOCOL_VERSION {
        // A newer daemon's refusal says what it speaks; anything else (a version-0 daemon's
        // "missing field `op`") is reported as the mismatch it is.
        if let Some(Ok(e)) = error.map(serde_json::from_value::<DaemonError>) {
            return Err(ReplyError::Daemon(e));
        }
        return Err(ReplyError::Version {
            daemon: version,
            client: PROTOCOL_VERSION,
        });
    }
    if let Some(error) = error {
        return Err(ReplyError::Daemon(
            serde_json::from_value(error).map_err(malformed)?,
        ));
    }
    match value.get_mut("ok") {
        Some(ok) => serde_json::from_value(ok.take()).map_err(malformed),
        None => Err(ReplyError::Malformed("neither `ok` nor `error`".into())),
    }
}

fn version_of(value: &serde_json::Value) -> u32 {
    value
        .get("version")
        .and_then(|v| v.as_u64())
        .map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX))
}

fn line(value: &serde_json::Value) -> Vec<u8> {
    let mut out = value.to_string().into_bytes();
    out.push(b'\n');
    out
}
