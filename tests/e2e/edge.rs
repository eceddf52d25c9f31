//! The listener under clients that do not play fair, on a real agent process: a header
//! trickled byte by byte, a connection left idle, a body that never ends, one address
//! holding every connection it may, a flood of unauthenticated health checks. Each
//! refusal stands beside the same request succeeding over the same kind of connection.
//! No guest is needed: this runs beside the slow tests.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::*;

const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const BODY_TIMEOUT: Duration = Duration::from_secs(2);
const PER_PEER: usize = 4;
const TOTAL: usize = 10;

fn limits_env() -> Vec<(String, String)> {
    vec![
        ("HVNODE_API__HEADER_TIMEOUT_MS".into(), "2000".into()),
        ("HVNODE_API__BODY_TIMEOUT_MS".into(), "2000".into()),
        (
            "HVNODE_API__MAX_CONNECTIONS_PER_PEER".into(),
            PER_PEER.to_string(),
        ),
        ("HVNODE_API__MAX_CONNECTIONS".into(), TOTAL.to_string()),
    ]
}

fn addr(agent: &Agent) -> SocketAddr {
    agent.url.trim_start_matches("http://").parse().unwrap()
}

/// A TCP connection to the agent from `source` (any address of 127/8).
async fn connect_from(agent: &Agent, source: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), socket.connect(addr(agent)))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Reads until the peer closes or `limit` passes; returns what arrived and whether the
/// connection was closed (EOF or reset) within the limit.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
            Ok(Ok(0)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&got).into_owned(), true)
            }
            Ok(Err(e)) => panic!("read: {e}"),
        }
    }
}

/// One complete `GET /v1/health` on `s` (keep-alive); returns the status line.
async fn health_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: agent\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 8192];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    // The answer is small and its body follows the head at once.
    while !String::from_utf8_lossy(&got).contains("\"uptime_seconds\"") {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, s.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_idle_and_greedy_clients_are_cut_off_while_others_are_served() {
    let agent = Agent::start(
        "edge",
        AgentOptions {
            pool: (241, 241),
            env: limits_env(),
            ..Default::default()
        },
    );

    // A complete request on a fresh connection is answered (the control for every cut
    // below).
    let mut s = connect_from(&agent, "127.0.0.1").await;
    assert_eq!(health_on(&mut s).await, "HTTP/1.1 200 OK");

    // The same connection, left idle after its answer, is closed after the header timeout.
    let idle_from = Instant::now();
    let (_, closed) = read_until_closed(&mut s, HEADER_TIMEOUT * 4).await;
    assert!(closed, "an idle keep-alive connection is closed");
    assert!(
        idle_from.elapsed() >= HEADER_TIMEOUT / 2,
        "not before its time: {:?}",
        idle_from.elapsed()
    );

    // A header trickled a byte at a time is cut off, though every byte comes well within
    // the timeout of the one before; the same header sent whole is answered.
    let mut s = connect_from(&agent, "127.0.0.1").await;
    let started = Instant::now();
    let header =
        b"GET /v1/health HTTP/1.1\r\nHost: agent\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut = false;
    for b in header.iter() {
        if s.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if started.elapsed() > HEADER_TIMEOUT * 3 {
            break;
        }
    }
    let (answer, closed) = read_until_closed(&mut s, HEADER_TIMEOUT * 2).await;
    assert!(
        cut || (closed && !answer.contains("200 OK")),
        "a trickled header is cut off (answer {answer:?} after {:?})",
        started.elapsed()
    );
    assert!(started.elapsed() < HEADER_TIMEOUT * 4);
    let mut s = connect_from(&agent, "127.0.0.1").await;
    s.write_all(header).await.unwrap();
    let (answer, _) = read_until_closed(&mut s, Duration::from_millis(1500)).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");

    // A body that stops arriving is answered 408 in the envelope once its time is up; the
    // same body sent whole is read (and refused for what it says).
    let mut s = connect_from(&agent, "127.0.0.1").await;
    let head = format!(
        "POST /v1/vms HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"id\":",
        agent.token
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (answer, _) = read_until_closed(&mut s, BODY_TIMEOUT * 4).await;
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "a stalled body is answered 408: {answer:?} after {:?}",
        started.elapsed()
    );
    assert!(answer.contains("\"REQUEST_TIMEOUT\""), "{answer}");
    let (s_code, body) = agent.post("/v1/vms", json!({"id": "x"})).await;
    assert_eq!(s_code, 400, "a whole body is read: {body}");

    // One address holding all the connections it may: its next one is refused, while the
    // control plane, from another address, is served; and once the greedy peer lets one
    // go, it gets one again.
    let mut held = Vec::new();
    for _ in 0..PER_PEER {
        let mut c = connect_from(&agent, "127.0.0.2").await;
        // Start a request so each connection is busy, not merely accepted.
        c.write_all(b"GET /v1/health HTTP/1.1\r\nHost: a")
            .await
            .unwrap();
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = connect_from(&agent, "127.0.0.2").await;
    let _ = extra
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: agent\r\n\r\n")
        .await;
    let (answer, closed) = read_until_closed(&mut extra, Duration::from_secs(1)).await;
    assert!(
        closed && answer.is_empty(),
        "connection {} from one address is refused: {answer:?}",
        PER_PEER + 1
    );
    let mut other = connect_from(&agent, "127.0.0.1").await;
    assert_eq!(health_on(&mut other).await, "HTTP/1.1 200 OK");
    drop(other);
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from(&agent, "127.0.0.2").await;
    assert_eq!(health_on(&mut again).await, "HTTP/1.1 200 OK");
    drop(again);
    drop(held);

    // Many addresses together may not exceed the total.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut crowd = Vec::new();
    for i in 0..TOTAL {
        let mut c = connect_from(&agent, &format!("127.0.1.{}", 10 + i / 2)).await;
        c.write_all(b"GET /v1/health HTTP/1.1\r\nHost: a")
            .await
            .unwrap();
        crowd.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut late = connect_from(&agent, "127.0.0.1").await;
    let _ = late
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: agent\r\n\r\n")
        .await;
    let (answer, closed) = read_until_closed(&mut late, Duration::from_secs(1)).await;
    assert!(closed && answer.is_empty(), "beyond the total: {answer:?}");
    drop(crowd);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut after = connect_from(&agent, "127.0.0.1").await;
    assert_eq!(health_on(&mut after).await, "HTTP/1.1 200 OK");
}

/// A stand-in for libvirtd's socket that counts the connections made to it and closes
/// each at once: the agent sees libvirt as unreachable.
struct CountingSocket {
    path: std::path::PathBuf,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingSocket {
    fn start(dir: &std::path::Path) -> CountingSocket {
        let path = dir.join("libvirt-sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = count.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(s);
            }
        });
        CountingSocket { path, count }
    }

    fn connections(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_without_a_token_neither_calls_libvirt_nor_names_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let fake = CountingSocket::start(dir.path());
    let uri = format!("qemu+unix:///system?socket={}", fake.path.display());
    let agent = Agent::start(
        "edge-health",
        AgentOptions {
            pool: (242, 242),
            env: vec![("HVNODE_LIBVIRT__URI".into(), uri.clone())],
            ..Default::default()
        },
    );
    let client = reqwest::Client::new();
    let health = |token: Option<String>| {
        let (client, url) = (client.clone(), format!("{}/v1/health", agent.url));
        async move {
            let mut req = client.get(url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };

    // Unreachable libvirt is reported, without a token too.
    let open = health(None).await;
    assert_eq!(open["data"]["status"], json!("degraded"), "{open}");
    assert_eq!(open["data"]["libvirt"]["connected"], json!(false), "{open}");
    assert!(
        !open.to_string().contains("libvirt-sock") && open["data"]["libvirt"]["uri"].is_null(),
        "no host detail without a token: {open}"
    );
    // With the token, the operator sees where the agent looks for libvirt.
    let full = health(Some(agent.token.clone())).await;
    assert_eq!(full["data"]["libvirt"]["uri"], json!(uri), "{full}");

    // A flood of health checks costs libvirt nothing: the answer comes from the state a
    // background check keeps.
    let before = fake.connections();
    for _ in 0..200 {
        health(None).await;
    }
    let during = fake.connections() - before;
    assert!(
        during <= 40,
        "200 health checks made {during} connection attempts to libvirt"
    );
    // The background check itself does keep trying (the control for the count above).
    assert!(
        eventually(Duration::from_secs(15), || fake.connections() > before).await,
        "the agent keeps checking libvirt"
    );
}
