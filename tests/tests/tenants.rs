//! Mounts on behalf of tenants, against Garage with a key per tenant: a tenant mounts only
//! what its grants name, with its own credential, and a credential that cannot read the
//! bucket is refused by the store itself even where the daemon's grants let the mount through.

use strata_tests::daemon::Daemon;
use strata_tests::garage;
use strata_tests::strata::Strata;
use strata_tests::tree::{pseudo_random, write_file};

fn layer_of(v: &serde_json::Value) -> String {
    v["layer"].as_str().unwrap().to_string()
}

#[test]
fn a_tenant_mounts_only_what_it_is_granted_with_its_own_credential() {
    let work = strata_tests::scratch_dir("tenants");
    let store = garage::bucket("tenants");
    let bucket = store.trim_start_matches("s3://").to_string();
    let g = garage::shared();
    let alice = g
        .key_for(&format!("alice-{bucket}"), &[&bucket], true)
        .unwrap();
    // Mallory's key may read nothing here; the daemon's config grants it `ds` all the same.
    let mallory = g.key_for(&format!("mallory-{bucket}"), &[], false).unwrap();
    // Reader's may only read.
    let reader = g
        .key_for(&format!("reader-{bucket}"), &[&bucket], false)
        .unwrap();
    let mut env = g.env();
    env.push(("STRATA_SINGLE_WRITER".into(), "1".into()));
    let platform = Strata::new(env.clone());

    let dir = work.join("ds");
    let v1 = pseudo_random(1, 200 << 10);
    write_file(&dir.join("data.bin"), &v1);
    let first = layer_of(&platform.publish(&dir, &store, "ds:latest"));
    let v2 = pseudo_random(2, 200 << 10);
    write_file(&dir.join("data.bin"), &v2);
    platform.publish(&dir, &store, "ds:latest");
    let other_dir = work.join("other");
    write_file(&other_dir.join("data.bin"), &pseudo_random(3, 1000));
    let other = layer_of(&platform.publish(&other_dir, &store, "other:latest"));

    let config = work.join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[platform]
access_key_id = "{}"
secret_access_key = "{}"
region = "garage"

[tenants.alice]
access_key_id = "{}"
secret_access_key = "{}"
region = "garage"
datasets = ["ds", "shared-*"]
volume_scopes = ["alice"]

[tenants.mallory]
access_key_id = "{}"
secret_access_key = "{}"
region = "garage"
datasets = ["ds"]
volume_scopes = ["mallory"]

# Tenants whose credentials come from profiles of the AWS files.
[tenants.alice-profile]
profile = "alice"
region = "garage"
datasets = ["ds"]

[tenants.mallory-profile]
profile = "mallory"
region = "garage"
datasets = ["ds"]

[tenants.reader]
access_key_id = "{}"
secret_access_key = "{}"
region = "garage"
datasets = ["ds"]
"#,
            g.key_id, g.secret, alice.0, alice.1, mallory.0, mallory.1, reader.0, reader.1
        ),
    )
    .unwrap();
    // The daemon's environment holds the platform's keys too: a profile tenant must not
    // fall back to them.
    let credentials = work.join("aws-credentials");
    std::fs::write(
        &credentials,
        format!(
            "[alice]\naws_access_key_id = {}\naws_secret_access_key = {}\n\n[mallory]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            alice.0, alice.1, mallory.0, mallory.1
        ),
    )
    .unwrap();
    env.push((
        "AWS_SHARED_CREDENTIALS_FILE".into(),
        credentials.to_str().unwrap().into(),
    ));
    env.push((
        "AWS_CONFIG_FILE".into(),
        work.join("aws-config").to_str().unwrap().into(),
    ));
    let d = Daemon::start(
        env.clone(),
        &work.join("host"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let mount = |at: &str, layers: &[&str], flags: &[&str]| {
        d.mount_with(&store, &work.join(at), layers, flags)
    };
    let refused = |at: &str, layers: &[&str], flags: &[&str]| match mount(at, layers, flags) {
        Ok(_) => panic!("{layers:?} {flags:?} was mounted"),
        Err(e) => e.to_string(),
    };

    // Alice reads her dataset and commits her volume.
    let m = mount(
        "a1",
        &["ds:latest"],
        &["--tenant", "alice", "--volume", "alice/notes"],
    )
    .unwrap();
    assert!(std::fs::read(m.path("data.bin")).unwrap() == v2);
    std::fs::write(m.path("note.txt"), b"alice was here").unwrap();
    let out = m.unmount();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = mount("a2", &[], &["--tenant", "alice", "--volume", "alice/notes"]).unwrap();
    assert_eq!(
        std::fs::read(m.path("note.txt")).unwrap(),
        b"alice was here"
    );
    drop(m);
    // An earlier layer of her dataset, pinned, is hers too; another dataset's is not.
    let m = mount(
        "a3",
        &[&format!("ds@{first}")],
        &["--tenant", "alice", "--read-only"],
    )
    .unwrap();
    assert!(std::fs::read(m.path("data.bin")).unwrap() == v1);
    drop(m);

    // What is not granted is refused before the store is asked.
    let alice_flags = ["--tenant", "alice", "--read-only"];
    let err = refused("r1", &["other:latest"], &alice_flags);
    assert!(err.contains("dataset other is not granted"), "{err}");
    let err = refused("r2", &[&format!("ds@{other}")], &alice_flags);
    assert!(err.contains("not granted with the dataset"), "{err}");
    let err = refused("r3", &[], &["--tenant", "alice", "--volume", "bob/notes"]);
    assert!(err.contains("not in a scope it owns"), "{err}");
    let err = refused(
        "r4",
        &["ds:latest"],
        &[
            "--tenant",
            "alice",
            "--read-only",
            "--endpoint-url",
            "http://127.0.0.1:9",
        ],
    );
    assert!(err.contains("its own endpoint"), "{err}");
    let err = refused("r5", &["ds:latest"], &["--tenant", "nobody", "--read-only"]);
    assert!(err.contains("no tenant"), "{err}");

    // Mallory's grants let `ds` through, its credential does not: the store refuses, though
    // the daemon has the manifest cached from Alice's mounts.
    let err = refused(
        "r6",
        &["ds:latest"],
        &["--tenant", "mallory", "--read-only"],
    );
    assert!(
        err.to_lowercase().contains("denied") || err.contains("403"),
        "{err}"
    );

    // `strata run --tenant`: the command reads the tenant's dataset and writes its volume,
    // and its sandbox holds no credential, no socket, no config and no other mount.
    let other_mount = mount("o1", &["ds:latest"], &["--read-only"]).unwrap();
    let socket = d.socket().to_str().unwrap().to_string();
    let script = format!(
        "cat /data/data.bin | cksum; cat /persist/note.txt; echo; env; \
         for p in {socket} {config} {other} /etc/strata; do test -e \"$p\" && echo \"VISIBLE $p\"; done; \
         echo run-done",
        config = config.display(),
        other = other_mount.mountpoint.display(),
    );
    let out = d.strata().run(&[
        "run",
        &store,
        "--tenant",
        "alice",
        "--dataset",
        "ds:latest",
        "--volume",
        "alice/notes",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("alice was here") && stdout.contains("run-done"),
        "{stdout}"
    );
    assert!(!stdout.contains("VISIBLE"), "{stdout}");
    assert!(
        !stdout.contains("AWS_") && !stdout.contains("STRATA_"),
        "{stdout}"
    );
    let local = std::process::Command::new("sh")
        .args(["-c", &format!("cksum < {}", dir.join("data.bin").display())])
        .output()
        .unwrap();
    let sum = String::from_utf8_lossy(&local.stdout);
    assert!(
        stdout.contains(sum.split_whitespace().next().unwrap()),
        "{stdout} vs {sum}"
    );
    let err = d.strata().fails(&[
        "run",
        &store,
        "--tenant",
        "alice",
        "--dataset",
        "other:latest",
        "--",
        "true",
    ]);
    assert!(err.contains("dataset other is not granted"), "{err}");
    drop(other_mount);

    // The daemon's own records (its mount lease) are written with its own credential: a
    // tenant that may only read still has its layers kept from garbage collection (on a
    // daemon of its own, whose first mount this is).
    let d2 = Daemon::start(
        env.clone(),
        &work.join("host2"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let (rt, raw) = strata_tests::raw_store(&store, &env);
    let before = rt.block_on(raw.list("leases/mounts/")).unwrap();
    let m = d2
        .mount_with(
            &store,
            &work.join("t1"),
            &["ds:latest"],
            &["--tenant", "reader", "--read-only"],
        )
        .unwrap();
    assert!(std::fs::read(m.path("data.bin")).unwrap() == v2);
    let current = rt.block_on(raw.get("refs/ds/latest")).unwrap();
    let current = String::from_utf8_lossy(&current);
    let layer = current.lines().last().unwrap().trim().to_string();
    let leases = rt.block_on(raw.list("leases/mounts/")).unwrap();
    let held = leases
        .iter()
        .filter(|k| !before.contains(k))
        .any(|k| String::from_utf8_lossy(&rt.block_on(raw.get(k)).unwrap()).contains(&layer));
    assert!(held, "no mount lease names {layer}: {leases:?}");
    drop(m);

    // Profiles: Alice's reads; Mallory's is refused by the store, not served with the
    // platform's keys from the environment.
    let m = mount(
        "p1",
        &["ds:latest"],
        &["--tenant", "alice-profile", "--read-only"],
    )
    .unwrap();
    assert!(std::fs::read(m.path("data.bin")).unwrap() == v2);
    drop(m);
    let err = refused(
        "p2",
        &["ds:latest"],
        &["--tenant", "mallory-profile", "--read-only"],
    );
    assert!(
        err.to_lowercase().contains("denied") || err.contains("403"),
        "{err}"
    );

    // Admin commands and a daemon given no keys in their environment take the platform's
    // from the config file's [platform] table.
    let keyless: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS_KEY") && !k.starts_with("AWS_SECRET"))
        .cloned()
        .chain([("AWS_EC2_METADATA_DISABLED".to_string(), "true".to_string())])
        .collect();
    let admin = Strata::new(keyless.clone());
    let cfg = config.to_str().unwrap();
    let listed = admin.ok(&["--platform-config", cfg, "ls", &store]);
    assert!(listed.contains("ds:latest"), "{listed}");
    let dry = admin.ok(&["--platform-config", cfg, "gc", "--dry-run", &store]);
    assert!(dry.contains(&store), "{dry}");
    admin.fails(&["ls", &store]);
    let d3 = Daemon::start(keyless, &work.join("host3"), &["--config", cfg]).unwrap();
    let m = d3
        .mount_with(&store, &work.join("k1"), &["ds:latest"], &["--read-only"])
        .unwrap();
    assert!(std::fs::read(m.path("data.bin")).unwrap() == v2);
    drop(m);

    // No secret in any output or log.
    let outputs = [
        stdout,
        d.strata().ok(&["mounts", "--json"]),
        d.strata().ok(&["stats", "--json"]),
        d.log_text(),
        d2.log_text(),
        d3.log_text(),
        err,
    ];
    for secret in [&alice.1, &mallory.1, &reader.1, &g.secret] {
        for (i, text) in outputs.iter().enumerate() {
            assert!(!text.contains(secret.as_str()), "a secret is in output {i}");
        }
    }
}
