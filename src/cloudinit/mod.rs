//! cloud-init NoCloud seeds: how a guest learns its hostname, root password, SSH keys and
//! network on first boot.
//!
//! 1. `SeedInput` gathers what the guest needs, already validated (see `vm::validate`);
//!    the root password arrives here only as a SHA-512 crypt hash (`hash_password`).
//! 2. `render` fills the templates in `cloud-init/` (compiled into the binary); every value
//!    is JSON-encoded, so client text can never escape its YAML scalar.
//! 3. `seed::write` packs the three documents into a FAT image labelled `CIDATA`, which the
//!    domain attaches read-only as a virtio disk (the cloud kernel has no SATA).
//!
//! A new `instance_id` (reinstall) makes cloud-init treat the next boot as a first boot.

pub mod seed;
pub mod template;

use std::net::IpAddr;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum CloudInitError {
    #[error("cloud-init template {template}: {reason}")]
    Template { template: String, reason: String },
    #[error("cannot build seed image: {0}")]
    Image(String),
    #[error("cannot {op} seed {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot hash password: {0}")]
    Hash(String),
}

/// One NIC as the guest should configure it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    /// Name the guest gives the interface (`eth0`, `eth1`, …).
    pub name: String,
    pub mac: String,
    /// Addresses with prefix length, e.g. `203.0.113.10/24`.
    pub addresses: Vec<String>,
    pub gateway4: Option<IpAddr>,
    pub gateway6: Option<IpAddr>,
    pub dns: Vec<IpAddr>,
}

#[derive(Debug, Clone)]
pub struct SeedInput<'a> {
    pub instance_id: &'a str,
    /// A single label or an FQDN, validated.
    pub hostname: &'a str,
    pub password_hash: &'a str,
    pub ssh_keys: &'a [String],
    pub nics: &'a [NicConfig],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedDocuments {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

impl SeedDocuments {
    pub fn files(&self) -> [(&'static str, &str); 3] {
        [
            ("meta-data", &self.meta_data),
            ("user-data", &self.user_data),
            ("network-config", &self.network_config),
        ]
    }
}

/// SHA-512 crypt (`$6$…`) of a root password, with a fresh random salt.
pub fn hash_password(password: &Secret) -> Result<String, CloudInitError> {
    let params = sha_crypt::Sha512Params::new(sha_crypt::ROUNDS_DEFAULT)
        .map_err(|e| CloudInitError::Hash(format!("{e:?}")))?;
    sha_crypt::sha512_simple(password.expose(), &params)
        .map_err(|e| CloudInitError::Hash(format!("{e:?}")))
}

/// Whether `password` matches a SHA-512 crypt hash.
pub fn password_matches(password: &Secret, hash: &str) -> bool {
    sha_crypt::sha512_check(password.expose(), hash).is_ok()
}

pub fn render(input: &SeedInput<'_>) -> Result<SeedDocuments, CloudInitError> {
    let short = input.hostname.split('.').next().unwrap_or(input.hostname);
    let meta_data = template::render(
        "meta-data",
        template::META_DATA,
        &[
            ("instance_id", json!(input.instance_id)),
            ("hostname", json!(short)),
        ],
    )?;
    let user_data = template::render(
        "user-data",
        template::USER_DATA,
        &[
            ("hostname", json!(short)),
            ("fqdn", json!(input.hostname)),
            ("password_hash", json!(input.password_hash)),
            ("ssh_keys", json!(input.ssh_keys)),
        ],
    )?;
    let network_config = template::render(
        "network-config",
        template::NETWORK_CONFIG,
        &[("ethernets", ethernets(input.nics))],
    )?;
    Ok(SeedDocuments {
        meta_data,
        user_data,
        network_config,
    })
}

#[derive(Serialize)]
struct Route {
    to: &'static str,
    via: String,
}

fn ethernets(nics: &[NicConfig]) -> Value {
    let mut map = Map::new();
    for nic in nics {
        let mut routes = Vec::new();
        if let Some(gw) = nic.gateway4 {
            routes.push(Route {
                to: "0.0.0.0/0",
                via: gw.to_string(),
            });
        }
        if let Some(gw) = nic.gateway6 {
            routes.push(Route {
                to: "::/0",
                via: gw.to_string(),
            });
        }
        let mut entry = json!({
            "match": {"macaddress": nic.mac},
            "set-name": nic.name,
            "addresses": nic.addresses,
        });
        if !routes.is_empty() {
            entry["routes"] = json!(routes);
        }
        if !nic.dns.is_empty() {
            entry["nameservers"] = json!({
                "addresses": nic.dns.iter().map(|a| a.to_string()).collect::<Vec<_>>()
            });
        }
        map.insert(nic.name.clone(), entry);
    }
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hashes_are_sha512_crypt_and_verify() {
        let password = Secret::new("correct horse 1");

        let hash = hash_password(&password).unwrap();

        assert!(hash.starts_with("$6$"), "{hash}");
        assert!(password_matches(&password, &hash));
        assert!(!password_matches(&Secret::new("wrong 1"), &hash));
    }

    #[test]
    fn two_hashes_of_one_password_differ_by_salt() {
        let password = Secret::new("correct horse 1");

        assert_ne!(
            hash_password(&password).unwrap(),
            hash_password(&password).unwrap()
        );
    }
}
