//! Ten creates at once against a host with room for three; concurrent actions on one VM;
//! and signed webhooks that survive failures and an agent restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(1200);
const SECRET: &str = "whsec-e2e-5f2c";

/// A webhook receiver on loopback: on each path `/hook/{n}` it answers 500 to the first
/// `fail_first` deliveries, then 200, and keeps every request it saw.
#[derive(Clone)]
struct Receiver {
    base: String,
    seen: Arc<Mutex<Vec<(String, HeaderMap, Bytes)>>>,
}

impl Receiver {
    fn hits(&self, n: usize) -> usize {
        let path = format!("/hook/{n}");
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| *p == path)
            .count()
    }

    fn requests(&self, n: usize) -> Vec<(HeaderMap, Bytes)> {
        let path = format!("/hook/{n}");
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| *p == path)
            .map(|(_, h, b)| (h.clone(), b.clone()))
            .collect()
    }
}

async fn receiver(fail_first: usize) -> Receiver {
    let seen: Arc<Mutex<Vec<(String, HeaderMap, Bytes)>>> = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook/{n}",
        axum::routing::post(
            move |axum::extract::Path(n): axum::extract::Path<String>,
                  headers: HeaderMap,
                  body: Bytes| {
                let s = s.clone();
                async move {
                    let path = format!("/hook/{n}");
                    let mut seen = s.lock().unwrap();
                    let before = seen.iter().filter(|(p, _, _)| *p == path).count();
                    seen.push((path, headers, body));
                    if before < fail_first {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::OK
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver { base, seen }
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_creates_at_once_fit_capacity_webhooks_survive_restarts_and_actions_never_interleave() {
    let hooks = receiver(2).await;
    let mut agent = Agent::start(
        "concurrency",
        AgentOptions {
            pool: (120, 139),
            extra_toml: "[capacity]\nmax_vms = 3\n\n[webhooks]\ninitial_backoff_ms = 3000\n".into(),
            ..Default::default()
        },
    );
    let ids: Vec<String> = (0..10).map(|_| new_id()).collect();

    // Fire all ten at once, each with its own webhook path.
    let creates = ids.iter().enumerate().map(|(i, id)| {
        let mut body = create_body(id, &format!("conc-{i}"), "Conc-pass-1");
        body["webhook_url"] = json!(format!("{}/hook/{i}", hooks.base));
        body["webhook_secret"] = json!(SECRET);
        let agent = &agent;
        async move { agent.create(body).await }
    });
    let answers: Vec<(u16, Value)> = futures_util::future::join_all(creates).await;

    let admitted: Vec<usize> = (0..10).filter(|i| answers[*i].0 == 202).collect();
    for (status, body) in &answers {
        if *status != 202 {
            assert_eq!(*status, 409, "{body}");
            assert_eq!(body["error_code"], json!("INSUFFICIENT_CAPACITY"), "{body}");
        }
    }
    assert_eq!(
        admitted.len(),
        3,
        "exactly the capacity is admitted: {answers:?}"
    );
    let addresses: std::collections::HashSet<&str> = admitted
        .iter()
        .map(|i| answers[*i].1["data"]["ip_address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses.len(), 3, "three different addresses");
    for (i, id) in ids.iter().enumerate() {
        if !admitted.contains(&i) {
            let (s, _) = agent.get(&format!("/v1/vms/{id}")).await;
            assert_eq!(s, 404, "a refused create leaves no record");
            assert!(!domain_exists(id));
        }
    }

    // The first deployment to finish gets 500 twice; the agent is restarted before its
    // third attempt, which must still come (and succeed).
    let mut first = None;
    let found = eventually(BOOT, || {
        first = admitted.iter().copied().find(|i| hooks.hits(*i) >= 2);
        first.is_some()
    })
    .await;
    assert!(found, "no webhook was attempted twice");
    let first = first.unwrap();
    agent.restart();
    assert_eq!(
        hooks.hits(first),
        2,
        "the restart came before the third attempt"
    );
    assert!(
        eventually(Duration::from_secs(120), || hooks.hits(first) >= 3).await,
        "delivered after the restart"
    );
    for i in &admitted {
        let (doc, _) = agent.wait_deployment(&ids[*i], BOOT).await;
        assert_eq!(doc["deployment_status"], json!("completed"), "{doc}");
        assert!(
            eventually(Duration::from_secs(120), || hooks.hits(*i) >= 3).await,
            "webhook of conc-{i} delivered"
        );
    }
    // Nothing comes after a delivery: the outbox has nothing left to send, and then each
    // receiver has exactly the attempts counted below.
    let drained = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::time::Instant::now() < deadline {
            if agent.metric("hvnode_webhooks{state=\"pending\"}").await == Some(0.0) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        false
    };
    assert!(drained.await, "the webhook outbox drained");
    assert_eq!(
        agent.metric("hvnode_webhooks{state=\"delivered\"}").await,
        Some(admitted.len() as f64),
        "every deployment's webhook delivered, as the agent counts them"
    );
    for i in &admitted {
        let requests = hooks.requests(*i);
        assert_eq!(
            requests.len(),
            3,
            "two failures, one success, nothing after it"
        );
        let body = requests[0].1.clone();
        for (headers, b) in &requests {
            assert_eq!(b, &body, "every attempt sends the same bytes");
            let sig = headers["x-webhook-signature"].to_str().unwrap();
            assert_eq!(
                sig,
                format!("sha256={}", hmac_hex(SECRET, b)),
                "signature verifies"
            );
        }
        let event: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(event["event"], json!("vps.deployment.completed"));
        assert!(event["timestamp"].is_string());
        assert_eq!(event["data"]["vps_id"], json!(ids[*i]));
        assert_eq!(event["data"]["name"], json!(format!("conc-{i}")));
        assert_eq!(event["data"]["status"], json!("running"));
        assert_eq!(
            event["data"]["ip_address"],
            answers[*i].1["data"]["ip_address"]
        );
        assert!(event["data"]["deployment_time_seconds"].as_u64().unwrap() > 0);
    }
    assert!(
        !agent.log().contains(SECRET),
        "the webhook secret is never logged"
    );
    let admitted: Vec<String> = admitted.iter().map(|i| ids[*i].clone()).collect();

    // While a graceful stop runs on one VM, five more actions on it are refused; the tasks
    // the journal shows on that VM never overlap.
    let target = admitted[1].clone();
    let stop_path = format!("/v1/vms/{target}/stop?timeout_s=240");
    let stop = agent.post(&stop_path, json!({}));
    let others = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let actions = ["start", "restart", "suspend", "reset", "stop"].map(|a| {
            let agent = &agent;
            let path = format!("/v1/vms/{target}/{a}");
            async move { agent.post(&path, json!({})).await }
        });
        futures_util::future::join_all(actions).await
    };
    let ((stop_status, stopped), refused) = tokio::join!(stop, others);
    assert_eq!(stop_status, 200, "{stopped}");
    assert_eq!(stopped["data"]["status"], json!("stopped"));
    for (status, body) in &refused {
        assert_eq!(*status, 409, "{body}");
        assert_eq!(body["error_code"], json!("TASK_IN_PROGRESS"), "{body}");
    }
    let (_, tasks) = agent.get(&format!("/v1/tasks?vps_id={target}")).await;
    let mut spans: Vec<(String, String)> = tasks["data"]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let started = t["started_at"].as_str().unwrap().to_owned();
            let finished = t["finished_at"].as_str().unwrap().to_owned();
            (started, finished)
        })
        .collect();
    assert_eq!(spans.len(), 2, "the create and the stop: {tasks}");
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "tasks on one VM overlap: {pair:?}");
    }

    for id in &admitted {
        let (s, _) = agent.delete(&format!("/v1/vms/{id}")).await;
        assert_eq!(s, 200);
        assert!(!domain_exists(id));
    }
}
