//! The daemon's control protocol: one JSON request line, one JSON reply line, per connection on
//! a unix socket that only root (or the daemon's own user) may use.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cache::{CacheStats, ReadStats};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Mount(MountSpec),
    Unmount { mountpoint: PathBuf, lazy: bool },
    Commit { mountpoint: PathBuf },
    Mounts,
    Stats,
}

/// Inodes a mount's upper may make unless the mount says otherwise: it bounds what one
/// function can make the daemon remember.
pub const DEFAULT_SCRATCH_INODES: u64 = 2_000_000;

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
}

impl MountSpec {
    /// What can be checked of a request before anything is opened or mounted: a client's
    /// mistake gets a clear error at once.
    pub fn check(&self) -> anyhow::Result<()> {
        if !self.mountpoint.is_absolute() {
            bail!(
                "mountpoint {} must be an absolute path",
                self.mountpoint.display()
            );
        }
        if self.layers.is_empty() && self.volume.is_none() {
            bail!("a mount needs at least one --layer (or a --volume)");
        }
        if self.volume.is_some() && self.read_only {
            bail!("a volume mount is writable: --volume and --read-only exclude each other");
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsReply {
    pub total: CacheStats,
    /// Cached layer manifests under the cache dir (outside the chunk budget).
    pub manifest_bytes: u64,
    pub mounts: Vec<MountStats>,
    /// Volume uppers whose commit failed, kept on this host (retried, or quarantined).
    #[serde(default)]
    pub kept: Vec<KeptInfo>,
}

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

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(serde_json::Value),
    Error(String),
}

/// Requests are small; a client that sends more is not speaking this protocol.
pub const MAX_REQUEST: usize = 1 << 20;

/// Sends one request and returns the reply's value, or the daemon's error.
pub async fn call<T: serde::de::DeserializeOwned>(
    socket: &Path,
    request: &Request,
) -> anyhow::Result<T> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                " (is `strata daemon` running? `strata mount --foreground` works without it)"
            }
            std::io::ErrorKind::PermissionDenied => " (the daemon socket is for root only)",
            _ => "",
        };
        anyhow::anyhow!(
            "cannot reach the strata daemon at {}: {e}{hint}",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    write
        .write_all(&line)
        .await
        .context("sending to the daemon")?;
    let mut reply = String::new();
    BufReader::new(read)
        .read_line(&mut reply)
        .await
        .context("reading the daemon's reply")?;
    if reply.is_empty() {
        bail!("the daemon closed the connection without a reply (see its log)");
    }
    decode_reply(&reply)
}

/// A reply line: the value asked for, or the daemon's error.
pub fn decode_reply<T: serde::de::DeserializeOwned>(line: &str) -> anyhow::Result<T> {
    match serde_json::from_str::<Reply>(line).context("parsing the daemon's reply")? {
        Reply::Ok(v) => serde_json::from_value(v).context("parsing the daemon's reply"),
        Reply::Error(e) => Err(anyhow::anyhow!(e)),
    }
}

/// Where the daemon listens unless told otherwise.
pub fn default_socket() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/strata/daemon.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("strata").join("daemon.sock"),
        None => PathBuf::from(format!("/tmp/strata-{uid}")).join("daemon.sock"),
    }
}
