//! The control plane's edge on a real agent process and a real libvirtd. Scoped tokens: a
//! token is refused for a missing scope, an expiry or its source address before anything
//! happens (no record, no domain), beside the same token, or one holding the scope, being
//! served. Webhook destinations: a customer's webhook to a private address is refused
//! unless `webhooks.allow_private`, beside the same webhook delivered when it is allowed.
//! No guest boots.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

fn token_toml(name: &str, scopes: &[&str], extra: &str) -> String {
    let hash = hvnode::api::auth::hash_token(&secret(name));
    let scopes: Vec<String> = scopes.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "[[api.tokens]]\nname = {name:?}\nsha256 = {hash:?}\nscopes = [{}]\n{extra}\n",
        scopes.join(", ")
    )
}

fn secret(name: &str) -> String {
    format!("tok-{name}-5f0c2a")
}

/// One request as `who`, from local address `from`.
async fn call(
    agent: &Agent,
    who: &str,
    from: &str,
    method: &str,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let client = reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut req = client
        .request(method.parse().unwrap(), format!("{}{path}", agent.url))
        .bearer_auth(secret(who));
    if method != "GET" && method != "DELETE" {
        req = req.json(&body);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "text": text }));
    (status, value)
}

#[tokio::test(flavor = "multi_thread")]
async fn scoped_tokens_are_refused_before_anything_happens() {
    let extra = [
        token_toml("reader", &["vps:read"], ""),
        token_toml("operator", &["vps:write"], ""),
        token_toml("prometheus", &["metrics"], ""),
        token_toml(
            "expired",
            &["admin"],
            "expires_at = \"2021-06-01T00:00:00Z\"",
        ),
        token_toml("fenced", &["admin"], "allowed_ips = [\"127.0.0.2/32\"]"),
    ]
    .concat();
    for name in ["reader", "operator", "prometheus", "expired", "fenced"] {
        record_secret(&Rig::load(), &secret(name));
    }
    let agent = Agent::start(
        "tokens",
        AgentOptions {
            pool: (243, 243),
            extra_toml: extra,
            ..Default::default()
        },
    );
    let id = new_id();
    let body = create_body(&id, "scoped", "Sc0ped-tokens");
    // Should a refusal fail, the VM it let in is still cleaned up.
    agent.created.lock().unwrap().push(id.clone());
    let here = "127.0.0.1";

    // The reader reads; its create is refused with its code and leaves no trace.
    let (s, list) = call(&agent, "reader", here, "GET", "/v1/vms", json!({})).await;
    assert_eq!(s, 200, "{list}");
    let (s, r) = call(&agent, "reader", here, "POST", "/v1/vms", body.clone()).await;
    assert_eq!(
        (s, r["error_code"].clone()),
        (403, json!("INSUFFICIENT_SCOPE")),
        "{r}"
    );
    let (s, r) = agent.get(&format!("/v1/vms/{id}")).await;
    assert_eq!(
        (s, r["error_code"].clone()),
        (404, json!("VPS_NOT_FOUND")),
        "{r}"
    );
    assert!(!domain_exists(&id), "no domain for a refused create");
    let (s, r) = call(&agent, "reader", here, "GET", "/metrics", json!({})).await;
    assert_eq!(
        (s, r["error_code"].clone()),
        (403, json!("INSUFFICIENT_SCOPE")),
        "{r}"
    );

    // The operator gets past the scope check (and meets the VM's absence), but may not
    // delete.
    let (s, r) = call(
        &agent,
        "operator",
        here,
        "POST",
        &format!("/v1/vms/{id}/start"),
        json!({}),
    )
    .await;
    assert_eq!(
        (s, r["error_code"].clone()),
        (404, json!("VPS_NOT_FOUND")),
        "{r}"
    );
    let (s, r) = call(
        &agent,
        "operator",
        here,
        "DELETE",
        &format!("/v1/vms/{id}"),
        json!({}),
    )
    .await;
    assert_eq!(
        (s, r["error_code"].clone()),
        (403, json!("INSUFFICIENT_SCOPE")),
        "{r}"
    );

    // The monitoring token scrapes, and nothing else.
    let (s, r) = call(&agent, "prometheus", here, "GET", "/metrics", json!({})).await;
    assert_eq!(s, 200, "{r}");
    assert!(
        r["text"].as_str().unwrap_or("").contains("hvnode_up"),
        "{r}"
    );
    let (s, r) = call(&agent, "prometheus", here, "GET", "/v1/vms", json!({})).await;
    assert_eq!(
        (s, r["error_code"].clone()),
        (403, json!("INSUFFICIENT_SCOPE")),
        "{r}"
    );

    // Expired: refused, whatever it asks.
    let (s, r) = call(&agent, "expired", here, "GET", "/v1/vms", json!({})).await;
    assert_eq!(
        (s, r["error_code"].clone()),
        (401, json!("EXPIRED_API_KEY")),
        "{r}"
    );

    // Bound to 127.0.0.2: refused from 127.0.0.1, served from 127.0.0.2 over the same
    // listener.
    let (s, r) = call(&agent, "fenced", here, "GET", "/v1/vms", json!({})).await;
    assert_eq!(
        (s, r["error_code"].clone()),
        (403, json!("IP_NOT_ALLOWED")),
        "{r}"
    );
    let (s, r) = call(&agent, "fenced", "127.0.0.2", "GET", "/v1/vms", json!({})).await;
    assert_eq!(s, 200, "{r}");

    // The unscoped token of token_sha256 keeps every scope; the list is as it was.
    let (s, after) = agent.get("/v1/vms").await;
    assert_eq!(s, 200);
    assert_eq!(
        after["data"]["pagination"]["total"],
        list["data"]["pagination"]["total"]
    );
    assert!(agent.metric("hvnode_up").await.is_some());
    // No token secret reached the log.
    for name in ["reader", "operator", "prometheus", "expired", "fenced"] {
        assert!(!agent.log().contains(&secret(name)));
    }
}

/// A deployment that fails inside its task (a template with a wrong checksum) with a
/// webhook to a receiver on loopback: its failure webhook as `agent` delivers it.
async fn failure_webhook(agent: &Agent, name: &str) -> Option<String> {
    use crate::tenancy::{webhook_receiver, BAD_TEMPLATE};
    let (port, hooks) = webhook_receiver();
    let id = new_id();
    let mut body = create_body(&id, name, "Sc0ped-tokens");
    body["template_id"] = json!(BAD_TEMPLATE);
    body["webhook_url"] = json!(format!("http://127.0.0.1:{port}/hooks/{name}"));
    let (s, r) = agent.create(body).await;
    assert_eq!(s, 202, "{r}");
    let (doc, _) = agent.wait_deployment(&id, Duration::from_secs(300)).await;
    assert_eq!(doc["deployment_status"], json!("failed"), "{doc}");
    tokio::task::spawn_blocking(move || hooks.recv_timeout(Duration::from_secs(30)).ok())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_to_a_private_address_is_refused_unless_allowed() {
    let rig = Rig::load();
    let images = tempfile::tempdir_in(rig.root.join("e2e")).unwrap();
    crate::tenancy::image_store(&rig, images.path());
    let options = |env: Vec<(String, String)>, pool: u8| AgentOptions {
        pool: (pool, pool),
        image_dir: Some(images.path().to_owned()),
        env,
        ..Default::default()
    };
    // The rig's default (allow_private = true): the same kind of webhook to the same kind
    // of receiver arrives.
    let open = Agent::start("hooks-open", options(Vec::new(), 244));
    let hook = failure_webhook(&open, "hooks-open").await;
    assert!(
        hook.as_deref()
            .is_some_and(|h| h.contains("vps.deployment.failed")),
        "delivered when private destinations are allowed: {hook:?}"
    );
    // allow_private = false: refused, never reaches the receiver, and the log says why.
    let strict = Agent::start(
        "hooks-strict",
        options(
            vec![("HVNODE_WEBHOOKS__ALLOW_PRIVATE".into(), "false".into())],
            245,
        ),
    );
    let hook = failure_webhook(&strict, "hooks-strict").await;
    assert!(hook.is_none(), "refused, yet it arrived: {hook:?}");
    assert!(
        strict
            .log()
            .contains("destination refused: 127.0.0.1 is 127.0.0.1"),
        "the refusal is logged: {}",
        strict.log_tail(20)
    );
    assert_eq!(
        strict
            .metric("hvnode_webhooks{state=\"pending\"}")
            .await
            .unwrap_or(-1.0),
        1.0,
        "the refused event stays pending (retried, refused again, until max_age_s)"
    );
}
