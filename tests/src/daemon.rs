//! Running the real `strata daemon` and mounting through it.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::strata::{wait_timeout, Strata};

static STARTS: Mutex<()> = Mutex::new(());

/// No daemon of this test binary starts while the guard is held. A starting daemon detaches
/// every stale strata mount on the host, so a test that looks at the stale mounts a killed
/// daemon left (or at who cleaned them) holds this from the kill to its own restart.
pub fn exclusive() -> MutexGuard<'static, ()> {
    STARTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A `strata daemon` with its own socket and cache dir under `dir`; stopped (SIGTERM) on drop.
pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub cache_dir: PathBuf,
    /// Scratch uppers live under `state_dir/scratch/`.
    pub state_dir: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    extra: Vec<String>,
    /// A program the daemon runs under (`setpriv …`), or empty.
    wrapper: Vec<String>,
}

impl Daemon {
    /// Starts a daemon and waits until it answers on its socket.
    pub fn start(env: Vec<(String, String)>, dir: &Path, extra: &[&str]) -> Result<Daemon> {
        Daemon::start_under(&[], env, dir, extra)
    }

    /// [`Daemon::start`] with the daemon run by `wrapper` (a program and its arguments, the
    /// strata command line appended): `setpriv` with a service's capability set, say.
    pub fn start_under(
        wrapper: &[&str],
        env: Vec<(String, String)>,
        dir: &Path,
        extra: &[&str],
    ) -> Result<Daemon> {
        std::fs::create_dir_all(dir)?;
        let mut d = Daemon {
            child: None,
            dir: dir.to_path_buf(),
            socket: dir.join("daemon.sock"),
            cache_dir: dir.join("cache"),
            state_dir: dir.join("state"),
            log: dir.join("daemon.log"),
            env,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        d.restart()?;
        Ok(d)
    }

    /// Starts the daemon again (after [`Daemon::stop`] or [`Daemon::kill`]), same dirs.
    pub fn restart(&mut self) -> Result<()> {
        let held = exclusive();
        self.restart_holding(&held)
    }

    /// [`Daemon::restart`] by a test that holds [`exclusive`].
    pub fn restart_holding(&mut self, _held: &MutexGuard<'static, ()>) -> Result<()> {
        assert!(self.child.is_none(), "daemon already running");
        let mut args: Vec<&str> = vec![
            "daemon",
            "--cache-dir",
            self.cache_dir.to_str().unwrap(),
            "--state-dir",
            self.state_dir.to_str().unwrap(),
        ];
        args.extend(self.extra.iter().map(|s| s.as_str()));
        let mut cmd = self.strata().command(&args);
        if let Some((program, wrapper_args)) = self.wrapper.split_first() {
            let mut wrapped = std::process::Command::new(program);
            wrapped
                .args(wrapper_args)
                .arg(cmd.get_program())
                .args(cmd.get_args());
            for (k, v) in cmd.get_envs() {
                if let Some(v) = v {
                    wrapped.env(k, v);
                }
            }
            cmd = wrapped;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        cmd.stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .env("STRATA_LOG", "info");
        crate::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().context("spawning strata daemon")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                bail!("strata daemon exited ({status}): {}", self.log_text());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("daemon did not listen within 60s: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A strata command line that talks to this daemon.
    pub fn strata(&self) -> Strata {
        let mut env = self.env.clone();
        env.push(("STRATA_SOCKET".into(), self.socket.display().to_string()));
        Strata::new(env)
    }

    /// The daemon's control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Mounts `layers` (bottom to top) at `mountpoint` through the daemon.
    pub fn mount(&self, store: &str, mountpoint: &Path, layers: &[&str]) -> Result<DaemonMount> {
        self.mount_with(store, mountpoint, layers, &[])
    }

    /// [`Daemon::mount`] with more `strata mount` flags (`--read-only`, `--scratch-size`...).
    pub fn mount_with(
        &self,
        store: &str,
        mountpoint: &Path,
        layers: &[&str],
        flags: &[&str],
    ) -> Result<DaemonMount> {
        std::fs::create_dir_all(mountpoint)?;
        let mut args = vec!["mount", store, mountpoint.to_str().unwrap()];
        for l in layers {
            args.extend(["--layer", l]);
        }
        args.extend(flags);
        let out = self.strata().run(&args);
        if !out.status.success() {
            bail!(
                "strata mount failed: {}\ndaemon log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_text()
            );
        }
        Ok(DaemonMount {
            strata: self.strata(),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// The scratch uppers that exist now.
    pub fn scratch_dirs(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.state_dir.join("scratch")) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// `strata stats --json`.
    pub fn stats(&self) -> serde_json::Value {
        let out = self.strata().ok(&["stats", "--json"]);
        serde_json::from_str(&out).expect("stats --json output")
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("daemon not running");
        };
        crate::sigterm(&child);
        wait_timeout(&mut child, Duration::from_secs(30))
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test's first clue is what the daemon logged while it ran.
        if std::thread::panicking() {
            crate::print_log_tail("the daemon", &self.log_text());
        }
        if self.child.is_some() && self.stop().is_err() {
            self.kill();
        }
    }
}

/// A mount served by a daemon; unmounted on drop.
pub struct DaemonMount {
    strata: Strata,
    pub mountpoint: PathBuf,
}

impl DaemonMount {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// `strata unmount` through the daemon, for a test that checks what it says (a volume
    /// whose commit failed, say).
    pub fn unmount(self) -> std::process::Output {
        self.strata
            .run(&["unmount", self.mountpoint.to_str().unwrap()])
    }
}

impl Drop for DaemonMount {
    fn drop(&mut self) {
        if strata_fuse::is_strata_mount(&self.mountpoint).unwrap_or(false) {
            let out = self
                .strata
                .run(&["unmount", self.mountpoint.to_str().unwrap()]);
            if !out.status.success() {
                eprintln!(
                    "strata unmount {} failed ({}); detaching it",
                    self.mountpoint.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                let _ = strata_fuse::unmount(&self.mountpoint, true);
            }
        }
    }
}

/// The BLAKE3 of a file, read in 1 MiB pieces (big files need not fit in memory twice).
pub fn hash_file(path: &Path) -> std::io::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}
