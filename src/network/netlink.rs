//! rtnetlink inside the data-plane namespace: bridges, VXLAN, IFB devices, ports, FDB and
//! neighbour entries.
//!
//! A netlink socket belongs to the namespace it was created in, so `open` creates it on a
//! short-lived thread that entered `network.netns` and hands it to the runtime; the agent's
//! own threads never change namespace. Each operation batch opens its own handle, so a
//! namespace that was re-created (or a socket that broke) costs nothing but one retry.

use std::net::IpAddr;
use std::os::fd::{FromRawFd, IntoRawFd};

use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkIfb, LinkUnspec, LinkVlan, LinkVxlan};

use super::{netns, NetworkError};

type Result<T, E = NetworkError> = std::result::Result<T, E>;

fn nl(op: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    move |e| NetworkError::Netlink {
        op,
        message: e.to_string(),
    }
}

/// An rtnetlink handle whose socket lives in `netns` (empty: the agent's own namespace).
/// Must be called inside the tokio runtime.
pub fn open(netns_name: &str) -> Result<Handle> {
    use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, TokioSocket};
    let fd = netns::in_netns(netns_name, || {
        let s = Socket::new(NETLINK_ROUTE)?;
        Ok(s.into_raw_fd())
    })?;
    // SAFETY: `fd` was just created by `Socket::new` and its ownership handed over by
    // `into_raw_fd`; nothing else holds it.
    let mut sock = unsafe { Socket::from_raw_fd(fd) };
    sock.bind_auto()
        .map_err(NetworkError::io("bind netlink socket"))?;
    sock.set_non_blocking(true)
        .map_err(NetworkError::io("configure netlink socket"))?;
    // SAFETY: as above; the fd moves from `sock` into the tokio socket, which registers it
    // with the current runtime's reactor.
    let tsock = unsafe { TokioSocket::from_raw_fd(sock.into_raw_fd()) };
    let (conn, handle, _) = rtnetlink::from_socket(tsock);
    tokio::spawn(conn);
    Ok(handle)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub master: Option<u32>,
    pub kind: Option<String>,
}

fn info(m: &LinkMessage) -> LinkInfo {
    use rtnetlink::packet_route::link::{InfoKind, LinkInfo as Li};
    let mut out = LinkInfo {
        index: m.header.index,
        name: String::new(),
        master: None,
        kind: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => out.name = n.clone(),
            LinkAttribute::Controller(c) => out.master = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let Li::Kind(k) = i {
                        out.kind = Some(match k {
                            InfoKind::Bridge => "bridge".into(),
                            InfoKind::Vxlan => "vxlan".into(),
                            InfoKind::Tun => "tun".into(),
                            InfoKind::Ifb => "ifb".into(),
                            InfoKind::Veth => "veth".into(),
                            other => format!("{other:?}").to_lowercase(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    out
}

pub async fn link(h: &Handle, name: &str) -> Result<Option<LinkInfo>> {
    let mut s = h.link().get().match_name(name.to_owned()).execute();
    match s.try_next().await {
        Ok(m) => Ok(m.as_ref().map(info)),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl("get link")(e)),
    }
}

pub async fn links(h: &Handle) -> Result<Vec<LinkInfo>> {
    let mut out = Vec::new();
    let mut s = h.link().get().execute();
    while let Some(m) = s.try_next().await.map_err(nl("list links"))? {
        out.push(info(&m));
    }
    Ok(out)
}

async fn index(h: &Handle, name: &str) -> Result<u32> {
    link(h, name)
        .await?
        .map(|l| l.index)
        .ok_or_else(|| NetworkError::NoLink(name.to_owned()))
}

pub async fn set_up(h: &Handle, index: u32) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl("set link up"))
}

/// Creates the bridge if absent, and brings it up. Returns its index.
///
/// The bridge snoops multicast and is a querier itself (where no other querier answers),
/// so that VM ports, which get no unregistered multicast, still get what their guests
/// joined: IPv6 neighbour discovery goes to solicited-node groups.
pub async fn ensure_bridge(h: &Handle, name: &str) -> Result<u32> {
    if link(h, name).await?.is_none() {
        h.link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await
            .map_err(nl("create bridge"))?;
    }
    h.link()
        .change(
            LinkBridge::new(name)
                .mcast_snooping(true)
                .mcast_querier(true)
                .build(),
        )
        .execute()
        .await
        .map_err(nl("configure bridge multicast"))?;
    let i = index(h, name).await?;
    set_up(h, i).await?;
    Ok(i)
}

/// Makes a VM's port one that cannot read other tenants' traffic: it learns nothing (so
/// no frame from it moves an address), gets no unknown unicast and no unregistered
/// multicast (broadcast stays, ARP needs it), and its MAC is a static, sticky entry so
/// that traffic to the VM still finds it.
pub async fn harden_vm_port(h: &Handle, port: &str, mac: [u8; 6]) -> Result<()> {
    let p = index(h, port).await?;
    h.link()
        .set_port(
            LinkBridgePort::new(p)
                .learning(false)
                .flood(false)
                .mcast_flood(false)
                .bcast_flood(true)
                .build(),
        )
        .execute()
        .await
        .map_err(nl("configure VM bridge port"))?;
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = p;
    m.header.state = NeighbourState::Noarp;
    m.header.flags = NeighbourFlags::Controller | NeighbourFlags::Sticky;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(m));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    send(h, req, "add static fdb entry").await
}

/// Makes `port` a port of `bridge` (no-op when it already is) and brings it up.
pub async fn ensure_port(h: &Handle, port: &str, bridge: &str) -> Result<()> {
    let p = link(h, port)
        .await?
        .ok_or_else(|| NetworkError::NoLink(port.to_owned()))?;
    let b = index(h, bridge).await?;
    if p.master != Some(b) {
        h.link()
            .set(LinkUnspec::new_with_index(p.index).controller(b).build())
            .execute()
            .await
            .map_err(nl("set master"))?;
    }
    set_up(h, p.index).await
}

pub async fn delete_link(h: &Handle, name: &str) -> Result<()> {
    match link(h, name).await? {
        Some(l) => h
            .link()
            .del(l.index)
            .execute()
            .await
            .map_err(nl("delete link")),
        None => Ok(()),
    }
}

pub async fn ensure_ifb(h: &Handle, name: &str) -> Result<u32> {
    if link(h, name).await?.is_none() {
        h.link()
            .add(LinkIfb::new(name).build())
            .execute()
            .await
            .map_err(nl("create ifb"))?;
    }
    let i = index(h, name).await?;
    set_up(h, i).await?;
    Ok(i)
}

/// A VXLAN device for `vni` over `underlay`, sourced from `local`, enslaved to `bridge`.
/// It learns nothing from what arrives (a forged frame must not move a MAC to its sender):
/// its forwarding entries are the ones the agent writes.
pub async fn ensure_vxlan(
    h: &Handle,
    name: &str,
    vni: u32,
    local: IpAddr,
    underlay: &str,
    mtu: u32,
    bridge: &str,
) -> Result<u32> {
    let dev = index(h, underlay).await?;
    if link(h, name).await?.is_none() {
        let mut b = LinkVxlan::new(name, vni)
            .port(super::nft::VXLAN_PORT)
            .dev(dev)
            .learning(false)
            .mtu(mtu);
        b = match local {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        };
        h.link()
            .add(b.build())
            .execute()
            .await
            .map_err(nl("create vxlan"))?;
    } else {
        // One an older agent made learning.
        h.link()
            .change(LinkVxlan::new(name, vni).learning(false).build())
            .execute()
            .await
            .map_err(nl("configure vxlan"))?;
    }
    ensure_port(h, name, bridge).await?;
    index(h, name).await
}

/// An 802.1Q sub-interface of `trunk` for `vlan`, enslaved to `bridge`.
pub async fn ensure_vlan(
    h: &Handle,
    name: &str,
    trunk: &str,
    vlan: u16,
    bridge: &str,
) -> Result<u32> {
    let base = index(h, trunk).await?;
    if link(h, name).await?.is_none() {
        h.link()
            .add(LinkVlan::new(name, base, vlan).build())
            .execute()
            .await
            .map_err(nl("create vlan"))?;
    }
    ensure_port(h, name, bridge).await?;
    index(h, name).await
}

/// `bridge fdb append 00:00:00:00:00:00 dev VXLAN dst PEER`: floods broadcast and unknown
/// traffic to `peer` (head-end replication, no multicast needed in the underlay).
pub async fn fdb_append_flood(h: &Handle, vxlan: u32, peer: IpAddr) -> Result<()> {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = vxlan;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(vec![0; 6]));
    m.attributes
        .push(NeighbourAttribute::Destination(match peer {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(m));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
    send(h, req, "fdb append").await.or_else(|e| match &e {
        NetworkError::Netlink { message, .. } if message.contains("File exists") => Ok(()),
        _ => Err(e),
    })
}

/// Forgets what the neighbour cache knows about `addr` (after it moved to another MAC).
pub async fn forget_neighbour(h: &Handle, addr: IpAddr) -> Result<()> {
    let family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let mut s = h.neighbours().get().set_address_family(family).execute();
    let mut matches = Vec::new();
    while let Some(m) = s.try_next().await.map_err(nl("list neighbours"))? {
        let hit = m.attributes.iter().any(|a| match (a, addr) {
            (NeighbourAttribute::Destination(NeighbourAddress::Inet(x)), IpAddr::V4(y)) => *x == y,
            (NeighbourAttribute::Destination(NeighbourAddress::Inet6(x)), IpAddr::V6(y)) => *x == y,
            _ => false,
        });
        if hit {
            matches.push(m);
        }
    }
    for m in matches {
        let _ = h.neighbours().del(m).execute().await;
    }
    Ok(())
}

/// Sends a hand-built request and checks its acknowledgement.
pub async fn send(
    h: &Handle,
    req: NetlinkMessage<RouteNetlinkMessage>,
    op: &'static str,
) -> Result<()> {
    let mut h = h.clone();
    let mut resp = h.request(req).map_err(nl(op))?;
    while let Some(m) = resp.next().await {
        if let NetlinkPayload::Error(e) = m.payload {
            if e.code.is_some() {
                return Err(NetworkError::Netlink {
                    op,
                    message: std::io::Error::from_raw_os_error(-e.raw_code()).to_string(),
                });
            }
        }
    }
    Ok(())
}
