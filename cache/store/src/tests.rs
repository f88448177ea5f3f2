//! The conformance suite on every store this crate can run without a server, and on the
//! wrappers (which must be transparent when no fault is asked for).

use std::sync::Arc;
use std::time::Duration;

use crate::conformance::run_all;
use crate::local::LocalStore;
use crate::{CountingStore, FaultConfig, FaultyStore, MemoryStore, Store};

fn memory(name: &str) -> Arc<dyn Store> {
    Arc::new(MemoryStore::new(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conformance() {
    run_all(&memory("conformance"), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conformance_without_enforced_cas() {
    // The reduced suite is a subset: a store that enforces CAS passes it too.
    run_all(&memory("conformance"), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_store_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(LocalStore::open(&format!("file://{path}"), path).unwrap());
    run_all(&store, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counting_store_conformance() {
    let counting = Arc::new(CountingStore::new(memory("counted")));
    let store: Arc<dyn Store> = counting.clone();
    run_all(&store, true).await;
    assert!(counting.snapshot().requests() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_store_without_faults_is_transparent() {
    let faulty = Arc::new(FaultyStore::new(memory("faulty"), FaultConfig::default()));
    let store: Arc<dyn Store> = faulty.clone();
    run_all(&store, true).await;
    assert_eq!(faulty.counts().total(), 0, "{:?}", faulty.counts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_store_with_latency_only_still_conforms() {
    // Delays change timing, never results.
    let config = FaultConfig {
        seed: 7,
        latency: 0.5,
        max_latency: Duration::from_millis(1),
        ..FaultConfig::default()
    };
    let faulty = Arc::new(FaultyStore::new(memory("slow"), config));
    let store: Arc<dyn Store> = faulty.clone();
    run_all(&store, true).await;
    let counts = faulty.counts();
    assert!(counts.delays > 0, "{counts:?}");
    assert_eq!(counts.total(), counts.delays, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stacked_wrappers_over_local_store_conform() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let local: Arc<dyn Store> =
        Arc::new(LocalStore::open(&format!("file://{path}"), path).unwrap());
    let faulty: Arc<dyn Store> = Arc::new(FaultyStore::new(local, FaultConfig::default()));
    let store: Arc<dyn Store> = Arc::new(CountingStore::new(faulty));
    run_all(&store, true).await;
}
