//! The one background sampler behind `/status`, its stream and `/metrics`.
//!
//! Every `metrics.interval_ms` a sweep makes one bulk libvirt call for all running domains
//! (`virConnectGetAllDomainStats`, which skips a domain whose monitor is busy instead of
//! waiting for it) and asks each running domain's QEMU for `query-status` through
//! libvirt's monitor passthrough, all of them at once, each with its own timeout. A VM
//! whose previous query has not come back yet is not asked again, and the bulk call is
//! bounded too (the first call to reach a hung QEMU's monitor waits on it; see
//! `bulk_stats`), so a hung QEMU costs a blocked worker or two, never the sweep. Readers
//! take the latest sweep from memory; nothing they do waits for libvirt unless the latest
//! sweep is older than the interval, and then they join the sweep in progress rather than
//! start another.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use uuid::Uuid;

use crate::hypervisor::{DomainStats, Hypervisor};
use crate::store::Store;

/// What the latest sweep saw of one running VM.
#[derive(Debug, Clone)]
pub struct Sample {
    pub stats: DomainStats,
    /// CPU use over the last interval, in percent of the VM's vCPUs (0–100).
    pub cpu_percent: f64,
    /// QEMU's `query-status`; `None` until a query has answered.
    pub qmpstatus: Option<String>,
    pub pid: Option<u32>,
    /// When the QEMU process started (≈ when the VM was powered on).
    pub started_unix: Option<u64>,
}

impl Sample {
    pub fn uptime_seconds(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.started_unix
            .map(|s| now.saturating_sub(s))
            .unwrap_or(0)
    }
}

/// The sampler's own figures, for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SweepFigures {
    pub sweeps: u64,
    pub failures: u64,
    pub last_wall: Duration,
    /// CPU time the agent process used during the last sweep.
    pub last_cpu: Duration,
    pub last_domains: usize,
    pub qmp_timeouts: u64,
}

/// The least time the bulk stats call is given: libvirtd under load, or busy stopping or
/// starting a domain, can take seconds to answer it; only a hung monitor takes forever.
const BULK_TIMEOUT_MIN: Duration = Duration::from_secs(10);

/// Bulk stats calls a sweep may leave waiting on hung monitors.
const MAX_BULK_INFLIGHT: usize = 3;

#[derive(Default)]
struct Latest {
    samples: HashMap<Uuid, Sample>,
    /// When the latest sweep's libvirt call returned.
    at: Option<Instant>,
    /// When the latest sweep began: everything libvirt knew by then is in it.
    began: Option<Instant>,
}

struct Inner {
    hv: Arc<dyn Hypervisor>,
    /// When set, only domains with a record here are sampled: hvnode never sends monitor
    /// commands to (or reports) domains it does not own.
    store: Option<Store>,
    interval: Duration,
    qmp_timeout: Duration,
    pid_dir: std::path::PathBuf,
    latest: RwLock<Latest>,
    figures: Mutex<SweepFigures>,
    /// One sweep at a time; on-demand callers wait here and then reuse its result.
    sweeping: tokio::sync::Mutex<()>,
    qmp_inflight: Mutex<HashSet<Uuid>>,
    /// Bulk stats calls not yet returned (see `bulk_stats`).
    bulk_inflight: std::sync::atomic::AtomicUsize,
    /// Bumped after every sweep; streams wait on it.
    ticks: watch::Sender<u64>,
}

#[derive(Clone)]
pub struct Sampler {
    inner: Arc<Inner>,
}

impl Sampler {
    pub fn new(
        hv: Arc<dyn Hypervisor>,
        store: Option<Store>,
        interval: Duration,
        qmp_timeout: Duration,
    ) -> Sampler {
        let pid_dir = pid_dir(hv.uri());
        Sampler {
            inner: Arc::new(Inner {
                hv,
                store,
                interval,
                qmp_timeout,
                pid_dir,
                latest: RwLock::new(Latest::default()),
                figures: Mutex::new(SweepFigures::default()),
                sweeping: tokio::sync::Mutex::new(()),
                qmp_inflight: Mutex::new(HashSet::new()),
                bulk_inflight: Default::default(),
                ticks: watch::channel(0).0,
            }),
        }
    }

    pub fn interval(&self) -> Duration {
        self.inner.interval
    }

    /// Sweeps on the interval until the runtime ends. Missed ticks are skipped, never
    /// bunched up.
    pub fn start(&self) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.inner.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                me.sweep_if_older_than(me.inner.interval / 2).await;
            }
        });
    }

    /// A receiver that changes after every sweep.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.ticks.subscribe()
    }

    pub fn figures(&self) -> SweepFigures {
        *self.inner.figures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest sample of every running VM.
    pub fn all(&self) -> HashMap<Uuid, Sample> {
        self.read(|l| l.samples.clone())
    }

    /// The latest sample of `id`, sweeping first when the latest sweep is older than the
    /// interval. `None`: the VM is not running (or libvirt did not report it).
    pub async fn fresh(&self, id: Uuid) -> Option<Sample> {
        self.fresh_within(id, self.inner.interval).await
    }

    /// Like `fresh`, with a sample no older than `max_age`.
    pub async fn fresh_within(&self, id: Uuid, max_age: Duration) -> Option<Sample> {
        self.sweep_if_older_than(max_age).await;
        self.read(|l| l.samples.get(&id).cloned())
    }

    /// The sample of `id` from a sweep that began at `since` or later: what libvirt
    /// reported after something changed at `since`. Waiting callers share sweeps: a
    /// burst of them costs at most the sweep in progress and one more.
    pub async fn fresh_since(&self, id: Uuid, since: Instant) -> Option<Sample> {
        let covered = |me: &Sampler| me.read(|l| l.began.is_some_and(|b| b >= since));
        if !covered(self) {
            let _one = self.inner.sweeping.lock().await;
            if !covered(self) {
                self.sweep().await;
            }
        }
        self.read(|l| l.samples.get(&id).cloned())
    }

    /// The pid of `id`'s QEMU now (one small file read, no libvirt call): a sample with
    /// another pid predates a restart.
    pub fn qemu_pid(&self, id: Uuid) -> Option<u32> {
        qemu_pid(&self.inner.pid_dir, id)
    }

    /// Makes `sample` name the QEMU running now (pid, start time) when no sweep could
    /// see it yet (libvirt slow to answer): the figures stay the last seen, never the
    /// process.
    pub fn with_current_process(&self, id: Uuid, mut sample: Sample) -> Sample {
        let pid = self.qemu_pid(id);
        if pid.is_some() && pid != sample.pid {
            sample.pid = pid;
            sample.started_unix = pid.and_then(process_start_unix);
            sample.cpu_percent = 0.0;
        }
        sample
    }

    fn read<T>(&self, f: impl FnOnce(&Latest) -> T) -> T {
        f(&self.inner.latest.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn age(&self) -> Option<Duration> {
        self.read(|l| l.at.map(|t| t.elapsed()))
    }

    async fn sweep_if_older_than(&self, max_age: Duration) {
        if self.age().is_some_and(|a| a < max_age) {
            return;
        }
        let _one = self.inner.sweeping.lock().await;
        // Someone else may have swept while we waited.
        if self.age().is_some_and(|a| a < max_age) {
            return;
        }
        self.sweep().await;
    }

    /// One sweep; returns how many domains it saw.
    pub async fn sweep(&self) -> usize {
        let wall = Instant::now();
        let began = wall;
        let cpu = process_cpu_time();
        let owned = match &self.inner.store {
            Some(store) => match store.call(|c| crate::store::vms::ids(c)).await {
                Ok(ids) => Some(ids.into_iter().collect::<HashSet<Uuid>>()),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics sweep cannot read the store");
                    self.update_figures(|f| f.failures += 1);
                    return 0;
                }
            },
            None => None,
        };
        let stats = match self.bulk_stats().await {
            Ok(mut s) => {
                if let Some(owned) = &owned {
                    s.retain(|d| owned.contains(&d.id));
                }
                s
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics sweep failed");
                self.update_figures(|f| f.failures += 1);
                return 0;
            }
        };
        let statuses = self.query_statuses(&stats).await;
        let now = Instant::now();
        let n = stats.len();
        {
            let mut latest = self.inner.latest.write().unwrap_or_else(|e| e.into_inner());
            let previous = std::mem::take(&mut latest.samples);
            let elapsed = latest.at.map(|t| now.duration_since(t));
            for mut s in stats {
                let before = previous.get(&s.id);
                if let Some(b) = before.filter(|b| s.cpu_time_ns >= b.stats.cpu_time_ns) {
                    carry_over(&mut s, &b.stats);
                }
                let cpu_percent = match (before, elapsed) {
                    (Some(b), Some(dt)) => cpu_percent(&b.stats, &s, dt),
                    _ => 0.0,
                };
                // The pid file names the QEMU process: the same one as last time keeps its
                // start time; a restarted VM has a new process, even when the restart fell
                // between two sweeps and its CPU time already passed the old one's.
                let pid = qemu_pid(&self.inner.pid_dir, s.id);
                let started_unix = match before {
                    Some(b) if b.pid.is_some() && b.pid == pid => b.started_unix,
                    _ => pid.and_then(process_start_unix),
                };
                let qmpstatus = match statuses.get(&s.id) {
                    Some(q) => Some(q.clone()),
                    None => before.and_then(|b| b.qmpstatus.clone()),
                };
                latest.samples.insert(
                    s.id,
                    Sample {
                        stats: s,
                        cpu_percent,
                        qmpstatus,
                        pid,
                        started_unix,
                    },
                );
            }
            latest.at = Some(now);
            latest.began = Some(began);
        }
        let cpu_used = process_cpu_time().saturating_sub(cpu);
        if wall.elapsed() > self.inner.interval {
            tracing::debug!(
                wall_ms = wall.elapsed().as_millis() as u64,
                domains = n,
                "metrics sweep took longer than its interval"
            );
        }
        self.update_figures(|f| {
            f.sweeps += 1;
            f.last_wall = wall.elapsed();
            f.last_cpu = cpu_used;
            f.last_domains = n;
        });
        self.inner.ticks.send_modify(|t| *t += 1);
        n
    }

    /// The bulk stats call, bounded by the QMP timeout (at least `BULK_TIMEOUT_MIN`).
    /// libvirt skips a domain whose monitor another call holds, but the call that takes a
    /// hung QEMU's monitor first
    /// waits for it forever: that call is left behind (one blocked worker, the monitor
    /// stays held) and asked once more, which then skips the hung domain. At most
    /// `MAX_BULK_INFLIGHT` calls are ever left behind (a QEMU being killed blocks every
    /// call for a while): beyond, the sweep fails at once and readers keep the last one.
    async fn bulk_stats(&self) -> Result<Vec<DomainStats>, String> {
        use std::sync::atomic::Ordering;
        for _ in 0..2 {
            let inflight = &self.inner.bulk_inflight;
            if inflight.fetch_add(1, Ordering::AcqRel) >= MAX_BULK_INFLIGHT {
                inflight.fetch_sub(1, Ordering::AcqRel);
                return Err("earlier domain stats calls have not come back".into());
            }
            let inner = self.inner.clone();
            let call = tokio::spawn(async move {
                let r = inner.hv.all_stats().await;
                inner.bulk_inflight.fetch_sub(1, Ordering::AcqRel);
                r
            });
            let bound = self.inner.qmp_timeout.max(BULK_TIMEOUT_MIN);
            match tokio::time::timeout(bound, call).await {
                Ok(Ok(answer)) => return answer.map_err(|e| e.to_string()),
                Ok(Err(e)) => return Err(format!("domain stats worker failed: {e}")),
                Err(_) => {
                    tracing::warn!("domain stats timed out; a VM's QEMU may hang");
                    self.update_figures(|f| f.qmp_timeouts += 1);
                }
            }
        }
        Err("domain stats timed out twice".into())
    }

    /// `query-status` of every running domain at once, each bounded by the QMP timeout.
    /// A domain whose previous query is still out is skipped.
    async fn query_statuses(&self, stats: &[DomainStats]) -> HashMap<Uuid, String> {
        let mut pending = Vec::new();
        for s in stats {
            let id = s.id;
            {
                let mut inflight = self
                    .inner
                    .qmp_inflight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if !inflight.insert(id) {
                    continue;
                }
            }
            let inner = self.inner.clone();
            let query = tokio::spawn(async move {
                let r = inner.hv.qmp_status(id).await;
                inner
                    .qmp_inflight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                r
            });
            pending.push((id, query));
        }
        let timeout = self.inner.qmp_timeout;
        let answers = futures_util::future::join_all(
            pending
                .into_iter()
                .map(|(id, q)| async move { (id, tokio::time::timeout(timeout, q).await) }),
        )
        .await;
        let mut out = HashMap::new();
        for (id, answer) in answers {
            match answer {
                Ok(Ok(Ok(status))) => {
                    out.insert(id, status);
                }
                Ok(Ok(Err(e))) => tracing::debug!(vps = %id, error = %e, "query-status failed"),
                Ok(Err(_)) => {}
                Err(_) => {
                    tracing::warn!(vps = %id, "query-status timed out; the VM's QEMU may hang");
                    self.update_figures(|f| f.qmp_timeouts += 1);
                }
            }
        }
        out
    }

    fn update_figures(&self, f: impl FnOnce(&mut SweepFigures)) {
        f(&mut self.inner.figures.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// CPU use between two samples of the same domain, in percent of its vCPUs.
pub fn cpu_percent(before: &DomainStats, now: &DomainStats, elapsed: Duration) -> f64 {
    let wall_ns = elapsed.as_nanos() as f64;
    if wall_ns <= 0.0 || now.cpu_time_ns < before.cpu_time_ns {
        return 0.0;
    }
    let used = (now.cpu_time_ns - before.cpu_time_ns) as f64;
    let cores = f64::from(now.vcpus.max(1));
    (used / wall_ns / cores * 100.0).clamp(0.0, 100.0)
}

/// Where libvirt keeps QEMU's pid files for this connection URI.
fn pid_dir(uri: &str) -> std::path::PathBuf {
    if uri.contains("/session") {
        let runtime = std::env::var("XDG_RUNTIME_DIR").unwrap_or_else(|_| "/run/user/0".into());
        std::path::Path::new(&runtime).join("libvirt/qemu/run")
    } else {
        std::path::PathBuf::from("/run/libvirt/qemu")
    }
}

/// The QEMU process of domain `vps-<id>`, from the pid file libvirt writes at its start.
fn qemu_pid(dir: &std::path::Path, id: Uuid) -> Option<u32> {
    std::fs::read_to_string(dir.join(format!("vps-{id}.pid")))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
}

fn process_start_unix(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime, clock ticks after boot); the command name (field 2) may hold
    // spaces, so count from its closing parenthesis.
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let start_ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(btime + start_ticks / hz)
}

/// CPU time used by this process so far.
pub fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Figures a record left out because the domain's monitor was busy, taken from the same
/// QEMU's previous sample, so counters never drop to zero and back.
fn carry_over(now: &mut DomainStats, before: &DomainStats) {
    if !now.block_reported && before.block_reported {
        now.block_read_bytes = before.block_read_bytes;
        now.block_write_bytes = before.block_write_bytes;
        now.block_reported = true;
    }
    if now.guest_available_kib.is_none() && now.guest_unused_kib.is_none() {
        now.guest_available_kib = before.guest_available_kib;
        now.guest_usable_kib = before.guest_usable_kib;
        now.guest_unused_kib = before.guest_unused_kib;
    }
    if now.rss_kib.is_none() {
        now.rss_kib = before.rss_kib;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::PowerState;

    #[test]
    fn counters_a_busy_monitor_left_out_carry_over() {
        let mut before = stats(1_000, 1);
        before.block_read_bytes = 4096;
        before.guest_available_kib = Some(1024);
        let mut now = stats(2_000, 1);
        now.block_reported = false;

        carry_over(&mut now, &before);

        assert_eq!(now.block_read_bytes, 4096);
        assert_eq!(now.guest_available_kib, Some(1024));
    }

    #[test]
    fn reported_counters_are_kept() {
        let mut before = stats(1_000, 1);
        before.block_read_bytes = 4096;
        let mut now = stats(2_000, 1);
        now.block_read_bytes = 8192;

        carry_over(&mut now, &before);

        assert_eq!(now.block_read_bytes, 8192);
    }

    fn stats(cpu_ns: u64, vcpus: u32) -> DomainStats {
        DomainStats {
            id: Uuid::nil(),
            state: PowerState::Running,
            cpu_time_ns: cpu_ns,
            vcpus,
            balloon_current_kib: 0,
            balloon_maximum_kib: 0,
            guest_available_kib: None,
            guest_usable_kib: None,
            guest_unused_kib: None,
            rss_kib: None,
            block_read_bytes: 0,
            block_write_bytes: 0,
            block_reported: true,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            off_reason: None,
        }
    }

    #[test]
    fn cpu_rate_is_per_vcpu_and_clamped() {
        let s = Duration::from_secs(1);
        // One full core out of two: 50 %.
        assert_eq!(cpu_percent(&stats(0, 2), &stats(1_000_000_000, 2), s), 50.0);
        assert_eq!(
            cpu_percent(&stats(0, 1), &stats(3_000_000_000, 1), s),
            100.0
        );
        // A restarted VM's counter went back: no negative rates.
        assert_eq!(cpu_percent(&stats(9, 1), &stats(1, 1), s), 0.0);
    }

    #[test]
    fn own_process_start_time_is_in_the_past() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let started = process_start_unix(std::process::id()).expect("start time");
        assert!(started <= now && now - started < 3600);
    }
}
