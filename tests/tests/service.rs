//! Running strata as a host's service, as an operator installs it: the systemd unit (checked
//! by `systemd-analyze verify`; the daemon run with exactly the unit's capability bounding set
//! and no new privileges, telling a service manager when it is ready), `mount -t fuse.strata`
//! and fstab lines through the mount helper, shell completions and man pages.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use strata_tests::daemon::Daemon;
use strata_tests::garage;
use strata_tests::strata::{strata_bin, Strata};
use strata_tests::tree::{pseudo_random, write_file};

fn unit_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd/strata.service")
}

fn env() -> Vec<(String, String)> {
    let mut env = garage::shared().env();
    env.push(("STRATA_SINGLE_WRITER".into(), "1".into()));
    env
}

/// The value of `key=` in the unit's [Service] section.
fn unit_setting(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit sets no {key}"))
        .to_string()
}

#[test]
fn the_systemd_unit_verifies_with_the_generated_man_page() {
    let work = strata_tests::scratch_dir("unit");
    // The unit as installed, pointing at this build's binary (verify checks it is executable).
    let unit = std::fs::read_to_string(unit_file()).unwrap();
    let exec = unit_setting(&unit, "ExecStart");
    let installed = unit.replace(
        exec.split_whitespace().next().unwrap(),
        strata_bin().to_str().unwrap(),
    );
    let dir = work.join("system");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("strata.service"), installed).unwrap();
    // Documentation=man:strata(1) must resolve: the page `strata man` writes.
    let man = work.join("man/man1");
    Strata::new(vec![]).ok(&["man", "--dir", man.to_str().unwrap()]);
    let out = Command::new("systemd-analyze")
        .args(["verify", dir.join("strata.service").to_str().unwrap()])
        .env("MANPATH", work.join("man"))
        .output()
        .expect("systemd-analyze (package systemd) runs");
    // Only what it says of this unit (the host's own units may draw warnings too).
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("strata")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );
}

/// The daemon under the unit's own limits: only the capabilities of its bounding set, no new
/// privileges. It must still mount, serve reads (passthrough too), commit a volume, and tell
/// a service manager READY=1 once clients can connect and STOPPING=1 at the stop.
#[test]
fn the_daemon_serves_with_only_the_units_capabilities() {
    let work = strata_tests::scratch_dir("caps");
    let unit = std::fs::read_to_string(unit_file()).unwrap();
    let caps: Vec<String> = unit_setting(&unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert_eq!(unit_setting(&unit, "NoNewPrivileges"), "yes");
    assert_eq!(unit_setting(&unit, "Type"), "notify");
    let bounding = format!("--bounding-set=-all,{}", caps.join(","));
    let wrapper = [
        "setpriv",
        bounding.as_str(),
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
    ];

    let notify_path = work.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut denv = env();
    denv.push(("NOTIFY_SOCKET".into(), notify_path.display().to_string()));
    let mut d = Daemon::start_under(&wrapper, denv, &work.join("daemon"), &[]).unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 from the daemon");
    assert_eq!(&buf[..n], b"READY=1");
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", d.pid().expect("daemon running")))
            .unwrap();
    assert!(
        status.lines().any(|l| l == "NoNewPrivs:\t1"),
        "the daemon runs without new privileges:\n{status}"
    );

    let store = garage::bucket("caps");
    let src = work.join("src");
    let big = pseudo_random(7, 3 << 20);
    write_file(&src.join("model.bin"), &big);
    write_file(&src.join("etc/conf"), b"answer = 42\n");
    d.strata().publish(&src, &store, "svc:v1");
    let vol = ["--volume", "svc/state"];
    {
        let m = d
            .mount_with(&store, &work.join("m1"), &["svc:v1"], &vol)
            .unwrap();
        // Twice: the second open of the now cached file may be handed to the kernel
        // (passthrough, where it has it).
        for _ in 0..2 {
            assert!(std::fs::read(m.path("model.bin")).unwrap() == big);
        }
        std::fs::write(m.path("out.txt"), b"written under the unit's limits\n").unwrap();
    }
    {
        let m = d
            .mount_with(&store, &work.join("m2"), &["svc:v1"], &vol)
            .unwrap();
        assert_eq!(
            std::fs::read(m.path("out.txt")).unwrap(),
            b"written under the unit's limits\n"
        );
        assert_eq!(std::fs::read(m.path("etc/conf")).unwrap(), b"answer = 42\n");
    }
    let log = d.log_text();
    assert!(
        !log.contains("ERROR") && !log.contains("Operation not permitted"),
        "the daemon ran into its limits:\n{log}"
    );
    d.stop().unwrap();
    let n = notify.recv(&mut buf).expect("STOPPING=1 from the daemon");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

/// What mount(8) runs for an fstab line of type fuse.strata: the helper, a link to the strata
/// binary, mounts through the daemon; `umount` ends the mount like `strata unmount` would.
#[test]
fn fstab_lines_mount_through_the_helper() {
    let work = strata_tests::scratch_dir("fstab");
    let d = Daemon::start(env(), &work.join("daemon"), &[]).unwrap();
    let store = garage::bucket("fstab");
    let src = work.join("src");
    write_file(&src.join("hello.txt"), b"hello from fstab\n");
    d.strata().publish(&src, &store, "tab:v1");
    let helper = work.join("bin/mount.fuse.strata");
    std::fs::create_dir_all(helper.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(strata_bin(), &helper).unwrap();

    // As mount(8) calls it: SOURCE DIR -o OPTIONS, plus options meant for mount and systemd.
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let options = format!(
        "rw,nosuid,nodev,_netdev,x-systemd.requires=strata.service,ro,layer=tab:v1,socket={}",
        d.socket().display()
    );
    let out = Command::new(&helper)
        .args([store.as_str(), mnt.to_str().unwrap(), "-o", &options, "-n"])
        .envs(env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount.fuse.strata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(mnt.join("hello.txt")).unwrap(),
        b"hello from fstab\n"
    );
    let e = std::fs::write(mnt.join("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "ro was asked for");

    // umount(8), not strata: the daemon sees its session end and forgets the mount.
    let out = Command::new("umount").arg(&mnt).output().unwrap();
    assert!(
        out.status.success(),
        "umount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mounts = d.strata().ok(&["mounts"]);
        if mounts.trim() == "no mounts" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still listed after umount:\n{mounts}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // And through mount(8) itself, which finds the helper in /sbin (linked for this test).
    let link = Path::new("/sbin/mount.fuse.strata");
    struct Unlink(&'static Path);
    impl Drop for Unlink {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    // A link an earlier run left (its binary maybe gone) is replaced; anything else is the
    // host's own installation, used as it is.
    let _unlink = match std::fs::symlink_metadata(link) {
        Ok(m) if !m.file_type().is_symlink() => None,
        _ => {
            let _ = std::fs::remove_file(link);
            std::os::unix::fs::symlink(strata_bin(), link).unwrap();
            Some(Unlink(link))
        }
    };
    let options = format!("layer=tab:v1,ro,socket={}", d.socket().display());
    let out = Command::new("mount")
        .args([
            "-t",
            "fuse.strata",
            "-o",
            &options,
            &store,
            mnt.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -t fuse.strata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(mnt.join("hello.txt")).unwrap(),
        b"hello from fstab\n"
    );
    let mounts = d.strata().ok(&["mounts"]);
    assert!(mounts.contains(mnt.to_str().unwrap()), "{mounts}");
    let out = Command::new("umount").arg(&mnt).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(_unlink);

    // An option strata does not know is refused with what it does know, and nothing mounts.
    let out = Command::new(&helper)
        .args([
            store.as_str(),
            mnt.to_str().unwrap(),
            "-o",
            "layer=tab:v1,colour=blue",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("colour=blue") && stderr.contains("layer=NAME:TAG"),
        "{stderr}"
    );
    assert!(!strata_fuse::is_strata_mount(&mnt).unwrap());
}

#[test]
fn completions_and_man_pages_come_from_the_command_line() {
    let work = strata_tests::scratch_dir("docs");
    let s = Strata::new(vec![]);
    let script = work.join("strata.bash");
    std::fs::write(&script, s.ok(&["completions", "bash"])).unwrap();
    // bash completes `strata g` to the commands that start with g.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(strata g); COMP_CWORD=1; COMP_LINE='strata g'; COMP_POINT=8; \
             _strata strata g strata; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .output()
        .unwrap();
    let words = String::from_utf8_lossy(&out.stdout);
    assert!(
        words.lines().any(|w| w == "gc"),
        "bash completion of `strata g`: {words:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for shell in ["zsh", "fish"] {
        let text = s.ok(&["completions", shell]);
        assert!(
            text.contains("publish") && text.contains("keep-history"),
            "{shell}"
        );
    }

    let dir = work.join("man");
    s.ok(&["man", "--dir", dir.to_str().unwrap()]);
    for page in ["strata.1", "strata-gc.1", "strata-volume-history.1"] {
        assert!(dir.join(page).exists(), "{page} was not written");
    }
    let out = Command::new("man")
        .arg("-l")
        .arg(dir.join("strata-gc.1"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("--grace") && text.contains("--dry-run"),
        "man -l strata-gc.1:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `strata top` in a real terminal (tmux): it shows a mount made while it runs, its hit
/// ratio once the function has read, and quits on `q`.
#[test]
fn top_follows_the_daemon_live_and_quits_on_q() {
    let work = strata_tests::scratch_dir("top");
    let d = Daemon::start(env(), &work.join("daemon"), &[]).unwrap();
    let store = garage::bucket("top");
    let data = pseudo_random(3, 4 << 20);
    write_file(&work.join("src/data.bin"), &data);
    d.strata().publish(&work.join("src"), &store, "top:v1");

    let server = format!("strata-top-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &server])
            .args(args)
            .output()
            .expect("tmux runs (scripts/test.sh installs it)")
    };
    let command = format!(
        "env STRATA_SOCKET={} {} top --interval 200ms",
        d.socket().display(),
        strata_bin().display()
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "200",
        "-y",
        "40",
        &command,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let screen =
        || String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned();
    let wait_for = |what: &dyn Fn(&str) -> bool, why: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let s = screen();
            if what(&s) {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{why}; the screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(
        &|s| s.contains("0 mounts") && s.contains("MOUNT"),
        "top starts",
    );

    let m = d
        .mount_with(&store, &work.join("mnt"), &["top:v1"], &["--read-only"])
        .unwrap();
    let mp = m.mountpoint.display().to_string();
    let row = |s: &str| s.lines().find(|l| l.starts_with(&mp)).map(str::to_string);
    let first = wait_for(
        &|s| s.contains("1 mounts") && row(s).is_some(),
        "the new mount shows",
    );
    assert!(
        row(&first).unwrap().contains(" - "),
        "nothing read yet: no hit ratio\n{first}"
    );
    assert!(std::fs::read(m.path("data.bin")).unwrap() == data);
    let s = wait_for(
        &|s| row(s).is_some_and(|r| r.contains('%')),
        "the read shows as a hit ratio",
    );
    assert!(s.contains("fetch p50 ≤"), "fetch times shown:\n{s}");

    tmux(&["send-keys", "-t", "top", "q"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tmux(&["has-session", "-t", "top"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "q did not quit:\n{}",
            screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = tmux(&["kill-server"]);
}
