//! The [`Store`] conformance suite: the behaviour every backend and every wrapper must share,
//! as plain async functions so that unit tests (memory, local, wrappers) and integration tests
//! (moto_server, Garage) run the very same cases.
//!
//! This is test support: the cases panic with a message naming the case, the store and the
//! key when the store misbehaves. They need a Tokio runtime (the counter case spawns tasks)
//! and an empty store: they write fixed keys under `chunks/`, `layers/` and `refs/`.
//!
//! To check a new backend or wrapper, open it empty and call [`run_all`]:
//!
//! ```ignore
//! let store: Arc<dyn Store> = Arc::new(MyStore::new(...));
//! cache::store::conformance::run_all(&store, true).await;
//! ```
//!
//! A store that cannot enforce compare-and-swap on existing objects (Garage) passes
//! `cas_enforced: false` and runs its own checks for what it does instead.

use std::sync::Arc;

use bytes::Bytes;

use crate::{Store, StoreErrorKind, StoreResult, Version};

/// Unwraps a store result, panicking with the store's own message (which names store, operation
/// and key) and what the case was doing.
#[track_caller]
fn ok<T>(result: StoreResult<T>, doing: &str) -> T {
    result.unwrap_or_else(|e| panic!("{doing}: unexpected error: {e}"))
}

/// Expects a store error of `kind`.
#[track_caller]
fn fails<T: std::fmt::Debug>(result: StoreResult<T>, kind: StoreErrorKind, doing: &str) {
    match result {
        Ok(v) => panic!("{doing}: expected a {kind:?} error, got Ok({v:?})"),
        Err(e) => assert_eq!(e.kind, kind, "{doing}: wrong error kind: {e}"),
    }
}

/// Every case, on an empty store. With `cas_enforced`, also replacing refs by compare-and-swap
/// and concurrent increments; without, only creating refs (which every store must refuse to do
/// twice).
pub async fn run_all(store: &Arc<dyn Store>, cas_enforced: bool) {
    let existing = ok(store.list("").await, "listing the store before the suite");
    assert!(
        existing.is_empty(),
        "{}: the conformance suite needs an empty store, found {existing:?}",
        store.url()
    );
    basic_objects(store).await;
    missing_objects(store).await;
    invalid_keys(store).await;
    if cas_enforced {
        enforced_cas(store).await;
        cas_counter_loses_nothing(store).await;
    } else {
        create_only_cas(store, "refs/create-only/latest").await;
    }
}

/// Put, get, ranged get, head, overwrite, list by prefix, delete.
pub async fn basic_objects(store: &Arc<dyn Store>) {
    let key = "chunks/ab/object";
    assert!(
        ok(store.head(key).await, "head before put").is_none(),
        "{}: head {key:?} before any put",
        store.url()
    );
    let err = match store.get(key).await {
        Ok(data) => panic!(
            "get before put: expected NotFound, got {} bytes",
            data.len()
        ),
        Err(e) => e,
    };
    assert_eq!(err.kind, StoreErrorKind::NotFound, "get before put: {err}");
    let msg = err.to_string();
    assert!(
        msg.contains(store.url()) && msg.contains(key),
        "error names store and key: {msg}"
    );

    let data = Bytes::from((0..10_000u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
    ok(store.put(key, data.clone()).await, "put");
    assert_eq!(ok(store.get(key).await, "get"), data, "get returns the put");
    assert_eq!(ok(store.head(key).await, "head"), Some(10_000), "head size");
    assert_eq!(
        ok(store.get_range(key, 100..200).await, "get_range"),
        data.slice(100..200),
        "get_range inside the object"
    );
    assert_eq!(
        ok(store.get_range(key, 9_990..20_000).await, "get_range"),
        data.slice(9_990..),
        "get_range is clipped at the end"
    );
    // A larger object, which a network store hands over in several pieces: joined, they are
    // the range, with no byte lost, repeated or reordered.
    let large_key = "chunks/ab/large";
    let large = Bytes::from(
        (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    );
    ok(store.put(large_key, large.clone()).await, "put");
    for range in [
        0..3_000_000u64,
        17..2_999_990,
        1_000_000..1_000_001,
        2_500_000..4_000_000,
    ] {
        let pieces = ok(
            store.get_range_pieces(large_key, range.clone()).await,
            "get_range_pieces",
        );
        let joined: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        let end = (range.end as usize).min(large.len());
        assert!(
            joined[..] == large[range.start as usize..end],
            "get_range_pieces {range:?}: {} bytes in {} pieces",
            joined.len(),
            pieces.len()
        );
    }
    ok(store.delete(large_key).await, "delete");
    // Overwrite is atomic and complete.
    ok(store.put(key, Bytes::from_static(b"v2")).await, "overwrite");
    assert_eq!(
        ok(store.get(key).await, "get after overwrite"),
        Bytes::from_static(b"v2"),
        "overwrite replaces the whole object"
    );

    ok(
        store.put("chunks/cd/other", Bytes::from_static(b"x")).await,
        "put",
    );
    ok(
        store.put("layers/one", Bytes::from_static(b"y")).await,
        "put",
    );
    assert_eq!(
        ok(store.list("chunks/").await, "list"),
        vec!["chunks/ab/object", "chunks/cd/other"],
        "list by directory prefix, sorted"
    );
    assert_eq!(
        ok(store.list("chunks/c").await, "list"),
        vec!["chunks/cd/other"],
        "list by partial prefix"
    );
    assert!(
        ok(store.list("nothing/").await, "list").is_empty(),
        "list of an unused prefix"
    );
    // With sizes and times: what garbage collection's grace period is measured against. S3
    // gives times to the second; the server's clock is this host's here.
    let infos = ok(store.list_info("chunks/").await, "list_info");
    assert_eq!(
        infos
            .iter()
            .map(|i| (i.key.as_str(), i.size))
            .collect::<Vec<_>>(),
        vec![("chunks/ab/object", 2), ("chunks/cd/other", 1)],
        "list_info: the keys list gives, sorted, with their sizes"
    );
    let now = std::time::SystemTime::now();
    let minutes = std::time::Duration::from_secs(120);
    for info in &infos {
        assert!(
            info.modified + minutes > now && info.modified < now + minutes,
            "{}: {} written {:?}, listed at {now:?}",
            store.url(),
            info.key,
            info.modified
        );
    }
    assert!(ok(store.list_info("nothing/").await, "list_info").is_empty());

    ok(store.delete(key).await, "delete");
    ok(store.delete(key).await, "deleting a missing key is fine");
    assert!(
        ok(store.head(key).await, "head after delete").is_none(),
        "head after delete"
    );

    for bad in ["../escape", "/abs", "a//b", "a/./b", ""] {
        fails(
            store.put(bad, Bytes::from_static(b"x")).await,
            StoreErrorKind::Invalid,
            &format!("put to invalid key {bad:?}"),
        );
    }
}

/// Reads of a key that never existed: `NotFound` for bodies, `None` where the API says so.
pub async fn missing_objects(store: &Arc<dyn Store>) {
    let key = "chunks/ef/missing";
    let err = match store.get_range(key, 0..10).await {
        Ok(data) => panic!("get_range of a missing key: got {} bytes", data.len()),
        Err(e) => e,
    };
    assert_eq!(
        err.kind,
        StoreErrorKind::NotFound,
        "get_range missing: {err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(store.url()) && msg.contains(key),
        "error names store and key: {msg}"
    );
    assert!(
        ok(store.get_versioned(key).await, "get_versioned missing").is_none(),
        "get_versioned of a missing key is None"
    );
    assert!(
        ok(store.head(key).await, "head missing").is_none(),
        "head of a missing key is None"
    );
    ok(store.delete(key).await, "deleting a key that never existed");
}

/// Every keyed operation refuses keys that could escape a directory or confuse S3.
pub async fn invalid_keys(store: &Arc<dyn Store>) {
    for bad in ["../escape", "/abs", "a//b", "a/./b", "a/", ""] {
        let doing = |op: &str| format!("{op} of invalid key {bad:?}");
        let invalid = StoreErrorKind::Invalid;
        fails(store.get(bad).await, invalid, &doing("get"));
        fails(
            store.get_range(bad, 0..1).await,
            invalid,
            &doing("get_range"),
        );
        fails(store.head(bad).await, invalid, &doing("head"));
        fails(
            store.get_versioned(bad).await,
            invalid,
            &doing("get_versioned"),
        );
        fails(
            store
                .compare_and_swap(bad, None, Bytes::from_static(b"x"))
                .await,
            invalid,
            &doing("compare_and_swap"),
        );
        fails(store.delete(bad).await, invalid, &doing("delete"));
    }
}

/// Creating `key` by compare-and-swap from nothing works once; a second create conflicts and
/// changes nothing. Returns the version written.
pub async fn create_only_cas(store: &Arc<dyn Store>, key: &str) -> Version {
    assert!(
        ok(
            store.get_versioned(key).await,
            "get_versioned before create"
        )
        .is_none(),
        "{}: {key:?} must not exist yet",
        store.url()
    );
    let v1 = ok(
        store
            .compare_and_swap(key, None, Bytes::from_static(b"one"))
            .await,
        "create by compare-and-swap",
    );
    fails(
        store
            .compare_and_swap(key, None, Bytes::from_static(b"again"))
            .await,
        StoreErrorKind::Conflict,
        "create over existing",
    );
    let (data, v) = ok(store.get_versioned(key).await, "get_versioned after create")
        .unwrap_or_else(|| panic!("{}: {key:?} vanished after create", store.url()));
    assert_eq!(
        (data.as_ref(), &v),
        (&b"one"[..], &v1),
        "the first create stands, at the version it returned"
    );
    v1
}

/// Compare-and-swap on a store that enforces it.
pub async fn enforced_cas(store: &Arc<dyn Store>) {
    let key = "refs/data/latest";
    let v1 = create_only_cas(store, key).await;
    replace_and_stale_writer_loses(store, key, &v1).await;
}

/// Moves `key` from version `v1` to "two"; a second writer still holding `v1` then loses, and
/// nothing it wrote lands.
pub async fn replace_and_stale_writer_loses(store: &Arc<dyn Store>, key: &str, v1: &Version) {
    let v2 = ok(
        store
            .compare_and_swap(key, Some(v1), Bytes::from_static(b"two"))
            .await,
        "replace at the current version",
    );
    fails(
        store
            .compare_and_swap(key, Some(v1), Bytes::from_static(b"stale"))
            .await,
        StoreErrorKind::Conflict,
        "replace at a stale version",
    );
    let (data, v) = ok(
        store.get_versioned(key).await,
        "get_versioned after replace",
    )
    .unwrap_or_else(|| panic!("{}: {key:?} vanished after replace", store.url()));
    assert_eq!(
        (data.as_ref(), v),
        (&b"two"[..], v2),
        "the replace stands and the stale writer left nothing"
    );
}

/// Many concurrent increments through compare-and-swap: none may be lost.
pub async fn cas_counter_loses_nothing(store: &Arc<dyn Store>) {
    const TASKS: u64 = 8;
    const INCREMENTS: u64 = 5;
    let key = "refs/counter/latest";
    ok(
        store
            .compare_and_swap(key, None, Bytes::from_static(b"0"))
            .await,
        "create the counter",
    );
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..INCREMENTS {
                    loop {
                        let (data, v) = ok(store.get_versioned(key).await, "read the counter")
                            .unwrap_or_else(|| panic!("{}: the counter vanished", store.url()));
                        let n: u64 = std::str::from_utf8(&data)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or_else(|| panic!("counter holds {data:?}, not a number"));
                        let next = Bytes::from((n + 1).to_string());
                        match store.compare_and_swap(key, Some(&v), next).await {
                            Ok(_) => break,
                            Err(e) if e.kind == StoreErrorKind::Conflict => continue,
                            Err(e) => panic!("incrementing the counter: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        if let Err(e) = t.await {
            panic!("a counter task failed: {e}");
        }
    }
    let (data, _) = ok(store.get_versioned(key).await, "read the final counter")
        .unwrap_or_else(|| panic!("{}: the counter vanished", store.url()));
    assert_eq!(
        std::str::from_utf8(&data).ok(),
        Some((TASKS * INCREMENTS).to_string().as_str()),
        "every increment landed exactly once"
    );
}
