//! Suites we did not write, run on scratch mounts against a real Garage: pjdfstest (POSIX
//! semantics) over an empty layer and inside a directory of a non-empty one, and fsx (100,000
//! random operations each, checked on every read) on a new file and on files that start in a
//! layer. `scripts/test.sh` installs both.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use strata_tests::daemon::Daemon;
use strata_tests::garage;
use strata_tests::tree::{pseudo_random, write_file};

fn suites_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("suites")
}

/// A suite's binary: on PATH or in ~/.cargo/bin; a clear failure if it is not installed.
fn tool(name: &str) -> PathBuf {
    let cargo_bin = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin").join(name))
        .filter(|p| p.exists());
    if let Some(p) = cargo_bin {
        return p;
    }
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .expect("sh");
    let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
    assert!(
        !path.is_empty(),
        "{name} is not installed: `cargo install {name}` (scripts/test.sh does it)"
    );
    PathBuf::from(path)
}

/// (passed, failed, skipped) from pjdfstest's summary line.
fn pjdfstest_counts(output: &str) -> (u32, u32, u32) {
    let line = output
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| panic!("no pjdfstest summary in:\n{output}"));
    let count = |what: &str| -> u32 {
        line.split(',')
            .find(|part| part.trim().ends_with(what))
            .and_then(|part| {
                part.trim()
                    .trim_start_matches("Summary:")
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no '{what}' count in {line:?}"))
    };
    (count("passed"), count("failed"), count("skipped"))
}

fn run_pjdfstest(dir: &Path) {
    let out = Command::new(tool("pjdfstest"))
        .arg("-c")
        .arg(suites_dir().join("pjdfstest.toml"))
        .arg("-p")
        .arg(dir)
        .current_dir(dir)
        .output()
        .expect("running pjdfstest");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let (passed, failed, skipped) = pjdfstest_counts(&text);
    println!(
        "pjdfstest in {}: {passed} passed, {failed} failed, {skipped} skipped",
        dir.display()
    );
    let failures: Vec<&str> = text.lines().filter(|l| l.contains("FAILED")).collect();
    assert_eq!(failed, 0, "pjdfstest failures:\n{}", failures.join("\n"));
    // The skips are the EROFS and EXDEV cases (they need a remount or a second file system)
    // and link_count_max (glibc cannot learn a FUSE file system's LINK_MAX).
    assert!(skipped <= 16, "{skipped} skipped:\n{text}");
    assert!(passed >= 382, "only {passed} passed:\n{text}");
}

#[test]
fn pjdfstest_passes_on_scratch_over_an_empty_layer() {
    let work = strata_tests::scratch_dir("pjd-empty");
    let store = garage::bucket("pjd-empty");
    fs::create_dir_all(work.join("empty")).unwrap();
    let d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    d.strata().publish(&work.join("empty"), &store, "empty:v1");
    let m = d.mount(&store, &work.join("mnt"), &["empty:v1"]).unwrap();
    // The suite switches to unprivileged users, who must be able to work in its directory.
    fs::set_permissions(&m.mountpoint, fs::Permissions::from_mode(0o777)).unwrap();
    run_pjdfstest(&m.mountpoint);
    drop((m, d));
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn pjdfstest_passes_on_scratch_inside_a_directory_of_a_layer() {
    let work = strata_tests::scratch_dir("pjd-layer");
    let store = garage::bucket("pjd-layer");
    let src = work.join("src");
    for i in 0..50 {
        write_file(&src.join(format!("work/f{i}")), &pseudo_random(i, 5000));
        write_file(&src.join(format!("work/sub{}/g{i}", i % 5)), b"lower\n");
    }
    write_file(&src.join("other/model.bin"), &pseudo_random(99, 3 << 20));
    fs::set_permissions(src.join("work"), fs::Permissions::from_mode(0o777)).unwrap();
    let d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    d.strata().publish(&src, &store, "full:v1");
    let m = d.mount(&store, &work.join("mnt"), &["full:v1"]).unwrap();
    run_pjdfstest(&m.path("work"));
    drop((m, d));
    let _ = fs::remove_dir_all(&work);
}

/// Runs fsx with `seed` on `file`; `Err` carries the end of its output.
fn fsx(file: &Path, config: &Path, ops: u32, seed: u64) -> Result<(), String> {
    let artifacts = file.parent().unwrap().join(".fsx-artifacts");
    fs::create_dir_all(&artifacts).unwrap();
    let out = Command::new(tool("fsx"))
        .arg("-N")
        .arg(ops.to_string())
        .arg("-S")
        .arg(seed.to_string())
        .arg("-f")
        .arg(config)
        .arg("-P")
        .arg(&artifacts)
        .arg(file)
        .output()
        .expect("running fsx");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && text.contains("All operations completed A-OK") {
        Ok(())
    } else {
        Err(text.lines().rev().take(60).collect::<Vec<_>>().join("\n"))
    }
}

/// Runs fsx on `file` (whose bytes are `initial`, or which does not exist yet). The seed comes
/// from `STRATA_FSX_SEED`, else from the clock. fsx first runs with it on a plain local file
/// with the same bytes: a seed that fails there is fsx's own limit (one made a zero-length
/// `posix_fallocate` that ext4 refuses), not strata's, so it is reported and replaced; strata
/// fails the test only where the plain file passed.
fn run_fsx(file: &Path, config: &Path, ops: u32, initial: Option<&[u8]>, local_dir: &Path) {
    let given: Option<u64> = std::env::var("STRATA_FSX_SEED")
        .ok()
        .map(|s| s.parse().expect("STRATA_FSX_SEED: a number"));
    let mut seed = given.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            % 1_000_000_007
    });
    fs::create_dir_all(local_dir).unwrap();
    let local = local_dir.join(file.file_name().unwrap());
    for attempt in 0.. {
        let _ = fs::remove_file(&local);
        if let Some(bytes) = initial {
            fs::write(&local, bytes).unwrap();
        }
        match fsx(&local, config, ops, seed) {
            Ok(()) => break,
            Err(text) => {
                println!("fsx seed {seed} fails on a plain local file too, so it says nothing about strata:\n{text}");
                assert!(
                    given.is_none() && attempt < 5,
                    "fsx seed {seed} fails on a plain local file ({}); choose another",
                    local.display()
                );
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1) % 1_000_000_007;
            }
        }
    }
    println!(
        "fsx on {}: seed {seed} (replay: STRATA_FSX_SEED={seed}, or fsx -S {seed} -N {ops} -f {} FILE)",
        file.display(),
        config.display()
    );
    if let Err(text) = fsx(file, config, ops, seed) {
        panic!(
            "fsx failed on {} with seed {seed}, which passes on a plain local file:\n{text}",
            file.display()
        );
    }
}

#[test]
fn fsx_on_new_and_lower_files() {
    let work = strata_tests::scratch_dir("fsx");
    let store = garage::bucket("fsx");
    let src = work.join("src");
    write_file(&src.join("data/lower.bin"), &pseudo_random(7, 900_000));
    write_file(
        &src.join("data/lower-block.bin"),
        &pseudo_random(8, 1 << 20),
    );
    let d = Daemon::start(garage::shared().env(), &work.join("daemon"), &[]).unwrap();
    d.strata().publish(&src, &store, "fsx:v1");
    let m = d.mount(&store, &work.join("mnt"), &["fsx:v1"]).unwrap();
    let config = suites_dir().join("fsx.toml");
    let local = work.join("local");
    // A new file in the upper.
    run_fsx(&m.path("data/new.bin"), &config, 100_000, None, &local);
    // A lower file: fsx opens it with O_TRUNC (the copy-up of a truncated file).
    run_fsx(
        &m.path("data/lower.bin"),
        &config,
        100_000,
        Some(&pseudo_random(7, 900_000)),
        &local,
    );
    // A lower file that keeps its size (block mode): every write lands in a partly copied-up
    // file until all of its blocks have been written.
    let block_config = work.join("fsx-block.toml");
    fs::write(
        &block_config,
        "blockmode = true\nnosizechecks = true\n[weights]\nclose_open = 0\nread = 10\n\
         write = 10\nmapread = 10\nmapwrite = 10\ntruncate = 0\nfsync = 1\nfdatasync = 1\n",
    )
    .unwrap();
    run_fsx(
        &m.path("data/lower-block.bin"),
        &block_config,
        100_000,
        Some(&pseudo_random(8, 1 << 20)),
        &local,
    );
    drop((m, d));
    let _ = fs::remove_dir_all(&work);
}
