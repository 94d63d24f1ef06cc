//! What raftmap's benchmark binaries share: the physical floor measured on the spot (fsync of a
//! 4 KiB block, a loopback TCP round trip), percentiles, Prometheus scrapes, and the monotonic
//! clock that timestamps kernel writes across processes.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

/// The `p` quantile of sorted samples (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The median of `v` and its range (smallest, largest); zeros when empty. For the
/// differences between modes measured round by round.
pub fn median_range(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Microseconds, for tables.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// p50 and p99 of `n` fdatasyncs of a 4 KiB block in `dir`.
pub fn fsync_floor(dir: &Path, n: usize) -> Result<(Duration, Duration)> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let block = vec![7u8; 4096];
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        f.write_all(&block)?;
        let t = Instant::now();
        f.sync_data()?;
        samples.push(t.elapsed());
    }
    std::fs::remove_file(&path)?;
    samples.sort();
    Ok((percentile(&samples, 0.5), percentile(&samples, 0.99)))
}

/// p50 and p99 of `n` 64-byte ping-pongs over loopback TCP.
pub fn rtt_floor(n: usize) -> Result<(Duration, Duration)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 64];
        while s.read_exact(&mut buf).is_ok() {
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut buf = [1u8; 64];
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        samples.push(t.elapsed());
    }
    drop(c);
    let _ = echo.join();
    samples.sort();
    Ok((percentile(&samples, 0.5), percentile(&samples, 0.99)))
}

/// The floor of one replicated write, measured now: `(fsync p50, fsync p99, rtt p50, rtt p99)`.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    pub fsync50: Duration,
    pub fsync99: Duration,
    pub rtt50: Duration,
    pub rtt99: Duration,
}

impl Floor {
    pub fn measure(dir: &Path) -> Result<Self> {
        let (fsync50, fsync99) = fsync_floor(dir, 500)?;
        let (rtt50, rtt99) = rtt_floor(2000)?;
        Ok(Self {
            fsync50,
            fsync99,
            rtt50,
            rtt99,
        })
    }

    /// One fsync plus one round trip, at p50 and p99 (with fsync) or the round trip alone.
    pub fn p50(&self, fsync: bool) -> Duration {
        self.rtt50 + if fsync { self.fsync50 } else { Duration::ZERO }
    }

    pub fn p99(&self, fsync: bool) -> Duration {
        self.rtt99 + if fsync { self.fsync99 } else { Duration::ZERO }
    }

    pub fn describe(&self) -> String {
        format!(
            "fsync 4 KiB p50 {:.0} us p99 {:.0} us; loopback RTT p50 {:.0} us p99 {:.0} us",
            us(self.fsync50),
            us(self.fsync99),
            us(self.rtt50),
            us(self.rtt99)
        )
    }
}

pub use raftmap_jepsen::cluster::scrape_counter;

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process on this machine, so a
/// writer can stamp a value and another process can tell how old it is.
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64,
        // CLOCK_MONOTONIC exists on every Linux; 0 would only make latencies absurd.
        Err(_) => 0,
    }
}

/// Lets short sleeps be short (the default slack is 50 us), for polling loops that measure.
pub fn tight_timer() {
    let _ = nix::sys::prctl::set_timerslack(1000);
}

/// The `raftmap` binary: `explicit`, or the one next to the running bench binary; an error that
/// says how to build it when it is not there.
pub fn raftmap_bin(explicit: Option<&Path>) -> Result<std::path::PathBuf> {
    let bin = match explicit {
        Some(b) => b.to_path_buf(),
        None => {
            let exe = std::env::current_exe()?;
            exe.parent()
                .ok_or_else(|| anyhow::anyhow!("{} has no directory", exe.display()))?
                .join("raftmap")
        }
    };
    if !bin.exists() {
        anyhow::bail!(
            "{} not found: build it first (cargo build --release --bin raftmap)",
            bin.display()
        );
    }
    Ok(bin)
}
