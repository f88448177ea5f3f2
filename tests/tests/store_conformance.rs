//! The same `Store` cases (`strata_store::conformance`, also run by the cache crate's unit
//! tests on the memory store and the wrappers) against every backend: the local directory,
//! Garage, and moto_server (which, unlike Garage, enforces conditional writes).

use bytes::Bytes;
use strata_store::conformance::{
    basic_objects, cas_counter_loses_nothing, enforced_cas, replace_and_stale_writer_loses, run_all,
};
use strata_store::{open_store, StoreErrorKind, StoreOptions};
use strata_tests::{garage, moto};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_store_conformance() {
    let dir = strata_tests::scratch_dir("local-store");
    let url = format!("file://{}", dir.display());
    let store = open_store(&url, &StoreOptions::default()).await.unwrap();
    run_all(&store, true).await;
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
