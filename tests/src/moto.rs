//! `moto_server` (PyPI `moto[server]`): an S3 server that enforces conditional writes, for the
//! compare-and-swap cases Garage ignores.

use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Moto {
    pub port: u16,
    _child: Child,
}

impl Moto {
    pub fn start() -> Result<Moto> {
        let port = crate::free_port();
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
        .stderr(Stdio::null());
        crate::die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .context("starting moto_server (install it with `pip install 'moto[server]'`)")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("moto_server did not start on port {port}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Whatever answered must be our moto: one that exited (its port taken) would leave us
        // talking to another server.
        std::thread::sleep(Duration::from_millis(200));
        if let Some(status) = child.try_wait()? {
            bail!("moto_server exited ({status}) instead of serving port {port}");
        }
        Ok(Moto {
            port,
            _child: child,
        })
    }

    pub fn create_bucket(&self, name: &str) -> Result<()> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        write!(
            s,
            "PUT /{name} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        if !out.starts_with("HTTP/1.0 200") && !out.starts_with("HTTP/1.1 200") {
            bail!("creating bucket {name} on moto: {out}");
        }
        Ok(())
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
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
