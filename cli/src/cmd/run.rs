//! `strata run`: one invocation of a command with its datasets and volume, in a sandbox.
//!
//! The daemon mounts the datasets (a scratch upper each) and the volume under a private run
//! directory beside its socket; the command runs in the sandbox of `strata-sandbox` with
//! those mounts at their paths; afterwards the daemon unmounts them (the scratch goes, the
//! volume commits) and the run directory is removed, whatever the command did.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use rustix::process::{Pid, Signal};

use crate::units::parse_size;
use crate::GlobalArgs;
use strata_daemon::{Client, ClientError, ErrorKind, MountInfo, MountSpec};
use strata_sandbox::{SandboxSpec, HELPER_ARG};

const DEFAULT_DATA: &str = "/data";
const DEFAULT_PERSIST: &str = "/persist";
/// Variables passed from the caller's environment unless `--env` says otherwise; nothing
/// else is (no AWS_*, no STRATA_*, no tokens).
const PASSED_ENV: &[&str] = &["LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TERM", "TZ"];
/// How long a signalled command has to exit before the sandbox is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a mount that is busy after its sandbox ended is asked again before it is detached.
const UNMOUNT_BUSY_WAIT: Duration = Duration::from_secs(3);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Args)]
pub struct RunArgs {
    /// Store URL.
    store: String,
    /// A dataset NAME:TAG (or NAME@blake3:…), mounted with a scratch upper at /data or at
    /// `:PATH`; datasets given the same path are stacked (the last on top).
    #[arg(long = "dataset", value_name = "NAME:TAG[:PATH]")]
    datasets: Vec<String>,
    /// A persistent volume, mounted at /persist or at `:PATH` and committed when CMD ends.
    #[arg(long, value_name = "SCOPE/NAME[:PATH]")]
    volume: Option<String>,
    /// Cap on the bytes each scratch upper (and the volume's upper) takes on disk.
    #[arg(long, value_parser = parse_size)]
    scratch_size: Option<u64>,
    /// Cap on the inodes each upper makes [default: 2000000].
    #[arg(long)]
    scratch_inodes: Option<u64>,
    /// CMD's working directory [default: /data, or / without a dataset].
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Run CMD as this user id (it can read the layers and write where their modes allow).
    #[arg(long, default_value_t = 0)]
    uid: u32,
    /// Run CMD with this group id (and no supplementary groups).
    #[arg(long, default_value_t = 0)]
    gid: u32,
    /// Set a variable in CMD's environment (KEY=VALUE), or pass KEY from this one. CMD gets
    /// only these, PATH, HOME=/tmp and the locale and terminal variables.
    #[arg(long = "env", value_name = "KEY[=VALUE]")]
    env: Vec<String>,
    /// Give CMD a network namespace of its own, with only a loopback interface (no way to
    /// reach the host's network, its metadata service or its local services).
    #[arg(long)]
    no_network: bool,
    /// Do not record what CMD reads first into the layers' start records.
    #[arg(long)]
    no_prefetch_record: bool,
    /// Do not fetch what the layers' start records say starts read first.
    #[arg(long)]
    no_prefetch_replay: bool,
    /// Mount on behalf of tenant NAME of the daemon's config: with the tenant's own store
    /// credential, and only datasets and volumes it is granted.
    #[arg(long, value_name = "NAME")]
    tenant: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Where one mount of the run goes.
struct Planned {
    path: PathBuf,
    layers: Vec<String>,
    volume: Option<String>,
}

fn sandbox_path(p: &str, what: &str) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(p);
    let normal = path.components().all(|c| {
        matches!(
            c,
            std::path::Component::RootDir | std::path::Component::Normal(_)
        )
    });
    if !path.is_absolute() || !normal || path == Path::new("/") {
        bail!("{what}: {p:?} must be an absolute path below / without . or ..");
    }
    Ok(path)
}

fn plan(a: &RunArgs) -> anyhow::Result<Vec<Planned>> {
    let mut by_path: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for d in &a.datasets {
        let (dataset, path) = match d.find(":/") {
            Some(i) => (&d[..i], &d[i + 1..]),
            None => (d.as_str(), DEFAULT_DATA),
        };
        strata_fs::refs::DatasetRef::parse(dataset).with_context(|| format!("--dataset {d:?}"))?;
        let path = sandbox_path(path, &format!("--dataset {d:?}"))?;
        by_path.entry(path).or_default().push(dataset.to_string());
    }
    let mut out: Vec<Planned> = by_path
        .into_iter()
        .map(|(path, layers)| Planned {
            path,
            layers,
            volume: None,
        })
        .collect();
    if let Some(v) = &a.volume {
        let (name, path) = v.split_once(':').unwrap_or((v, DEFAULT_PERSIST));
        strata_fs::volume::VolumeRef::parse(name).with_context(|| format!("--volume {v:?}"))?;
        let path = sandbox_path(path, &format!("--volume {v:?}"))?;
        out.push(Planned {
            path,
            layers: Vec::new(),
            volume: Some(name.to_string()),
        });
    }
    for x in &out {
        for y in &out {
            if !std::ptr::eq(x, y) && x.path.starts_with(&y.path) {
                bail!(
                    "mount paths must not overlap: {} is inside {}",
                    x.path.display(),
                    y.path.display()
                );
            }
        }
    }
    Ok(out)
}

fn sandbox_env(a: &RunArgs) -> anyhow::Result<Vec<(String, String)>> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert("HOME".into(), "/tmp".into());
    for k in PASSED_ENV {
        if let Ok(v) = std::env::var(k) {
            env.insert(k.to_string(), v);
        }
    }
    for e in &a.env {
        match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                env.insert(k.into(), v.into());
            }
            None if !e.is_empty() => {
                if let Ok(v) = std::env::var(e) {
                    env.insert(e.clone(), v);
                }
            }
            _ => bail!("--env {e:?}: expected KEY=VALUE or KEY"),
        }
    }
    Ok(env.into_iter().collect())
}

/// The run's private directory: its mountpoints and the sandbox's root. Beside the daemon's
/// socket (root-only), so no other user can reach the mounts through it.
fn make_run_dir(socket: &Path) -> anyhow::Result<PathBuf> {
    let base = socket
        .parent()
        .unwrap_or(Path::new("/run/strata"))
        .join("runs");
    let dir = base.join(format!(
        "{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating run dir {}", dir.display()))?;
    Ok(dir)
}

/// Runs CMD; returns its exit status (128 + N when a signal N ended it).
pub async fn run(g: &GlobalArgs, a: RunArgs) -> anyhow::Result<i32> {
    if !rustix::process::geteuid().is_root() {
        bail!("strata run needs root: it makes mount and PID namespaces");
    }
    let planned = plan(&a)?;
    let env = sandbox_env(&a)?;
    let workdir = match &a.workdir {
        Some(w) => {
            if !w.is_absolute() {
                bail!("--workdir {} must be absolute", w.display());
            }
            w.clone()
        }
        None if planned.iter().any(|p| p.path == Path::new(DEFAULT_DATA)) => DEFAULT_DATA.into(),
        None => PathBuf::from("/"),
    };
    let socket = g.socket();
    sweep_run_dirs(&socket);
    let run_dir = make_run_dir(&socket)?;
    let mut mounted: Vec<PathBuf> = Vec::new();
    let result = async {
        let mut binds = Vec::new();
        for (i, p) in planned.iter().enumerate() {
            let mountpoint = run_dir.join(format!("m{i}"));
            std::fs::create_dir(&mountpoint)
                .with_context(|| format!("creating {}", mountpoint.display()))?;
            let spec = MountSpec {
                store: a.store.clone(),
                endpoint_url: g.endpoint_url.clone(),
                layers: p.layers.clone(),
                mountpoint: mountpoint.clone(),
                read_only: false,
                scratch_size: a.scratch_size,
                scratch_inodes: a.scratch_inodes,
                volume: p.volume.clone(),
                unmount_with_client: true,
                no_prefetch_record: a.no_prefetch_record,
                no_prefetch_replay: a.no_prefetch_replay,
                trusted_keys: g.trusted_key_texts()?,
                tenant: a.tenant.clone(),
            };
            Client::new(&socket)
                .mount(spec)
                .await
                .with_context(|| format!("mounting {}", p.path.display()))?;
            mounted.push(mountpoint.clone());
            binds.push((mountpoint, p.path.clone()));
        }
        let root = run_dir.join("root");
        std::fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        let spec = SandboxSpec {
            root,
            binds,
            workdir,
            uid: a.uid,
            gid: a.gid,
            env,
            argv: a.command.clone(),
            network: !a.no_network,
            parent: std::process::id(),
        };
        run_sandbox(&spec).await
    }
    .await;
    // Teardown, whatever happened: scratch removed, volume committed, mounts gone.
    let mut teardown = Ok(());
    for mp in mounted.iter().rev() {
        match unmount_after_run(&socket, mp).await {
            // CMD's status stands; the volume's trouble is said, and its changes are kept.
            Ok(info) => {
                if let Some(problem) = info.commit_error {
                    eprintln!("strata run: {problem}");
                }
            }
            Err(e) => {
                tracing::error!("unmounting {}: {e}", mp.display());
                teardown = Err(e).with_context(|| format!("unmounting {}", mp.display()));
            }
        }
    }
    remove_run_dir(&run_dir);
    let code = result?;
    teardown?;
    Ok(code)
}

/// Unmounts one of the run's mounts once its sandbox is gone. Nothing of the run can hold
/// the mount any more, so a busy mountpoint is a passing holder on the host (a process
/// walking the tree, another sandbox still being set up): it is asked again for a while,
/// then detached, and the daemon ends the session (and commits a volume) once the holder
/// lets go.
async fn unmount_after_run(socket: &Path, mp: &Path) -> Result<MountInfo, ClientError> {
    let client = Client::new(socket);
    let deadline = tokio::time::Instant::now() + UNMOUNT_BUSY_WAIT;
    loop {
        match client.unmount(mp, false).await {
            Err(e) if e.kind() == ErrorKind::Busy => {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!("{} stays busy ({e}); detaching it", mp.display());
                    return client.unmount(mp, true).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Removes what runs killed outright left of their run dirs (the daemon unmounted their
/// mounts when they died): the empty directories of dirs whose `strata run` is gone.
fn sweep_run_dirs(socket: &Path) {
    let base = socket
        .parent()
        .unwrap_or(Path::new("/run/strata"))
        .join("runs");
    let Ok(entries) = std::fs::read_dir(&base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.split('-').next()?.parse::<u32>().ok());
        // A minute old at least: a run in another PID namespace looks gone from here, and
        // its directories must not vanish while it sets up.
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(60));
        if old && pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            remove_run_dir(&e.path());
        }
    }
}

/// Removes the run dir's empty directories, never recursing: a mountpoint that is somehow
/// still mounted must not have its files deleted (a volume would commit the deletions).
fn remove_run_dir(run_dir: &Path) {
    let entries = std::fs::read_dir(run_dir).map(|e| e.flatten().map(|e| e.path()).collect());
    for dir in entries.unwrap_or_else(|_| Vec::new()) {
        if let Err(e) = std::fs::remove_dir(&dir) {
            tracing::warn!("leaving {}: {e}", dir.display());
        }
    }
    if let Err(e) = std::fs::remove_dir(run_dir) {
        tracing::warn!("leaving run dir {}: {e}", run_dir.display());
    }
}

/// Starts the sandbox helper in new namespaces and waits for it; a signal to `strata run`
/// ends the sandbox (its processes die with the helper).
async fn run_sandbox(spec: &SandboxSpec) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("finding the strata binary")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg(HELPER_ARG)
        .arg(serde_json::to_string(spec)?)
        .env_clear()
        .kill_on_drop(true);
    let network = spec.network;
    // SAFETY: pre_exec: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are sound; it makes one unshare syscall (rustix's is the raw
    // syscall: no allocation, no lock) and builds its error from the errno alone.
    // The one hazard rustix documents for unshare, UnshareFlags::FILES (threads seeing
    // different descriptor tables), is not asked for; the child is single-threaded anyway.
    unsafe {
        cmd.pre_exec(move || {
            use rustix::thread::UnshareFlags;
            let mut flags = UnshareFlags::NEWNS
                | UnshareFlags::NEWPID
                | UnshareFlags::NEWIPC
                | UnshareFlags::NEWUTS;
            if !network {
                flags |= UnshareFlags::NEWNET;
            }
            rustix::thread::unshare_unsafe(flags)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the sandbox")?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut sigquit = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::quit())?;
    let status = tokio::select! {
        status = child.wait() => status.context("waiting for the sandbox")?,
        _ = sigterm.recv() => return stop(child, Signal::TERM).await,
        _ = sigint.recv() => return stop(child, Signal::INT).await,
        _ = sighup.recv() => return stop(child, Signal::HUP).await,
        _ = sigquit.recv() => return stop(child, Signal::QUIT).await,
    };
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        _ => 125,
    })
}

/// Passes `sig` on to the command (through the helper and the sandbox's init); after
/// [`STOP_GRACE`] the sandbox is killed.
async fn stop(mut child: tokio::process::Child, signal: Signal) -> anyhow::Result<i32> {
    let sig = signal.as_raw();
    tracing::warn!("signal {sig}: stopping the command");
    // Our own child, not reaped while `id()` still gives its pid (so it cannot be reused).
    if let Some(pid) = child.id().and_then(|pid| Pid::from_raw(pid as i32)) {
        let _ = rustix::process::kill_process(pid, signal);
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            let status = status.context("waiting for the sandbox")?;
            Ok(status.code().unwrap_or(128 + status.signal().unwrap_or(0)))
        }
        Err(_) => {
            let _ = child.kill().await;
            Ok(128 + sig)
        }
    }
}
