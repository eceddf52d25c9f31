//! Public IP address management over the configured pool.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::ip_to_u128;
use crate::config::IpPoolConfig;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("no free address left in pool {0}")]
    Exhausted(IpNetwork),
    #[error("address {0} is already assigned")]
    InUse(IpAddr),
    #[error("address {address} is not assignable from pool {pool} ({reason})")]
    OutsidePool {
        address: IpAddr,
        pool: IpNetwork,
        reason: &'static str,
    },
}

/// The pool's rules, without state: which addresses may ever be handed out.
#[derive(Debug, Clone)]
pub struct Pool {
    config: IpPoolConfig,
}

impl Pool {
    pub fn new(config: IpPoolConfig) -> Pool {
        Pool { config }
    }

    pub fn config(&self) -> &IpPoolConfig {
        &self.config
    }

    pub fn prefix(&self) -> u8 {
        self.config.cidr.prefix()
    }

    /// Why `address` may not be assigned, if it may not.
    pub fn check(&self, address: IpAddr) -> Result<(), IpamError> {
        let reason = if !self.config.cidr.contains(address) {
            Some("outside the subnet")
        } else if address == self.config.gateway {
            Some("it is the gateway")
        } else if self.config.reserved.contains(&address) {
            Some("it is reserved")
        } else if ip_to_u128(address) < ip_to_u128(self.config.first)
            || ip_to_u128(address) > ip_to_u128(self.config.last)
        {
            Some("outside the assignable range")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(IpamError::OutsidePool {
                address,
                pool: self.config.cidr,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// `requested` if it is assignable and free, else the lowest free address.
    pub fn choose(
        &self,
        requested: Option<IpAddr>,
        taken: &HashSet<IpAddr>,
    ) -> Result<IpAddr, IpamError> {
        if let Some(addr) = requested {
            self.check(addr)?;
            if taken.contains(&addr) {
                return Err(IpamError::InUse(addr));
            }
            return Ok(addr);
        }
        let (first, last) = (ip_to_u128(self.config.first), ip_to_u128(self.config.last));
        (first..=last)
            .map(|n| from_u128(n, self.config.first))
            .find(|a| self.check(*a).is_ok() && !taken.contains(a))
            .ok_or(IpamError::Exhausted(self.config.cidr))
    }
}

fn from_u128(n: u128, family: IpAddr) -> IpAddr {
    match family {
        IpAddr::V4(_) => IpAddr::V4((n as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(n.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        Pool::new(IpPoolConfig {
            cidr: "10.0.0.0/24".parse().unwrap(),
            gateway: "10.0.0.1".parse().unwrap(),
            first: "10.0.0.10".parse().unwrap(),
            last: "10.0.0.12".parse().unwrap(),
            reserved: vec!["10.0.0.11".parse().unwrap()],
            dns: vec![],
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_lowest_free_address_is_chosen() {
        let taken = HashSet::from([ip("10.0.0.10")]);

        assert_eq!(pool().choose(None, &taken), Ok(ip("10.0.0.12")));
    }

    #[test]
    fn reserved_addresses_are_never_handed_out() {
        assert!(pool()
            .choose(Some(ip("10.0.0.11")), &HashSet::new())
            .is_err());
    }

    #[test]
    fn a_full_pool_is_exhausted() {
        let taken = HashSet::from([ip("10.0.0.10"), ip("10.0.0.12")]);

        assert!(matches!(
            pool().choose(None, &taken),
            Err(IpamError::Exhausted(_))
        ));
    }

    #[test]
    fn a_taken_requested_address_is_in_use() {
        let taken = HashSet::from([ip("10.0.0.10")]);

        assert_eq!(
            pool().choose(Some(ip("10.0.0.10")), &taken),
            Err(IpamError::InUse(ip("10.0.0.10")))
        );
    }

    #[test]
    fn the_gateway_and_foreign_addresses_are_refused() {
        assert!(pool()
            .choose(Some(ip("10.0.0.1")), &HashSet::new())
            .is_err());
        assert!(pool()
            .choose(Some(ip("10.9.0.10")), &HashSet::new())
            .is_err());
    }
}
