//! Private networks' subnets and VNIs, and the addresses of their members.
//!
//! Each network gets a subnet of `network.private.prefix_len` bits from
//! `network.private.pool`, never overlapping another network's (a subnet a client asks for
//! is checked against all of them), and a VNI from `vni_first..=vni_last`. Members get the
//! lowest free host address of the network's subnet (the first address is kept for a
//! gateway, the network and broadcast addresses are never used).

use std::collections::HashSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::ip_to_u128;
use crate::config::PrivateNetworkConfig;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("no free /{prefix} subnet left in {pool}")]
    NoSubnet { pool: IpNetwork, prefix: u8 },
    #[error("subnet {0} overlaps an existing private network")]
    Overlap(IpNetwork),
    #[error("subnet {0} is not a valid private subnet (IPv4, /16 to /29, network address)")]
    BadSubnet(String),
    #[error("no free VNI left in {0}..={1}")]
    NoVni(u32, u32),
    #[error("VNI {0} is already used by another private network")]
    VniInUse(u32),
    #[error("VNI {0} is outside this node's range {1}..={2} (network.private.vni_first..vni_last); VNIs are allocated by the control plane across the fleet")]
    BadVni(i64, u32, u32),
    #[error("subnet {0} has no free address left")]
    Full(IpNetwork),
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Validates a subnet a client asked for.
pub fn check_subnet(s: &str, taken: &[IpNetwork]) -> Result<IpNetwork, AllocError> {
    let net: IpNetwork = s.parse().map_err(|_| AllocError::BadSubnet(s.to_owned()))?;
    let ok = net.is_ipv4() && (16..=29).contains(&net.prefix()) && net.ip() == net.network();
    if !ok {
        return Err(AllocError::BadSubnet(s.to_owned()));
    }
    if taken.iter().any(|t| overlaps(t, &net)) {
        return Err(AllocError::Overlap(net));
    }
    Ok(net)
}

/// The first subnet of the pool that overlaps none of `taken`.
pub fn next_subnet(
    config: &PrivateNetworkConfig,
    taken: &[IpNetwork],
) -> Result<IpNetwork, AllocError> {
    let pool = config.pool;
    let prefix = config.prefix_len;
    let no_subnet = AllocError::NoSubnet { pool, prefix };
    let IpAddr::V4(base) = pool.network() else {
        return Err(no_subnet);
    };
    let step = 1u64 << (32 - prefix as u32);
    let count = 1u64 << (prefix - pool.prefix()) as u32;
    (0..count)
        .map(|i| {
            let addr = std::net::Ipv4Addr::from((u32::from(base) as u64 + i * step) as u32);
            IpNetwork::new(IpAddr::V4(addr), prefix).expect("prefix within 0..=32")
        })
        .find(|candidate| !taken.iter().any(|t| overlaps(t, candidate)))
        .ok_or(no_subnet)
}

/// Validates a VNI a client asked for: within this node's range (a VNI outside it could
/// join another tenant's network elsewhere in the fleet) and not taken.
pub fn check_vni(
    config: &PrivateNetworkConfig,
    v: i64,
    taken: &HashSet<u32>,
) -> Result<u32, AllocError> {
    if !(config.vni_first as i64..=config.vni_last as i64).contains(&v) {
        return Err(AllocError::BadVni(v, config.vni_first, config.vni_last));
    }
    let v = v as u32;
    if taken.contains(&v) {
        return Err(AllocError::VniInUse(v));
    }
    Ok(v)
}

pub fn next_vni(config: &PrivateNetworkConfig, taken: &HashSet<u32>) -> Result<u32, AllocError> {
    (config.vni_first..=config.vni_last)
        .find(|v| !taken.contains(v))
        .ok_or(AllocError::NoVni(config.vni_first, config.vni_last))
}

/// The lowest free member address: skips the network address, the first host (kept for a
/// gateway) and the broadcast address.
pub fn next_member_address(
    subnet: IpNetwork,
    taken: &HashSet<IpAddr>,
) -> Result<IpAddr, AllocError> {
    let IpAddr::V4(net) = subnet.network() else {
        return Err(AllocError::Full(subnet));
    };
    let size = 1u128 << (32 - subnet.prefix() as u32);
    let first = ip_to_u128(IpAddr::V4(net)) + 2;
    let last = ip_to_u128(IpAddr::V4(net)) + size - 2;
    (first..=last)
        .map(|n| IpAddr::V4(std::net::Ipv4Addr::from(n as u32)))
        .find(|a| !taken.contains(a))
        .ok_or(AllocError::Full(subnet))
}

/// How much of the pool is used, for `GET /v1/private-networks/subnets`.
pub fn pool_status(config: &PrivateNetworkConfig, taken: &[IpNetwork]) -> (u64, u64) {
    let total = 1u64 << (config.prefix_len - config.pool.prefix()) as u32;
    let used = (0..total)
        .filter(|i| {
            let IpAddr::V4(base) = config.pool.network() else {
                return false;
            };
            let step = 1u64 << (32 - config.prefix_len as u32);
            let addr = std::net::Ipv4Addr::from((u32::from(base) as u64 + i * step) as u32);
            let c = IpNetwork::new(IpAddr::V4(addr), config.prefix_len).expect("valid prefix");
            taken.iter().any(|t| overlaps(t, &c))
        })
        .count() as u64;
    (used, total - used)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PrivateNetworkConfig {
        PrivateNetworkConfig {
            pool: "10.240.0.0/22".parse().unwrap(),
            prefix_len: 24,
            vni_first: 100,
            vni_last: 102,
            ..PrivateNetworkConfig::default()
        }
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_never_overlap() {
        let taken = vec![net("10.240.0.0/24"), net("10.240.1.0/25")];

        assert_eq!(next_subnet(&config(), &taken), Ok(net("10.240.2.0/24")));
    }

    #[test]
    fn a_full_pool_has_no_subnet() {
        let taken = vec![net("10.240.0.0/22")];

        assert!(matches!(
            next_subnet(&config(), &taken),
            Err(AllocError::NoSubnet { .. })
        ));
    }

    #[test]
    fn requested_subnets_are_checked() {
        let taken = vec![net("10.240.0.0/24")];

        assert_eq!(
            check_subnet("192.168.5.0/24", &taken),
            Ok(net("192.168.5.0/24"))
        );
        assert!(matches!(
            check_subnet("10.240.0.128/25", &taken),
            Err(AllocError::Overlap(_))
        ));
        assert!(check_subnet("10.1.1.5/24", &taken).is_err());
        assert!(check_subnet("fd00::/64", &taken).is_err());
        assert!(check_subnet("10.0.0.0/8", &taken).is_err());
        assert!(check_subnet("nonsense", &taken).is_err());
    }

    #[test]
    fn vnis_come_from_the_range_and_are_unique() {
        let taken = HashSet::from([100, 101]);

        assert_eq!(next_vni(&config(), &taken), Ok(102));
        assert_eq!(
            check_vni(&config(), 101, &taken),
            Err(AllocError::VniInUse(101))
        );
        assert_eq!(check_vni(&config(), 102, &taken), Ok(102));
        assert_eq!(
            check_vni(&config(), 0, &taken),
            Err(AllocError::BadVni(0, 100, 102))
        );
        assert_eq!(
            check_vni(&config(), 103, &taken),
            Err(AllocError::BadVni(103, 100, 102)),
            "outside the node's range"
        );
    }

    #[test]
    fn members_skip_network_gateway_and_broadcast() {
        let subnet = net("10.240.5.0/30");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();

        assert_eq!(
            next_member_address(subnet, &HashSet::new()),
            Ok(ip("10.240.5.2"))
        );
        assert_eq!(
            next_member_address(subnet, &HashSet::from([ip("10.240.5.2")])),
            Err(AllocError::Full(subnet))
        );
    }

    #[test]
    fn pool_status_counts_used_and_free_subnets() {
        assert_eq!(pool_status(&config(), &[net("10.240.1.0/24")]), (1, 3));
    }
}
