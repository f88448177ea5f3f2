//! The control socket as a client program sees it: typed errors it can match on, and a clear
//! refusal of another protocol version. No mount is made, so this runs without root or FUSE.

use std::time::Duration;

use strata_daemon::protocol::{
    decode_reply, encode_request, ReplyError, Request, PROTOCOL_VERSION,
};
use strata_daemon::{Client, ClientError, Daemon, DaemonConfig, ErrorKind, MountSpec};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

async fn raw(socket: &std::path::Path, line: &str) -> String {
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    stream.write_all(line.as_bytes()).await.unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).await.unwrap();
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_typed_errors_and_a_clear_version_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("daemon.sock");
    let config = DaemonConfig::new(
        tmp.path().join("cache"),
        tmp.path().join("state"),
        socket.clone(),
    );
    let daemon = Daemon::start(config.clone()).unwrap();
    // One daemon per cache dir.
    let second = Daemon::start(config)
        .err()
        .expect("the cache dir is locked");
    assert_eq!(second.kind, ErrorKind::Busy, "{second}");

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(daemon.clone().serve(async {
        let _ = stopped.await;
    }));
    let client = Client::new(&socket);
    let mut tries = 0;
    while client.mounts().await.is_err() {
        tries += 1;
        assert!(tries < 200, "the daemon never answered");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let gone = client
        .unmount(std::path::Path::new("/nowhere/mounted"), false)
        .await
        .unwrap_err();
    assert_eq!(gone.kind(), ErrorKind::NotFound, "{gone}");
    assert!(
        gone.to_string().contains("is not mounted by this daemon"),
        "{gone}"
    );

    let spec = MountSpec {
        store: format!("file://{}", tmp.path().join("store").display()),
        endpoint_url: None,
        layers: vec!["data:v1".into()],
        mountpoint: "relative/dir".into(),
        read_only: false,
        scratch_size: None,
        scratch_inodes: None,
        volume: None,
        unmount_with_client: false,
        no_prefetch_record: false,
        no_prefetch_replay: false,
        trusted_keys: Vec::new(),
        tenant: None,
    };
    let bad = client.mount(spec.clone()).await.unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::BadRequest, "{bad}");
    assert!(bad.to_string().contains("absolute"), "{bad}");
    let bad_name = MountSpec {
        layers: vec!["../etc:v1".into()],
        mountpoint: tmp.path().to_path_buf(),
        ..spec
    };
    let e = client.mount(bad_name).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadRequest, "{e}");

    // A client of a newer version is told, in this version's shape, and nothing is done.
    let newer = format!(
        "{{\"version\":{},\"request\":{{\"op\":\"mounts\"}}}}\n",
        PROTOCOL_VERSION + 1
    );
    let e = decode_reply::<serde_json::Value>(&raw(&socket, &newer).await).unwrap_err();
    assert!(
        matches!(&e, ReplyError::Daemon(d) if d.kind == ErrorKind::UnsupportedVersion),
        "{e:?}"
    );
    assert!(e.to_string().contains("protocol version"), "{e}");
    // A client from before versions existed gets its refusal in its own shape.
    let old: serde_json::Value =
        serde_json::from_str(&raw(&socket, "{\"op\":\"mounts\"}\n").await).unwrap();
    let said = old["error"]
        .as_str()
        .expect("an error string, as version 0 replied");
    assert!(said.contains("protocol version 0"), "{said}");
    // And a daemon from before versions existed, which decoded `Request` from the line as
    // it is, refuses this client's lines instead of acting on them.
    let line = encode_request(&Request::Mounts).unwrap();
    assert!(serde_json::from_slice::<Request>(&line).is_err());
    let e =
        decode_reply::<serde_json::Value>("{\"error\":\"malformed request: missing field `op`\"}")
            .unwrap_err();
    assert_eq!(ClientError::from(e).kind(), ErrorKind::UnsupportedVersion);
    // A reply of another version is refused by the client.
    let newer = format!("{{\"version\":{},\"ok\":[]}}\n", PROTOCOL_VERSION + 1);
    let e = decode_reply::<Vec<serde_json::Value>>(&newer).unwrap_err();
    assert!(e.to_string().contains("protocol version"), "{e}");
    // A malformed line is a bad request, not a dropped connection.
    let reply = raw(&socket, "not json\n").await;
    let e = decode_reply::<serde_json::Value>(&reply).unwrap_err();
    assert!(e.to_string().contains("malformed request"), "{e}");

    stop.send(()).unwrap();
    served.await.unwrap().unwrap();
    assert!(!socket.exists(), "the socket is removed at shutdown");
}
