//! Sustained load: 20 VMs defined (real domains, paused so that their guests do not eat
//! the two cores the load needs), then 200 concurrent clients for 60 s on `GET /v1/vms`,
//! `GET /v1/vms/{id}/status` and `/metrics` (wrk, three processes of 67/67/66
//! connections). No request may fail; the figures, p99 included, and the agent's RSS over
//! the run are printed and written to `<rig root>/e2e-logs/load-report.txt`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::harness::*;

const VMS: usize = 20;
const SECONDS: u64 = 60;
/// The template as 9010, but declared without a guest agent, so that a deployment is done
/// once the domain runs (readiness checks are off for this agent): the 20 guests need not
/// boot under TCG before the load starts.
const QUICK_TEMPLATE: &str = "9011";

/// An image store with the rig's Debian image (hard-linked) under two manifests.
fn image_store(rig: &Rig, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let manifest = std::fs::read_to_string(rig.image_dir.join("9010.toml")).unwrap();
    let file = manifest
        .lines()
        .find_map(|l| l.strip_prefix("file = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    std::fs::hard_link(rig.image_dir.join(&file), dir.join(&file)).unwrap();
    std::fs::write(dir.join("9010.toml"), &manifest).unwrap();
    let quick: String = manifest
        .lines()
        .map(|l| {
            if l.starts_with("id = ") {
                format!("id = \"{QUICK_TEMPLATE}\"")
            } else {
                l.to_owned()
            }
        })
        .chain(["guest_agent = false".to_owned()])
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join(format!("{QUICK_TEMPLATE}.toml")), quick + "\n").unwrap();
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// What one wrk run printed, as far as we report it.
#[derive(Debug, Default)]
struct WrkResult {
    label: String,
    requests: u64,
    rps: f64,
    p50: String,
    p90: String,
    p99: String,
    non_2xx: u64,
    socket_errors: String,
    raw: String,
}

fn parse_wrk(label: &str, out: &str) -> WrkResult {
    let mut r = WrkResult {
        label: label.into(),
        raw: out.into(),
        ..Default::default()
    };
    for line in out.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(v)) => r.p50 = v.into(),
            (Some("90%"), Some(v)) => r.p90 = v.into(),
            (Some("99%"), Some(v)) => r.p99 = v.into(),
            (Some("Requests/sec:"), Some(v)) => r.rps = v.parse().unwrap_or(0.0),
            _ => {}
        }
        if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = n.trim().parse().unwrap_or(u64::MAX);
        }
        if line.starts_with("Socket errors:") {
            r.socket_errors = line.into();
        }
        if line.contains("requests in") {
            r.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_vms_and_two_hundred_clients_for_sixty_seconds() {
    let rig = Rig::load();
    let images = rig
        .root
        .join("e2e")
        .join(format!("load-images-{}", uuid::Uuid::new_v4().simple()));
    image_store(&rig, &images);
    let agent = Agent::start(
        "load",
        AgentOptions {
            pool: (200, 229),
            image_dir: Some(images.clone()),
            tasks_toml: Some("verify_connectivity = false\nmax_concurrent = 4".into()),
            extra_toml: "[capacity]\ncpu_overcommit = 16.0\n".into(),
            // The 200 clients here share one address (loopback); a fleet's come from many.
            env: vec![("HVNODE_API__MAX_CONNECTIONS_PER_PEER".into(), "256".into())],
            ..Default::default()
        },
    );

    // --- 20 VMs, deployed and paused.
    let ids: Vec<String> = (0..VMS).map(|_| new_id()).collect();
    let creates = ids.iter().enumerate().map(|(i, id)| {
        let agent = &agent;
        async move {
            let mut body = create_body(id, &format!("load-{i}"), "L0ad-test-pass");
            body["template_id"] = json!(QUICK_TEMPLATE);
            body["ram_mb"] = json!(256);
            agent.create(body).await
        }
    });
    for (s, r) in futures_util::future::join_all(creates).await {
        assert_eq!(s, 202, "{r}");
    }
    for id in &ids {
        let (d, _) = agent.wait_deployment(id, Duration::from_secs(600)).await;
        assert_eq!(d["deployment_status"], json!("completed"), "{d}");
        let (s, r) = agent
            .post(&format!("/v1/vms/{id}/suspend"), json!({}))
            .await;
        assert_eq!(
            (s, r["data"]["status"].clone()),
            (200, json!("suspended")),
            "{r}"
        );
    }

    // --- the load.
    let dir = agent.dir.join("wrk");
    std::fs::create_dir_all(&dir).unwrap();
    let list: Vec<String> = ids.iter().map(|i| format!("\"{i}\"")).collect();
    std::fs::write(
        dir.join("status.lua"),
        format!(
            "local ids = {{{}}}\nlocal i = 0\nrequest = function()\n  i = i % #ids + 1\n  \
             return wrk.format(\"GET\", \"/v1/vms/\" .. ids[i] .. \"/status\")\nend\n",
            list.join(", ")
        ),
    )
    .unwrap();
    let pid = agent.pid();
    let idle_rss = rss_kib(pid);
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                samples.push(rss_kib(pid));
                std::thread::sleep(Duration::from_secs(1));
            }
            samples
        })
    };
    let auth = format!("Authorization: Bearer {}", agent.token);
    let runs = [
        (
            "GET /v1/vms",
            67,
            format!("{}/v1/vms?limit=100", agent.url),
            None,
        ),
        (
            "GET /v1/vms/{id}/status",
            67,
            agent.url.clone(),
            Some(dir.join("status.lua")),
        ),
        ("GET /metrics", 66, format!("{}/metrics", agent.url), None),
    ];
    let children: Vec<_> = runs
        .iter()
        .map(|(label, conns, url, script)| {
            let mut cmd = Command::new("wrk");
            cmd.args(["-t1", &format!("-c{conns}"), &format!("-d{SECONDS}s")])
                .args(["--timeout", "10s", "--latency", "-H", &auth]);
            if let Some(s) = script {
                cmd.arg("-s").arg(s);
            }
            let child = cmd
                .arg(url)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("wrk (apt install wrk)");
            (label.to_string(), child)
        })
        .collect();
    let results: Vec<WrkResult> = children
        .into_iter()
        .map(|(label, child)| {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            parse_wrk(&label, &text)
        })
        .collect();
    sampling.store(false, Ordering::Relaxed);
    let rss = sampler.join().unwrap();
    let (_, health) = agent.get("/v1/health").await;

    // --- the report.
    let max_rss = rss.iter().copied().max().unwrap_or(0);
    let tail = &rss[rss.len().saturating_sub(10)..];
    let early = &rss[rss.len().min(15).saturating_sub(5)..rss.len().min(15)];
    let avg = |v: &[u64]| v.iter().sum::<u64>() / v.len().max(1) as u64;
    let mut report = format!(
        "load: {VMS} VMs (paused), 200 connections for {SECONDS} s\n\
         agent RSS: idle {} MiB, max {} MiB, seconds 10-15 {} MiB, last 10 s {} MiB\n",
        idle_rss / 1024,
        max_rss / 1024,
        avg(early) / 1024,
        avg(tail) / 1024
    );
    for r in &results {
        report += &format!(
            "{:<24} {:>8} requests {:>9.1} req/s  p50 {:>8}  p90 {:>8}  p99 {:>8}  non-2xx {}  {}\n",
            r.label, r.requests, r.rps, r.p50, r.p90, r.p99, r.non_2xx, r.socket_errors
        );
    }
    eprintln!("{report}");
    let logs = rig.root.join("e2e-logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("load-report.txt"), &report).unwrap();

    for r in &results {
        assert!(r.requests > 0, "{} ran: {}", r.label, r.raw);
        assert_eq!(
            r.non_2xx, 0,
            "{}: every response is a success\n{}",
            r.label, r.raw
        );
        assert!(
            r.socket_errors.is_empty(),
            "{}: {}",
            r.label,
            r.socket_errors
        );
    }
    assert_eq!(health["data"]["status"], json!("healthy"), "{health}");
    assert!(
        max_rss < 256 * 1024,
        "RSS bounded: max {} MiB",
        max_rss / 1024
    );
    assert!(
        avg(tail) <= avg(early) * 3 / 2 + 8 * 1024,
        "RSS does not keep growing: {} MiB then {} MiB",
        avg(early) / 1024,
        avg(tail) / 1024
    );

    let deletes = ids.iter().map(|id| {
        let agent = &agent;
        async move { agent.delete(&format!("/v1/vms/{id}")).await }
    });
    for (s, r) in futures_util::future::join_all(deletes).await {
        assert_eq!(s, 200, "{r}");
    }
    let _ = std::fs::remove_dir_all(&images);
}
