//! The HTTP contract through the real router: auth on every route, and the envelope on
//! every error (unknown route, wrong method, bad JSON, oversized body, bad input).
//!
//! libvirt is not needed here: the agent is pointed at a socket that does not exist, which
//! is also how it behaves while libvirtd is down.

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hvnode::api::UnixPeer;
use serde_json::{json, Value};
use tower::ServiceExt;

mod common;

use common::{harness, harness_configured, request, Harness, TOKEN, VM};

async fn send(h: &Harness, req: Request<Body>) -> (StatusCode, Value) {
    h.send(req).await
}

fn assert_error(status: StatusCode, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status.as_u16(), want_status, "{body}");
    assert_eq!(body["success"], json!(false), "{body}");
    assert_eq!(body["error_code"], json!(want_code), "{body}");
    assert!(
        body["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{body}"
    );
    assert!(
        body["message"].as_str().is_some_and(|s| !s.is_empty()),
        "{body}"
    );
}

/// Every protected route, with a method it answers to.
fn protected_routes() -> Vec<(Method, String)> {
    let mut routes = vec![
        (Method::GET, "/v1/node".to_string()),
        (Method::GET, "/v1/templates".into()),
        (Method::GET, "/v1/vms".into()),
        (Method::POST, "/v1/vms".into()),
        (Method::GET, format!("/v1/vms/{VM}")),
        (Method::DELETE, format!("/v1/vms/{VM}")),
        (Method::GET, format!("/v1/vms/{VM}/deployment")),
        (Method::GET, "/v1/tasks".into()),
        (Method::GET, format!("/v1/tasks/{VM}")),
        (Method::GET, format!("/v1/vms/{VM}/ips")),
        (Method::POST, format!("/v1/vms/{VM}/ips")),
        (Method::DELETE, format!("/v1/vms/{VM}/ips/192.0.2.10")),
        (Method::POST, format!("/v1/vms/{VM}/ips/192.0.2.10/move")),
        (Method::GET, "/v1/private-networks".into()),
        (Method::POST, "/v1/private-networks".into()),
        (Method::GET, "/v1/private-networks/subnets".into()),
        (Method::DELETE, format!("/v1/private-networks/{VM}")),
        (Method::POST, format!("/v1/private-networks/{VM}/attach")),
        (
            Method::DELETE,
            format!("/v1/private-networks/{VM}/members/{VM}"),
        ),
        (Method::GET, format!("/v1/vms/{VM}/status")),
        (Method::GET, format!("/v1/vms/{VM}/status/stream")),
        (Method::POST, format!("/v1/vms/{VM}/console")),
        (Method::GET, "/metrics".into()),
        (Method::GET, format!("/v1/vms/{VM}/snapshots")),
        (Method::POST, format!("/v1/vms/{VM}/snapshots")),
        (Method::DELETE, format!("/v1/vms/{VM}/snapshots/s1")),
        (Method::POST, format!("/v1/vms/{VM}/snapshots/s1/rollback")),
    ];
    for action in [
        "start",
        "stop",
        "restart",
        "reset",
        "suspend",
        "resume",
        "reinstall",
        "resize",
    ] {
        routes.push((Method::POST, format!("/v1/vms/{VM}/{action}")));
    }
    routes
}

#[tokio::test]
async fn health_needs_no_token_and_reports_libvirt_down_as_degraded() {
    let h = harness();

    let (status, body) = send(&h, request(Method::GET, "/v1/health", None, Body::empty())).await;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["success"], json!(true));
    assert_eq!(body["data"]["status"], json!("degraded"));
    assert_eq!(body["data"]["service"], json!("hvnode"));
    assert_eq!(body["data"]["libvirt"]["connected"], json!(false));
}

#[tokio::test]
async fn every_protected_route_refuses_a_missing_token() {
    let h = harness();

    for (method, path) in protected_routes() {
        let (status, body) = send(&h, request(method.clone(), &path, None, Body::empty())).await;

        assert_error(status, &body, 401, "NO_API_KEY");
    }
}

#[tokio::test]
async fn every_protected_route_refuses_a_wrong_token() {
    let h = harness();

    for (method, path) in protected_routes() {
        let (status, body) = send(
            &h,
            request(method.clone(), &path, Some("wrong"), Body::empty()),
        )
        .await;

        assert_error(status, &body, 401, "INVALID_API_KEY");
    }
}

#[tokio::test]
async fn a_non_bearer_authorization_header_is_no_key() {
    let h = harness();
    let req = Request::builder()
        .uri("/v1/vms")
        .header("authorization", format!("Basic {TOKEN}"))
        .body(Body::empty())
        .unwrap();

    let (status, body) = send(&h, req).await;

    assert_error(status, &body, 401, "NO_API_KEY");
}

#[tokio::test]
async fn unknown_routes_are_404_in_the_envelope() {
    let h = harness();

    for path in ["/", "/v2/vms", "/v1/vms/x/y/z", "/v1/nope"] {
        let (status, body) = send(&h, request(Method::GET, path, Some(TOKEN), Body::empty())).await;

        assert_error(status, &body, 404, "ROUTE_NOT_FOUND");
    }
}

#[tokio::test]
async fn wrong_methods_are_405_in_the_envelope() {
    let h = harness();

    for (method, path) in [
        (Method::PUT, "/v1/vms".to_string()),
        (Method::GET, format!("/v1/vms/{VM}/start")),
        (Method::POST, "/v1/health".into()),
        (Method::DELETE, "/v1/node".into()),
    ] {
        let (status, body) = send(&h, request(method, &path, Some(TOKEN), Body::empty())).await;

        assert_error(status, &body, 405, "METHOD_NOT_ALLOWED");
    }
}

#[tokio::test]
async fn bodies_that_are_not_json_are_invalid_json() {
    let h = harness();

    for body in ["", "{", "not json", "[1,2", "{\"cpu_cores\": \"two\"}"] {
        let (status, resp) = send(
            &h,
            request(Method::POST, "/v1/vms", Some(TOKEN), Body::from(body)),
        )
        .await;

        assert_error(status, &resp, 400, "INVALID_JSON");
    }
}

/// serde reads a JSON array into a struct's fields in order; a body must be an object, so
/// `[null, null]` is no `{}` in disguise (found by fuzzing against real VMs: it added an
/// address).
#[tokio::test]
async fn bodies_that_are_json_but_not_objects_are_invalid_json_and_change_nothing() {
    let h = harness();
    let cases = [
        ("/v1/private-networks", r#"["arraynet"]"#),
        ("/v1/private-networks", r#"["arraynet", "10.99.0.0/24"]"#),
        (&*format!("/v1/vms/{VM}/ips"), "[null, null]"),
        (&*format!("/v1/vms/{VM}/snapshots"), r#"["snap1"]"#),
        ("/v1/vms", "[]"),
        ("/v1/private-networks", "\"arraynet\""),
        ("/v1/private-networks", "7"),
        ("/v1/private-networks", "null"),
    ];
    for (path, body) in cases {
        let (status, resp) = send(
            &h,
            request(Method::POST, path, Some(TOKEN), Body::from(body)),
        )
        .await;

        assert_error(status, &resp, 400, "INVALID_JSON");
    }
    let (status, list) = send(
        &h,
        request(
            Method::GET,
            "/v1/private-networks",
            Some(TOKEN),
            Body::empty(),
        ),
    )
    .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["data"]["networks"], json!([]), "nothing was created");
    // The same request as an object is accepted: the refusal is about the shape only.
    let (status, made) = send(
        &h,
        request(
            Method::POST,
            "/v1/private-networks",
            Some(TOKEN),
            Body::from(r#"{"name": "objectnet"}"#),
        ),
    )
    .await;
    assert_eq!(status, 201, "{made}");
}

#[tokio::test]
async fn oversized_bodies_are_413_declared_or_streamed() {
    let h = harness();
    let big = vec![b' '; 1024 * 1024 + 1];
    let declared = Request::builder()
        .method(Method::POST)
        .uri("/v1/vms")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-length", big.len())
        .body(Body::from(big.clone()))
        .unwrap();
    let stream = futures_body(big);
    let streamed = Request::builder()
        .method(Method::POST)
        .uri("/v1/vms")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(stream)
        .unwrap();

    let (s1, b1) = send(&h, declared).await;
    let (s2, b2) = send(&h, streamed).await;

    assert_error(s1, &b1, 413, "PAYLOAD_TOO_LARGE");
    assert_error(s2, &b2, 413, "PAYLOAD_TOO_LARGE");
}

/// A body without a declared length.
fn futures_body(bytes: Vec<u8>) -> Body {
    let chunks: Vec<Result<axum::body::Bytes, std::io::Error>> = bytes
        .chunks(64 * 1024)
        .map(|c| Ok(axum::body::Bytes::copy_from_slice(c)))
        .collect();
    Body::from_stream(tokio_stream_iter(chunks))
}

fn tokio_stream_iter<T>(items: Vec<T>) -> impl futures_core::Stream<Item = T> {
    struct Iter<T>(std::vec::IntoIter<T>);
    impl<T> futures_core::Stream for Iter<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    impl<T> Unpin for Iter<T> {}
    Iter(items.into_iter())
}

fn create_body(overrides: Value) -> Body {
    let mut body = json!({
        "id": VM,
        "hostname": "web1.example.com",
        "template_id": "9010",
        "cpu_cores": 1,
        "ram_mb": 512,
        "disk_gb": 5,
        "root_password": "s3cretpass",
        "ssh_keys": [],
    });
    for (k, v) in overrides.as_object().unwrap() {
        if v.is_null() {
            body.as_object_mut().unwrap().remove(k);
        } else {
            body[k] = v.clone();
        }
    }
    Body::from(body.to_string())
}

#[tokio::test]
async fn create_validation_uses_the_contract_codes_and_changes_nothing() {
    let h = harness();
    let cases = [
        (
            json!({"hostname": null, "root_password": null}),
            "MISSING_FIELDS",
        ),
        (json!({"hostname": "-bad-"}), "INVALID_HOSTNAME"),
        (json!({"hostname": "Web1"}), "INVALID_HOSTNAME"),
        (json!({"root_password": "a1"}), "PASSWORD_TOO_SHORT"),
        (
            json!({"root_password": "a1".repeat(40)}),
            "PASSWORD_TOO_LONG",
        ),
        (json!({"root_password": "onlyletters"}), "PASSWORD_WEAK"),
        (json!({"ssh_keys": ["ssh-rsa !!!"]}), "INVALID_SSH_KEY"),
        (
            json!({"ssh_keys": ["ssh-ed25519 AAAA\nssh-rsa AAAA"]}),
            "INVALID_SSH_KEY",
        ),
        (json!({"cpu_cores": 0}), "INVALID_RESOURCES"),
        (json!({"ram_mb": -5}), "INVALID_RESOURCES"),
        (json!({"template_id": "9999"}), "INVALID_TEMPLATE"),
        (json!({"id": "not-a-uuid"}), "INVALID_JSON"),
    ];

    for (overrides, code) in cases {
        let (status, body) = send(
            &h,
            request(
                Method::POST,
                "/v1/vms",
                Some(TOKEN),
                create_body(overrides.clone()),
            ),
        )
        .await;

        assert_error(status, &body, 400, code);
    }
    let (_, list) = send(
        &h,
        request(Method::GET, "/v1/vms", Some(TOKEN), Body::empty()),
    )
    .await;
    assert_eq!(list["data"]["pagination"]["total"], json!(0));
}

#[tokio::test]
async fn the_password_never_appears_in_an_error() {
    let h = harness();

    let (_, body) = send(
        &h,
        request(
            Method::POST,
            "/v1/vms",
            Some(TOKEN),
            create_body(json!({"root_password": "nodigitsatallhere", "hostname": "ok"})),
        ),
    )
    .await;

    assert!(!body.to_string().contains("nodigitsatallhere"));
}

#[tokio::test]
async fn unknown_vms_and_tasks_are_404() {
    let h = harness();

    for (path, code) in [
        (format!("/v1/vms/{VM}"), "VPS_NOT_FOUND"),
        ("/v1/vms/not-a-uuid".to_string(), "VPS_NOT_FOUND"),
        (format!("/v1/vms/{VM}/deployment"), "VPS_NOT_FOUND"),
        (format!("/v1/tasks/{VM}"), "TASK_NOT_FOUND"),
        ("/v1/tasks/nope".to_string(), "TASK_NOT_FOUND"),
    ] {
        let (status, body) =
            send(&h, request(Method::GET, &path, Some(TOKEN), Body::empty())).await;

        assert_error(status, &body, 404, code);
    }
    let (status, body) = send(
        &h,
        request(
            Method::POST,
            &format!("/v1/vms/{VM}/start"),
            Some(TOKEN),
            Body::empty(),
        ),
    )
    .await;
    assert_error(status, &body, 404, "VPS_NOT_FOUND");
}

#[tokio::test]
async fn list_pagination_is_clamped_and_validated() {
    let h = harness();

    let (status, body) = send(
        &h,
        request(
            Method::GET,
            "/v1/vms?limit=1000&offset=0",
            Some(TOKEN),
            Body::empty(),
        ),
    )
    .await;
    let (bad_status, bad) = send(
        &h,
        request(Method::GET, "/v1/vms?limit=abc", Some(TOKEN), Body::empty()),
    )
    .await;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["pagination"]["limit"], json!(100));
    assert_eq!(body["data"]["pagination"]["has_more"], json!(false));
    assert_error(bad_status, &bad, 400, "INVALID_JSON");
}

#[tokio::test]
async fn repeated_query_parameters_are_refused() {
    let h = harness();

    let (status, body) = send(
        &h,
        request(
            Method::GET,
            "/v1/tasks?limit=true&limit=",
            Some(TOKEN),
            Body::empty(),
        ),
    )
    .await;

    assert_error(status, &body, 400, "INVALID_JSON");
}

#[tokio::test]
async fn socket_peers_are_checked_by_uid_not_token() {
    let h = harness();
    let as_peer = |uid: u32| {
        let mut req = request(Method::GET, "/v1/vms", None, Body::empty());
        req.extensions_mut()
            .insert(ConnectInfo(UnixPeer { uid, gid: uid }));
        req
    };

    let (root_status, _) = send(&h, as_peer(0)).await;
    let (user_status, user_body) = send(&h, as_peer(4242)).await;

    assert_eq!(root_status, StatusCode::OK);
    assert_error(user_status, &user_body, 401, "INVALID_API_KEY");
}

#[tokio::test]
async fn templates_and_node_answer_with_an_empty_store() {
    let h = harness();

    let (s1, templates) = send(
        &h,
        request(Method::GET, "/v1/templates", Some(TOKEN), Body::empty()),
    )
    .await;
    let (s2, node) = send(
        &h,
        request(Method::GET, "/v1/node", Some(TOKEN), Body::empty()),
    )
    .await;

    assert_eq!(s1, StatusCode::OK);
    assert_eq!(templates["data"]["templates"], json!([]));
    assert_eq!(s2, StatusCode::OK);
    assert!(node["data"]["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert_eq!(node["data"]["accelerator"], json!("kvm"));
    assert_eq!(node["data"]["instances"]["total"], json!(0));
    assert_eq!(node["data"]["allocated"]["cpu_cores"], json!(0));
}

#[tokio::test]
async fn private_network_validation_and_unknown_ids_use_the_contract_codes() {
    let h = harness();

    let (s1, b1) = send(
        &h,
        request(
            Method::POST,
            "/v1/private-networks",
            Some(TOKEN),
            Body::from("{}"),
        ),
    )
    .await;
    let (s2, b2) = send(
        &h,
        request(
            Method::POST,
            "/v1/private-networks",
            Some(TOKEN),
            Body::from(r#"{"name": "bad<name>"}"#),
        ),
    )
    .await;
    let (s3, b3) = send(
        &h,
        request(
            Method::DELETE,
            &format!("/v1/private-networks/{VM}"),
            Some(TOKEN),
            Body::empty(),
        ),
    )
    .await;
    let (s4, b4) = send(
        &h,
        request(
            Method::GET,
            &format!("/v1/vms/{VM}/ips"),
            Some(TOKEN),
            Body::empty(),
        ),
    )
    .await;
    let (s5, status) = send(
        &h,
        request(
            Method::GET,
            "/v1/private-networks/subnets",
            Some(TOKEN),
            Body::empty(),
        ),
    )
    .await;

    assert_error(s1, &b1, 400, "MISSING_FIELDS");
    assert_error(s2, &b2, 400, "INVALID_NAME");
    assert_error(s3, &b3, 404, "NETWORK_NOT_FOUND");
    assert_error(s4, &b4, 404, "VPS_NOT_FOUND");
    assert_eq!(s5, StatusCode::OK);
    assert_eq!(status["data"]["pool"], json!("10.240.0.0/16"));
    assert_eq!(status["data"]["allocated"], json!(0));
    assert_eq!(status["data"]["free"], json!(256));
}

#[tokio::test]
async fn console_routes_refuse_bad_tickets_without_a_token_and_before_any_upgrade() {
    let h = harness();
    let zeros = "0".repeat(64);
    for path in [
        format!("/v1/console/ws?ticket={zeros}"),
        "/v1/console/ws".to_string(),
        "/v1/console/ws?ticket=short".to_string(),
        format!("/console/{zeros}"),
        format!("/console/{zeros}/novnc/core/rfb.js"),
        format!("/console/{zeros}/novnc/../../etc/passwd"),
    ] {
        let (status, body) = send(&h, request(Method::GET, &path, None, Body::empty())).await;
        assert_error(status, &body, 403, "INVALID_TICKET");
    }
}

#[tokio::test]
async fn status_and_console_of_unknown_vms_are_404_and_bad_input_400() {
    let h = harness();
    let (status, body) = send(
        &h,
        request(
            Method::GET,
            &format!("/v1/vms/{VM}/status"),
            Some(TOKEN),
            Body::empty(),
        ),
    )
    .await;
    assert_error(status, &body, 404, "VPS_NOT_FOUND");
    let console = |body: &'static str| {
        request(
            Method::POST,
            &format!("/v1/vms/{VM}/console"),
            Some(TOKEN),
            Body::from(body),
        )
    };
    let (status, body) = send(&h, console(r#"{}"#)).await;
    assert_error(status, &body, 400, "MISSING_FIELDS");
    let (status, body) = send(&h, console(r#"{"type":"rdp"}"#)).await;
    assert_error(status, &body, 400, "INVALID_JSON");
    let (status, body) = send(&h, console(r#"{"type":"novnc","ttl_seconds":301}"#)).await;
    assert_error(status, &body, 400, "INVALID_JSON");
    let (status, body) = send(&h, console(r#"{"type":"novnc"}"#)).await;
    assert_error(status, &body, 404, "VPS_NOT_FOUND");
    let (status, body) = send(
        &h,
        request(
            Method::GET,
            &format!("/v1/vms/{VM}/status/stream?interval_ms=100"),
            Some(TOKEN),
            Body::empty(),
        ),
    )
    .await;
    assert_error(status, &body, 400, "INVALID_JSON");
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_request_counts() {
    let h = harness();
    send(
        &h,
        request(
            Method::GET,
            "/v1/vms/not-a-uuid",
            Some(TOKEN),
            Body::empty(),
        ),
    )
    .await;
    let resp = h
        .router
        .clone()
        .oneshot(request(Method::GET, "/metrics", Some(TOKEN), Body::empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(
        text.contains("# TYPE hvnode_api_requests_total counter"),
        "{text}"
    );
    assert!(
        text.contains(
            r#"hvnode_api_requests_total{route="/v1/vms/{id}",method="GET",status="404"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("hvnode_up 0"), "libvirt is down here: {text}");
}

#[tokio::test]
async fn snapshot_routes_answer_in_the_envelope() {
    let h = harness();
    let snaps = format!("/v1/vms/{VM}/snapshots");
    let calls = [
        (
            Method::GET,
            snaps.clone(),
            Body::empty(),
            404,
            "VPS_NOT_FOUND",
        ),
        (
            Method::POST,
            snaps.clone(),
            Body::from(r#"{"name": "s1"}"#),
            404,
            "VPS_NOT_FOUND",
        ),
        (
            Method::POST,
            snaps.clone(),
            Body::from("{not json"),
            400,
            "INVALID_JSON",
        ),
        (
            Method::POST,
            format!("{snaps}/s1/rollback"),
            Body::empty(),
            404,
            "VPS_NOT_FOUND",
        ),
        (
            Method::DELETE,
            format!("{snaps}/s1"),
            Body::empty(),
            404,
            "VPS_NOT_FOUND",
        ),
        (
            Method::PUT,
            format!("{snaps}/s1"),
            Body::empty(),
            405,
            "METHOD_NOT_ALLOWED",
        ),
    ];
    for (method, path, body, status, code) in calls {
        let mut req = request(method.clone(), &path, Some(TOKEN), body);
        req.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        let (s, b) = send(&h, req).await;
        assert_error(s, &b, status, code);
    }
}

/// A request from TCP peer `from` with bearer `token`.
fn from_peer(method: Method, path: &str, token: &str, from: &str, body: Body) -> Request<Body> {
    let mut req = request(method, path, Some(token), body);
    let addr = std::net::SocketAddr::new(from.parse().unwrap(), 40000);
    req.extensions_mut().insert(ConnectInfo(addr));
    req
}

#[tokio::test]
async fn scoped_tokens_are_refused_with_their_code_and_change_nothing() {
    use hvnode::api::auth::hash_token;
    use hvnode::config::TokenConfig;
    let token = |name: &str, scopes: &[&str], expires: Option<&str>, ips: &[&str]| TokenConfig {
        name: name.into(),
        sha256: hash_token(&format!("{name}-secret")),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        expires_at: expires.map(str::to_owned),
        allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
    };
    let h = harness_configured(
        |c| {
            c.api.tokens = vec![
                token("reader", &["vps:read"], None, &[]),
                token("writer", &["vps:write"], None, &[]),
                token("watcher", &["metrics"], None, &[]),
                token("old", &["admin"], Some("2020-01-01T00:00:00Z"), &[]),
                token("later", &["vps:read"], Some("2999-01-01T00:00:00Z"), &[]),
                token("fenced", &["admin"], None, &["10.99.0.0/16"]),
            ];
        },
        |_| {},
    );
    let local = "127.0.0.1";
    let call = |m: Method, path: &str, who: &str, from: &str, body: Body| {
        from_peer(m, path, &format!("{who}-secret"), from, body)
    };
    let vm_path = format!("/v1/vms/{VM}");
    let start = format!("/v1/vms/{VM}/start");
    let console = format!("/v1/vms/{VM}/console");

    // The reader reads, and is refused every change before any handler looks at it: a
    // create that would otherwise be admitted leaves the list as it was.
    let (s, _) = send(
        &h,
        call(Method::GET, "/v1/vms", "reader", local, Body::empty()),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = send(
        &h,
        call(
            Method::POST,
            "/v1/vms",
            "reader",
            local,
            create_body(json!({})),
        ),
    )
    .await;
    assert_error(s, &body, 403, "INSUFFICIENT_SCOPE");
    assert!(
        body["message"].as_str().unwrap().contains("vps:write"),
        "{body}"
    );
    let (s, body) = send(
        &h,
        call(Method::DELETE, &vm_path, "reader", local, Body::empty()),
    )
    .await;
    assert_error(s, &body, 403, "INSUFFICIENT_SCOPE");
    let (s, body) = send(
        &h,
        call(Method::POST, &console, "reader", local, Body::from("{}")),
    )
    .await;
    assert_error(s, &body, 403, "INSUFFICIENT_SCOPE");
    let (s, body) = send(
        &h,
        call(Method::GET, "/metrics", "reader", local, Body::empty()),
    )
    .await;
    assert_error(s, &body, 403, "INSUFFICIENT_SCOPE");
    let (_, list) = send(
        &h,
        request(Method::GET, "/v1/vms", Some(TOKEN), Body::empty()),
    )
    .await;
    assert_eq!(list["data"]["pagination"]["total"], json!(0), "{list}");

    // The writer passes the scope check on a change (and meets the VM's absence), not on a
    // deletion.
    let (s, body) = send(
        &h,
        call(Method::POST, &start, "writer", local, Body::from("{}")),
    )
    .await;
    assert_error(s, &body, 404, "VPS_NOT_FOUND");
    let (s, body) = send(
        &h,
        call(Method::DELETE, &vm_path, "writer", local, Body::empty()),
    )
    .await;
    assert_error(s, &body, 403, "INSUFFICIENT_SCOPE");

    // Metrics alone.
    let a = h
        .answer(call(
            Method::GET,
            "/metrics",
            "watcher",
            local,
            Body::empty(),
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let (s, body) = send(
        &h,
        call(Method::GET, "/v1/vms", "watcher", local, Body::empty()),
    )
    .await;
    assert_error(s, &body, 403, "INSUFFICIENT_SCOPE");

    // Expiry: past refused, future accepted.
    let (s, body) = send(
        &h,
        call(Method::GET, "/v1/vms", "old", local, Body::empty()),
    )
    .await;
    assert_error(s, &body, 401, "EXPIRED_API_KEY");
    let (s, _) = send(
        &h,
        call(Method::GET, "/v1/vms", "later", local, Body::empty()),
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    // Source networks: outside refused, inside accepted (IPv4-mapped IPv6 too).
    let (s, body) = send(
        &h,
        call(Method::GET, "/v1/vms", "fenced", local, Body::empty()),
    )
    .await;
    assert_error(s, &body, 403, "IP_NOT_ALLOWED");
    let (s, _) = send(
        &h,
        call(Method::GET, "/v1/vms", "fenced", "10.99.4.2", Body::empty()),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = send(
        &h,
        call(
            Method::GET,
            "/v1/vms",
            "fenced",
            "::ffff:10.99.4.2",
            Body::empty(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    // The unscoped token list keeps full access.
    let a = h
        .answer(request(Method::GET, "/metrics", Some(TOKEN), Body::empty()))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    // An unknown token is still just invalid.
    let (s, body) = send(
        &h,
        call(Method::GET, "/v1/vms", "nobody", local, Body::empty()),
    )
    .await;
    assert_error(s, &body, 401, "INVALID_API_KEY");
}
