//! cloud-init NoCloud seeds: how a guest learns its hostname, root password, SSH keys and
//! network on first boot.
//!
//! 1. `SeedInput` gathers what the guest needs, already validated (see `vm::validate`);
//!    the root password arrives here only as a SHA-512 crypt hash (`hash_password`).
//! 2. `render` fills the templates in `cloud-init/` (compiled into the binary); every value
//!    is written as one YAML flow node of printable ASCII (`template`: JSON's encoding with
//!    every non-ASCII character escaped), so client text can never escape its scalar and
//!    PyYAML, which cloud-init parses with, never refuses the document.
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
    pub mtu: Option<u32>,
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
        if let Some(mtu) = nic.mtu {
            entry["mtu"] = json!(mtu);
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

    fn golden(name: &str, actual: &str) {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, actual).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "missing golden file {}; run with UPDATE_GOLDEN=1",
                path.display()
            )
        });
        assert_eq!(actual, expected, "golden file {name} differs");
    }

    fn nics() -> Vec<NicConfig> {
        vec![NicConfig {
            name: "eth0".into(),
            mac: "52:54:00:12:34:56".into(),
            addresses: vec!["203.0.113.10/24".into()],
            gateway4: Some("203.0.113.1".parse().unwrap()),
            gateway6: None,
            dns: vec!["1.1.1.1".parse().unwrap()],
            mtu: None,
        }]
    }

    #[test]
    fn seed_documents_match_golden_files() {
        let keys = vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExjcmSUhytrxMZpzkoyJK4FdmaWCEK5+1xneLRoEZHT me@host".to_string()];
        let nics = nics();

        let docs = render(&SeedInput {
            instance_id: "0b9f9c1e-3c3a-4f57-9d49-7f1f0c1a2b3c-1",
            hostname: "web1.example.com",
            password_hash: "$6$saltsalt$hash",
            ssh_keys: &keys,
            nics: &nics,
        })
        .unwrap();

        golden("seed-meta-data", &docs.meta_data);
        golden("seed-user-data", &docs.user_data);
        golden("seed-network-config", &docs.network_config);
    }

    #[test]
    fn hostile_input_cannot_add_a_line_to_any_document() {
        let keys = vec![
            "ssh-ed25519 AAAA x\nruncmd: [reboot]\n".to_string(),
            "a\"\n- b".into(),
        ];
        let nics = nics();
        let clean = render(&SeedInput {
            instance_id: "i",
            hostname: "h",
            password_hash: "p",
            ssh_keys: &[],
            nics: &nics,
        })
        .unwrap();

        let docs = render(&SeedInput {
            instance_id: "i\nlocal-hostname: evil",
            hostname: "h\nruncmd: [reboot]",
            password_hash: "p\"\nchpasswd: {list: \"root:x\"}",
            ssh_keys: &keys,
            nics: &nics,
        })
        .unwrap();

        for ((_, hostile), (_, plain)) in docs.files().iter().zip(clean.files().iter()) {
            assert_eq!(hostile.lines().count(), plain.lines().count(), "{hostile}");
            assert!(
                !hostile.lines().any(|l| l.starts_with("runcmd")),
                "{hostile}"
            );
        }
    }

    #[test]
    fn unicode_in_a_key_comment_round_trips_as_printable_ascii() {
        let keys =
            vec!["ssh-ed25519 AAAA a\u{2028}b\u{7f}c é 😀 \u{85}\u{2029}\u{fffe}".to_string()];
        let nics = nics();

        let docs = render(&SeedInput {
            instance_id: "i",
            hostname: "h",
            password_hash: "p",
            ssh_keys: &keys,
            nics: &nics,
        })
        .unwrap();
        let parsed: serde_yaml::Value = serde_yaml::from_str(&docs.user_data).unwrap();

        assert!(
            docs.user_data
                .bytes()
                .all(|b| b == b'\n' || (b' '..=b'~').contains(&b)),
            "{}",
            docs.user_data
        );
        assert_eq!(
            parsed["users"][0]["ssh_authorized_keys"][0].as_str(),
            Some(keys[0].as_str())
        );
    }

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
