use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use cache::{CacheConfig, CacheDirLock, ChunkCache};
use clap::Args;
use strata_daemon::{Client, ClientError, MountInfo, MountSpec};
use strata_fs::mount::{StackSpec, UpperSpec};

/// A foreground mount's scratch, removed when the process is done with it.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            tracing::warn!("removing scratch {}: {e}", self.0.display());
        }
    }
}

use crate::units::{parse_duration, parse_size};
use crate::GlobalArgs;

#[derive(Args)]
pub struct MountArgs {
    /// Store URL.
    store: String,
    /// Empty directory to mount at.
    mountpoint: PathBuf,
    /// Dataset to mount, NAME:TAG or NAME@blake3:…; repeat to stack layers (the last is on top).
    #[arg(long = "layer", required_unless_present = "volume")]
    layers: Vec<String>,
    /// Serve the mount from this process (no daemon) until it is unmounted or signalled.
    #[arg(long)]
    foreground: bool,
    /// No writable upper: every change answers EROFS.
    #[arg(long, conflicts_with_all = ["scratch", "scratch_size", "volume"])]
    read_only: bool,
    /// A persistent volume SCOPE/NAME: its committed state is stacked on the layers, and the
    /// mount's changes are committed to it when the mount ends (through the daemon).
    #[arg(long, conflicts_with = "foreground")]
    volume: Option<String>,
    /// A private writable upper on local disk, removed when the mount ends (the default).
    #[arg(long)]
    scratch: bool,
    /// Cap on the bytes the scratch upper takes on disk; writes past it answer ENOSPC.
    #[arg(long, value_parser = parse_size)]
    scratch_size: Option<u64>,
    /// Cap on the inodes (files, directories, symlinks...) the upper makes, volumes too;
    /// past it, making one answers ENOSPC [default: 2000000].
    #[arg(long)]
    scratch_inodes: Option<u64>,
    /// With --foreground: where the scratch upper lives [default: /var/lib/strata as root,
    /// else ~/.local/state/strata].
    #[arg(long, env = "STRATA_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Print the mount's details as JSON (daemon mounts).
    #[arg(long)]
    json: bool,
    /// With --foreground: chunk and manifest cache directory [default: /var/cache/strata as
    /// root, else ~/.cache/strata].
    #[arg(long, env = "STRATA_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// With --foreground: hard cap on the chunk bytes kept under --cache-dir.
    #[arg(long, env = "STRATA_CACHE_SIZE", default_value = "10G", value_parser = parse_size)]
    cache_size: u64,
    /// With --foreground: cap on hot chunks kept in memory.
    #[arg(long, env = "STRATA_MEMORY_CACHE_SIZE", default_value = "256M", value_parser = parse_size)]
    memory_cache_size: u64,
    /// With --foreground: how long a read waits for an unreachable store (retrying with
    /// backoff) before it fails with EIO.
    #[arg(long, env = "STRATA_READ_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    read_timeout: std::time::Duration,
    /// With --foreground: never hand opens of fully cached files to the kernel (FUSE
    /// passthrough).
    #[arg(long, env = "STRATA_NO_PASSTHROUGH", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    no_passthrough: bool,
    /// Do not record what this mount's function reads first into the layers' start records.
    #[arg(long)]
    no_prefetch_record: bool,
    /// Do not fetch what the layers' start records say starts read first.
    #[arg(long)]
    no_prefetch_replay: bool,
    /// Mount on behalf of tenant NAME of the daemon's config: with the tenant's own store
    /// credential, and only datasets and volumes it is granted.
    #[arg(long, value_name = "NAME")]
    tenant: Option<String>,
}

#[derive(Args)]
pub struct UnmountArgs {
    mountpoint: PathBuf,
    /// Detach even if files are still open there.
    #[arg(long)]
    lazy: bool,
}

pub async fn run(g: &GlobalArgs, a: MountArgs) -> anyhow::Result<()> {
    strata_fuse::check_mountpoint(&a.mountpoint)?;
    let mountpoint =
        strata_fuse::resolve_mountpoint(&a.mountpoint).context("resolving the mountpoint")?;
    if !a.foreground {
        return mount_through_daemon(g, a, mountpoint).await;
    }
    if a.tenant.is_some() {
        anyhow::bail!("--tenant mounts through the daemon, whose config holds the tenants' credentials: drop --foreground");
    }
    let cache_dir = a.cache_dir.clone().unwrap_or_else(crate::default_cache_dir);
    let _lock = CacheDirLock::acquire(&cache_dir)?;
    let store = super::open_store(g, &a.store).await?;
    let reader = ChunkCache::new(&CacheConfig {
        disk_dir: Some(cache_dir.clone()),
        disk_capacity: a.cache_size,
        memory_capacity: a.memory_cache_size,
        fetch_deadline: a.read_timeout,
    })
    .with_context(|| format!("opening cache dir {}", cache_dir.display()))?
    .reader(store.clone());
    let spec = StackSpec {
        datasets: a.layers.clone(),
        cache_dir: Some(cache_dir.clone()),
        record_start: !a.no_prefetch_record,
        trust: g.trust()?,
        ..Default::default()
    };
    let assembly = strata_fs::mount::assemble(&store, reader, &spec).await?;
    // The scratch of a foreground mount is this process's own, removed when it ends.
    let scratch = if a.read_only {
        None
    } else {
        let state_dir = a.state_dir.clone().unwrap_or_else(crate::default_state_dir);
        let dir = state_dir
            .join("scratch")
            .join(format!("foreground-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        Some(ScratchDir(dir))
    };
    let upper = scratch.as_ref().map(|s| UpperSpec {
        dir: s.0.clone(),
        quota: a.scratch_size,
        inodes: a.scratch_inodes,
    });
    let tree = assembly.tree(upper.as_ref())?;
    let session = strata_fuse::mount(
        tree,
        &mountpoint,
        strata_fuse::MountpointOwner::Any,
        tokio::runtime::Handle::current(),
        !a.no_passthrough,
        Default::default(),
    )?;
    let starts = assembly.start_prefetch(&store, &store, !a.no_prefetch_replay);
    tracing::info!(
        "mounted {} at {}",
        a.layers.join(" + "),
        mountpoint.display()
    );
    eprintln!(
        "strata: mounted at {} (Ctrl-C or `strata unmount {}` to stop)",
        mountpoint.display(),
        mountpoint.display()
    );

    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(session.wait());
    });
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::pin!(done_rx);
    let ended = tokio::select! {
        result = &mut done_rx => Some(result),
        _ = sigterm.recv() => None,
        _ = sigint.recv() => None,
    };
    let result = match ended {
        Some(result) => result.unwrap_or(Ok(())).context("FUSE session failed"),
        None => {
            // Signalled: unmount; if something still has files open, detach so we can exit.
            if let Err(e) = strata_fuse::unmount(&mountpoint, false) {
                tracing::warn!("{e}; detaching the mount instead");
                strata_fuse::unmount(&mountpoint, true)?;
            }
            match tokio::time::timeout(Duration::from_secs(5), done_rx).await {
                Ok(Ok(result)) => result.context("FUSE session failed"),
                _ => {
                    tracing::warn!("FUSE session did not end within 5s of unmount; exiting anyway");
                    Ok(())
                }
            }
        }
    };
    // The start record is saved before the process goes.
    starts.mount_ended();
    if tokio::time::timeout(Duration::from_secs(5), starts.saved())
        .await
        .is_err()
    {
        tracing::warn!("saving the start record took over 5s; left unsaved");
    }
    result
}

async fn mount_through_daemon(
    g: &GlobalArgs,
    a: MountArgs,
    mountpoint: PathBuf,
) -> anyhow::Result<()> {
    let spec = MountSpec {
        store: a.store,
        endpoint_url: g.endpoint_url.clone(),
        layers: a.layers,
        mountpoint,
        read_only: a.read_only,
        scratch_size: a.scratch_size,
        scratch_inodes: a.scratch_inodes,
        volume: a.volume,
        unmount_with_client: false,
        no_prefetch_record: a.no_prefetch_record,
        no_prefetch_replay: a.no_prefetch_replay,
        trusted_keys: g.trusted_key_texts()?,
        tenant: a.tenant,
    };
    let info = Client::new(g.socket()).mount(spec).await?;
    if a.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        let layers: Vec<&str> = info.layers.iter().map(|l| l.dataset.as_str()).collect();
        let what = match (&info.volume, layers.is_empty()) {
            (Some(v), true) => format!("volume {v} (no commits yet)"),
            _ => layers.join(" + "),
        };
        println!("mounted {what} at {}", info.mountpoint.display());
    }
    Ok(())
}

/// Unmounts through the daemon when it holds the mount (so it forgets it at once), else
/// directly (foreground mounts, or mounts of a daemon that is gone).
pub async fn unmount(g: &GlobalArgs, a: UnmountArgs) -> anyhow::Result<()> {
    let mountpoint = strata_fuse::resolve_mountpoint(&a.mountpoint)
        .with_context(|| format!("resolving {}", a.mountpoint.display()))?;
    let socket = g.socket();
    // The daemon's own mounts go through it, so it forgets them at once; anything else (a
    // foreground mount, a mount of a daemon that is gone) is unmounted here.
    let client = Client::new(&socket);
    let daemon_mounts: Vec<MountInfo> = match client.mounts().await {
        Ok(list) => list,
        // Only when no daemon answers: one that answers (a version mismatch, say) may hold
        // a volume mount, whose unmount must wait for its commit.
        Err(e @ ClientError::Unreachable { .. }) => {
            tracing::debug!("{e}; unmounting directly");
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    if daemon_mounts.iter().any(|m| m.mountpoint == mountpoint) {
        let info = client.unmount(&mountpoint, a.lazy).await?;
        if let Some(problem) = info.commit_error {
            bail!("unmounted, but {problem}");
        }
        return Ok(());
    }
    strata_fuse::unmount(&mountpoint, a.lazy)?;
    Ok(())
}

#[derive(Args)]
pub struct CommitArgs {
    /// A mount made with --volume.
    mountpoint: PathBuf,
    /// Print what was committed as JSON.
    #[arg(long)]
    json: bool,
}

/// Commits a volume mount's changes so far, through the daemon; the mount goes on.
pub async fn commit(g: &GlobalArgs, a: CommitArgs) -> anyhow::Result<()> {
    let mountpoint = strata_fuse::resolve_mountpoint(&a.mountpoint)
        .with_context(|| format!("resolving {}", a.mountpoint.display()))?;
    let reply = Client::new(g.socket()).commit(&mountpoint).await?;
    if a.json {
        println!("{}", serde_json::to_string(&reply)?);
    }
    if let Some(conflict) = &reply.conflict {
        bail!("{conflict}");
    }
    if !a.json {
        match &reply.layer {
            Some(layer) => println!(
                "committed volume {}: layer {layer}, {} changes, {} bytes uploaded",
                reply.volume, reply.changes, reply.bytes_uploaded
            ),
            None => println!("volume {}: nothing new to commit", reply.volume),
        }
    }
    Ok(())
}
