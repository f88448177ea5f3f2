//! A bounded, seeded mutation fuzzer for decoders of untrusted bytes, on the stable
//! toolchain: each crate's fuzz tests run their decoders on mutations (bit flips, extreme
//! values, cuts, splices, repeats) of a corpus, and a decoder must answer, never panic.
//!
//! A target's corpus is the valid encodings its test makes (so it follows the format as it
//! changes) plus the files kept in the crate under `fuzz/corpus/<target>/` (inputs worth
//! keeping: older formats, inputs that once found a bug). `STRATA_FUZZ_SAVE_CORPUS=1` writes
//! the made encodings there too.
//!
//! The seed is fixed unless `STRATA_FUZZ_SEED` says `random` or gives one to replay;
//! `STRATA_FUZZ_ITERS` sets the inputs per target (default 3,000). An input that panics is
//! printed in hex: it becomes a named regression test.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use crate::rng::{seed_from_env, SplitMix64};

/// One to four random edits of `input`; splices take pieces of `corpus`.
pub fn mutate(rng: &mut SplitMix64, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(7) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = *rng.pick(&[0, 0xff, 0x7f, 0x80, 1, b'"', b'{', b'\\']);
            }
            2 => b.truncate(at),
            3 if !b.is_empty() => {
                let end = (at + rng.below(64)).min(b.len());
                b.drain(at.min(end)..end);
            }
            4 if !corpus.is_empty() => {
                let other = rng.pick(corpus);
                let from = rng.below(other.len() + 1);
                let end = (from + rng.below(128)).min(other.len());
                b.splice(at..at, other[from..end].iter().copied());
            }
            5 if !b.is_empty() => {
                // A little-endian field set to an extreme.
                let i = rng.below(b.len());
                let v = *rng.pick(&[u64::MAX, 0, u32::MAX as u64, 1 << 40]);
                for (k, byte) in v.to_le_bytes().iter().enumerate() {
                    if let Some(x) = b.get_mut(i + k) {
                        *x = *byte;
                    }
                }
            }
            _ => {
                let end = (at + rng.below(32)).min(b.len());
                let piece = b[at.min(end)..end].to_vec();
                b.splice(at..at, piece);
            }
        }
    }
    b
}

/// The kept corpus of a target: the files under `dir` (none if it does not exist).
pub fn kept_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = listing.flatten().map(|e| e.path()).collect();
    files.sort(); // the same order on every machine, so a seed replays
    files
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// Runs `target` on every input of the corpus (`made` and the files in `corpus_dir`), then on
/// mutations of them; returns how many inputs it ran. Panics, naming the seed and the input,
/// if `target` panics on one.
pub fn run(name: &str, corpus_dir: &Path, made: Vec<Vec<u8>>, target: impl Fn(&[u8])) -> usize {
    if std::env::var_os("STRATA_FUZZ_SAVE_CORPUS").is_some() {
        save(corpus_dir, &made);
    }
    let mut corpus = made;
    corpus.extend(kept_corpus(corpus_dir));
    assert!(!corpus.is_empty(), "fuzz {name}: an empty corpus");
    let seed = seed_from_env("STRATA_FUZZ_SEED", 20_261_204);
    let iters: usize = std::env::var("STRATA_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    println!(
        "fuzz {name}: seed {seed} (replay: STRATA_FUZZ_SEED={seed}), {} corpus inputs, {iters} mutations",
        corpus.len()
    );
    let mut rng = SplitMix64::new(seed ^ u64::from(blake3::hash(name.as_bytes()).as_bytes()[0]));
    let check = |label: String, input: &[u8]| {
        if catch_unwind(AssertUnwindSafe(|| target(input))).is_err() {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            panic!("fuzz {name}: seed {seed}, {label} panicked: {hex}");
        }
    };
    for (i, input) in corpus.iter().enumerate() {
        check(format!("corpus input {i}"), input);
    }
    for i in 0..iters {
        let pick = rng.below(corpus.len());
        let input = mutate(&mut rng, &corpus[pick], &corpus);
        check(format!("mutation {i}"), &input);
    }
    corpus.len() + iters
}

fn save(dir: &Path, inputs: &[Vec<u8>]) {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("fuzz: cannot save the corpus in {}: {e}", dir.display());
        return;
    }
    for input in inputs {
        let name = blake3::hash(input).to_hex();
        let _ = std::fs::write(dir.join(&name[..16]), input);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_decoder_is_caught_with_its_seed_and_input() {
        let dir = tempfile::tempdir().unwrap();
        let caught = catch_unwind(|| {
            run("demo", dir.path(), vec![b"abc".to_vec()], |b| {
                assert!(!b.contains(&0xff), "decoder bug");
            })
        });
        let why = caught.unwrap_err();
        let msg = why.downcast_ref::<String>().unwrap();
        assert!(msg.contains("seed") && msg.contains("panicked"), "{msg}");
    }

    #[test]
    fn kept_inputs_join_the_corpus() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("one"), b"kept").unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        run("kept", dir.path(), vec![b"made".to_vec()], |b| {
            seen.lock().unwrap().push(b.to_vec());
        });
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen[0], b"made", "made inputs first");
        assert!(seen[1..3].contains(&b"kept".to_vec()), "then the kept ones");
    }
}
