//! The metrics sampler's cost: agent CPU time per sweep for 1, 10 and 50 running domains,
//! against the per-domain way measured in the same run, both reading the same counters
//! into the same records.
//!
//!   cargo bench --features rig --bench sampler       (as root, rig up)
//!
//! hvnode's side is the agent's sampler as the agent builds it (src/app.rs): its own
//! libvirt client with two connections, the agent's store, and the default interval and
//! QMP timeout. Every domain here has a record in that store, as an agent's VMs do, so a
//! sweep does what the agent's does: read the VM ids from the store, one bulk
//! `virConnectGetAllDomainStats` (state, CPU time, vCPUs, balloon and the guest's memory
//! figures, block and interface counters) for every running domain of the host, keep its
//! own, then QMP `query-status` for each of them, and fold everything into the samples it
//! keeps in memory (CPU percent over the interval, the QEMU pid and start time, read once
//! per QEMU process). Nothing of a sweep is written back to the store.
//!
//! The per-domain way reads the same: the same store read, one listing of the running
//! domains, then per owned domain `virDomainGetInfo` (state, CPU time, vCPUs, balloon
//! current and maximum), `virDomainMemoryStats` (available, usable, unused, RSS),
//! `virDomainBlockStats` for each of its two disks, `virDomainInterfaceStats` for its tap
//! and the same `query-status`, folded into the same `Sample` records the same way. Its
//! device names come from the domain's id, as the agent derives a VM's from its record.
//! It runs one call after another on one connection, as a script would.
//!
//! The domains are small (32 MiB, one vCPU, SeaBIOS finding nothing to boot) so that 50
//! fit on a small machine, and have what an agent's domain has for the counters: two
//! virtio disks (small raw files, the second read-only like the seed), one virtio NIC (a
//! tap libvirt creates, on no bridge, with no boot ROM) and the balloon with 5 s
//! statistics. They run under TCG like the rig's guests and are named `vps-<id>` like an
//! agent's, so the sampler finds their QEMU pid files. Other domains running on the host
//! (other tests' guests) are in the bulk call's answer and dropped by the store filter, as
//! on a real host; the per-domain way lists them too and skips them.
//!
//! CPU time is this process's (`CLOCK_PROCESS_CPUTIME_ID`), summed over its threads, so it
//! includes the blocking workers that talk to libvirt. Each count of domains is measured in
//! `BENCH_ROUNDS` rounds (default 3) of `SWEEPS` sweeps each way, alternating which way
//! goes first; the figure is the median round.
//!
//! The target (printed, and the bench exits 1 when it is missed): under 20 ms of CPU per
//! sweep at 50 domains, growth from 1 to 50 domains no worse than linear, and every sweep
//! sees exactly the bench's domains.

#[path = "../tests/e2e/harness.rs"]
mod harness;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvnode::config::MetricsConfig;
use hvnode::hypervisor::{DomainStats, Hypervisor, Libvirt, PowerState};
use hvnode::metrics::sampler::{cpu_percent, process_cpu_time, Sampler};
use hvnode::metrics::Sample;
use hvnode::store::{self, Store, VmRow, VmRowState};
use uuid::Uuid;

const SWEEPS: usize = 20;
const COUNTS: [usize; 3] = [1, 10, 50];
/// The target: CPU per sweep at the largest count.
const TARGET_CPU: Duration = Duration::from_millis(20);
/// The bench domains' taps: `hs` + the id's first 12 hex digits + the NIC's number.
const TAP_PREFIX: &str = "hs";
const DISKS: [&str; 2] = ["vda", "vdb"];

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let met = rt.block_on(run());
    drop(rt);
    if !met {
        std::process::exit(1);
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

fn tap(id: Uuid) -> String {
    hvnode::network::tap_name(TAP_PREFIX, id, 0)
}

fn domain_xml(id: Uuid, dir: &Path) -> String {
    let disk = |n: usize| dir.join(format!("{id}-{n}.img")).display().to_string();
    format!(
        "<domain type='qemu'><name>vps-{id}</name><uuid>{id}</uuid>\
         <memory unit='MiB'>32</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\
         <devices>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{a}'/><target dev='vda' bus='virtio'/></disk>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{b}'/><target dev='vdb' bus='virtio'/><readonly/></disk>\
         <interface type='ethernet'><target dev='{tap}'/><model type='virtio'/>\
         <rom enabled='no'/></interface>\
         <memballoon model='virtio'><stats period='5'/></memballoon>\
         </devices></domain>",
        a = disk(0),
        b = disk(1),
        tap = tap(id),
    )
}

fn record(id: Uuid, n: usize) -> VmRow {
    let now = hvnode::time::now();
    VmRow {
        id,
        hostname: format!("sampler-bench-{n}"),
        template_id: harness::TEMPLATE.into(),
        cpu_cores: 1,
        ram_mb: 32,
        disk_gb: 1,
        bandwidth_mbps: None,
        password_hash: String::new(),
        ssh_keys: Vec::new(),
        ip_address: None,
        mac: format!("52:54:00:5b:{:02x}:{:02x}", n / 256, n % 256),
        state: VmRowState::Active,
        webhook_url: None,
        webhook_secret: None,
        instance_id: id.to_string(),
        request_digest: String::new(),
        created_at: now.clone(),
        updated_at: now,
        deployed_at: None,
    }
}

/// Running bench domains with their records in the store; destroyed (and their records
/// removed) when dropped.
struct Domains {
    conn: virt::connect::Connect,
    store: Store,
    doms: Vec<virt::domain::Domain>,
}

impl Domains {
    fn start(conn: &virt::connect::Connect, store: &Store, dir: &Path, n: usize) -> Domains {
        let mut me = Domains {
            conn: conn.clone(),
            store: store.clone(),
            doms: Vec::new(),
        };
        for i in 0..n {
            let id = Uuid::new_v4();
            for d in 0..DISKS.len() {
                let f = std::fs::File::create(dir.join(format!("{id}-{d}.img"))).unwrap();
                f.set_len(1 << 20).unwrap();
            }
            let row = record(id, i);
            store
                .call_sync(move |c| store::vms::insert(c, &row))
                .unwrap();
            let d = conn
                .create_domain_xml(&domain_xml(id, dir), 0)
                .expect("start a bench domain");
            me.doms.push(d);
        }
        me
    }
}

impl Drop for Domains {
    fn drop(&mut self) {
        for d in &self.doms {
            let _ = d.destroy();
        }
        let _ = self
            .store
            .call_sync(|c| Ok(c.execute("DELETE FROM vms", [])?));
        let _ = &self.conn;
    }
}

fn power(s: virt::domain::DomainStateEnum) -> PowerState {
    use virt::domain::DomainState as S;
    if s.is(S::Running) || s.is(S::Blocked) {
        PowerState::Running
    } else if s.is(S::Paused) {
        PowerState::Paused
    } else if s.is(S::Shutdown) {
        PowerState::ShuttingDown
    } else if s.is(S::Shutoff) {
        PowerState::Shutoff
    } else if s.is(S::Crashed) {
        PowerState::Crashed
    } else if s.is(S::PMSuspended) {
        PowerState::PmSuspended
    } else {
        PowerState::Unknown
    }
}

/// The QEMU process of `vps-<id>`, as the sampler reads it: pid file, then start time.
fn qemu_process(id: Uuid) -> (Option<u32>, Option<u64>) {
    let Some(pid) = std::fs::read_to_string(format!("/run/libvirt/qemu/vps-{id}.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return (None, None);
    };
    let started = (|| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after = stat.get(stat.rfind(')')? + 2..)?;
        let ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
        let btime: u64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
        Some(btime + ticks / hz.max(1))
    })();
    (Some(pid), started)
}

/// The per-domain way, keeping its samples as the sampler keeps its own.
struct PerDomain {
    conn: virt::connect::Connect,
    store: Store,
    latest: HashMap<Uuid, Sample>,
    at: Option<Instant>,
}

impl PerDomain {
    fn stats(d: &virt::domain::Domain, id: Uuid) -> Option<DomainStats> {
        let info = d.info().ok()?;
        let mut s = DomainStats {
            id,
            state: power(info.state),
            cpu_time_ns: info.cpu_time,
            vcpus: info.nr_virt_cpu,
            balloon_current_kib: info.memory,
            balloon_maximum_kib: info.max_mem,
            guest_available_kib: None,
            guest_usable_kib: None,
            guest_unused_kib: None,
            rss_kib: None,
            block_read_bytes: 0,
            block_write_bytes: 0,
            block_reported: false,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            off_reason: None,
        };
        for m in d.memory_stats(0).unwrap_or_default() {
            match m.tag {
                virt::sys::VIR_DOMAIN_MEMORY_STAT_AVAILABLE => s.guest_available_kib = Some(m.val),
                virt::sys::VIR_DOMAIN_MEMORY_STAT_USABLE => s.guest_usable_kib = Some(m.val),
                virt::sys::VIR_DOMAIN_MEMORY_STAT_UNUSED => s.guest_unused_kib = Some(m.val),
                virt::sys::VIR_DOMAIN_MEMORY_STAT_RSS => s.rss_kib = Some(m.val),
                _ => {}
            }
        }
        for disk in DISKS {
            if let Ok(b) = d.block_stats(disk) {
                s.block_read_bytes += u64::try_from(b.rd_bytes).unwrap_or(0);
                s.block_write_bytes += u64::try_from(b.wr_bytes).unwrap_or(0);
                s.block_reported = true;
            }
        }
        if let Ok(i) = d.interface_stats(&tap(id)) {
            s.net_rx_bytes = u64::try_from(i.rx_bytes).unwrap_or(0);
            s.net_tx_bytes = u64::try_from(i.tx_bytes).unwrap_or(0);
        }
        Some(s)
    }

    /// One sweep; returns how many domains it saw.
    fn sweep(&mut self) -> usize {
        let owned: HashSet<Uuid> = self
            .store
            .call_sync(|c| store::vms::ids(c))
            .unwrap()
            .into_iter()
            .collect();
        let doms = self
            .conn
            .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .unwrap_or_default();
        let mut seen = Vec::new();
        for d in &doms {
            let Some(id) = d.uuid_string().ok().and_then(|s| s.parse::<Uuid>().ok()) else {
                continue;
            };
            if !owned.contains(&id) {
                continue;
            }
            let Some(s) = Self::stats(d, id) else {
                continue;
            };
            let status = d
                .qemu_monitor_command(r#"{"execute":"query-status"}"#, 0)
                .ok()
                .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok())
                .and_then(|v| v["return"]["status"].as_str().map(str::to_owned));
            seen.push((s, status));
        }
        let now = Instant::now();
        let previous = std::mem::take(&mut self.latest);
        let elapsed = self.at.map(|t| now.duration_since(t));
        let n = seen.len();
        for (s, status) in seen {
            let before = previous.get(&s.id);
            let cpu = match (before, elapsed) {
                (Some(b), Some(dt)) => cpu_percent(&b.stats, &s, dt),
                _ => 0.0,
            };
            let (pid, started_unix) = match before {
                Some(b) if b.pid.is_some() && s.cpu_time_ns >= b.stats.cpu_time_ns => {
                    (b.pid, b.started_unix)
                }
                _ => qemu_process(s.id),
            };
            let qmpstatus = status.or_else(|| before.and_then(|b| b.qmpstatus.clone()));
            self.latest.insert(
                s.id,
                Sample {
                    stats: s,
                    cpu_percent: cpu,
                    qmpstatus,
                    pid,
                    started_unix,
                },
            );
        }
        self.at = Some(now);
        n
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// CPU and wall time per sweep over `SWEEPS` sweeps of the agent's sampler, and how many
/// domains the last one saw.
async fn bulk_round(sampler: &Sampler) -> (Duration, Duration, usize) {
    let cpu = process_cpu_time();
    let wall = Instant::now();
    let mut seen = 0;
    for _ in 0..SWEEPS {
        seen = sampler.sweep().await;
    }
    (
        (process_cpu_time() - cpu) / SWEEPS as u32,
        wall.elapsed() / SWEEPS as u32,
        seen,
    )
}

async fn per_domain_round(mut p: PerDomain) -> (PerDomain, (Duration, Duration, usize)) {
    tokio::task::spawn_blocking(move || {
        let cpu = process_cpu_time();
        let wall = Instant::now();
        let mut seen = 0;
        for _ in 0..SWEEPS {
            seen = p.sweep();
        }
        let r = (
            (process_cpu_time() - cpu) / SWEEPS as u32,
            wall.elapsed() / SWEEPS as u32,
            seen,
        );
        (p, r)
    })
    .await
    .unwrap()
}

async fn run() -> bool {
    let rounds = env_usize("BENCH_ROUNDS", 3);
    let rig = harness::Rig::load();
    let dir: PathBuf = rig
        .root
        .join("e2e")
        .join(format!("sampler-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for d in [&rig.root.join("e2e"), &dir] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let store = Store::open(&dir.join("hvnode.db")).expect("open the store");

    virt::error::clear_error_callback();
    let uri = "qemu:///system";
    let conn = virt::connect::Connect::open(Some(uri)).expect("libvirt");
    // As src/app.rs builds the sampler: its own client with two connections.
    let hv: Arc<dyn Hypervisor> = Arc::new(Libvirt::new(uri, 2));
    let metrics = MetricsConfig::default();
    let others = conn
        .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        .map(|d| d.len())
        .unwrap_or(0);
    println!(
        "sampler: agent CPU time per sweep, {rounds} rounds x {SWEEPS} sweeps each way \
         (alternating which goes first), median round; {others} other domains running on the host"
    );
    let mut bulk_at = Vec::new();
    let mut all_seen = true;
    for n in COUNTS {
        let doms = Domains::start(&conn, &store, &dir, n);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let sampler = Sampler::new(
            hv.clone(),
            Some(store.clone()),
            Duration::from_millis(metrics.interval_ms),
            Duration::from_millis(metrics.qmp_timeout_ms),
        );
        let mut per = PerDomain {
            conn: conn.clone(),
            store: store.clone(),
            latest: HashMap::new(),
            at: None,
        };
        // Warm-up: each way's first sweep reads the pid files and opens its handles.
        sampler.sweep().await;
        per = tokio::task::spawn_blocking(move || {
            per.sweep();
            per
        })
        .await
        .unwrap();
        let (mut ours, mut ours_wall, mut theirs, mut theirs_wall) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut seen = (usize::MAX, usize::MAX);
        for round in 0..rounds {
            let (b, p);
            if round % 2 == 0 {
                b = bulk_round(&sampler).await;
                (per, p) = per_domain_round(per).await;
            } else {
                (per, p) = per_domain_round(per).await;
                b = bulk_round(&sampler).await;
            }
            ours.push(b.0);
            ours_wall.push(b.1);
            theirs.push(p.0);
            theirs_wall.push(p.1);
            seen = (seen.0.min(b.2), seen.1.min(p.2));
            if b.2 != n || p.2 != n {
                all_seen = false;
            }
        }
        // Both ways must have read the same thing.
        let same_fields = per.latest.len() == sampler.all().len()
            && sampler.all().iter().all(|(id, s)| {
                per.latest.get(id).is_some_and(|p| {
                    p.qmpstatus == s.qmpstatus
                        && p.pid == s.pid
                        && p.stats.vcpus == s.stats.vcpus
                        && p.stats.balloon_maximum_kib == s.stats.balloon_maximum_kib
                        && p.stats.block_reported == s.stats.block_reported
                })
            });
        let spread = |v: &[Duration]| {
            let lo = v.iter().min().copied().unwrap_or_default();
            let hi = v.iter().max().copied().unwrap_or_default();
            format!("{:.2}-{:.2}", ms(lo), ms(hi))
        };
        let (o, t) = (median(ours.clone()), median(theirs.clone()));
        drop(doms);
        println!(
            "  {n:>2} domains (saw {:>2}/{:>2}): bulk {:7.2} ms CPU [{}] ({:7.2} ms wall)   per-domain {:7.2} ms CPU [{}] ({:7.2} ms wall)   ratio {:.2}x   bulk per domain {:.3} ms{}",
            seen.0,
            seen.1,
            ms(o),
            spread(&ours),
            ms(median(ours_wall)),
            ms(t),
            spread(&theirs),
            ms(median(theirs_wall)),
            t.as_secs_f64() / o.as_secs_f64().max(1e-9),
            ms(o) / n as f64,
            if same_fields { "" } else { "   (the two ways' samples differ!)" },
        );
        all_seen &= same_fields;
        bulk_at.push((n, o));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (n1, c1) = bulk_at[0];
    let (nmax, cmax) = bulk_at[bulk_at.len() - 1];
    let growth = cmax.as_secs_f64() / c1.as_secs_f64().max(1e-9);
    println!(
        "  growth {n1} -> {nmax} domains: {growth:.1}x CPU for {}x domains",
        nmax / n1
    );
    let met = cmax < TARGET_CPU && growth <= (nmax / n1) as f64 && all_seen;
    println!(
        "target: < {} ms CPU per sweep at {nmax} domains ({:.2} ms), growth <= linear ({growth:.1}x for {}x), every sweep saw exactly the bench's domains ({}): {}",
        TARGET_CPU.as_millis(),
        ms(cmax),
        nmax / n1,
        if all_seen { "yes" } else { "no" },
        if met { "met" } else { "NOT met" }
    );
    met
}
