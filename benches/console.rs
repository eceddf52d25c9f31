//! The console proxy against websockify (Debian's `websockify`, the reference proxy), on
//! the same byte source and the same client, in the same run.
//!
//!   cargo bench --bench console            (needs `websockify` on PATH; no root)
//!
//! The source is a TCP server on loopback standing in for a VNC server: a connection that
//! starts with `B` receives `BULK_MIB` MiB as fast as the socket takes them; one that
//! starts with `E` gets every byte echoed. hvnode's side is the agent's own proxy loop
//! (`console::proxy::pump_io`, the code that carries RFB from libvirt's graphics fd) behind
//! an axum WebSocket route; websockify forwards to the same source. The client is one
//! tokio-tungstenite program for both. Each proxy runs in its own process (hvnode's is
//! this bench binary started again with `--proxy-child`), so the CPU time each one spends
//! is read from /proc and reported per GiB carried: on a small machine the one client
//! bounds both proxies' throughput, and CPU per byte shows what each costs. Reported: bulk
//! throughput (median of 5 streams), CPU seconds per GiB, and round-trip latency of 2000
//! small echoes (p50, p99), with the source's own direct TCP round trip as the floor both
//! add to.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

const BULK_MIB: usize = 256;
const STREAMS: usize = 5;
const ECHOES: usize = 2000;
const ECHO_BYTES: usize = 32;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Some(i) = args.iter().position(|a| a == "--proxy-child") {
        let target: SocketAddr = args[i + 1].parse().unwrap();
        rt.block_on(async move {
            let addr = hvnode_proxy(target).await;
            println!("{addr}");
            std::future::pending::<()>().await
        });
        return;
    }
    rt.block_on(run());
}

/// CPU seconds (user + system) a process and its reaped children have used, from /proc.
/// websockify forks a process per connection; it counts once that child has exited.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11..15].iter().map(|v| v.parse::<f64>().unwrap()).sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The agent's proxy in its own process: this binary again, with `--proxy-child`.
fn hvnode_child(target: SocketAddr) -> (Websockify, SocketAddr) {
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--proxy-child")
        .arg(target.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Websockify(child), line.trim().parse().unwrap())
}

async fn source() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut mode = [0u8; 1];
                if s.read_exact(&mut mode).await.is_err() {
                    return;
                }
                if mode[0] == b'B' {
                    let chunk = vec![0x5au8; 64 * 1024];
                    for _ in 0..BULK_MIB * 16 {
                        if s.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                    // Stay open until the client goes: websockify drops what it still
                    // buffers when its target closes, and a VNC server does not hang up
                    // after a framebuffer update either.
                    let _ = s.read(&mut mode).await;
                } else {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn hvnode_proxy(target: SocketAddr) -> SocketAddr {
    async fn upgrade(
        State(target): State<SocketAddr>,
        ws: WebSocketUpgrade,
    ) -> axum::response::Response {
        ws.protocols(["binary"])
            .on_upgrade(move |socket| async move {
                let tcp = TcpStream::connect(target).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                hvnode::console::proxy::pump_io(socket, tcp).await;
            })
    }
    let app = axum::Router::new()
        .route("/", get(upgrade))
        .with_state(target);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

struct Websockify(Child);

impl Drop for Websockify {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn websockify(target: SocketAddr) -> (Websockify, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("websockify")
        .arg(format!("127.0.0.1:{port}"))
        .arg(target.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("websockify (apt install websockify)");
    let child = Websockify(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return (child, addr);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("websockify did not listen");
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn open(proxy: SocketAddr) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{proxy}/").into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "binary".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws
}

/// MiB/s of one bulk stream through `proxy`.
async fn bulk(who: &str, proxy: SocketAddr) -> f64 {
    let mut ws = open(proxy).await;
    ws.send(Message::Binary(b"B".to_vec().into()))
        .await
        .unwrap();
    let want = BULK_MIB * 1024 * 1024;
    let mut got = 0;
    let start = Instant::now();
    while got < want {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => got += b.len(),
            Some(Ok(_)) => {}
            other => panic!("{who}: bulk stream ended after {got} bytes: {other:?}"),
        }
    }
    BULK_MIB as f64 / start.elapsed().as_secs_f64()
}

/// Round trips of small echoes through `proxy`, sorted, in microseconds.
async fn echo_ws(proxy: SocketAddr) -> Vec<f64> {
    let mut ws = open(proxy).await;
    ws.send(Message::Binary(b"E".to_vec().into()))
        .await
        .unwrap();
    let payload = vec![7u8; ECHO_BYTES];
    let mut out = Vec::with_capacity(ECHOES);
    for _ in 0..ECHOES {
        let t = Instant::now();
        ws.send(Message::Binary(payload.clone().into()))
            .await
            .unwrap();
        let mut got = 0;
        while got < ECHO_BYTES {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => got += b.len(),
                Some(Ok(_)) => {}
                other => panic!("echo ended: {other:?}"),
            }
        }
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(f64::total_cmp);
    out
}

async fn echo_direct(target: SocketAddr) -> Vec<f64> {
    let mut s = TcpStream::connect(target).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"E").await.unwrap();
    let payload = vec![7u8; ECHO_BYTES];
    let mut buf = vec![0u8; ECHO_BYTES];
    let mut out = Vec::with_capacity(ECHOES);
    for _ in 0..ECHOES {
        let t = Instant::now();
        s.write_all(&payload).await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(f64::total_cmp);
    out
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn run() {
    let target = source().await;
    let (ours_child, ours) = hvnode_child(target);
    let (theirs_child, theirs) = websockify(target);
    let (ours_pid, theirs_pid) = (ours_child.0.id(), theirs_child.0.id());

    // Warm both up, then interleave so both see the same machine.
    bulk("hvnode", ours).await;
    bulk("websockify", theirs).await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let (mut cpu_a, mut cpu_b) = (0.0, 0.0);
    for _ in 0..STREAMS {
        let c = cpu_seconds(ours_pid);
        a.push(bulk("hvnode", ours).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        cpu_a += cpu_seconds(ours_pid) - c;
        let c = cpu_seconds(theirs_pid);
        b.push(bulk("websockify", theirs).await);
        // Let websockify reap the connection's process so its CPU time counts.
        tokio::time::sleep(Duration::from_millis(300)).await;
        cpu_b += cpu_seconds(theirs_pid) - c;
    }
    let gib = (STREAMS * BULK_MIB) as f64 / 1024.0;
    let (per_a, per_b) = (cpu_a / gib, cpu_b / gib);
    let (ta, tb) = (median(a), median(b));
    // Three interleaved rounds each, pooled.
    let (mut direct, mut ea, mut eb) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        direct.extend(echo_direct(target).await);
        ea.extend(echo_ws(ours).await);
        eb.extend(echo_ws(theirs).await);
    }
    for v in [&mut direct, &mut ea, &mut eb] {
        v.sort_by(f64::total_cmp);
    }

    println!("console proxy: {BULK_MIB} MiB bulk streams (median of {STREAMS}), 3 x {ECHOES} echoes of {ECHO_BYTES} B");
    println!(
        "  throughput  hvnode {ta:8.1} MiB/s   websockify {tb:8.1} MiB/s   ratio {:.2}x",
        ta / tb
    );
    println!(
        "  proxy CPU   hvnode {per_a:8.3} s/GiB   websockify {per_b:8.3} s/GiB   ratio {:.2}x (GiB per CPU-second: {:.2} vs {:.2})",
        per_b / per_a,
        1.0 / per_a,
        1.0 / per_b
    );
    println!(
        "  round trip  direct TCP p50 {:6.1} us  p99 {:6.1} us",
        pct(&direct, 0.5),
        pct(&direct, 0.99)
    );
    for (name, e) in [("hvnode", &ea), ("websockify", &eb)] {
        println!(
            "  round trip  {name:<10} p50 {:6.1} us  p99 {:6.1} us   added p50 {:6.1} us  p99 {:6.1} us",
            pct(e, 0.5),
            pct(e, 0.99),
            pct(e, 0.5) - pct(&direct, 0.5),
            pct(e, 0.99) - pct(&direct, 0.99)
        );
    }
    println!(
        "  p99 ratio websockify/hvnode {:.2}x",
        pct(&eb, 0.99) / pct(&ea, 0.99)
    );
}
