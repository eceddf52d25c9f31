//! VPSes come back by themselves, on real guests: a QEMU killed under its guest is started
//! again within seconds; a guest that runs `poweroff` stays off; a simulated host reboot
//! (agent stopped, every domain destroyed, the bridge and the agent's filter tables gone,
//! libvirtd restarted, the host's network brought up again, agent started) brings back
//! exactly the VMs that were running, filtered as before, and a suspended one paused, while
//! a stopped one and one with `autostart: false` (at create, and through resize) stay off;
//! and a QEMU killed again and again is left stopped after `autorestart.max_restarts`. Here
//! (one test at a time) because it restarts libvirtd and removes the rig's bridge.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::faults::{start_libvirtd, stop_libvirtd};
use crate::harness::*;

const BOOT: Duration = Duration::from_secs(900);
/// How soon a killed QEMU must be running again (backoff 500 ms, a look every 500 ms, a
/// start under a loaded host).
const BACK_WITHIN: Duration = Duration::from_secs(60);
const MAX_RESTARTS: u32 = 2;

async fn status(agent: &Agent, id: &str) -> Value {
    let (s, r) = agent.get(&format!("/v1/vms/{id}/status")).await;
    assert_eq!(s, 200, "{r}");
    r["data"].clone()
}

async fn detail(agent: &Agent, id: &str) -> Value {
    let (s, r) = agent.get(&format!("/v1/vms/{id}")).await;
    assert_eq!(s, 200, "{r}");
    r["data"].clone()
}

async fn qemu_pid(agent: &Agent, id: &str) -> u64 {
    let st = status(agent, id).await;
    st["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("{id} has a QEMU: {st}"))
}

fn kill_qemu(pid: u64) {
    let (ok, out) = sh(&format!("kill -9 {pid}"));
    assert!(ok, "kill -9 {pid}: {out}");
}

/// Waits until `id` runs under a QEMU other than `old`; returns its pid and how long that
/// took, or `None` after `within`.
async fn back_with_new_qemu(
    agent: &Agent,
    id: &str,
    old: u64,
    within: Duration,
) -> Option<(u64, Duration)> {
    let start = Instant::now();
    while start.elapsed() < within {
        let st = status(agent, id).await;
        if st["status"] == json!("running") {
            if let Some(pid) = st["pid"].as_u64().filter(|p| *p != old) {
                return Some((pid, start.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

/// Whether `id` is still off (status `stopped`, no QEMU) at every look for `for_at_least`.
async fn stays_off(agent: &Agent, id: &str, for_at_least: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < for_at_least {
        let st = status(agent, id).await;
        if st["status"] != json!("stopped") || !st["pid"].is_null() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    true
}

async fn tasks_of(agent: &Agent, id: &str, kind: &str) -> Vec<Value> {
    let (s, r) = agent
        .get(&format!("/v1/tasks?vps_id={id}&kind={kind}&limit=20"))
        .await;
    assert_eq!(s, 200, "{r}");
    r["data"]["tasks"].as_array().unwrap().clone()
}

async fn wait_status(agent: &Agent, id: &str, want: &str, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if status(agent, id).await["status"] == json!(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    false
}

/// Simulates a host reboot under a stopped agent: every domain of the test destroyed,
/// the agent's filter tables and the rig's bridge removed, libvirtd restarted (it forgets
/// why each domain stopped), and the host's network configuration (the rig) brought up
/// again, as ifupdown would at boot.
fn reboot_the_host(agent: &Agent, ids: &[&str]) {
    for id in ids {
        let _ = virsh(&["destroy", &domain(id)]);
        assert!(domain_state(id).contains("shut off"), "{id} is off");
    }
    let rig = &agent.rig;
    for family in ["bridge", "inet"] {
        let _ = ns_sh(
            &rig.netns,
            &format!("nft delete table {family} {}", agent.filter_table),
        );
    }
    let (ok, out) = ns_sh(&rig.netns, &format!("ip link del {}", rig.bridge));
    assert!(ok, "remove {}: {out}", rig.bridge);
    let (_, taps) = ns_sh(
        &rig.netns,
        &format!("ip -br link | grep '^{}' || true", agent.tap_prefix),
    );
    assert!(taps.trim().is_empty(), "no tap is left: {taps}");
    stop_libvirtd();
    start_libvirtd(&rig.netns);
    let up = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/rig/up");
    let (ok, out) = sh(up);
    assert!(ok, "the host's network comes up again: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn vpses_come_back_after_a_qemu_crash_and_a_host_reboot_and_stay_off_when_asked() {
    let mut agent = Agent::start(
        "comeback",
        AgentOptions {
            pool: (194, 197),
            extra_toml: format!(
                "[autorestart]\ninterval_ms = 500\nbackoff_ms = 500\n\
                 max_restarts = {MAX_RESTARTS}\nwindow_s = 3600\n\n\
                 [boot]\nparallel = 2\ndelay_ms = 500\n"
            ),
            ..Default::default()
        },
    );
    let rig = agent.rig.clone();
    let (a, b, c, d) = (new_id(), new_id(), new_id(), new_id());
    let mut body_c = create_body(&c, "cb-gamma", "C0me-back-c");
    body_c["autostart"] = json!(false);
    agent
        .deploy(
            vec![
                create_body(&a, "cb-alpha", "C0me-back-a"),
                create_body(&b, "cb-beta", "C0me-back-b"),
                body_c,
                create_body(&d, "cb-delta", "C0me-back-d"),
            ],
            BOOT,
        )
        .await;
    // autostart through resize, alone: on, off again; a bad value changes nothing.
    let (s, r) = agent
        .post(&format!("/v1/vms/{c}/resize"), json!({"autostart": "yes"}))
        .await;
    assert_eq!(s, 400, "{r}");
    assert_eq!(detail(&agent, &c).await["autostart"], json!(false));
    for on in [true, false] {
        let (s, r) = agent
            .post(&format!("/v1/vms/{c}/resize"), json!({"autostart": on}))
            .await;
        assert_eq!(s, 202, "{r}");
        let task = agent
            .wait_task(
                r["data"]["task_id"].as_str().unwrap(),
                Duration::from_secs(120),
            )
            .await;
        assert_eq!(task["state"], json!("completed"), "{task}");
        assert_eq!(detail(&agent, &c).await["autostart"], json!(on));
    }
    let ip_a = detail(&agent, &a).await["ip_address"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(detail(&agent, &a).await["autostart"], json!(true));
    assert_eq!(detail(&agent, &c).await["autostart"], json!(false));
    assert!(status(&agent, &a).await["last_stop_reason"].is_null());

    // --- QEMU killed under a running guest: started again within seconds, by a task.
    let pid0 = qemu_pid(&agent, &a).await;
    kill_qemu(pid0);
    let (pid1, took) = back_with_new_qemu(&agent, &a, pid0, BACK_WITHIN)
        .await
        .unwrap_or_else(|| {
            panic!(
                "A is not running again {BACK_WITHIN:?} after its QEMU was killed\n{}",
                agent.log_tail(30)
            )
        });
    eprintln!("comeback: QEMU killed, A running again after {took:?}");
    let st = status(&agent, &a).await;
    assert_eq!(st["last_stop_reason"], json!("qemu_crashed"), "{st}");
    let restarts = tasks_of(&agent, &a, "autorestart").await;
    assert_eq!(restarts.len(), 1, "one autorestart task: {restarts:?}");
    assert_eq!(
        agent
            .metric("hvnode_vm_restarts_total{reason=\"qemu_ended\"}")
            .await,
        Some(1.0)
    );
    assert!(
        eventually(BOOT, || tcp_open(&rig.netns, &ip_a, 22)).await,
        "A answers on {ip_a} after its restart"
    );

    // --- The guest powers itself off: it stays off, beside A that came back above.
    wait_guest_agent(&b, Duration::from_secs(300)).await;
    let (code, out) = guest_sh(&b, "nohup sh -c 'sleep 1; poweroff' >/dev/null 2>&1 &");
    assert_eq!(code, 0, "{out}");
    assert!(
        wait_status(&agent, &b, "stopped", Duration::from_secs(300)).await,
        "B powered off"
    );
    assert!(
        domain_state_reason(&b).contains("shutdown"),
        "libvirt says the guest shut down: {}",
        domain_state_reason(&b)
    );
    assert!(
        stays_off(&agent, &b, Duration::from_secs(10)).await,
        "B stays off (a restart would have come after 0.5 s)"
    );
    let db = detail(&agent, &b).await;
    assert_eq!(db["intended_state"], json!("stopped"), "{db}");
    assert_eq!(db["last_stop_reason"], json!("guest_poweroff"), "{db}");
    assert!(tasks_of(&agent, &b, "autorestart").await.is_empty());

    // --- A stop through the API is a stop too: B started and stopped again.
    let (s, r) = agent.post(&format!("/v1/vms/{b}/start"), json!({})).await;
    assert_eq!(
        (s, r["data"]["status"].clone()),
        (200, json!("running")),
        "{r}"
    );
    let (s, r) = agent
        .post(&format!("/v1/vms/{b}/stop?force=true"), json!({}))
        .await;
    assert_eq!(
        (s, r["data"]["status"].clone()),
        (200, json!("stopped")),
        "{r}"
    );
    assert_eq!(
        status(&agent, &b).await["last_stop_reason"],
        json!("requested")
    );

    // --- Host reboot: A (running) comes back, D (suspended) comes back paused; B (stopped)
    // and C (autostart off) do not.
    assert_eq!(status(&agent, &c).await["status"], json!("running"));
    let (s, r) = agent.post(&format!("/v1/vms/{d}/suspend"), json!({})).await;
    assert_eq!(
        (s, r["data"]["status"].clone()),
        (200, json!("suspended")),
        "{r}"
    );
    let status_code = agent.terminate();
    assert!(
        status_code.success(),
        "the agent stopped cleanly: {status_code}"
    );
    reboot_the_host(&agent, &[&a, &b, &c, &d]);
    let rebooted = Instant::now();
    agent.start_again(Vec::new());
    let (_, node) = agent.get("/v1/node").await;
    let mut planned: Vec<String> = node["data"]["reconciliation"]["autostart"]
        .as_array()
        .unwrap_or_else(|| panic!("{node}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    planned.sort();
    let mut want = vec![a.clone(), d.clone()];
    want.sort();
    assert_eq!(planned, want, "A and D are to start: {node}");
    assert!(
        wait_status(&agent, &d, "suspended", Duration::from_secs(120)).await,
        "D comes back paused\n{}",
        agent.log_tail(30)
    );
    // Started paused, before its first instruction: QEMU says "prelaunch". Its autostart
    // task holds it until its network is plugged; then it takes a resume.
    assert_eq!(status(&agent, &d).await["qmpstatus"], json!("prelaunch"));
    let boots = tasks_of(&agent, &d, "autostart").await;
    assert_eq!(boots.len(), 1, "{boots:?}");
    let task = agent
        .wait_task(boots[0]["id"].as_str().unwrap(), Duration::from_secs(120))
        .await;
    assert_eq!(task["state"], json!("completed"), "{task}");
    let (s, r) = agent.post(&format!("/v1/vms/{d}/resume"), json!({})).await;
    assert_eq!(
        (s, r["data"]["status"].clone()),
        (200, json!("running")),
        "{r}"
    );
    assert!(
        wait_status(&agent, &a, "running", Duration::from_secs(120)).await,
        "A runs again after the reboot\n{}",
        agent.log_tail(30)
    );
    eprintln!(
        "comeback: after the reboot A runs again {:?} after the agent's start",
        rebooted.elapsed()
    );
    let boots = tasks_of(&agent, &a, "autostart").await;
    assert_eq!(boots.len(), 1, "{boots:?}");
    let task = agent
        .wait_task(boots[0]["id"].as_str().unwrap(), Duration::from_secs(120))
        .await;
    assert_eq!(task["state"], json!("completed"), "{task}");
    assert_eq!(
        status(&agent, &a).await["last_stop_reason"],
        json!("host_reboot")
    );
    assert!(
        eventually(BOOT, || tcp_open(&rig.netns, &ip_a, 22)).await,
        "A answers on {ip_a} after the reboot"
    );
    for (id, why) in [(&b, "stopped through the API"), (&c, "autostart: false")] {
        assert!(
            stays_off(&agent, id, Duration::from_secs(5)).await,
            "{id} ({why}) stays off after the reboot"
        );
        assert!(tasks_of(&agent, id, "autostart").await.is_empty());
    }
    assert_eq!(detail(&agent, &c).await["intended_state"], json!("running"));
    // Its filter holds again: from its own address A reaches the rig; from an address it
    // was not given, nothing crosses.
    wait_guest_agent(&a, Duration::from_secs(300)).await;
    let spoofed = rig.addr(198);
    let (code, out) = guest_sh(&a, &format!("ip addr add {spoofed}/32 dev eth0"));
    assert_eq!(code, 0, "{out}");
    let seen = UdpObserver::start(&rig.netns, &format!("{}:9997", rig.gateway));
    guest_udp(&a, &ip_a, &rig.gateway, 9997, "legit");
    guest_udp(&a, &spoofed, &rig.gateway, 9997, "spoofed");
    let got = seen.finish();
    assert!(
        got.iter().any(|m| m == "legit"),
        "A's own address crosses after the reboot: {got:?}"
    );
    assert!(
        !got.iter().any(|m| m == "spoofed"),
        "a spoofed source is still dropped after the reboot: {got:?}"
    );

    // --- Killed again and again: restarted MAX_RESTARTS times, then left stopped.
    let mut pid = qemu_pid(&agent, &a).await;
    for n in 1..=MAX_RESTARTS {
        kill_qemu(pid);
        let (next, took) = back_with_new_qemu(&agent, &a, pid, BACK_WITHIN)
            .await
            .unwrap_or_else(|| panic!("restart {n} of {MAX_RESTARTS} did not come"));
        eprintln!("comeback: kill {n}: running again after {took:?}");
        pid = next;
    }
    kill_qemu(pid);
    assert!(
        wait_status(&agent, &a, "stopped", Duration::from_secs(30)).await,
        "A went down"
    );
    assert!(
        stays_off(&agent, &a, Duration::from_secs(15)).await,
        "after {MAX_RESTARTS} restarts A is left stopped"
    );
    let da = detail(&agent, &a).await;
    assert_eq!(da["last_stop_reason"], json!("gave_up"), "{da}");
    assert_eq!(da["intended_state"], json!("stopped"), "{da}");
    assert_eq!(
        agent.metric("hvnode_vm_restarts_given_up_total").await,
        Some(1.0)
    );
    // A start through the API brings it back, as the control plane would.
    let (s, r) = agent.post(&format!("/v1/vms/{a}/start"), json!({})).await;
    assert_eq!(
        (s, r["data"]["status"].clone()),
        (200, json!("running")),
        "{r}"
    );

    let _ = pid1;
}

/// `virsh domstate --reason`, e.g. `shut off (shutdown)`.
fn domain_state_reason(id: &str) -> String {
    virsh(&["domstate", "--reason", &domain(id)])
        .1
        .trim()
        .to_owned()
}
