//! Anti-spoofing: nftables rules in the bridge family, programmed over netlink.
//!
//! Why nftables and not libvirt's nwfilter: nwfilter drives ebtables/iptables through
//! libvirt, cannot update a VM's allowed addresses without re-instantiating its filter, and
//! keeps the rules out of the agent's reach when it reconciles after a host reboot. Here
//! the agent owns one table, rebuilds it atomically from its store, and changes a VM's
//! addresses by updating a named set, live, in one transaction.
//!
//! ```text
//! table bridge hvnode
//!   chain prerouting (hook prerouting, priority -200, policy accept)
//!     iifname "<tap>" jump p_<tap>            one per VM NIC
//!     iifname "<tap prefix>*" drop            fail closed: a VM port without a chain
//!   set <tap>_v4 { the NIC's IPv4 addresses }
//!   set <tap>_v6 { its IPv6 addresses and its EUI-64 link-local address }
//!   chain p_<tap>                              each rule counts and drops; then accept
//!     ether saddr != <mac>
//!     ip saddr != 0.0.0.0 and not in @<tap>_v4
//!     arp sha != <mac>
//!     arp spa != 0.0.0.0 and not in @<tap>_v4
//!     arp spa 0.0.0.0 (a probe) and tpa not in @<tap>_v4
//!     ip6 saddr != :: and not in @<tap>_v6
//!     icmpv6 neighbour solicitation from :: (DAD) for a target not in @<tap>_v6
//!     icmpv6 neighbour advertisement with a target not in @<tap>_v6
//!     icmpv6 router advertisement
//!     ether type other than ip, arp, ip6 (VLAN tags included)
//! ```
//! Rules match the tap by name, so they exist before the tap does and survive its
//! re-creation when the VM restarts. Traffic *to* a VM is not filtered here. A port whose
//! name carries this agent's tap prefix but which has no chain (a NIC the guest refused to
//! give back, a VM the store no longer lists) drops everything: the table fails closed.
//! Duplicate-address probes (ARP from 0.0.0.0, NS from ::) may only ask for the sender's own
//! addresses, so no guest can knock a neighbour's address out.
//!
//! Where private networks ride VXLAN, a second table guards the tunnel's socket:
//! ```text
//! table inet hvnode
//!   set peers4, peers6 { network.private.peers }
//!   chain input (hook input, priority -200, policy accept)
//!     udp dport 4789, VNI within vni_first..vni_last, iifname != <underlay>  drop
//!     … ip saddr not in @peers4                                             drop
//!     … ip6 saddr not in @peers6                                            drop
//! ```
//! so only the fabric speaks for this agent's private networks; VNIs outside its range are
//! left alone (another agent's, or nobody's).
//!
//! Netlink batches are built with `netlink-packet-netfilter` and sent in one transaction
//! (BEGIN … END): the kernel applies all of it or none of it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook,
    Immediate, InetHookNumber, ListAttribute, Lookup, Meta, MetaKey, NfTablesMessage, Operator,
    Payload, Register, RuleAttribute, RuleMessage, SetAttribute, SetElementAttribute,
    SetElementList, SetElementMessage, SetMessage, TableAttribute, TableMessage, Verdict,
    VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use rtnetlink::packet_core::{
    Emitable, NetlinkMessage, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST,
};

use super::{netns, NetworkError};

/// The default table name (`network.filter_table`).
pub const TABLE: &str = "hvnode";
const BASE_CHAIN: &str = "prerouting";

const VXLAN_CHAIN: &str = "input";
/// The VXLAN port the agent's tunnels listen on.
pub const VXLAN_PORT: u16 = 4789;

const PAYLOAD_LL: u32 = 0;
const PAYLOAD_NETWORK: u32 = 1;
const PAYLOAD_TRANSPORT: u32 = 2;
const LOOKUP_INVERT: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const KEY_IPV4: u32 = 7;
const KEY_IPV6: u32 = 8;
const ETH_IP: u16 = 0x0800;
const ETH_ARP: u16 = 0x0806;
const ETH_IP6: u16 = 0x86dd;
const ICMPV6: u8 = 58;
const UDP: u8 = 17;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const ND_ROUTER_ADVERT: u8 = 134;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;

/// One VM NIC as the filter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Host-side tap name.
    pub tap: String,
    pub mac: [u8; 6],
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

impl Port {
    fn set4(&self) -> String {
        format!("{}_v4", self.tap)
    }

    fn set6(&self) -> String {
        format!("{}_v6", self.tap)
    }

    fn chain(&self) -> String {
        format!("p_{}", self.tap)
    }

    /// The addresses a NIC may send from (and probe for): its own, plus its EUI-64
    /// link-local address. The unspecified addresses are handled by the rules.
    fn allowed(&self) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut v4: Vec<Vec<u8>> = self.v4.iter().map(|a| a.octets().to_vec()).collect();
        let mut v6: Vec<Vec<u8>> = self.v6.iter().map(|a| a.octets().to_vec()).collect();
        v6.push(link_local(self.mac).octets().to_vec());
        v4.sort();
        v4.dedup();
        v6.sort();
        v6.dedup();
        (v4, v6)
    }
}

/// `fe80::` + the modified EUI-64 of `mac`.
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    let mut b = [0u8; 16];
    b[0] = 0xfe;
    b[1] = 0x80;
    b[8] = mac[0] ^ 0x02;
    b[9] = mac[1];
    b[10] = mac[2];
    b[11] = 0xff;
    b[12] = 0xfe;
    b[13] = mac[3];
    b[14] = mac[4];
    b[15] = mac[5];
    Ipv6Addr::from(b)
}

/// `52:54:00:12:34:56` → bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    parts.try_into().ok()
}

type Expr = ListAttribute<ExpressionAttribute>;

fn payload(base: u32, offset: u32, len: u32) -> Expr {
    Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
    .into()
}

fn cmp(op: Operator, data: &[u8]) -> Expr {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(op),
        Cmp::Data(DataAttribute::Value(data.to_vec())),
    ])
    .into()
}

fn meta(key: MetaKey) -> Expr {
    Expressions::Meta(vec![
        Meta::DestinationRegister(Register::Reg1),
        Meta::Key(key),
    ])
    .into()
}

fn not_in(set: &str) -> Expr {
    Expressions::Lookup(vec![
        Lookup::SourceRegister(Register::Reg1),
        Lookup::Set(set.to_owned()),
        Lookup::Flags(LOOKUP_INVERT),
    ])
    .into()
}

fn counter() -> Expr {
    Expressions::Other {
        expression_type: "counter".into(),
        attributes: vec![],
    }
    .into()
}

fn verdict(v: Vec<VerdictAttribute>) -> Expr {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(v)),
    ])
    .into()
}

fn drop() -> Expr {
    verdict(vec![VerdictAttribute::Code(Verdict::Other(NF_DROP))])
}

fn accept() -> Expr {
    verdict(vec![VerdictAttribute::Code(Verdict::Other(NF_ACCEPT))])
}

fn ethertype(t: u16) -> Vec<Expr> {
    vec![
        payload(PAYLOAD_LL, 12, 2),
        cmp(Operator::Equal, &t.to_be_bytes()),
    ]
}

fn icmpv6_type(t: u8) -> Vec<Expr> {
    let mut v = ethertype(ETH_IP6);
    v.push(meta(MetaKey::L4Proto));
    v.push(cmp(Operator::Equal, &[ICMPV6]));
    v.push(payload(PAYLOAD_TRANSPORT, 0, 1));
    v.push(cmp(Operator::Equal, &[t]));
    v
}

fn iifname(name: &str) -> Vec<Expr> {
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    vec![meta(MetaKey::Iifname), cmp(Operator::Equal, &n)]
}

/// The match parts of a port's drop rules (each is followed by counter + drop).
fn port_rules(p: &Port) -> Vec<Vec<Expr>> {
    let (s4, s6) = (p.set4(), p.set6());
    let any4 = Ipv4Addr::UNSPECIFIED.octets();
    let any6 = Ipv6Addr::UNSPECIFIED.octets();
    vec![
        vec![payload(PAYLOAD_LL, 6, 6), cmp(Operator::NotEqual, &p.mac)],
        // IPv4 from another address (0.0.0.0 is a DHCP client's).
        [
            ethertype(ETH_IP),
            vec![
                payload(PAYLOAD_NETWORK, 12, 4),
                cmp(Operator::NotEqual, &any4),
                not_in(&s4),
            ],
        ]
        .concat(),
        [
            ethertype(ETH_ARP),
            vec![
                payload(PAYLOAD_NETWORK, 8, 6),
                cmp(Operator::NotEqual, &p.mac),
            ],
        ]
        .concat(),
        // ARP from another address…
        [
            ethertype(ETH_ARP),
            vec![
                payload(PAYLOAD_NETWORK, 14, 4),
                cmp(Operator::NotEqual, &any4),
                not_in(&s4),
            ],
        ]
        .concat(),
        // …or a probe (sender 0.0.0.0) for an address that is not the NIC's.
        [
            ethertype(ETH_ARP),
            vec![
                payload(PAYLOAD_NETWORK, 14, 4),
                cmp(Operator::Equal, &any4),
                payload(PAYLOAD_NETWORK, 24, 4),
                not_in(&s4),
            ],
        ]
        .concat(),
        // IPv6 from another address (:: is duplicate address detection's).
        [
            ethertype(ETH_IP6),
            vec![
                payload(PAYLOAD_NETWORK, 8, 16),
                cmp(Operator::NotEqual, &any6),
                not_in(&s6),
            ],
        ]
        .concat(),
        // A DAD probe (solicitation from ::) for an address that is not the NIC's.
        [
            icmpv6_type(ND_NEIGHBOR_SOLICIT),
            vec![
                payload(PAYLOAD_NETWORK, 8, 16),
                cmp(Operator::Equal, &any6),
                payload(PAYLOAD_TRANSPORT, 8, 16),
                not_in(&s6),
            ],
        ]
        .concat(),
        [
            icmpv6_type(ND_NEIGHBOR_ADVERT),
            vec![payload(PAYLOAD_TRANSPORT, 8, 16), not_in(&s6)],
        ]
        .concat(),
        icmpv6_type(ND_ROUTER_ADVERT),
        vec![
            payload(PAYLOAD_LL, 12, 2),
            cmp(Operator::NotEqual, &ETH_IP.to_be_bytes()),
            cmp(Operator::NotEqual, &ETH_ARP.to_be_bytes()),
            cmp(Operator::NotEqual, &ETH_IP6.to_be_bytes()),
        ],
    ]
}

/// `iifname "<prefix>*"`: a name comparison on the prefix's bytes only.
fn iifname_prefix(prefix: &str) -> Vec<Expr> {
    vec![
        meta(MetaKey::Iifname),
        cmp(Operator::Equal, prefix.as_bytes()),
    ]
}

/// Who may send VXLAN to this host for this agent's networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanGuard {
    /// The underlay interface; VXLAN arriving on any other is dropped.
    pub underlay: String,
    pub peers: Vec<IpAddr>,
    pub vni_first: u32,
    pub vni_last: u32,
}

/// The match of VXLAN datagrams for a VNI within `first..=last`.
fn vxlan_in_range(first: u32, last: u32) -> Vec<Expr> {
    let vni = |v: u32| v.to_be_bytes()[1..].to_vec();
    vec![
        meta(MetaKey::L4Proto),
        cmp(Operator::Equal, &[UDP]),
        payload(PAYLOAD_TRANSPORT, 2, 2),
        cmp(Operator::Equal, &VXLAN_PORT.to_be_bytes()),
        // The VNI: 24 bits, 4 bytes into the VXLAN header after the 8-byte UDP header.
        payload(PAYLOAD_TRANSPORT, 12, 3),
        cmp(Operator::GreatherThanEqual, &vni(first)),
        cmp(Operator::LessThanEqual, &vni(last)),
    ]
}

/// The messages of one nf_tables transaction on one table.
pub struct Batch {
    table: String,
    family: NetfilterProtoFamily,
    msgs: Vec<NetlinkMessage<NetfilterMessage>>,
    next_id: u32,
}

/// Which of the agent's two tables a batch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Anti-spoofing on VM ports.
    Bridge,
    /// The VXLAN guard.
    Inet,
}

impl Batch {
    fn new(table: &str, family: Family) -> Batch {
        Batch {
            table: table.to_owned(),
            family: match family {
                Family::Bridge => NetfilterProtoFamily::Bridge,
                Family::Inet => NetfilterProtoFamily::Inet,
            },
            msgs: Vec::new(),
            next_id: 0,
        }
    }

    fn push(&mut self, inner: NfTablesMessage, flags: u16) {
        let mut m = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(self.family, 0, 0),
            inner,
        ));
        m.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        self.msgs.push(m);
    }

    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    fn table(&mut self, delete: bool) {
        let msg = TableMessage {
            attributes: vec![TableAttribute::Name(self.table.clone())],
        };
        if delete {
            self.push(NfTablesMessage::DeleteTable(msg), 0);
        } else {
            self.push(NfTablesMessage::NewTable(msg), NLM_F_CREATE);
        }
    }

    fn chain(&mut self, name: &str, hook: Option<InetHookNumber>) {
        let mut attributes = vec![
            ChainAttribute::Table(self.table.clone()),
            ChainAttribute::Name(name.into()),
        ];
        if let Some(hook) = hook {
            attributes.push(ChainAttribute::Type("filter".into()));
            attributes.push(ChainAttribute::Policy(NF_ACCEPT));
            attributes.push(ChainAttribute::Hook(vec![
                Hook::Number(hook.into()),
                Hook::Priority(-200i32 as u32),
            ]));
        }
        self.push(
            NfTablesMessage::NewChain(ChainMessage { attributes }),
            NLM_F_CREATE,
        );
    }

    fn rule(&mut self, chain: &str, exprs: Vec<Expr>) {
        self.push(
            NfTablesMessage::NewRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(self.table.clone()),
                    RuleAttribute::Chain(chain.into()),
                    RuleAttribute::Expressions(exprs),
                ],
            }),
            NLM_F_CREATE | NLM_F_APPEND,
        );
    }

    fn set(&mut self, name: &str, key_type: u32, key_len: u32) {
        self.next_id += 1;
        let id = self.next_id;
        self.push(
            NfTablesMessage::NewSet(SetMessage {
                attributes: vec![
                    SetAttribute::Table(self.table.clone()),
                    SetAttribute::Name(name.into()),
                    SetAttribute::KeyType(key_type),
                    SetAttribute::KeyLen(key_len),
                    SetAttribute::Id(id),
                ],
            }),
            NLM_F_CREATE,
        );
    }

    fn elements(&mut self, set: &str, keys: Vec<Vec<u8>>) {
        if keys.is_empty() {
            return;
        }
        let elements = keys
            .into_iter()
            .map(|k| {
                ListAttribute::Element(vec![SetElementAttribute::Key(DataAttribute::Value(k))])
            })
            .collect();
        self.push(
            NfTablesMessage::NewSetElement(SetElementMessage {
                attributes: vec![
                    SetElementList::Table(self.table.clone()),
                    SetElementList::Set(set.into()),
                    SetElementList::Elements(elements),
                ],
            }),
            NLM_F_CREATE,
        );
    }

    /// Removes every element of `set`.
    fn flush_set(&mut self, set: &str) {
        self.push(
            NfTablesMessage::DeleteSetElement(SetElementMessage {
                attributes: vec![
                    SetElementList::Table(self.table.clone()),
                    SetElementList::Set(set.into()),
                ],
            }),
            0,
        );
    }

    /// The whole table for `ports`, replacing whatever table was there. Ports named with
    /// `tap_prefix` that are not among `ports` drop everything.
    pub fn rebuild(table: &str, ports: &[Port], tap_prefix: &str) -> Batch {
        let mut b = Batch::new(table, Family::Bridge);
        // Create-then-delete makes the delete valid whether or not the table existed.
        b.table(false);
        b.table(true);
        b.table(false);
        b.chain(BASE_CHAIN, Some(InetHookNumber::PreRouting));
        for p in ports {
            let (v4, v6) = p.allowed();
            b.set(&p.set4(), KEY_IPV4, 4);
            b.set(&p.set6(), KEY_IPV6, 16);
            b.elements(&p.set4(), v4);
            b.elements(&p.set6(), v6);
            let chain = p.chain();
            b.chain(&chain, None);
            for r in port_rules(p) {
                b.rule(&chain, [r, vec![counter(), drop()]].concat());
            }
            // What passed every rule is the port's own traffic: accepted here, so it does
            // not fall through to the fail-closed rule after the jump returns.
            b.rule(&chain, vec![accept()]);
            let jump = verdict(vec![
                VerdictAttribute::Code(Verdict::Jump),
                VerdictAttribute::Chain(chain.clone()),
            ]);
            b.rule(BASE_CHAIN, [iifname(&p.tap), vec![jump]].concat());
        }
        // A port that jumped to its chain and passed it was accepted there; whatever
        // reaches this rule from a VM port had no chain.
        b.rule(
            BASE_CHAIN,
            [iifname_prefix(tap_prefix), vec![counter(), drop()]].concat(),
        );
        b
    }

    /// The VXLAN guard's table, replacing whatever was there.
    pub fn vxlan_guard(table: &str, guard: &VxlanGuard) -> Batch {
        let mut b = Batch::new(table, Family::Inet);
        b.table(false);
        b.table(true);
        b.table(false);
        b.chain(VXLAN_CHAIN, Some(InetHookNumber::LocalIn));
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for p in &guard.peers {
            match p {
                IpAddr::V4(a) => v4.push(a.octets().to_vec()),
                IpAddr::V6(a) => v6.push(a.octets().to_vec()),
            }
        }
        b.set("peers4", KEY_IPV4, 4);
        b.set("peers6", KEY_IPV6, 16);
        b.elements("peers4", v4);
        b.elements("peers6", v6);
        let vxlan = vxlan_in_range(guard.vni_first, guard.vni_last);
        let mut underlay = guard.underlay.as_bytes().to_vec();
        underlay.push(0);
        let drop_if = |b: &mut Batch, m: Vec<Expr>| {
            b.rule(
                VXLAN_CHAIN,
                [vxlan.clone(), m, vec![counter(), drop()]].concat(),
            )
        };
        drop_if(
            &mut b,
            vec![meta(MetaKey::Iifname), cmp(Operator::NotEqual, &underlay)],
        );
        drop_if(
            &mut b,
            vec![
                meta(MetaKey::Nfproto),
                cmp(Operator::Equal, &[NFPROTO_IPV4]),
                payload(PAYLOAD_NETWORK, 12, 4),
                not_in("peers4"),
            ],
        );
        drop_if(
            &mut b,
            vec![
                meta(MetaKey::Nfproto),
                cmp(Operator::Equal, &[NFPROTO_IPV6]),
                payload(PAYLOAD_NETWORK, 8, 16),
                not_in("peers6"),
            ],
        );
        b
    }

    /// Replaces the allowed addresses of an existing port.
    pub fn addresses(table: &str, port: &Port) -> Batch {
        let mut b = Batch::new(table, Family::Bridge);
        let (v4, v6) = port.allowed();
        b.flush_set(&port.set4());
        b.flush_set(&port.set6());
        b.elements(&port.set4(), v4);
        b.elements(&port.set6(), v6);
        b
    }

    /// Deletes the table (and every rule in it).
    pub fn remove_table(table: &str, family: Family) -> Batch {
        let mut b = Batch::new(table, family);
        b.table(false);
        b.table(true);
        b
    }

    /// BEGIN + messages + END in one buffer; returns it and the number of acknowledgements
    /// to expect.
    fn serialize(self) -> (Vec<u8>, usize) {
        let control = |c: ControlMessage| {
            let mut m = NetlinkMessage::from(NetfilterMessage::new(
                NetfilterHeader::new(
                    NetfilterProtoFamily::Unspec,
                    0,
                    libc::NFNL_SUBSYS_NFTABLES as u16,
                ),
                c,
            ));
            m.header.flags = NLM_F_REQUEST;
            m
        };
        let acks = self.msgs.len();
        let mut all = Vec::with_capacity(acks + 2);
        all.push(control(ControlMessage::BatchBegin));
        all.extend(self.msgs);
        all.push(control(ControlMessage::BatchEnd));
        let mut buf = Vec::new();
        for (seq, mut m) in all.into_iter().enumerate() {
            m.header.sequence_number = seq as u32 + 1;
            m.finalize();
            let start = buf.len();
            buf.resize(start + m.buffer_len(), 0);
            m.emit(&mut buf[start..]);
        }
        (buf, acks)
    }

    /// Sends the transaction inside `netns` and waits for every acknowledgement.
    pub async fn commit(self, netns_name: &str) -> Result<(), NetworkError> {
        if self.is_empty() {
            return Ok(());
        }
        let netns_name = netns_name.to_owned();
        tokio::task::spawn_blocking(move || {
            let (buf, acks) = self.serialize();
            netns::in_netns(&netns_name, move || send_batch(&buf, acks))
        })
        .await
        .map_err(|_| NetworkError::Namespace("nftables worker vanished".into()))?
    }
}

/// One netlink round trip: the whole batch in one `send`, then its acknowledgements.
fn send_batch(buf: &[u8], acks: usize) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket};
    let sock = Socket::new(NETLINK_NETFILTER)?;
    // Room for big rulesets and one acknowledgement per message.
    // SAFETY: the fd is owned by `sock`, which outlives these calls.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock.as_raw_fd()) };
    let want = (buf.len() * 2).max(1 << 20);
    let _ = setsockopt(&fd, sockopt::SndBufForce, &want);
    let _ = setsockopt(&fd, sockopt::RcvBufForce, &(acks * 64).max(1 << 20));
    sock.send(buf, 0)?;
    let mut seen = 0usize;
    let mut rbuf = vec![0u8; 1 << 16];
    while seen < acks {
        let n = sock.recv(&mut &mut rbuf[..], 0)?;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(rbuf[off..off + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(rbuf[off + 4..off + 6].try_into().expect("2 bytes"));
            if kind == libc::NLMSG_ERROR as u16 && off + 20 <= n {
                let code =
                    i32::from_ne_bytes(rbuf[off + 16..off + 20].try_into().expect("4 bytes"));
                if code != 0 {
                    return Err(std::io::Error::other(format!(
                        "nf_tables rejected the transaction: {}",
                        std::io::Error::from_raw_os_error(-code)
                    )));
                }
                seen += 1;
            }
            if len < 16 {
                break;
            }
            off += (len + 3) & !3;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> Port {
        Port {
            tap: "vh0123456789ab0".into(),
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            v4: vec!["203.0.113.10".parse().unwrap()],
            v6: vec![],
        }
    }

    #[test]
    fn link_local_addresses_are_modified_eui64() {
        assert_eq!(
            link_local([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]).to_string(),
            "fe80::5054:ff:fe12:3456"
        );
    }

    #[test]
    fn macs_parse_from_colon_hex() {
        assert_eq!(
            parse_mac("52:54:00:ab:cd:ef"),
            Some([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef])
        );
        assert_eq!(parse_mac("52:54:00:ab:cd"), None);
        assert_eq!(parse_mac("zz:54:00:ab:cd:ef"), None);
    }

    #[test]
    fn allowed_addresses_are_the_nics_own_and_its_link_local() {
        let (v4, v6) = port().allowed();

        assert_eq!(v4, vec![vec![203, 0, 113, 10]]);
        assert_eq!(v6, vec![link_local(port().mac).octets().to_vec()]);
    }

    #[test]
    fn a_rebuild_holds_table_base_chain_and_per_port_pieces() {
        let batch = Batch::rebuild(
            TABLE,
            &[
                port(),
                Port {
                    tap: "vhffffffffffff1".into(),
                    ..port()
                },
            ],
            "vh",
        );

        // 3 table messages + base chain, then per port: 2 sets, 2 element lists, a chain,
        // 10 drop rules, the accept and the jump; then the fail-closed rule.
        assert_eq!(batch.len(), 4 + 2 * (2 + 2 + 1 + 10 + 1 + 1) + 1);
    }

    #[test]
    fn the_vxlan_guard_holds_its_peers_and_three_drop_rules() {
        let batch = Batch::vxlan_guard(
            TABLE,
            &VxlanGuard {
                underlay: "eth1".into(),
                peers: vec!["192.0.2.2".parse().unwrap(), "2001:db8::2".parse().unwrap()],
                vni_first: 100,
                vni_last: 199,
            },
        );

        // 3 table messages + chain, 2 sets, 2 element lists, 3 rules.
        assert_eq!(batch.len(), 4 + 2 + 2 + 3);
    }

    #[test]
    fn an_address_update_flushes_and_refills_both_sets() {
        let batch = Batch::addresses(TABLE, &port());

        assert_eq!(batch.len(), 4);
    }

    #[test]
    fn a_batch_serializes_between_begin_and_end() {
        let (buf, acks) = Batch::remove_table(TABLE, Family::Bridge).serialize();

        assert_eq!(acks, 2);
        // Four netlink messages, each starting with its length.
        let mut off = 0;
        let mut count = 0;
        while off < buf.len() {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            off += (len + 3) & !3;
            count += 1;
        }
        assert_eq!(count, 4);
    }
}
