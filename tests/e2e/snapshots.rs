//! Snapshots on a real guest: disk-only and with memory, on a running and a stopped VM;
//! rollbacks restore files, processes and uptime; errors change nothing on disk; the
//! overlay stays consistent (`qemu-img check`); the free-space floor refuses early; delete
//! takes the snapshots with the VM.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(1200);

/// Snapshot names the disk image holds (read without a lock, so also while it runs).
fn image_snapshots(agent: &Agent, id: &str) -> Vec<String> {
    let disk = agent.vm_dir.join(id).join("disk.qcow2");
    let (ok, out) = sh(&format!(
        "qemu-img info -U --output=json {}",
        disk.display()
    ));
    assert!(ok, "qemu-img info: {out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["snapshots"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|s| s["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Prints a timing and appends it to `<rig root>/e2e-logs/snapshot-timings.txt`, which
/// `tests/run` shows at the end.
fn timing(all: &mut Vec<(&'static str, Duration)>, t: (&'static str, Duration)) {
    use std::io::Write;
    let line = format!(
        "snapshot timing (512 MiB guest): {}: {} ms",
        t.0,
        t.1.as_millis()
    );
    eprintln!("{line}");
    let logs = Rig::load().root.join("e2e-logs");
    let _ = std::fs::create_dir_all(&logs);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join("snapshot-timings.txt"))
    {
        let _ = writeln!(f, "{line}");
    }
    all.push(t);
}

fn names(list: &Value) -> Vec<String> {
    list["data"]["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

fn uptime(id: &str) -> f64 {
    let (_, out) = guest_sh(id, "cut -d' ' -f1 /proc/uptime");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("uptime: {out}"))
}

fn marker(id: &str) -> String {
    guest_sh(id, "cat /root/marker").1.trim().to_owned()
}

fn set_marker(id: &str, text: &str) {
    let (code, out) = guest_sh(id, &format!("echo {text} > /root/marker && sync"));
    assert_eq!(code, 0, "{out}");
}

/// Whether process `pid` is the sleeper started before the RAM snapshot.
fn sleeper_alive(id: &str, pid: &str) -> bool {
    guest_sh(id, &format!("grep -q 100000 /proc/{pid}/cmdline")).0 == 0
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_roll_back_exactly_and_errors_change_nothing() {
    let mut agent = Agent::start(
        "snapshots",
        AgentOptions {
            pool: (172, 173),
            extra_toml: "[snapshots]\nmax_per_vm = 3\nmin_free_gb = 1\n".into(),
            ..Default::default()
        },
    );
    let id = new_id();
    agent
        .deploy(vec![create_body(&id, "snappy", "Snap-pass-1")], BOOT)
        .await;
    let snaps = format!("/v1/vms/{id}/snapshots");
    let mut timings = Vec::new();

    // --- bad requests: the contract's errors, and the disk untouched.
    let bad = [
        (json!({"name": "bad-name"}), 400, "INVALID_NAME"),
        (json!({"name": "a".repeat(41)}), 400, "INVALID_NAME"),
        (json!({"name": ""}), 400, "INVALID_NAME"),
        (json!({"description": "no name"}), 400, "MISSING_FIELDS"),
        (
            json!({"name": "ok", "description": "line\nbreak"}),
            400,
            "INVALID_JSON",
        ),
        (
            json!({"name": "ok", "include_ram": "yes"}),
            400,
            "INVALID_JSON",
        ),
    ];
    for (body, status, code) in bad {
        let (s, resp) = agent.post(&snaps, body.clone()).await;
        assert_eq!(
            (s, resp["error_code"].clone()),
            (status, json!(code)),
            "{body}: {resp}"
        );
    }
    let unknown = new_id();
    let (s, resp) = agent
        .post(
            &format!("/v1/vms/{unknown}/snapshots"),
            json!({"name": "x"}),
        )
        .await;
    assert_eq!(
        (s, resp["error_code"].clone()),
        (404, json!("VPS_NOT_FOUND"))
    );
    let (s, resp) = agent.get(&format!("/v1/vms/{unknown}/snapshots")).await;
    assert_eq!(
        (s, resp["error_code"].clone()),
        (404, json!("VPS_NOT_FOUND"))
    );
    for path in [
        format!("{snaps}/nope/rollback"),
        format!("{snaps}/bad-name!/rollback"),
    ] {
        let (s, resp) = agent.post(&path, json!({})).await;
        assert_eq!(
            (s, resp["error_code"].clone()),
            (404, json!("SNAPSHOT_NOT_FOUND")),
            "{path}"
        );
    }
    let (s, resp) = agent.delete(&format!("{snaps}/nope")).await;
    assert_eq!(
        (s, resp["error_code"].clone()),
        (404, json!("SNAPSHOT_NOT_FOUND"))
    );
    assert!(
        image_snapshots(&agent, &id).is_empty(),
        "no error touched the disk"
    );

    // --- disk-only snapshot of the running VM, then roll back a changed file.
    set_marker(&id, "one");
    let t = Instant::now();
    let (s, made) = agent
        .post(
            &snaps,
            json!({"name": "disk1", "description": "before <upgrade> & \"tests\""}),
        )
        .await;
    timing(&mut timings, ("create disk-only (running)", t.elapsed()));
    assert_eq!(s, 201, "{made}");
    assert_eq!(made["data"]["snapshot"]["vmstate"], json!(false));
    let (_, list) = agent.get(&snaps).await;
    assert_eq!(names(&list), ["disk1"]);
    assert_eq!(
        list["data"]["snapshots"][0]["description"],
        json!("before <upgrade> & \"tests\"")
    );
    let (s, dup) = agent.post(&snaps, json!({"name": "disk1"})).await;
    assert_eq!(
        (s, dup["error_code"].clone()),
        (409, json!("SNAPSHOT_EXISTS"))
    );
    assert_eq!(image_snapshots(&agent, &id), ["disk1"]);

    set_marker(&id, "two");
    let t = Instant::now();
    let (s, back) = agent
        .post(&format!("{snaps}/disk1/rollback"), json!({}))
        .await;
    timing(&mut timings, ("rollback disk-only (running)", t.elapsed()));
    assert_eq!(s, 200, "{back}");
    assert_eq!(back["data"]["status"], json!("running"));
    wait_guest_agent(&id, BOOT).await;
    assert_eq!(marker(&id), "one", "the disk is as it was at the snapshot");

    // --- snapshot with memory: a process and the uptime survive the rollback.
    set_marker(&id, "ram");
    let (code, pid) = guest_sh(
        &id,
        "setsid sleep 100000 >/dev/null 2>&1 < /dev/null & echo $!",
    );
    assert_eq!(code, 0);
    let pid = pid.trim().to_owned();
    assert!(sleeper_alive(&id, &pid));
    guest_sh(&id, "echo before > /run/ram-marker");
    let at_snapshot = uptime(&id);
    let snapshot_wall = Instant::now();
    let t = Instant::now();
    let (s, made) = agent
        .post(&snaps, json!({"name": "ram1", "include_ram": true}))
        .await;
    timing(&mut timings, ("create with RAM (running)", t.elapsed()));
    assert_eq!(s, 201, "{made}");
    assert_eq!(made["data"]["snapshot"]["vmstate"], json!(true));
    guest_sh(&id, &format!("kill {pid}"));
    set_marker(&id, "after");
    guest_sh(&id, "echo after > /run/ram-marker");
    assert!(!sleeper_alive(&id, &pid));
    tokio::time::sleep(Duration::from_secs(15)).await;
    let before_rollback = uptime(&id);
    let t = Instant::now();
    let (s, back) = agent
        .post(&format!("{snaps}/ram1/rollback"), json!({}))
        .await;
    timing(&mut timings, ("rollback with RAM (running)", t.elapsed()));
    assert_eq!(s, 200, "{back}");
    assert_eq!(back["data"]["status"], json!("running"));
    wait_guest_agent(&id, Duration::from_secs(120)).await;
    assert!(
        sleeper_alive(&id, &pid),
        "the process started before the snapshot runs"
    );
    assert_eq!(marker(&id), "ram");
    assert_eq!(
        guest_sh(&id, "cat /run/ram-marker").1.trim(),
        "before",
        "memory-only state (tmpfs) is the snapshot's"
    );
    // No reboot: the guest's clock continues from the snapshot's uptime. QEMU restores its
    // virtual clock, but under TCG the guest's TSC follows the host, so the guest sees the
    // time since the snapshot pass as if it had been paused that long; never more.
    let after_rollback = uptime(&id);
    let since = snapshot_wall.elapsed().as_secs_f64();
    assert!(
        after_rollback >= at_snapshot && after_rollback <= at_snapshot + since + 5.0,
        "uptime continues from the snapshot ({at_snapshot} s): {after_rollback} s after the \
         rollback, {since:.1} s after the snapshot ({before_rollback} s before the rollback)"
    );

    // --- a stopped VM: disk-only snapshot offline, no memory to save, and a RAM rollback
    // brings the guest back running where it was.
    let (s, stopped) = agent
        .post(&format!("/v1/vms/{id}/stop?force=true"), json!({}))
        .await;
    assert_eq!(s, 200, "{stopped}");
    let (s, refused) = agent
        .post(&snaps, json!({"name": "ram_off", "include_ram": true}))
        .await;
    assert_eq!(
        (s, refused["error_code"].clone()),
        (409, json!("INVALID_STATE"))
    );
    let t = Instant::now();
    let (s, made) = agent.post(&snaps, json!({"name": "off1"})).await;
    timing(&mut timings, ("create disk-only (stopped)", t.elapsed()));
    assert_eq!(s, 201, "{made}");
    let (s, limit) = agent.post(&snaps, json!({"name": "fourth"})).await;
    assert_eq!(
        (s, limit["error_code"].clone()),
        (409, json!("SNAPSHOT_LIMIT"))
    );
    assert_eq!(image_snapshots(&agent, &id), ["disk1", "ram1", "off1"]);
    let t = Instant::now();
    let (s, back) = agent
        .post(&format!("{snaps}/ram1/rollback"), json!({}))
        .await;
    timing(&mut timings, ("rollback with RAM (stopped)", t.elapsed()));
    assert_eq!(s, 200, "{back}");
    assert_eq!(back["data"]["status"], json!("running"));
    wait_guest_agent(&id, Duration::from_secs(120)).await;
    assert!(
        sleeper_alive(&id, &pid),
        "memory restored into a stopped VM"
    );

    // --- deletes, live and offline, then the overlay's consistency.
    let (s, gone) = agent.delete(&format!("{snaps}/disk1")).await;
    assert_eq!(s, 200, "{gone}");
    let (s, _) = agent
        .post(&format!("/v1/vms/{id}/stop?force=true"), json!({}))
        .await;
    assert_eq!(s, 200);
    let (s, gone) = agent.delete(&format!("{snaps}/off1")).await;
    assert_eq!(s, 200, "{gone}");
    let (_, list) = agent.get(&snaps).await;
    assert_eq!(names(&list), ["ram1"]);
    assert_eq!(image_snapshots(&agent, &id), ["ram1"]);
    let disk = agent.vm_dir.join(&id).join("disk.qcow2");
    let (ok, check) = sh(&format!("qemu-img check {}", disk.display()));
    assert!(ok && check.contains("No errors"), "qemu-img check: {check}");

    // --- the free-space floor refuses before touching the disk.
    agent.kill();
    agent.start_again(vec![(
        "HVNODE_SNAPSHOTS__MIN_FREE_GB".into(),
        "1000000".into(),
    )]);
    let (s, full) = agent.post(&snaps, json!({"name": "nospace"})).await;
    assert_eq!(
        (s, full["error_code"].clone()),
        (507, json!("INSUFFICIENT_STORAGE")),
        "{full}"
    );
    assert_eq!(image_snapshots(&agent, &id), ["ram1"]);
    let (_, list) = agent.get(&snaps).await;
    assert_eq!(names(&list), ["ram1"]);

    // --- deleting the VM takes its snapshots along.
    let (s, deleted) = agent.delete(&format!("/v1/vms/{id}")).await;
    assert_eq!(s, 200, "{deleted}");
    let (s, resp) = agent.get(&snaps).await;
    assert_eq!(
        (s, resp["error_code"].clone()),
        (404, json!("VPS_NOT_FOUND"))
    );
    assert!(!vm_dir_exists(&agent, &id));

    for (what, took) in &timings {
        eprintln!("snapshot timing: {what}: {} ms", took.as_millis());
    }
}
