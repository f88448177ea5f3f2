//! Prometheus metrics (`strata daemon --metrics-addr HOST:PORT`, served at `/metrics`): the
//! counters `strata stats` shows, rendered from one snapshot at each scrape. Daemon-wide
//! families are `strata_*`; per-mount ones are `strata_mount_*`, labelled with the
//! mountpoint and the store (a shared read-only session once, under its first mountpoint).

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use strata_store::StoreCounts;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::protocol::StatsReply;
use crate::server::Daemon;
use cache::{FetchLatency, ReadStats, FETCH_LATENCY_BOUNDS};

/// How long a scraper has to send its request.
const REQUEST_WAIT: Duration = Duration::from_secs(5);
/// How long a connection may last in all (a scraper that does not read the answer, too).
const CONNECTION_LIFE: Duration = Duration::from_secs(15);
/// Connections served at once; more wait to be accepted.
const CONNECTIONS: usize = 8;
/// Scrapes this close together share one snapshot.
const SNAPSHOT_REUSE: Duration = Duration::from_secs(1);
/// The most of a request read: a scrape is a request line and a few headers.
const REQUEST_MAX: usize = 16 << 10;

const MOUNT_LABELS: &[&str] = &["mountpoint", "store"];

/// One family: its values are set (a counter by one increment) from the snapshot.
struct Families {
    registry: Registry,
}

impl Families {
    fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        let c = IntCounterVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(c.clone()))?;
        Ok(c)
    }

    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
        let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(g.clone()))?;
        Ok(g)
    }
}

/// Gauges hold i64: a count past that (never, in practice) shows as the largest.
fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The read counters of `ReadStats`, as (name, help, value).
fn read_counters(r: &ReadStats) -> [(&'static str, &'static str, u64); 10] {
    [
        ("reads_total", "Reads served.", r.reads),
        (
            "read_bytes_total",
            "Bytes served to readers.",
            r.bytes_served,
        ),
        (
            "chunk_requests_total",
            "Chunks the reads asked for.",
            r.chunk_requests,
        ),
        (
            "store_fetches_total",
            "Ranged GETs sent for chunks.",
            r.store_gets,
        ),
        (
            "store_fetch_bytes_total",
            "Bytes those GETs brought.",
            r.store_bytes,
        ),
        (
            "chunks_fetched_total",
            "Chunks fetched from the store.",
            r.chunks_fetched,
        ),
        (
            "corrupt_chunks_total",
            "Chunks that failed their hash check (fetched again or EIO).",
            r.corrupt_chunks,
        ),
        (
            "read_errors_total",
            "Reads answered with an error.",
            r.errors,
        ),
        (
            "passthrough_opens_total",
            "Opens handed to the kernel (FUSE passthrough).",
            r.passthrough_opens,
        ),
        (
            "prefilled_opens_total",
            "Opens of small files whose bytes went to the kernel's page cache with the open.",
            r.prefilled_opens,
        ),
    ]
}

/// Store requests by kind, as (kind, count).
fn request_kinds(c: &StoreCounts) -> [(&'static str, u64); 8] {
    [
        ("get", c.get),
        ("get_range", c.get_range),
        ("head", c.head),
        ("put", c.put),
        ("get_versioned", c.get_versioned),
        ("compare_and_swap", c.compare_and_swap),
        ("list", c.list),
        ("delete", c.delete),
    ]
}

/// The metrics of `stats` in Prometheus' text format.
pub fn render(stats: &StatsReply) -> prometheus::Result<String> {
    let f = Families {
        registry: Registry::new(),
    };
    let total = &stats.total;
    for (name, help, value) in read_counters(&total.reads) {
        f.counter(&format!("strata_{name}"), help, &[])?
            .with_label_values::<&str>(&[])
            .inc_by(value);
    }
    let hits = f.counter(
        "strata_chunk_hits_total",
        "Chunks found, by tier: memory, disk, or the store (a fetch).",
        &["tier"],
    )?;
    hits.with_label_values(&["memory"])
        .inc_by(total.reads.memory_hits);
    hits.with_label_values(&["disk"])
        .inc_by(total.reads.disk_hits);
    hits.with_label_values(&["store"])
        .inc_by(total.reads.store_hits);
    let requests = f.counter(
        "strata_store_requests_total",
        "Requests sent to stores, by kind (mounts gone since included).",
        &["kind"],
    )?;
    for (kind, n) in request_kinds(&stats.store_requests) {
        requests.with_label_values(&[kind]).inc_by(n);
    }
    let bytes = f.counter(
        "strata_store_bytes_total",
        "Bytes moved to and from stores, by direction: read, written.",
        &["direction"],
    )?;
    bytes
        .with_label_values(&["read"])
        .inc_by(stats.store_requests.bytes_read);
    bytes
        .with_label_values(&["written"])
        .inc_by(stats.store_requests.bytes_written);
    for (name, help, value) in [
        (
            "strata_cache_memory_bytes",
            "Chunk bytes held in memory.",
            total.memory_used,
        ),
        (
            "strata_cache_memory_capacity_bytes",
            "Cap on chunk bytes in memory.",
            total.memory_capacity,
        ),
        (
            "strata_cache_disk_bytes",
            "Bytes of the disk cache (chunk files and local copies).",
            total.disk_used,
        ),
        (
            "strata_cache_disk_capacity_bytes",
            "Cap on the disk cache.",
            total.disk_capacity,
        ),
        (
            "strata_cache_disk_chunks",
            "Chunks in the disk cache.",
            total.disk_chunks,
        ),
        (
            "strata_cache_disk_files",
            "Files of the disk cache.",
            total.disk_files,
        ),
        (
            "strata_manifest_cache_bytes",
            "Cached layer manifests (outside the chunk budget).",
            stats.manifest_bytes,
        ),
        ("strata_mounts", "Mounts served.", stats.mounts.len() as u64),
        (
            "strata_kept_uppers",
            "Volume uppers kept because their commit failed.",
            stats.kept.len() as u64,
        ),
    ] {
        f.gauge(name, help, &[])?
            .with_label_values::<&str>(&[])
            .set(signed(value));
    }
    f.counter(
        "strata_cache_disk_evictions_total",
        "Chunk files evicted to stay under the cap.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .inc_by(total.disk_evictions);

    let commits = f.counter(
        "strata_volume_commits_total",
        "Volume commits by outcome: committed, rebased (onto others' commits), conflict (kept \
         as a conflict record), kept (failed at a mount's end; the upper kept to retry), failed.",
        &["outcome"],
    )?;
    let c = &stats.commits;
    for (outcome, n) in [
        ("committed", c.committed),
        ("rebased", c.rebased),
        ("conflict", c.conflict),
        ("kept", c.kept),
        ("failed", c.failed),
    ] {
        commits.with_label_values(&[outcome]).inc_by(n);
    }
    let errors = f.counter(
        "strata_errors_total",
        "Requests of the mounts' functions answered with an error, by errno.",
        &["errno"],
    )?;
    for (errno, n) in &stats.errors {
        errors.with_label_values(&[errno.as_str()]).inc_by(*n);
    }

    // Per mount.
    let mut mount_reads = Vec::new();
    for (name, help, _) in read_counters(&ReadStats::default()) {
        mount_reads.push(f.counter(&format!("strata_mount_{name}"), help, MOUNT_LABELS)?);
    }
    let mount_hits = f.counter(
        "strata_mount_chunk_hits_total",
        "Chunks found, by tier: memory, disk, or the store (a fetch).",
        &["mountpoint", "store", "tier"],
    )?;
    let mount_requests = f.counter(
        "strata_mount_store_requests_total",
        "Requests the mount sent its store, by kind.",
        &["mountpoint", "store", "kind"],
    )?;
    let mount_errors = f.counter(
        "strata_mount_errors_total",
        "Requests of the mount's function answered with an error, by errno.",
        &["mountpoint", "store", "errno"],
    )?;
    let mut mount_latency = Vec::new();
    // A read-only mount sharing another's session shares its counters too: each session is
    // reported once, under the mountpoint that made it.
    for m in stats
        .mounts
        .iter()
        .filter(|m| m.mount.shared_with.is_none())
    {
        let mp = m.mount.mountpoint.to_string_lossy();
        let labels = [mp.as_ref(), m.mount.store.as_str()];
        for (family, (_, _, value)) in mount_reads.iter().zip(read_counters(&m.stats)) {
            family.with_label_values(&labels).inc_by(value);
        }
        for (tier, n) in [
            ("memory", m.stats.memory_hits),
            ("disk", m.stats.disk_hits),
            ("store", m.stats.store_hits),
        ] {
            mount_hits
                .with_label_values(&[labels[0], labels[1], tier])
                .inc_by(n);
        }
        for (kind, n) in request_kinds(&m.store_requests) {
            mount_requests
                .with_label_values(&[labels[0], labels[1], kind])
                .inc_by(n);
        }
        for (errno, n) in &m.errors {
            mount_errors
                .with_label_values(&[labels[0], labels[1], errno.as_str()])
                .inc_by(*n);
        }
        mount_latency.push((
            vec![
                ("mountpoint", labels[0].to_string()),
                ("store", labels[1].to_string()),
            ],
            m.stats.fetch_latency,
        ));
    }
    let mut families = f.registry.gather();
    families.push(latency_family(
        "strata_store_fetch_seconds",
        vec![(Vec::new(), total.reads.fetch_latency)],
    ));
    if !mount_latency.is_empty() {
        families.push(latency_family(
            "strata_mount_store_fetch_seconds",
            mount_latency,
        ));
    }
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A histogram family of store fetch times, one series per label set. The cache counts
/// into fixed buckets; the family is built from those counts (a prometheus `Histogram` can
/// only observe values one by one).
fn latency_family(name: &str, series: Vec<(Vec<(&str, String)>, FetchLatency)>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_string());
    family.set_help(
        "Time the store took to answer a ranged GET of chunks, body included (retried \
         attempts that failed are not counted)."
            .to_string(),
    );
    family.set_field_type(MetricType::HISTOGRAM);
    let metrics = series
        .into_iter()
        .map(|(labels, latency)| {
            let mut cumulative = 0;
            let buckets = FETCH_LATENCY_BOUNDS
                .iter()
                .zip(latency.counts)
                .map(|(&bound, n)| {
                    cumulative += n;
                    let mut b = Bucket::default();
                    b.set_upper_bound(bound);
                    b.set_cumulative_count(cumulative);
                    b
                })
                .collect();
            let mut h = Histogram::default();
            h.set_bucket(buckets);
            h.set_sample_count(latency.counts.iter().sum());
            h.set_sample_sum(latency.sum_micros as f64 / 1e6);
            let mut metric = Metric::default();
            metric.set_label(
                labels
                    .into_iter()
                    .map(|(name, value)| {
                        let mut pair = LabelPair::default();
                        pair.set_name(name.to_string());
                        pair.set_value(value);
                        pair
                    })
                    .collect(),
            );
            metric.set_histogram(h);
            metric
        })
        .collect();
    family.set_metric(metrics);
    family
}

/// The last rendering, reused by scrapes within [`SNAPSHOT_REUSE`] of it.
type Rendered = tokio::sync::Mutex<Option<(Instant, Arc<String>)>>;

impl Daemon {
    /// Answers scrapes on `listener` for ever (abort the task to stop). At most
    /// [`CONNECTIONS`] at once, each for at most [`CONNECTION_LIFE`], so whoever reaches the
    /// port cannot hold the daemon's descriptors or tasks; one snapshot a second at most.
    pub async fn serve_metrics(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(CONNECTIONS));
        let rendered: Arc<Rendered> = Arc::default();
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            match listener.accept().await {
                Ok((stream, _)) => {
                    let (this, rendered) = (Arc::clone(&self), Arc::clone(&rendered));
                    tokio::spawn(async move {
                        let _slot = slot;
                        let answered = tokio::time::timeout(
                            CONNECTION_LIFE,
                            this.answer_scrape(stream, &rendered),
                        )
                        .await;
                        if let Ok(Err(e)) = answered {
                            tracing::debug!("metrics connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accepting a metrics connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// The metrics text: rendered again (off the runtime's threads: `stats` reads the disk)
    /// unless the last rendering is recent.
    async fn metrics_text(self: &Arc<Self>, rendered: &Rendered) -> Result<Arc<String>, String> {
        let mut last = rendered.lock().await;
        if let Some((at, text)) = last.as_ref() {
            if at.elapsed() < SNAPSHOT_REUSE {
                return Ok(Arc::clone(text));
            }
        }
        let this = Arc::clone(self);
        let text = tokio::task::spawn_blocking(move || render(&this.stats()))
            .await
            .map_err(|e| format!("rendering metrics: {e}"))?
            .map_err(|e| format!("rendering metrics: {e}"))?;
        let text = Arc::new(text);
        *last = Some((Instant::now(), Arc::clone(&text)));
        Ok(text)
    }

    async fn answer_scrape(
        self: &Arc<Self>,
        mut stream: TcpStream,
        rendered: &Rendered,
    ) -> std::io::Result<()> {
        let mut request = Vec::new();
        let ended =
            |r: &[u8]| r.windows(4).any(|w| w == b"\r\n\r\n") || r.windows(2).any(|w| w == b"\n\n");
        let read = tokio::time::timeout(REQUEST_WAIT, async {
            let mut buf = [0u8; 1024];
            while !ended(&request) && request.len() < REQUEST_MAX {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        if !matches!(read, Ok(Ok(()))) {
            return Ok(()); // slow or broken: dropped
        }
        let line = request
            .split(|&b| b == b'\r' || b == b'\n')
            .next()
            .unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        let (status, body) = match (method, path) {
            ("GET", "/metrics") => match self.metrics_text(rendered).await {
                Ok(text) => ("200 OK", text),
                Err(e) => ("500 Internal Server Error", Arc::new(format!("{e}\n"))),
            },
            ("GET", _) => (
                "404 Not Found",
                Arc::new("strata serves /metrics only\n".to_string()),
            ),
            _ => (
                "405 Method Not Allowed",
                Arc::new("GET /metrics\n".to_string()),
            ),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MountInfo, MountStats};

    #[test]
    fn a_snapshot_renders_as_prometheus_text() {
        let mut stats = StatsReply {
            total: Default::default(),
            store_requests: StoreCounts::default(),
            manifest_bytes: 7,
            mounts: Vec::new(),
            kept: Vec::new(),
            local_integrity: String::new(),
            commits: Default::default(),
            errors: [("ENOENT".to_string(), 9)].into(),
        };
        stats.commits.rebased = 2;
        stats.total.reads.bytes_served = 4096;
        // Fetches of 0.5 ms, 3 ms and 20 s.
        stats.total.reads.fetch_latency.counts[0] = 1;
        stats.total.reads.fetch_latency.counts[2] = 1;
        stats.total.reads.fetch_latency.counts[12] = 1;
        stats.total.reads.fetch_latency.sum_micros = 20_003_500;
        stats.total.reads.memory_hits = 3;
        stats.store_requests.get_range = 5;
        stats.mounts.push(MountStats {
            mount: MountInfo {
                id: 1,
                mountpoint: "/mnt/a \"b\"".into(),
                store: "s3://bucket".into(),
                layers: Vec::new(),
                mounted_at: 0,
                writable: false,
                scratch_size: None,
                volume: None,
                commit_error: None,
                shared_with: None,
                tenant: None,
            },
            stats: ReadStats {
                reads: 2,
                bytes_served: 100,
                ..Default::default()
            },
            prefetch: Default::default(),
            store_requests: StoreCounts {
                get_range: 4,
                ..Default::default()
            },
            errors: [("EIO".to_string(), 1)].into(),
        });
        let text = render(&stats).unwrap();
        for line in [
            "# TYPE strata_read_bytes_total counter",
            "strata_read_bytes_total 4096",
            "strata_chunk_hits_total{tier=\"memory\"} 3",
            "strata_store_requests_total{kind=\"get_range\"} 5",
            "strata_manifest_cache_bytes 7",
            "strata_mounts 1",
            "strata_mount_read_bytes_total{mountpoint=\"/mnt/a \\\"b\\\"\",store=\"s3://bucket\"} 100",
            "strata_mount_store_requests_total{kind=\"get_range\",mountpoint=\"/mnt/a \\\"b\\\"\",store=\"s3://bucket\"} 4",
            "strata_volume_commits_total{outcome=\"rebased\"} 2",
            "strata_volume_commits_total{outcome=\"conflict\"} 0",
            "strata_errors_total{errno=\"ENOENT\"} 9",
            "strata_mount_errors_total{errno=\"EIO\",mountpoint=\"/mnt/a \\\"b\\\"\",store=\"s3://bucket\"} 1",
            "# TYPE strata_store_fetch_seconds histogram",
            "strata_store_fetch_seconds_bucket{le=\"0.001\"} 1",
            "strata_store_fetch_seconds_bucket{le=\"0.0025\"} 1",
            "strata_store_fetch_seconds_bucket{le=\"0.005\"} 2",
            "strata_store_fetch_seconds_bucket{le=\"10\"} 2",
            "strata_store_fetch_seconds_bucket{le=\"+Inf\"} 3",
            "strata_store_fetch_seconds_sum 20.0035",
            "strata_store_fetch_seconds_count 3",
            "strata_mount_store_fetch_seconds_count{mountpoint=\"/mnt/a \\\"b\\\"\",store=\"s3://bucket\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in:\n{text}");
        }
    }
}
