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

/// Tenants kept apart by the store itself (moto enforcing IAM policies): each tenant's
/// volumes are in a home of its own (`volume_home`) that only its credential may write,
/// and it may only read the refs of its datasets. A mount the daemon's grants let through
/// (a tenant configured as if the daemon checked nothing) is refused by the store.
#[test]
fn tenants_volume_homes_are_kept_apart_by_the_store() {
    let work = strata_tests::scratch_dir("tenant-homes");
    let bucket = "tenant-homes";
    let arn = |rest: &str| format!("arn:aws:s3:::{bucket}/{rest}");
    // What a tenant may do: read the content-addressed objects of the datasets' store and
    // the refs of its datasets, and read and write its home.
    let tenant_policy = |name: &str, datasets: &[&str]| {
        let mut read: Vec<String> = ["layers/*", "packs/*", "moved/*", "prefetch/*"]
            .iter()
            .map(|k| arn(&format!("data/{k}")))
            .collect();
        for d in datasets {
            read.push(arn(&format!("data/refs/{d}")));
            read.push(arn(&format!("data/history/{d}")));
        }
        serde_json::json!([
            {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": read},
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
             "Resource": [arn(&format!("homes/{name}/*"))]},
            {"Effect": "Allow", "Action": ["s3:ListBucket"],
             "Resource": [format!("arn:aws:s3:::{bucket}")],
             "Condition": {"StringLike": {"s3:prefix": [format!("homes/{name}/*")]}}},
        ])
    };
    let (moto, keys) = strata_tests::moto::Moto::start_with_iam(
        &[bucket],
        &[
            ("alice", tenant_policy("alice", &["models/*", "shared-*"])),
            ("bob", tenant_policy("bob", &["shared-*"])),
        ],
    )
    .unwrap();
    let key = |n: &str| (keys[n].0.as_str(), keys[n].1.as_str());
    let data = format!("s3://{bucket}/data");
    let home = |t: &str| format!("s3://{bucket}/homes/{t}");
    let platform_env = moto.env_as(key("admin"));
    let platform = Strata::new(platform_env.clone());

    let models = pseudo_random(10, 3 << 20);
    write_file(&work.join("models/weights.bin"), &models);
    write_file(&work.join("models/config.txt"), b"layers = 12");
    platform.publish(&work.join("models"), &data, "models:v1");
    let tables = pseudo_random(11, 100 << 10);
    write_file(&work.join("tables/t.csv"), &tables);
    platform.publish(&work.join("tables"), &data, "shared-tables:v1");

    let tenant = |name: &str, k: &str, datasets: &str, scopes: &str, home_of: &str| {
        format!(
            "[tenants.{name}]\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\
             datasets = {datasets}\nvolume_scopes = {scopes}\nvolume_home = \"{}\"\n\n",
            key(k).0,
            key(k).1,
            home(home_of)
        )
    };
    let config = work.join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "[platform]\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\n{}{}{}",
            key("admin").0,
            key("admin").1,
            tenant(
                "alice",
                "alice",
                r#"["models", "shared-*"]"#,
                r#"["alice"]"#,
                "alice"
            ),
            tenant("bob", "bob", r#"["shared-*"]"#, r#"["bob"]"#, "bob"),
            // Bob's credential with grants that check nothing: what the store alone does.
            tenant("bob-unchecked", "bob", r#"["*"]"#, r#"["alice"]"#, "alice"),
        ),
    )
    .unwrap();
    // The daemon's environment holds no keys: the platform's come from its config.
    let mut env: Vec<(String, String)> = platform_env
        .iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET"))
        .cloned()
        .collect();
    env.push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
    let d = Daemon::start(
        env,
        &work.join("host"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let mount = |at: &str, layers: &[&str], flags: &[&str]| {
        d.mount_with(&data, &work.join(at), layers, flags)
    };
    let refused = |at: &str, layers: &[&str], flags: &[&str]| match mount(at, layers, flags) {
        Ok(_) => panic!("{layers:?} {flags:?} was mounted"),
        Err(e) => e.to_string(),
    };
    let unmounted = |m: strata_tests::daemon::DaemonMount| {
        let out = m.unmount();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // Alice reads her datasets and commits her volume: a new file, a dataset file renamed
    // and one rewritten in place (whose kept bytes are stored again, in her home).
    let alice = ["--tenant", "alice", "--volume", "alice/notes"];
    let m = mount("a1", &["models:v1", "shared-tables:v1"], &alice).unwrap();
    assert!(std::fs::read(m.path("weights.bin")).unwrap() == models);
    assert!(std::fs::read(m.path("t.csv")).unwrap() == tables);
    std::fs::write(m.path("note.txt"), b"alice was here").unwrap();
    std::fs::rename(m.path("config.txt"), m.path("config.old")).unwrap();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.path("weights.bin"))
            .unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(b"tuned").unwrap();
    }
    unmounted(m);
    let mut tuned = models.clone();
    tuned[1 << 20..(1 << 20) + 5].copy_from_slice(b"tuned");

    // (Checked by name: moto cannot list a prefix with a `/` when it enforces IAM, its
    // issue #5948.)
    let (rt, raw) = strata_tests::raw_store(&format!("s3://{bucket}"), &platform_env);
    let exists = |key: &str| rt.block_on(raw.head(key)).unwrap().is_some();
    assert!(
        exists("homes/alice/volumes/alice/notes/head"),
        "alice's head is in her home"
    );
    assert!(
        !exists("data/volumes/alice/notes/head"),
        "no volume in the datasets' store"
    );

    let m = mount("a2", &["models:v1", "shared-tables:v1"], &alice).unwrap();
    assert_eq!(
        std::fs::read(m.path("note.txt")).unwrap(),
        b"alice was here"
    );
    assert_eq!(std::fs::read(m.path("config.old")).unwrap(), b"layers = 12");
    assert!(std::fs::read(m.path("weights.bin")).unwrap() == tuned);
    drop(m);

    // Bob mounts the shared dataset and commits his own volume.
    let bob = ["--tenant", "bob", "--volume", "bob/scratch"];
    let m = mount("b1", &["shared-tables:v1"], &bob).unwrap();
    assert!(std::fs::read(m.path("t.csv")).unwrap() == tables);
    std::fs::write(m.path("bob.txt"), b"bob's").unwrap();
    unmounted(m);
    assert!(exists("homes/bob/volumes/bob/scratch/head"));

    // The daemon refuses Bob what he is not granted…
    let err = refused("r1", &["models:v1"], &["--tenant", "bob", "--read-only"]);
    assert!(err.contains("dataset models is not granted"), "{err}");
    let err = refused(
        "r2",
        &["shared-tables:v1"],
        &["--tenant", "bob", "--volume", "alice/notes"],
    );
    assert!(err.contains("not in a scope it owns"), "{err}");
    // …and where its grants let everything through, the store refuses his credential:
    // another tenant's dataset refs, and another tenant's home.
    fn unchecked<'a>(flags: &[&'a str]) -> Vec<&'a str> {
        let mut f = vec!["--tenant", "bob-unchecked"];
        f.extend(flags);
        f
    }
    let first_line = |e: &str| e.lines().next().unwrap_or("").to_string();
    let err = first_line(&refused("r3", &["models:v1"], &unchecked(&["--read-only"])));
    assert!(
        err.contains("refs/models/v1") && err.ends_with("HTTP 403 AccessDenied: Access Denied"),
        "{err}"
    );
    let err = refused(
        "r4",
        &["shared-tables:v1"],
        &unchecked(&["--volume", "alice/notes"]),
    );
    let err = first_line(&err);
    assert!(
        err.contains("homes/alice")
            && err.contains("volumes/alice/notes/head")
            && err.contains("AccessDenied"),
        "{err}"
    );
    // Nor can his credential write the datasets' store or Alice's home.
    let (brt, as_bob) =
        strata_tests::raw_store(&format!("s3://{bucket}"), &moto.env_as(key("bob")));
    for k in [
        "data/packs/00/planted",
        "homes/alice/volumes/alice/notes/head",
    ] {
        let put = brt.block_on(as_bob.put(k, bytes::Bytes::from_static(b"x")));
        assert!(put.is_err(), "bob wrote {k}");
    }
    assert!(brt
        .block_on(as_bob.get("homes/alice/volumes/alice/notes/head"))
        .is_err());

    // No secret in what the daemon told anyone.
    let log = d.log_text();
    for (_, (id, secret)) in keys.iter() {
        assert!(
            !log.contains(secret.as_str()),
            "a secret is in the daemon's log"
        );
        let _ = id;
    }
}

/// A tenant's home is a store of its own to garbage collection: the daemon's lease there
/// names the volume's layers (and the datasets' store's lease the datasets'), so collecting
/// either store while a mount is open, after a squash, finds nothing missing and frees what
/// the squash replaced once no mount needs it; a fresh daemon then reads every byte.
#[test]
fn a_tenants_home_is_collected_as_a_store_of_its_own() {
    let work = strata_tests::scratch_dir("home-gc");
    let moto = strata_tests::moto::shared();
    let bucket = strata_tests::moto::bucket("home-gc");
    let (data, home) = (format!("{bucket}/data"), format!("{bucket}/homes/alice"));
    let platform = Strata::new(moto.env());
    let weights = pseudo_random(20, 2 << 20);
    write_file(&work.join("models/weights.bin"), &weights);
    platform.publish(&work.join("models"), &data, "models:v1");
    let config = work.join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "[tenants.alice]\naccess_key_id = \"testing\"\nsecret_access_key = \"testing\"\n\
             datasets = [\"models\"]\nvolume_scopes = [\"alice\"]\nvolume_home = \"{home}\"\n"
        ),
    )
    .unwrap();
    let start = |dir: &str| {
        Daemon::start(
            moto.env(),
            &work.join(dir),
            &["--config", config.to_str().unwrap()],
        )
        .unwrap()
    };
    let d = start("host");
    let flags = ["--tenant", "alice", "--volume", "alice/notes"];
    let mount = |d: &Daemon, at: &str| {
        d.mount_with(&data, &work.join(at), &["models:v1"], &flags)
            .unwrap()
    };
    let gc = |store: &str| {
        let out = platform.ok(&[
            "gc",
            "--json",
            "--grace",
            "0s",
            "--keep-replaced",
            "0s",
            store,
        ]);
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["problems"], serde_json::json!([]), "{store}: {out}");
        report["deleted"]["layers"]["objects"].as_u64().unwrap_or(0)
    };
    let a_second = || std::thread::sleep(std::time::Duration::from_millis(1100));

    let m = mount(&d, "m1");
    std::fs::write(m.path("one.txt"), b"first commit").unwrap();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.path("weights.bin"))
            .unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(b"tuned").unwrap();
    }
    drop(m);
    let mut tuned = weights.clone();
    tuned[4096..4101].copy_from_slice(b"tuned");
    let m = mount(&d, "m2");
    std::fs::write(m.path("two.txt"), b"second commit").unwrap();
    drop(m);
    // A mount open from the head of two commits, while the chain is squashed and both
    // stores are collected.
    let open = mount(&d, "open");
    platform.ok(&["volume", "squash", &home, "alice/notes"]);
    a_second();
    assert_eq!(gc(&data), 0, "the datasets' store keeps its layer");
    gc(&home);
    std::fs::write(open.path("three.txt"), b"third commit").unwrap();
    drop(open);
    // Once the daemon has taken the mount out of its lease (in the background), what the
    // squash replaced goes: its two commits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut freed = 0;
    while freed < 2 {
        a_second();
        freed += gc(&home);
        assert!(
            std::time::Instant::now() < deadline,
            "{freed} of 2 layers went"
        );
    }
    assert_eq!(gc(&data), 0);

    let fresh = start("host2");
    let m = mount(&fresh, "check");
    assert_eq!(std::fs::read(m.path("one.txt")).unwrap(), b"first commit");
    assert_eq!(std::fs::read(m.path("two.txt")).unwrap(), b"second commit");
    assert_eq!(std::fs::read(m.path("three.txt")).unwrap(), b"third commit");
    assert!(std::fs::read(m.path("weights.bin")).unwrap() == tuned);
}

/// Tenants' agents on the socket: a uid the config maps to a tenant mounts only as that
/// tenant, only on a directory it owns, and sees, commits and unmounts only its own mounts;
/// the host's stats are the platform's; a uid the config does not name is refused.
#[test]
fn a_tenants_agent_mounts_only_as_itself_on_its_own_directories() {
    use std::os::unix::process::CommandExt;
    let work = strata_tests::scratch_dir("agents");
    let moto = strata_tests::moto::shared();
    let store = strata_tests::moto::bucket("agents");
    let platform = Strata::new(moto.env());
    let weights = pseudo_random(30, 300 << 10);
    write_file(&work.join("models/weights.bin"), &weights);
    platform.publish(&work.join("models"), &store, "models:v1");
    let (alice, bob, stranger) = (4101u32, 4102u32, 4103u32);
    // An operator: a user in the platform group.
    let (operator, operators) = (4104u32, 4200u32);
    let config = work.join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "platform_group = {operators}\n\n\
             [tenants.alice]\naccess_key_id = \"testing\"\nsecret_access_key = \"testing\"\n\
             datasets = [\"models\"]\nvolume_scopes = [\"alice\"]\nuids = [{alice}]\n\n\
             [tenants.bob]\naccess_key_id = \"testing\"\nsecret_access_key = \"testing\"\n\
             datasets = [\"models\"]\nuids = [{bob}]\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(
        moto.env(),
        &work.join("host"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let dir_of = |name: &str, owner: u32| {
        let p = work.join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::os::unix::fs::chown(&p, Some(owner), Some(owner)).unwrap();
        p
    };
    // The binary where the agents may run it (a checkout may be in a directory only root
    // may enter).
    let bin = work.join("strata");
    std::fs::copy(strata_tests::strata::strata_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let as_uid = |uid: u32, args: &[&str]| {
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(args).envs(d.strata().env);
        let gid = if uid == operator { operators } else { uid };
        cmd.uid(uid).gid(gid).env("HOME", &work);
        cmd.output().expect("running strata")
    };
    let fails = |uid: u32, args: &[&str]| {
        let out = as_uid(uid, args);
        assert!(!out.status.success(), "{args:?} as {uid} worked");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let succeeded = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let own = dir_of("alice-mnt", alice);
    let root_owned = dir_of("root-mnt", 0);
    let mount = |uid: u32, at: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "mount",
            &store,
            at.to_str().unwrap(),
            "--layer",
            "models:v1",
        ];
        args.extend(extra);
        as_uid(uid, &args)
    };

    // Alice's agent mounts as Alice (without saying so) on her own directory.
    let out = mount(alice, &own, &["--volume", "alice/notes"]);
    succeeded(&out);
    assert!(std::fs::read(own.join("weights.bin")).unwrap() == weights);
    let listed = String::from_utf8_lossy(&as_uid(alice, &["mounts", "--json"]).stdout).into_owned();
    assert!(
        listed.contains("alice-mnt") && listed.contains("\"alice\""),
        "{listed}"
    );

    // Not on a directory she does not own, nor through a symlink she planted, nor as Bob.
    let err = String::from_utf8_lossy(&mount(alice, &root_owned, &[]).stderr).into_owned();
    assert!(err.contains("not owned by uid 4101"), "{err}");
    let link = work.join("alice-link");
    std::os::unix::fs::symlink(&root_owned, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(alice), Some(alice)).unwrap();
    let err = String::from_utf8_lossy(&mount(alice, &link, &[]).stderr).into_owned();
    assert!(
        err.contains("not owned by uid 4101") || err.contains("symlink"),
        "{err}"
    );
    let err =
        String::from_utf8_lossy(&mount(alice, &dir_of("a2", alice), &["--tenant", "bob"]).stderr)
            .into_owned();
    assert!(err.contains("may not mount as tenant bob"), "{err}");

    // The platform's mount is not hers to see or unmount; her mount is not Bob's.
    let m = d.mount(&store, &root_owned, &["models:v1"]).unwrap();
    let listed = String::from_utf8_lossy(&as_uid(alice, &["mounts", "--json"]).stdout).into_owned();
    assert!(!listed.contains("root-mnt"), "{listed}");
    // (The CLI, not seeing them among the daemon's mounts, tries an unmount of its own,
    // which the kernel refuses a user.)
    fails(alice, &["unmount", root_owned.to_str().unwrap()]);
    assert!(
        root_owned.join("weights.bin").exists(),
        "the platform's mount is still there"
    );
    fails(bob, &["unmount", own.to_str().unwrap()]);
    assert!(
        own.join("weights.bin").exists(),
        "alice's mount is still there"
    );
    let err = fails(bob, &["commit", own.to_str().unwrap()]);
    assert!(err.contains("not mounted"), "{err}");
    let err = fails(alice, &["stats"]);
    assert!(err.contains("the platform's"), "{err}");
    let err = fails(stranger, &["mounts"]);
    assert!(err.contains("permission denied"), "{err}");
    // The platform group sees everything.
    let out = as_uid(operator, &["mounts", "--json"]);
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listed.contains("root-mnt") && listed.contains("alice-mnt"),
        "{listed}"
    );
    assert!(as_uid(operator, &["stats"]).status.success());
    // So does a member of it among many other groups (more than the 256 of a peer's groups
    // the daemon once read); the same many groups without it give nothing.
    let in_many_groups = |last: u32| {
        let groups: Vec<String> = (5000..5300).chain([last]).map(|g| g.to_string()).collect();
        std::process::Command::new("setpriv")
            .args(["--reuid", "4105", "--regid", "4105", "--groups"])
            .arg(groups.join(","))
            .arg(&bin)
            .arg("stats")
            .envs(d.strata().env)
            .env("HOME", &work)
            .output()
            .expect("running setpriv")
    };
    succeeded(&in_many_groups(operators));
    let out = in_many_groups(5300);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains("permission denied"),
        "{err}"
    );
    drop(m);

    // A parent of her mount renamed and a symlink planted in its place cannot turn her
    // unmount (sent as she could send it, raw on the socket) onto the platform's mount: the
    // daemon takes down the mount it made, where it is now.
    let area = dir_of("alice-area", alice);
    let ws = dir_of("alice-area/x/ws", alice);
    std::os::unix::fs::chown(area.join("x"), Some(alice), Some(alice)).unwrap();
    let out = mount(alice, &ws, &[]);
    succeeded(&out);
    let victim = dir_of("pp/ws", 0);
    let m = d.mount(&store, &victim, &["models:v1"]).unwrap();
    std::fs::rename(area.join("x"), area.join("y")).unwrap();
    std::os::unix::fs::symlink(work.join("pp"), area.join("x")).unwrap();
    let raw = |uid: u32, request: serde_json::Value| {
        let line = serde_json::json!({"version": 1, "request": request}).to_string();
        request_as(uid, d.socket(), &line)
    };
    let reply = raw(
        alice,
        serde_json::json!({"op": "unmount", "mountpoint": ws, "lazy": true}),
    );
    assert!(reply.contains("\"ok\""), "{reply}");
    assert!(
        victim.join("weights.bin").exists(),
        "the platform's mount is still there"
    );
    assert!(
        !area.join("y/ws/weights.bin").exists(),
        "her mount went, from where it had moved"
    );
    drop(m);

    // Her own: she writes, commits, and unmounts it.
    std::fs::write(own.join("note.txt"), b"from the agent").unwrap();
    let out = as_uid(alice, &["unmount", own.to_str().unwrap()]);
    succeeded(&out);
    let out = mount(alice, &own, &["--volume", "alice/notes"]);
    succeeded(&out);
    assert_eq!(
        std::fs::read(own.join("note.txt")).unwrap(),
        b"from the agent"
    );
    let out = as_uid(alice, &["unmount", own.to_str().unwrap()]);
    succeeded(&out);
}

/// Sends one request line on the daemon's socket as user `uid` (as an agent could, without
/// the CLI) and returns the reply line.
fn request_as(uid: u32, socket: &std::path::Path, line: &str) -> String {
    use std::io::{BufRead, Write};
    let (socket, line) = (socket.to_path_buf(), line.to_string());
    std::thread::spawn(move || {
        // SAFETY: the raw system calls change this thread's credentials only (the kernel
        // keeps them per thread; libc's wrappers would change every thread of the test), and
        // the thread ends right after.
        unsafe {
            let none = std::ptr::null::<libc::gid_t>();
            assert_eq!(libc::syscall(libc::SYS_setgroups, 0usize, none), 0);
            assert_eq!(libc::syscall(libc::SYS_setresgid, uid, uid, uid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        std::io::BufReader::new(s).read_line(&mut reply).unwrap();
        reply
    })
    .join()
    .unwrap()
}
