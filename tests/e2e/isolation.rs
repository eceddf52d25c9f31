//! Tenants on one host, with real guests that behave as hostile customers may: a guest in
//! promiscuous mode reads nothing meant for others, cannot knock a neighbour's address out
//! with forged duplicate-address probes, cannot keep sending from an address it gave up
//! while its agent stalls, and cannot use a port the agent lost track of; strangers on the
//! underlay cannot inject frames into a private network. Every "unseen" stands beside a
//! "seen" over the same path, so a dead NIC or a broken sender turns the test red.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::frames::*;
use crate::harness::*;

const BOOT: Duration = Duration::from_secs(1500);
/// The observer's host number on the public bridge.
const OBSERVER: u8 = 246;
/// This test's underlay: this host (the rig) and a second one, plus a stranger's address
/// on the same link.
const UNDERLAY_LOCAL: &str = "10.98.0.1";
const UNDERLAY_PEER: &str = "10.98.0.2";
const UNDERLAY_STRANGER: &str = "10.98.0.3";
const VNI_FIRST: u32 = 20000;
/// How long a sniffer records: long enough for every sender of a check to have run, however
/// slow guest-exec is on a loaded host (each check reads what arrived, then moves on).
const SNIFF_S: u32 = 600;
/// How long honest frames may take to reach a guest's sniffer on a loaded host.
const ARRIVAL: Duration = Duration::from_secs(60);

/// The second host and the observer, with their links; removed when dropped.
struct Topology {
    rig: Rig,
    taps: Vec<String>,
}

impl Topology {
    fn build(rig: &Rig) -> Topology {
        let t = Topology {
            rig: rig.clone(),
            taps: Vec::new(),
        };
        t.teardown();
        let ns = &rig.netns;
        let (ok, out) = sh(&format!(
            "ip netns add hvipeer && ip netns add hviobs && \
             ip link add hviul0 netns {ns} type veth peer name hviul1 netns hvipeer && \
             ip -n {ns} addr add {UNDERLAY_LOCAL}/24 dev hviul0 && ip -n {ns} link set hviul0 up && \
             ip -n hvipeer addr add {UNDERLAY_PEER}/24 dev hviul1 && \
             ip -n hvipeer addr add {UNDERLAY_STRANGER}/24 dev hviul1 && \
             ip -n hvipeer link set hviul1 up && ip -n hvipeer link set lo up && \
             ip link add hviobs0 netns {ns} type veth peer name hviobs1 netns hviobs && \
             ip -n {ns} link set hviobs0 master {br} && ip -n {ns} link set hviobs0 up && \
             ip -n hviobs addr add {obs}/{p} dev hviobs1 && ip -n hviobs link set hviobs1 up && \
             ip -n hviobs link set lo up",
            br = rig.bridge,
            obs = rig.addr(OBSERVER),
            p = rig.prefix,
        ));
        assert!(ok, "cannot build the test topology: {out}");
        t
    }

    /// A tap on the public bridge that no VM owns, as a leftover or a NIC the agent lost
    /// track of would be.
    fn tap(&mut self, name: &str) {
        let (ok, out) = ns_sh(
            &self.rig.netns,
            &format!(
                "ip tuntap add dev {name} mode tap && ip link set {name} master {} && \
                 ip link set {name} up",
                self.rig.bridge
            ),
        );
        assert!(ok, "tap {name}: {out}");
        self.taps.push(name.to_owned());
    }

    fn teardown(&self) {
        let ns = &self.rig.netns;
        let mut script = format!(
            "ip -n {ns} link del hviul0 2>/dev/null; ip -n {ns} link del hviobs0 2>/dev/null; \
             ip netns del hvipeer 2>/dev/null; ip netns del hviobs 2>/dev/null; "
        );
        for t in &self.taps {
            script.push_str(&format!("ip -n {ns} link del {t} 2>/dev/null; "));
        }
        sh(&format!("{script} true"));
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn agent_options(rig: &Rig) -> AgentOptions {
    AgentOptions {
        pool: (232, 239),
        extra_toml: format!(
            "[network.pool6]\ncidr = \"fd70::/64\"\ngateway = \"{gw6}\"\n\
             first = \"fd70::200\"\nlast = \"fd70::2ff\"\ndns = [\"{gw6}\"]\n\n\
             [network.private]\nunderlay = \"hviul0\"\nlocal_ip = \"{UNDERLAY_LOCAL}\"\n\
             peers = [\"{UNDERLAY_PEER}\"]\nvni_first = {VNI_FIRST}\nvni_last = {}\n\
             pool = \"10.241.0.0/16\"\n",
            VNI_FIRST + 99,
            gw6 = rig.gateway6,
        ),
        // The paused guest below never lets go of its NIC: no need to wait the default.
        env: vec![("HVNODE_NETWORK__UNPLUG_TIMEOUT_S".into(), "15".into())],
        ..Default::default()
    }
}

/// A VM's MAC and its primary IPv4 and IPv6 addresses.
async fn addresses(agent: &Agent, id: &str) -> (String, String, String) {
    let (_, d) = agent.get(&format!("/v1/vms/{id}")).await;
    let v4 = d["data"]["ip_address"].as_str().unwrap().to_owned();
    let v6 = d["data"]["ips"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["address"].as_str())
        .find(|a| a.contains(':'))
        .unwrap_or_else(|| panic!("{id} has an IPv6 address: {d}"))
        .to_owned();
    (d["data"]["mac"].as_str().unwrap().to_owned(), v4, v6)
}

/// VXLAN datagrams carrying a broadcast frame with `MARK:<word>` from inner MAC
/// `02:00:00:00:<mac_tail>`, sent from `source` on the second host to this host's underlay
/// address.
fn vxlan_send(source: &str, vni: u32, mac_tail: &str, word: &str) {
    let script = format!(
        "python3 -c \"import socket,struct\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{source}',0))\n\
         hdr=struct.pack('!II',0x08000000,{vni}<<8)\n\
         fr=b'\\xff'*6+bytes.fromhex('02000000{mac_tail}')+struct.pack('!H',0x88B5)+b'MARK:{word}'.ljust(46,b'\\0')\n\
         for _ in range(5): s.sendto(hdr+fr,('{UNDERLAY_LOCAL}',4789))\""
    );
    let (ok, out) = ns_sh("hvipeer", &script);
    assert!(ok, "send VXLAN from {source}: {out}");
}

/// Datagrams to the observer's port 9998, with when each arrived.
struct Arrivals {
    stop: Arc<AtomicBool>,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Arrivals {
    fn start(rig: &Rig) -> Arrivals {
        let addr = format!("{}:9998", rig.addr(OBSERVER));
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (flag, sink) = (stop.clone(), got.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = spawn_in_netns("hviobs", move || {
            let sock = UdpSocket::bind(&addr).expect("bind observer");
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 256];
            while !flag.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    sink.lock().unwrap().push((
                        Instant::now(),
                        String::from_utf8_lossy(&buf[..n]).into_owned(),
                    ));
                }
            }
        });
        ready_rx.recv().unwrap();
        Arrivals { stop, got, thread }
    }

    fn seen(&self, what: &str) -> bool {
        self.got.lock().unwrap().iter().any(|(_, p)| p == what)
    }

    fn finish(self) -> Vec<(Instant, String)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let got = self.got.lock().unwrap().clone();
        got
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_cannot_see_take_or_disturb_each_others_traffic() {
    let rig = Rig::load();
    let mut topo = Topology::build(&rig);
    let tools = tempfile::tempdir().unwrap();
    host_tools(tools.path());
    let agent = Agent::start("isolation", agent_options(&rig));
    let (a, b) = (new_id(), new_id());
    agent
        .deploy(
            vec![
                create_body(&a, "iso-a", "Is0lation-pw"),
                create_body(&b, "iso-b", "Is0lation-pw"),
            ],
            BOOT,
        )
        .await;
    for id in [&a, &b] {
        guest_tools(id);
    }
    let ns = rig.netns.clone();
    let (mac_a, a4, a6) = addresses(&agent, &a).await;
    let (mac_b, b4, b6) = addresses(&agent, &b).await;
    let tap_a = agent.tap(&a, 0);

    // --- Flooding: the VM's port learns nothing and gets no unknown unicast or unregistered
    // multicast; its own MAC is a static entry.
    let (_, port) = ns_sh(&ns, &format!("bridge -d link show dev {tap_a}"));
    for flag in [
        "learning off",
        "flood off",
        "mcast_flood off",
        "bcast_flood on",
    ] {
        assert!(port.contains(flag), "{tap_a} has {flag}: {port}");
    }
    let (_, fdb) = ns_sh(&ns, &format!("bridge fdb show dev {tap_a}"));
    assert!(
        fdb.lines()
            .any(|l| l.starts_with(&mac_a) && l.contains("static")),
        "A's MAC is a static entry on its port: {fdb}"
    );
    guest_sniff(&a, "eth0", SNIFF_S, "/root/flood.out");
    for (dst, word) in [
        ("52:54:00:de:ad:01", "unknown-unicast"),
        (mac_a.as_str(), "to-a"),
        ("ff:ff:ff:ff:ff:ff", "broadcast"),
    ] {
        ns_send(
            "hviobs",
            tools.path(),
            &format!("hviobs1 raw {dst} 88b5 {word}"),
        );
    }
    let seen = guest_seen_after(
        &a,
        "/root/flood.out",
        &["mark to-a", "mark broadcast"],
        ARRIVAL,
    )
    .await;
    assert!(seen.contains("mark to-a"), "frames to A reach A: {seen}");
    assert!(
        seen.contains("mark broadcast"),
        "broadcast reaches A: {seen}"
    );
    assert!(
        !seen.contains("mark unknown-unicast"),
        "a frame to an unknown MAC does not reach A's promiscuous NIC: {seen}"
    );
    // ND still works without multicast flooding: the bridge's querier keeps the guests'
    // solicited-node groups registered.
    let ok = eventually(Duration::from_secs(120), || {
        ns_sh(
            &ns,
            &format!("ip neigh flush dev {}; ping -6 -c 1 -W 2 {a6}", rig.bridge),
        )
        .0
    })
    .await;
    assert!(ok, "A answers on its IPv6 address");

    // --- Duplicate-address probes: A may probe its own addresses, not B's.
    guest_sniff(&b, "eth0", SNIFF_S, "/root/dad.out");
    guest_send(&a, &format!("eth0 arp 0.0.0.0 {b4}"));
    guest_send(&a, &format!("eth0 arp {a4} {b4}"));
    guest_send(&a, &format!("eth0 arp 0.0.0.0 {a4}"));
    guest_send(&a, &format!("eth0 ns :: {b6}"));
    guest_send(&a, &format!("eth0 ns {a6} {b6}"));
    let seen = guest_seen_after(
        &b,
        "/root/dad.out",
        &[
            &format!("arp op=1 spa={a4} tpa={b4}"),
            &format!("arp op=1 spa=0.0.0.0 tpa={a4}"),
            &format!("icmp6 type=135 src={a6} target={b6}"),
        ],
        ARRIVAL,
    )
    .await;
    assert!(
        seen.contains(&format!("arp op=1 spa={a4} tpa={b4}")),
        "A's ARP request for B reaches B: {seen}"
    );
    assert!(
        seen.contains(&format!("arp op=1 spa=0.0.0.0 tpa={a4}")),
        "A's probe for its own address crosses: {seen}"
    );
    assert!(
        !seen.contains(&format!("arp op=1 spa=0.0.0.0 tpa={b4}")),
        "A's ARP probe for B's address is dropped: {seen}"
    );
    assert!(
        seen.contains(&format!("icmp6 type=135 src={a6} target={b6}")),
        "A's neighbour solicitation for B reaches B: {seen}"
    );
    assert!(
        !seen.contains(&format!("icmp6 type=135 src=:: target={b6}")),
        "A's DAD probe for B's IPv6 address is dropped: {seen}"
    );

    // --- Anti-spoofing, every rule, from inside A's guest towards B (which records what
    // reaches it), each forgery beside the same frame sent honestly.
    let foreign4 = rig.addr(250);
    let foreign6 = "fd70::2ee";
    let ll_a = hvnode::network::nft::link_local(hvnode::network::nft::parse_mac(&mac_a).unwrap());
    guest_sniff(&b, "eth0", SNIFF_S, "/root/spoof.out");
    let sends = [
        format!("eth0 ipv4 {mac_b} {a4} {b4} v4-own"),
        format!("eth0 ipv4 {mac_b} {foreign4} {b4} v4-forged"),
        format!("eth0 ipv4 {mac_b} {a4} {b4} mac-forged - 52:54:00:66:66:66"),
        format!("eth0 ipv4 {mac_b} {a4} {b4} vlan-tagged 100"),
        format!("eth0 raw {mac_b} 88b5 other-ethertype"),
        format!("eth0 arp {a4} {b4}"),
        format!("eth0 arp {a4} {b4} 3 52:54:00:99:99:99"),
        format!("eth0 arp {foreign4} {b4}"),
        format!("eth0 ipv6 {mac_b} {a6} {b6} v6-own"),
        format!("eth0 ipv6 {mac_b} {foreign6} {b6} v6-forged"),
        format!("eth0 na {mac_b} {a6} {b6} {a6}"),
        format!("eth0 na {mac_b} {a6} {b6} {b6}"),
        format!("eth0 ra {mac_b} {ll_a} {b6}"),
        // Last, an honest frame: once it has arrived, every forgery before it would have.
        format!("eth0 ipv4 {mac_b} {a4} {b4} v4-last"),
    ];
    for args in &sends {
        guest_send(&a, args);
    }
    let seen = guest_seen_after(&b, "/root/spoof.out", &["mark v4-last"], ARRIVAL).await;
    for (crosses, what) in [
        (true, "mark v4-own".to_owned()),
        (false, "mark v4-forged".to_owned()),
        (false, "mark mac-forged".to_owned()),
        (false, "mark vlan-tagged".to_owned()),
        (false, "mark other-ethertype".to_owned()),
        (false, "sha=52:54:00:99:99:99".to_owned()),
        (false, format!("spa={foreign4}")),
        (true, "mark v6-own".to_owned()),
        (false, "mark v6-forged".to_owned()),
        (true, format!("icmp6 type=136 src={a6} target={a6}")),
        (false, format!("icmp6 type=136 src={a6} target={b6}")),
        (false, "icmp6 type=134".to_owned()),
    ] {
        assert_eq!(
            seen.contains(&what),
            crosses,
            "`{what}` {} B: {seen}",
            if crosses { "reaches" } else { "does not reach" }
        );
    }
    assert!(
        seen.contains(&format!("arp op=1 spa={a4} tpa={b4} sha={mac_a}")),
        "A's honest ARP reaches B: {seen}"
    );

    // --- Fail closed: a port that looks like a VM's but has no chain drops everything,
    // while a frame written the same way into a port that is not a VM's crosses.
    let observer_mac = sh("ip netns exec hviobs cat /sys/class/net/hviobs1/address")
        .1
        .trim()
        .to_owned();
    let orphan = format!("{}0badc0ffee009", agent.tap_prefix);
    topo.tap("hvitap0");
    topo.tap(&orphan);
    let out = ns_sniff("hviobs", tools.path(), "hviobs1", SNIFF_S, "orphan");
    // The orphan's frame first: once the other port's has arrived, it would have too.
    ns_send(
        &ns,
        tools.path(),
        &format!("- tap {orphan} {observer_mac} orphan-port"),
    );
    ns_send(
        &ns,
        tools.path(),
        &format!("- tap hvitap0 {observer_mac} other-port"),
    );
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    eventually(ARRIVAL, || read().contains("mark other-port")).await;
    let seen = read();
    assert!(
        seen.contains("mark other-port"),
        "a frame from a port that is no VM's crosses: {seen}"
    );
    assert!(
        !seen.contains("mark orphan-port"),
        "a VM-named port without a chain drops everything: {seen}"
    );

    // --- VXLAN: only the configured peer, on the underlay, speaks for a private network.
    let (s, bad) = agent
        .post("/v1/private-networks", json!({"name": "far", "vni": 10}))
        .await;
    assert_eq!(
        (s, bad["error_code"].clone()),
        (400, json!("INVALID_RESOURCES")),
        "a VNI outside the configured range is refused: {bad}"
    );
    let (s, net) = agent
        .post(
            "/v1/private-networks",
            json!({"name": "iso", "vni": VNI_FIRST + 7}),
        )
        .await;
    assert_eq!(s, 201, "a VNI inside the range is taken: {net}");
    let net_id = net["data"]["id"].as_str().unwrap().to_owned();
    let vni = VNI_FIRST + 7;
    let (s, member) = agent
        .post(
            &format!("/v1/private-networks/{net_id}/attach"),
            json!({"vps_id": a}),
        )
        .await;
    assert_eq!(s, 201, "{member}");
    let membership = member["data"]["membership_id"].as_str().unwrap().to_owned();
    guest_sniff(&a, "eth1", SNIFF_S, "/root/vxlan.out");
    vxlan_send(UNDERLAY_PEER, vni, "c0de", "from-peer");
    vxlan_send(UNDERLAY_STRANGER, vni, "bad0", "from-stranger");
    vxlan_send(UNDERLAY_PEER, vni, "c0de", "peer-after");
    let seen = guest_seen_after(&a, "/root/vxlan.out", &["mark peer-after"], ARRIVAL).await;
    assert!(
        seen.contains("mark from-peer"),
        "the peer's frames reach the network's member: {seen}"
    );
    assert!(
        !seen.contains("mark from-stranger"),
        "a stranger's VXLAN frames are dropped: {seen}"
    );
    let (_, fdb) = ns_sh(&ns, &format!("bridge fdb show dev hvx{vni}"));
    assert!(
        fdb.contains(&format!("00:00:00:00:00:00 dst {UNDERLAY_PEER}")),
        "the agent wrote the peer's flood entry: {fdb}"
    );
    assert!(
        !fdb.contains("02:00:00:00:ba:d0") && !fdb.contains(UNDERLAY_STRANGER),
        "nothing was learned from the stranger's frames: {fdb}"
    );
    assert!(
        !fdb.lines()
            .any(|l| l.contains("dst") && !l.starts_with("00:00:00:00:00:00")),
        "the tunnel learns no remote MAC, even from the peer: {fdb}"
    );

    // --- A NIC the guest does not let go of (a paused guest cannot): the detach fails and
    // the membership and its filter stay; once the guest runs again, it succeeds.
    let tap_a1 = agent.tap(&a, 1);
    assert!(virsh(&["suspend", &a]).0);
    let (s, refused) = agent
        .delete(&format!(
            "/v1/private-networks/{net_id}/members/{membership}"
        ))
        .await;
    assert!(
        s >= 400 && refused["success"] == json!(false),
        "a NIC still in the guest is not released: {s} {refused}"
    );
    let (_, listed) = agent.get("/v1/private-networks").await;
    assert!(
        listed.to_string().contains(&membership),
        "the membership stays: {listed}"
    );
    let (_, table) = ns_sh(
        &ns,
        &format!("nft list table bridge {}", agent.filter_table),
    );
    assert!(
        table.contains(&format!("p_{tap_a1}")),
        "the NIC keeps its filter: {table}"
    );
    assert!(virsh(&["resume", &a]).0);
    let mut detached = false;
    for _ in 0..10 {
        let (s, _) = agent
            .delete(&format!(
                "/v1/private-networks/{net_id}/members/{membership}"
            ))
            .await;
        if s == 200 {
            detached = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(detached, "the detach succeeds once the guest runs");
    let (s, r) = agent
        .delete(&format!("/v1/private-networks/{net_id}"))
        .await;
    assert_eq!(s, 200, "{r}");

    // --- An extra address released while its guest's agent stalls: until the guest and
    // the filter have let go of it, nobody else gets it, so at no moment can A send from
    // an address that belongs to B.
    let (s, added) = agent.post(&format!("/v1/vms/{a}/ips"), json!({})).await;
    assert_eq!(s, 201, "{added}");
    assert_eq!(added["data"]["applied_live"], json!(true), "{added}");
    let x = added["data"]["address"].as_str().unwrap().to_owned();
    let observer = rig.addr(OBSERVER);
    let arrivals = Arrivals::start(&rig);
    let (code, out) = guest_sh(
        &a,
        &format!(
            "nohup python3 -c \"import socket,time\n\
             x=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); x.bind(('{x}',0))\n\
             p=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); p.bind(('{a4}',0))\n\
             t=time.time()\nwhile time.time()-t<900:\n  \
             x.sendto(b'A-X',('{observer}',9998)); p.sendto(b'A-P',('{observer}',9998)); time.sleep(0.1)\" \
             >/dev/null 2>&1 &"
        ),
    );
    assert_eq!(code, 0, "{out}");
    let sending = eventually(Duration::from_secs(120), || {
        arrivals.seen("A-X") && arrivals.seen("A-P")
    })
    .await;
    assert!(sending, "A sends from {x} and from {a4}");
    // A's agent stops answering for 40 s (then wakes up, so the test can go on).
    let (code, out) = guest_sh(
        &a,
        "nohup sh -c 'sleep 1; kill -STOP $(pidof qemu-ga); sleep 40; kill -CONT $(pidof qemu-ga)' \
         >/dev/null 2>&1 &",
    );
    assert_eq!(code, 0, "{out}");
    let stalled = eventually(Duration::from_secs(60), || {
        !virsh(&[
            "qemu-agent-command",
            "--timeout",
            "2",
            &a,
            r#"{"execute":"guest-ping"}"#,
        ])
        .0
    })
    .await;
    assert!(stalled, "A's guest agent stopped answering");
    let remove = {
        let (url, token, path) = (
            agent.url.clone(),
            agent.token.clone(),
            format!("/v1/vms/{a}/ips/{x}"),
        );
        tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .delete(format!("{url}{path}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let given_at = loop {
        let asked = Instant::now();
        let (s, r) = agent
            .post(&format!("/v1/vms/{b}/ips"), json!({"address": x}))
            .await;
        if s == 201 {
            break asked;
        }
        assert_eq!(
            (s, r["error_code"].clone()),
            (409, json!("IP_IN_USE")),
            "{r}"
        );
        assert!(Instant::now() < deadline, "{x} never reached B");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // The address is configured in B's guest (applied live) before B sends from it.
    let configured = eventually(Duration::from_secs(120), || {
        guest_sh(&b, &format!("ip -o addr show | grep -q ' {x}/'")).0 == 0
    })
    .await;
    assert!(configured, "{x} is configured in B");
    let (code, out) = guest_sh(
        &b,
        &format!(
            "python3 -c \"import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.bind(('{x}',0))\nfor _ in range(5): s.sendto(b'B-X',('{observer}',9998)); time.sleep(0.2)\""
        ),
    );
    assert_eq!(code, 0, "B sends from {x}: {out}");
    eventually(Duration::from_secs(30), || arrivals.seen("B-X")).await;
    let got = arrivals.finish();
    let (s, r) = remove.await.unwrap();
    assert_eq!(s, 200, "the removal finishes: {r}");
    let count = |what: &str, after: bool| {
        got.iter()
            .filter(|(t, p)| p == what && (*t > given_at) == after)
            .count()
    };
    assert!(count("A-X", false) > 0, "A sent from {x} while it was A's");
    assert!(
        count("A-P", true) > 0,
        "A's sender and its path stayed alive throughout"
    );
    assert!(count("B-X", true) > 0, "B sends from {x} once it is B's");
    assert_eq!(
        count("A-X", true),
        0,
        "A sent from {x} after it was given to B ({:?} after)",
        got.iter()
            .filter(|(t, p)| p == "A-X" && *t > given_at)
            .map(|(t, _)| t.duration_since(given_at))
            .collect::<Vec<_>>()
    );
    wait_guest_agent(&a, Duration::from_secs(120)).await;

    for id in [&a, &b] {
        let (s, r) = agent.delete(&format!("/v1/vms/{id}")).await;
        assert_eq!(s, 200, "{r}");
    }
    drop(topo);
}
