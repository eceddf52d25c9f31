//! Provisioning overhead: `POST /v1/vms` until the domain runs, against the way an operator
//! would script it without hvnode (`benches/baseline-provision.sh`: qemu-img overlay +
//! password hash + cloud-localds seed + virsh define + virsh start), on the same template,
//! measured in the same run, interleaved so that both see the same machine.
//!
//!   cargo bench --features rig --bench provision          (as root, rig up)
//!
//! Phases: 10 sequential creates each way (median, min, max), then 10 concurrent creates
//! each way (wall time until all 10 run), then the agent's RSS, idle, with 5 deployed VMs.
//! Guests are destroyed right after they are measured, so boots do not load the machine.
//! "Running" is libvirt's `virDomainGetState`, polled every millisecond in this process.

#[path = "../tests/e2e/harness.rs"]
mod harness;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{Agent, AgentOptions, Rig};
use serde_json::json;

const RUNS: usize = 10;

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

struct Libvirt(virt::connect::Connect);

impl Libvirt {
    fn open() -> Libvirt {
        virt::error::clear_error_callback();
        Libvirt(virt::connect::Connect::open(Some("qemu:///system")).expect("libvirt"))
    }

    fn running(&self, id: &str) -> bool {
        self.0
            .lookup_domain_by_uuid_string(id)
            .and_then(|d| d.state())
            .map(|(s, _)| s.is(virt::domain::DomainState::Running))
            .unwrap_or(false)
    }

    fn wait_running(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.running(id) {
            assert!(Instant::now() < deadline, "{id} never ran");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn body(id: &str, name: &str) -> serde_json::Value {
    json!({
        "id": id, "hostname": name, "template_id": harness::TEMPLATE,
        "cpu_cores": 1, "ram_mb": 256, "disk_gb": 4,
        "root_password": "Bench-pass-1", "ssh_keys": [harness::SSH_KEY],
    })
}

/// One VM through hvnode: POST, then poll libvirt until it runs. Returns milliseconds.
async fn hvnode_one(agent: &Agent, lv: &Libvirt, id: &str, name: &str) -> f64 {
    let t0 = Instant::now();
    let (s, r) = agent.create(body(id, name)).await;
    assert_eq!(s, 202, "{r}");
    lv.wait_running(id);
    t0.elapsed().as_secs_f64() * 1000.0
}

struct Script {
    rig: Rig,
    template: PathBuf,
    dir: PathBuf,
}

impl Script {
    fn args(&self, n: usize, id: &str) -> Vec<String> {
        vec![
            format!("bench-base-{n}"),
            id.to_owned(),
            self.dir.join(id).display().to_string(),
            self.template.display().to_string(),
            self.rig.bridge.clone(),
            format!("52:54:00:be:00:{n:02x}"),
            format!("{}/{}", self.rig.addr(230 + n as u8), self.rig.prefix),
            self.rig.gateway.clone(),
            "Bench-pass-1".into(),
            harness::SSH_KEY.into(),
        ]
    }

    fn command(&self, n: usize, id: &str) -> Command {
        let mut c = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/baseline-provision.sh"
        ));
        c.args(self.args(n, id));
        c
    }

    /// One VM the scripted way; milliseconds until `virsh start` returned (domain running).
    fn one(&self, n: usize, id: &str) -> f64 {
        let t0 = Instant::now();
        let st = self.command(n, id).status().unwrap();
        assert!(st.success(), "baseline script failed");
        t0.elapsed().as_secs_f64() * 1000.0
    }

    fn cleanup(&self, n: usize, id: &str) {
        let name = format!("bench-base-{n}");
        harness::virsh(&["destroy", &name]);
        harness::virsh(&["undefine", "--nvram", &name]);
        let _ = std::fs::remove_dir_all(self.dir.join(id));
    }
}

async fn run() {
    let rig = Rig::load();
    let manifest = std::fs::read_to_string(rig.image_dir.join("9010.toml")).unwrap();
    let file = manifest
        .lines()
        .find_map(|l| l.strip_prefix("file = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let agent = Agent::start(
        "bench",
        AgentOptions {
            pool: (200, 229),
            extra_toml: "[capacity]\ncpu_overcommit = 32.0\n".into(),
            env: vec![("HVNODE_TASKS__MAX_CONCURRENT".into(), "32".into())],
        },
    );
    let script = Script {
        rig: rig.clone(),
        template: rig.image_dir.join(file),
        dir: agent.dir.join("baseline"),
    };
    std::fs::create_dir_all(&script.dir).unwrap();
    let lv = Libvirt::open();

    // Warm-up (not measured): template checksum, page cache, libvirt's capability cache.
    let w = harness::new_id();
    hvnode_one(&agent, &lv, &w, "bench-warm").await;
    agent.delete(&format!("/v1/vms/{w}")).await;
    let w2 = harness::new_id();
    script.one(99, &w2);
    script.cleanup(99, &w2);

    println!("# provisioning: request to domain running, {RUNS} runs each, interleaved");
    let (mut ours, mut theirs, mut deletes) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..RUNS {
        let id = harness::new_id();
        ours.push(hvnode_one(&agent, &lv, &id, &format!("bench-{n}")).await);
        let t0 = Instant::now();
        let (s, r) = agent.delete(&format!("/v1/vms/{id}")).await;
        assert_eq!(s, 200, "{r}");
        deletes.push(t0.elapsed().as_secs_f64() * 1000.0);

        let bid = harness::new_id();
        theirs.push(script.one(n, &bid));
        script.cleanup(n, &bid);
    }
    let (o_min, o_max) = (
        ours.iter().cloned().fold(f64::MAX, f64::min),
        ours.iter().cloned().fold(0.0, f64::max),
    );
    let (t_min, t_max) = (
        theirs.iter().cloned().fold(f64::MAX, f64::min),
        theirs.iter().cloned().fold(0.0, f64::max),
    );
    let (o_med, t_med) = (median(&mut ours), median(&mut theirs));
    println!("hvnode   POST -> running   median {o_med:7.1} ms  min {o_min:7.1}  max {o_max:7.1}");
    println!("script   define + start    median {t_med:7.1} ms  min {t_min:7.1}  max {t_max:7.1}");
    println!("ratio    script / hvnode   {:.2}x", t_med / o_med);
    println!(
        "hvnode   DELETE (cancel deployment + remove everything) median {:.1} ms",
        median(&mut deletes)
    );

    println!("\n# {RUNS} concurrent creates: wall time until all run");
    let ids: Vec<String> = (0..RUNS).map(|_| harness::new_id()).collect();
    let t0 = Instant::now();
    let posts = ids.iter().enumerate().map(|(n, id)| {
        let agent = &agent;
        async move {
            let (s, r) = agent.create(body(id, &format!("bench-c{n}"))).await;
            assert_eq!(s, 202, "{r}");
        }
    });
    futures_util::future::join_all(posts).await;
    for id in &ids {
        lv.wait_running(id);
    }
    let ours_wall = t0.elapsed().as_secs_f64() * 1000.0;
    let deletes = ids.iter().map(|id| {
        let agent = &agent;
        async move { agent.delete(&format!("/v1/vms/{id}")).await }
    });
    futures_util::future::join_all(deletes).await;

    let bids: Vec<String> = (0..RUNS).map(|_| harness::new_id()).collect();
    let t0 = Instant::now();
    let children: Vec<_> = bids
        .iter()
        .enumerate()
        .map(|(n, id)| script.command(n, id).spawn().unwrap())
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let theirs_wall = t0.elapsed().as_secs_f64() * 1000.0;
    for (n, id) in bids.iter().enumerate() {
        script.cleanup(n, id);
    }
    println!(
        "hvnode   10 at once        {ours_wall:7.1} ms  ({:.1} ms per VM)",
        ours_wall / RUNS as f64
    );
    println!(
        "script   10 at once        {theirs_wall:7.1} ms  ({:.1} ms per VM)",
        theirs_wall / RUNS as f64
    );
    println!("ratio    script / hvnode   {:.2}x", theirs_wall / ours_wall);

    if std::env::var_os("BENCH_SKIP_RSS").is_none() {
        println!("\n# agent RSS, idle, with 5 deployed VMs");
        let ids: Vec<String> = (0..5).map(|_| harness::new_id()).collect();
        for (n, id) in ids.iter().enumerate() {
            let (s, r) = agent.create(body(id, &format!("bench-r{n}"))).await;
            assert_eq!(s, 202, "{r}");
        }
        for id in &ids {
            let (doc, _) = agent.wait_deployment(id, Duration::from_secs(1800)).await;
            assert_eq!(doc["deployment_status"], json!("completed"), "{doc}");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
        let rss = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        println!("hvnode   {rss}");
        for id in &ids {
            agent.delete(&format!("/v1/vms/{id}")).await;
        }
    }
}
