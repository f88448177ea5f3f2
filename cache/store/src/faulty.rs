//! [`FaultyStore`]: a wrapper that injects seeded, deterministic faults between a caller and a
//! store, so every fault test draws from one library instead of ad-hoc fakes.
//!
//! Faults, each with its own probability in [`FaultConfig`]:
//!
//! - **error**: the request fails with [`StoreErrorKind::Io`] ("injected fault: 503 Slow Down")
//!   before reaching the store, like a throttled or failed server;
//! - **latency**: the request is delayed by a random duration up to `max_latency`;
//! - **truncate**: a read (`get`, `get_range`, `get_versioned`) returns a strict prefix of the
//!   body, like a connection cut short;
//! - **corrupt**: a read returns the body with one byte flipped;
//! - **lost CAS reply**: a compare-and-swap is applied to the store but the caller gets an
//!   `Io` error, so it cannot tell whether its write landed;
//! - **crash point** (`crash_after_writes: Some(k)`): the first `k` writes (puts and
//!   compare-and-swaps) go through, every later one fails, as if the writer died after its
//!   k-th write; the inner store then shows exactly what a crash would leave behind.
//!
//! Determinism: every request draws the same fixed number of values from one seeded PRNG
//! (splitmix64) under a mutex, before it reaches the store, so the fault sequence depends only
//! on the seed and the order of requests, never on the inner store's answers or timing. Replay
//! a seed with the same request order (e.g. one task) and the same faults occur.
//!
//! With every probability 0 and no crash point the wrapper is transparent: same URL, same
//! results, same errors as the inner store.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{check_key, Store, StoreError, StoreErrorKind, StoreResult, Version};
use strata_testkit::rng::SplitMix64;

/// Which faults to inject, and how often. Probabilities are per request: 0 (or less) never,
/// 1 (or more) always. The default injects nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FaultConfig {
    /// Seeds the fault sequence: the same seed and the same requests give the same faults.
    pub seed: u64,
    /// A request fails with an `Io` error without reaching the store.
    pub error: f64,
    /// A request is delayed by a random duration in `[0, max_latency]` first.
    pub latency: f64,
    pub max_latency: Duration,
    /// A read returns a strict prefix of the body (nothing to truncate in an empty body).
    pub truncate: f64,
    /// A read returns the body with one byte inverted (nothing to flip in an empty body).
    pub corrupt: f64,
    /// A compare-and-swap that succeeded reports an `Io` error instead of its new version.
    pub lost_cas_reply: f64,
    /// `Some(k)`: the first `k` writes (put or compare-and-swap calls, whatever became of
    /// them) reach the store; every later one fails.
    pub crash_after_writes: Option<u64>,
}

impl Default for FaultConfig {
    fn default() -> FaultConfig {
        FaultConfig {
            seed: 0,
            error: 0.0,
            latency: 0.0,
            max_latency: Duration::from_millis(10),
            truncate: 0.0,
            corrupt: 0.0,
            lost_cas_reply: 0.0,
            crash_after_writes: None,
        }
    }
}

/// How many faults of each kind were injected (see [`FaultyStore::counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounts {
    pub errors: u64,
    pub delays: u64,
    pub truncated: u64,
    pub corrupted: u64,
    pub lost_cas_replies: u64,
    /// Writes refused after the crash point.
    pub crashed_writes: u64,
}

impl FaultCounts {
    pub fn total(&self) -> u64 {
        self.errors
            + self.delays
            + self.truncated
            + self.corrupted
            + self.lost_cas_replies
            + self.crashed_writes
    }
}

/// Server errors an injected failure pretends to be.
const ERROR_MESSAGES: [&str; 3] = [
    "503 Slow Down",
    "500 Internal Error",
    "connection reset by peer",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Get,
    GetRange,
    Head,
    Put,
    GetVersioned,
    CompareAndSwap,
    List,
    Delete,
}

impl Op {
    /// The op name the backends use in their errors.
    fn name(self) -> &'static str {
        match self {
            Op::Get | Op::GetRange | Op::GetVersioned => "get",
            Op::Head => "head",
            Op::Put => "put",
            Op::CompareAndSwap => "compare-and-swap",
            Op::List => "list",
            Op::Delete => "delete",
        }
    }

    fn is_write(self) -> bool {
        matches!(self, Op::Put | Op::CompareAndSwap)
    }

    fn returns_body(self) -> bool {
        matches!(self, Op::Get | Op::GetRange | Op::GetVersioned)
    }
}

/// The faults decided for one request. Raw draws stay raw until the body length is known.
#[derive(Debug)]
struct Plan {
    delay: Option<Duration>,
    /// `Some(n)`: this is write number `n` (1-based) and it comes after the crash point.
    crashed: Option<u64>,
    error: Option<&'static str>,
    truncate: Option<u64>,
    corrupt: Option<u64>,
    lose_reply: bool,
}

#[derive(Debug)]
struct Dice {
    rng: SplitMix64,
    /// Write calls seen, for the crash point.
    writes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    errors: AtomicU64,
    delays: AtomicU64,
    truncated: AtomicU64,
    corrupted: AtomicU64,
    lost_cas_replies: AtomicU64,
    crashed_writes: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    config: FaultConfig,
    /// A std mutex, held only to draw a request's plan (never across an await).
    dice: Mutex<Dice>,
    counters: Counters,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>, config: FaultConfig) -> FaultyStore {
        FaultyStore {
            inner,
            dice: Mutex::new(Dice {
                rng: SplitMix64::new(config.seed),
                writes: 0,
            }),
            config,
            counters: Counters::default(),
        }
    }

    /// The wrapped store, to check what really landed (no faults there).
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    pub fn config(&self) -> &FaultConfig {
        &self.config
    }

    /// Faults injected so far, by kind.
    pub fn counts(&self) -> FaultCounts {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultCounts {
            errors: load(&c.errors),
            delays: load(&c.delays),
            truncated: load(&c.truncated),
            corrupted: load(&c.corrupted),
            lost_cas_replies: load(&c.lost_cas_replies),
            crashed_writes: load(&c.crashed_writes),
        }
    }

    fn plan(&self, op: Op) -> Plan {
        let c = &self.config;
        // Every draw is a plain value; the lock only guards PRNG state, so a panic elsewhere
        // cannot leave it half-updated.
        let mut dice = self.dice.lock().unwrap_or_else(|e| e.into_inner());
        let rng = &mut dice.rng;
        // The same draws for every request, whatever the config and the op, so the sequence
        // depends only on the seed and the request order.
        let delay = rng.chance(c.latency);
        let delay_draw = rng.next_u64();
        let error = rng.chance(c.error);
        let error_draw = rng.next_u64();
        let truncate = rng.chance(c.truncate);
        let truncate_draw = rng.next_u64();
        let corrupt = rng.chance(c.corrupt);
        let corrupt_draw = rng.next_u64();
        let lose_reply = rng.chance(c.lost_cas_reply);
        let crashed = if op.is_write() {
            dice.writes += 1;
            match c.crash_after_writes {
                Some(k) if dice.writes > k => Some(dice.writes),
                _ => None,
            }
        } else {
            None
        };
        drop(dice);

        let max_nanos = u64::try_from(c.max_latency.as_nanos()).unwrap_or(u64::MAX);
        Plan {
            delay: delay.then(|| Duration::from_nanos(delay_draw % max_nanos.saturating_add(1))),
            crashed,
            error: error
                .then(|| ERROR_MESSAGES[(error_draw % ERROR_MESSAGES.len() as u64) as usize]),
            truncate: (truncate && op.returns_body()).then_some(truncate_draw),
            corrupt: (corrupt && op.returns_body()).then_some(corrupt_draw),
            lose_reply: lose_reply && op == Op::CompareAndSwap,
        }
    }

    fn injected(&self, op: Op, key: &str, message: impl std::fmt::Display) -> StoreError {
        tracing::debug!(store = %self.inner.url(), op = op.name(), key, %message, "injected fault");
        StoreError::new(
            self.inner.url(),
            op.name(),
            key,
            StoreErrorKind::Io,
            format!("injected fault: {message}"),
        )
    }

    /// Draws the plan for one request and applies the faults that happen before it reaches
    /// the store (delay, crash point, error). Returns the rest of the plan.
    async fn before(&self, op: Op, key: &str) -> StoreResult<Plan> {
        // A bad key is refused on the client, before any network a fault could hit.
        if op != Op::List {
            check_key(self.inner.url(), op.name(), key)?;
        }
        let plan = self.plan(op);
        if let Some(delay) = plan.delay {
            bump(&self.counters.delays);
            tokio::time::sleep(delay).await;
        }
        if let Some(n) = plan.crashed {
            bump(&self.counters.crashed_writes);
            let k = self.config.crash_after_writes.unwrap_or(0);
            return Err(self.injected(
                op,
                key,
                format!("write {n} refused: the writer crashed after write {k}"),
            ));
        }
        if let Some(message) = plan.error {
            bump(&self.counters.errors);
            return Err(self.injected(op, key, message));
        }
        Ok(plan)
    }

    /// Applies the body faults of `plan` to a body read from the store.
    fn damage(&self, op: Op, key: &str, plan: &Plan, mut data: Bytes) -> Bytes {
        if let Some(draw) = plan.truncate {
            if !data.is_empty() {
                let keep = (draw % data.len() as u64) as usize;
                tracing::debug!(store = %self.inner.url(), op = op.name(), key, keep, len = data.len(), "injected fault: truncated body");
                bump(&self.counters.truncated);
                data = data.slice(..keep);
            }
        }
        if let Some(draw) = plan.corrupt {
            if !data.is_empty() {
                let at = (draw % data.len() as u64) as usize;
                tracing::debug!(store = %self.inner.url(), op = op.name(), key, at, "injected fault: corrupted body");
                bump(&self.counters.corrupted);
                let mut bytes = data.to_vec();
                bytes[at] = !bytes[at];
                data = Bytes::from(bytes);
            }
        }
        data
    }
}

#[async_trait]
impl Store for FaultyStore {
    fn url(&self) -> &str {
        // The inner URL, so errors from the inner store and from the wrapper read alike.
        self.inner.url()
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        let plan = self.before(Op::Get, key).await?;
        let data = self.inner.get(key).await?;
        Ok(self.damage(Op::Get, key, &plan, data))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let plan = self.before(Op::GetRange, key).await?;
        let data = self.inner.get_range(key, range).await?;
        Ok(self.damage(Op::GetRange, key, &plan, data))
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        self.before(Op::Head, key).await?;
        self.inner.head(key).await
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        self.before(Op::Put, key).await?;
        self.inner.put(key, data).await
    }

    async fn get_versioned(&self, key: &str) -> StoreResult<Option<(Bytes, Version)>> {
        let plan = self.before(Op::GetVersioned, key).await?;
        Ok(self
            .inner
            .get_versioned(key)
            .await?
            .map(|(data, v)| (self.damage(Op::GetVersioned, key, &plan, data), v)))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&Version>,
        data: Bytes,
    ) -> StoreResult<Version> {
        let plan = self.before(Op::CompareAndSwap, key).await?;
        let version = self.inner.compare_and_swap(key, expected, data).await?;
        if plan.lose_reply {
            bump(&self.counters.lost_cas_replies);
            return Err(self.injected(
                Op::CompareAndSwap,
                key,
                "reply lost (the write was applied)",
            ));
        }
        Ok(version)
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        self.before(Op::List, prefix).await?;
        self.inner.list(prefix).await
    }

    async fn list_info(&self, prefix: &str) -> StoreResult<Vec<crate::ObjectInfo>> {
        self.before(Op::List, prefix).await?;
        self.inner.list_info(prefix).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.before(Op::Delete, key).await?;
        self.inner.delete(key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    fn over_memory(config: FaultConfig) -> (Arc<dyn Store>, FaultyStore) {
        let inner: Arc<dyn Store> = Arc::new(MemoryStore::new("inner"));
        (inner.clone(), FaultyStore::new(inner, config))
    }

    fn body() -> Bytes {
        Bytes::from((0..100u8).collect::<Vec<u8>>())
    }

    #[test]
    fn splitmix64_is_the_standard_stream() {
        // Recorded seeds must keep replaying the same faults: pin the generator.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    /// One fixed request sequence through a faulty store; returns what the caller saw.
    async fn trace(config: FaultConfig) -> (Vec<String>, FaultCounts) {
        let (inner, faulty) = over_memory(config);
        for i in 0..4 {
            inner
                .put(&format!("chunks/{i}"), body())
                .await
                .expect("seeding the inner store");
        }
        let mut seen = Vec::new();
        for i in 0..200u64 {
            let key = format!("chunks/{}", i % 4);
            let outcome = match i % 8 {
                0 => format!("{:?}", faulty.get(&key).await),
                1 => format!("{:?}", faulty.get_range(&key, 10..60).await),
                2 => format!("{:?}", faulty.head(&key).await),
                3 => format!("{:?}", faulty.put(&format!("new/{i}"), body()).await),
                4 => format!("{:?}", faulty.get_versioned("refs/r").await),
                5 => {
                    let expected = inner
                        .get_versioned("refs/r")
                        .await
                        .expect("reading behind the faults")
                        .map(|(_, v)| v);
                    let data = Bytes::from(i.to_string());
                    format!(
                        "{:?}",
                        faulty
                            .compare_and_swap("refs/r", expected.as_ref(), data)
                            .await
                    )
                }
                6 => format!("{:?}", faulty.list("new/").await.map(|l| l.len())),
                _ => format!("{:?}", faulty.delete(&format!("new/{}", i - 4)).await),
            };
            seen.push(outcome);
        }
        (seen, faulty.counts())
    }

    #[tokio::test]
    async fn a_seed_replays_the_same_faults() {
        let config = FaultConfig {
            seed: 42,
            error: 0.15,
            latency: 0.2,
            max_latency: Duration::from_micros(200),
            truncate: 0.2,
            corrupt: 0.2,
            lost_cas_reply: 0.3,
            crash_after_writes: None,
        };
        let (first, first_counts) = trace(config.clone()).await;
        let (again, again_counts) = trace(config.clone()).await;
        assert_eq!(first, again);
        assert_eq!(first_counts, again_counts);
        for (kind, n) in [
            ("errors", first_counts.errors),
            ("delays", first_counts.delays),
            ("truncated", first_counts.truncated),
            ("corrupted", first_counts.corrupted),
            ("lost CAS replies", first_counts.lost_cas_replies),
        ] {
            assert!(n > 0, "no {kind} in 200 requests: {first_counts:?}");
        }
        let (other, _) = trace(FaultConfig { seed: 43, ..config }).await;
        assert_ne!(first, other, "another seed, other faults");
    }

    #[tokio::test]
    async fn errors_stop_requests_before_the_store() {
        let (inner, faulty) = over_memory(FaultConfig {
            error: 1.0,
            ..FaultConfig::default()
        });
        let key = "chunks/aa/x";
        let errors = [
            faulty.put(key, body()).await.unwrap_err(),
            faulty.get(key).await.unwrap_err(),
            faulty.head(key).await.unwrap_err(),
            faulty.list("").await.unwrap_err(),
            faulty.delete(key).await.unwrap_err(),
        ];
        for err in &errors {
            assert_eq!(err.kind, StoreErrorKind::Io, "{err}");
            assert!(err.message.starts_with("injected fault: "), "{err}");
            assert!(
                ERROR_MESSAGES.iter().any(|m| err.message.ends_with(m)),
                "{err}"
            );
            assert!(err.to_string().contains("memory://inner"), "{err}");
        }
        assert_eq!(inner.head(key).await.unwrap(), None, "the put never landed");
        assert_eq!(faulty.counts().errors, 5);
        // Invalid keys are refused on the client, before any fault.
        let err = faulty.get("../x").await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Invalid, "{err}");
        assert_eq!(faulty.counts().errors, 5);
    }

    #[tokio::test]
    async fn truncated_bodies_are_strict_prefixes() {
        let (inner, faulty) = over_memory(FaultConfig {
            seed: 1,
            truncate: 1.0,
            ..FaultConfig::default()
        });
        let key = "chunks/aa/x";
        inner.put(key, body()).await.unwrap();
        let got = faulty.get(key).await.unwrap();
        assert!(got.len() < 100 && body().starts_with(&got), "{got:?}");
        let got = faulty.get_range(key, 10..60).await.unwrap();
        assert!(
            got.len() < 50 && body()[10..60].starts_with(&got),
            "{got:?}"
        );
        let (got, version) = faulty.get_versioned(key).await.unwrap().unwrap();
        assert!(got.len() < 100 && body().starts_with(&got), "{got:?}");
        let (_, real_version) = inner.get_versioned(key).await.unwrap().unwrap();
        assert_eq!(version, real_version, "the version is not damaged");
        // Nothing to cut from an empty body: returned as is, not counted.
        inner.put("chunks/aa/empty", Bytes::new()).await.unwrap();
        assert!(faulty.get("chunks/aa/empty").await.unwrap().is_empty());
        // Writes and metadata are untouched by body faults.
        faulty.put("chunks/bb/y", body()).await.unwrap();
        assert_eq!(inner.get("chunks/bb/y").await.unwrap(), body());
        assert_eq!(faulty.head(key).await.unwrap(), Some(100));
        assert_eq!(
            faulty.counts(),
            FaultCounts {
                truncated: 3,
                ..FaultCounts::default()
            }
        );
    }

    #[tokio::test]
    async fn corrupted_bodies_differ_in_one_byte() {
        let (inner, faulty) = over_memory(FaultConfig {
            seed: 2,
            corrupt: 1.0,
            ..FaultConfig::default()
        });
        let key = "chunks/aa/x";
        inner.put(key, body()).await.unwrap();
        for _ in 0..10 {
            let got = faulty.get(key).await.unwrap();
            assert_eq!(got.len(), 100);
            let differing = got
                .iter()
                .zip(body().iter())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(differing, 1, "{got:?}");
        }
        let got = faulty.get_range(key, 0..10).await.unwrap();
        assert_eq!(got.len(), 10);
        assert_ne!(got, body().slice(0..10));
        assert_eq!(inner.get(key).await.unwrap(), body(), "the store is intact");
        assert_eq!(faulty.counts().corrupted, 11);
    }

    #[tokio::test]
    async fn a_lost_cas_reply_still_applies_the_write() {
        let (inner, faulty) = over_memory(FaultConfig {
            seed: 3,
            lost_cas_reply: 1.0,
            ..FaultConfig::default()
        });
        let key = "refs/x/latest";
        let err = faulty
            .compare_and_swap(key, None, Bytes::from_static(b"one"))
            .await
            .unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Io, "{err}");
        assert!(err.message.contains("reply lost"), "{err}");
        let (data, v1) = inner.get_versioned(key).await.unwrap().unwrap();
        assert_eq!(&data[..], b"one", "the write landed");
        // A swap that loses is reported as such: only applied writes lose their reply.
        let err = faulty
            .compare_and_swap(key, None, Bytes::from_static(b"again"))
            .await
            .unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Conflict, "{err}");
        faulty
            .compare_and_swap(key, Some(&v1), Bytes::from_static(b"two"))
            .await
            .unwrap_err();
        assert_eq!(&inner.get(key).await.unwrap()[..], b"two");
        assert_eq!(faulty.counts().lost_cas_replies, 2);
        assert_eq!(faulty.counts().total(), 2);
    }

    #[tokio::test]
    async fn writes_fail_after_the_crash_point() {
        let (inner, faulty) = over_memory(FaultConfig {
            crash_after_writes: Some(2),
            ..FaultConfig::default()
        });
        faulty.put("chunks/1", body()).await.unwrap();
        faulty
            .compare_and_swap("refs/r", None, Bytes::from_static(b"one"))
            .await
            .unwrap();
        let err = faulty.put("chunks/3", body()).await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Io, "{err}");
        assert!(err.message.contains("crashed after write 2"), "{err}");
        faulty
            .compare_and_swap("refs/other", None, Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        // Reads go on: the crash point is about what the writer left behind.
        assert_eq!(faulty.get("chunks/1").await.unwrap(), body());
        assert_eq!(
            inner.list("").await.unwrap(),
            vec!["chunks/1", "refs/r"],
            "exactly the first two writes landed"
        );
        assert_eq!(faulty.counts().crashed_writes, 2);

        let (inner, faulty) = over_memory(FaultConfig {
            crash_after_writes: Some(0),
            ..FaultConfig::default()
        });
        faulty.put("chunks/1", body()).await.unwrap_err();
        assert!(inner.list("").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn latency_delays_every_request() {
        let (_, faulty) = over_memory(FaultConfig {
            latency: 1.0,
            max_latency: Duration::from_millis(2),
            ..FaultConfig::default()
        });
        faulty.head("chunks/1").await.unwrap();
        faulty.list("").await.unwrap();
        faulty.put("chunks/1", body()).await.unwrap();
        assert_eq!(faulty.get("chunks/1").await.unwrap(), body());
        assert_eq!(
            faulty.counts(),
            FaultCounts {
                delays: 4,
                ..FaultCounts::default()
            }
        );
    }
}
