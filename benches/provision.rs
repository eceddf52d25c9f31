//! Provisioning overhead: `POST /v1/vms` until the domain runs, against the way an operator
//! would script it without hvnode (`benches/baseline-provision.sh`: qemu-img overlay +
//! password hash + cloud-localds seed + virsh define + virsh start), on the same template,
//! measured in the same run, interleaved so that both see the same machine.
//!
//!   cargo bench --features rig --bench provision          (as root, rig up)
//!
//! The script's domain has the agent's devices; the script's header lists what still
//! differs between the two ways. At every run, the warm-up VM of each way is compared as
//! libvirt stored it (`virsh dumpxml --inactive`): every element and attribute, without
//! the name, UUID, title and metadata, with the VM's directory, MAC and tap name as
//! placeholders. A difference is printed and fails the run.
//!
//! Phases: `BENCH_RUNS` (default 10) sequential creates each way, alternating which way
//! goes first (median, min, max); then `BENCH_ROUNDS` (default 3) rounds of `BENCH_RUNS`
//! concurrent creates each way (wall time until all run), alternating which way goes
//! first, reported as the median round and the spread; then the agent's RSS, idle, with
//! 5 deployed VMs (`BENCH_SKIP_RSS` skips it). Guests are destroyed right after they are
//! measured, so boots do not load the machine. "Running" is libvirt's domain state, polled
//! every 5 ms from this process.
//!
//! The target (printed, and the bench exits 1 when it is missed): hvnode is no slower
//! than the script it replaces, that is its median is at most the script's, one at a time
//! and `BENCH_RUNS` at once, and the two domains have the same devices.

#[path = "../tests/e2e/harness.rs"]
mod harness;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{Agent, AgentOptions, Rig};
use serde_json::json;

/// Creates per phase (`BENCH_RUNS`); at most 24, since the script's guests take the rig's
/// addresses .230 to .254.
const RUNS: usize = 10;
/// Rounds of the concurrent phase (`BENCH_ROUNDS`).
const ROUNDS: usize = 3;
/// How often libvirt is asked whether a domain runs: the measurement's resolution, and
/// light enough not to slow libvirtd down.
const POLL: Duration = Duration::from_millis(5);

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
            std::thread::sleep(POLL);
        }
    }

    /// Waits until all `ids` run, with one listing per poll.
    fn wait_all_running(&self, ids: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let running: Vec<String> = self
                .0
                .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_RUNNING)
                .unwrap_or_default()
                .iter()
                .filter_map(|d| d.uuid_string().ok())
                .collect();
            if ids.iter().all(|id| running.contains(id)) {
                return;
            }
            assert!(Instant::now() < deadline, "not all domains ran");
            std::thread::sleep(POLL);
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

fn min_max(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::MAX, f64::min),
        v.iter().copied().fold(0.0, f64::max),
    )
}

/// A domain's definition as libvirt stored it, one line per element (path, sorted
/// attributes, text), sorted: without what names this one VM (name, UUID, title,
/// metadata), and with its directory, MAC and tap name as placeholders.
fn shape(xml: &str, dir: &str) -> Vec<String> {
    fn walk(node: roxmltree::Node<'_, '_>, path: &str, dir: &str, out: &mut Vec<String>) {
        for c in node.children().filter(|c| c.is_element()) {
            let tag = c.tag_name().name();
            if path == "domain" && matches!(tag, "name" | "uuid" | "title" | "metadata") {
                continue;
            }
            let p = format!("{path}/{tag}");
            let mut attrs: Vec<String> = c
                .attributes()
                .map(|a| {
                    let v = match (p.as_str(), a.name()) {
                        ("domain/devices/interface/mac", "address") => "$MAC",
                        ("domain/devices/interface/target", "dev") => "$TAP",
                        _ => a.value(),
                    };
                    format!("{}='{}'", a.name(), v)
                })
                .collect();
            attrs.sort();
            let text: String = c
                .children()
                .filter(|t| t.is_text())
                .filter_map(|t| t.text())
                .map(str::trim)
                .collect();
            out.push(format!("{p} {} {text}", attrs.join(" ")).replace(dir, "$DIR"));
            walk(c, &p, dir, out);
        }
    }
    let doc = roxmltree::Document::parse(xml).expect("libvirt's domain XML parses");
    let mut out = Vec::new();
    walk(doc.root_element(), "domain", dir, &mut out);
    out.sort();
    out
}

/// Lines of `a` that `b` lacks (as multisets).
fn missing(a: &[String], b: &[String]) -> Vec<String> {
    let mut rest = b.to_vec();
    a.iter()
        .filter(|l| match rest.iter().position(|r| r == *l) {
            Some(i) => {
                rest.swap_remove(i);
                false
            }
            None => true,
        })
        .cloned()
        .collect()
}

/// Whether the script's domain has the agent's devices; prints the differences.
fn same_devices(agent_xml: &str, agent_dir: &str, script_xml: &str, script_dir: &str) -> bool {
    let (a, s) = (shape(agent_xml, agent_dir), shape(script_xml, script_dir));
    let (only_agent, only_script) = (missing(&a, &s), missing(&s, &a));
    if only_agent.is_empty() && only_script.is_empty() {
        println!(
            "devices: the script's domain is the agent's ({} elements compared, as libvirt stored them)",
            a.len()
        );
        return true;
    }
    println!("devices: the script's domain differs from the agent's:");
    for l in &only_agent {
        println!("  only hvnode's: {l}");
    }
    for l in &only_script {
        println!("  only script's: {l}");
    }
    false
}

fn body(id: &str, name: &str) -> serde_json::Value {
    json!({
        "id": id, "hostname": name, "template_id": harness::TEMPLATE,
        "cpu_cores": 1, "ram_mb": 256, "disk_gb": 4,
        "root_password": "Bench-pass-1", "ssh_keys": [harness::SSH_KEY],
    })
}

/// One VM through hvnode: POST, then poll libvirt until it runs. Returns milliseconds, and
/// the milliseconds of those the `start_vm` step (libvirt's domain start) took.
async fn hvnode_one(agent: &Agent, lv: &Libvirt, id: &str, name: &str) -> (f64, f64) {
    let t0 = Instant::now();
    let (s, r) = agent.create(body(id, name)).await;
    assert_eq!(s, 202, "{r}");
    lv.wait_running(id);
    let total = t0.elapsed().as_secs_f64() * 1000.0;
    let task = r["data"]["task_id"].as_str().unwrap();
    // The journal records the step's end just after libvirt reports the domain running.
    let mut step = serde_json::Value::Null;
    for _ in 0..200 {
        let (_, t) = agent.get(&format!("/v1/tasks/{task}")).await;
        step = t["data"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "start_vm")
            .unwrap()
            .clone();
        if step["finished_at"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ms = |k: &str| {
        chrono::DateTime::parse_from_rfc3339(step[k].as_str().unwrap_or_default())
            .map(|d| d.timestamp_millis() as f64)
            .unwrap_or(f64::NAN)
    };
    (total, ms("finished_at") - ms("started_at"))
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
            format!("bb-base-{n:02}"),
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

    /// One VM the scripted way; milliseconds until `virsh start` returned (domain running),
    /// and the milliseconds of those `virsh start` took.
    fn one(&self, n: usize, id: &str) -> (f64, f64) {
        let t0 = Instant::now();
        let out = self.command(n, id).output().unwrap();
        assert!(out.status.success(), "baseline script failed");
        let total = t0.elapsed().as_secs_f64() * 1000.0;
        let start = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("start_ms="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN);
        (total, start)
    }

    fn cleanup(&self, n: usize, id: &str) {
        let name = format!("bench-base-{n}");
        harness::virsh(&["destroy", &name]);
        harness::virsh(&["undefine", "--nvram", &name]);
        let _ = std::fs::remove_dir_all(self.dir.join(id));
    }
}

/// `n` VMs through hvnode at once: milliseconds until all run. Deletes them afterwards.
async fn hvnode_burst(agent: &Agent, lv: &Libvirt, n: usize, round: usize) -> f64 {
    let ids: Vec<String> = (0..n).map(|_| harness::new_id()).collect();
    let t0 = Instant::now();
    let posts = ids.iter().enumerate().map(|(i, id)| async move {
        let (s, r) = agent.create(body(id, &format!("bench-c{round}-{i}"))).await;
        assert_eq!(s, 202, "{r}");
    });
    futures_util::future::join_all(posts).await;
    lv.wait_all_running(&ids);
    let wall = t0.elapsed().as_secs_f64() * 1000.0;
    let deletes = ids
        .iter()
        .map(|id| async move { agent.delete(&format!("/v1/vms/{id}")).await });
    futures_util::future::join_all(deletes).await;
    wall
}

/// `n` VMs the scripted way at once: milliseconds until every script returned (each
/// returns once `virsh start` did, the domain running). Removes them afterwards.
fn script_burst(script: &Script, n: usize) -> f64 {
    let ids: Vec<String> = (0..n).map(|_| harness::new_id()).collect();
    let t0 = Instant::now();
    let children: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            script
                .command(i, id)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "baseline script failed");
    }
    let wall = t0.elapsed().as_secs_f64() * 1000.0;
    for (i, id) in ids.iter().enumerate() {
        script.cleanup(i, id);
    }
    wall
}

fn dumpxml(domain: &str) -> String {
    let (ok, xml) = harness::virsh(&["dumpxml", "--inactive", domain]);
    assert!(ok, "dumpxml {domain}: {xml}");
    xml
}

async fn run() -> bool {
    let runs = env_usize("BENCH_RUNS", RUNS);
    let rounds = env_usize("BENCH_ROUNDS", ROUNDS);
    assert!(
        runs <= 24,
        "BENCH_RUNS is at most 24 (the script's guests take .230 to .254)"
    );
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
            ..Default::default()
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
    // Each way's domain is kept until the other's exists, to compare their devices.
    let w = harness::new_id();
    hvnode_one(&agent, &lv, &w, "bench-warm").await;
    let agent_xml = dumpxml(&harness::domain(&w));
    agent.delete(&format!("/v1/vms/{w}")).await;
    let w2 = harness::new_id();
    let _ = script.one(runs, &w2);
    let script_xml = dumpxml(&format!("bench-base-{runs}"));
    script.cleanup(runs, &w2);
    let devices = same_devices(
        &agent_xml,
        &agent.vm_dir.join(&w).display().to_string(),
        &script_xml,
        &script.dir.join(&w2).display().to_string(),
    );

    println!(
        "\n# provisioning: request to domain running, {runs} runs each, alternating which goes first"
    );
    let (mut ours, mut theirs, mut deletes) = (Vec::new(), Vec::new(), Vec::new());
    let (mut our_start, mut their_start) = (Vec::new(), Vec::new());
    for n in 0..runs {
        for side in [n % 2, 1 - n % 2] {
            if side == 0 {
                let id = harness::new_id();
                let (total, start) = hvnode_one(&agent, &lv, &id, &format!("bench-{n}")).await;
                ours.push(total);
                our_start.push(start);
                let t0 = Instant::now();
                let (s, r) = agent.delete(&format!("/v1/vms/{id}")).await;
                assert_eq!(s, 200, "{r}");
                deletes.push(t0.elapsed().as_secs_f64() * 1000.0);
            } else {
                let bid = harness::new_id();
                let (total, start) = script.one(n, &bid);
                theirs.push(total);
                their_start.push(start);
                script.cleanup(n, &bid);
            }
        }
    }
    let mut our_rest: Vec<f64> = ours.iter().zip(&our_start).map(|(t, s)| t - s).collect();
    let mut their_rest: Vec<f64> = theirs
        .iter()
        .zip(&their_start)
        .map(|(t, s)| t - s)
        .collect();
    let (o_min, o_max) = min_max(&ours);
    let (t_min, t_max) = min_max(&theirs);
    let (o_med, t_med) = (median(&mut ours), median(&mut theirs));
    println!("hvnode   POST -> running   median {o_med:7.1} ms  min {o_min:7.1}  max {o_max:7.1}");
    println!("script   define + start    median {t_med:7.1} ms  min {t_min:7.1}  max {t_max:7.1}");
    println!("ratio    script / hvnode   {:.2}x", t_med / o_med);
    let (os, ts) = (median(&mut our_start), median(&mut their_start));
    let (orest, trest) = (median(&mut our_rest), median(&mut their_rest));
    println!(
        "  of which libvirt's domain start: hvnode {os:.1} ms, script (virsh start) {ts:.1} ms"
    );
    println!(
        "  everything else:                 hvnode {orest:.1} ms, script {trest:.1} ms  ({:.2}x)",
        trest / orest
    );
    println!(
        "hvnode   DELETE (cancel deployment + remove everything) median {:.1} ms",
        median(&mut deletes)
    );

    println!(
        "\n# {runs} concurrent creates: wall time until all run, {rounds} rounds, alternating which goes first"
    );
    let (mut ours_wall, mut theirs_wall) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut line = Vec::new();
        for side in [round % 2, 1 - round % 2] {
            if side == 0 {
                let ms = hvnode_burst(&agent, &lv, runs, round).await;
                ours_wall.push(ms);
                line.push(format!("hvnode {ms:7.1} ms"));
            } else {
                let ms = script_burst(&script, runs);
                theirs_wall.push(ms);
                line.push(format!("script {ms:7.1} ms"));
            }
        }
        println!("  round {}: {}", round + 1, line.join(", then "));
    }
    let (oc_min, oc_max) = min_max(&ours_wall);
    let (tc_min, tc_max) = min_max(&theirs_wall);
    let (oc_med, tc_med) = (median(&mut ours_wall), median(&mut theirs_wall));
    println!(
        "hvnode   {runs} at once  median {oc_med:7.1} ms  min {oc_min:7.1}  max {oc_max:7.1}  ({:.1} ms per VM)",
        oc_med / runs as f64
    );
    println!(
        "script   {runs} at once  median {tc_med:7.1} ms  min {tc_min:7.1}  max {tc_max:7.1}  ({:.1} ms per VM)",
        tc_med / runs as f64
    );
    println!("ratio    script / hvnode   {:.2}x", tc_med / oc_med);

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

    let (seq_ok, conc_ok) = (o_med <= t_med, oc_med <= tc_med);
    let met = seq_ok && conc_ok && devices;
    println!(
        "\ntarget: hvnode no slower than the script, with the same devices: \
         one at a time {o_med:.1} <= {t_med:.1} ms ({}), {runs} at once {oc_med:.1} <= {tc_med:.1} ms ({}), \
         devices {}: {}",
        if seq_ok { "yes" } else { "no" },
        if conc_ok { "yes" } else { "no" },
        if devices { "same" } else { "differ" },
        if met { "met" } else { "NOT met" }
    );
    met
}
