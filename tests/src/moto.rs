//! `moto_server` (PyPI `moto[server]`): an S3 server that enforces conditional writes, for the
//! compare-and-swap cases Garage ignores.

use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// IAM users' access keys by user name: (key id, secret).
pub type Keys = std::collections::HashMap<String, (String, String)>;

pub struct Moto {
    pub port: u16,
    _child: Child,
    /// What the server printed (its errors).
    log: std::path::PathBuf,
}

impl Moto {
    /// A moto_server on a port of its own; tried three times, each on a new port, so a
    /// server that could not take its port is no reason to fail a test.
    pub fn start() -> Result<Moto> {
        let mut failed = Vec::new();
        for _ in 0..3 {
            match Moto::start_once() {
                Ok(moto) => return Ok(moto),
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        bail!("moto_server did not start: {}", failed.join("; "))
    }

    /// A moto_server of its own that enforces IAM: requests must be signed by the keys of a
    /// user whose policy allows them. `buckets` are made, and a user per entry of `users`
    /// (name, policy statements); returns the server and each user's (key id, secret), with
    /// `admin` (allowed everything) among them.
    pub fn start_with_iam(
        buckets: &[&str],
        users: &[(&str, serde_json::Value)],
    ) -> Result<(Moto, Keys)> {
        use std::io::Write;
        let moto = Moto::start()?;
        // From now on moto serves this many requests before it enforces authentication:
        // the setup script's first three, which make the admin.
        moto.post("/moto-api/reset-auth", "3")
            .context("turning IAM authentication on")?;
        let spec = serde_json::json!({
            "endpoint": format!("http://127.0.0.1:{}", moto.port),
            "buckets": buckets,
            "users": users.iter().map(|(n, p)| (n.to_string(), p.clone())).collect::<serde_json::Map<_, _>>(),
        });
        let mut cmd = Command::new("python3");
        cmd.args(["-c", include_str!("moto_iam.py")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("running the moto IAM setup")?;
        child
            .stdin
            .take()
            .context("the setup's stdin")?
            .write_all(spec.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "setting up IAM users on moto: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let keys = serde_json::from_slice(&out.stdout).context("the IAM setup's keys")?;
        Ok((moto, keys))
    }

    fn start_once() -> Result<Moto> {
        let port = crate::free_port();
        let log = crate::scratch_dir("moto").join("moto.log");
        let out = std::fs::File::create(&log)?;
        // Through the interpreter, so a fresh pip install needs no PATH or shim refresh.
        let mut cmd = Command::new("python3");
        cmd.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(out);
        crate::die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .context("starting moto_server (install it with `pip install 'moto[server]'`)")?;
        let tail = || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().rev().take(10).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        // Ready when it answers on its port as moto does; one that exited (its port taken,
        // say) is not.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("moto_server exited ({status}) on port {port}: {}", tail());
            }
            let up = crate::garage::http_get(port, "/")
                .is_ok_and(|r| r.contains("ListAllMyBucketsResult"));
            if up {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("moto_server did not answer on port {port}: {}", tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Moto {
            port,
            _child: child,
            log,
        })
    }

    /// POSTs `body` to `path`; fails unless moto answers 200.
    fn post(&self, path: &str, body: &str) -> Result<()> {
        self.request("POST", path, body)
    }

    pub fn create_bucket(&self, name: &str) -> Result<()> {
        self.request("PUT", &format!("/{name}"), "")
            .with_context(|| format!("creating bucket {name} on moto"))
    }

    /// One unsigned HTTP request; fails unless moto answers 200 (a refused connection is
    /// told with the end of moto's log).
    fn request(&self, method: &str, path: &str, body: &str) -> Result<()> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).with_context(|| {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            format!(
                "connecting to moto on port {}; its log ends:\n{}",
                self.port,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        if !out.starts_with("HTTP/1.0 200") && !out.starts_with("HTTP/1.1 200") {
            bail!("{method} {path} on moto: {out}");
        }
        Ok(())
    }

    pub fn env(&self) -> Vec<(String, String)> {
        self.env_as(("testing", "testing"))
    }

    /// The environment for the `strata` binary as the holder of `key` (id, secret).
    pub fn env_as(&self, key: (&str, &str)) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), key.0.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), key.1.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            (
                "AWS_ENDPOINT_URL".into(),
                format!("http://127.0.0.1:{}", self.port),
            ),
        ]
    }
}

pub fn shared() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| crate::on_lifetime_thread(|| Moto::start().expect("starting moto_server")))
}

pub fn bucket(name: &str) -> String {
    let bucket = format!("{name}-{}", crate::free_port());
    shared()
        .create_bucket(&bucket)
        .expect("creating a moto bucket");
    format!("s3://{bucket}")
}
