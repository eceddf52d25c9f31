//! Live status, its stream, `/metrics`, and consoles on a real guest: the status of a
//! booting VM, suspend and resume, a stream that ends when the VM is deleted, a VNC
//! handshake and a framebuffer update through the WebSocket proxy, the serial console's
//! login prompt, tickets refused before the upgrade, and headless Chromium showing the
//! guest's screen through noVNC.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(1500);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ws_url(agent: &Agent, path: &str) -> String {
    format!("{}{path}", agent.url.replacen("http", "ws", 1))
}

async fn connect(url: &str, token: Option<&str>) -> Result<Ws, WsError> {
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    if token.is_none() {
        // Consoles: as noVNC does, offer the "binary" subprotocol.
        req.headers_mut()
            .insert("sec-websocket-protocol", "binary".parse().unwrap());
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

/// Refused before the upgrade: the HTTP answer's status and error code.
async fn refused(url: &str) -> (u16, String) {
    match connect(url, None).await {
        Ok(_) => panic!("{url}: upgraded, but should have been refused"),
        Err(WsError::Http(resp)) => {
            let body: Value = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            (
                resp.status().as_u16(),
                body["error_code"].as_str().unwrap_or("").to_owned(),
            )
        }
        Err(e) => panic!("{url}: {e}"),
    }
}

async fn ticket(agent: &Agent, id: &str, kind: &str, ttl: Option<u64>) -> Value {
    let mut body = json!({"type": kind});
    if let Some(t) = ttl {
        body["ttl_seconds"] = json!(t);
    }
    let (s, r) = agent.post(&format!("/v1/vms/{id}/console"), body).await;
    assert_eq!(s, 200, "{r}");
    r["data"].clone()
}

/// Reads WebSocket payloads into `buf` until it holds `n` bytes; returns them.
async fn read_exact(ws: &mut Ws, buf: &mut Vec<u8>, n: usize) -> Vec<u8> {
    while buf.len() < n {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("console data within 30 s")
            .expect("console open")
            .expect("console message");
        match msg {
            Message::Binary(b) => buf.extend_from_slice(&b),
            Message::Text(t) => buf.extend_from_slice(t.as_bytes()),
            Message::Close(c) => panic!("console closed early: {c:?}"),
            _ => {}
        }
    }
    buf.drain(..n).collect()
}

async fn status(agent: &Agent, id: &str) -> Value {
    let (s, r) = agent.get(&format!("/v1/vms/{id}/status")).await;
    assert_eq!(s, 200, "{r}");
    r["data"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_stream_metrics_and_consoles_on_a_real_guest() {
    let agent = Agent::start(
        "console",
        AgentOptions {
            pool: (170, 171),
            ..Default::default()
        },
    );
    let id = new_id();
    let (s, r) = agent
        .create(create_body(&id, "console-1", "Console-pass-1"))
        .await;
    assert_eq!(s, 202, "{r}");

    // --- status of a booting VM: QEMU runs, burns CPU and reads its disk.
    let deadline = Instant::now() + Duration::from_secs(300);
    let first = loop {
        let st = status(&agent, &id).await;
        if st["qmpstatus"] == json!("running")
            && st["cpu"]["usage_percent"].as_f64().unwrap_or(0.0) > 0.0
            && st["disk"]["read_bytes"].as_u64().unwrap_or(0) > 0
        {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "booting VM never showed as running: {st}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for key in [
        "vps_id",
        "name",
        "status",
        "qmpstatus",
        "cpu",
        "memory",
        "disk",
        "network",
        "uptime_seconds",
        "pid",
    ] {
        assert!(first.get(key).is_some(), "status has {key}: {first}");
    }
    assert_eq!(first["cpu"]["cores"], json!(1));
    assert!(first["pid"].as_u64().is_some(), "{first}");
    assert!(
        first["memory"]["total_bytes"].as_u64().unwrap() > 0,
        "{first}"
    );
    let reads = first["disk"]["read_bytes"].as_u64().unwrap();
    let mut grew = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if status(&agent, &id).await["disk"]["read_bytes"]
            .as_u64()
            .unwrap()
            > reads
        {
            grew = true;
            break;
        }
    }
    assert!(grew, "disk reads grow while the guest boots");

    // --- the stream: at least 5 documents in 6 s at 1000 ms.
    let mut stream = connect(
        &ws_url(
            &agent,
            &format!("/v1/vms/{id}/status/stream?interval_ms=1000"),
        ),
        Some(&agent.token),
    )
    .await
    .expect("status stream");
    let start = Instant::now();
    let mut docs = 0;
    while start.elapsed() < Duration::from_secs(6) {
        let left = Duration::from_secs(6).saturating_sub(start.elapsed());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let doc: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(doc["vps_id"], json!(id));
                docs += 1;
            }
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("stream ended: {other:?}"),
            Err(_) => break,
        }
    }
    assert!(docs >= 5, "{docs} documents in 6 s");
    drop(stream);
    let (s, r) = agent
        .get(&format!("/v1/vms/{id}/status/stream?interval_ms=50"))
        .await;
    assert_eq!((s, r["error_code"].clone()), (400, json!("INVALID_JSON")));
    let (s, r) = agent.get(&format!("/v1/vms/{id}/status/stream")).await;
    assert_eq!(
        (s, r["error_code"].clone()),
        (426, json!("WEBSOCKET_REQUIRED"))
    );

    // --- tickets refused before any upgrade.
    let ws_base = ws_url(&agent, "/v1/console/ws");
    assert_eq!(
        refused(&format!("{ws_base}?ticket={}", "0".repeat(64))).await,
        (403, "INVALID_TICKET".into())
    );
    assert_eq!(refused(&ws_base).await, (403, "INVALID_TICKET".into()));
    let short = ticket(&agent, &id, "novnc", Some(1)).await;
    let wrong_vm = ticket(&agent, &id, "novnc", None).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        refused(short["websocket_url"].as_str().unwrap()).await,
        (403, "INVALID_TICKET".into()),
        "expired"
    );
    assert_eq!(
        refused(&format!(
            "{}&vps_id={}",
            wrong_vm["websocket_url"].as_str().unwrap(),
            new_id()
        ))
        .await,
        (403, "INVALID_TICKET".into()),
        "another VM's ticket"
    );
    let (s, r) = agent
        .post(&format!("/v1/vms/{id}/console"), json!({"type": "spice"}))
        .await;
    assert_eq!(
        (s, r["error_code"].clone()),
        (400, json!("INVALID_JSON")),
        "{r}"
    );
    let (s, r) = agent
        .post(
            &format!("/v1/vms/{id}/console"),
            json!({"type": "novnc", "ttl_seconds": 301}),
        )
        .await;
    assert_eq!(s, 400, "{r}");
    let (s, r) = agent
        .post(
            &format!("/v1/vms/{}/console", new_id()),
            json!({"type": "novnc"}),
        )
        .await;
    assert_eq!((s, r["error_code"].clone()), (404, json!("VPS_NOT_FOUND")));

    // --- VNC through the proxy: RFB banner, handshake, a framebuffer update.
    let t = ticket(&agent, &id, "novnc", None).await;
    assert_eq!(t["type"], json!("novnc"));
    assert!(t["ticket"].as_str().unwrap().len() >= 32);
    let url = t["websocket_url"].as_str().unwrap().to_owned();
    let mut vnc = connect(&url, None).await.expect("VNC WebSocket");
    let mut buf = Vec::new();
    let banner = read_exact(&mut vnc, &mut buf, 12).await;
    assert_eq!(&banner, b"RFB 003.008\n");
    vnc.send(Message::Binary(b"RFB 003.008\n".to_vec().into()))
        .await
        .unwrap();
    let n = read_exact(&mut vnc, &mut buf, 1).await[0] as usize;
    assert!(n > 0, "the server offers security types");
    let types = read_exact(&mut vnc, &mut buf, n).await;
    assert!(types.contains(&1), "security type None: {types:?}");
    vnc.send(Message::Binary(vec![1u8].into())).await.unwrap();
    assert_eq!(read_exact(&mut vnc, &mut buf, 4).await, vec![0, 0, 0, 0]);
    vnc.send(Message::Binary(vec![1u8].into())).await.unwrap(); // ClientInit, shared
    let init = read_exact(&mut vnc, &mut buf, 24).await;
    let (w, h) = (
        u16::from_be_bytes([init[0], init[1]]),
        u16::from_be_bytes([init[2], init[3]]),
    );
    assert!(w > 0 && h > 0, "framebuffer {w}x{h}");
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
    read_exact(&mut vnc, &mut buf, name_len).await;
    let mut req = vec![3u8, 0, 0, 0, 0, 0];
    req.extend_from_slice(&w.to_be_bytes());
    req.extend_from_slice(&h.to_be_bytes());
    vnc.send(Message::Binary(req.into())).await.unwrap();
    let kind = read_exact(&mut vnc, &mut buf, 1).await[0];
    assert_eq!(kind, 0, "a FramebufferUpdate message");
    drop(vnc);
    assert_eq!(
        refused(&url).await,
        (403, "INVALID_TICKET".into()),
        "reused"
    );

    // --- the guest finishes booting; its serial console shows a login prompt.
    let (doc, _) = agent.wait_deployment(&id, BOOT).await;
    assert_eq!(doc["deployment_status"], json!("completed"), "{doc}");
    let t = ticket(&agent, &id, "serial", None).await;
    let mut serial = connect(t["websocket_url"].as_str().unwrap(), None)
        .await
        .expect("serial WebSocket");
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut next_newline = Instant::now();
    while !seen.contains("login:") {
        assert!(
            Instant::now() < deadline,
            "no login prompt on the serial console: {seen}"
        );
        if Instant::now() >= next_newline {
            serial.send(Message::Text("\r".into())).await.unwrap();
            next_newline = Instant::now() + Duration::from_secs(5);
        }
        if let Ok(Some(Ok(Message::Binary(b)))) =
            tokio::time::timeout(Duration::from_secs(1), serial.next()).await
        {
            seen.push_str(&String::from_utf8_lossy(&b));
        }
    }
    drop(serial);

    // --- a browser: noVNC shows the guest's screen.
    let t = ticket(&agent, &id, "novnc", None).await;
    let shot = browser_screenshot(&agent, t["console_url"].as_str().unwrap()).await;
    std::fs::write(agent.dir.join("console.png"), &shot.png).unwrap();
    assert!(
        shot.state == "connected" && shot.bright_pixels > 200,
        "noVNC connected and its canvas shows the guest's screen ({} bright pixels, state {})",
        shot.bright_pixels,
        shot.state
    );

    // --- metrics.
    let text = reqwest::Client::new()
        .get(format!("{}/metrics", agent.url))
        .bearer_auth(&agent.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        format!("hvnode_vm_cpu_seconds_total{{vm=\"{id}\""),
        format!("hvnode_vm_disk_read_bytes_total{{vm=\"{id}\""),
        "hvnode_sampler_duration_seconds ".to_string(),
        "hvnode_api_requests_total{route=\"/v1/vms/{id}/status\",method=\"GET\",status=\"200\"}"
            .to_string(),
        "hvnode_tasks{state=\"completed\"}".to_string(),
    ] {
        assert!(text.contains(&needle), "/metrics has {needle}");
    }
    let (s, _) = reqwest::Client::new()
        .get(format!("{}/metrics", agent.url))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(s, 401, "/metrics needs the token");

    // --- suspend: QEMU says paused.
    let (s, r) = agent
        .post(&format!("/v1/vms/{id}/suspend"), json!({}))
        .await;
    assert_eq!(s, 200, "{r}");
    let st = status(&agent, &id).await;
    assert_eq!(st["qmpstatus"], json!("paused"), "{st}");
    let (s, r) = agent.post(&format!("/v1/vms/{id}/resume"), json!({})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(status(&agent, &id).await["qmpstatus"], json!("running"));

    // --- the stream ends when the VM is deleted.
    let mut stream = connect(
        &ws_url(
            &agent,
            &format!("/v1/vms/{id}/status/stream?interval_ms=500"),
        ),
        Some(&agent.token),
    )
    .await
    .expect("status stream");
    let (s, r) = agent.delete(&format!("/v1/vms/{id}")).await;
    assert_eq!(s, 200, "{r}");
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(Ok(m)) = stream.next().await {
            if let Message::Close(c) = m {
                return c.map(|c| c.reason.to_string());
            }
        }
        None
    })
    .await
    .expect("the stream ends within 15 s of the delete");
    assert_eq!(closed.as_deref(), Some("deleted"));
}

struct Shot {
    png: Vec<u8>,
    bright_pixels: usize,
    state: String,
}

/// Opens `url` in headless Chromium and takes screenshots over the DevTools protocol until
/// noVNC's canvas shows something, or 90 s pass. Counts bright pixels below noVNC's bar.
async fn browser_screenshot(agent: &Agent, url: &str) -> Shot {
    let profile = agent.dir.join("chromium");
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
            "--window-size=1024,800",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium (apt install chromium)");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("DevTools listening on ").nth(1) {
                let _ = tx.send(rest.trim().to_owned());
            }
        }
    });
    let browser_ws = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("chromium's DevTools endpoint");
    let port = browser_ws
        .trim_start_matches("ws://127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut page_ws = None;
    for _ in 0..50 {
        let list: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        page_ws = list
            .as_array()
            .and_then(|a| a.iter().find(|t| t["type"] == json!("page")))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .map(str::to_owned);
        if page_ws.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut cdp, _) = tokio_tungstenite::connect_async(page_ws.expect("a page target"))
        .await
        .unwrap();
    let mut next_id = 0u64;
    let mut call = |method: &str, params: Value| {
        next_id += 1;
        (
            next_id,
            json!({"id": next_id, "method": method, "params": params}).to_string(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = Shot {
        png: Vec::new(),
        bright_pixels: 0,
        state: String::new(),
    };
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (sid, state_req) = call(
            "Runtime.evaluate",
            json!({"expression": "document.body.dataset.state", "returnByValue": true}),
        );
        let (pid, shot_req) = call("Page.captureScreenshot", json!({"format": "png"}));
        cdp.send(Message::Text(state_req.into())).await.unwrap();
        cdp.send(Message::Text(shot_req.into())).await.unwrap();
        let mut got = 0;
        while got < 2 {
            let reply = tokio::time::timeout(Duration::from_secs(30), cdp.next())
                .await
                .expect("DevTools answers within 30 s");
            let Some(Ok(Message::Text(t))) = reply else {
                panic!("DevTools connection ended")
            };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == json!(sid) {
                last.state = v["result"]["result"]["value"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                got += 1;
            } else if v["id"] == json!(pid) {
                use base64::Engine;
                last.png = base64::engine::general_purpose::STANDARD
                    .decode(v["result"]["data"].as_str().unwrap_or(""))
                    .unwrap_or_default();
                last.bright_pixels = bright_pixels_below(&last.png, 30);
                got += 1;
            }
        }
        if last.state == "connected" && last.bright_pixels > 200 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    last
}

/// Pixels brighter than mid-grey below row `top` (the guest's text on its dark screen).
fn bright_pixels_below(png_bytes: &[u8], top: u32) -> usize {
    let Ok(mut reader) = png::Decoder::new(std::io::Cursor::new(png_bytes)).read_info() else {
        return 0;
    };
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let Ok(info) = reader.next_frame(&mut buf) else {
        return 0;
    };
    let channels = info.color_type.samples();
    let mut n = 0;
    for y in top..info.height {
        for x in 0..info.width {
            let i = ((y * info.width + x) as usize) * channels;
            let lum = (u32::from(buf[i]) + u32::from(buf[i + 1]) + u32::from(buf[i + 2])) / 3;
            if lum > 128 {
                n += 1;
            }
        }
    }
    n
}
