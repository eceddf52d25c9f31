//! Input rules, the same as the platform's public API. Pure functions: nothing here touches
//! the host, so every rule is unit-tested and bad input is refused before anything changes.

use std::net::IpAddr;

use base64::Engine;
use uuid::Uuid;

use super::model::{CreateVmRequest, VmSpec};
use crate::config::CapacityConfig;
use crate::errors::ErrorCode;
use crate::secret::Secret;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("missing required fields: {}", .0.join(", "))]
    MissingFields(Vec<&'static str>),
    #[error("field {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("hostname {0:?} is not a valid FQDN or label (1-253 chars, labels 1-63 of a-z, 0-9 and '-', not starting or ending with '-')")]
    InvalidHostname(String),
    #[error("root_password must be at least 8 characters")]
    PasswordTooShort,
    #[error("root_password must be at most 72 characters")]
    PasswordTooLong,
    #[error("root_password must contain at least one letter and one digit")]
    PasswordWeak,
    #[error("ssh_keys[{index}]: {reason}")]
    InvalidSshKey { index: usize, reason: String },
    #[error("template {0:?} does not exist on this node")]
    InvalidTemplate(String),
    #[error("{0}")]
    InvalidName(String),
    #[error("{0}")]
    InvalidResources(String),
    #[error("shrinking a disk destroys data: send confirm_data_loss: true and erase_confirmation: \"ERASE\"")]
    ConfirmationRequired,
}

impl ValidationError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ValidationError::MissingFields(_) => ErrorCode::MissingFields,
            ValidationError::InvalidField { .. } => ErrorCode::InvalidJson,
            ValidationError::InvalidHostname(_) => ErrorCode::InvalidHostname,
            ValidationError::PasswordTooShort => ErrorCode::PasswordTooShort,
            ValidationError::PasswordTooLong => ErrorCode::PasswordTooLong,
            ValidationError::PasswordWeak => ErrorCode::PasswordWeak,
            ValidationError::InvalidSshKey { .. } => ErrorCode::InvalidSshKey,
            ValidationError::InvalidTemplate(_) => ErrorCode::InvalidTemplate,
            ValidationError::InvalidName(_) => ErrorCode::InvalidName,
            ValidationError::InvalidResources(_) => ErrorCode::InvalidResources,
            ValidationError::ConfirmationRequired => ErrorCode::ConfirmationRequired,
        }
    }
}

pub const MAX_SSH_KEYS: usize = 32;
const MAX_SSH_KEY_LEN: usize = 16 * 1024;
const MAX_URL_LEN: usize = 2048;

/// Checks a create request field by field, in the order a client would fix them: missing
/// fields first, then each field's own rule.
pub fn create(req: CreateVmRequest, limits: &CapacityConfig) -> Result<VmSpec, ValidationError> {
    let mut missing = Vec::new();
    macro_rules! required {
        ($field:ident) => {
            if req.$field.is_none() {
                missing.push(stringify!($field));
            }
        };
    }
    required!(id);
    required!(hostname);
    required!(template_id);
    required!(cpu_cores);
    required!(ram_mb);
    required!(disk_gb);
    required!(root_password);
    if !missing.is_empty() {
        return Err(ValidationError::MissingFields(missing));
    }
    let (Some(id), Some(hostname), Some(template_id), Some(cpu), Some(ram), Some(disk), Some(pw)) = (
        req.id,
        req.hostname,
        req.template_id,
        req.cpu_cores,
        req.ram_mb,
        req.disk_gb,
        req.root_password,
    ) else {
        unreachable!("checked above")
    };
    let id = vm_id(&id)?;
    hostname_rule(&hostname)?;
    password(&pw)?;
    let ssh_keys = ssh_keys(req.ssh_keys.as_deref().unwrap_or_default())?;
    let template_id = template_id.into_string();
    if template_id.is_empty() || template_id.len() > 32 {
        return Err(ValidationError::InvalidTemplate(template_id));
    }
    let (cpu_cores, ram_mb, disk_gb) = resources(Some(cpu), Some(ram), Some(disk), limits)?;
    let (cpu_cores, ram_mb, disk_gb) = (
        cpu_cores.expect("given"),
        ram_mb.expect("given"),
        disk_gb.expect("given"),
    );
    let bandwidth_mbps = match req.bandwidth_mbps {
        None => None,
        Some(b) if (1..=100_000).contains(&b) => Some(b as u32),
        Some(b) => {
            return Err(ValidationError::InvalidResources(format!(
                "bandwidth_mbps {b} must be between 1 and 100000"
            )))
        }
    };
    let ip_address = match req.ip_address {
        None => None,
        Some(s) => Some(
            s.parse::<IpAddr>()
                .map_err(|_| ValidationError::InvalidField {
                    field: "ip_address",
                    reason: format!("{s:?} is not an IP address"),
                })?,
        ),
    };
    let webhook_url = req.webhook_url.map(|u| webhook_url(&u)).transpose()?;
    if let Some(secret) = &req.webhook_secret {
        if secret.expose().len() > 1024 {
            return Err(ValidationError::InvalidField {
                field: "webhook_secret",
                reason: "must be at most 1024 bytes".into(),
            });
        }
    }
    Ok(VmSpec {
        id,
        hostname,
        template_id,
        cpu_cores,
        ram_mb,
        disk_gb,
        root_password: pw,
        ssh_keys,
        bandwidth_mbps,
        ip_address,
        webhook_url,
        webhook_secret: req.webhook_secret,
        autostart: req.autostart.unwrap_or(true),
    })
}

pub fn vm_id(s: &str) -> Result<Uuid, ValidationError> {
    Uuid::parse_str(s).map_err(|_| ValidationError::InvalidField {
        field: "id",
        reason: format!("{s:?} is not a UUID"),
    })
}

/// An FQDN or a single label: 1–253 chars, labels 1–63 of `[a-z0-9-]`, no leading or
/// trailing `-`.
pub fn hostname_rule(h: &str) -> Result<(), ValidationError> {
    let bad = || ValidationError::InvalidHostname(h.chars().take(300).collect());
    if h.is_empty() || h.len() > 253 {
        return Err(bad());
    }
    for label in h.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// 8–72 characters with at least one letter and one digit.
pub fn password(pw: &Secret) -> Result<(), ValidationError> {
    let chars = pw.expose().chars().count();
    if chars < 8 {
        return Err(ValidationError::PasswordTooShort);
    }
    if chars > 72 {
        return Err(ValidationError::PasswordTooLong);
    }
    let letter = pw.expose().chars().any(char::is_alphabetic);
    let digit = pw.expose().chars().any(|c| c.is_ascii_digit());
    if !(letter && digit) {
        return Err(ValidationError::PasswordWeak);
    }
    Ok(())
}

/// One line each, `<type> <base64> [comment]`, of a known type whose base64 decodes to a
/// blob that names the same type. Options (`command="…"`) are refused.
pub fn ssh_keys(keys: &[String]) -> Result<Vec<String>, ValidationError> {
    if keys.len() > MAX_SSH_KEYS {
        return Err(ValidationError::InvalidSshKey {
            index: MAX_SSH_KEYS,
            reason: format!("at most {MAX_SSH_KEYS} keys"),
        });
    }
    keys.iter()
        .enumerate()
        .map(|(index, key)| {
            ssh_key(key).map_err(|reason| ValidationError::InvalidSshKey { index, reason })
        })
        .collect()
}

fn ssh_key(key: &str) -> Result<String, String> {
    let key = key.trim_matches([' ', '\t']);
    if key.len() > MAX_SSH_KEY_LEN {
        return Err("key is too long".into());
    }
    if !key.chars().all(key_char) {
        return Err("a key must be one line of printable characters".into());
    }
    let mut parts = key.splitn(3, [' ', '\t']);
    let kind = parts.next().unwrap_or_default();
    let blob = parts.next().unwrap_or_default().trim();
    if !known_key_type(kind) {
        return Err(format!(
            "unknown key type {:?}",
            kind.chars().take(40).collect::<String>()
        ));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| "key data is not valid base64".to_string())?;
    let embedded = embedded_type(&decoded).ok_or("key data is not an SSH public key blob")?;
    if embedded != kind.as_bytes() {
        return Err("key data does not match its type".into());
    }
    Ok(key.to_owned())
}

/// What a key line may hold: no control character but the tab, no Unicode line or
/// paragraph separator (YAML 1.1, which cloud-init reads its seed with, breaks lines there)
/// and no noncharacter (PyYAML refuses U+FFFE and U+FFFF even quoted; none is text).
fn key_char(c: char) -> bool {
    let noncharacter = ('\u{fdd0}'..='\u{fdef}').contains(&c) || (c as u32 & 0xfffe) == 0xfffe;
    (!c.is_control() || c == '\t') && !matches!(c, '\u{2028}' | '\u{2029}') && !noncharacter
}

fn known_key_type(kind: &str) -> bool {
    matches!(kind, "ssh-ed25519" | "ssh-rsa")
        || kind.starts_with("ecdsa-sha2-")
        || kind.starts_with("sk-")
}

/// The type string an SSH wire-format key blob starts with (u32 length + bytes).
fn embedded_type(blob: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    blob.get(4..4usize.checked_add(len)?)
}

/// Resource fields that are present: positive and within the node's per-VM limits.
#[allow(clippy::type_complexity)]
pub fn resources(
    cpu_cores: Option<i64>,
    ram_mb: Option<i64>,
    disk_gb: Option<i64>,
    limits: &CapacityConfig,
) -> Result<(Option<u32>, Option<u64>, Option<u64>), ValidationError> {
    let range = |name: &str, v: i64, min: u64, max: u64| {
        if v < 0 || (v as u64) < min || (v as u64) > max {
            Err(ValidationError::InvalidResources(format!(
                "{name} {v} must be between {min} and {max}"
            )))
        } else {
            Ok(v as u64)
        }
    };
    let cpu = cpu_cores
        .map(|v| range("cpu_cores", v, 1, limits.max_cpu_cores as u64).map(|v| v as u32))
        .transpose()?;
    let ram = ram_mb
        .map(|v| range("ram_mb", v, limits.min_ram_mb, limits.max_ram_mb))
        .transpose()?;
    let disk = disk_gb
        .map(|v| range("disk_gb", v, 1, limits.max_disk_gb))
        .transpose()?;
    Ok((cpu, ram, disk))
}

fn webhook_url(u: &str) -> Result<String, ValidationError> {
    let invalid = |reason: &str| ValidationError::InvalidField {
        field: "webhook_url",
        reason: reason.to_owned(),
    };
    if u.len() > MAX_URL_LEN {
        return Err(invalid("must be at most 2048 characters"));
    }
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .ok_or_else(|| invalid("must be an http:// or https:// URL"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // URLs are ASCII (an international host name goes in as punycode).
    if host.is_empty() || !u.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "must be an absolute URL with a host, of printable ASCII without spaces",
        ));
    }
    Ok(u.to_owned())
}

/// Snapshot names: `[A-Za-z0-9_]{1,40}`.
pub fn snapshot_name(name: &str) -> Result<(), ValidationError> {
    let ok = (1..=40).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::InvalidName(format!(
            "snapshot name {:?} must be 1-40 of A-Z, a-z, 0-9 and _",
            name.chars().take(60).collect::<String>()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::model::TemplateId;

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHBvYXRzIGFyZSBub3Qga2V5cyBidXQgdGhpcyBpcyBvaw== me@host";

    fn request() -> CreateVmRequest {
        CreateVmRequest {
            id: Some("0b9f9c1e-3c3a-4f57-9d49-7f1f0c1a2b3c".into()),
            hostname: Some("web1.example.com".into()),
            template_id: Some(TemplateId::Text("9010".into())),
            cpu_cores: Some(2),
            ram_mb: Some(1024),
            disk_gb: Some(10),
            root_password: Some(Secret::new("s3cretpass")),
            ssh_keys: Some(vec![ED25519.into()]),
            ..Default::default()
        }
    }

    fn check(req: CreateVmRequest) -> Result<VmSpec, ValidationError> {
        create(req, &CapacityConfig::default())
    }

    #[test]
    fn a_complete_request_is_accepted() {
        let spec = check(request()).unwrap();

        assert_eq!(spec.hostname, "web1.example.com");
        assert_eq!(spec.ssh_keys, vec![ED25519.to_string()]);
        assert_eq!(spec.template_id, "9010");
    }

    #[test]
    fn missing_fields_are_all_named() {
        let req = CreateVmRequest {
            hostname: None,
            root_password: None,
            ..request()
        };

        assert_eq!(
            check(req).unwrap_err(),
            ValidationError::MissingFields(vec!["hostname", "root_password"])
        );
    }

    #[test]
    fn hostnames_follow_the_label_rules() {
        for ok in ["a", "web-1", "a.b.c", &"a".repeat(63)] {
            assert_eq!(hostname_rule(ok), Ok(()), "{ok}");
        }
        let long = format!("{}.com", vec!["a".repeat(63); 4].join("."));
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a..b",
            "a.",
            "a_b",
            "a b",
            "a\nb",
            &"a".repeat(64),
            &long,
        ] {
            assert!(hostname_rule(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn passwords_need_length_a_letter_and_a_digit() {
        let check = |s: &str| password(&Secret::new(s));

        assert_eq!(check("abc123"), Err(ValidationError::PasswordTooShort));
        assert_eq!(
            check(&"a1".repeat(37)),
            Err(ValidationError::PasswordTooLong)
        );
        assert_eq!(check("abcdefgh"), Err(ValidationError::PasswordWeak));
        assert_eq!(check("12345678"), Err(ValidationError::PasswordWeak));
        assert_eq!(check("abcdefg1"), Ok(()));
        assert_eq!(check(&"a1".repeat(36)), Ok(()));
    }

    #[test]
    fn ssh_keys_must_be_one_valid_line_each() {
        let bad = [
            "ssh-foo AAAA",
            "ssh-ed25519 not-base64!",
            "ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ==",
            &format!("{ED25519}\nssh-ed25519 AAAA"),
            &format!("command=\"/bin/sh\" {ED25519}"),
        ];
        for key in bad {
            assert!(
                matches!(
                    ssh_keys(&[key.to_string()]),
                    Err(ValidationError::InvalidSshKey { index: 0, .. })
                ),
                "{key:?}"
            );
        }
    }

    #[test]
    fn key_comments_with_line_separators_or_non_printables_are_refused() {
        for c in [
            '\u{7f}',
            '\u{85}',
            '\u{9f}',
            '\u{2028}',
            '\u{2029}',
            '\u{fffe}',
            '\u{ffff}',
            '\u{fdd0}',
            '\u{1fffe}',
        ] {
            let key = format!("{ED25519} a{c}b");

            assert!(
                matches!(
                    ssh_keys(&[key]),
                    Err(ValidationError::InvalidSshKey { index: 0, .. })
                ),
                "{c:?}"
            );
        }
    }

    #[test]
    fn key_comments_may_hold_printable_unicode_and_tabs() {
        let key = format!("{ED25519}\tJosé 😀 \u{a0}");

        assert_eq!(ssh_keys(std::slice::from_ref(&key)), Ok(vec![key]));
    }

    #[test]
    fn a_key_blob_with_a_huge_type_length_is_refused() {
        let blob = base64::engine::general_purpose::STANDARD.encode([0xff, 0xff, 0xff, 0xff, b'x']);

        assert!(ssh_keys(&[format!("ssh-ed25519 {blob}")]).is_err());
    }

    #[test]
    fn resources_must_be_positive_and_within_limits() {
        let req = CreateVmRequest {
            cpu_cores: Some(0),
            ..request()
        };
        let big = CreateVmRequest {
            ram_mb: Some(i64::MAX),
            ..request()
        };
        let negative = CreateVmRequest {
            disk_gb: Some(-1),
            ..request()
        };

        for r in [req, big, negative] {
            assert!(matches!(
                check(r),
                Err(ValidationError::InvalidResources(_))
            ));
        }
    }

    #[test]
    fn a_malformed_id_is_refused() {
        let req = CreateVmRequest {
            id: Some("../etc".into()),
            ..request()
        };

        assert!(matches!(
            check(req),
            Err(ValidationError::InvalidField { field: "id", .. })
        ));
    }

    #[test]
    fn webhook_urls_must_be_http() {
        let req = CreateVmRequest {
            webhook_url: Some("file:///etc/passwd".into()),
            ..request()
        };

        assert!(check(req).is_err());
    }

    #[test]
    fn snapshot_names_are_word_characters() {
        assert!(snapshot_name("before_upgrade_1").is_ok());
        assert!(snapshot_name("").is_err());
        assert!(snapshot_name("a-b").is_err());
        assert!(snapshot_name(&"a".repeat(41)).is_err());
    }

    #[test]
    fn every_validation_error_has_its_contract_code() {
        assert_eq!(
            ValidationError::InvalidHostname("x".into()).code(),
            ErrorCode::InvalidHostname
        );
        assert_eq!(
            ValidationError::ConfirmationRequired.code(),
            ErrorCode::ConfirmationRequired
        );
        assert_eq!(
            ValidationError::MissingFields(vec![]).code(),
            ErrorCode::MissingFields
        );
    }
}
