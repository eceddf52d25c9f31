//! Actions on real guests that no other test drives: restart and reset (the guest boots
//! again, keeps its addresses, and its new tap is filtered again), a RAM resize the guest
//! sees (at the next boot, or at once with `restart`), `&type=` on console tickets and the
//! node-wide console cap, a webhook abandoned after `webhooks.max_age_s`; and a reinstall
//! that keeps extra addresses, IPv6 and a private NIC, a stop whose guest ignores the power
//! button (powered off after `timeout_s`), and the report-only startup reconciliation beside
//! the one that acts. Each refusal or absence stands beside the same path succeeding.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(1500);
const REBOOT: Duration = Duration::from_secs(900);
const HOOK_SECRET: &str = "whsec-guest-actions-7d1e";
/// `webhooks.max_age_s` of the first test's agent.
const HOOK_MAX_AGE_S: u64 = 30;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A shell command in the guest through its agent, or `None` while the agent does not
/// answer (the guest is rebooting).
fn try_guest_sh(id: &str, script: &str) -> Option<(i64, String)> {
    use base64::Engine;
    let cmd = json!({"execute": "guest-exec", "arguments": {
        "path": "/bin/sh", "arg": ["-c", script], "capture-output": true}});
    let (ok, out) = virsh(&["qemu-agent-command", id, &cmd.to_string()]);
    if !ok {
        return None;
    }
    let pid = serde_json::from_str::<Value>(out.trim()).ok()?["return"]["pid"].as_i64()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let status = json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
        let (ok, out) = virsh(&["qemu-agent-command", id, &status.to_string()]);
        if !ok {
            return None;
        }
        let v: Value = serde_json::from_str(out.trim()).ok()?;
        if v["return"]["exited"] == json!(true) {
            let data = v["return"]["out-data"].as_str().unwrap_or("");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .unwrap_or_default();
            return Some((
                v["return"]["exitcode"].as_i64().unwrap_or(-1),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// The guest kernel's boot id (new at every boot, reset included).
fn boot_id(id: &str) -> String {
    let (code, out) = guest_sh(id, "cat /proc/sys/kernel/random/boot_id");
    assert_eq!(code, 0, "boot_id of {id}: {out}");
    let b = out.trim().to_owned();
    assert_eq!(b.len(), 36, "boot_id of {id}: {out}");
    b
}

/// Waits until the guest answers with a boot id other than `old`; returns it.
async fn new_boot_id(id: &str, old: &str, timeout: Duration) -> String {
    let mut seen = String::new();
    let ok = eventually(timeout, || {
        match try_guest_sh(id, "cat /proc/sys/kernel/random/boot_id") {
            Some((0, out)) if out.trim().len() == 36 => {
                seen = out.trim().to_owned();
                seen != old
            }
            _ => false,
        }
    })
    .await;
    assert!(
        ok,
        "{id} did not come back with a new boot id within {timeout:?} (last seen {seen:?})"
    );
    seen
}

/// The guest's MemTotal in KiB.
fn mem_total_kib(id: &str) -> u64 {
    let (_, out) = guest_sh(id, "awk '/^MemTotal:/ {print $2}' /proc/meminfo");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("MemTotal of {id}: {out}"))
}

/// QEMU's pid for the VM, from the status document.
async fn qemu_pid(agent: &Agent, id: &str) -> Option<u64> {
    let (s, r) = agent.get(&format!("/v1/vms/{id}/status")).await;
    assert_eq!(s, 200, "{r}");
    r["data"]["pid"].as_u64()
}

async fn primary_v4(agent: &Agent, id: &str) -> String {
    let (s, d) = agent.get(&format!("/v1/vms/{id}")).await;
    assert_eq!(s, 200, "{d}");
    d["data"]["ip_address"].as_str().unwrap().to_owned()
}

/// Waits until `addr` answers TCP 22 from the rig's namespace.
async fn answers_ssh(ns: &str, addr: &str, within: Duration) -> bool {
    eventually(within, || tcp_open(ns, addr, 22)).await
}

async fn wait_task_ok(agent: &Agent, accepted: &Value, timeout: Duration) -> Value {
    let task = agent
        .wait_task(accepted["data"]["task_id"].as_str().unwrap(), timeout)
        .await;
    assert_eq!(
        task["state"],
        json!("completed"),
        "{task}\n{}",
        agent.log_tail(40)
    );
    task
}

/// `virsh domstate --reason`, e.g. `shut off (shutdown)` or `shut off (destroyed)`.
fn domstate_reason(id: &str) -> String {
    virsh(&["domstate", "--reason", id]).1.trim().to_owned()
}

// --- webhooks ---------------------------------------------------------------------------

/// A webhook receiver on loopback that answers 500 to everything and notes when each
/// request came.
#[derive(Clone)]
struct FailingReceiver {
    base: String,
    hits: Arc<Mutex<Vec<Instant>>>,
}

impl FailingReceiver {
    async fn start() -> FailingReceiver {
        let hits: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let h = hits.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let h = h.clone();
                async move {
                    h.lock().unwrap().push(Instant::now());
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        FailingReceiver { base, hits }
    }

    fn hits(&self) -> Vec<Instant> {
        self.hits.lock().unwrap().clone()
    }
}

// --- consoles ---------------------------------------------------------------------------

async fn console_ticket(agent: &Agent, id: &str, kind: &str) -> Value {
    let (s, r) = agent
        .post(
            &format!("/v1/vms/{id}/console"),
            json!({"type": kind, "ttl_seconds": 300}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["data"]["type"], json!(kind), "{r}");
    r["data"].clone()
}

/// Opens a console WebSocket (offering `binary`, as noVNC does), or the refusal's status,
/// code and message.
async fn open_console(url: &str) -> Result<Ws, (u16, String, String)> {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "binary".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(resp)) => {
            let body: Value = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((
                resp.status().as_u16(),
                body["error_code"].as_str().unwrap_or("").to_owned(),
                body["message"].as_str().unwrap_or("").to_owned(),
            ))
        }
        Err(e) => panic!("{url}: {e}"),
    }
}

/// The first 12 bytes a VNC session sends: the RFB banner.
async fn rfb_banner(ws: &mut Ws) -> Vec<u8> {
    let mut buf = Vec::new();
    while buf.len() < 12 {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("VNC data within 30 s")
            .expect("VNC session open")
            .expect("VNC message");
        match msg {
            Message::Binary(b) => buf.extend_from_slice(&b),
            Message::Close(c) => panic!("VNC session closed early: {c:?}"),
            _ => {}
        }
    }
    buf.truncate(12);
    buf
}

/// Whether the session is still open after `within` (pings and output read past).
async fn stays_open(ws: &mut Ws, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return true,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return false,
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Restart and reset on a running guest, a RAM resize it sees, console ticket types and
/// the node-wide console cap, and a webhook that is abandoned after `webhooks.max_age_s`.
#[tokio::test(flavor = "multi_thread")]
async fn restart_reset_ram_resize_console_cap_and_webhook_give_up() {
    let test_start = Instant::now();
    let hooks = FailingReceiver::start().await;
    let agent = Agent::start(
        "guest-actions-power",
        AgentOptions {
            pool: (142, 145),
            extra_toml: format!(
                "[webhooks]\ninitial_backoff_ms = 1000\nmax_backoff_s = 3\n\
                 max_age_s = {HOOK_MAX_AGE_S}\n\n[console]\nmax_sessions = 2\n"
            ),
            ..Default::default()
        },
    );
    let ns = agent.rig.netns.clone();
    let (a, b) = (new_id(), new_id());
    let mut body_a = create_body(&a, "ga-alpha", "Gu3st-actions");
    body_a["webhook_url"] = json!(format!("{}/hook", hooks.base));
    body_a["webhook_secret"] = json!(HOOK_SECRET);
    let (s, r) = agent.create(body_a).await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(r["data"]["webhook_configured"], json!(true), "{r}");
    let (s, r) = agent
        .create(create_body(&b, "ga-beta", "Gu3st-actions"))
        .await;
    assert_eq!(s, 202, "{r}");
    agent.wait_deployed(&[&a, &b], BOOT).await;
    eprintln!(
        "guest_actions power: deployed after {:?}",
        test_start.elapsed()
    );
    let (ip_a, ip_b) = (primary_v4(&agent, &a).await, primary_v4(&agent, &b).await);
    assert!(
        answers_ssh(&ns, &ip_a, Duration::from_secs(120)).await,
        "A answers on {ip_a} after its deployment"
    );

    // --- Consoles: `&type=` must match the ticket's type; the node holds at most two
    // sessions (max_sessions = 2) although each VM may hold two (max_sessions_per_vm).
    let (s, r) = agent
        .post(&format!("/v1/vms/{a}/console"), json!({"type": "rdp"}))
        .await;
    assert_eq!(s, 400, "an unknown console type is refused: {r}");
    let vnc_a = console_ticket(&agent, &a, "novnc").await;
    let vnc_url = vnc_a["websocket_url"].as_str().unwrap().to_owned();
    let (status, code, _) = open_console(&format!("{vnc_url}&type=serial"))
        .await
        .expect_err("a VNC ticket presented as serial is refused");
    assert_eq!((status, code.as_str()), (403, "INVALID_TICKET"));
    // The refusal came before the ticket was used: the same ticket with its own type opens
    // a VNC session that speaks RFB.
    let mut s1 = open_console(&format!("{vnc_url}&type=novnc"))
        .await
        .unwrap_or_else(|e| panic!("the VNC ticket with &type=novnc: {e:?}"));
    assert_eq!(rfb_banner(&mut s1).await, b"RFB 003.008\n");
    let serial_b = console_ticket(&agent, &b, "serial").await;
    let serial_url = serial_b["websocket_url"].as_str().unwrap().to_owned();
    let (status, code, _) = open_console(&format!("{serial_url}&type=novnc"))
        .await
        .expect_err("a serial ticket presented as novnc is refused");
    assert_eq!((status, code.as_str()), (403, "INVALID_TICKET"));
    let mut s2 = open_console(&format!("{serial_url}&type=serial"))
        .await
        .unwrap_or_else(|e| panic!("the serial ticket with &type=serial: {e:?}"));
    // Two sessions are open, one per VM: a second on A is within A's own cap (2) but not
    // the node's.
    let third = console_ticket(&agent, &a, "novnc").await;
    let third_url = third["websocket_url"].as_str().unwrap().to_owned();
    let (status, code, message) = open_console(&third_url)
        .await
        .expect_err("a third session on the node is refused");
    assert_eq!((status, code.as_str()), (409, "CONSOLE_LIMIT"), "{message}");
    assert!(
        message.contains("node"),
        "the node's cap, not A's, refused it: {message}"
    );
    assert!(
        stays_open(&mut s1, Duration::from_secs(2)).await,
        "the refusal left A's first session alone"
    );
    // B's session closes: the same (unused) ticket now opens a second session on A.
    s2.close(None).await.unwrap();
    drop(s2);
    let mut reopened = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match open_console(&third_url).await {
            Ok(ws) => {
                reopened = Some(ws);
                break;
            }
            Err((409, code, _)) if code == "CONSOLE_LIMIT" => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => panic!("reopening after B's session closed: {e:?}"),
        }
    }
    let mut s3 = reopened.expect("a session is accepted again once one closed");
    assert_eq!(rfb_banner(&mut s3).await, b"RFB 003.008\n");
    drop(s1);
    drop(s3);

    // --- RAM resize without `restart`: recorded and defined, but the running guest keeps
    // its memory until it boots again.
    let mem_a0 = mem_total_kib(&a);
    let boot_a0 = boot_id(&a);
    let pid_a0 = qemu_pid(&agent, &a).await.expect("A's QEMU runs");
    let (s, resized) = agent
        .post(&format!("/v1/vms/{a}/resize"), json!({"ram_mb": 1024}))
        .await;
    assert_eq!(s, 202, "{resized}");
    assert!(
        resized["data"]["note"]
            .as_str()
            .is_some_and(|n| n.contains("next boot")),
        "the answer says when the RAM applies: {resized}"
    );
    wait_task_ok(&agent, &resized, Duration::from_secs(300)).await;
    let (_, detail) = agent.get(&format!("/v1/vms/{a}")).await;
    assert_eq!(
        detail["data"]["resources"]["ram_mb"],
        json!(1024),
        "{detail}"
    );
    let (_, xml) = virsh(&["dumpxml", "--inactive", &a]);
    assert!(
        xml.contains("<memory unit='KiB'>1048576</memory>"),
        "the persistent definition has 1 GiB: {xml}"
    );
    let mem_a1 = mem_total_kib(&a);
    assert!(
        mem_a1.abs_diff(mem_a0) < 16 * 1024,
        "without restart the running guest keeps its memory: {mem_a0} → {mem_a1} KiB"
    );
    assert_eq!(
        boot_id(&a),
        boot_a0,
        "without restart the guest did not reboot"
    );

    // --- Restart: a new QEMU, the guest boots again, now with 1 GiB, on the same address.
    let t = Instant::now();
    let (s, r) = agent
        .post(&format!("/v1/vms/{a}/restart?timeout_s=240"), json!({}))
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["data"]["status"], json!("running"), "{r}");
    assert_eq!(r["data"]["ip_address"], json!(ip_a), "{r}");
    eprintln!(
        "guest_actions power: restart answered after {:?}",
        t.elapsed()
    );
    let pid_a1 = qemu_pid(&agent, &a).await.expect("A's QEMU runs again");
    assert_ne!(pid_a1, pid_a0, "restart starts a new QEMU");
    let boot_a1 = new_boot_id(&a, &boot_a0, REBOOT).await;
    let mem_a2 = mem_total_kib(&a);
    assert!(
        mem_a2 > mem_a0 + 400 * 1024,
        "after the restart the guest has the resized RAM: {mem_a0} → {mem_a2} KiB"
    );
    assert!(
        answers_ssh(&ns, &ip_a, Duration::from_secs(300)).await,
        "A answers on {ip_a} after the restart (its new tap is filtered and allowed)"
    );
    let (_, addrs) = guest_sh(&a, "ip -4 -o addr show dev eth0");
    assert!(addrs.contains(&format!("{ip_a}/")), "{addrs}");

    // --- Reset: the same QEMU, but the guest boots again; same address.
    let (s, r) = agent.post(&format!("/v1/vms/{a}/reset"), json!({})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["data"]["status"], json!("running"), "{r}");
    let boot_a2 = new_boot_id(&a, &boot_a1, REBOOT).await;
    assert_ne!(boot_a2, boot_a0);
    assert_eq!(
        qemu_pid(&agent, &a).await,
        Some(pid_a1),
        "a reset keeps the QEMU process"
    );
    let (_, uptime) = guest_sh(&a, "cut -d' ' -f1 /proc/uptime");
    let uptime: f64 = uptime.trim().parse().unwrap();
    assert!(
        uptime < REBOOT.as_secs_f64(),
        "uptime started again: {uptime}"
    );
    assert!(
        answers_ssh(&ns, &ip_a, Duration::from_secs(300)).await,
        "A answers on {ip_a} after the reset"
    );
    // B, untouched, kept its boot.
    assert!(
        answers_ssh(&ns, &ip_b, Duration::from_secs(120)).await,
        "B answers on {ip_b}"
    );

    // --- RAM resize with `restart: true`: the guest sees it once the task is done.
    let mem_b0 = mem_total_kib(&b);
    let boot_b0 = boot_id(&b);
    let (s, resized) = agent
        .post(
            &format!("/v1/vms/{b}/resize"),
            json!({"ram_mb": 1024, "restart": true}),
        )
        .await;
    assert_eq!(s, 202, "{resized}");
    wait_task_ok(&agent, &resized, Duration::from_secs(600)).await;
    new_boot_id(&b, &boot_b0, REBOOT).await;
    let mem_b1 = mem_total_kib(&b);
    assert!(
        mem_b1 > mem_b0 + 400 * 1024,
        "the guest sees the resized RAM: {mem_b0} → {mem_b1} KiB"
    );
    assert!(
        answers_ssh(&ns, &ip_b, Duration::from_secs(300)).await,
        "B answers on {ip_b} after the resize's restart"
    );

    // --- The webhook of A's deployment was retried, then abandoned after max_age_s.
    let hits = hooks.hits();
    assert!(
        hits.len() >= 3,
        "the failing webhook was retried: {} attempts",
        hits.len()
    );
    let span = hits.last().unwrap().duration_since(hits[0]);
    eprintln!(
        "guest_actions power: webhook attempted {} times over {span:?}",
        hits.len()
    );
    assert!(
        span <= Duration::from_secs(HOOK_MAX_AGE_S + 5),
        "no attempt later than max_age_s ({HOOK_MAX_AGE_S} s) after the first: {span:?} \
         ({} attempts)",
        hits.len()
    );
    // A quiet period of at least max_age_s after the last attempt, with nothing new.
    let quiet = Duration::from_secs(HOOK_MAX_AGE_S + 15);
    let since_last = hits.last().unwrap().elapsed();
    if since_last < quiet {
        tokio::time::sleep(quiet - since_last).await;
    }
    assert_eq!(
        hooks.hits().len(),
        hits.len(),
        "no attempt after the agent gave up"
    );
    assert!(
        hits[1].duration_since(hits[0]) >= Duration::from_millis(900),
        "the retries back off"
    );
    assert!(
        agent
            .log()
            .contains("webhook abandoned after webhooks.max_age_s"),
        "the agent logs that it gave up"
    );
    assert!(!agent.log().contains(HOOK_SECRET));

    for id in [&a, &b] {
        let (s, r) = agent.delete(&format!("/v1/vms/{id}")).await;
        assert_eq!(s, 200, "{r}");
        assert!(!domain_exists(id));
    }
    assert_eq!(
        hooks.hits().len(),
        hits.len(),
        "no further attempt while the VMs were deleted"
    );
    eprintln!("guest_actions power: done after {:?}", test_start.elapsed());
}

/// The IPv6 pool of the second test's agent (apart from every other test's addresses).
fn pool6_toml(rig: &Rig) -> String {
    format!(
        "[network.pool6]\ncidr = \"fd70::/64\"\ngateway = \"{gw6}\"\n\
         first = \"fd70::3:110\"\nlast = \"fd70::3:117\"\ndns = [\"{gw6}\"]\n",
        gw6 = rig.gateway6
    )
}

async fn primary_v6(agent: &Agent, id: &str) -> String {
    let (_, detail) = agent.get(&format!("/v1/vms/{id}")).await;
    detail["data"]["ips"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == json!("primary"))
        .filter_map(|i| i["address"].as_str())
        .find(|a| a.contains(':'))
        .unwrap_or_else(|| panic!("a primary IPv6 address: {detail}"))
        .to_owned()
}

/// What the host and both guests show of a private network, for a failed check.
async fn private_diagnostics(agent: &Agent, vni: u64, guests: &[&str]) -> String {
    let mut out = String::new();
    let (_, host) = ns_sh(
        &agent.rig.netns,
        &format!(
            "echo '# ports'; bridge -d link show | grep -A2 'master hvp{vni} ' ; \
             echo '# fdb'; bridge fdb show br hvp{vni}; \
             echo '# filter'; nft list table bridge {} | head -n 200",
            agent.filter_table
        ),
    );
    out.push_str(&host);
    let (_, nets) = agent.get("/v1/private-networks").await;
    out.push_str(&format!("\n# networks: {nets}\n"));
    for id in guests {
        let seen = try_guest_sh(
            id,
            "cat /sys/class/net/eth1/address; ip -o link show eth1; ip -o addr show dev eth1; \
             ip neigh show dev eth1",
        );
        out.push_str(&format!("# guest {id}: {seen:?}\n"));
    }
    out
}

/// Every address the guest has configured, as `ip -o addr` lines.
fn guest_addrs(id: &str) -> String {
    guest_sh(id, "ip -o addr show").1
}

/// Whether the guest's addresses hold each of `want` (`addr/` or `addr/64`) on its device.
fn has_addresses(addrs: &str, want: &[(&str, String)]) -> Result<(), String> {
    for (dev, addr) in want {
        if !addrs
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(dev) && l.contains(addr.as_str()))
        {
            return Err(format!("{addr} is not on {dev}:\n{addrs}"));
        }
    }
    Ok(())
}

/// Reinstall keeps the extra address, IPv6 and the private NIC; a guest that ignores the
/// power button is powered off after `timeout_s`, beside one that shuts down; startup
/// reconciliation reports a missing and an unknown domain and changes nothing, beside the
/// configuration that removes them.
#[tokio::test(flavor = "multi_thread")]
async fn reinstall_keeps_addresses_stop_timeout_powers_off_and_reconcile_reports() {
    let test_start = Instant::now();
    let rig = Rig::load();
    let mut agent = Agent::start(
        "guest-actions-keep",
        AgentOptions {
            pool: (146, 149),
            // VNIs of its own: private bridges are named after their VNI (`hvp<vni>`) in
            // the shared rig, and other tests' agents allocate from the default range (and
            // remove "leftover" bridges in it).
            extra_toml: format!(
                "{}\n[network.private]\nvni_first = 31100\nvni_last = 31109\n",
                pool6_toml(&rig)
            ),
            ..Default::default()
        },
    );
    let ns = rig.netns.clone();
    let (c, d) = (new_id(), new_id());
    agent
        .deploy(
            vec![
                create_body(&c, "ga-gamma", "Gu3st-keep-1"),
                create_body(&d, "ga-delta", "Gu3st-keep-1"),
            ],
            BOOT,
        )
        .await;
    eprintln!(
        "guest_actions keep: deployed after {:?}",
        test_start.elapsed()
    );
    let ip_c = primary_v4(&agent, &c).await;
    let ip6_c = primary_v6(&agent, &c).await;
    assert!(ip6_c.starts_with("fd70::3:"), "{ip6_c}");

    // --- C gets an extra address and joins a private network with D.
    let (s, added) = agent.post(&format!("/v1/vms/{c}/ips"), json!({})).await;
    assert_eq!(s, 201, "{added}");
    let x = added["data"]["address"].as_str().unwrap().to_owned();
    let (s, net) = agent
        .post("/v1/private-networks", json!({"name": "ga-keep"}))
        .await;
    assert_eq!(s, 201, "{net}");
    let net_id = net["data"]["id"].as_str().unwrap().to_owned();
    let vni = net["data"]["vni"].as_u64().unwrap();
    assert_eq!(vni, 31100, "{net}");
    let mut private = Vec::new();
    for id in [&c, &d] {
        let (s, m) = agent
            .post(
                &format!("/v1/private-networks/{net_id}/attach"),
                json!({"vps_id": id}),
            )
            .await;
        assert_eq!(s, 201, "{m}");
        assert_eq!(m["data"]["adapter"], json!("eth1"), "{m}");
        private.push(m["data"]["address"].as_str().unwrap().to_owned());
    }
    let (pc, pd) = (private[0].clone(), private[1].clone());
    let want = vec![
        ("eth0", format!("{ip_c}/")),
        ("eth0", format!("{x}/")),
        ("eth0", format!("{ip6_c}/64")),
        ("eth1", format!("{pc}/")),
    ];
    // Before the reinstall, all of it is in the guest and answers (so the checks after it
    // can fail).
    let mut last = String::new();
    let ok = eventually(Duration::from_secs(60), || {
        last = guest_addrs(&c);
        has_addresses(&last, &want).is_ok()
    })
    .await;
    assert!(
        ok,
        "before the reinstall: {:?}",
        has_addresses(&last, &want)
    );
    assert!(
        answers_ssh(&ns, &x, Duration::from_secs(60)).await,
        "C answers on its extra address {x}"
    );
    let reach_private = |from: &str, to: &str| {
        let (from, to) = (from.to_owned(), to.to_owned());
        async move {
            eventually(Duration::from_secs(120), || {
                try_guest_sh(&from, &format!("ping -c 1 -W 2 {to}")).is_some_and(|r| r.0 == 0)
            })
            .await
        }
    };
    assert!(
        reach_private(&d, &pc).await,
        "D reaches C on the private network"
    );
    let (code, _) = guest_sh(&c, "echo before > /root/marker && sync");
    assert_eq!(code, 0);
    let (_, instance_before) = guest_sh(&c, "cat /var/lib/cloud/data/instance-id");

    // --- Reinstall C: a new system with every address and the private NIC configured.
    let (s, accepted) = agent
        .post(
            &format!("/v1/vms/{c}/reinstall"),
            json!({"template_id": TEMPLATE, "root_password": "Gu3st-keep-2"}),
        )
        .await;
    assert_eq!(s, 202, "{accepted}");
    let t = Instant::now();
    wait_task_ok(&agent, &accepted, BOOT).await;
    eprintln!("guest_actions keep: reinstall took {:?}", t.elapsed());
    let (code, _) = guest_sh(&c, "test -e /root/marker");
    assert_ne!(code, 0, "the reinstall replaced the system");
    let (_, instance_after) = guest_sh(&c, "cat /var/lib/cloud/data/instance-id");
    assert_ne!(instance_before.trim(), instance_after.trim());
    let ok = eventually(Duration::from_secs(120), || {
        last = guest_addrs(&c);
        has_addresses(&last, &want).is_ok()
    })
    .await;
    assert!(ok, "after the reinstall: {:?}", has_addresses(&last, &want));
    let (_, seeded) = guest_sh(
        &c,
        "cloud-init status --wait >/dev/null 2>&1; cat /etc/netplan/*.yaml \
         /etc/network/interfaces.d/* 2>/dev/null; ls /etc/systemd/network/ 2>/dev/null",
    );
    eprintln!("guest_actions keep: network config after reinstall:\n{seeded}");
    assert!(
        answers_ssh(&ns, &x, Duration::from_secs(120)).await,
        "C answers on its extra address {x} after the reinstall"
    );
    assert!(
        answers_ssh(&ns, &ip_c, Duration::from_secs(60)).await,
        "C answers on {ip_c} after the reinstall"
    );
    let reached6 = eventually(Duration::from_secs(60), || {
        ns_sh(&ns, &format!("ping -6 -c 1 -W 2 {ip6_c}")).0
    })
    .await;
    assert!(reached6, "C answers on {ip6_c} after the reinstall");
    let d_to_c = reach_private(&d, &pc).await;
    let c_to_d = reach_private(&c, &pd).await;
    if !(d_to_c && c_to_d) {
        eprintln!(
            "--- private network after the reinstall\n{}",
            private_diagnostics(&agent, vni, &[&c, &d]).await
        );
    }
    assert!(
        d_to_c,
        "D reaches C on the private network after the reinstall"
    );
    assert!(
        c_to_d,
        "C reaches D on the private network after the reinstall"
    );
    let (_, ips) = agent.get(&format!("/v1/vms/{c}/ips")).await;
    assert!(ips.to_string().contains(&x), "{ips}");

    // --- Stop with a timeout on a guest that ignores the power button: powered off after
    // the timeout. Beside it, C (which obeys) shuts down by itself.
    let (code, out) = guest_sh(
        &d,
        "mkdir -p /etc/systemd/logind.conf.d && \
         printf '[Login]\\nHandlePowerKey=ignore\\n' > /etc/systemd/logind.conf.d/ga.conf && \
         systemctl restart systemd-logind && sleep 2 && \
         busctl get-property org.freedesktop.login1 /org/freedesktop/login1 \
           org.freedesktop.login1.Manager HandlePowerKey",
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("\"ignore\""),
        "logind ignores the power key: {out}"
    );
    let timeout_s = 20u64;
    let t = Instant::now();
    let stop_path = format!("/v1/vms/{d}/stop?timeout_s={timeout_s}");
    let stop_d = agent.post(&stop_path, json!({}));
    let watch = async {
        tokio::time::sleep(Duration::from_secs(timeout_s - 5)).await;
        let d = d.clone();
        tokio::task::spawn_blocking(move || domain_state(&d))
            .await
            .unwrap()
    };
    let ((s, r), state_before_timeout) = tokio::join!(stop_d, watch);
    let took = t.elapsed();
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["data"]["status"], json!("stopped"), "{r}");
    assert_eq!(
        state_before_timeout,
        "running",
        "D still ran {} s into the stop: the agent waited for it",
        timeout_s - 5
    );
    assert!(
        took >= Duration::from_secs(timeout_s) && took < Duration::from_secs(timeout_s + 60),
        "powered off after about {timeout_s} s: {took:?}"
    );
    assert_eq!(domstate_reason(&d), "shut off (destroyed)");
    assert!(
        agent
            .log()
            .contains("guest ignored ACPI shutdown; powering off"),
        "the agent logs the fallback"
    );
    // The positive control: C obeys the power button and shuts down well before its limit.
    let limit = 300u64;
    let t = Instant::now();
    let (s, r) = agent
        .post(&format!("/v1/vms/{c}/stop?timeout_s={limit}"), json!({}))
        .await;
    let took_c = t.elapsed();
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["data"]["status"], json!("stopped"), "{r}");
    assert_eq!(
        domstate_reason(&c),
        "shut off (shutdown)",
        "C shut down by itself"
    );
    assert!(
        took_c < Duration::from_secs(limit - 10),
        "C needed no power-off: {took_c:?}"
    );
    eprintln!("guest_actions keep: D powered off after {took:?}, C shut down in {took_c:?}");

    // --- Startup reconciliation, report-only (the default): D's domain is gone behind the
    // agent's back and an hvnode domain no record knows appears; both are reported and
    // nothing is changed.
    agent.kill();
    let (ok, out) = virsh(&["undefine", "--nvram", &d]);
    assert!(ok, "{out}");
    let unknown = uuid::Uuid::new_v4();
    let unknown_dir = agent.vm_dir.join(unknown.to_string());
    std::fs::create_dir_all(&unknown_dir).unwrap();
    let xml = format!(
        "<domain type='qemu'><name>vps-{unknown}</name><uuid>{unknown}</uuid>
         <metadata><hvnode:vm xmlns:hvnode='https://hvnode.dev/xmlns/vm/1'/></metadata>
         <memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os>
         <devices><disk type='file' device='disk'><source file='{}/disk.qcow2'/>
         <target dev='vda' bus='virtio'/></disk></devices></domain>",
        unknown_dir.display()
    );
    let xml_path = agent.dir.join("unknown.xml");
    std::fs::write(&xml_path, xml).unwrap();
    let (ok, out) = virsh(&["define", xml_path.to_str().unwrap()]);
    assert!(ok, "{out}");
    agent.created.lock().unwrap().push(unknown.to_string());
    agent.start_again(Vec::new());
    let (_, node) = agent.get("/v1/node").await;
    let report = node["data"]["reconciliation"].clone();
    assert_eq!(report["missing_domains"], json!([d]), "{report}");
    // (Other agents' VMs in the shared rig are reported as unknown too; they are not in
    // this agent's vm_dir, so they are never its to remove.)
    let unknown_found = report["unknown_domains"].as_array().unwrap();
    assert!(
        unknown_found.contains(&json!(unknown.to_string())),
        "{report}"
    );
    assert!(!unknown_found.contains(&json!(c)), "{report}");
    assert_eq!(report["removed"], json!([]), "report-only: {report}");
    let (s, kept) = agent.get(&format!("/v1/vms/{d}")).await;
    assert_eq!(s, 200, "D's record is kept: {kept}");
    assert!(
        agent.vm_dir.join(&d).join("disk.qcow2").exists(),
        "D's disk is kept"
    );
    let (_, nets) = agent.get("/v1/private-networks").await;
    assert!(
        nets.to_string().contains(&pd),
        "D's membership is kept: {nets}"
    );
    assert!(
        domain_exists(&unknown.to_string()),
        "the unknown domain is kept"
    );
    assert!(
        unknown_dir.exists(),
        "the unknown domain's directory is kept"
    );
    assert!(domain_exists(&c), "C is untouched");

    // The same findings with the removals configured: both go, and C stays.
    agent.kill();
    agent.start_again(vec![
        (
            "HVNODE_RECONCILE__REMOVE_UNKNOWN_DOMAINS".into(),
            "true".into(),
        ),
        (
            "HVNODE_RECONCILE__REMOVE_ORPHAN_RECORDS".into(),
            "true".into(),
        ),
    ]);
    let (_, node) = agent.get("/v1/node").await;
    let report = node["data"]["reconciliation"].clone();
    assert_eq!(report["missing_domains"], json!([d]), "{report}");
    let removed = report["removed"].as_array().cloned().unwrap_or_default();
    assert!(removed.contains(&json!(d)), "{report}");
    assert!(removed.contains(&json!(unknown.to_string())), "{report}");
    assert_eq!(removed.len(), 2, "nothing else is removed: {report}");
    let (s, _) = agent.get(&format!("/v1/vms/{d}")).await;
    assert_eq!(s, 404, "D's record is removed");
    assert!(!agent.vm_dir.join(&d).exists(), "D's files are removed");
    assert!(!domain_exists(&unknown.to_string()));
    assert!(!unknown_dir.exists());
    let (_, nets) = agent.get("/v1/private-networks").await;
    assert!(
        !nets.to_string().contains(&pd),
        "D's membership went with its record: {nets}"
    );
    let (s, kept) = agent.get(&format!("/v1/vms/{c}")).await;
    assert_eq!(s, 200, "C is kept: {kept}");
    assert!(domain_exists(&c));

    let (s, r) = agent.delete(&format!("/v1/vms/{c}")).await;
    assert_eq!(s, 200, "{r}");
    assert!(!domain_exists(&c));
    let (s, r) = agent
        .delete(&format!("/v1/private-networks/{net_id}"))
        .await;
    assert_eq!(s, 200, "the network has no member left: {r}");
    eprintln!("guest_actions keep: done after {:?}", test_start.elapsed());
}
