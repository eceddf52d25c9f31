//! The metrics sampler's cost: agent CPU time per sweep for 1, 10 and 50 running domains,
//! against the per-domain way (one `virDomainGetInfo` and one memory-stats call per domain,
//! plus the same QMP query) measured in the same run. The bench domains have no disk or
//! NIC, so block and interface counters cost neither way anything here. It prints whether
//! the target holds: under 20 ms of CPU per sweep at 50 domains, growth no worse than
//! linear.
//!
//!   cargo bench --features rig --bench sampler       (as root, rig up)
//!
//! The domains are small (32 MiB, one vCPU, no disk, no NIC, SeaBIOS finding nothing to
//! boot) so that 50 fit on a small machine; they run under TCG like the rig's guests. CPU
//! time is this process's (`CLOCK_PROCESS_CPUTIME_ID`), summed over its threads, so it
//! includes the blocking workers that talk to libvirt.

use std::sync::Arc;
use std::time::Duration;

use hvnode::hypervisor::{Hypervisor, Libvirt};
use hvnode::metrics::sampler::{process_cpu_time, Sampler};

const SWEEPS: usize = 20;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

fn domain_xml(id: &uuid::Uuid) -> String {
    format!(
        "<domain type='qemu'><name>hvbench-{id}</name><uuid>{id}</uuid>\
         <memory unit='MiB'>32</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\
         <devices><memballoon model='virtio'><stats period='5'/></memballoon></devices></domain>"
    )
}

struct Domains(virt::connect::Connect, Vec<virt::domain::Domain>);

impl Domains {
    fn start(conn: &virt::connect::Connect, n: usize) -> Domains {
        let mut doms = Vec::new();
        for _ in 0..n {
            let id = uuid::Uuid::new_v4();
            let d = conn
                .create_domain_xml(&domain_xml(&id), 0)
                .expect("start a bench domain");
            doms.push(d);
        }
        Domains(conn.clone(), doms)
    }
}

impl Drop for Domains {
    fn drop(&mut self) {
        for d in &self.1 {
            let _ = d.destroy();
        }
        let _ = &self.0;
    }
}

/// The per-domain way: a handful of calls per domain, then the QMP query.
fn per_domain_sweep(conn: &virt::connect::Connect) -> usize {
    let doms = conn
        .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        .unwrap();
    for d in &doms {
        let _ = d.info();
        let _ = d.memory_stats(0);
        let _ = d.qemu_monitor_command(r#"{"execute":"query-status"}"#, 0);
    }
    doms.len()
}

async fn run() {
    virt::error::clear_error_callback();
    let conn = virt::connect::Connect::open(Some("qemu:///system")).expect("libvirt");
    let hv: Arc<dyn Hypervisor> = Arc::new(Libvirt::new("qemu:///system", 4));
    println!("sampler: agent CPU time per sweep ({SWEEPS} sweeps each, after one warm-up)");
    let mut per_domain_at = Vec::new();
    for n in [1usize, 10, 50] {
        let doms = Domains::start(&conn, n);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let sampler = Sampler::new(
            hv.clone(),
            None,
            Duration::from_secs(1),
            Duration::from_secs(2),
        );
        sampler.sweep().await;
        let cpu = process_cpu_time();
        let wall = std::time::Instant::now();
        let mut seen = 0;
        for _ in 0..SWEEPS {
            seen = sampler.sweep().await;
        }
        let ours = (process_cpu_time() - cpu) / SWEEPS as u32;
        let ours_wall = wall.elapsed() / SWEEPS as u32;

        let conn2 = conn.clone();
        let (theirs, theirs_wall) = tokio::task::spawn_blocking(move || {
            per_domain_sweep(&conn2);
            let cpu = process_cpu_time();
            let wall = std::time::Instant::now();
            for _ in 0..SWEEPS {
                per_domain_sweep(&conn2);
            }
            (
                (process_cpu_time() - cpu) / SWEEPS as u32,
                wall.elapsed() / SWEEPS as u32,
            )
        })
        .await
        .unwrap();
        drop(doms);
        println!(
            "  {n:>2} domains (saw {seen:>2}): bulk {:7.2} ms CPU ({:7.2} ms wall)   per-domain {:7.2} ms CPU ({:7.2} ms wall)   ratio {:.2}x   bulk per domain {:.3} ms",
            ours.as_secs_f64() * 1e3,
            ours_wall.as_secs_f64() * 1e3,
            theirs.as_secs_f64() * 1e3,
            theirs_wall.as_secs_f64() * 1e3,
            theirs.as_secs_f64() / ours.as_secs_f64().max(1e-9),
            ours.as_secs_f64() * 1e3 / n as f64,
        );
        per_domain_at.push((n, ours));
    }
    let (n1, c1) = per_domain_at[0];
    let (n50, c50) = per_domain_at[per_domain_at.len() - 1];
    let growth = c50.as_secs_f64() / c1.as_secs_f64().max(1e-9);
    println!(
        "  growth 1 -> 50 domains: {growth:.1}x CPU for {}x domains",
        n50 / n1
    );
    let target = c50 < Duration::from_millis(20) && growth <= (n50 / n1) as f64;
    println!(
        "  target (< 20 ms CPU per sweep at 50, growth <= linear): {}",
        if target { "met" } else { "NOT met" }
    );
}
