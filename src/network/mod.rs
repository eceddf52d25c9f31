//! Networking: which addresses and MACs a VM gets, and the host side of its NICs.
//!
//! - `ipam` hands out public addresses from the configured pools; allocations live in the
//!   store and are taken inside the same transaction that admits a VM or adds an address,
//!   so one address never goes to two VMs, restarts and crashes included.
//! - `private` allocates private networks' subnets and VNIs.
//! - The host side, all through netlink in the data-plane namespace (`network.netns`):
//!   `netlink` (public bridge and uplink, per-network bridges with their VXLAN or VLAN
//!   device and flood entries, IFB devices), `tc` (bandwidth limits on taps) and `nft`
//!   (anti-spoofing filters).
//!
//! `NetworkManager::apply` makes the host match a `DesiredNetwork` computed from the store:
//! it is what runs after a VM starts, after a NIC or address changes, and at startup, when
//! after a host reboot nothing is configured. It creates what is missing, fixes what
//! drifted and removes what no VM or network needs any more (leftover IFBs, bridges and
//! VXLANs with hvnode's prefixes), so running it twice changes nothing.

pub mod ipam;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod private;
pub mod tc;

use std::collections::HashSet;
use std::net::IpAddr;

use rand::Rng;

use crate::config::NetworkConfig;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("netlink {op} failed: {message}")]
    Netlink { op: &'static str, message: String },
    #[error("no network interface {0}")]
    NoLink(String),
    #[error("network namespace: {0}")]
    Namespace(String),
    #[error("cannot {op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

impl NetworkError {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> NetworkError {
        move |source| NetworkError::Io { op, source }
    }
}

/// An address as an integer, for range arithmetic on IPv4 and IPv6 alike.
pub fn ip_to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// A random locally administered unicast MAC in QEMU's `52:54:00` prefix.
pub fn random_mac() -> String {
    let b: [u8; 3] = rand::rng().random();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// Host-side name of a VM's tap: the two-character `network.tap_prefix` + 12 hex digits of
/// its id + the NIC index (0 public, 1-9 private). 15 characters (IFNAMSIZ), recognisably
/// ours; VMs whose ids share those 12 digits are refused at admission.
pub fn tap_name(prefix: &str, vm: uuid::Uuid, nic: u8) -> String {
    let hex = vm.simple().to_string();
    format!("{prefix}{}{}", &hex[..12], nic % 10)
}

/// The part of a VM's id its device names carry: two VMs sharing it would share taps,
/// IFBs and filter chains.
pub fn name_key(vm: uuid::Uuid) -> String {
    vm.simple().to_string()[..12].to_owned()
}

/// The IFB device shaping a tap's uploads: `vb` + the same suffix.
pub fn ifb_name(vm: uuid::Uuid, nic: u8) -> String {
    let hex = vm.simple().to_string();
    format!("vb{}{}", &hex[..12], nic % 10)
}

/// The bridge of a private network: `hvp` + VNI.
pub fn private_bridge(vni: u32) -> String {
    format!("hvp{vni}")
}

/// The VXLAN (or VLAN) device carrying a private network to other hosts.
pub fn private_tunnel(vni: u32) -> String {
    format!("hvx{vni}")
}

/// One VM NIC as the host should have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    pub tap: String,
    pub ifb: String,
    pub mac: String,
    pub bridge: String,
    pub addresses: Vec<IpAddr>,
    /// Shaping in Mbit/s, both directions.
    pub bandwidth_mbps: Option<u32>,
}

impl NicSpec {
    fn port(&self) -> Option<nft::Port> {
        let mac = nft::parse_mac(&self.mac)?;
        let mut port = nft::Port {
            tap: self.tap.clone(),
            mac,
            v4: Vec::new(),
            v6: Vec::new(),
        };
        for a in &self.addresses {
            match a {
                IpAddr::V4(v) => port.v4.push(*v),
                IpAddr::V6(v) => port.v6.push(*v),
            }
        }
        Some(port)
    }
}

/// A private network as the host should carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSpec {
    pub vni: u32,
}

/// Everything the host's network should hold, computed from the store.
#[derive(Debug, Clone, Default)]
pub struct DesiredNetwork {
    /// NICs of every VM the agent knows (running or not).
    pub nics: Vec<NicSpec>,
    pub segments: Vec<SegmentSpec>,
}

/// What re-applying the host network did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[schema(as = NetworkApplied)]
pub struct Applied {
    pub bridges_created: Vec<String>,
    pub ports_attached: Vec<String>,
    pub limits_applied: Vec<String>,
    pub removed: Vec<String>,
    pub filter_ports: usize,
    /// What could not be configured (a missing uplink, a tunnel the kernel refuses, …).
    /// Each is reported and the rest is still applied: one bad segment must not leave the
    /// other VMs unconfigured or unfiltered.
    pub errors: Vec<String>,
}

#[derive(Clone)]
pub struct NetworkManager {
    config: NetworkConfig,
}

impl NetworkManager {
    pub fn new(config: NetworkConfig) -> NetworkManager {
        NetworkManager { config }
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// Makes the host's filters, bridges, ports and limits match `desired`, and removes what
    /// nothing in it needs. The filter table comes first, so no VM ever runs unfiltered
    /// because something else failed; each other item that fails is recorded in
    /// `Applied::errors` and the rest goes on. Only the filters failing is an error.
    pub async fn apply(&self, desired: &DesiredNetwork) -> Result<Applied, NetworkError> {
        let mut done = Applied {
            filter_ports: self.apply_filters(desired).await?,
            ..Applied::default()
        };
        let h = netlink::open(&self.config.netns)?;
        let before = link_names(&h).await?;

        // The public bridge and its uplink.
        match netlink::ensure_bridge(&h, &self.config.bridge).await {
            Ok(_) if !before.contains(&self.config.bridge) => {
                done.bridges_created.push(self.config.bridge.clone())
            }
            Ok(_) => {}
            Err(e) => done
                .errors
                .push(format!("bridge {}: {e}", self.config.bridge)),
        }
        if !self.config.uplink.is_empty() {
            if let Err(e) = netlink::ensure_port(&h, &self.config.uplink, &self.config.bridge).await
            {
                done.errors
                    .push(format!("uplink {}: {e}", self.config.uplink));
            }
        }

        self.attach_with(&h, desired, &before, &mut done).await;

        // Leftovers of VMs and networks that are gone.
        let wanted: HashSet<String> = desired
            .nics
            .iter()
            .map(|n| n.ifb.clone())
            .chain(
                desired
                    .segments
                    .iter()
                    .flat_map(|s| [private_bridge(s.vni), private_tunnel(s.vni)]),
            )
            .collect();
        let vnis = self.config.private.vni_first..=self.config.private.vni_last;
        for name in before.iter().filter(|_| self.config.remove_leftovers) {
            if is_ours(name, &vnis) && !wanted.contains(name) {
                match netlink::delete_link(&h, name).await {
                    Ok(_) => done.removed.push(name.clone()),
                    Err(e) => done.errors.push(format!("remove {name}: {e}")),
                }
            }
        }
        Ok(done)
    }

    /// Creates `desired`'s segments, and puts its taps that exist on their bridges with their
    /// limits. Touches nothing else.
    pub async fn attach(&self, desired: &DesiredNetwork) -> Result<Applied, NetworkError> {
        let h = netlink::open(&self.config.netns)?;
        let before = link_names(&h).await?;
        let mut done = Applied::default();
        self.attach_with(&h, desired, &before, &mut done).await;
        match done.errors.first() {
            None => Ok(done),
            Some(e) => Err(NetworkError::Netlink {
                op: "attach",
                message: e.clone(),
            }),
        }
    }

    async fn attach_with(
        &self,
        h: &rtnetlink::Handle,
        desired: &DesiredNetwork,
        before: &HashSet<String>,
        done: &mut Applied,
    ) {
        for seg in &desired.segments {
            if let Err(e) = self.ensure_segment(h, seg, done, before).await {
                done.errors
                    .push(format!("private network {}: {e}", seg.vni));
            }
        }
        // Taps exist while their VM runs.
        for nic in &desired.nics {
            if !before.contains(&nic.tap) {
                continue;
            }
            let plugged = async {
                netlink::ensure_port(h, &nic.tap, &nic.bridge).await?;
                if let Some(mac) = nft::parse_mac(&nic.mac) {
                    netlink::harden_vm_port(h, &nic.tap, mac).await?;
                }
                match nic.bandwidth_mbps {
                    Some(mbps) => tc::limit(h, &nic.tap, &nic.ifb, mbps).await.map(|_| true),
                    None => tc::unlimit(h, &nic.tap, &nic.ifb).await.map(|_| false),
                }
            }
            .await;
            match plugged {
                Ok(limited) => {
                    done.ports_attached.push(nic.tap.clone());
                    if limited {
                        done.limits_applied.push(nic.tap.clone());
                    }
                }
                Err(e) => done.errors.push(format!("tap {}: {e}", nic.tap)),
            }
        }
    }

    async fn ensure_segment(
        &self,
        h: &rtnetlink::Handle,
        seg: &SegmentSpec,
        done: &mut Applied,
        before: &HashSet<String>,
    ) -> Result<(), NetworkError> {
        let p = &self.config.private;
        let bridge = private_bridge(seg.vni);
        netlink::ensure_bridge(h, &bridge).await?;
        if !before.contains(&bridge) {
            done.bridges_created.push(bridge.clone());
        }
        let tunnel = private_tunnel(seg.vni);
        if !p.vlan_trunk.is_empty() {
            let vlan = u16::try_from(seg.vni)
                .ok()
                .filter(|v| (1..=4094).contains(v))
                .ok_or_else(|| {
                    NetworkError::Unsupported(format!(
                        "network {} cannot ride an 802.1Q trunk: VLAN ids are 1-4094",
                        seg.vni
                    ))
                })?;
            return netlink::ensure_vlan(h, &tunnel, &p.vlan_trunk, vlan, &bridge)
                .await
                .map(|_| ())
                .map_err(|e| {
                    NetworkError::Unsupported(format!(
                        "cannot create 802.1Q sub-interface {tunnel} on trunk {} ({e}); this \
                         kernel may lack 802.1Q support: use VXLAN (network.private.underlay)",
                        p.vlan_trunk
                    ))
                });
        }
        if p.underlay.is_empty() {
            return Ok(());
        }
        let Some(local) = p.local_ip else {
            return Ok(());
        };
        let vx =
            netlink::ensure_vxlan(h, &tunnel, seg.vni, local, &p.underlay, p.mtu, &bridge).await?;
        for peer in &p.peers {
            netlink::fdb_append_flood(h, vx, *peer).await?;
        }
        Ok(())
    }

    /// Rebuilds the anti-spoofing table from `desired`, and the VXLAN guard where private
    /// networks ride VXLAN; returns the number of ports.
    pub async fn apply_filters(&self, desired: &DesiredNetwork) -> Result<usize, NetworkError> {
        let table = &self.config.filter_table;
        let p = &self.config.private;
        if !self.config.filter {
            nft::Batch::remove_table(table, nft::Family::Bridge)
                .commit(&self.config.netns)
                .await?;
            nft::Batch::remove_table(table, nft::Family::Inet)
                .commit(&self.config.netns)
                .await?;
            return Ok(0);
        }
        let ports: Vec<nft::Port> = desired.nics.iter().filter_map(NicSpec::port).collect();
        let n = ports.len();
        nft::Batch::rebuild(table, &ports, &self.config.tap_prefix)
            .commit(&self.config.netns)
            .await?;
        // Without an underlay this agent has no tunnel to guard (and in a namespace shared
        // with other agents, a guard for its VNI range would cut theirs).
        let guard = if p.underlay.is_empty() || !p.vlan_trunk.is_empty() {
            nft::Batch::remove_table(table, nft::Family::Inet)
        } else {
            nft::Batch::vxlan_guard(
                table,
                &nft::VxlanGuard {
                    underlay: p.underlay.clone(),
                    peers: p.peers.clone(),
                    vni_first: p.vni_first,
                    vni_last: p.vni_last,
                },
            )
        };
        guard.commit(&self.config.netns).await?;
        Ok(n)
    }

    /// Changes one NIC's allowed addresses in place (the table must exist).
    pub async fn update_addresses(&self, nic: &NicSpec) -> Result<(), NetworkError> {
        if !self.config.filter {
            return Ok(());
        }
        let Some(port) = nic.port() else {
            return Ok(());
        };
        nft::Batch::addresses(&self.config.filter_table, &port)
            .commit(&self.config.netns)
            .await
    }

    /// Makes the host forget where `addr` was (it moved to another MAC, or went away).
    pub async fn forget_neighbour(&self, addr: IpAddr) -> Result<(), NetworkError> {
        let h = netlink::open(&self.config.netns)?;
        netlink::forget_neighbour(&h, addr).await
    }

    /// Removes a private segment's bridge and tunnel.
    pub async fn remove_segment(&self, vni: u32) -> Result<(), NetworkError> {
        let h = netlink::open(&self.config.netns)?;
        netlink::delete_link(&h, &private_tunnel(vni)).await?;
        netlink::delete_link(&h, &private_bridge(vni)).await
    }

    /// Ensures one segment (before a VM NIC is plugged into it).
    pub async fn ensure_segment_now(&self, vni: u32) -> Result<(), NetworkError> {
        let h = netlink::open(&self.config.netns)?;
        let before = link_names(&h).await?;
        let mut done = Applied::default();
        self.ensure_segment(&h, &SegmentSpec { vni }, &mut done, &before)
            .await
    }

    /// Removes the shaping of a VM's NIC (the VM is being deleted).
    pub async fn remove_nic(&self, nic: &NicSpec) -> Result<(), NetworkError> {
        let h = netlink::open(&self.config.netns)?;
        tc::unlimit(&h, &nic.tap, &nic.ifb).await
    }
}

/// Whether a link name is one hvnode makes: an IFB `vb` + 13 hex digits, a private bridge
/// `hvp<vni>` or tunnel `hvx<vni>` for a VNI of this agent's range. Anything else (an
/// operator's `hvpn0`, another agent's network) is not ours.
fn is_ours(name: &str, vnis: &std::ops::RangeInclusive<u32>) -> bool {
    let ifb = name
        .strip_prefix("vb")
        .is_some_and(|r| r.len() == 13 && r.bytes().all(|b| b.is_ascii_hexdigit()));
    let segment = ["hvp", "hvx"].iter().any(|p| {
        name.strip_prefix(p)
            .filter(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|r| r.parse::<u32>().ok())
            .is_some_and(|vni| vnis.contains(&vni))
    });
    ifb || segment
}

async fn link_names(h: &rtnetlink::Handle) -> Result<HashSet<String>, NetworkError> {
    Ok(netlink::links(h)
        .await?
        .into_iter()
        .map(|l| l.name)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_and_ifb_names_fit_ifnamsiz() {
        let id = uuid::Uuid::new_v4();

        assert_eq!(tap_name("vh", id, 0).len(), 15);
        assert_eq!(ifb_name(id, 3).len(), 15);
        assert!(tap_name("vh", id, 0).starts_with("vh"));
        assert!(ifb_name(id, 0).starts_with("vb"));
        assert!(private_bridge(16_777_215).len() <= 15);
    }

    #[test]
    fn only_hvnode_device_names_count_as_leftovers() {
        let id = uuid::Uuid::new_v4();
        let ours = 10000..=19999;

        assert!(is_ours(&ifb_name(id, 0), &ours));
        assert!(is_ours(&private_bridge(10001), &ours));
        assert!(is_ours(&private_tunnel(10001), &ours));
        assert!(
            !is_ours(&private_bridge(20001), &ours),
            "another agent's range"
        );
        assert!(!is_ours("hvpn0", &ours));
        assert!(!is_ours("hvx", &ours));
        assert!(!is_ours("vboxnet0", &ours));
        assert!(!is_ours(&tap_name("vh", id, 0), &ours));
    }

    #[test]
    fn macs_use_the_qemu_prefix() {
        let mac = random_mac();

        assert!(mac.starts_with("52:54:00:"));
        assert_eq!(mac.len(), 17);
    }

    #[test]
    fn a_nic_spec_becomes_a_filter_port_with_its_families_split() {
        let nic = NicSpec {
            tap: "vh0123456789ab0".into(),
            ifb: "vb0123456789ab0".into(),
            mac: "52:54:00:12:34:56".into(),
            bridge: "br-public".into(),
            addresses: vec![
                "203.0.113.10".parse().unwrap(),
                "2001:db8::10".parse().unwrap(),
            ],
            bandwidth_mbps: None,
        };

        let port = nic.port().unwrap();

        assert_eq!(port.v4.len(), 1);
        assert_eq!(port.v6.len(), 1);
    }
}
