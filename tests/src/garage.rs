//! A single-node Garage S3 server on loopback, with its own temp dirs and free ports, set up
//! through its admin CLI (see ../shared/GARAGE.md for the verified steps).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Garage {
    pub dir: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    pub s3_port: u16,
    pub admin_port: u16,
    pub key_id: String,
    pub secret: String,
}

pub fn garage_bin() -> PathBuf {
    if let Ok(p) = std::env::var("GARAGE_BIN") {
        return PathBuf::from(p);
    }
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let p = cargo_home.join("bin").join("garage");
    if p.exists() {
        p
    } else {
        PathBuf::from("garage")
    }
}

fn run(config: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(garage_bin())
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .with_context(|| {
            format!("running garage {args:?} (install it with `cargo install garage --locked`)")
        })?;
    if !out.status.success() {
        bail!(
            "garage {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

impl Garage {
    pub fn start() -> Result<Garage> {
        let dir = crate::scratch_dir("garage");
        let rpc_port = crate::free_port();
        let s3_port = crate::free_port();
        let admin_port = crate::free_port();
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + std::process::id() as usize) % 256))
            .collect();
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
admin_token = "strata-test-admin"
"#,
                d = dir.display()
            ),
        )?;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600))?;
        let mut garage = Garage {
            dir,
            config,
            child: None,
            s3_port,
            admin_port,
            key_id: String::new(),
            secret: String::new(),
        };
        garage.spawn_server()?;
        let node = run(&garage.config, &["node", "id", "-q"])?;
        let node = node
            .trim()
            .split('@')
            .next()
            .unwrap_or_default()
            .to_string();
        run(
            &garage.config,
            &["layout", "assign", "-z", "dc1", "-c", "10G", &node],
        )?;
        run(&garage.config, &["layout", "apply", "--version", "1"])?;
        let key = run(&garage.config, &["key", "create", "strata-test"])?;
        for line in key.lines() {
            if let Some(v) = line.trim().strip_prefix("Key ID:") {
                garage.key_id = v.trim().to_string();
            }
            if let Some(v) = line.trim().strip_prefix("Secret key:") {
                garage.secret = v.trim().to_string();
            }
        }
        if garage.key_id.is_empty() || garage.secret.is_empty() {
            bail!("could not read the key from `garage key create`: {key}");
        }
        Ok(garage)
    }

    /// Starts (or restarts) the server process and waits until it answers.
    pub fn spawn_server(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.join("garage.log"))?;
        let mut cmd = Command::new(garage_bin());
        cmd.arg("-c")
            .arg(&self.config)
            .arg("server")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        crate::die_with_parent(&mut cmd);
        self.child = Some(cmd.spawn().context("starting garage server")?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if run(&self.config, &["status"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "garage did not come up; see {}",
                    self.dir.join("garage.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn create_bucket(&self, name: &str) -> Result<()> {
        run(&self.config, &["bucket", "create", name])?;
        run(
            &self.config,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                name,
                "--key",
                "strata-test",
            ],
        )?;
        Ok(())
    }

    /// A new access key named `name`, allowed on `buckets` (read, and write if `write`) and
    /// nothing else: returns (key id, secret).
    pub fn key_for(&self, name: &str, buckets: &[&str], write: bool) -> Result<(String, String)> {
        let out = run(&self.config, &["key", "create", name])?;
        let field = |label: &str| {
            out.lines()
                .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string()))
        };
        let (Some(id), Some(secret)) = (field("Key ID:"), field("Secret key:")) else {
            bail!("could not read the key from `garage key create`: {out}");
        };
        for b in buckets {
            let mut args = vec!["bucket", "allow", "--read"];
            if write {
                args.push("--write");
            }
            args.extend([*b, "--key", name]);
            run(&self.config, &args)?;
        }
        Ok((id, secret))
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Environment for a strata process talking to this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret.clone()),
            ("AWS_REGION".into(), "garage".into()),
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
        ]
    }

    /// GetObject requests the server has answered so far, from its Prometheus metrics: the
    /// store's own count, not strata's.
    pub fn get_object_count(&self) -> Result<u64> {
        let body = http_get(self.admin_port, "/metrics")?;
        let mut total = 0u64;
        for line in body.lines() {
            if line.starts_with("api_s3_request_counter")
                && line.contains("api_endpoint=\"GetObject\"")
            {
                let v = line.rsplit(' ').next().unwrap_or("0");
                total += v.parse::<f64>().unwrap_or(0.0) as u64;
            }
        }
        Ok(total)
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One shared server per test binary; each test makes its own bucket.
pub fn shared() -> &'static Garage {
    static GARAGE: OnceLock<Garage> = OnceLock::new();
    GARAGE.get_or_init(|| crate::on_lifetime_thread(|| Garage::start().expect("starting Garage")))
}

/// A server of its own, for tests that count requests at the store (the shared server's
/// counters include every other test's requests). Stopped when dropped.
pub fn dedicated() -> Garage {
    crate::on_lifetime_thread(|| Garage::start().expect("starting Garage"))
}

/// A fresh bucket on the shared server: returns its store URL.
pub fn bucket(name: &str) -> String {
    let g = shared();
    let bucket = format!("{name}-{}", crate::free_port());
    g.create_bucket(&bucket).expect("creating a bucket");
    format!("s3://{bucket}")
}

pub fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
