//! Running the real `strata` binary: commands, and foreground mounts that unmount on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The `strata` binary built next to this test binary (`target/<profile>/strata`), or
/// `STRATA_BIN`.
pub fn strata_bin() -> PathBuf {
    if let Ok(p) = std::env::var("STRATA_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let bin = profile_dir.join("strata");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p strata` with the same profile)",
        bin.display()
    );
    bin
}

/// A strata command with a store environment.
#[derive(Clone)]
pub struct Strata {
    pub env: Vec<(String, String)>,
}

impl Strata {
    pub fn new(env: Vec<(String, String)>) -> Strata {
        Strata { env }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(strata_bin());
        cmd.args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running strata")
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Runs and requires failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "strata {args:?} should have failed");
        String::from_utf8_lossy(&out.stderr).to_string()
    }

    /// `strata publish --json`, parsed.
    pub fn publish(&self, dir: &Path, store: &str, target: &str) -> serde_json::Value {
        let out = self.ok(&["publish", "--json", dir.to_str().unwrap(), store, target]);
        serde_json::from_str(out.trim()).expect("publish --json output")
    }

    pub fn mount(
        &self,
        store: &str,
        mountpoint: &Path,
        layers: &[&str],
        cache_dir: &Path,
        extra: &[&str],
    ) -> Result<Mount> {
        std::fs::create_dir_all(mountpoint)?;
        let mut args: Vec<String> = vec![
            "mount".into(),
            store.into(),
            mountpoint.to_str().unwrap().into(),
            "--foreground".into(),
            "--cache-dir".into(),
            cache_dir.to_str().unwrap().into(),
            // A scratch upper (unless --read-only) lives beside the cache.
            "--state-dir".into(),
            cache_dir.with_extension("state").to_str().unwrap().into(),
        ];
        for l in layers {
            args.push("--layer".into());
            args.push((*l).into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let log = mountpoint.with_extension("log");
        let mut cmd = self.command(&argv);
        cmd.stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?));
        crate::die_with_parent(&mut cmd);
        let child = cmd.spawn().context("spawning strata mount")?;
        let mut m = Mount {
            child,
            mountpoint: mountpoint.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if strata_fuse::is_strata_mount(mountpoint)? {
                return Ok(m);
            }
            if let Some(status) = m.child.try_wait()? {
                bail!("strata mount exited ({status}): {}", m.log_text());
            }
            if Instant::now() > deadline {
                bail!("mount did not appear within 60s: {}", m.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub struct Mount {
    pub child: Child,
    pub mountpoint: PathBuf,
    log: PathBuf,
}

impl Mount {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts with `strata unmount` and waits for the serving process to exit.
    pub fn unmount(mut self) -> Result<std::process::ExitStatus> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<std::process::ExitStatus> {
        if strata_fuse::is_strata_mount(&self.mountpoint)? {
            let out = Command::new(strata_bin())
                .args(["unmount", self.mountpoint.to_str().unwrap()])
                .output()?;
            if !out.status.success() {
                bail!(
                    "strata unmount failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        wait_timeout(&mut self.child, Duration::from_secs(20))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // A test that failed while this mount served it: what the mount logged is the first
        // thing to read (an EIO's reason is only there).
        if std::thread::panicking() {
            let whose = format!("the mount at {}", self.mountpoint.display());
            crate::print_log_tail(&whose, &self.log_text());
        }
        if self.unmount_inner().is_err() {
            let _ = strata_fuse::unmount(&self.mountpoint, true);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("process {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
