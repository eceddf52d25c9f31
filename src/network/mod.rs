//! Networking: which addresses and MACs a VM gets, and reaching guests in the data plane.
//!
//! `ipam` hands out public addresses from the configured pool; allocations live in the store
//! and are taken inside the same transaction that admits a VM, so one address can never go
//! to two VMs, across restarts and crashes included. `netns` runs socket work inside the
//! data-plane namespace (`network.netns`), where bridges, taps and guest addresses live.

pub mod ipam;
pub mod netns;

use std::net::IpAddr;

use rand::Rng;

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

/// Host-side name of a VM's tap: `vh` + 12 hex digits of its id + the NIC index. 15 chars
/// max (IFNAMESIZ), unique per VM, and recognisably ours.
pub fn tap_name(vm: uuid::Uuid, nic: u8) -> String {
    let hex = vm.simple().to_string();
    format!("vh{}{}", &hex[..12], nic % 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_ifnamsiz() {
        let name = tap_name(uuid::Uuid::new_v4(), 0);

        assert_eq!(name.len(), 15);
        assert!(name.starts_with("vh"));
    }

    #[test]
    fn macs_use_the_qemu_prefix() {
        let mac = random_mac();

        assert!(mac.starts_with("52:54:00:"));
        assert_eq!(mac.len(), 17);
    }
}
