//! The store goes away under a mount: a read waits (retrying) for a store that comes back
//! within the read deadline, fails with EIO (never hangs) for one that does not, and the mount
//! keeps working once the store is back.

use std::time::{Duration, Instant};

use strata_tests::daemon::Daemon;
use strata_tests::garage;
use strata_tests::tree::{pseudo_random, write_file};

#[test]
fn reads_ride_out_a_short_outage_and_fail_cleanly_on_a_long_one() {
    let work = strata_tests::scratch_dir("outage");
    let src = work.join("src");
    let one = pseudo_random(41, 8 << 20);
    let two = pseudo_random(42, 8 << 20);
    write_file(&src.join("one.bin"), &one);
    write_file(&src.join("two.bin"), &two);
    let mut g = garage::dedicated();
    g.create_bucket("outage").unwrap();
    let d = Daemon::start(g.env(), &work.join("daemon"), &["--read-timeout", "8s"]).unwrap();
    d.strata().publish(&src, "s3://outage", "o:v1");
    let m = d
        .mount("s3://outage", &work.join("mnt"), &["o:v1"])
        .unwrap();

    // Short outage: the store is back within the deadline, the read completes correctly.
    g.stop();
    let path = m.path("one.bin");
    let reader = std::thread::spawn(move || std::fs::read(path));
    std::thread::sleep(Duration::from_secs(2));
    g.spawn_server().unwrap();
    let got = reader.join().unwrap().expect("read across a short outage");
    assert!(got == one, "bytes differ after the outage");
    assert!(
        d.log_text().contains("retrying"),
        "the read did meet the outage: {}",
        d.log_text()
    );

    // Long outage: EIO within the deadline (plus slack), no hang.
    g.stop();
    let started = Instant::now();
    let err = std::fs::read(m.path("two.bin")).expect_err("store is down");
    let waited = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(30),
        "failed after {waited:?}"
    );
    assert!(
        d.log_text().contains("did not answer within"),
        "{}",
        d.log_text()
    );

    // The mount stays usable: with the store back, the same file reads correctly.
    g.spawn_server().unwrap();
    assert!(std::fs::read(m.path("two.bin")).unwrap() == two);
    drop((m, d));
    let _ = std::fs::remove_dir_all(&work);
}
