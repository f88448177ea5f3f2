//! `strata`: the command line. Parsing, configuration, progress and output only; the work is
//! done by `strata-fs` and `strata-cache`.

mod cmd;
mod mount_helper;
mod notify;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Publish directories as content-addressed layers and mount them lazily through FUSE"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every command that opens a store understands.
#[derive(Args, Clone)]
pub struct GlobalArgs {
    /// S3 endpoint for S3-compatible servers (Garage, MinIO...); implies path-style addressing.
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// Allow moving existing refs on stores that ignore conditional writes; only safe when a
    /// single writer updates refs in the store.
    #[arg(long, global = true, env = "STRATA_SINGLE_WRITER", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    single_writer: bool,
    /// The daemon's control socket [default: /run/strata/daemon.sock as root].
    #[arg(long, global = true, env = "STRATA_SOCKET")]
    socket: Option<PathBuf>,
    /// More log output (-v info, -vv debug); `STRATA_LOG` takes a tracing filter.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Mount and read only datasets whose refs a publisher with this public key signed
    /// (`ed25519:<hex>`, from `strata key generate`); repeat or separate with commas for
    /// several. Without any, refs are not checked.
    #[arg(
        long = "trusted-key",
        global = true,
        env = "STRATA_TRUSTED_KEYS",
        value_delimiter = ',',
        value_name = "KEY"
    )]
    trusted_keys: Vec<String>,
    /// Open stores with the platform credential of this daemon config file (its `[platform]`
    /// table) instead of the environment's: for publish, gc, tag, rm, volume and the other
    /// commands that open a store themselves.
    #[arg(
        long,
        global = true,
        env = "STRATA_PLATFORM_CONFIG",
        value_name = "FILE"
    )]
    platform_config: Option<PathBuf>,
}

impl GlobalArgs {
    fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(strata_daemon::config::default_socket)
    }

    /// The publishers' keys this command trusts (none: refs are not checked).
    fn trusted_keys(&self) -> anyhow::Result<Vec<strata_fs::refs::signed::PublicKey>> {
        self.trusted_keys
            .iter()
            .filter(|k| !k.trim().is_empty())
            .map(|k| Ok(strata_fs::refs::signed::PublicKey::parse(k)?))
            .collect()
    }

    /// The trusted keys as given (checked), for a daemon request.
    fn trusted_key_texts(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.trusted_keys()?.iter().map(|k| k.to_string()).collect())
    }

    /// What this command trusts, with sequences remembered only while it runs.
    fn trust(&self) -> anyhow::Result<Option<std::sync::Arc<strata_fs::refs::signed::Trust>>> {
        let keys = self.trusted_keys()?;
        if keys.is_empty() {
            return Ok(None);
        }
        Ok(Some(std::sync::Arc::new(
            strata_fs::refs::signed::Trust::new(keys, None)?,
        )))
    }

    fn store_options(&self) -> anyhow::Result<strata_store::StoreOptions> {
        let mut options = strata_store::StoreOptions {
            endpoint_url: self.endpoint_url.clone(),
            single_writer: self.single_writer,
            ..Default::default()
        };
        if let Some(path) = &self.platform_config {
            match cmd::daemon::platform_of(path)? {
                Some(p) => p.apply(&mut options)?,
                None => anyhow::bail!("{}: no [platform] table", path.display()),
            }
        }
        Ok(options)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Publish DIR as a layer and point NAME:TAG at it.
    Publish(cmd::publish::PublishArgs),
    /// List datasets (NAME:TAG → layer) in a store.
    Ls(cmd::ls::LsArgs),
    /// Point tag TARGET (NAME:TAG) at the layer SOURCE names (NAME:TAG or NAME@blake3:…).
    Tag(cmd::tag::TagArgs),
    /// Remove a tag (NAME:TAG), or with --all every tag of a dataset NAME; the layers stay in
    /// the store (see `strata du`).
    Rm(cmd::tag::RmArgs),
    /// Show a layer: summary, chunk statistics and its tree.
    Inspect(cmd::inspect::InspectArgs),
    /// Print one file of a dataset to stdout, without mounting.
    Cat(cmd::cat::CatArgs),
    /// Mount datasets at MOUNTPOINT (a scratch upper or a volume on top), through the daemon
    /// (or --foreground).
    Mount(cmd::mount::MountArgs),
    /// Unmount a strata mount.
    Unmount(cmd::mount::UnmountArgs),
    /// Commit a volume mount's changes so far (the mount goes on; unmounting commits too).
    Commit(cmd::mount::CommitArgs),
    /// Run the host daemon: one chunk cache shared by every mount on this host.
    Daemon(cmd::daemon::DaemonArgs),
    /// List the daemon's mounts.
    Mounts(cmd::status::MountsArgs),
    /// Cache and read counters of the daemon, in total and per mount.
    Stats(cmd::status::StatsArgs),
    /// Persistent volumes in a store: ls, show, history, rm.
    Volume(cmd::volume::VolumeArgs),
    /// What a store holds: objects and bytes by kind, what each dataset and volume keeps
    /// alive, dead bytes, and an estimate of the monthly cost.
    Du(cmd::du::DuArgs),
    /// Delete what no root keeps alive (layers, packs, locators, start records), safely beside
    /// publishes and commits; refuses on stores that ignore conditional writes unless given
    /// --single-writer.
    Gc(cmd::gc::GcArgs),
    /// Show or set how many earlier layers of a dataset's tags gc keeps (--keep-history N,
    /// --keep-within DURATION), or --clear it.
    Retain(cmd::gc::RetainArgs),
    /// Run CMD as one invocation: datasets and a volume mounted through the daemon, in a
    /// sandbox of its own (mount, PID, IPC and UTS namespaces); its exit status is returned.
    Run(cmd::run::RunArgs),
    /// A live view of the daemon, refreshed in place: per mount read and store rates, hit
    /// ratio and errors; q quits.
    Top(cmd::top::TopArgs),
    /// Publishers' signing keys: generate one, or print a key file's public key.
    Key(cmd::key::KeyArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(cmd::docs::CompletionsArgs),
    /// Print the man page, or write one per command into --dir.
    Man(cmd::docs::ManArgs),
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
        // fuser warns when its own unmount-on-drop finds the mount already gone (after
        // `strata unmount`), which is the normal way a mount ends.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},fuser=error")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    // The sandbox helper `strata run` starts: no runtime, no logging, a plain process.
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == strata_sandbox::HELPER_ARG {
        return ExitCode::from(strata_sandbox::helper_main(&args[2]).clamp(0, 255) as u8);
    }
    let cli = match as_mount_helper(&args) {
        Some(Ok(Some(strata_args))) => {
            Cli::parse_from(std::iter::once("strata".to_string()).chain(strata_args))
        }
        Some(Ok(None)) => return ExitCode::SUCCESS,
        Some(Err(e)) => {
            eprintln!("mount.fuse.strata: {e}");
            // mount(8)'s status for a bad invocation.
            return ExitCode::from(1);
        }
        None => Cli::parse(),
    };
    init_logging(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strata: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let g = cli.global;
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Publish(a) => cmd::publish::run(&g, a).await,
            Command::Ls(a) => cmd::ls::run(&g, a).await,
            Command::Tag(a) => cmd::tag::tag(&g, a).await,
            Command::Rm(a) => cmd::tag::rm(&g, a).await,
            Command::Inspect(a) => cmd::inspect::run(&g, a).await,
            Command::Cat(a) => cmd::cat::run(&g, a).await,
            Command::Mount(a) => cmd::mount::run(&g, a).await,
            Command::Unmount(a) => cmd::mount::unmount(&g, a).await,
            Command::Commit(a) => cmd::mount::commit(&g, a).await,
            Command::Daemon(a) => cmd::daemon::run(&g, a).await,
            Command::Mounts(a) => cmd::status::mounts(&g, a).await,
            Command::Stats(a) => cmd::status::stats(&g, a).await,
            Command::Volume(a) => cmd::volume::run(&g, a).await,
            Command::Du(a) => cmd::du::run(&g, a).await,
            Command::Gc(a) => return cmd::gc::gc(&g, a).await,
            Command::Retain(a) => cmd::gc::retain(&g, a).await,
            Command::Run(a) => return cmd::run::run(&g, a).await,
            Command::Top(a) => cmd::top::run(&g, a).await,
            Command::Key(a) => cmd::key::run(a),
            Command::Completions(a) => cmd::docs::completions(a),
            Command::Man(a) => cmd::docs::man(a),
        }
        .map(|()| 0)
    });
    // Background fetches may still be running; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("strata: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Run as `mount.fuse.strata` (a link to this binary, which mount(8) runs for `-t
/// fuse.strata` and fstab entries): the `strata` arguments it stands for.
fn as_mount_helper(args: &[String]) -> Option<Result<Option<Vec<String>>, String>> {
    let name = std::path::Path::new(args.first()?).file_name()?.to_str()?;
    matches!(name, "mount.fuse.strata" | "mount.strata")
        .then(|| mount_helper::strata_args(&args[1..]))
}

pub use strata_daemon::config::{default_cache_dir, default_state_dir};
