//! A hung QEMU (its process stopped with SIGSTOP, so its monitor never answers) costs
//! the agent one blocked query, never the sweep: `/status` of the hung VM and of its
//! neighbour, `/metrics` and `/v1/node` keep answering at once, the neighbour's figures
//! stay fresh, the sampler counts the timeout, the keeper leaves the hung VM alone, and a
//! stop through the API still powers it off. Before the hang the same calls on the same
//! VM show no timeout, and after it the VM starts again and boots.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(1500);
/// What any read may take while a QEMU hangs (the sampler's interval is 1 s, its QMP
/// timeout 1 s).
const PROMPT: Duration = Duration::from_secs(5);

/// A GET that must answer within `PROMPT`.
async fn prompt_get(agent: &Agent, path: &str) -> Value {
    let t = Instant::now();
    let answer = tokio::time::timeout(PROMPT, agent.get(path)).await;
    let (s, v) = answer.unwrap_or_else(|_| panic!("{path} did not answer within {PROMPT:?}"));
    assert_eq!(s, 200, "{path}: {v}");
    assert!(t.elapsed() < PROMPT, "{path} took {:?}", t.elapsed());
    v
}

async fn prompt_metric(agent: &Agent, sample: &str) -> f64 {
    tokio::time::timeout(PROMPT, agent.metric(sample))
        .await
        .unwrap_or_else(|_| panic!("/metrics did not answer within {PROMPT:?}"))
        .unwrap_or_else(|| panic!("{sample} missing from /metrics"))
}

fn signal(pid: u64, sig: &str) {
    let (ok, out) = sh(&format!("kill -{sig} {pid}"));
    assert!(ok, "kill -{sig} {pid}: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_qemu_costs_one_query_not_the_agent() {
    let agent = Agent::start(
        "hung-qemu",
        AgentOptions {
            pool: (152, 153),
            extra_toml: "[metrics]\ninterval_ms = 1000\nqmp_timeout_ms = 1000\n".into(),
            ..Default::default()
        },
    );
    let (a, b) = (new_id(), new_id());
    agent
        .deploy(
            vec![
                create_body(&a, "hung-a", "Hung-qemu-1"),
                create_body(&b, "hung-b", "Hung-qemu-1"),
            ],
            BOOT,
        )
        .await;

    // Before the hang: A answers its queries, and nothing times out over several sweeps.
    let timeouts = "hvnode_sampler_qmp_timeouts_total";
    let sweeps = "hvnode_sampler_sweeps_total";
    let status_a = prompt_get(&agent, &format!("/v1/vms/{a}/status")).await;
    assert_eq!(
        status_a["data"]["qmpstatus"],
        json!("running"),
        "{status_a}"
    );
    let pid = status_a["data"]["pid"].as_u64().expect("A's QEMU pid");
    let before = prompt_metric(&agent, timeouts).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        prompt_metric(&agent, timeouts).await,
        before,
        "no query timed out while every QEMU answered"
    );

    signal(pid, "STOP");
    let hung_at = Instant::now();
    // The sampler notices: a timeout is counted within a few sweeps.
    let mut counted = false;
    while hung_at.elapsed() < Duration::from_secs(30) {
        if prompt_metric(&agent, timeouts).await > before {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if !counted {
        signal(pid, "CONT");
        panic!("no QMP timeout counted within 30 s of A's QEMU stopping");
    }

    // Sweeps go on: several within a few seconds, each finishing.
    let s0 = prompt_metric(&agent, sweeps).await;
    let uptime_b0 = prompt_get(&agent, &format!("/v1/vms/{b}/status")).await["data"]
        ["uptime_seconds"]
        .as_u64()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let s1 = prompt_metric(&agent, sweeps).await;
    assert!(
        s1 - s0 >= 3.0,
        "the sampler swept {} times in 6 s while A hung",
        s1 - s0
    );
    // The neighbour's figures are fresh: its uptime moved on, QEMU answers for it.
    let status_b = prompt_get(&agent, &format!("/v1/vms/{b}/status")).await;
    assert_eq!(
        status_b["data"]["qmpstatus"],
        json!("running"),
        "{status_b}"
    );
    let uptime_b1 = status_b["data"]["uptime_seconds"].as_u64().unwrap();
    assert!(
        uptime_b1 >= uptime_b0 + 4,
        "B's uptime moved from {uptime_b0} to {uptime_b1} in 6 s"
    );
    // The hung VM's own status, the node and the metrics answer at once too.
    let status_a = prompt_get(&agent, &format!("/v1/vms/{a}/status")).await;
    assert_eq!(status_a["data"]["status"], json!("running"), "{status_a}");
    prompt_get(&agent, "/v1/node").await;
    prompt_get(&agent, &format!("/v1/vms/{a}")).await;
    prompt_get(&agent, "/v1/vms").await;
    // libvirt still calls it running, so the keeper leaves it alone (no restart).
    assert_eq!(domain_state(&a), "running");
    assert_eq!(
        prompt_metric(&agent, "hvnode_vm_restarts_total{reason=\"qemu_ended\"}").await,
        0.0
    );

    // A stop through the API powers the hung VM off (its power button cannot be heard;
    // libvirt cannot even deliver it while the monitor is held), and says so.
    let t = Instant::now();
    let (s, r) = agent
        .post(&format!("/v1/vms/{a}/stop?timeout_s=10"), json!({}))
        .await;
    let took = t.elapsed();
    if s != 200 {
        signal(pid, "CONT");
    }
    assert_eq!(s, 200, "stop of the hung VM: {r}");
    assert_eq!(r["data"]["status"], json!("stopped"), "{r}");
    assert!(took < Duration::from_secs(120), "stop took {took:?}");
    assert_eq!(domain_state(&a), "shut off");
    // The neighbour, over the same agent, stops and starts as usual.
    let (s, r) = agent
        .post(&format!("/v1/vms/{b}/stop?force=true"), json!({}))
        .await;
    assert_eq!(s, 200, "{r}");

    // The VM is not lost: it starts again with a new QEMU that answers, and boots.
    let (s, r) = agent.post(&format!("/v1/vms/{a}/start"), json!({})).await;
    assert_eq!(s, 200, "start after the hang: {r}");
    let mut answered = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let st = prompt_get(&agent, &format!("/v1/vms/{a}/status")).await;
        if st["data"]["qmpstatus"] == json!("running") && st["data"]["pid"].as_u64() != Some(pid) {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(answered, "A's new QEMU answers query-status");
    wait_guest_agent(&a, BOOT).await;
    for id in [&a, &b] {
        let (s, r) = agent.delete(&format!("/v1/vms/{id}")).await;
        assert_eq!(s, 200, "{r}");
    }
}
