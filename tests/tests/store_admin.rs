//! Administering a store through the CLI: moving and removing tags (by compare-and-swap, with
//! their history) and `strata du`, on moto (which enforces conditional writes) and Garage
//! (which ignores them).

use strata_tests::strata::Strata;
use strata_tests::tree::{pseudo_random, write_file};
use strata_tests::{garage, moto};

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// The dataset's owner row in `strata du --json`.
fn owner(du: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    du["owners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["owner"]["name"] == name)
        .cloned()
}

#[test]
fn tags_move_and_go_by_compare_and_swap_with_their_history_and_du_follows() {
    let work = strata_tests::scratch_dir("store-admin");
    let (one, two) = (work.join("one"), work.join("two"));
    let shared_bytes = pseudo_random(5, 3 << 20);
    write_file(&one.join("shared.bin"), &shared_bytes);
    write_file(&two.join("shared.bin"), &shared_bytes);
    write_file(&two.join("own.bin"), &pseudo_random(6, 2 << 20));
    let store = moto::bucket("admin");
    let s = Strata::new(moto::shared().env());
    let v1 = s.publish(&one, &store, "d:v1")["layer"]
        .as_str()
        .unwrap()
        .to_string();
    let v2 = s.publish(&two, &store, "d:v2")["layer"]
        .as_str()
        .unwrap()
        .to_string();

    // A tag made, then moved; the history has both moves, with times a person reads.
    s.ok(&["tag", &store, "d:v1", "d:stable"]);
    let moved = json(&s.ok(&["tag", "--json", &store, &format!("d@{v2}"), "d:stable"]));
    assert_eq!(moved["previous"], v1.as_str());
    assert!(s.ok(&["ls", &store, "d:stable"]).contains(&v2));
    let history = s.ok(&["ls", &store, "d:stable", "--history"]);
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(lines.len(), 2, "{history}");
    assert!(
        lines[0].contains(&v1) && lines[1].contains(&v2),
        "{history}"
    );
    assert!(
        lines.iter().all(|l| l.contains("T") && l.contains("Z\t")),
        "{history}"
    );
    // A tag can only name a layer that is there.
    let missing = format!("d@blake3:{}", "ab".repeat(32));
    let err = s.fails(&["tag", &store, &missing, "d:broken"]);
    assert!(err.contains("is not in"), "{err}");
    assert!(s
        .fails(&["cat", &store, "d:broken", "shared.bin"])
        .contains("not found"));

    // du: d keeps both layers; the shared file's bytes are counted once.
    let du = json(&s.ok(&["du", "--json", &store]));
    let d = owner(&du, "d").expect("dataset d in du");
    assert_eq!(d["layers"], 2, "{du}");
    assert_eq!(du["dead"]["freeable"], 0, "{du}");

    // Removing a tag: readers no longer find it, its layer stays (v2 names it too).
    let removed = s.ok(&["rm", &store, "d:stable"]);
    assert!(removed.contains(&v2), "{removed}");
    let err = s.fails(&["cat", &store, "d:stable", "shared.bin"]);
    assert!(err.contains("not found"), "{err}");
    assert!(!s.ok(&["ls", &store]).contains("d:stable"));
    assert!(s
        .ok(&["ls", &store, "d:stable", "--history"])
        .contains("(removed)\trm"));
    // A bare NAME is NAME:latest, as everywhere: it does not remove every tag.
    let err = s.fails(&["rm", &store, "d"]);
    assert!(err.contains("not found"), "{err}");
    assert!(s.ok(&["ls", &store]).contains("d:v1"));
    // Every tag of the dataset: its history keeps both layers (no retention policy keeps
    // every earlier layer, and the grace period keeps what a tag just left).
    s.ok(&["rm", &store, "--all", "d"]);
    assert!(s.ok(&["ls", &store]).trim().is_empty());
    let du = json(&s.ok(&["du", "--json", &store]));
    assert_eq!(
        owner(&du, "d").expect("kept by d's history")["layers"],
        2,
        "{du}"
    );
    assert_eq!(du["dead"]["freeable"], 0, "{du}");
    // With a retention of no earlier layer and no grace, both are dead, and du says what
    // deleting them frees.
    s.ok(&["retain", &store, "d", "--keep-history", "0"]);
    let du = json(&s.ok(&["du", "--json", "--grace", "0s", &store]));
    assert!(owner(&du, "d").is_none(), "{du}");
    assert_eq!(du["dead"]["layers"]["objects"], 2, "{du}");
    assert!(
        du["dead"]["freeable"].as_u64().unwrap() > 5 << 20,
        "both files' bytes are dead: {du}"
    );
    let text = s.ok(&["du", "--grace", "0s", &store]);
    assert!(text.contains("deleting them frees"), "{text}");
    // Publishing brings the tag back over its removal.
    s.publish(&one, &store, "d:v1");
    let out = s.run(&["cat", &store, "d:v1", "shared.bin"]);
    assert!(out.status.success() && out.stdout == shared_bytes);
}

/// Garage ignores If-Match: moving or removing an existing tag is refused there unless the
/// user promises a single writer.
#[test]
fn on_a_store_without_conditional_writes_tags_move_only_with_single_writer() {
    let work = strata_tests::scratch_dir("store-admin-garage");
    write_file(&work.join("one/a.bin"), &pseudo_random(7, 1 << 20));
    let store = garage::bucket("admin");
    let s = Strata::new(garage::shared().env());
    s.publish(&work.join("one"), &store, "d:v1");
    s.ok(&["tag", &store, "d:v1", "d:stable"]); // a new tag: create-only works
    let err = s.fails(&["rm", &store, "d:stable"]);
    assert!(err.contains("--single-writer"), "{err}");
    s.ok(&["--single-writer", "rm", &store, "d:stable"]);
    assert!(!s.ok(&["ls", &store]).contains("d:stable"));
}
