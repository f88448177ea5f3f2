//! `mount -t fuse.strata` and fstab: mount(8) runs `/sbin/mount.fuse.strata SOURCE DIR [-o
//! OPTIONS] [-n] [-s] [-f] [-v] [-t TYPE]` (install it as a link to the strata binary), and
//! this module turns that into the `strata mount` command line it means: a mount through the
//! daemon. SOURCE is the store URL; the layers and the rest are mount options:
//!
//! ```text
//! s3://bucket/models  /srv/models  fuse.strata  layer=models:v3,ro,x-systemd.requires=strata.service,_netdev  0 0
//! ```

/// What mount(8) asked for, as the arguments of `strata` (without the program name), or
/// `None` when it asked only to pretend (`-f`).
pub fn strata_args(args: &[String]) -> Result<Option<Vec<String>>, String> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let (mut sloppy, mut fake, mut verbose) = (false, false, false);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-o" => options.push(it.next().ok_or("-o needs a value")?.clone()),
            "-t" => {
                let kind = it.next().ok_or("-t needs a value")?;
                if kind != "fuse.strata" && kind != "strata" {
                    return Err(format!("asked to mount type {kind:?}, not fuse.strata"));
                }
            }
            "-n" => {} // mount(8) keeps no mtab of its own any more.
            "-s" => sloppy = true,
            "-f" => fake = true,
            "-v" => verbose = true,
            a if a.starts_with("-o") && a.len() > 2 => options.push(a[2..].to_string()),
            a if a.starts_with('-') && a.len() > 1 => return Err(format!("unknown flag {a}")),
            _ => positional.push(arg.clone()),
        }
    }
    let [source, dir] = positional.as_slice() else {
        return Err(format!(
            "expected SOURCE (the store URL) and DIR, got {} arguments",
            positional.len()
        ));
    };
    let mut out = vec!["mount".to_string(), source.clone(), dir.clone()];
    if verbose {
        out.push("-v".into());
    }
    for option in options.iter().flat_map(|o| o.split(',')) {
        let (key, value) = match option.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (option, None),
        };
        let flag = match (key, value) {
            ("layer", Some(v)) => Some(("--layer", Some(v))),
            ("volume", Some(v)) => Some(("--volume", Some(v))),
            ("ro", None) | ("read-only", None) => Some(("--read-only", None)),
            ("scratch-size" | "scratch_size", Some(v)) => Some(("--scratch-size", Some(v))),
            ("scratch-inodes" | "scratch_inodes", Some(v)) => Some(("--scratch-inodes", Some(v))),
            ("socket", Some(v)) => Some(("--socket", Some(v))),
            ("endpoint" | "endpoint_url", Some(v)) => Some(("--endpoint-url", Some(v))),
            ("no-prefetch-record", None) => Some(("--no-prefetch-record", None)),
            ("no-prefetch-replay", None) => Some(("--no-prefetch-replay", None)),
            // Not silently dropped: an fstab line that asks for it expects it enforced.
            ("noexec", None) => {
                return Err(
                    "noexec is not supported: strata mounts allow executing (mount the \
                     sandbox's view noexec instead)"
                        .to_string(),
                )
            }
            _ if is_generic(key) => None,
            _ if sloppy => None,
            _ => {
                return Err(format!(
                    "unknown mount option {option:?} (strata takes layer=NAME:TAG (repeated), \
                     volume=SCOPE/NAME, ro, scratch-size=, scratch-inodes=, socket=, \
                     endpoint=, no-prefetch-record, no-prefetch-replay)"
                ))
            }
        };
        if let Some((flag, value)) = flag {
            out.push(flag.to_string());
            out.extend(value.map(str::to_string));
        }
    }
    Ok((!fake).then_some(out))
}

/// Options meant for mount(8), fstab or systemd rather than for strata; every FUSE mount
/// strata makes is already nosuid and nodev.
fn is_generic(key: &str) -> bool {
    matches!(
        key,
        "defaults"
            | "rw"
            | "auto"
            | "noauto"
            | "user"
            | "users"
            | "nouser"
            | "owner"
            | "group"
            | "_netdev"
            | "nofail"
            | "suid"
            | "nosuid"
            | "dev"
            | "nodev"
            | "exec"
            | "async"
            | "sync"
            | "atime"
            | "noatime"
            | "relatime"
            | "strictatime"
            | "nodiratime"
            | "allow_other"
            | "default_permissions"
            | "comment"
    ) || key.starts_with("x-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn an_fstab_line_becomes_a_daemon_mount() {
        let got = strata_args(&args(
            "s3://b/p /srv/m -o rw,layer=base:v1,layer=models:v3,_netdev,x-systemd.requires=strata.service,nosuid,nodev -n",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            got,
            args("mount s3://b/p /srv/m --layer base:v1 --layer models:v3")
        );
    }

    #[test]
    fn volumes_read_only_and_settings_map_to_their_flags() {
        let got = strata_args(&args(
            "file:///d /m -t fuse.strata -o ro,layer=a:1 -o socket=/run/s.sock,endpoint=http://h:3900",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            got,
            args(
                "mount file:///d /m --read-only --layer a:1 --socket /run/s.sock --endpoint-url http://h:3900"
            )
        );
        let got = strata_args(&args(
            "file:///d /m -ovolume=team/cache,layer=py:3.12,scratch-size=2G",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            got,
            args("mount file:///d /m --volume team/cache --layer py:3.12 --scratch-size 2G")
        );
    }

    #[test]
    fn unknown_options_are_refused_unless_sloppy_and_fake_mounts_nothing() {
        let e = strata_args(&args("s3://b /m -o layer=a:1,colour=blue")).unwrap_err();
        assert!(
            e.contains("\"colour=blue\"") && e.contains("layer=NAME:TAG"),
            "{e}"
        );
        assert!(strata_args(&args("s3://b /m -s -o layer=a:1,colour=blue"))
            .unwrap()
            .is_some());
        assert_eq!(
            strata_args(&args("s3://b /m -f -o layer=a:1")).unwrap(),
            None
        );
        assert!(strata_args(&args("s3://b -o layer=a:1")).is_err());
        assert!(strata_args(&args("s3://b /m -t ext4")).is_err());
        assert!(strata_args(&args("s3://b /m -o")).is_err());
        let e = strata_args(&args("s3://b /m -o layer=a:1,noexec")).unwrap_err();
        assert!(e.contains("noexec"), "{e}");
    }
}
