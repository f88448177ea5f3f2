//! strata-store: the network object store behind strata: a flat namespace of keys holding immutable objects
//! (chunks, layer manifests) and a few small mutable ones (refs) that move only by
//! compare-and-swap.
//!
//! Backends:
//! - [`local::LocalStore`] (`file:///path`, the embedded default);
//! - [`s3::S3Store`] (`s3://bucket/prefix`);
//! - [`memory::MemoryStore`] (`memory://NAME`, in process memory, for tests; not reachable
//!   through [`open_store`]).
//!
//! Wrappers, which take any store and are themselves stores:
//! - [`counting::CountingStore`] counts requests by kind and bytes moved
//!   ([`counting::StoreCounts`]), for request-budget assertions;
//! - [`faulty::FaultyStore`] injects seeded, replayable faults ([`faulty::FaultConfig`]):
//!   errors, latency, truncated or corrupted bodies, lost compare-and-swap replies, and a crash
//!   point after the k-th write; it reports what it injected ([`faulty::FaultCounts`]).
//!
//! Every backend and wrapper passes the same [`conformance`] suite: the unit tests of this
//! crate run it on the memory and local stores and on both wrappers (with no faults asked for,
//! a wrapper must be transparent); `tests/tests/store_conformance.rs` runs it on moto_server
//! and Garage.

pub mod conformance;
pub mod counting;
pub mod faulty;
pub mod local;
pub mod memory;
pub mod s3;
#[cfg(test)]
mod tests;

pub use counting::{CountingStore, StoreCounts};
pub use faulty::{FaultConfig, FaultCounts, FaultyStore};
pub use memory::MemoryStore;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// An object as a listing shows it: its key, size and when it was last written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// When the object was last written, by the store's clock (S3's `LastModified`, a local
    /// file's mtime): what garbage collection's grace period is measured against.
    pub modified: std::time::SystemTime,
}

/// An opaque version of a mutable object, used for compare-and-swap (an ETag on S3, a content
/// hash on the local store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The key does not exist.
    NotFound,
    /// A conditional write lost: the object changed (or appeared) since it was read.
    Conflict,
    /// The store cannot do this safely (e.g. it ignores conditional writes).
    Unsupported,
    /// Bad input from the caller (an invalid key or URL, a bucket that does not exist).
    Invalid,
    /// The store refused the credentials or the permission.
    Denied,
    /// Network, server or disk trouble.
    Io,
}

/// A store error always says which store, which key and why.
#[derive(Debug, thiserror::Error)]
#[error("{store}: {op} {key:?}: {message}")]
pub struct StoreError {
    pub store: String,
    pub op: &'static str,
    pub key: String,
    pub kind: StoreErrorKind,
    pub message: String,
}

impl StoreError {
    pub fn new(
        store: &str,
        op: &'static str,
        key: &str,
        kind: StoreErrorKind,
        message: impl fmt::Display,
    ) -> StoreError {
        StoreError {
            store: store.to_string(),
            op,
            key: key.to_string(),
            kind,
            message: message.to_string(),
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == StoreErrorKind::NotFound
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// The URL this store was opened from, for messages.
    fn url(&self) -> &str;

    async fn get(&self, key: &str) -> StoreResult<Bytes>;

    /// Bytes `range` of the object (clipped at its end).
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes>;

    /// [`Store::get_range`] as the pieces the bytes arrived in, in order, not joined into one
    /// buffer: a caller that cuts the range into parts of its own (chunks of a pack) copies
    /// only the parts that straddle two pieces, instead of every byte once more.
    async fn get_range_pieces(&self, key: &str, range: Range<u64>) -> StoreResult<Vec<Bytes>> {
        Ok(vec![self.get_range(key, range).await?])
    }

    /// The object's size, or `None` if it does not exist.
    async fn head(&self, key: &str) -> StoreResult<Option<u64>>;

    /// Writes the object, replacing any previous one atomically: readers see the old or the new
    /// object, never a part.
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()>;

    /// Reads a mutable object with the version to pass to [`Store::compare_and_swap`].
    async fn get_versioned(&self, key: &str) -> StoreResult<Option<(Bytes, Version)>>;

    /// Writes `data` only if the object is still at `expected` (`None`: only if it does not
    /// exist). Fails with [`StoreErrorKind::Conflict`] otherwise, and with
    /// [`StoreErrorKind::Unsupported`] when the store cannot guarantee the condition.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&Version>,
        data: Bytes,
    ) -> StoreResult<Version>;

    /// All keys starting with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> StoreResult<Vec<String>>;

    /// All objects whose keys start with `prefix`, sorted by key, with sizes and times. An
    /// object deleted while the listing runs may be left out.
    async fn list_info(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>>;

    /// Deletes the object; deleting a missing key is not an error.
    async fn delete(&self, key: &str) -> StoreResult<()>;
}

/// How to open a store; the CLI fills this from flags and the environment. Its `Debug` never
/// shows a secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// S3 endpoint for S3-compatible servers (also `AWS_ENDPOINT_URL`); implies path-style.
    pub endpoint_url: Option<String>,
    /// The user promises that only one writer moves refs in this store, so refs may be moved
    /// without conditional writes on stores that ignore them.
    pub single_writer: bool,
    /// Explicit S3 credentials (access key id, secret); otherwise the standard AWS chain.
    pub credentials: Option<(String, String)>,
    /// S3 region; otherwise the standard AWS chain, then `us-east-1`.
    pub region: Option<String>,
    /// A named profile of the AWS config files (which may assume a role, or use a web
    /// identity token); otherwise the default chain.
    pub profile: Option<String>,
}

impl fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreOptions")
            .field("endpoint_url", &self.endpoint_url)
            .field("single_writer", &self.single_writer)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|(id, _)| format!("{id} (secret hidden)")),
            )
            .field("region", &self.region)
            .field("profile", &self.profile)
            .finish()
    }
}

/// Opens `file:///abs/path`, a plain directory path, or `s3://bucket[/prefix]`.
pub async fn open_store(url: &str, options: &StoreOptions) -> StoreResult<Arc<dyn Store>> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = match rest.split_once('/') {
            Some((b, p)) => (b, p.trim_matches('/')),
            None => (rest, ""),
        };
        if bucket.is_empty() {
            return Err(StoreError::new(
                url,
                "open",
                "",
                StoreErrorKind::Invalid,
                "missing bucket name (expected s3://bucket/prefix)",
            ));
        }
        let store = s3::S3Store::open(url, bucket, prefix, options).await?;
        return Ok(Arc::new(store));
    }
    let path = match url.strip_prefix("file://") {
        Some(p) => p,
        None if url.contains("://") => {
            return Err(StoreError::new(
                url,
                "open",
                "",
                StoreErrorKind::Invalid,
                "unknown store scheme (expected file:///path or s3://bucket/prefix)",
            ))
        }
        None => url,
    };
    if path.is_empty() {
        return Err(StoreError::new(
            url,
            "open",
            "",
            StoreErrorKind::Invalid,
            "empty path",
        ));
    }
    Ok(Arc::new(local::LocalStore::open(url, path)?))
}

/// Rejects keys that could escape a local root or confuse S3 (`..`, empty segments).
pub(crate) fn check_key(store: &str, op: &'static str, key: &str) -> StoreResult<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.contains('\0')
        || key
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..");
    if bad {
        return Err(StoreError::new(
            store,
            op,
            key,
            StoreErrorKind::Invalid,
            "invalid key",
        ));
    }
    Ok(())
}
