//! Property tests of everything that turns client input into something else: the request
//! parsers and validators, the cloud-init seed renderer and the domain XML renderer.
//!
//! Three kinds of property:
//! - no panic, whatever bytes or values arrive;
//! - no injection: for any strings at all (validated or not), a seed document stays YAML of
//!   printable ASCII with the reference's top-level keys and line count, and a domain XML
//!   document keeps the reference's elements; the values read back exactly as given;
//! - validation closes the door: what a validator accepts has the shape the contract states.
//!
//! Each property runs a few hundred to a couple of thousand cases (a few seconds in a debug
//! build); `PROPTEST_CASES` overrides the count for a longer hunt.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::Path;

use base64::Engine;
use futures_util::FutureExt;
use hvnode::api::extract::{parse_json, QueryMap};
use hvnode::cloudinit::{self, NicConfig, SeedInput};
use hvnode::config::{Accelerator, CapacityConfig};
use hvnode::network::private;
use hvnode::secret::Secret;
use hvnode::vm::domain_xml::{self, DomainSpec, Nic};
use hvnode::vm::ips::{AddIpRequest, MoveIpRequest};
use hvnode::vm::model::{CreateVmRequest, ReinstallRequest, ResizeRequest, TemplateId};
use hvnode::vm::private_nets::{self, AttachRequest, CreateNetworkRequest};
use hvnode::vm::snapshots::{self, CreateSnapshotRequest, Snapshot};
use hvnode::vm::validate;
use ipnetwork::IpNetwork;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError};

// ---------------------------------------------------------------------------------------
// Configuration and strategies
// ---------------------------------------------------------------------------------------

/// `cases` unless `PROPTEST_CASES` says otherwise. Failures are not persisted to files:
/// a failing case is printed, shrunk, and belongs in a unit test beside the code.
fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config.failure_persistence = None;
    config
}

/// Characters that have meant trouble somewhere: YAML and XML syntax, line breaks of YAML
/// 1.1 and Unicode, what PyYAML or XML 1.0 refuse, and the edges of the code point ranges.
const AWKWARD: &[char] = &[
    '\0',
    '\u{1}',
    '\u{8}',
    '\t',
    '\n',
    '\u{b}',
    '\u{c}',
    '\r',
    '\u{1b}',
    '\u{1f}',
    ' ',
    '"',
    '\'',
    '\\',
    '#',
    ':',
    '-',
    '?',
    '|',
    '>',
    '<',
    '&',
    '*',
    '!',
    '%',
    '@',
    '`',
    ',',
    '[',
    ']',
    '{',
    '}',
    '=',
    '/',
    '.',
    '\u{7f}',
    '\u{80}',
    '\u{85}',
    '\u{9f}',
    '\u{a0}',
    'é',
    '\u{2028}',
    '\u{2029}',
    '\u{202e}',
    '\u{d7ff}',
    '\u{e000}',
    '\u{fdd0}',
    '\u{feff}',
    '\u{fffd}',
    '\u{fffe}',
    '\u{ffff}',
    '\u{10000}',
    '😀',
    '\u{1fffe}',
    '\u{10ffff}',
];

/// Pieces of documents an attacker would try to smuggle in.
const FRAGMENTS: &[&str] = &[
    "\nruncmd: [reboot]\n",
    "\"\n- evil",
    "\": x\n",
    "}\n",
    "]\n",
    "#cloud-config\n",
    "\n---\n",
    "\n...\n",
    "&a ",
    "*a",
    "!!python/object/apply:os.system [\"id\"]",
    "<<: *a",
    "\u{2028}runcmd: [reboot]",
    "\u{85}chpasswd: {list: \"root:x\"}",
    "\\u0022\\n",
    "</title><devices><hack/></devices>",
    "'/><hack/><x a='",
    "]]><hack/>",
    "<!--",
    "&amp;",
    "&#1;",
    "<?xml version='1.0'?>",
    "ssh-ed25519 ",
    "AAAAC3NzaC1lZDI1NTE5",
    "command=\"/bin/sh\" ",
    "..",
    "a-",
    "-a",
];

/// Any string, leaning towards the awkward: random code points (proptest's `char` covers
/// all of Unicode), awkward characters, smuggling fragments and plain text.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => any::<char>().prop_map(String::from),
        3 => prop::sample::select(AWKWARD).prop_map(String::from),
        2 => prop::sample::select(FRAGMENTS).prop_map(str::to_owned),
        2 => "[a-z0-9.-]{1,12}",
    ];
    prop::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
}

/// A valid hostname: labels of `[a-z0-9-]` not starting or ending with `-`.
fn valid_hostname() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", 1..5)
        .prop_map(|labels| labels.join("."))
        .prop_filter("at most 253 characters", |h| h.len() <= 253)
}

/// Mostly hostname-shaped strings, some of them one character away from valid.
fn hostnameish() -> impl Strategy<Value = String> {
    prop_oneof![
        valid_hostname(),
        "[a-zA-Z0-9._ -]{0,70}",
        (
            valid_hostname(),
            any::<char>(),
            any::<prop::sample::Index>()
        )
            .prop_map(|(h, c, i)| {
                let mut chars: Vec<char> = h.chars().collect();
                let at = i.index(chars.len() + 1);
                chars.insert(at, c);
                chars.into_iter().collect()
            }),
        text(),
    ]
}

const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "sk-ssh-ed25519@openssh.com",
    "ssh-dss",
    "",
];

/// The base64 of an SSH wire-format blob naming `kind`, then `rest`.
fn key_blob(kind: &str, rest: &[u8]) -> String {
    let mut blob = (kind.len() as u32).to_be_bytes().to_vec();
    blob.extend_from_slice(kind.as_bytes());
    blob.extend_from_slice(rest);
    base64::engine::general_purpose::STANDARD.encode(blob)
}

/// `<type> <base64> <comment>`, where the type, blob and comment may each be good or bad.
fn keyish() -> impl Strategy<Value = String> {
    let structured = (
        prop::sample::select(KEY_TYPES),
        prop_oneof![3 => Just(None), 1 => prop::sample::select(KEY_TYPES).prop_map(Some)],
        prop::collection::vec(any::<u8>(), 0..40),
        prop::sample::select(&[" ", "\t", "  ", " \t"][..]),
        prop_oneof![printable_comment(), text()],
        prop_oneof![
            3 => prop::sample::select(&["", " ", "\t"][..]),
            1 => prop::sample::select(&["\n", "\r\n", " \u{2028}", "\u{85}", "\0"][..]),
        ],
    )
        .prop_map(|(kind, embedded, rest, sep, comment, tail)| {
            let blob = key_blob(embedded.unwrap_or(kind), &rest);
            format!("{kind}{sep}{blob}{sep}{comment}{tail}")
        });
    prop_oneof![4 => structured, 1 => text()]
}

/// Printable ASCII and Unicode text, with no line separator and no noncharacter.
fn printable_comment() -> impl Strategy<Value = String> {
    "[[:print:]\u{a0}-\u{2027}\u{202a}-\u{d7ff}\u{e000}-\u{fdcf}]{0,30}"
}

/// Well-formed keys with a comment of printable characters, which must be accepted.
fn good_key() -> impl Strategy<Value = String> {
    (
        prop::sample::select(&KEY_TYPES[..4]),
        prop::collection::vec(any::<u8>(), 0..64),
        printable_comment(),
    )
        .prop_map(|(kind, rest, comment)| format!("{kind} {} {comment}", key_blob(kind, &rest)))
}

fn ip() -> impl Strategy<Value = IpAddr> {
    any::<IpAddr>()
}

fn nic() -> impl Strategy<Value = NicConfig> {
    (
        prop_oneof!["eth[0-9]", text()],
        prop_oneof!["([0-9a-f]{2}:){5}[0-9a-f]{2}", text()],
        prop::collection::vec(prop_oneof!["[0-9.]{7,15}/[0-9]{1,2}", text()], 0..3),
        prop::option::of(ip()),
        prop::option::of(ip()),
        prop::collection::vec(ip(), 0..3),
        prop::option::of(any::<u32>()),
    )
        .prop_map(
            |(name, mac, addresses, gateway4, gateway6, dns, mtu)| NicConfig {
                name,
                mac,
                addresses,
                gateway4,
                gateway6,
                dns,
                mtu,
            },
        )
}

/// A number a client could send: around the valid ranges, sometimes extreme.
fn number() -> impl Strategy<Value = i64> {
    prop_oneof![-2i64..70_000, any::<i64>(), Just(i64::MAX), Just(i64::MIN)]
}

/// Mostly within `range`, otherwise any `number()`.
fn number_in(range: std::ops::RangeInclusive<i64>) -> impl Strategy<Value = i64> {
    prop_oneof![4 => range, 1 => number()]
}

const VM_ID: &str = "0b9f9c1e-3c3a-4f57-9d49-7f1f0c1a2b3c";

/// Create requests of which a good share is valid, so that every rule is reached.
fn create_request() -> impl Strategy<Value = CreateVmRequest> {
    let max_cpu = i64::from(CapacityConfig::default().max_cpu_cores);
    let id = prop_oneof![8 => Just(VM_ID.to_owned()), 1 => "[0-9a-f-]{36}", 1 => text()];
    let hostname = prop_oneof![4 => valid_hostname(), 1 => hostnameish()];
    let template = prop_oneof![
        4 => "[0-9]{1,6}".prop_map(TemplateId::Text),
        1 => "[0-9]{30,34}".prop_map(TemplateId::Text),
        1 => any::<u64>().prop_map(TemplateId::Number),
        1 => text().prop_map(TemplateId::Text),
    ];
    let password = prop_oneof![4 => "[a-z]{4,30}[0-9]{1,30}", 1 => text()].prop_map(Secret::new);
    let keys = prop::collection::vec(prop_oneof![4 => good_key(), 1 => keyish()], 0..4);
    let ip = prop_oneof![4 => ip().prop_map(|a| a.to_string()), 1 => text()];
    let url = prop_oneof![4 => "https?://[a-z.]{1,20}/[a-z]{0,10}", 1 => text()];
    let secret = prop_oneof![4 => "[a-z0-9]{0,40}", 1 => text()].prop_map(Secret::new);
    (
        (
            prop::option::weighted(0.97, id),
            prop::option::weighted(0.97, hostname),
            prop::option::weighted(0.97, template),
            prop::option::weighted(0.97, number_in(1..=max_cpu)),
            prop::option::weighted(0.97, number_in(512..=8192)),
            prop::option::weighted(0.97, number_in(1..=200)),
        ),
        (
            prop::option::weighted(0.97, password),
            prop::option::of(keys),
            prop::option::of(number_in(1..=100_000)),
            prop::option::of(ip),
            prop::option::of(url),
            prop::option::of(secret),
            prop::option::of(any::<bool>()),
        ),
    )
        .prop_map(
            |(
                (id, hostname, template_id, cpu_cores, ram_mb, disk_gb),
                (
                    root_password,
                    ssh_keys,
                    bandwidth_mbps,
                    ip_address,
                    webhook_url,
                    webhook_secret,
                    autostart,
                ),
            )| CreateVmRequest {
                id,
                hostname,
                template_id,
                cpu_cores,
                ram_mb,
                disk_gb,
                root_password,
                ssh_keys,
                bandwidth_mbps,
                ip_address,
                webhook_url,
                webhook_secret,
                autostart,
            },
        )
}

/// JSON values of every type, nested a little.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const REQUEST_FIELDS: &[&str] = &[
    "id",
    "hostname",
    "template_id",
    "cpu_cores",
    "ram_mb",
    "disk_gb",
    "root_password",
    "ssh_keys",
    "bandwidth_mbps",
    "ip_address",
    "webhook_url",
    "webhook_secret",
    "confirm_data_loss",
    "erase_confirmation",
    "restart",
    "name",
    "description",
    "include_ram",
    "address",
    "ip",
    "family",
    "target_vps_id",
    "vni",
    "subnet",
    "vps_id",
];

/// A JSON object whose keys are request field names (or not) with values of any type.
fn json_body() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        4 => prop::sample::select(REQUEST_FIELDS).prop_map(str::to_owned),
        1 => text(),
    ];
    prop::collection::btree_map(key, json_value(), 0..10).prop_map(|m| {
        serde_json::to_vec(&m.into_iter().collect::<serde_json::Map<_, _>>())
            .expect("a JSON value serialises")
    })
}

// ---------------------------------------------------------------------------------------
// What the contract says an accepted value looks like
// ---------------------------------------------------------------------------------------

fn contract_hostname(h: &str) -> Result<(), TestCaseError> {
    prop_assert!((1..=253).contains(&h.len()), "{:?}", h);
    for label in h.split('.') {
        prop_assert!((1..=63).contains(&label.len()), "{:?}", h);
        prop_assert!(
            label
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-')),
            "{:?}",
            h
        );
        prop_assert!(!label.starts_with('-') && !label.ends_with('-'), "{:?}", h);
    }
    Ok(())
}

/// One line of printable characters, a known type and base64 naming that type.
fn contract_key(key: &str) -> Result<(), TestCaseError> {
    for c in key.chars() {
        prop_assert!(c == '\t' || !c.is_control(), "{:?} holds {:?}", key, c);
        prop_assert!(
            !matches!(c, '\u{2028}' | '\u{2029}'),
            "{:?} holds {:?}",
            key,
            c
        );
        prop_assert!((c as u32 & 0xfffe) != 0xfffe, "{:?} holds {:?}", key, c);
        prop_assert!(
            !('\u{fdd0}'..='\u{fdef}').contains(&c),
            "{:?} holds {:?}",
            key,
            c
        );
    }
    let mut parts = key.split([' ', '\t']).filter(|p| !p.is_empty());
    let kind = parts.next().unwrap_or_default();
    prop_assert!(
        matches!(kind, "ssh-ed25519" | "ssh-rsa")
            || kind.starts_with("ecdsa-sha2-")
            || kind.starts_with("sk-"),
        "{:?}",
        key
    );
    let blob = base64::engine::general_purpose::STANDARD.decode(parts.next().unwrap_or_default());
    prop_assert!(blob.is_ok(), "{:?} has no valid base64", key);
    let blob = blob.unwrap_or_default();
    let len = blob
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
    prop_assert_eq!(
        len.and_then(|len| blob.get(4..4 + len)),
        Some(kind.as_bytes()),
        "{:?}",
        key
    );
    Ok(())
}

fn printable_ascii(doc: &str) -> bool {
    doc.bytes()
        .all(|b| b == b'\n' || (b' '..=b'~').contains(&b))
}

// ---------------------------------------------------------------------------------------
// a. No panic
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn request_bodies_of_any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_json::<CreateVmRequest>(&bytes);
        let _ = parse_json::<ReinstallRequest>(&bytes);
        let _ = parse_json::<ResizeRequest>(&bytes);
        let _ = parse_json::<CreateSnapshotRequest>(&bytes);
        let _ = parse_json::<AddIpRequest>(&bytes);
        let _ = parse_json::<MoveIpRequest>(&bytes);
        let _ = parse_json::<CreateNetworkRequest>(&bytes);
        let _ = parse_json::<AttachRequest>(&bytes);
    }

    #[test]
    fn validators_of_single_fields_never_panic(s in text(), n in number()) {
        let _ = validate::hostname_rule(&s);
        let _ = validate::password(&Secret::new(s.clone()));
        let _ = validate::ssh_keys(std::slice::from_ref(&s));
        let _ = validate::snapshot_name(&s);
        let _ = validate::vm_id(&s);
        let _ = snapshots::description(Some(s.clone()));
        let _ = private_nets::network_name(&s);
        let _ = private::check_subnet(&s, &[]);
        let _ = private::check_vni(&Default::default(), n, &HashSet::new());
        let _ = hvnode::api::extract::vm_id(&s);
        let _ = hvnode::api::extract::task_id(&s);
    }
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn create_requests_are_validated_without_panic(req in create_request()) {
        let limits = CapacityConfig::default();

        if let Ok(spec) = validate::create(req, &limits) {
            contract_hostname(&spec.hostname)?;
            for key in &spec.ssh_keys {
                contract_key(key)?;
            }
            prop_assert!((1..=limits.max_cpu_cores).contains(&spec.cpu_cores));
            prop_assert!((limits.min_ram_mb..=limits.max_ram_mb).contains(&spec.ram_mb));
            prop_assert!((1..=limits.max_disk_gb).contains(&spec.disk_gb));
            prop_assert!((1..=32).contains(&spec.template_id.len()));
        }
    }

    #[test]
    fn json_request_bodies_are_parsed_and_validated_without_panic(body in json_body()) {
        let limits = CapacityConfig::default();

        if let Ok(req) = parse_json::<CreateVmRequest>(&body) {
            let _ = validate::create(req, &limits);
        }
        if let Ok(req) = parse_json::<ReinstallRequest>(&body) {
            if let Some(pw) = &req.root_password {
                let _ = validate::password(pw);
            }
            let _ = validate::ssh_keys(req.ssh_keys.as_deref().unwrap_or_default());
        }
        if let Ok(req) = parse_json::<ResizeRequest>(&body) {
            let _ = validate::resources(req.cpu_cores, req.ram_mb, req.disk_gb, &limits);
        }
        if let Ok(req) = parse_json::<CreateSnapshotRequest>(&body) {
            let _ = req.name.as_deref().map(validate::snapshot_name);
            let _ = snapshots::description(req.description);
        }
        if let Ok(req) = parse_json::<CreateNetworkRequest>(&body) {
            let _ = req.name.as_deref().map(private_nets::network_name);
            let _ = req.subnet.as_deref().map(|s| private::check_subnet(s, &[]));
            let _ = req.vni.map(|v| private::check_vni(&Default::default(), v, &HashSet::new()));
        }
        let _ = parse_json::<AddIpRequest>(&body);
        let _ = parse_json::<MoveIpRequest>(&body);
        let _ = parse_json::<AttachRequest>(&body);
    }

    #[test]
    fn resources_accepted_are_within_the_limits(cpu in prop::option::of(number()), ram in prop::option::of(number()), disk in prop::option::of(number())) {
        let limits = CapacityConfig::default();

        let checked = validate::resources(cpu, ram, disk, &limits);

        if let Ok((c, r, d)) = checked {
            prop_assert_eq!(c.map(i64::from), cpu);
            prop_assert_eq!(r.map(|v| v as i64), ram);
            prop_assert_eq!(d.map(|v| v as i64), disk);
            prop_assert!(c.is_none_or(|c| (1..=limits.max_cpu_cores).contains(&c)));
            prop_assert!(r.is_none_or(|r| (limits.min_ram_mb..=limits.max_ram_mb).contains(&r)));
            prop_assert!(d.is_none_or(|d| (1..=limits.max_disk_gb).contains(&d)));
        }
    }

    #[test]
    fn query_strings_are_parsed_without_panic(query in "([a-z_]{1,10}(=([a-z0-9+]|%[0-9A-Fa-f]{2}|%.{0,2}|[=&])*)?&?){0,5}") {
        let Ok(request) = axum::http::Request::builder().uri(format!("/v1/vms?{query}")).body(()) else {
            return Ok(());
        };
        let (mut parts, ()) = request.into_parts();

        let parsed = <QueryMap as axum::extract::FromRequestParts<()>>::from_request_parts(&mut parts, &())
            .now_or_never()
            .expect("query parsing does not wait");

        if let Ok(q) = parsed {
            for key in ["status", "limit", "offset", "force", "timeout_s", "interval_ms", "vps_id", "state"] {
                let _ = q.get(key);
                let _ = q.number(key);
                let _ = q.flag(key);
            }
        }
    }

    #[test]
    fn subnets_accepted_are_private_sized_network_addresses(
        s in prop_oneof![
            (any::<[u8; 4]>(), 0u8..40).prop_map(|(a, p)| format!("{}.{}.{}.{}/{p}", a[0], a[1], a[2], a[3])),
            (0u8..4, any::<u8>(), 0u8..40).prop_map(|(b, c, p)| format!("10.240.{}.0/{p}", b * 64 + c % 4)),
            text(),
        ],
        taken in prop::collection::vec((any::<[u8; 4]>(), 8u8..=32), 0..3),
    ) {
        let taken: Vec<IpNetwork> = taken
            .into_iter()
            .map(|(a, p)| IpNetwork::new(IpAddr::from(a), p).expect("prefix at most 32"))
            .collect();

        if let Ok(net) = private::check_subnet(&s, &taken) {
            prop_assert!(net.is_ipv4());
            prop_assert!((16..=29).contains(&net.prefix()));
            prop_assert_eq!(net.ip(), net.network());
            prop_assert!(taken.iter().all(|t| !t.contains(net.network()) && !net.contains(t.network())));
            let member = private::next_member_address(net, &HashSet::new());
            prop_assert!(member.is_ok_and(|m| net.contains(m)));
        }
    }

    #[test]
    fn vnis_accepted_are_in_range_and_free(v in number(), taken in prop::collection::hash_set(0u32..70_000, 0..10)) {
        let config = hvnode::config::PrivateNetworkConfig::default();
        if let Ok(vni) = private::check_vni(&config, v, &taken) {
            prop_assert_eq!(i64::from(vni), v);
            prop_assert!((config.vni_first..=config.vni_last).contains(&vni));
            prop_assert!(!taken.contains(&vni));
        }
    }

    #[test]
    fn network_names_accepted_are_short_plain_text(name in prop_oneof!["[A-Za-z0-9 ._-]{0,70}", text()]) {
        if private_nets::network_name(&name).is_ok() {
            prop_assert!((1..=64).contains(&name.len()));
            prop_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b" ._-".contains(&b)));
        }
    }

    #[test]
    fn snapshot_names_accepted_are_word_characters(name in prop_oneof!["[A-Za-z0-9_]{0,45}", text()]) {
        if validate::snapshot_name(&name).is_ok() {
            prop_assert!((1..=40).contains(&name.len()));
            prop_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        }
    }

    #[test]
    fn passwords_accepted_follow_the_rule(pw in prop_oneof!["[a-zA-Z0-9 !-~]{0,80}", text()]) {
        if validate::password(&Secret::new(pw.clone())).is_ok() {
            prop_assert!((8..=72).contains(&pw.chars().count()));
            prop_assert!(pw.chars().any(char::is_alphabetic));
            prop_assert!(pw.chars().any(|c| c.is_ascii_digit()));
        }
    }
}

proptest! {
    // SHA-512 crypt is deliberately slow.
    #![proptest_config(config(12))]

    #[test]
    fn any_password_hashes_to_printable_sha512_crypt(pw in text()) {
        let password = Secret::new(pw);

        let hash = cloudinit::hash_password(&password).expect("hashing cannot fail");

        prop_assert!(hash.starts_with("$6$"));
        prop_assert!(hash.bytes().all(|b| (b'!'..=b'~').contains(&b)), "{}", hash);
        prop_assert!(cloudinit::password_matches(&password, &hash));
    }
}

// ---------------------------------------------------------------------------------------
// b. Seed documents: no injection, exact round-trip, printable ASCII
// ---------------------------------------------------------------------------------------

fn reference_nic() -> NicConfig {
    NicConfig {
        name: "eth0".into(),
        mac: "52:54:00:12:34:56".into(),
        addresses: vec!["203.0.113.10/24".into()],
        gateway4: Some("203.0.113.1".parse().expect("an address")),
        gateway6: None,
        dns: vec!["1.1.1.1".parse().expect("an address")],
        mtu: None,
    }
}

/// The seed of a benign VM, whose shape every other seed must have.
fn reference_seed() -> cloudinit::SeedDocuments {
    let keys = vec![format!(
        "ssh-ed25519 {} me@host",
        key_blob("ssh-ed25519", &[1; 32])
    )];
    cloudinit::render(&SeedInput {
        instance_id: "0b9f9c1e-3c3a-4f57-9d49-7f1f0c1a2b3c-1",
        hostname: "web1.example.com",
        password_hash: "$6$saltsalt$hash",
        ssh_keys: &keys,
        nics: &[reference_nic()],
    })
    .expect("the reference seed renders")
}

fn yaml(doc: &str) -> serde_yaml::Mapping {
    match serde_yaml::from_str::<serde_yaml::Value>(doc) {
        Ok(serde_yaml::Value::Mapping(m)) => m,
        other => panic!("not a YAML mapping ({other:?}):\n{doc}"),
    }
}

fn keys_of(m: &serde_yaml::Mapping) -> Vec<serde_yaml::Value> {
    m.keys().cloned().collect()
}

fn yaml_str(v: &serde_yaml::Value) -> Option<&str> {
    v.as_str()
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn seed_documents_keep_their_shape_and_values_for_any_input(
        instance_id in text(),
        hostname in prop_oneof![valid_hostname(), text()],
        password_hash in prop_oneof!["\\$6\\$[a-zA-Z0-9./]{8}\\$[a-zA-Z0-9./]{20}", text()],
        ssh_keys in prop::collection::vec(prop_oneof![good_key(), keyish(), text()], 0..4),
        nics in prop::collection::vec(nic(), 0..3),
    ) {
        let reference = reference_seed();

        let docs = cloudinit::render(&SeedInput {
            instance_id: &instance_id,
            hostname: &hostname,
            password_hash: &password_hash,
            ssh_keys: &ssh_keys,
            nics: &nics,
        });

        let docs = docs.expect("rendering depends on no input");
        for ((name, doc), (_, plain)) in docs.files().iter().zip(reference.files().iter()) {
            prop_assert!(printable_ascii(doc), "{} is not printable ASCII:\n{}", name, doc);
            prop_assert_eq!(doc.lines().count(), plain.lines().count(), "{}:\n{}", name, doc);
            prop_assert_eq!(keys_of(&yaml(doc)), keys_of(&yaml(plain)), "{}:\n{}", name, doc);
        }
        let short = hostname.split('.').next().unwrap_or_default();
        let meta = yaml(&docs.meta_data);
        prop_assert_eq!(yaml_str(&meta["instance-id"]), Some(instance_id.as_str()));
        prop_assert_eq!(yaml_str(&meta["local-hostname"]), Some(short));
        let user = yaml(&docs.user_data);
        prop_assert_eq!(yaml_str(&user["hostname"]), Some(short));
        prop_assert_eq!(yaml_str(&user["fqdn"]), Some(hostname.as_str()));
        let root = &user["users"][0];
        prop_assert_eq!(yaml_str(&root["name"]), Some("root"));
        prop_assert_eq!(yaml_str(&root["hashed_passwd"]), Some(password_hash.as_str()));
        let keys: Vec<Option<&str>> = root["ssh_authorized_keys"]
            .as_sequence()
            .expect("a sequence of keys")
            .iter()
            .map(yaml_str)
            .collect();
        prop_assert_eq!(keys, ssh_keys.iter().map(|k| Some(k.as_str())).collect::<Vec<_>>());
        let network = yaml(&docs.network_config);
        let ethernets = network["ethernets"].as_mapping().expect("a mapping of NICs");
        // A later NIC of the same name replaces an earlier one.
        let by_name: BTreeMap<&str, &NicConfig> = nics.iter().map(|n| (n.name.as_str(), n)).collect();
        prop_assert_eq!(ethernets.len(), by_name.len());
        for (name, nic) in by_name {
            let entry = ethernets.get(name).expect("every NIC has an entry");
            prop_assert_eq!(yaml_str(&entry["set-name"]), Some(name));
            prop_assert_eq!(yaml_str(&entry["match"]["macaddress"]), Some(nic.mac.as_str()));
            let addresses: Vec<Option<&str>> = entry["addresses"]
                .as_sequence()
                .expect("a sequence of addresses")
                .iter()
                .map(yaml_str)
                .collect();
            prop_assert_eq!(addresses, nic.addresses.iter().map(|a| Some(a.as_str())).collect::<Vec<_>>());
            prop_assert_eq!(entry.get("mtu").and_then(|m| m.as_u64()), nic.mtu.map(u64::from));
        }
    }
}

// ---------------------------------------------------------------------------------------
// c. Validation closes the door
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn hostnames_accepted_have_the_contract_shape(h in hostnameish()) {
        if validate::hostname_rule(&h).is_ok() {
            contract_hostname(&h)?;
        }
    }

    #[test]
    fn valid_hostnames_are_accepted(h in valid_hostname()) {
        prop_assert_eq!(validate::hostname_rule(&h), Ok(()));
    }

    #[test]
    fn ssh_keys_accepted_are_one_printable_line_of_a_known_type(key in keyish()) {
        if let Ok(accepted) = validate::ssh_keys(std::slice::from_ref(&key)) {
            prop_assert_eq!(accepted.len(), 1);
            prop_assert_eq!(accepted[0].as_str(), key.trim_matches([' ', '\t']));
            contract_key(&accepted[0])?;
        }
    }

    #[test]
    fn well_formed_ssh_keys_are_accepted(key in good_key()) {
        let accepted = validate::ssh_keys(std::slice::from_ref(&key));

        prop_assert_eq!(accepted, Ok(vec![key.trim_matches([' ', '\t']).to_owned()]));
    }
}

// ---------------------------------------------------------------------------------------
// d. Domain XML: no element added, values read back exactly (or refused)
// ---------------------------------------------------------------------------------------

fn domain_spec<'a>(title: &'a str, template_id: &'a str, nics: &'a [Nic<'a>]) -> DomainSpec<'a> {
    DomainSpec {
        id: VM_ID.parse().expect("a UUID"),
        name: "vps-0b9f9c1e-3c3a-4f57-9d49-7f1f0c1a2b3c",
        title,
        template_id,
        accelerator: Accelerator::Kvm,
        machine: "q35",
        cpu_mode: Some("host-passthrough"),
        vcpus: 2,
        memory_mib: 1024,
        ovmf_code: Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        ovmf_vars: Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd"),
        nvram: Path::new("/var/lib/hvnode/vms/x/nvram.fd"),
        disk: Path::new("/var/lib/hvnode/vms/x/disk.qcow2"),
        backing: Some((Path::new("/var/lib/hvnode/images/t.qcow2"), "qcow2")),
        seed: Path::new("/var/lib/hvnode/vms/x/seed.img"),
        console_log: Path::new("/var/lib/hvnode/vms/x/console.log"),
        nics,
    }
}

/// Every element in document order, with its namespace.
fn elements(doc: &roxmltree::Document<'_>) -> Vec<(Option<String>, String)> {
    doc.descendants()
        .filter(|n| n.is_element())
        .map(|n| {
            let tag = n.tag_name();
            (tag.namespace().map(str::to_owned), tag.name().to_owned())
        })
        .collect()
}

fn text_of<'a>(doc: &'a roxmltree::Document<'a>, name: &str) -> &'a str {
    let element = doc
        .descendants()
        .find(|n| n.has_tag_name(name))
        .unwrap_or_else(|| panic!("no <{name}>"));
    element.text().unwrap_or_default()
}

fn mac_of<'a>(doc: &'a roxmltree::Document<'a>) -> &'a str {
    doc.descendants()
        .find(|n| n.has_tag_name("mac"))
        .and_then(|n| n.attribute("address"))
        .expect("a <mac address>")
}

fn reference_elements() -> Vec<(Option<String>, String)> {
    let nics = [Nic {
        mac: "52:54:00:12:34:56",
        bridge: "br-public",
        tap: "vh0",
    }];
    let xml = domain_xml::render(&domain_spec("web1.example.com", "9010", &nics));
    elements(&roxmltree::Document::parse(&xml).expect("the reference parses"))
}

/// What `render` makes of a value: characters XML cannot carry become U+FFFD.
fn lossy(s: &str) -> String {
    s.chars()
        .map(|c| {
            if domain_xml::xml_char(c) {
                c
            } else {
                '\u{FFFD}'
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn domain_xml_is_refused_or_keeps_its_elements_and_values(
        title in prop_oneof![valid_hostname(), text()],
        template_id in prop_oneof!["[0-9]{4}", text()],
        mac in prop_oneof!["([0-9a-f]{2}:){5}[0-9a-f]{2}", text()],
    ) {
        let reference = reference_elements();
        let nics = [Nic { mac: &mac, bridge: "br-public", tap: "vh0" }];
        let spec = domain_spec(&title, &template_id, &nics);
        let representable = [&title, &template_id, &mac]
            .iter()
            .all(|s| s.chars().all(domain_xml::xml_char));

        let strict = domain_xml::try_render(&spec);
        let lenient = domain_xml::render(&spec);

        prop_assert_eq!(strict.is_ok(), representable);
        if let Ok(xml) = &strict {
            prop_assert_eq!(xml, &lenient);
        }
        let doc = roxmltree::Document::parse(&lenient);
        prop_assert!(doc.is_ok(), "{:?}:\n{}", doc.err(), lenient);
        let doc = doc.expect("checked");
        prop_assert_eq!(elements(&doc), reference);
        prop_assert_eq!(text_of(&doc, "title"), lossy(&title));
        prop_assert_eq!(text_of(&doc, "template"), lossy(&template_id));
        prop_assert_eq!(mac_of(&doc), lossy(&mac));
    }
}

// ---------------------------------------------------------------------------------------
// e. Snapshot descriptions: refused, or stored and listed unchanged
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn snapshot_descriptions_are_refused_or_kept_unchanged(
        d in prop_oneof![text(), "[[:print:]]{490,510}"],
    ) {
        let allowed = d.chars().count() <= 500 && !d.chars().any(char::is_control);

        let checked = snapshots::description(Some(d.clone()));

        prop_assert_eq!(checked.is_ok(), allowed);
        if let Ok(stored) = checked {
            prop_assert_eq!(&stored, &d);
            let body = serde_json::to_string(&Snapshot {
                name: "s".into(),
                description: stored,
                created_at: "2025-01-01T00:00:00Z".into(),
                vmstate: false,
            })
            .expect("a snapshot serialises");
            let listed: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            prop_assert_eq!(listed["description"].as_str(), Some(d.as_str()));
        }
    }
}
