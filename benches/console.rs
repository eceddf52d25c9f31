//! The console proxy against websockify (Debian's `websockify`, the reference proxy), on
//! the same byte source and the same client, in the same run.
//!
//!   cargo bench --bench console            (needs `websockify` on PATH; no root)
//!
//! The source stands in for a VNC server behind libvirt's graphics fd: a Unix socket
//! server in a process of its own. A connection that starts with `B` receives `BULK_MIB`
//! MiB as fast as the socket takes them; one that starts with `E` gets every byte echoed.
//! hvnode's side is the agent's own proxy loop (`console::proxy::pump_io`, the code that
//! carries RFB from libvirt's fd) behind an axum WebSocket route set up as the agent's
//! console route is; websockify forwards to the same socket (`--unix-target`). Each proxy
//! runs in its own process (hvnode's is this bench binary started again with
//! `--proxy-child`), so the CPU time each one spends, in user space and in the kernel, is
//! read from /proc and reported per GiB carried.
//!
//! The client is one small WebSocket client written here for both proxies: it parses frame
//! headers and counts payload bytes out of one reused buffer. An earlier version of this
//! bench used tokio-tungstenite as the client, which copies every payload into a message
//! of its own; on 2 cores that client, not the proxies, set the pace (websockify measured
//! 546 MiB/s through it, and 1.5–2.2 GiB/s through this one).
//!
//! The ceiling: the same client reading the same stream straight from the source over one
//! loopback TCP connection, with no proxy at all. A proxy's last leg is exactly such a
//! connection, so no proxy can be faster than that; its ratio to websockify is the most any
//! proxy could show here. On loopback the sender's `send` also runs the receiver's TCP
//! processing, which is why both proxies spend most of their CPU in the kernel.
//!
//! Reported: bulk throughput (median of `STREAMS` streams, interleaved), proxy CPU seconds
//! per GiB (user and kernel), and the round trip of `ECHOES` small echoes (p50, p99) with
//! the source's own direct round trip as the floor both add to.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

const BULK_MIB: usize = 512;
const STREAMS: usize = 7;
const ECHOES: usize = 2000;
const ECHO_BYTES: usize = 32;
/// The source's writes: a framebuffer update of a large screen is this order of size.
const SOURCE_WRITE: usize = 256 * 1024;
const CLIENT_BUF: usize = 1 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--proxy-child") {
        // The agent's runtime shape: multi-threaded tokio.
        let target = PathBuf::from(&args[i + 1]);
        runtime(true).block_on(async move {
            let port = hvnode_proxy(target).await;
            println!("{port}");
            std::future::pending::<()>().await
        });
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--source-child") {
        runtime(false).block_on(source(PathBuf::from(&args[i + 1])));
        return;
    }
    // The client: one thread, as a browser tab has.
    runtime(false).block_on(run());
}

fn runtime(multi_thread: bool) -> tokio::runtime::Runtime {
    let mut b = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().unwrap()
}

/// CPU seconds a process and its reaped children have used, from /proc: (user, system).
/// websockify forks a process per connection; it counts once that child has exited.
fn cpu_seconds(pid: u32) -> Cpu {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<f64> = after
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|v| v.parse().unwrap())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Cpu {
        user: (f[0] + f[2]) / hz,
        system: (f[1] + f[3]) / hz,
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    user: f64,
    system: f64,
}

impl Cpu {
    fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            user: self.user - o.user,
            system: self.system - o.system,
        }
    }
}

impl std::ops::AddAssign for Cpu {
    fn add_assign(&mut self, o: Cpu) {
        self.user += o.user;
        self.system += o.system;
    }
}

/// A child process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// This binary again with `flag arg`, and the first line it prints.
fn child(flag: &str, arg: &str) -> (Proc, String) {
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg(flag)
        .arg(arg)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Proc(child), line.trim().to_owned())
}

/// The stand-in VNC server, in its own process so its CPU is no proxy's or client's; it
/// also serves the same streams on a loopback TCP port (printed), for the ceiling.
async fn source(path: PathBuf) {
    let _ = std::fs::remove_file(&path);
    let unix = UnixListener::bind(&path).unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", tcp.local_addr().unwrap().port());
    tokio::spawn(async move {
        loop {
            let (s, _) = tcp.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            tokio::spawn(serve_source(s));
        }
    });
    loop {
        let (s, _) = unix.accept().await.unwrap();
        tokio::spawn(serve_source(s));
    }
}

async fn serve_source<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    let mut mode = [0u8; 1];
    if s.read_exact(&mut mode).await.is_err() {
        return;
    }
    if mode[0] == b'B' {
        let chunk = vec![0x5au8; SOURCE_WRITE];
        for _ in 0..BULK_MIB * 1024 * 1024 / SOURCE_WRITE {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // Stay open until the client goes: websockify drops what it still buffers when
        // its target closes, and a VNC server does not hang up after a framebuffer update
        // either.
        let _ = s.read(&mut mode).await;
    } else {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

/// The agent's proxy loop behind a WebSocket route configured as `api::console`'s is;
/// returns the port.
async fn hvnode_proxy(target: PathBuf) -> u16 {
    use axum::extract::ws::WebSocketUpgrade;
    use hvnode::console::proxy::{pump_io, MAX_CLIENT_MESSAGE};
    async fn upgrade(
        axum::extract::State(target): axum::extract::State<PathBuf>,
        ws: WebSocketUpgrade,
    ) -> axum::response::Response {
        let vnc = UnixStream::connect(&target).await.unwrap();
        ws.protocols(["binary"])
            .max_message_size(MAX_CLIENT_MESSAGE)
            .max_frame_size(MAX_CLIENT_MESSAGE)
            .on_upgrade(move |socket| pump_io(socket, vnc))
    }
    let app = axum::Router::new()
        .route("/", get(upgrade))
        .with_state(target);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    port
}

fn websockify(target: &Path) -> (Proc, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("websockify")
        .arg(format!("--unix-target={}", target.display()))
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("websockify (apt install websockify)");
    let child = Proc(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (child, port);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("websockify did not listen");
}

/// A minimal WebSocket client: one reused buffer, frame headers parsed in place, payloads
/// counted and not kept.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    at: usize,
    end: usize,
    /// Payload bytes of the current frame not yet read, and whether it carries data.
    left: u64,
    data: bool,
}

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

impl Client {
    async fn open(port: u16) -> Client {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.set_nodelay(true).unwrap();
        let req = format!(
            "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut c = Client {
            s,
            buf: vec![0; CLIENT_BUF],
            at: 0,
            end: 0,
            left: 0,
            data: false,
        };
        let head_end = loop {
            let n = c.s.read(&mut c.buf[c.end..]).await.unwrap();
            assert!(n > 0, "proxy closed during the handshake");
            c.end += n;
            if let Some(i) = c.buf[..c.end].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&c.buf[..head_end]).into_owned();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "handshake refused: {head}"
        );
        c.at = head_end;
        c
    }

    async fn send(&mut self, payload: &[u8]) {
        assert!(payload.len() < 126);
        let mut f = vec![0x82, 0x80 | payload.len() as u8];
        f.extend_from_slice(&MASK);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
        self.s.write_all(&f).await.unwrap();
    }

    /// Reads until `want` payload bytes of data frames have arrived.
    async fn receive(&mut self, want: usize) {
        let mut got = 0usize;
        while got < want {
            if self.left > 0 {
                let n = ((self.end - self.at) as u64).min(self.left) as usize;
                self.at += n;
                self.left -= n as u64;
                if self.data {
                    got += n;
                }
                if n > 0 {
                    continue;
                }
            } else if let Some((hlen, len, opcode)) = header(&self.buf[self.at..self.end]) {
                assert!(opcode != 0x8, "proxy closed after {got} bytes");
                self.at += hlen;
                self.left = len;
                self.data = opcode <= 0x2;
                continue;
            }
            // Need more bytes: keep a partial header, read after it.
            if self.at == self.end {
                self.at = 0;
                self.end = 0;
            } else if self.left == 0 && self.at > 0 {
                self.buf.copy_within(self.at..self.end, 0);
                self.end -= self.at;
                self.at = 0;
            }
            let n = self.s.read(&mut self.buf[self.end..]).await.unwrap();
            assert!(n > 0, "proxy hung up after {got} bytes");
            self.end += n;
        }
    }
}

/// A server frame's header length, payload length and opcode, if all of it is in `b`.
fn header(b: &[u8]) -> Option<(usize, u64, u8)> {
    if b.len() < 2 {
        return None;
    }
    assert!(b[1] & 0x80 == 0, "server frames are not masked");
    match b[1] & 0x7f {
        126 if b.len() >= 4 => Some((4, u16::from_be_bytes([b[2], b[3]]) as u64, b[0] & 0xf)),
        127 if b.len() >= 10 => Some((
            10,
            u64::from_be_bytes(b[2..10].try_into().unwrap()),
            b[0] & 0xf,
        )),
        126 | 127 => None,
        n => Some((2, n as u64, b[0] & 0xf)),
    }
}

/// MiB/s of one bulk stream through the proxy on `port`.
async fn bulk(port: u16) -> f64 {
    let mut ws = Client::open(port).await;
    ws.send(b"B").await;
    let start = Instant::now();
    ws.receive(BULK_MIB * 1024 * 1024).await;
    BULK_MIB as f64 / start.elapsed().as_secs_f64()
}

/// A connection straight to the source's TCP port, in `mode` (`B` or `E`).
async fn direct(port: u16, mode: u8) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&[mode]).await.unwrap();
    s
}

/// MiB/s of one bulk stream read straight from the source's TCP port: the ceiling, since
/// a proxy's last leg is this same loopback TCP connection to the client.
async fn bulk_direct(port: u16) -> f64 {
    let mut s = direct(port, b'B').await;
    let mut buf = vec![0u8; CLIENT_BUF];
    let (want, mut got) = (BULK_MIB * 1024 * 1024, 0);
    let start = Instant::now();
    while got < want {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got += n;
    }
    BULK_MIB as f64 / start.elapsed().as_secs_f64()
}

/// Round trips of small echoes through the proxy on `port`, in microseconds.
async fn echo_ws(port: u16) -> Vec<f64> {
    let mut ws = Client::open(port).await;
    ws.send(b"E").await;
    let payload = [7u8; ECHO_BYTES];
    let mut out = Vec::with_capacity(ECHOES);
    for _ in 0..ECHOES {
        let t = Instant::now();
        ws.send(&payload).await;
        ws.receive(ECHO_BYTES).await;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out
}

async fn echo_direct(port: u16) -> Vec<f64> {
    let mut s = direct(port, b'E').await;
    let payload = [7u8; ECHO_BYTES];
    let mut buf = [0u8; ECHO_BYTES];
    let mut out = Vec::with_capacity(ECHOES);
    for _ in 0..ECHOES {
        let t = Instant::now();
        s.write_all(&payload).await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
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
    let dir = std::env::temp_dir().join(format!("hvnode-console-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("vnc.sock");
    let (_source, source_port) = child("--source-child", target.to_str().unwrap());
    let source_port: u16 = source_port.parse().unwrap();
    let (ours_child, ours) = child("--proxy-child", target.to_str().unwrap());
    let ours: u16 = ours.parse().unwrap();
    let (theirs_child, theirs) = websockify(&target);
    let (ours_pid, theirs_pid) = (ours_child.0.id(), theirs_child.0.id());

    // Warm all up, then interleave so each sees the same machine.
    bulk_direct(source_port).await;
    bulk(ours).await;
    bulk(theirs).await;
    let (mut d, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_a, mut cpu_b) = (Cpu::default(), Cpu::default());
    for _ in 0..STREAMS {
        d.push(bulk_direct(source_port).await);
        let c = cpu_seconds(ours_pid);
        a.push(bulk(ours).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        cpu_a += cpu_seconds(ours_pid) - c;
        let c = cpu_seconds(theirs_pid);
        b.push(bulk(theirs).await);
        // Let websockify reap the connection's process so its CPU time counts.
        tokio::time::sleep(Duration::from_millis(300)).await;
        cpu_b += cpu_seconds(theirs_pid) - c;
    }
    let gib = (STREAMS * BULK_MIB) as f64 / 1024.0;
    let (per_a, per_b) = (cpu_a.total() / gib, cpu_b.total() / gib);
    let (td, ta, tb) = (median(d), median(a), median(b));
    // Three interleaved rounds each, pooled.
    let (mut direct, mut ea, mut eb) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        direct.extend(echo_direct(source_port).await);
        ea.extend(echo_ws(ours).await);
        eb.extend(echo_ws(theirs).await);
    }
    for v in [&mut direct, &mut ea, &mut eb] {
        v.sort_by(f64::total_cmp);
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "console proxy: {BULK_MIB} MiB bulk streams (median of {STREAMS}), 3 x {ECHOES} echoes of {ECHO_BYTES} B"
    );
    println!(
        "  throughput  no proxy: source to client over loopback TCP (ceiling) {td:8.1} MiB/s, {:.2}x websockify",
        td / tb
    );
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
        "  proxy CPU   in user space: hvnode {:6.3} s/GiB   websockify {:6.3} s/GiB   ratio {:.1}x; in the kernel: {:.3} vs {:.3} s/GiB",
        cpu_a.user / gib,
        cpu_b.user / gib,
        cpu_b.user / cpu_a.user.max(1e-9),
        cpu_a.system / gib,
        cpu_b.system / gib
    );
    println!(
        "  round trip  direct p50 {:6.1} us  p99 {:6.1} us",
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
