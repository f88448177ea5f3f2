//! `strata top`: a live view of the daemon, refreshed in place. Per mount: reads and bytes
//! served per second, the chunk hit ratio, store GETs and bytes per second, errors answered;
//! above them the host's cache, store traffic, fetch times and volume commits. Rates are the
//! difference between two snapshots of `strata stats`.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::Args;
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyModifiers};
use crossterm::{cursor, execute, terminal};

use crate::units::{human, parse_duration};
use crate::GlobalArgs;
use cache::ReadStats;
use strata_daemon::{Client, StatsReply};

#[derive(Args)]
pub struct TopArgs {
    /// Time between refreshes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Print one view (rates over one interval) and exit; the default when stdout is not a
    /// terminal.
    #[arg(long)]
    once: bool,
}

pub async fn run(g: &GlobalArgs, a: TopArgs) -> anyhow::Result<()> {
    let client = Client::new(g.socket());
    let interval = a.interval.max(Duration::from_millis(100));
    let socket = g.socket().display().to_string();
    if a.once || !std::io::stdout().is_terminal() {
        let first = (client.stats().await?, Instant::now());
        tokio::time::sleep(interval).await;
        let now = (client.stats().await?, Instant::now());
        for line in frame(
            &socket,
            Some((&first.0, first.1)),
            (&now.0, now.1),
            usize::MAX,
        ) {
            println!("{line}");
        }
        return Ok(());
    }
    // A signal ends the view like q does, so the terminal is restored (raw mode off).
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let _screen = Screen::enter()?;
    let mut previous: Option<(StatsReply, Instant)> = None;
    loop {
        let stats = client.stats().await?;
        let at = Instant::now();
        let (width, height) = terminal::size().unwrap_or((100, 40));
        let lines = frame(
            &socket,
            previous.as_ref().map(|(s, t)| (s, *t)),
            (&stats, at),
            width as usize,
        );
        draw(&lines, height as usize)?;
        previous = Some((stats, at));
        // Keys are read off the runtime's threads: waiting for one blocks.
        let keys = tokio::task::spawn_blocking(move || wait_for_quit(interval));
        let quit = tokio::select! {
            quit = keys => quit??,
            _ = term.recv() => true,
            _ = hangup.recv() => true,
        };
        if quit {
            return Ok(());
        }
    }
}

/// Raw mode and the alternate screen while the view runs; the terminal is restored however
/// it ends (an error, a lost daemon).
struct Screen;

impl Screen {
    fn enter() -> std::io::Result<Screen> {
        terminal::enable_raw_mode()?;
        let screen = Screen;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

fn draw(lines: &[String], height: usize) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    execute!(out, cursor::MoveTo(0, 0))?;
    for line in lines.iter().take(height) {
        // Raw mode: a line feed alone does not return the carriage.
        write!(out, "{line}")?;
        execute!(out, terminal::Clear(terminal::ClearType::UntilNewLine))?;
        write!(out, "\r\n")?;
    }
    execute!(out, terminal::Clear(terminal::ClearType::FromCursorDown))?;
    out.flush()
}

/// Waits up to `interval` for a key; true if it asks to quit (q, Esc, Ctrl-C).
fn wait_for_quit(interval: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + interval;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !event::poll(left)? {
            return Ok(false);
        }
        if let Event::Key(KeyEvent {
            code, modifiers, ..
        }) = event::read()?
        {
            let ctrl_c = code == KeyCode::Char('c') && modifiers.contains(KeyModifiers::CONTROL);
            if matches!(code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                return Ok(true);
            }
        }
    }
}

/// Per second, over `secs`; 0 without an earlier snapshot.
fn rate(now: u64, before: Option<u64>, secs: f64) -> f64 {
    match before {
        Some(b) if secs > 0.0 => now.saturating_sub(b) as f64 / secs,
        _ => 0.0,
    }
}

fn per_sec_bytes(bytes_per_sec: f64) -> String {
    format!("{}/s", human(bytes_per_sec as u64))
}

/// Chunks found in memory or on disk, of all asked for, over the interval (or since the
/// start when the interval asked for none).
fn hit_ratio(now: &ReadStats, before: Option<&ReadStats>) -> String {
    let local = |s: &ReadStats| s.memory_hits + s.disk_hits;
    let all = |s: &ReadStats| s.memory_hits + s.disk_hits + s.store_hits;
    let (hits, total) = match before {
        Some(b) if all(now) > all(b) => (local(now) - local(b).min(local(now)), all(now) - all(b)),
        _ => (local(now), all(now)),
    };
    if total == 0 {
        "-".into()
    } else {
        format!("{:.0}%", hits as f64 * 100.0 / total as f64)
    }
}

/// Error replies other than ENOENT (functions look up missing names all the time), with the
/// most frequent errno.
fn errors(counts: &std::collections::BTreeMap<String, u64>) -> String {
    let real: Vec<(&String, &u64)> = counts.iter().filter(|(e, _)| *e != "ENOENT").collect();
    let total: u64 = real.iter().map(|(_, n)| **n).sum();
    match real.iter().max_by_key(|(_, n)| **n) {
        Some((errno, _)) => format!("{total} {errno}"),
        None => "0".into(),
    }
}

/// Fetch time quantile `q`, as the bound of its bucket.
fn quantile(latency: &cache::FetchLatency, q: f64) -> String {
    match latency.quantile_bound(q) {
        None => "-".into(),
        Some(b) if b < 1.0 => format!("≤{}ms", b * 1000.0),
        Some(b) if b.is_finite() => format!("≤{b}s"),
        Some(_) => format!(
            ">{}s",
            cache::FETCH_LATENCY_BOUNDS[cache::FETCH_LATENCY_BOUNDS.len() - 1]
        ),
    }
}

/// The lines of one view of `now`, with rates against `before`, cut to `width` columns.
fn frame(
    socket: &str,
    before: Option<(&StatsReply, Instant)>,
    now: (&StatsReply, Instant),
    width: usize,
) -> Vec<String> {
    let (stats, at) = now;
    let secs = before.map_or(0.0, |(_, t)| at.duration_since(t).as_secs_f64());
    let prev = before.map(|(s, _)| s);
    let t = &stats.total;
    let r = &stats.store_requests;
    let pr = prev.map(|p| &p.store_requests);
    let gets = |c: &strata_store::StoreCounts| c.get + c.get_range + c.get_versioned;
    let c = &stats.commits;
    let mut lines = vec![
        format!(
            "strata top: daemon {socket}, {} mounts (q quits)",
            stats.mounts.len()
        ),
        format!(
            "cache: disk {} of {} ({} evicted), memory {} of {}",
            human(t.disk_used),
            human(t.disk_capacity),
            t.disk_evictions,
            human(t.memory_used),
            human(t.memory_capacity)
        ),
        format!(
            "store: {:.1} GET/s, {} in, {} out; fetch p50 {}, p99 {}",
            rate(gets(r), pr.map(gets), secs),
            per_sec_bytes(rate(r.bytes_read, pr.map(|p| p.bytes_read), secs)),
            per_sec_bytes(rate(r.bytes_written, pr.map(|p| p.bytes_written), secs)),
            quantile(&t.reads.fetch_latency, 0.5),
            quantile(&t.reads.fetch_latency, 0.99),
        ),
        format!(
            "volume commits: {} committed, {} rebased, {} conflicts, {} kept, {} failed; errors: {}",
            c.committed,
            c.rebased,
            c.conflict,
            c.kept,
            c.failed,
            errors(&stats.errors)
        ),
        String::new(),
        format!(
            "{:<40} {:>9} {:>11} {:>5} {:>7} {:>11} {:>10}",
            "MOUNT", "READS/s", "SERVED", "HIT", "GETs/s", "FROM STORE", "ERRORS"
        ),
    ];
    let earlier: HashMap<u64, &strata_daemon::MountStats> = prev
        .map(|p| p.mounts.iter().map(|m| (m.mount.id, m)).collect())
        .unwrap_or_default();
    let mut mounts: Vec<_> = stats
        .mounts
        .iter()
        .filter(|m| m.mount.shared_with.is_none())
        .collect();
    mounts.sort_by(|a, b| a.mount.mountpoint.cmp(&b.mount.mountpoint));
    for m in mounts {
        let e = earlier.get(&m.mount.id).map(|e| &e.stats);
        let s = &m.stats;
        let sharing = stats
            .mounts
            .iter()
            .filter(|o| o.mount.shared_with == Some(m.mount.id))
            .count();
        let mut name = m.mount.mountpoint.display().to_string();
        if sharing > 0 {
            name.push_str(&format!(" (+{sharing} shared)"));
        }
        lines.push(format!(
            "{:<40} {:>9.1} {:>11} {:>5} {:>7.1} {:>11} {:>10}",
            name,
            rate(s.reads, e.map(|e| e.reads), secs),
            per_sec_bytes(rate(s.bytes_served, e.map(|e| e.bytes_served), secs)),
            hit_ratio(s, e),
            rate(s.store_gets, e.map(|e| e.store_gets), secs),
            per_sec_bytes(rate(s.store_bytes, e.map(|e| e.store_bytes), secs)),
            errors(&m.errors),
        ));
    }
    for line in &mut lines {
        if line.chars().count() > width {
            *line = line.chars().take(width).collect();
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(reads: u64, served: u64, hits: (u64, u64, u64)) -> StatsReply {
        let mount: strata_daemon::MountStats = serde_json::from_value(serde_json::json!({
            "id": 7, "mountpoint": "/srv/fn", "store": "s3://b", "layers": [],
            "mounted_at": 0, "writable": false,
            "stats": {"reads": reads, "bytes_served": served, "chunk_requests": 0,
                      "memory_hits": hits.0, "disk_hits": hits.1, "store_hits": hits.2,
                      "store_gets": hits.2, "store_bytes": hits.2 << 20, "chunks_fetched": 0,
                      "corrupt_chunks": 0, "errors": 0},
            "errors": {"ENOENT": 40, "EIO": 2}
        }))
        .unwrap();
        let mut reply: StatsReply = serde_json::from_value(serde_json::json!({
            "total": {"reads": 0, "bytes_served": 0, "chunk_requests": 0, "memory_hits": 0,
                      "disk_hits": 0, "store_hits": 0, "store_gets": 0, "store_bytes": 0,
                      "chunks_fetched": 0, "corrupt_chunks": 0, "errors": 0,
                      "memory_used": 0, "memory_capacity": 1, "disk_used": 0,
                      "disk_capacity": 1, "disk_chunks": 0, "disk_evictions": 0},
            "manifest_bytes": 0, "mounts": []
        }))
        .unwrap();
        reply.mounts.push(mount);
        reply
    }

    #[test]
    fn a_view_shows_each_mounts_rates_over_the_interval() {
        let t0 = Instant::now();
        let before = stats(100, 1 << 20, (10, 0, 10));
        let now = stats(300, 5 << 20, (40, 0, 20));
        let lines = frame(
            "/run/s.sock",
            Some((&before, t0)),
            (&now, t0 + Duration::from_secs(2)),
            200,
        );
        let row = lines.iter().find(|l| l.starts_with("/srv/fn")).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        // 200 reads in 2 s; 4 MiB in 2 s; 30 of 40 chunks local; 10 GETs in 2 s; EIO only.
        assert_eq!(cols[1], "100.0", "{row}");
        assert_eq!(cols[2..4].join(" "), human(2 << 20) + "/s", "{row}");
        assert_eq!(cols[4], "75%", "{row}");
        assert_eq!(cols[5], "5.0", "{row}");
        assert_eq!(cols[cols.len() - 2..].join(" "), "2 EIO", "{row}");
        // Cut to the terminal's width.
        let narrow = frame("/run/s.sock", None, (&now, t0), 20);
        assert!(narrow.iter().all(|l| l.chars().count() <= 20));
    }
}
