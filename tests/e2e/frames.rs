//! Raw frames for the data-plane tests: a sniffer and a frame sender, as small Python
//! programs run inside guests (through their agent) or in the rig's namespaces. Guests
//! are customers' machines: what they can send, a hostile customer can send.

#![allow(dead_code)]

use std::time::Duration;

use base64::Engine;

use crate::harness::*;

/// Records what arrives on an interface (promiscuous) until its time is up: ARP as
/// `arp op=N spa=A tpa=B sha=M`, router advertisements, neighbour solicitations and
/// advertisements as `icmp6 type=N src=S target=T`, and any frame carrying `MARK:<word>`
/// as `mark <word>`.
/// Frames the interface sent itself are left out. Writes `ready` first.
pub const SNIFF: &str = r#"
import socket, struct, sys, time
ifname, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((ifname, 0))
s.setsockopt(263, 1, struct.pack("iHH8s", socket.if_nametoindex(ifname), 1, 0, b""))
s.settimeout(0.2)
end = time.time() + seconds
with open(out, "w", buffering=1) as f:
    f.write("ready\n")
    while time.time() < end:
        try:
            data, addr = s.recvfrom(65535)
        except socket.timeout:
            continue
        if addr[2] == socket.PACKET_OUTGOING or len(data) < 14:
            continue
        et = struct.unpack("!H", data[12:14])[0]
        if et == 0x0806 and len(data) >= 42:
            op = struct.unpack("!H", data[20:22])[0]
            sha = ":".join("%02x" % b for b in data[22:28])
            f.write("arp op=%d spa=%s tpa=%s sha=%s\n" % (op, socket.inet_ntoa(data[28:32]), socket.inet_ntoa(data[38:42]), sha))
        elif et == 0x86DD and len(data) >= 78 and data[20] == 58 and data[54] in (134, 135, 136):
            src = socket.inet_ntop(socket.AF_INET6, data[22:38])
            tgt = socket.inet_ntop(socket.AF_INET6, data[62:78])
            f.write("icmp6 type=%d src=%s target=%s\n" % (data[54], src, tgt))
        i = data.find(b"MARK:")
        if i >= 0:
            word = data[i + 5:i + 45].split(b"\0")[0].split()[0]
            f.write("mark %s\n" % word.decode(errors="replace"))
"#;

/// Sends frames from an interface, with its own MAC as source unless told otherwise:
/// - `raw DST_MAC ETHERTYPE_HEX WORD [COUNT]`: a frame carrying `MARK:WORD`;
/// - `arp SPA TPA [COUNT] [SHA]`: an ARP request (`SPA` 0.0.0.0 makes it a probe; `SHA` a
///   sender MAC other than the interface's);
/// - `ns SRC6 TARGET6 [COUNT]`: a neighbour solicitation to the target's solicited-node
///   group (`SRC6` `::` makes it a duplicate address detection probe);
/// - `ipv4 DST_MAC SRC DST WORD [VLAN|-] [SRC_MAC]`: a UDP datagram carrying `MARK:WORD`,
///   802.1Q-tagged with `VLAN`, from `SRC_MAC`;
/// - `ipv6 DST_MAC SRC6 DST6 WORD`: the same over IPv6;
/// - `na DST_MAC SRC6 DST6 TARGET6`: a neighbour advertisement for `TARGET6`;
/// - `ra DST_MAC SRC6 DST6`: a router advertisement;
/// - `tap NAME DST_MAC WORD`: opens tap `NAME` (which must exist) and writes a frame
///   carrying `MARK:WORD` into it, as a VM's QEMU would.
pub const SEND: &str = r#"
import fcntl, os, socket, struct, sys, time
def mac(s): return bytes.fromhex(s.replace(":", ""))
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16: t = (t & 0xffff) + (t >> 16)
    return (~t) & 0xffff
args = sys.argv[1:]
kind = args[1]
def count(i): return int(args[i]) if len(args) > i else 3
if kind == "tap":
    name, dst, word = args[2], args[3], args[4]
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454ca, struct.pack("16sH22x", name.encode(), 0x0002 | 0x1000))
    time.sleep(1.0)
    frame = mac(dst) + mac("02:00:00:00:0b:0b") + struct.pack("!H", 0x88B5) + ("MARK:%s" % word).encode().ljust(46, b"\0")
    for _ in range(5):
        os.write(fd, frame)
        time.sleep(0.2)
    sys.exit(0)
ifname = args[0]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
own = mac(open("/sys/class/net/%s/address" % ifname).read().strip())
if kind == "raw":
    dst, et, word = args[2], int(args[3], 16), args[4]
    frames = [mac(dst) + own + struct.pack("!H", et) + ("MARK:%s" % word).encode().ljust(46, b"\0")]
    n = count(5)
elif kind == "arp":
    spa, tpa = socket.inet_aton(args[2]), socket.inet_aton(args[3])
    sha = mac(args[5]) if len(args) > 5 else own
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + sha + spa + b"\0" * 6 + tpa
    frames = [b"\xff" * 6 + own + struct.pack("!H", 0x0806) + body.ljust(46, b"\0")]
    n = count(4)
elif kind == "ipv4":
    dst, src, dip, word = mac(args[2]), socket.inet_aton(args[3]), socket.inet_aton(args[4]), args[5]
    vlan = args[6] if len(args) > 6 else "-"
    smac = mac(args[7]) if len(args) > 7 else own
    data = ("MARK:%s" % word).encode().ljust(32, b"\0")
    udp = struct.pack("!HHHH", 40000, 9999, 8 + len(data), 0) + data
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0) + src + dip
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    tag = b"" if vlan == "-" else struct.pack("!HH", 0x8100, int(vlan))
    frames = [dst + smac + tag + struct.pack("!H", 0x0800) + ip + udp]
    n = 3
elif kind in ("ipv6", "na", "ra"):
    dst = mac(args[2])
    src = socket.inet_pton(socket.AF_INET6, args[3])
    dip = socket.inet_pton(socket.AF_INET6, args[4])
    if kind == "ipv6":
        data = ("MARK:%s" % args[5]).encode().ljust(32, b"\0")
        payload = struct.pack("!HHHH", 40000, 9999, 8 + len(data), 0) + data
        nh, hop = 17, 64
    elif kind == "na":
        tgt = socket.inet_pton(socket.AF_INET6, args[5])
        payload = struct.pack("!BBHI", 136, 0, 0, 0x60000000) + tgt + struct.pack("!BB", 2, 1) + own
        nh, hop = 58, 255
    else:
        payload = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0) + struct.pack("!BB", 1, 1) + own
        nh, hop = 58, 255
    pseudo = src + dip + struct.pack("!I", len(payload)) + b"\0\0\0" + bytes([nh])
    c = csum(pseudo + payload)
    at = 6 if nh == 17 else 2
    payload = payload[:at] + struct.pack("!H", c) + payload[at + 2:]
    ip6 = struct.pack("!IHBB", 0x60000000, len(payload), nh, hop) + src + dip
    frames = [dst + own + struct.pack("!H", 0x86DD) + ip6 + payload]
    n = 3
elif kind == "ns":
    src = socket.inet_pton(socket.AF_INET6, args[2])
    tgt = socket.inet_pton(socket.AF_INET6, args[3])
    dst = bytes.fromhex("ff0200000000000000000001ff") + tgt[13:]
    icmp = struct.pack("!BBHI", 135, 0, 0, 0) + tgt
    if src != b"\0" * 16:
        icmp += struct.pack("!BB", 1, 1) + own
    pseudo = src + dst + struct.pack("!I", len(icmp)) + b"\0\0\0" + bytes([58])
    icmp = icmp[:2] + struct.pack("!H", csum(pseudo + icmp)) + icmp[4:]
    ip6 = struct.pack("!IHBB", 0x60000000, len(icmp), 58, 255) + src + dst
    frames = [bytes.fromhex("3333ff") + tgt[13:] + own + struct.pack("!H", 0x86DD) + ip6 + icmp]
    n = count(4)
for _ in range(n):
    for f in frames:
        s.send(f)
    time.sleep(0.2)
"#;

/// Writes `text` to `path` in the guest.
pub fn guest_write(id: &str, path: &str, text: &str) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(text);
    let (code, out) = guest_sh(id, &format!("echo {b64} | base64 -d > {path}"));
    assert_eq!(code, 0, "write {path} in {id}: {out}");
}

/// Puts the sniffer and the sender into the guest (`/root/sniff.py`, `/root/send.py`).
pub fn guest_tools(id: &str) {
    guest_write(id, "/root/sniff.py", SNIFF);
    guest_write(id, "/root/send.py", SEND);
}

/// A sniffer running in the guest on `dev` for `seconds`, writing to `out`.
pub fn guest_sniff(id: &str, dev: &str, seconds: u32, out: &str) {
    let (code, o) = guest_sh(
        id,
        &format!(
            "pkill -f '^python3 /root/sniff.py'; ip link set {dev} promisc on; rm -f {out}; \
             nohup python3 /root/sniff.py {dev} {seconds} {out} >/dev/null 2>&1 &"
        ),
    );
    assert_eq!(code, 0, "start the sniffer in {id}: {o}");
    let ready = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        guest_sh(id, &format!("cat {out} 2>/dev/null"))
            .1
            .contains("ready")
    });
    assert!(ready, "the sniffer in {id} did not start");
}

/// What the guest's sniffer has recorded so far.
pub fn guest_seen(id: &str, out: &str) -> String {
    guest_sh(id, &format!("cat {out}")).1
}

/// What the guest's sniffer has recorded once every one of `marks` (honest frames, sent
/// last) has arrived, or `within` has passed: frames sent before them on the same path
/// would have arrived first, so what is missing then was dropped, on a loaded host too.
pub async fn guest_seen_after(id: &str, out: &str, marks: &[&str], within: Duration) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        let seen = guest_seen(id, out);
        if marks.iter().all(|m| seen.contains(m)) || std::time::Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Runs the sender in the guest; panics if it could not send (so "not seen" always means
/// "dropped on the way").
pub fn guest_send(id: &str, args: &str) {
    let (code, out) = guest_sh(id, &format!("python3 /root/send.py {args} 2>&1"));
    assert_eq!(code, 0, "{id} sends `{args}`: {out}");
}

/// The tools as files on the host, for namespaces (`<dir>/sniff.py`, `<dir>/send.py`).
pub fn host_tools(dir: &std::path::Path) {
    std::fs::write(dir.join("sniff.py"), SNIFF).unwrap();
    std::fs::write(dir.join("send.py"), SEND).unwrap();
}

/// A sniffer in namespace `ns` on `dev`, in the background; returns its output file.
pub fn ns_sniff(
    ns: &str,
    dir: &std::path::Path,
    dev: &str,
    seconds: u32,
    name: &str,
) -> std::path::PathBuf {
    let out = dir.join(format!("{name}.out"));
    let _ = std::fs::remove_file(&out);
    // The pattern is anchored: it must not match the shell that runs pkill.
    let _ = ns_sh(
        ns,
        &format!("pkill -f '^python3 {}/sniff.py {dev} '", dir.display()),
    );
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "python3"])
        .arg(dir.join("sniff.py"))
        .args([dev, &seconds.to_string()])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start sniffer");
    // Reaped when it ends by itself (after `seconds`).
    std::thread::spawn(move || child.wait());
    let ready = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::read_to_string(&out).is_ok_and(|s| s.contains("ready"))
    });
    assert!(ready, "the sniffer in {ns} did not start");
    out
}

/// Runs the sender in namespace `ns`.
pub fn ns_send(ns: &str, dir: &std::path::Path, args: &str) {
    let (ok, out) = ns_sh(
        ns,
        &format!("python3 {}/send.py {args} 2>&1", dir.display()),
    );
    assert!(ok, "{ns} sends `{args}`: {out}");
}
