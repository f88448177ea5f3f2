//! `memory://NAME`: a store in process memory, for tests and fault campaigns. Nothing is
//! persisted; every [`MemoryStore`] is a separate, initially empty namespace.
//!
//! Compare-and-swap is real: every write (put or compare-and-swap) gives the object a fresh
//! version from a per-store counter, so a writer holding an old version loses even if the
//! object was rewritten with the same bytes in between (no ABA, unlike a content hash).

use std::collections::BTreeMap;
use std::ops::{Bound, Range};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{check_key, ObjectInfo, Store, StoreError, StoreErrorKind, StoreResult, Version};

#[derive(Debug)]
struct Object {
    data: Bytes,
    version: u64,
    written: std::time::SystemTime,
}

#[derive(Debug, Default)]
struct Objects {
    by_key: BTreeMap<String, Object>,
    /// The last version handed out; versions never repeat within a store.
    last_version: u64,
}

impl Objects {
    fn write(&mut self, key: &str, data: Bytes) -> Version {
        self.last_version += 1;
        let version = self.last_version;
        let written = std::time::SystemTime::now();
        self.by_key.insert(
            key.to_string(),
            Object {
                data,
                version,
                written,
            },
        );
        version_of(version)
    }
}

fn version_of(n: u64) -> Version {
    Version(format!("m{n}"))
}

#[derive(Debug)]
pub struct MemoryStore {
    url: String,
    /// A std mutex, only ever held for a map operation (never across an await).
    objects: Mutex<Objects>,
}

impl MemoryStore {
    /// An empty store whose URL (in messages) is `memory://NAME`.
    pub fn new(name: &str) -> MemoryStore {
        MemoryStore {
            url: format!("memory://{name}"),
            objects: Mutex::new(Objects::default()),
        }
    }

    /// How many objects the store holds.
    pub fn len(&self) -> usize {
        self.objects().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn objects(&self) -> MutexGuard<'_, Objects> {
        // Every critical section leaves the map consistent, so a panic elsewhere while holding
        // the lock must not make the store unusable.
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn not_found(&self, op: &'static str, key: &str) -> StoreError {
        StoreError::new(
            &self.url,
            op,
            key,
            StoreErrorKind::NotFound,
            "no such object",
        )
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn url(&self) -> &str {
        &self.url
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        check_key(&self.url, "get", key)?;
        let data = self.objects().by_key.get(key).map(|o| o.data.clone());
        data.ok_or_else(|| self.not_found("get", key))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        check_key(&self.url, "get", key)?;
        let data = self.objects().by_key.get(key).map(|o| o.data.clone());
        let data = data.ok_or_else(|| self.not_found("get", key))?;
        // Clipped at the end like the other stores; an empty or inverted range reads nothing.
        let len = data.len() as u64;
        let start = range.start.min(len);
        let end = range.end.clamp(start, len);
        Ok(data.slice(start as usize..end as usize))
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        check_key(&self.url, "head", key)?;
        Ok(self.objects().by_key.get(key).map(|o| o.data.len() as u64))
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        check_key(&self.url, "put", key)?;
        self.objects().write(key, data);
        Ok(())
    }

    async fn get_versioned(&self, key: &str) -> StoreResult<Option<(Bytes, Version)>> {
        check_key(&self.url, "get", key)?;
        Ok(self
            .objects()
            .by_key
            .get(key)
            .map(|o| (o.data.clone(), version_of(o.version))))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&Version>,
        data: Bytes,
    ) -> StoreResult<Version> {
        check_key(&self.url, "compare-and-swap", key)?;
        let mut objects = self.objects();
        let current = objects.by_key.get(key).map(|o| version_of(o.version));
        if current.as_ref() != expected {
            return Err(StoreError::new(
                &self.url,
                "compare-and-swap",
                key,
                StoreErrorKind::Conflict,
                format!("expected version {expected:?}, found {current:?}"),
            ));
        }
        Ok(objects.write(key, data))
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        // BTreeMap order is byte order of the keys, the same sort the other stores return.
        Ok(self
            .objects()
            .by_key
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }

    async fn list_info(&self, prefix: &str) -> StoreResult<Vec<ObjectInfo>> {
        Ok(self
            .objects()
            .by_key
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, o)| ObjectInfo {
                key: k.clone(),
                size: o.data.len() as u64,
                modified: o.written,
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        check_key(&self.url, "delete", key)?;
        self.objects().by_key.remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rewriting_the_same_bytes_still_moves_the_version() {
        let store = MemoryStore::new("aba");
        assert_eq!(store.url(), "memory://aba");
        let key = "refs/x/latest";
        let v1 = store
            .compare_and_swap(key, None, Bytes::from_static(b"same"))
            .await
            .unwrap();
        store.put(key, Bytes::from_static(b"same")).await.unwrap();
        // A writer still holding v1 must lose even though the bytes are unchanged: someone
        // wrote in between.
        let err = store
            .compare_and_swap(key, Some(&v1), Bytes::from_static(b"mine"))
            .await
            .unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Conflict, "{err}");
        let (data, v2) = store.get_versioned(key).await.unwrap().unwrap();
        assert_eq!(&data[..], b"same");
        assert_ne!(v1, v2);
    }

    #[tokio::test]
    async fn odd_ranges_read_nothing() {
        let store = MemoryStore::new("ranges");
        store
            .put("chunks/aa/x", Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        #[allow(clippy::reversed_empty_ranges)]
        let inverted = 5..2;
        for range in [inverted, 10..20, 50..60, 3..3] {
            let got = store.get_range("chunks/aa/x", range.clone()).await.unwrap();
            assert!(got.is_empty(), "{range:?}: {got:?}");
        }
        assert_eq!(
            &store.get_range("chunks/aa/x", 8..100).await.unwrap()[..],
            b"89"
        );
        assert_eq!(store.len(), 1);
        store.delete("chunks/aa/x").await.unwrap();
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn list_stops_at_the_prefix() {
        let store = MemoryStore::new("list");
        for key in ["a/1", "a/2", "a0", "b/1", "a"] {
            store.put(key, Bytes::new()).await.unwrap();
        }
        assert_eq!(store.list("a/").await.unwrap(), vec!["a/1", "a/2"]);
        assert_eq!(
            store.list("a").await.unwrap(),
            vec!["a", "a/1", "a/2", "a0"]
        );
        assert_eq!(store.list("").await.unwrap().len(), 5);
        assert!(store.list("c").await.unwrap().is_empty());
    }
}
