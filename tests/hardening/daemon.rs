//! The agent as systemd and a local admin meet it: the notify protocol (ready, watchdog,
//! stopping) spoken to a real `NOTIFY_SOCKET`, the admin socket's mode and peer check, and
//! `hvnode ctl` over it.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Collects notify messages until `want` has been seen or the timeout passes.
fn wait_for(sock: &UnixDatagram, want: &str, timeout: Duration, seen: &mut Vec<String>) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return true;
            }
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_watchdog_and_stopping_and_the_admin_socket_is_guarded() {
    let rig = Rig::load();
    let dir = rig
        .root
        .join("e2e")
        .join(format!("notify-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut agent = Agent::start(
        "daemon",
        AgentOptions {
            pool: (192, 193),
            env: vec![
                ("NOTIFY_SOCKET".into(), notify_path.display().to_string()),
                // 2 s: the agent must ping at least once a second.
                ("WATCHDOG_USEC".into(), "2000000".into()),
            ],
            ..Default::default()
        },
    );
    let mut seen = Vec::new();
    assert!(
        wait_for(&notify, "READY=1", Duration::from_secs(10), &mut seen),
        "READY=1 after startup: {seen:?}"
    );
    for _ in 0..3 {
        assert!(
            wait_for(
                &notify,
                "WATCHDOG=1",
                Duration::from_millis(1500),
                &mut seen
            ),
            "the watchdog is pinged within its interval: {seen:?}"
        );
    }

    // The admin socket: 0660, root (or the admin group) only, checked by peer credentials.
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "socket mode");
    let sock = agent.socket.display().to_string();
    let (ok, out) = sh(&format!("curl -s --unix-socket {sock} http://agent/v1/vms"));
    assert!(
        ok && out.contains("\"success\":true"),
        "root is served without a token: {out}"
    );
    let (ok, out) = sh(&format!(
        "{} ctl --socket {sock} vms",
        agent_binary().display()
    ));
    assert!(ok, "hvnode ctl vms: {out}");
    let as_nobody = format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups curl -s --unix-socket {sock} \
         http://agent/v1/vms"
    );
    let (_, out) = sh(&as_nobody);
    assert!(
        !out.contains("\"success\":true"),
        "nobody cannot connect: {out}"
    );
    // Even with the file mode opened up, the peer check refuses another user.
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(&agent.dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let (_, out) = sh(&as_nobody);
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o660)).unwrap();
    assert!(
        out.contains("\"success\":false") && !out.contains("\"instances\""),
        "the peer check refuses uid 65534: {out}"
    );

    let status = agent.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(
        wait_for(&notify, "STOPPING=1", Duration::from_secs(5), &mut seen),
        "STOPPING=1 on SIGTERM: {seen:?}"
    );
    assert!(!agent.socket.exists(), "the socket is removed on exit");
    let _ = std::fs::remove_dir_all(&dir);
}
