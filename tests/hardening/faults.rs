//! Faults an operator's host will see: libvirtd restarting under a serving agent and a
//! running task, the VM storage filling up in the middle of a create, and the agent's store
//! lost or corrupted before it starts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(900);

fn libvirtd_pid() -> Option<u32> {
    let (ok, out) = sh("pgrep -x libvirtd");
    ok.then(|| out.lines().next()?.trim().parse().ok())
        .flatten()
}

/// libvirtd stopped for a test; started again when dropped, whatever the test did.
struct LibvirtdDown {
    netns: String,
}

impl LibvirtdDown {
    fn stop(netns: &str) -> LibvirtdDown {
        stop_libvirtd();
        LibvirtdDown {
            netns: netns.to_owned(),
        }
    }

    /// Starts libvirtd again now: dropping the guard does it.
    fn restart(self) {}
}

impl Drop for LibvirtdDown {
    fn drop(&mut self) {
        if libvirtd_pid().is_none() {
            start_libvirtd(&self.netns);
        }
    }
}

pub(crate) fn stop_libvirtd() {
    let pid = libvirtd_pid().expect("libvirtd runs");
    sh(&format!("kill -TERM {pid}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while libvirtd_pid().is_some() {
        assert!(Instant::now() < deadline, "libvirtd did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILL, as a crash (or an impatient upgrade) ends it; its VMs keep running.
fn crash_libvirtd() {
    sh("pkill -9 -x libvirtd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while libvirtd_pid().is_some() {
        assert!(Instant::now() < deadline, "libvirtd did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn start_libvirtd(netns: &str) {
    let (ok, out) = sh(&format!("ip netns exec {netns} libvirtd -d"));
    assert!(ok, "restart libvirtd: {out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !virsh(&["version"]).0 {
        assert!(Instant::now() < deadline, "libvirtd does not answer again");
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn health(agent: &Agent) -> String {
    let (_, h) = agent.get("/v1/health").await;
    h["data"]["status"].as_str().unwrap_or_default().to_owned()
}

async fn wait_health(agent: &Agent, want: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if health(agent).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

fn qemu_pid(id: &str) -> String {
    sh(&format!("cat /run/libvirt/qemu/vps-{id}.pid"))
        .1
        .trim()
        .to_owned()
}

/// libvirtd goes away for a while and comes back: meanwhile the agent serves (health
/// `degraded`, lists from its store, refuses what needs libvirt in the envelope), a
/// deployment waiting for its guest carries on, and afterwards the agent reconnects by
/// itself. The VMs never notice.
#[tokio::test(flavor = "multi_thread")]
async fn libvirtd_restarting_under_a_serving_agent_and_a_running_task() {
    let agent = Agent::start(
        "faults-libvirtd",
        AgentOptions {
            pool: (180, 184),
            ..Default::default()
        },
    );
    let (a, b) = (new_id(), new_id());
    let (s, r) = agent
        .create(create_body(&a, "fault-a", "Libv1rt-gone"))
        .await;
    assert_eq!(s, 202, "{r}");
    let (done, _) = agent.wait_deployment(&a, BOOT).await;
    assert_eq!(done["deployment_status"], json!("completed"), "{done}");
    let pid_a = qemu_pid(&a);
    assert!(!pid_a.is_empty());
    assert_eq!(health(&agent).await, "healthy");

    // B deploys; libvirtd goes while B's task waits for its guest agent.
    let (s, r) = agent
        .create(create_body(&b, "fault-b", "Libv1rt-gone"))
        .await;
    assert_eq!(s, 202, "{r}");
    let deadline = Instant::now() + BOOT;
    loop {
        let (_, d) = agent.get(&format!("/v1/vms/{b}/deployment")).await;
        let current = d["data"]["current_task"].as_str().unwrap_or_default();
        if current == "wait_for_guest_agent" {
            break;
        }
        assert_ne!(d["data"]["deployment_status"], json!("failed"), "{d}");
        assert!(
            Instant::now() < deadline,
            "B never waited for its guest: {d}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let down = LibvirtdDown::stop(&agent.rig.netns);

    assert!(
        wait_health(&agent, "degraded", Duration::from_secs(15)).await,
        "health reports degraded while libvirtd is away"
    );
    let (s, list) = agent.get("/v1/vms").await;
    assert_eq!(s, 200, "the store still answers: {list}");
    assert_eq!(list["data"]["pagination"]["total"], json!(2), "{list}");
    let (s, refused) = agent.post(&format!("/v1/vms/{a}/suspend"), json!({})).await;
    assert_eq!(
        (s, refused["error_code"].clone()),
        (503, json!("HYPERVISOR_UNAVAILABLE")),
        "{refused}"
    );
    // Live status is either refused in the envelope or the last sample, marked unknown.
    let (s, status) = agent.get(&format!("/v1/vms/{a}/status")).await;
    assert!(
        (s >= 400 && status["success"] == json!(false))
            || (s == 200 && status["data"]["status"] == json!("unknown")),
        "{status}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;

    down.restart();
    assert!(
        wait_health(&agent, "healthy", Duration::from_secs(30)).await,
        "the agent reconnects by itself"
    );
    let (db, _) = agent.wait_deployment(&b, BOOT).await;
    assert_eq!(
        db["deployment_status"],
        json!("completed"),
        "the task that ran across the restart completes: {db}\n{}",
        agent.log_tail(30)
    );
    assert_eq!(qemu_pid(&a), pid_a, "A's QEMU kept running throughout");
    let (s, r) = agent.post(&format!("/v1/vms/{a}/suspend"), json!({})).await;
    assert_eq!((s, r["data"]["status"].clone()), (200, json!("suspended")));
    let (s, r) = agent.post(&format!("/v1/vms/{a}/resume"), json!({})).await;
    assert_eq!((s, r["data"]["status"].clone()), (200, json!("running")));
    let (s, st) = agent.get(&format!("/v1/vms/{a}/status")).await;
    assert_eq!(
        (s, st["data"]["qmpstatus"].clone()),
        (200, json!("running"))
    );

    bounced_three_times_under_load(&agent, &[&a, &b]).await;

    for id in [&a, &b] {
        let (s, r) = agent.delete(&format!("/v1/vms/{id}")).await;
        assert_eq!(s, 200, "{r}");
    }
}

/// libvirtd stopped and started three times in quick succession (a package upgrade, a
/// crash loop) while requests run: within seconds every VM's power actions succeed again
/// on every pooled connection, listings read real states, and health says `degraded` for
/// as long as an action cannot reach libvirt.
async fn bounced_three_times_under_load(agent: &Agent, vms: &[&str]) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for id in vms {
        let (stop, url, token, id) = (
            stop.clone(),
            agent.url.clone(),
            agent.token.clone(),
            id.to_string(),
        );
        load.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                for path in [
                    format!("/v1/vms/{id}/status"),
                    "/v1/vms".to_owned(),
                    format!("/v1/vms/{id}"),
                ] {
                    let _ = client
                        .get(format!("{url}{path}"))
                        .bearer_auth(&token)
                        .send()
                        .await;
                }
                let action = if n % 2 == 0 { "suspend" } else { "resume" };
                let _ = client
                    .post(format!("{url}/v1/vms/{id}/{action}"))
                    .bearer_auth(&token)
                    .json(&json!({}))
                    .send()
                    .await;
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bounced = Instant::now();
    for _ in 0..3 {
        crash_libvirtd();
        start_libvirtd(&agent.rig.netns);
    }
    eprintln!("libvirtd bounced three times in {:?}", bounced.elapsed());
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }

    // Every pooled connection serves each VM: power actions, enough of them that each
    // connection of the pool takes several (the pool is used in turn).
    let rounds = 3 * 4;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut failures = Vec::new();
    loop {
        let mut failed = None;
        'round: for _ in 0..rounds {
            for id in vms {
                for (action, want) in [("suspend", "suspended"), ("resume", "running")] {
                    let (s, r) = agent
                        .post(&format!("/v1/vms/{id}/{action}"), json!({}))
                        .await;
                    if (s, r["data"]["status"].clone()) != (200, json!(want)) {
                        failed = Some(format!("{action} {id}: {s} {r}"));
                        break 'round;
                    }
                }
            }
        }
        let Some(why) = failed else { break };
        // An action that cannot reach libvirt is mirrored by health at that moment.
        let now = health(agent).await;
        assert_eq!(now, "degraded", "health while `{why}` fails");
        failures.push(why);
        assert!(
            Instant::now() < deadline,
            "power actions still fail 20 s after libvirtd came back: {failures:?}\n{}",
            agent.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "after the bounces: {} failed rounds before every action succeeded",
        failures.len()
    );
    let (_, list) = agent.get("/v1/vms").await;
    for vm in list["data"]["instances"].as_array().unwrap() {
        assert_ne!(vm["status"], json!("unknown"), "{list}");
    }
    assert!(
        wait_health(agent, "healthy", Duration::from_secs(10)).await,
        "health is healthy again once every connection answers"
    );
}

/// A small loop-mounted filesystem as the VM storage, removed on drop.
struct SmallFs {
    image: PathBuf,
    mount: PathBuf,
}

impl SmallFs {
    fn new(root: &Path, mib: u32) -> SmallFs {
        let base = root
            .join("e2e")
            .join(format!("smallfs-{}", uuid::Uuid::new_v4().simple()));
        let (image, mount) = (base.with_extension("img"), base.clone());
        std::fs::create_dir_all(&mount).unwrap();
        let (ok, out) = sh(&format!(
            "truncate -s {mib}M {img} && mkfs.ext4 -q -m 0 {img} && mount -o loop {img} {mnt} \
             && chmod 0711 {mnt}",
            img = image.display(),
            mnt = mount.display()
        ));
        assert!(ok, "cannot make the small filesystem: {out}");
        SmallFs { image, mount }
    }

    fn available(&self) -> u64 {
        let (_, out) = sh(&format!(
            "df --output=avail -B1 {} | tail -n1",
            self.mount.display()
        ));
        out.trim().parse().unwrap()
    }

    /// Fills the filesystem until `left` bytes remain.
    fn fill_leaving(&self, left: u64) {
        let size = self.available().saturating_sub(left);
        let (ok, out) = sh(&format!(
            "fallocate -l {size} {}/filler",
            self.mount.display()
        ));
        assert!(ok, "fill: {out}");
    }

    /// Regular files under the VM storage (the filler aside).
    fn files(&self) -> Vec<String> {
        let (_, out) = sh(&format!(
            "find {} -type f ! -name filler",
            self.mount.join("vms").display()
        ));
        out.lines().map(str::to_owned).collect()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        sh(&format!("umount {}", self.mount.display()));
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_file(&self.image);
    }
}

/// The disk fills up between the VM's overlay and its seed: the task fails with a clear
/// error and unwinds, leaving no domain, no file, no address; the agent keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn the_vm_storage_filling_up_mid_create_fails_cleanly_and_leaves_nothing() {
    let rig = Rig::load();
    // Large enough (sparse) for admission to accept a 4 GB disk; filled before the create.
    let fs = SmallFs::new(&rig.root, 6 * 1024);
    let agent = Agent::start(
        "faults-diskfull",
        AgentOptions {
            pool: (186, 187),
            vm_dir: Some(fs.mount.join("vms")),
            extra_toml: "[capacity]\ndisk_overcommit = 4.0\n".into(),
            ..Default::default()
        },
    );
    // The overlay (a few hundred KiB) fits; the 1 MiB seed does not.
    fs.fill_leaving(640 * 1024);
    let (a, b) = (new_id(), new_id());
    let (s, accepted) = agent
        .create(create_body(&a, "full-a", "D1sk-is-full"))
        .await;
    assert_eq!(s, 202, "{accepted}");
    let ip = accepted["data"]["ip_address"].as_str().unwrap().to_owned();

    let (d, _) = agent.wait_deployment(&a, Duration::from_secs(300)).await;
    assert_eq!(d["deployment_status"], json!("failed"), "{d}");
    let error = d["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        error.contains("no space left"),
        "the error says why: {error}"
    );
    let steps: Vec<(String, String)> = d["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().into(),
                t["status"].as_str().unwrap().into(),
            )
        })
        .collect();
    let status_of = |name: &str| {
        steps
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    // Mid-create: the disk was made (and unwound), the VM never started.
    assert_eq!(status_of("create_vm"), "failed", "{steps:?}");
    assert_eq!(status_of("start_vm"), "pending", "{steps:?}");
    assert!(!domain_exists(&a), "no domain left");
    assert!(
        fs.files().iter().all(|f| f.ends_with(".hvnode-store-id")),
        "files left: {:?}",
        fs.files()
    );

    // Its address went back to the pool: another VM may ask for it by name.
    let mut body = create_body(&b, "full-b", "D1sk-is-full");
    body["ip_address"] = json!(ip);
    let (s, r) = agent.create(body).await;
    assert_eq!(s, 202, "the failed VM holds no address: {r}");
    let (d, _) = agent.wait_deployment(&b, Duration::from_secs(300)).await;
    assert_eq!(d["deployment_status"], json!("failed"), "{d}");
    assert_eq!(health(&agent).await, "healthy");
    for id in [&a, &b] {
        let (s, r) = agent.delete(&format!("/v1/vms/{id}")).await;
        assert_eq!(s, 200, "{r}");
        assert!(!domain_exists(id));
    }
    assert!(
        fs.files().iter().all(|f| f.ends_with(".hvnode-store-id")),
        "files left: {:?}",
        fs.files()
    );
}

fn db_files(agent: &Agent) -> [PathBuf; 3] {
    let db = agent.dir.join("hvnode.db");
    [
        db.clone(),
        db.with_extension("db-wal"),
        db.with_extension("db-shm"),
    ]
}

/// A store that vanished, was emptied or is corrupted: the agent refuses to start, says
/// why and what to do, and touches nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_or_corrupted_store_stops_the_agent_with_a_clear_message() {
    let mut agent = Agent::start(
        "faults-store",
        AgentOptions {
            pool: (190, 191),
            ..Default::default()
        },
    );
    let (s, _) = agent.get("/v1/vms").await;
    assert_eq!(s, 200);
    assert!(agent.terminate().success());

    // Deleted.
    for f in db_files(&agent) {
        let _ = std::fs::remove_file(f);
    }
    let refused = agent.try_spawn().expect_err("starts without its store");
    assert!(refused.contains("Restore"), "{refused}");
    assert!(
        refused.contains("exit status: 3"),
        "refusals exit with 3: {refused}"
    );
    assert!(refused.contains("forget"), "{refused}");
    assert!(
        !db_files(&agent)[0].exists(),
        "refused before creating a new store"
    );

    // Emptied (a zero-length file is a valid, empty SQLite database).
    std::fs::write(&db_files(&agent)[0], b"").unwrap();
    let refused = agent.try_spawn().expect_err("starts with an empty store");
    assert!(refused.contains("Restore"), "{refused}");

    // Starting over on purpose, as the message says: remove the marker.
    let marker = agent.vm_dir.join(".hvnode-store-id");
    assert!(refused.contains(&marker.display().to_string()), "{refused}");
    std::fs::remove_file(&marker).unwrap();
    agent
        .try_spawn()
        .expect("starts over once the marker is gone");
    assert!(agent.terminate().success());

    // Corrupted pages.
    let db = db_files(&agent)[0].clone();
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 12 * 1024, "the store has pages to corrupt");
    for b in &mut bytes[4096..12 * 1024] {
        *b = 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    let refused = agent
        .try_spawn()
        .expect_err("starts with a corrupted store");
    assert!(
        refused.contains("unusable") || refused.contains("malformed"),
        "{refused}"
    );
    let after = std::fs::read(&db).unwrap();
    assert_eq!(
        after[4096..12 * 1024],
        bytes[4096..12 * 1024],
        "left as it was for forensics"
    );
}
