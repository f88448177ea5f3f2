//! Signed dataset refs against Garage: a daemon that trusts a publisher's key mounts only what
//! that publisher signed, and a ref rewritten, replayed or rolled back in the store by someone
//! without the key is refused at mount with a clear error.

use std::os::unix::fs::PermissionsExt;

use strata_tests::daemon::Daemon;
use strata_tests::garage;
use strata_tests::strata::Strata;
use strata_tests::tree::{pseudo_random, write_file};

fn layer_of(out: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("publish --json output");
    v["layer"].as_str().unwrap().to_string()
}

#[test]
fn a_host_that_trusts_a_key_mounts_only_refs_it_signed() {
    let work = strata_tests::scratch_dir("signed");
    let store = garage::bucket("signed");
    // Garage ignores conditional writes: this test is the store's only writer.
    let mut env = garage::shared().env();
    env.push(("STRATA_SINGLE_WRITER".into(), "1".into()));
    let s = Strata::new(env.clone());
    let mut outputs = String::new();
    let mut ok = |args: &[&str]| {
        let out = s.ok(args);
        outputs.push_str(&out);
        out
    };

    // A key: its secret readable by its owner only, never overwritten.
    let key = work.join("publisher.key");
    let key_arg = key.to_str().unwrap();
    let public = ok(&["key", "generate", "--out", key_arg])
        .trim()
        .to_string();
    assert!(public.starts_with("ed25519:"), "{public}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let err = s.fails(&["key", "generate", "--out", key_arg]);
    assert!(err.contains("never overwritten"), "{err}");
    assert_eq!(ok(&["key", "public", key_arg]).trim(), public);

    let dir = work.join("ds");
    let v1 = pseudo_random(1, 300 << 10);
    write_file(&dir.join("data.bin"), &v1);
    let sign = ["--sign-key", key_arg];
    let other = work.join("other");
    let o1 = pseudo_random(9, 200 << 10);
    write_file(&other.join("data.bin"), &o1);
    let publish = |ok: &mut dyn FnMut(&[&str]) -> String, target: &str, signed: bool| {
        let from = if target.starts_with("other") {
            &other
        } else {
            &dir
        };
        let mut args = vec!["publish", "--json", from.to_str().unwrap(), &store, target];
        if signed {
            args.extend(sign);
        }
        layer_of(&ok(&args))
    };
    publish(&mut ok, "ds:latest", true);
    let unsigned = publish(&mut ok, "other:latest", false);

    let host = work.join("host");
    let mut d = Daemon::start(env.clone(), &host, &["--trusted-key", &public]).unwrap();
    let mount = |d: &Daemon, at: &str, what: &str| {
        d.mount_with(&store, &work.join(at), &[what], &["--read-only"])
    };
    let refused = |d: &Daemon, at: &str, what: &str| match mount(d, at, what) {
        Ok(_) => panic!("{what} was mounted"),
        Err(e) => e.to_string(),
    };
    let m = mount(&d, "m1", "ds:latest").unwrap();
    assert!(std::fs::read(m.path("data.bin")).unwrap() == v1);
    let err = refused(&d, "m2", "other:latest");
    assert!(err.contains("not signed"), "{err}");
    // `cat` given the key checks the same way; without it, unsigned refs still read.
    let err = s.fails(&[
        "--trusted-key",
        &public,
        "cat",
        &store,
        "other:latest",
        "data.bin",
    ]);
    assert!(err.contains("not signed"), "{err}");
    assert!(s.run(&["cat", &store, "other:latest", "data.bin"]).stdout == o1);

    // The raw store, as someone who can write its objects but holds no key.
    let (rt, raw) = strata_tests::raw_store(&store, &env);
    let first = rt.block_on(raw.get("refs/ds/latest")).unwrap();

    // A second signed version; the host sees it.
    let v2 = pseudo_random(2, 300 << 10);
    write_file(&dir.join("data.bin"), &v2);
    let layer2 = publish(&mut ok, "ds:latest", true);
    let m3 = mount(&d, "m3", "ds:latest").unwrap();
    assert!(std::fs::read(m3.path("data.bin")).unwrap() == v2);
    let second = rt.block_on(raw.get("refs/ds/latest")).unwrap();

    // Rolled back: the first signed ref put back. Refused, after a restart too.
    rt.block_on(raw.put("refs/ds/latest", first)).unwrap();
    let err = refused(&d, "m4", "ds:latest");
    assert!(err.contains("rolled back"), "{err}");
    drop((m, m3));
    d.stop().unwrap();
    d.restart().unwrap();
    let err = refused(&d, "m4", "ds:latest");
    assert!(err.contains("rolled back"), "{err}");

    // Rewritten: an unsigned ref to another layer (`strata tag` without a key).
    ok(&["tag", &store, "other:latest", "ds:latest"]);
    let err = refused(&d, "m5", "ds:latest");
    assert!(err.contains("not signed"), "{err}");
    // Replayed: ds's signed ref copied under another tag.
    rt.block_on(raw.put("refs/ds/copy", second.clone()))
        .unwrap();
    let err = refused(&d, "m6", "ds:copy");
    assert!(err.contains("does not match"), "{err}");

    // Put right, a pinned layer is mounted while a signed tag points at it, and only then.
    let second_again = second.clone();
    rt.block_on(raw.put("refs/ds/latest", second)).unwrap();
    let pinned = mount(&d, "m7", &format!("ds@{layer2}")).unwrap();
    assert!(std::fs::read(pinned.path("data.bin")).unwrap() == v2);
    let err = refused(&d, "m8", &format!("ds@{unsigned}"));
    assert!(err.contains("no tag of ds points at this layer"), "{err}");

    // A signed removal: the tag is gone for the host.
    ok(&["rm", &store, "ds:latest", "--sign-key", key_arg]);
    let err = refused(&d, "m9", "ds:latest");
    assert!(err.contains("not found"), "{err}");

    // Deleted by someone without the key, then published anew: the new ref's sequence still
    // passes the old one's, which cannot be put back over it.
    rt.block_on(raw.delete("refs/ds/latest")).unwrap();
    let v3 = pseudo_random(3, 300 << 10);
    write_file(&dir.join("data.bin"), &v3);
    publish(&mut ok, "ds:latest", true);
    let m = mount(&d, "m11", "ds:latest").unwrap();
    assert!(std::fs::read(m.path("data.bin")).unwrap() == v3);
    rt.block_on(raw.put("refs/ds/latest", second_again))
        .unwrap();
    let err = refused(&d, "m12", "ds:latest");
    assert!(err.contains("rolled back"), "{err}");

    // A host that trusts no key mounts unsigned refs as before, unless the mount asks for
    // signatures itself.
    let open = Daemon::start(env.clone(), &work.join("open-host"), &[]).unwrap();
    let m = mount(&open, "m10", "other:latest").unwrap();
    assert!(std::fs::read(m.path("data.bin")).unwrap() == o1);
    let asked = work.join("m13");
    std::fs::create_dir_all(&asked).unwrap();
    let err = open.strata().fails(&[
        "--trusted-key",
        &public,
        "mount",
        &store,
        asked.to_str().unwrap(),
        "--layer",
        "other:latest",
        "--read-only",
    ]);
    assert!(err.contains("not signed"), "{err}");

    // The secret never appears in any output or log.
    let secret = std::fs::read_to_string(&key).unwrap();
    let secret = secret.lines().nth(1).unwrap();
    assert_eq!(secret.len(), 64);
    for (what, text) in [
        ("command output", outputs.as_str()),
        ("daemon log", &d.log_text()),
    ] {
        assert!(!text.contains(secret), "the secret key is in the {what}");
    }
}
