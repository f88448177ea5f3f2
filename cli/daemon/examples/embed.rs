//! Embedding the strata daemon in a program of your own (a platform's worker agent, say):
//! publish a directory to a local-directory store, start a daemon in process, mount the layer
//! with a scratch upper, read and write through FUSE, match on a typed error, unmount.
//!
//! Needs root (FUSE mounts) and fuse3:
//!
//!   sudo cargo run -p strata-daemon --example embed
//!
//! It exits non-zero if anything it checks is not as expected, so CI runs it.

use std::path::PathBuf;

use strata_daemon::{Daemon, DaemonConfig, ErrorKind, MountSpec};
use strata_fs::refs::DatasetRef;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let work = tempfile::tempdir()?;
    let at = |name: &str| -> PathBuf { work.path().join(name) };

    // A dataset, published as `models:v1` to a store in a local directory.
    let data = at("data");
    std::fs::create_dir_all(data.join("weights"))?;
    std::fs::write(data.join("weights/layer0.bin"), vec![7u8; 3 << 20])?;
    std::fs::write(data.join("README"), b"a small model\n")?;
    let store_url = format!("file://{}", at("store").display());
    let store = strata_store::open_store(&store_url, &Default::default()).await?;
    let dataset = DatasetRef::parse("models:v1")?;
    let report = strata_fs::publish::publish(
        &data,
        &store,
        Some(&dataset),
        &Default::default(),
        Default::default(),
    )
    .await?;
    println!(
        "published {dataset}: {} files, layer {}",
        report.files,
        report.layer.map(|d| d.to_string()).unwrap_or_default()
    );

    // The daemon, with its cache, state and socket in the work directory.
    let config = DaemonConfig::new(at("cache"), at("state"), at("daemon.sock"));
    let daemon = Daemon::start(config)?;

    let mountpoint = at("mnt");
    std::fs::create_dir(&mountpoint)?;
    let spec = MountSpec {
        store: store_url.clone(),
        endpoint_url: None,
        layers: vec!["models:v1".into()],
        mountpoint: mountpoint.clone(),
        read_only: false,
        scratch_size: Some(64 << 20),
        scratch_inodes: None,
        volume: None,
        unmount_with_client: false,
        no_prefetch_record: false,
        no_prefetch_replay: false,
        trusted_keys: Vec::new(),
        tenant: None,
    };
    let info = daemon.mount(spec.clone()).await?;
    println!(
        "mounted {} at {}",
        info.layers[0].dataset,
        info.mountpoint.display()
    );

    // Reads are blocking filesystem calls into our own FUSE mount: keep them off the runtime
    // threads that serve it.
    let mp = mountpoint.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let weights = std::fs::read(mp.join("weights/layer0.bin"))?;
        assert_eq!(weights, vec![7u8; 3 << 20], "the layer's bytes");
        assert_eq!(std::fs::read(mp.join("README"))?, b"a small model\n");
        // The scratch upper takes writes; the layer stays as published.
        std::fs::write(mp.join("README"), b"changed in the sandbox\n")?;
        assert_eq!(
            std::fs::read(mp.join("README"))?,
            b"changed in the sandbox\n"
        );
        Ok(())
    })
    .await??;
    println!("read 3 MiB and wrote to the scratch upper");

    // Errors carry a kind to match on.
    let again = daemon.mount(spec.clone()).await.unwrap_err();
    assert_eq!(again.kind, ErrorKind::Busy, "{again}");
    let missing_mp = at("mnt2");
    std::fs::create_dir(&missing_mp)?;
    let missing = MountSpec {
        layers: vec!["models:v2".into()],
        mountpoint: missing_mp,
        ..spec
    };
    let err = daemon.mount(missing).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    println!("a second mount is `busy`; a missing tag is `not_found`: {err}");

    let stats = daemon.stats();
    println!(
        "cache: {} chunks on disk, {} bytes",
        stats.total.disk_chunks, stats.total.disk_used
    );
    daemon.unmount(&mountpoint, false).await?;
    assert!(daemon.mounts().is_empty());
    daemon.shutdown().await;

    // Published bytes are untouched by the scratch write.
    assert_eq!(std::fs::read(data.join("README"))?, b"a small model\n");
    println!("unmounted; the scratch is gone and the layer is as published");
    Ok(())
}
