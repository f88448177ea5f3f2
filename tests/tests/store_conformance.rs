//! The same `Store` cases against every backend: the local directory, Garage, and moto_server
//! (which, unlike Garage, enforces conditional writes).

use std::sync::Arc;

use bytes::Bytes;
use cache::{open_store, Store, StoreErrorKind, StoreOptions, Version};
use strata_tests::{garage, moto};

async fn basic_objects(store: &Arc<dyn Store>) {
    let key = "chunks/ab/object";
    assert!(store.head(key).await.unwrap().is_none());
    let err = store.get(key).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::NotFound, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(store.url()) && msg.contains(key),
        "error names store and key: {msg}"
    );

    let data = Bytes::from((0..10_000u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
    store.put(key, data.clone()).await.unwrap();
    assert_eq!(store.get(key).await.unwrap(), data);
    assert_eq!(store.head(key).await.unwrap(), Some(10_000));
    assert_eq!(
        store.get_range(key, 100..200).await.unwrap(),
        data.slice(100..200)
    );
    assert_eq!(
        store.get_range(key, 9_990..20_000).await.unwrap(),
        data.slice(9_990..)
    );
    // Overwrite is atomic and complete.
    store.put(key, Bytes::from_static(b"v2")).await.unwrap();
    assert_eq!(store.get(key).await.unwrap(), Bytes::from_static(b"v2"));

    store
        .put("chunks/cd/other", Bytes::from_static(b"x"))
        .await
        .unwrap();
    store
        .put("layers/one", Bytes::from_static(b"y"))
        .await
        .unwrap();
    assert_eq!(
        store.list("chunks/").await.unwrap(),
        vec!["chunks/ab/object", "chunks/cd/other"]
    );
    assert_eq!(
        store.list("chunks/c").await.unwrap(),
        vec!["chunks/cd/other"]
    );
    assert!(store.list("nothing/").await.unwrap().is_empty());

    store.delete(key).await.unwrap();
    store.delete(key).await.unwrap(); // deleting a missing key is fine
    assert!(store.head(key).await.unwrap().is_none());

    for bad in ["../escape", "/abs", "a//b", "a/./b", ""] {
        let err = store.put(bad, Bytes::from_static(b"x")).await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Invalid, "key {bad:?}: {err}");
    }
}

/// Compare-and-swap on a store that enforces it.
async fn enforced_cas(store: &Arc<dyn Store>) {
    let key = "refs/data/latest";
    assert!(store.get_versioned(key).await.unwrap().is_none());
    let v1 = store
        .compare_and_swap(key, None, Bytes::from_static(b"one"))
        .await
        .unwrap();
    let err = store
        .compare_and_swap(key, None, Bytes::from_static(b"again"))
        .await
        .unwrap_err();
    assert_eq!(
        err.kind,
        StoreErrorKind::Conflict,
        "create over existing: {err}"
    );
    let (data, v) = store.get_versioned(key).await.unwrap().unwrap();
    assert_eq!((data.as_ref(), &v), (&b"one"[..], &v1));
    replace_and_stale_writer_loses(store, key, &v1).await;
}

/// Moves `key` from version `v1` to "two"; a second writer still holding `v1` then loses, and
/// nothing it wrote lands.
async fn replace_and_stale_writer_loses(store: &Arc<dyn Store>, key: &str, v1: &Version) {
    let v2 = store
        .compare_and_swap(key, Some(v1), Bytes::from_static(b"two"))
        .await
        .unwrap();
    let err = store
        .compare_and_swap(key, Some(v1), Bytes::from_static(b"stale"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Conflict, "stale version: {err}");
    let (data, v) = store.get_versioned(key).await.unwrap().unwrap();
    assert_eq!((data.as_ref(), v), (&b"two"[..], v2));
}

/// Many concurrent increments through CAS: none may be lost.
async fn cas_counter_loses_nothing(store: &Arc<dyn Store>) {
    let key = "refs/counter/latest";
    store
        .compare_and_swap(key, None, Bytes::from_static(b"0"))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    loop {
                        let (data, v) = store.get_versioned(key).await.unwrap().unwrap();
                        let n: u64 = std::str::from_utf8(&data).unwrap().parse().unwrap();
                        let next = Bytes::from((n + 1).to_string());
                        match store.compare_and_swap(key, Some(&v), next).await {
                            Ok(_) => break,
                            Err(e) if e.kind == StoreErrorKind::Conflict => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let (data, _) = store.get_versioned(key).await.unwrap().unwrap();
    assert_eq!(&data[..], b"40");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_store_conformance() {
    let dir = strata_tests::scratch_dir("local-store");
    let url = format!("file://{}", dir.display());
    let store = open_store(&url, &StoreOptions::default()).await.unwrap();
    basic_objects(&store).await;
    enforced_cas(&store).await;
    cas_counter_loses_nothing(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moto_store_conformance() {
    let url = moto::bucket("conformance");
    let store = open_store(
        &url,
        &strata_tests::store_options(&moto::shared().env(), false),
    )
    .await
    .unwrap();
    basic_objects(&store).await;
    enforced_cas(&store).await;
    cas_counter_loses_nothing(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garage_store_conformance() {
    let url = garage::bucket("conformance");
    let store = open_store(
        &url,
        &strata_tests::store_options(&garage::shared().env(), false),
    )
    .await
    .unwrap();
    basic_objects(&store).await;
    // Garage ignores If-Match: strata must notice and refuse to move an existing ref.
    let key = "refs/data/latest";
    let v1 = store
        .compare_and_swap(key, None, Bytes::from_static(b"one"))
        .await
        .unwrap();
    let err = store
        .compare_and_swap(key, None, Bytes::from_static(b"again"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Conflict, "{err}");
    let err = store
        .compare_and_swap(key, Some(&v1), Bytes::from_static(b"two"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Unsupported, "{err}");
    assert!(
        err.to_string().contains("--single-writer"),
        "says how to proceed: {err}"
    );
    assert_eq!(&store.get(key).await.unwrap()[..], b"one", "nothing moved");

    // With the user's single-writer promise, refs move (and stale versions still lose).
    let store = open_store(
        &url,
        &strata_tests::store_options(&garage::shared().env(), true),
    )
    .await
    .unwrap();
    replace_and_stale_writer_loses(&store, key, &v1).await;
}

#[tokio::test]
async fn unreachable_store_is_a_clear_error() {
    let port = strata_tests::free_port(); // nothing listens here
    let options = StoreOptions {
        endpoint_url: Some(format!("http://127.0.0.1:{port}")),
        credentials: Some(("k".into(), "s".into())),
        ..Default::default()
    };
    let store = open_store("s3://nowhere", &options).await.unwrap();
    let started = std::time::Instant::now();
    let err = store.get("refs/x/latest").await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Io);
    assert!(
        err.to_string().contains("s3://nowhere") && err.to_string().contains("refs/x/latest"),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "bounded retries"
    );
}

#[tokio::test]
async fn bad_store_urls_are_rejected() {
    for bad in ["s3://", "ftp://host/x", ""] {
        let err = open_store(bad, &StoreOptions::default()).await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Invalid, "{bad:?}: {err}");
    }
}
