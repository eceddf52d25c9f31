//! The OpenAPI document: checked in as it is generated, complete (every contract route,
//! every route the router serves, every error code), served as it is, and true to what the
//! agent answers.
//!
//! `UPDATE_OPENAPI=1 cargo test --test openapi` rewrites `openapi.json` from the code.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use hvnode::api::openapi;
use hvnode::errors::ErrorCode;
use hvnode::store::{self, Store};
use serde_json::{json, Value};
use uuid::Uuid;

mod common;

use common::{harness, harness_with, request, Answer, Harness, TOKEN, VM};
const TASK: &str = "5d2c43f0-8f0e-4c1b-9a55-2f7d8e6b1a90";
const NETWORK: &str = "8a3e1f2c-6b7d-4e9f-a1b2-c3d4e5f60718";
const MEMBER: &str = "1f0e2d3c-4b5a-4697-8877-665544332211";

/// Every route of `node-api.md`, with `a|b` and `{…}/x` lines spelled out.
const CONTRACT_ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/health"),
    ("GET", "/v1/node"),
    ("GET", "/v1/templates"),
    ("GET", "/metrics"),
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms"),
    ("GET", "/v1/vms/{id}"),
    ("GET", "/v1/vms/{id}/deployment"),
    ("GET", "/v1/vms/{id}/status"),
    ("GET", "/v1/vms/{id}/status/stream"),
    ("POST", "/v1/vms/{id}/start"),
    ("POST", "/v1/vms/{id}/stop"),
    ("POST", "/v1/vms/{id}/restart"),
    ("POST", "/v1/vms/{id}/reset"),
    ("POST", "/v1/vms/{id}/suspend"),
    ("POST", "/v1/vms/{id}/resume"),
    ("DELETE", "/v1/vms/{id}"),
    ("POST", "/v1/vms/{id}/reinstall"),
    ("POST", "/v1/vms/{id}/resize"),
    ("GET", "/v1/vms/{id}/snapshots"),
    ("POST", "/v1/vms/{id}/snapshots"),
    ("POST", "/v1/vms/{id}/snapshots/{name}/rollback"),
    ("DELETE", "/v1/vms/{id}/snapshots/{name}"),
    ("POST", "/v1/vms/{id}/console"),
    ("GET", "/console/{ticket}"),
    ("GET", "/v1/console/ws"),
    ("GET", "/v1/vms/{id}/ips"),
    ("POST", "/v1/vms/{id}/ips"),
    ("DELETE", "/v1/vms/{id}/ips/{address}"),
    ("POST", "/v1/vms/{id}/ips/{address}/move"),
    ("GET", "/v1/private-networks"),
    ("GET", "/v1/private-networks/subnets"),
    ("POST", "/v1/private-networks"),
    ("POST", "/v1/private-networks/{id}/attach"),
    (
        "DELETE",
        "/v1/private-networks/{id}/members/{membership_id}",
    ),
    ("DELETE", "/v1/private-networks/{id}"),
    ("GET", "/v1/tasks"),
    ("GET", "/v1/tasks/{id}"),
];

async fn send(h: &Harness, method: &str, path: &str, token: Option<&str>, body: &str) -> Answer {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    h.answer(request(method, path, token, Body::from(body.to_owned())))
        .await
}

fn document() -> Value {
    serde_json::from_str(&openapi::json()).unwrap()
}

/// `(METHOD, path)` of every operation in the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.insert((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

/// A route of the router in the document's syntax (`{*path}` is `{path}` there).
fn as_documented(path: &str) -> String {
    path.replace("{*", "{")
}

/// A concrete path for a route.
fn concrete(path: &str) -> String {
    path.replace("{id}", VM)
        .replace("{membership_id}", MEMBER)
        .replace("{name}", "s1")
        .replace("{address}", "192.0.2.10")
        .replace("{ticket}", "no-such-ticket")
        .replace("{*path}", "core/rfb.js")
}

fn operation<'d>(doc: &'d Value, method: &str, path: &str) -> &'d Value {
    let op = &doc["paths"][as_documented(path)][method.to_lowercase()];
    assert!(op.is_object(), "{method} {path} is not documented");
    op
}

fn is_public(doc: &Value, method: &str, path: &str) -> bool {
    // Public operations override the global bearer requirement with an empty one.
    operation(doc, method, path)["security"] == json!([{}])
}

#[test]
fn the_checked_in_document_is_what_the_code_generates() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let generated = openapi::json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }

    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();

    assert!(
        checked_in == generated,
        "openapi.json is not what the code generates; run \
         `UPDATE_OPENAPI=1 cargo test --test openapi` and commit the diff"
    );
}

#[test]
fn the_document_is_openapi_3_named_for_the_agent() {
    let doc = document();

    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(doc["info"]["title"], json!("hvnode node API"));
    assert_eq!(doc["info"]["version"], json!(env!("CARGO_PKG_VERSION")));
}

#[test]
fn every_contract_route_is_documented() {
    let ops = documented(&document());

    for (method, path) in CONTRACT_ROUTES {
        assert!(
            ops.contains(&(method.to_string(), path.to_string())),
            "{method} {path} of node-api.md is not in the document"
        );
    }
}

#[test]
fn the_document_holds_the_routes_of_the_router_and_no_other() {
    let routed: BTreeSet<(String, String)> = hvnode::api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), as_documented(p)))
        .collect();

    let ops = documented(&document());

    assert_eq!(ops, routed);
}

#[tokio::test]
async fn the_router_serves_each_listed_route_with_exactly_its_methods() {
    let h = harness();
    let doc = document();

    for (method, path) in hvnode::api::ROUTES {
        // Without a token a protected route answers 401 only once it matched, method and
        // all (authentication is a route layer); a public one answers anything but 404/405.
        let answer = send(&h, method, &concrete(path), None, "").await;
        let code = answer.json()["error_code"].clone();
        if is_public(&doc, method, path) {
            assert!(
                ![401, 404, 405].contains(&answer.status.as_u16()),
                "{method} {path}: {} {code}",
                answer.status
            );
        } else {
            assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert_eq!(code, json!("NO_API_KEY"), "{method} {path}");
        }
        for other in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if hvnode::api::ROUTES.contains(&(other, path)) {
                continue;
            }
            let answer = send(&h, other, &concrete(path), Some(TOKEN), "").await;
            assert_eq!(
                answer.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{other} {path} is routed but not listed"
            );
        }
    }
}

#[test]
fn only_health_and_the_console_ticket_routes_are_public() {
    let doc = document();

    let public: BTreeSet<&str> = hvnode::api::ROUTES
        .iter()
        .filter(|(m, p)| is_public(&doc, m, p))
        .map(|(_, p)| *p)
        .collect();

    assert_eq!(doc["security"], json!([{"bearer": []}]));
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        json!("bearer")
    );
    assert_eq!(
        public,
        BTreeSet::from([
            "/v1/health",
            "/console/{ticket}",
            "/console/{ticket}/novnc/{*path}",
            "/v1/console/ws",
        ])
    );
}

#[tokio::test]
async fn the_document_is_served_without_the_envelope() {
    let h = harness();

    let answer = send(&h, "GET", "/v1/openapi.json", Some(TOKEN), "").await;

    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.content_type.starts_with("application/json"));
    let served = answer.json();
    assert!(served["openapi"].as_str().unwrap().starts_with("3."));
    assert!(served.get("success").is_none());
    assert_eq!(served, document());
}

#[tokio::test]
async fn the_document_needs_the_token() {
    let h = harness();

    let answer = send(&h, "GET", "/v1/openapi.json", None, "").await;

    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.json()["error_code"], json!("NO_API_KEY"));
}

#[test]
fn every_error_code_is_in_the_schema() {
    let doc = document();
    let listed: BTreeSet<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();

    let mut codes: BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    codes.insert("INTERNAL_ERROR");

    assert_eq!(listed, codes);
    assert_eq!(
        doc["components"]["schemas"]["ErrorBody"]["properties"]["error_code"],
        json!({"$ref": "#/components/schemas/ErrorCode"})
    );
}

#[test]
fn every_operation_answers_errors_in_the_envelope() {
    let doc = document();

    for (method, path) in documented(&doc) {
        let default = &doc["paths"][&path][method.to_lowercase()]["responses"]["default"];

        assert_eq!(
            default,
            &json!({"$ref": "#/components/responses/Error"}),
            "{method} {path}"
        );
    }
    assert_eq!(
        doc["components"]["responses"]["Error"]["content"]["application/json"]["schema"],
        json!({"$ref": "#/components/schemas/ErrorBody"})
    );
}

// What the agent answers, checked against the document.

/// A VM in the store (deploying, so nothing asks libvirt about it), with its create task,
/// primary address, a private network membership and a snapshot.
fn seed(store: &Store) {
    let vm: Uuid = VM.parse().unwrap();
    let network: Uuid = NETWORK.parse().unwrap();
    let now = "2026-01-02T03:04:05.678Z";
    store
        .call_sync(|c| {
            store::vms::insert(
                c,
                &store::VmRow {
                    id: vm,
                    hostname: "web1.example.com".into(),
                    template_id: "9000".into(),
                    cpu_cores: 2,
                    ram_mb: 2048,
                    disk_gb: 20,
                    bandwidth_mbps: None,
                    password_hash: "$6$x$y".into(),
                    ssh_keys: vec![],
                    ip_address: Some("192.0.2.10".parse().unwrap()),
                    mac: "52:54:00:12:34:56".into(),
                    state: store::VmRowState::Deploying,
                    webhook_url: None,
                    webhook_secret: None,
                    instance_id: "i-1".into(),
                    request_digest: "d".into(),
                    created_at: now.into(),
                    updated_at: now.into(),
                    deployed_at: None,
                },
            )?;
            store::vms::insert_ip(c, "192.0.2.10".parse().unwrap(), vm, "primary", now)?;
            store::tasks::insert(
                c,
                &store::NewTask {
                    id: TASK.parse().unwrap(),
                    kind: "create",
                    vps_id: vm,
                    input: json!({}),
                    // The contract's ten deployment tasks, in order.
                    steps: &[
                        "validate_resources",
                        "allocate_ip",
                        "create_vm",
                        "configure_hardware",
                        "apply_cloud_init",
                        "start_vm",
                        "configure_network",
                        "wait_for_guest_agent",
                        "verify_connectivity",
                        "finalize",
                    ],
                    now,
                },
            )?;
            store::networks::insert_network(
                c,
                &store::NetworkRow {
                    id: network,
                    name: "backend".into(),
                    vni: 4242,
                    subnet: "10.200.1.0/24".parse().unwrap(),
                    created_at: now.into(),
                },
            )?;
            store::networks::insert_member(
                c,
                &store::MemberRow {
                    id: MEMBER.parse().unwrap(),
                    network_id: network,
                    vps_id: vm,
                    address: "10.200.1.2".parse().unwrap(),
                    mac: "52:54:00:65:43:21".into(),
                    nic: 1,
                    created_at: now.into(),
                },
            )?;
            store::snapshots::insert(
                c,
                &store::SnapshotRow {
                    vps_id: vm,
                    name: "s1".into(),
                    description: "before the upgrade".into(),
                    vmstate: false,
                    state: store::SnapshotState::Ready,
                    disk_bytes: 20 << 30,
                    created_at: now.into(),
                },
            )
        })
        .unwrap();
}

/// The schema the document gives for an answer: the one of its status, else `default`.
fn response_schema<'d>(doc: &'d Value, method: &str, route: &str, status: u16) -> &'d Value {
    let responses = &operation(doc, method, route)["responses"];
    let mut response = responses
        .get(status.to_string())
        .unwrap_or(&responses["default"]);
    if let Some(r) = response["$ref"].as_str() {
        response = resolve(doc, r);
    }
    &response["content"]["application/json"]["schema"]
}

fn resolve<'d>(doc: &'d Value, reference: &str) -> &'d Value {
    let pointer = reference.strip_prefix('#').expect("a local reference");
    doc.pointer(pointer)
        .unwrap_or_else(|| panic!("{reference} is not in the document"))
}

/// Checks `value` against the subset of JSON Schema that utoipa writes. Stricter than
/// JSON Schema in one way: an object may only hold the properties its schema names, so a
/// field the code sends but the document does not describe is an error too.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    check_object(doc, schema, value, at, true, errors);
}

fn check_object(
    doc: &Value,
    schema: &Value,
    value: &Value,
    at: &str,
    closed: bool,
    errors: &mut Vec<String>,
) {
    if let Some(r) = schema["$ref"].as_str() {
        return check_object(doc, resolve(doc, r), value, at, closed, errors);
    }
    if let Some(all) = schema["allOf"].as_array() {
        for part in all {
            check_object(doc, part, value, at, false, errors);
        }
        if closed {
            let known = all
                .iter()
                .flat_map(|part| property_names(doc, part))
                .collect::<BTreeSet<_>>();
            unknown_properties(value, &known, at, errors);
        }
    }
    if let Some(one) = schema["oneOf"].as_array() {
        let matching = one
            .iter()
            .filter(|part| {
                let mut e = Vec::new();
                check(doc, part, value, at, &mut e);
                e.is_empty()
            })
            .count();
        if matching != 1 {
            errors.push(format!("{at}: {value} matches {matching} of {schema}"));
        }
    }
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !types.iter().any(|t| is_type(value, t)) {
            errors.push(format!("{at}: {value} is not {types:?}"));
            return;
        }
    }
    if let Some(values) = schema["enum"].as_array() {
        if !values.contains(value) {
            errors.push(format!("{at}: {value} is not one of {values:?}"));
        }
    }
    if let (Some(n), Some(min)) = (value.as_f64(), schema["minimum"].as_f64()) {
        if n < min {
            errors.push(format!("{at}: {n} < minimum {min}"));
        }
    }
    if let (Some(n), Some(max)) = (value.as_f64(), schema["maximum"].as_f64()) {
        if n > max {
            errors.push(format!("{at}: {n} > maximum {max}"));
        }
    }
    if let Some(items) = value.as_array() {
        let len = items.len() as u64;
        if schema["minItems"].as_u64().is_some_and(|min| len < min)
            || schema["maxItems"].as_u64().is_some_and(|max| len > max)
        {
            errors.push(format!("{at}: {len} items is out of bounds"));
        }
        if let Some(item) = schema.get("items") {
            for (i, v) in items.iter().enumerate() {
                check(doc, item, v, &format!("{at}[{i}]"), errors);
            }
        }
    }
    if let (Some(object), Some(properties)) = (value.as_object(), schema["properties"].as_object())
    {
        for name in schema["required"].as_array().into_iter().flatten() {
            let name = name.as_str().unwrap();
            if !object.contains_key(name) {
                errors.push(format!("{at}: required {name} is missing"));
            }
        }
        for (name, v) in object {
            if let Some(s) = properties.get(name) {
                check(doc, s, v, &format!("{at}.{name}"), errors);
            }
        }
        if closed {
            let known = properties.keys().cloned().collect();
            unknown_properties(value, &known, at, errors);
        }
    }
}

fn property_names(doc: &Value, schema: &Value) -> Vec<String> {
    if let Some(r) = schema["$ref"].as_str() {
        return property_names(doc, resolve(doc, r));
    }
    let mut names: Vec<String> = schema["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        names.extend(property_names(doc, part));
    }
    names
}

fn unknown_properties(value: &Value, known: &BTreeSet<String>, at: &str, errors: &mut Vec<String>) {
    for name in value.as_object().into_iter().flat_map(|o| o.keys()) {
        if !known.contains(name) {
            errors.push(format!("{at}: {name} is sent but not documented"));
        }
    }
}

fn is_type(value: &Value, t: &str) -> bool {
    match t {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    }
}

#[test]
fn the_checker_refuses_what_the_schema_does_not_allow() {
    let doc = document();
    let schema = json!({"$ref": "#/components/schemas/Envelope_ActionResult"});
    let good = json!({"success": true, "data": {"id": VM, "name": "a", "status": "running",
        "ip_address": null}});
    let cases = [
        json!({"success": false, "data": good["data"]}),
        json!({"success": true, "data": {"id": VM, "name": "a", "status": "running"}}),
        json!({"success": true, "data": {"id": VM, "name": "a", "status": "asleep",
            "ip_address": null}}),
        json!({"success": true, "data": {"id": VM, "name": "a", "status": "running",
            "ip_address": null, "extra": 1}}),
    ];

    let mut errors = Vec::new();
    check(&doc, &schema, &good, "$", &mut errors);
    assert_eq!(errors, Vec::<String>::new());
    for bad in cases {
        let mut errors = Vec::new();
        check(&doc, &schema, &bad, "$", &mut errors);
        assert!(!errors.is_empty(), "{bad} passed");
    }
}

#[tokio::test]
async fn answers_match_the_document() {
    let h = harness_with(seed);
    let doc = document();
    let other = "9d1c4b7e-0000-4000-8000-000000000000";
    // (method, route, path, body); none of these reaches libvirt or the host network.
    let requests = [
        ("GET", "/v1/health", "/v1/health".to_string(), ""),
        ("GET", "/v1/node", "/v1/node".into(), ""),
        ("GET", "/v1/templates", "/v1/templates".into(), ""),
        ("GET", "/v1/vms", "/v1/vms".into(), ""),
        (
            "GET",
            "/v1/vms",
            "/v1/vms?status=deploying&limit=5".into(),
            "",
        ),
        ("GET", "/v1/vms", "/v1/vms?status=asleep".into(), ""),
        ("GET", "/v1/vms/{id}", format!("/v1/vms/{VM}"), ""),
        ("GET", "/v1/vms/{id}", format!("/v1/vms/{other}"), ""),
        (
            "GET",
            "/v1/vms/{id}/deployment",
            format!("/v1/vms/{VM}/deployment"),
            "",
        ),
        (
            "GET",
            "/v1/vms/{id}/status",
            format!("/v1/vms/{VM}/status"),
            "",
        ),
        (
            "GET",
            "/v1/vms/{id}/status/stream",
            format!("/v1/vms/{VM}/status/stream"),
            "",
        ),
        ("GET", "/v1/vms/{id}/ips", format!("/v1/vms/{VM}/ips"), ""),
        (
            "GET",
            "/v1/vms/{id}/snapshots",
            format!("/v1/vms/{VM}/snapshots"),
            "",
        ),
        (
            "POST",
            "/v1/vms/{id}/start",
            format!("/v1/vms/{VM}/start"),
            "",
        ),
        ("POST", "/v1/vms", "/v1/vms".into(), "{}"),
        ("POST", "/v1/vms", "/v1/vms".into(), "not json"),
        ("GET", "/v1/tasks", "/v1/tasks".into(), ""),
        (
            "GET",
            "/v1/tasks",
            format!("/v1/tasks?vps_id={VM}&state=pending"),
            "",
        ),
        ("GET", "/v1/tasks/{id}", format!("/v1/tasks/{TASK}"), ""),
        (
            "GET",
            "/v1/private-networks",
            "/v1/private-networks".into(),
            "",
        ),
        (
            "GET",
            "/v1/private-networks/subnets",
            "/v1/private-networks/subnets".into(),
            "",
        ),
        ("GET", "/v1/openapi.json", "/v1/openapi.json".into(), ""),
        (
            "GET",
            "/console/{ticket}",
            "/console/no-such-ticket".into(),
            "",
        ),
        (
            "GET",
            "/v1/console/ws",
            "/v1/console/ws?ticket=no-such-ticket".into(),
            "",
        ),
    ];
    let mut errors = Vec::new();

    for (method, route, path, body) in requests {
        let token = (!is_public(&doc, method, route)).then_some(TOKEN);
        let answer = send(&h, method, &path, token, body).await;
        let at = format!("{method} {path} → {}", answer.status.as_u16());
        assert!(
            answer.content_type.starts_with("application/json"),
            "{at}: {}",
            answer.content_type
        );
        let schema = response_schema(&doc, method, route, answer.status.as_u16());
        check(&doc, schema, &answer.json(), &at, &mut errors);
    }

    assert_eq!(errors, Vec::<String>::new());
}
