//! `strata daemon`: flags, environment and config file merged, then the host daemon runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;
use tokio::signal::unix::{signal, SignalKind};

use crate::units::{parse_duration, parse_size};
use crate::GlobalArgs;
use strata_daemon::{Daemon, DaemonConfig};

/// Flags win over the environment, which wins over the config file, which wins over defaults.
#[derive(Args)]
pub struct DaemonArgs {
    /// TOML file with any of: cache_dir, state_dir, cache_size, memory_cache_size,
    /// read_timeout, passthrough, squash_after, prefetch_record, prefetch_replay, socket,
    /// endpoint_url, metrics_addr, trusted_keys, platform_group, and the tables [platform] and
    /// [tenants.NAME]
    /// [default: /etc/strata/daemon.toml as root, if it exists].
    #[arg(long, env = "STRATA_CONFIG")]
    config: Option<PathBuf>,
    /// Chunk and manifest cache directory [default: /var/cache/strata as root, else ~/.cache/strata].
    #[arg(long, env = "STRATA_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Per-mount state: the scratch uppers [default: /var/lib/strata as root, else
    /// ~/.local/state/strata].
    #[arg(long, env = "STRATA_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Hard cap on the chunk bytes kept under the cache dir [default: 10G].
    #[arg(long, env = "STRATA_CACHE_SIZE", value_parser = parse_size)]
    cache_size: Option<u64>,
    /// Cap on hot chunks kept in memory [default: 256M].
    #[arg(long, env = "STRATA_MEMORY_CACHE_SIZE", value_parser = parse_size)]
    memory_cache_size: Option<u64>,
    /// How long a read waits for an unreachable store before it fails with EIO [default: 60s].
    #[arg(long, env = "STRATA_READ_TIMEOUT", value_parser = parse_duration)]
    read_timeout: Option<Duration>,
    /// Never hand opens of fully cached files to the kernel (FUSE passthrough); every read
    /// then goes through strata.
    #[arg(long, env = "STRATA_NO_PASSTHROUGH", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    no_passthrough: bool,
    /// Squash a volume's chain into one layer once it has more than this many commits, so
    /// mounting it does not slow down with its history; 0 never squashes [default: 16].
    #[arg(long, env = "STRATA_SQUASH_AFTER")]
    squash_after: Option<usize>,
    /// Never record what mounts' functions read first into the layers' start records.
    #[arg(long, env = "STRATA_NO_PREFETCH_RECORD", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    no_prefetch_record: bool,
    /// Never fetch, at a mount, what the layers' start records say starts read first.
    #[arg(long, env = "STRATA_NO_PREFETCH_REPLAY", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    no_prefetch_replay: bool,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics [default: none].
    #[arg(long, env = "STRATA_METRICS_ADDR", value_name = "HOST:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    cache_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    cache_size: Option<String>,
    memory_cache_size: Option<String>,
    read_timeout: Option<String>,
    passthrough: Option<bool>,
    squash_after: Option<usize>,
    prefetch_record: Option<bool>,
    prefetch_replay: Option<bool>,
    socket: Option<PathBuf>,
    endpoint_url: Option<String>,
    metrics_addr: Option<String>,
    trusted_keys: Option<Vec<String>>,
    #[serde(default)]
    tenants: std::collections::BTreeMap<String, TenantFile>,
    platform: Option<PlatformFile>,
    platform_group: Option<toml::Value>,
}

/// `[platform]` in the config file: the daemon's own credential (and what admin commands
/// given `--platform-config` use), instead of the environment's.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PlatformFile {
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    profile: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
}

impl PlatformFile {
    /// Puts this credential (and region and endpoint, where given) into `options`.
    pub fn apply(self, options: &mut strata_store::StoreOptions) -> anyhow::Result<()> {
        match (self.access_key_id, self.secret_access_key, self.profile) {
            (Some(id), Some(secret), None) => options.credentials = Some((id, secret)),
            (None, None, Some(profile)) => options.profile = Some(profile),
            (None, None, None) => {}
            _ => anyhow::bail!(
                "config file: platform: give access_key_id and secret_access_key, or profile"
            ),
        }
        if self.region.is_some() {
            options.region = self.region;
        }
        if options.endpoint_url.is_none() {
            options.endpoint_url = self.endpoint_url;
        }
        Ok(())
    }
}

/// The `[platform]` table of a daemon config file (the rest of the file is not read here).
pub fn platform_of(path: &Path) -> anyhow::Result<Option<PlatformFile>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let value: toml::Table = parse_quietly(path, &text)?;
    match value.get("platform") {
        None => Ok(None),
        Some(p) => p
            .clone()
            .try_into()
            .map(Some)
            .map_err(|e: toml::de::Error| {
                anyhow::anyhow!("config file {}: platform: {}", path.display(), e.message())
            }),
    }
}

/// `[tenants.NAME]` in the config file.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TenantFile {
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    profile: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    #[serde(default)]
    datasets: Vec<String>,
    #[serde(default)]
    volume_scopes: Vec<String>,
    volume_home: Option<String>,
    #[serde(default)]
    uids: Vec<u32>,
}

fn tenant(
    name: &str,
    t: TenantFile,
    daemon: &strata_store::StoreOptions,
) -> anyhow::Result<strata_daemon::config::Tenant> {
    let credentials = match (t.access_key_id, t.secret_access_key, &t.profile) {
        (Some(id), Some(secret), None) => Some((id, secret)),
        (None, None, Some(_)) => None,
        _ => anyhow::bail!(
            "config file: tenant {name}: give access_key_id and secret_access_key, or profile (one credential of its own)"
        ),
    };
    strata_fs::refs::check_dataset_name(name)
        .map_err(|e| anyhow::anyhow!("config file: tenant name: {e}"))?;
    Ok(strata_daemon::config::Tenant {
        store_options: strata_store::StoreOptions {
            endpoint_url: t.endpoint_url.or_else(|| daemon.endpoint_url.clone()),
            single_writer: daemon.single_writer,
            credentials,
            region: t.region.or_else(|| daemon.region.clone()),
            profile: t.profile,
        },
        datasets: t.datasets,
        volume_scopes: t.volume_scopes,
        volume_home: t.volume_home,
        uids: t.uids,
    })
}

/// The gid of group `name`, from the group database (`/etc/group`).
fn group_id(name: &str) -> anyhow::Result<u32> {
    let groups = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let (n, _, gid) = (f.next()?, f.next()?, f.next()?);
            (n == name).then(|| gid.parse().ok()).flatten()
        })
        .next()
        .ok_or_else(|| anyhow::anyhow!("config file: platform_group: no group {name:?}"))
}

fn read_config(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    parse_quietly(path, &text)
}

fn parse_quietly<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> anyhow::Result<T> {
    // toml's own message quotes the offending line, which may hold a tenant's secret: only
    // the reason and the line number are told.
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        anyhow::anyhow!(
            "config file {}{}: {}",
            path.display(),
            line.map(|l| format!(", line {l}")).unwrap_or_default(),
            e.message()
        )
    })
}

/// Parses a config-file value with the same syntax as its flag.
fn from_file<T>(
    value: Option<String>,
    key: &str,
    parse: fn(&str) -> Result<T, String>,
) -> anyhow::Result<Option<T>> {
    value
        .map(|v| parse(&v).map_err(|e| anyhow::anyhow!("config file: {key} = {v:?}: {e}")))
        .transpose()
}

/// The host's config file, read when no `--config` is given: root's daemon is the host's
/// service, configured where services are.
const SYSTEM_CONFIG: &str = "/etc/strata/daemon.toml";

fn system_config() -> Option<PathBuf> {
    let path = PathBuf::from(SYSTEM_CONFIG);
    (rustix::process::geteuid().is_root() && path.exists()).then_some(path)
}

pub fn config(g: &GlobalArgs, a: DaemonArgs) -> anyhow::Result<DaemonConfig> {
    let file = match &a.config {
        Some(path) => read_config(path)?,
        None => match system_config() {
            Some(path) => read_config(&path)?,
            None => ConfigFile::default(),
        },
    };
    let mut store_options = g.store_options()?;
    if store_options.endpoint_url.is_none() {
        store_options.endpoint_url = file.endpoint_url;
    }
    if let Some(p) = file.platform {
        p.apply(&mut store_options)?;
    }
    let socket = g
        .socket
        .clone()
        .or(file.socket)
        .unwrap_or_else(strata_daemon::config::default_socket);
    let mut config = DaemonConfig::new(
        a.cache_dir
            .or(file.cache_dir)
            .unwrap_or_else(crate::default_cache_dir),
        a.state_dir
            .or(file.state_dir)
            .unwrap_or_else(crate::default_state_dir),
        socket,
    );
    let defaults = config.clone();
    config.cache_size = a
        .cache_size
        .or(from_file(file.cache_size, "cache_size", parse_size)?)
        .unwrap_or(defaults.cache_size);
    config.memory_cache_size = a
        .memory_cache_size
        .or(from_file(
            file.memory_cache_size,
            "memory_cache_size",
            parse_size,
        )?)
        .unwrap_or(defaults.memory_cache_size);
    config.read_timeout = a
        .read_timeout
        .or(from_file(
            file.read_timeout,
            "read_timeout",
            parse_duration,
        )?)
        .unwrap_or(defaults.read_timeout);
    config.passthrough = !a.no_passthrough && file.passthrough.unwrap_or(defaults.passthrough);
    config.squash_after = a
        .squash_after
        .or(file.squash_after)
        .unwrap_or(defaults.squash_after);
    config.record_starts =
        !a.no_prefetch_record && file.prefetch_record.unwrap_or(defaults.record_starts);
    config.replay_starts =
        !a.no_prefetch_replay && file.prefetch_replay.unwrap_or(defaults.replay_starts);
    config.tenants = file
        .tenants
        .into_iter()
        .map(|(name, t)| Ok((name.clone(), tenant(&name, t, &store_options)?)))
        .collect::<anyhow::Result<_>>()?;
    config.store_options = store_options;
    let mut agents = std::collections::BTreeMap::new();
    for (name, t) in &config.tenants {
        for uid in &t.uids {
            if *uid == 0 {
                anyhow::bail!("config file: tenant {name}: uid 0 is root, the platform's");
            }
            if let Some(other) = agents.insert(*uid, name) {
                anyhow::bail!("config file: uid {uid} is an agent of tenants {other} and {name}");
            }
        }
    }
    config.platform_group = match &file.platform_group {
        None => None,
        Some(toml::Value::Integer(gid)) => Some(
            u32::try_from(*gid)
                .map_err(|_| anyhow::anyhow!("config file: platform_group: {gid} is not a gid"))?,
        ),
        Some(toml::Value::String(name)) => Some(group_id(name)?),
        Some(_) => anyhow::bail!("config file: platform_group: a group name or a gid"),
    };
    // Keys from flags or the environment, else from the file.
    config.trusted_keys = match g.trusted_keys()? {
        keys if !keys.is_empty() => keys,
        _ => file
            .trusted_keys
            .unwrap_or_default()
            .iter()
            .map(|k| {
                strata_fs::refs::signed::PublicKey::parse(k)
                    .map_err(|e| anyhow::anyhow!("config file: trusted_keys: {e}"))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    config.metrics_addr = match a.metrics_addr {
        Some(addr) => Some(addr),
        None => from_file(file.metrics_addr, "metrics_addr", |v| {
            v.parse::<std::net::SocketAddr>()
                .map_err(|e| format!("expected HOST:PORT, e.g. 127.0.0.1:9400 ({e})"))
        })?,
    };
    Ok(config)
}

pub async fn run(g: &GlobalArgs, a: DaemonArgs) -> anyhow::Result<()> {
    let config = config(g, a)?;
    limit_malloc_arenas();
    let daemon = Daemon::start(config)?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let stop = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        crate::notify::notify("STOPPING=1");
    };
    // Ready once the socket is bound: clients can connect from then on.
    Ok(daemon
        .serve_with(stop, || crate::notify::notify("READY=1"))
        .await?)
}

/// Chunk buffers are allocated on some threads and freed on others. glibc gives each thread
/// its own arena and keeps freed memory there, and after the first multi-MiB buffer is freed
/// it serves such buffers from those arenas too. Measured on a 1 GiB read: peak RSS 584 MiB
/// with glibc's defaults, 343 MiB with two arenas and buffers of 1 MiB and up always mapped
/// (returned to the system when freed), at the same speed. (mimalloc: 711 MiB, and slower.)
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before the daemon's threads allocate much.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_that_does_not_parse_is_reported_without_quoting_it() {
        let dir = std::env::temp_dir().join(format!("strata-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for bad in [
            "[tenants.a]\nsecret_acess_key = \"SUPERSECRET123\"\n",
            "[tenants.a]\nsecret_access_key = \"SUPERSECRET123\n",
        ] {
            let path = dir.join("daemon.toml");
            std::fs::write(&path, bad).unwrap();
            let err = format!("{:#}", read_config(&path).err().unwrap());
            assert!(err.contains("line 2"), "{err}");
            assert!(!err.contains("SUPERSECRET123"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
