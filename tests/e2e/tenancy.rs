//! What one customer's actions cannot do to the node or to another customer, on real
//! guests: a task keeps going (and ends) when its client hangs up; console sessions are
//! capped per VM and end when the VM is suspended or deleted; snapshots stay within their
//! allowance; a VM's disk is its own and the shared template is no QEMU's to write; a
//! failed deployment tells the customer what failed and the log where; two VM ids that
//! would share device names are refused. Each refusal beside its success.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(1500);
/// A template whose manifest names the real image with a wrong checksum: a deployment
/// from it fails at `validate_resources`, inside its task.
pub(crate) const BAD_TEMPLATE: &str = "9099";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The rig's image store plus a manifest for the real image with a wrong checksum.
pub(crate) fn image_store(rig: &Rig, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let manifest = std::fs::read_to_string(rig.image_dir.join("9010.toml")).unwrap();
    std::fs::write(dir.join("9010.toml"), &manifest).unwrap();
    let file = manifest
        .lines()
        .find_map(|l| l.strip_prefix("file = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap()
        .to_owned();
    std::fs::hard_link(rig.image_dir.join(&file), dir.join(&file))
        .unwrap_or_else(|e| panic!("link the template into {}: {e}", dir.display()));
    let bad: String = manifest
        .lines()
        .map(|l| {
            if l.starts_with("sha256 = ") {
                format!("sha256 = \"{}\"", "0".repeat(64))
            } else if l.starts_with("id = ") {
                format!("id = \"{BAD_TEMPLATE}\"")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join(format!("{BAD_TEMPLATE}.toml")), bad).unwrap();
}

/// A VNC console session on `id` (VNC, unlike the serial console, takes several clients
/// at once), or the refusal's status and code.
async fn console(agent: &Agent, id: &str) -> Result<Ws, (u16, String)> {
    let (s, t) = agent
        .post(&format!("/v1/vms/{id}/console"), json!({"type": "novnc"}))
        .await;
    assert_eq!(s, 200, "{t}");
    let url = t["data"]["websocket_url"].as_str().unwrap().to_owned();
    let req = url.into_client_request().unwrap();
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body: Value = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((
                resp.status().as_u16(),
                body["error_code"].as_str().unwrap_or("").to_owned(),
            ))
        }
        Err(e) => panic!("console of {id}: {e}"),
    }
}

/// Whether the session ends (close, error or end of stream) within `within`; pings and
/// output are read past.
async fn ends_within(ws: &mut Ws, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return false,
            Ok(None) | Ok(Some(Err(_))) => return true,
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_)))) => return true,
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Sends a request whole, then hangs up after `after` without reading the answer, as a
/// control plane that gave up would.
async fn hang_up(agent: &Agent, method: &str, path: &str, body: Value, after: Duration) {
    let body = body.to_string();
    let mut s = tokio::net::TcpStream::connect(agent.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        agent.token,
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(after).await;
    drop(s);
}

/// The newest task of `kind` on `vm`, waited for until it ended; panics if it is still
/// pending or running after `timeout` (a task that belonged to its request would be).
async fn task_ends(agent: &Agent, vm: &str, kind: &str, before: &[String]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (_, list) = agent
            .get(&format!("/v1/tasks?vps_id={vm}&kind={kind}&limit=5"))
            .await;
        let newest = list["data"]["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| !before.contains(&t["id"].as_str().unwrap().to_owned()))
            .cloned();
        if let Some(t) = newest {
            if ["completed", "failed", "cancelled"].contains(&t["state"].as_str().unwrap()) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "the {kind} task on {vm} is still {} after its client hung up: {t}\n{}",
                t["state"],
                agent.log_tail(30)
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "no {kind} task was recorded on {vm}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn task_ids(agent: &Agent, vm: &str) -> Vec<String> {
    let (_, list) = agent
        .get(&format!("/v1/tasks?vps_id={vm}&limit=1000"))
        .await;
    list["data"]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect()
}

/// One webhook delivery's body, received on a local port.
pub(crate) fn webhook_receiver() -> (u16, std::sync::mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                        let _ = tx.send(body.to_owned());
                        break;
                    }
                }
            }
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_customers_actions_stay_within_their_bounds() {
    let rig = Rig::load();
    let images = rig
        .root
        .join("e2e")
        .join(format!("tenancy-images-{}", uuid::Uuid::new_v4().simple()));
    image_store(&rig, &images);
    let agent = Agent::start(
        "tenancy",
        AgentOptions {
            pool: (247, 249),
            image_dir: Some(images.clone()),
            extra_toml: "[snapshots]\nmax_percent_of_disk = 5\nmin_free_gb = 1\n\n\
                         [console]\nmax_sessions_per_vm = 2\n"
                .into(),
            ..Default::default()
        },
    );
    let (a, b) = (new_id(), new_id());
    for (id, name) in [(&a, "ten-a"), (&b, "ten-b")] {
        let (s, r) = agent.create(create_body(id, name, "Ten4nt-pass")).await;
        assert_eq!(s, 202, "{r}");
    }

    // --- An id sharing the 12 hex digits that name A's devices is refused, and nothing of
    // it is kept; A and B, whose digits differ, were accepted.
    let twin = format!("{}-4000-8000-000000000000", &a[..13]);
    let (s, r) = agent
        .create(create_body(&twin, "ten-twin", "Ten4nt-pass"))
        .await;
    assert_eq!(
        (s, r["error_code"].clone()),
        (409, json!("VPS_ID_CONFLICT")),
        "{r}"
    );
    let (s, _) = agent.get(&format!("/v1/vms/{twin}")).await;
    assert_eq!(s, 404, "the refused VM was not recorded");

    // --- A deployment that fails inside its task: the customer's documents say what failed,
    // not where on the host; the operator's log has the detail.
    let (hook_port, hooks) = webhook_receiver();
    let d = new_id();
    let mut body = create_body(&d, "ten-bad", "Ten4nt-pass");
    body["template_id"] = json!(BAD_TEMPLATE);
    body["webhook_url"] = json!(format!("http://127.0.0.1:{hook_port}/hooks/SECRET-PATH"));
    body["webhook_secret"] = json!("hook-secret-tenancy");
    let (s, r) = agent.create(body).await;
    assert_eq!(s, 202, "{r}");
    let (doc, _) = agent.wait_deployment(&d, Duration::from_secs(300)).await;
    assert_eq!(doc["deployment_status"], json!("failed"), "{doc}");
    let error = doc["error"].as_str().unwrap_or_default().to_owned();
    assert!(!error.is_empty(), "the failure is told: {doc}");
    let hook = hooks
        .recv_timeout(Duration::from_secs(60))
        .expect("the failure webhook arrives");
    let (_, task) = agent
        .get(&format!("/v1/tasks?vps_id={d}&kind=create&limit=1"))
        .await;
    let images_path = images.display().to_string();
    for (what, text) in [
        ("deployment document", doc.to_string()),
        ("webhook", hook.clone()),
        ("task", task.to_string()),
    ] {
        assert!(
            !text.contains(&images_path)
                && !text.contains("/var/lib")
                && !text.contains(".qcow2")
                && !text.contains("checksum"),
            "the {what} names no host path and no library detail: {text}"
        );
    }
    assert!(hook.contains("vps.deployment.failed"), "{hook}");
    assert!(
        agent.log().contains("failed its checksum"),
        "the log keeps the detail for the operator"
    );
    assert!(
        !agent.log().contains("SECRET-PATH"),
        "webhook URLs are logged by host only"
    );

    agent.wait_deployed(&[&a, &b], BOOT).await;

    // --- Files: A's disk is the agent's and QEMU's alone though the agent was started with
    // the test's umask; the template behind it stays root's, and QEMU's user cannot write
    // it, while it can write A's own disk (so the check can fail).
    let disk = agent.vm_dir.join(&a).join("disk.qcow2");
    let mode = std::fs::metadata(&disk).unwrap().mode() & 0o777;
    assert_eq!(mode & 0o077, 0, "disk mode {mode:o}");
    let (_, xml) = virsh(&["dumpxml", &a]);
    let template = xml
        .split("<backingStore type='file'")
        .nth(1)
        .and_then(|b| b.split("<source file='").nth(1))
        .and_then(|s| s.split('\'').next())
        .unwrap_or_else(|| panic!("A's disk names its template: {xml}"))
        .to_owned();
    assert!(
        xml.contains("relabel='no'"),
        "libvirt is told not to relabel it: {xml}"
    );
    let meta = std::fs::metadata(&template).unwrap();
    assert_eq!(meta.uid(), 0, "{template} is root's while A runs");
    assert_eq!(
        meta.mode() & 0o022,
        0,
        "{template} is not group or world writable"
    );
    let writable = |path: &str| sh(&format!("runuser -u libvirt-qemu -- test -w '{path}'")).0;
    assert!(
        writable(disk.to_str().unwrap()),
        "QEMU's user writes A's own disk"
    );
    assert!(
        !writable(&template),
        "QEMU's user cannot write the template"
    );

    // --- Consoles: two sessions on A at most, while B still gets one; A's end when it is
    // suspended, B's does not.
    let mut a1 = console(&agent, &a).await.expect("first session on A");
    let mut a2 = console(&agent, &a).await.expect("second session on A");
    assert_eq!(
        console(&agent, &a).await.err(),
        Some((409, "CONSOLE_LIMIT".to_owned())),
        "a third session on A is refused"
    );
    let mut b1 = console(&agent, &b).await.expect("a session on B");
    let (s, r) = agent.post(&format!("/v1/vms/{a}/suspend"), json!({})).await;
    assert_eq!(s, 200, "{r}");
    assert!(
        ends_within(&mut a1, Duration::from_secs(5)).await,
        "A's first session ends with the suspend"
    );
    assert!(
        ends_within(&mut a2, Duration::from_secs(5)).await,
        "A's second session ends with the suspend"
    );
    assert!(
        !ends_within(&mut b1, Duration::from_secs(2)).await,
        "B's session goes on"
    );
    drop(b1);
    let (s, r) = agent.post(&format!("/v1/vms/{a}/resume"), json!({})).await;
    assert_eq!(s, 200, "{r}");
    let mut a3 = console(&agent, &a).await.expect("A takes sessions again");
    assert!(!ends_within(&mut a3, Duration::from_secs(1)).await);
    drop(a3);

    // --- Snapshots within their allowance (5% of 4 GB): the guest's memory (512 MiB) does
    // not fit, a disk-only snapshot does; and once rewritten data is held by a snapshot
    // beyond the allowance, the next one is refused.
    let (s, r) = agent
        .post(
            &format!("/v1/vms/{a}/snapshots"),
            json!({"name": "with_ram", "include_ram": true}),
        )
        .await;
    assert_eq!(
        (s, r["error_code"].clone()),
        (409, json!("SNAPSHOT_QUOTA_EXCEEDED")),
        "{r}"
    );
    let (code, out) = guest_sh(
        &a,
        "dd if=/dev/urandom of=/root/big bs=1M count=300 status=none && sync",
    );
    assert_eq!(code, 0, "{out}");
    let (s, r) = agent
        .post(&format!("/v1/vms/{a}/snapshots"), json!({"name": "q1"}))
        .await;
    assert_eq!(s, 201, "a disk-only snapshot fits: {r}");
    let (code, out) = guest_sh(
        &a,
        "dd if=/dev/urandom of=/root/big bs=1M count=300 conv=notrunc status=none && sync",
    );
    assert_eq!(code, 0, "{out}");
    let (s, r) = agent
        .post(&format!("/v1/vms/{a}/snapshots"), json!({"name": "q2"}))
        .await;
    assert_eq!(
        (s, r["error_code"].clone()),
        (409, json!("SNAPSHOT_QUOTA_EXCEEDED")),
        "q1 holds the 300 MiB the guest rewrote: {r}"
    );
    let (s, r) = agent.delete(&format!("/v1/vms/{a}/snapshots/q1")).await;
    assert_eq!(s, 200, "{r}");

    // --- Every kind of task keeps going when its client hangs up mid-request, and ends.
    let (s, net) = agent
        .post("/v1/private-networks", json!({"name": "tenancy"}))
        .await;
    assert_eq!(s, 201, "{net}");
    let net_id = net["data"]["id"].as_str().unwrap().to_owned();
    let quick = Duration::from_millis(150);
    let steps: Vec<(&str, &str, String, Value)> = vec![
        ("stop", "POST", format!("/v1/vms/{a}/stop"), json!({})),
        ("start", "POST", format!("/v1/vms/{a}/start"), json!({})),
        ("restart", "POST", format!("/v1/vms/{a}/restart"), json!({})),
        ("reset", "POST", format!("/v1/vms/{a}/reset"), json!({})),
        ("suspend", "POST", format!("/v1/vms/{a}/suspend"), json!({})),
        ("resume", "POST", format!("/v1/vms/{a}/resume"), json!({})),
        (
            "snapshot_create",
            "POST",
            format!("/v1/vms/{a}/snapshots"),
            json!({"name": "hangup"}),
        ),
        (
            "snapshot_rollback",
            "POST",
            format!("/v1/vms/{a}/snapshots/hangup/rollback"),
            json!({}),
        ),
        (
            "snapshot_delete",
            "DELETE",
            format!("/v1/vms/{a}/snapshots/hangup"),
            json!({}),
        ),
        ("ip_add", "POST", format!("/v1/vms/{a}/ips"), json!({})),
        (
            "net_attach",
            "POST",
            format!("/v1/private-networks/{net_id}/attach"),
            json!({"vps_id": a}),
        ),
    ];
    for (kind, method, path, body) in steps {
        let before = task_ids(&agent, &a).await;
        hang_up(&agent, method, &path, body, quick).await;
        let t = task_ends(&agent, &a, kind, &before).await;
        assert_eq!(t["state"], json!("completed"), "{kind}: {t}");
        if ["start", "restart", "reset", "snapshot_rollback"].contains(&kind) {
            // The next action wants a guest that has booted (ACPI, its agent, PCIe
            // hot-plug): a disk-only rollback boots it again too.
            wait_guest_agent(&a, BOOT).await;
        }
    }
    let expected_state = virsh(&["domstate", &a]).1;
    assert!(
        expected_state.contains("running"),
        "A runs: {expected_state}"
    );
    let (_, ips) = agent.get(&format!("/v1/vms/{a}/ips")).await;
    let extra = ips["data"]["ips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == json!("extra"))
        .unwrap_or_else(|| panic!("the extra address was added: {ips}"))["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, nets) = agent.get("/v1/private-networks").await;
    let membership = nets["data"]["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == json!(net_id))
        .and_then(|n| n["members"].as_array()?.first().cloned())
        .unwrap_or_else(|| panic!("A became a member: {nets}"))["membership_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let more: Vec<(&str, &str, &str, String, Value)> = vec![
        (
            "ip_move",
            a.as_str(),
            "POST",
            format!("/v1/vms/{a}/ips/{extra}/move"),
            json!({"target_vps_id": b}),
        ),
        (
            "ip_remove",
            b.as_str(),
            "DELETE",
            format!("/v1/vms/{b}/ips/{extra}"),
            json!({}),
        ),
        (
            "net_detach",
            a.as_str(),
            "DELETE",
            format!("/v1/private-networks/{net_id}/members/{membership}"),
            json!({}),
        ),
        (
            "delete",
            b.as_str(),
            "DELETE",
            format!("/v1/vms/{b}"),
            json!({}),
        ),
    ];
    // A session on B, open when B goes.
    let mut b2 = console(&agent, &b).await.expect("a session on B");
    for (kind, vm, method, path, body) in more {
        let before = task_ids(&agent, vm).await;
        hang_up(&agent, method, &path, body, quick).await;
        let t = task_ends(&agent, vm, kind, &before).await;
        assert_eq!(t["state"], json!("completed"), "{kind}: {t}");
    }
    assert!(
        ends_within(&mut b2, Duration::from_secs(10)).await,
        "B's console session ended with B"
    );
    assert!(!domain_exists(&b), "B's domain is gone");
    let (_, a_ips) = agent.get(&format!("/v1/vms/{a}/ips")).await;
    assert!(!a_ips.to_string().contains(&extra), "{a_ips}");
    let (s, r) = agent
        .delete(&format!("/v1/private-networks/{net_id}"))
        .await;
    assert_eq!(s, 200, "the network has no member left: {r}");

    let (s, r) = agent.delete(&format!("/v1/vms/{a}")).await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = agent.delete(&format!("/v1/vms/{d}")).await;
    assert_eq!(s, 200, "{r}");
    let _ = std::fs::remove_dir_all(&images);
}
