//! [`CountingStore`]: a transparent wrapper that counts the requests reaching a store, by
//! kind, and the bytes they carry, so tests and benchmarks can assert on request budgets
//! ("one ranged GET per pack", "no HEAD on the read path") without instrumenting a backend.
//!
//! Every call is counted when it is made, whether or not it succeeds: that is what a store
//! bills and what a server sees. Bytes written are the bodies sent by `put` and
//! `compare_and_swap` (also counted when the write then fails); bytes read are the bodies
//! returned by `get`, `get_range` and `get_versioned`.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Store, StoreResult, Version};

/// Request counts at one moment (see [`CountingStore::snapshot`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreCounts {
    pub get: u64,
    pub get_range: u64,
    pub head: u64,
    pub put: u64,
    pub get_versioned: u64,
    pub compare_and_swap: u64,
    pub list: u64,
    pub delete: u64,
    /// Body bytes returned by reads.
    pub bytes_read: u64,
    /// Body bytes sent by writes.
    pub bytes_written: u64,
}

impl StoreCounts {
    /// All requests, of every kind.
    pub fn requests(&self) -> u64 {
        self.get
            + self.get_range
            + self.head
            + self.put
            + self.get_versioned
            + self.compare_and_swap
            + self.list
            + self.delete
    }

    /// These counts and `other`'s together.
    pub fn plus(&self, other: &StoreCounts) -> StoreCounts {
        StoreCounts {
            get: self.get + other.get,
            get_range: self.get_range + other.get_range,
            head: self.head + other.head,
            put: self.put + other.put,
            get_versioned: self.get_versioned + other.get_versioned,
            compare_and_swap: self.compare_and_swap + other.compare_and_swap,
            list: self.list + other.list,
            delete: self.delete + other.delete,
            bytes_read: self.bytes_read + other.bytes_read,
            bytes_written: self.bytes_written + other.bytes_written,
        }
    }

    /// What happened between `earlier` and this snapshot.
    pub fn since(&self, earlier: &StoreCounts) -> StoreCounts {
        StoreCounts {
            get: self.get.saturating_sub(earlier.get),
            get_range: self.get_range.saturating_sub(earlier.get_range),
            head: self.head.saturating_sub(earlier.head),
            put: self.put.saturating_sub(earlier.put),
            get_versioned: self.get_versioned.saturating_sub(earlier.get_versioned),
            compare_and_swap: self
                .compare_and_swap
                .saturating_sub(earlier.compare_and_swap),
            list: self.list.saturating_sub(earlier.list),
            delete: self.delete.saturating_sub(earlier.delete),
            bytes_read: self.bytes_read.saturating_sub(earlier.bytes_read),
            bytes_written: self.bytes_written.saturating_sub(earlier.bytes_written),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    get: AtomicU64,
    get_range: AtomicU64,
    head: AtomicU64,
    put: AtomicU64,
    get_versioned: AtomicU64,
    compare_and_swap: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    // Counters are independent statistics; no ordering with other memory is needed.
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Forwards every call to `inner` unchanged (same URL, same results, same errors) and counts
/// it. `S` is a concrete store or, by default, `dyn Store`.
#[derive(Debug)]
pub struct CountingStore<S: Store + ?Sized = dyn Store> {
    inner: Arc<S>,
    counters: Counters,
}

impl<S: Store + ?Sized> CountingStore<S> {
    pub fn new(inner: Arc<S>) -> CountingStore<S> {
        CountingStore {
            inner,
            counters: Counters::default(),
        }
    }

    /// The wrapped store, to look behind the counters (reads there are not counted).
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    /// The counts so far. Each field is read atomically, but a snapshot taken while requests
    /// are in flight may mix fields from slightly different moments.
    pub fn snapshot(&self) -> StoreCounts {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreCounts {
            get: load(&c.get),
            get_range: load(&c.get_range),
            head: load(&c.head),
            put: load(&c.put),
            get_versioned: load(&c.get_versioned),
            compare_and_swap: load(&c.compare_and_swap),
            list: load(&c.list),
            delete: load(&c.delete),
            bytes_read: load(&c.bytes_read),
            bytes_written: load(&c.bytes_written),
        }
    }

    fn read(&self, result: StoreResult<Bytes>) -> StoreResult<Bytes> {
        if let Ok(data) = &result {
            bump(&self.counters.bytes_read, data.len() as u64);
        }
        result
    }
}

#[async_trait]
impl<S: Store + ?Sized> Store for CountingStore<S> {
    fn url(&self) -> &str {
        self.inner.url()
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        bump(&self.counters.get, 1);
        self.read(self.inner.get(key).await)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        bump(&self.counters.get_range, 1);
        self.read(self.inner.get_range(key, range).await)
    }

    async fn get_range_pieces(&self, key: &str, range: Range<u64>) -> StoreResult<Vec<Bytes>> {
        bump(&self.counters.get_range, 1);
        let pieces = self.inner.get_range_pieces(key, range).await?;
        let len: usize = pieces.iter().map(Bytes::len).sum();
        bump(&self.counters.bytes_read, len as u64);
        Ok(pieces)
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        bump(&self.counters.head, 1);
        self.inner.head(key).await
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        bump(&self.counters.put, 1);
        bump(&self.counters.bytes_written, data.len() as u64);
        self.inner.put(key, data).await
    }

    async fn get_versioned(&self, key: &str) -> StoreResult<Option<(Bytes, Version)>> {
        bump(&self.counters.get_versioned, 1);
        let result = self.inner.get_versioned(key).await;
        if let Ok(Some((data, _))) = &result {
            bump(&self.counters.bytes_read, data.len() as u64);
        }
        result
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&Version>,
        data: Bytes,
    ) -> StoreResult<Version> {
        bump(&self.counters.compare_and_swap, 1);
        bump(&self.counters.bytes_written, data.len() as u64);
        self.inner.compare_and_swap(key, expected, data).await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        bump(&self.counters.list, 1);
        self.inner.list(prefix).await
    }

    async fn list_info(&self, prefix: &str) -> StoreResult<Vec<crate::ObjectInfo>> {
        bump(&self.counters.list, 1);
        self.inner.list_info(prefix).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        bump(&self.counters.delete, 1);
        self.inner.delete(key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test]
    async fn counts_a_known_sequence() {
        let counting = CountingStore::new(Arc::new(MemoryStore::new("counted")));
        counting.put("a", Bytes::from_static(b"abc")).await.unwrap();
        counting
            .put("b", Bytes::from_static(b"bcdef"))
            .await
            .unwrap();
        let after_puts = counting.snapshot();
        counting.get("a").await.unwrap();
        counting.get("missing").await.unwrap_err();
        counting.get_range("a", 0..2).await.unwrap();
        counting.head("a").await.unwrap();
        counting.head("missing").await.unwrap();
        counting.get_versioned("a").await.unwrap();
        counting.get_versioned("missing").await.unwrap();
        counting
            .compare_and_swap("c", None, Bytes::from_static(b"cccc"))
            .await
            .unwrap();
        counting
            .compare_and_swap("c", None, Bytes::from_static(b"dddd"))
            .await
            .unwrap_err();
        counting.list("").await.unwrap();
        counting.delete("a").await.unwrap();

        let expected = StoreCounts {
            get: 2,
            get_range: 1,
            head: 2,
            put: 2,
            get_versioned: 2,
            compare_and_swap: 2,
            list: 1,
            delete: 1,
            bytes_read: 3 + 2 + 3,
            bytes_written: 3 + 5 + 4 + 4,
        };
        let counts = counting.snapshot();
        assert_eq!(counts, expected);
        assert_eq!(counts.requests(), 13);
        assert_eq!(
            counts.since(&after_puts),
            StoreCounts {
                put: 0,
                bytes_written: 8,
                ..expected
            }
        );
        // The typed inner store stays reachable, and looking there is not counted.
        assert_eq!(counting.inner().len(), 2);
        assert_eq!(counting.snapshot(), expected);
    }

    #[tokio::test]
    async fn forwards_url_and_errors_unchanged() {
        let inner: Arc<dyn Store> = Arc::new(MemoryStore::new("plain"));
        let counting = CountingStore::new(inner.clone());
        assert_eq!(counting.url(), "memory://plain");
        let direct = inner.get("x/y").await.unwrap_err().to_string();
        let wrapped = counting.get("x/y").await.unwrap_err().to_string();
        assert_eq!(direct, wrapped);
    }
}
