//! Signed webhooks from a durable outbox.
//!
//! 1. An event is written to the `webhooks` table in the same transaction as the state
//!    change it reports (`enqueue`), with its body rendered once: the bytes signed are the
//!    bytes sent, on every attempt. A dedupe key (task + event) makes a repeated enqueue —
//!    a task finishing again after a crash — a no-op.
//! 2. `Deliverer` sends due entries: `POST` with `Content-Type: application/json` and
//!    `X-Webhook-Signature: sha256=<hex HMAC-SHA256(body, secret)>`. A 2xx marks it
//!    delivered; anything else schedules a retry after an exponentially growing delay
//!    (`webhooks.initial_backoff_ms`, doubling, capped at `webhooks.max_backoff_s`), until
//!    the entry is older than `webhooks.max_age_s`, when it is abandoned and logged.
//! 3. Delivery runs in its own task and never blocks the task that caused the event; the
//!    outbox survives restarts, so a pending delivery continues after one.
//!
//! Secrets are stored with the entry (the VM may be gone before delivery) and never logged.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::Sha256;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::config::WebhooksConfig;
use crate::store::{self, Store};

pub const DEPLOYMENT_COMPLETED: &str = "vps.deployment.completed";
pub const DEPLOYMENT_FAILED: &str = "vps.deployment.failed";

/// `sha256=<hex HMAC-SHA256 of body with secret>`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub struct NewWebhook<'a> {
    pub dedupe_key: String,
    pub vps_id: Uuid,
    pub event: &'a str,
    pub url: &'a str,
    pub secret: Option<&'a str>,
    pub body: String,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The outbox by state: `pending` (not yet acknowledged by a 2xx), `delivered`, and
/// `abandoned` (given up after `webhooks.max_age_s`).
pub fn count_by_state(conn: &Connection) -> rusqlite::Result<[(&'static str, u64); 3]> {
    conn.query_row(
        "SELECT
            COUNT(*) FILTER (WHERE delivered_at IS NULL AND abandoned_at IS NULL),
            COUNT(*) FILTER (WHERE delivered_at IS NOT NULL),
            COUNT(*) FILTER (WHERE abandoned_at IS NOT NULL)
         FROM webhooks",
        [],
        |r| {
            Ok([
                ("pending", r.get::<_, i64>(0)? as u64),
                ("delivered", r.get::<_, i64>(1)? as u64),
                ("abandoned", r.get::<_, i64>(2)? as u64),
            ])
        },
    )
}

/// Adds an event to the outbox (inside the caller's transaction). Repeats are ignored.
pub fn enqueue(conn: &Connection, hook: &NewWebhook<'_>) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO webhooks
         (dedupe_key, vps_id, event, url, secret, body, attempts, next_attempt_ms, created_at,
          created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?7)",
        params![
            hook.dedupe_key,
            hook.vps_id.to_string(),
            hook.event,
            hook.url,
            hook.secret,
            hook.body,
            now_ms(),
            crate::time::now(),
        ],
    )?;
    Ok(())
}

/// The deployment event body of the contract.
pub fn deployment_body(
    event: &str,
    vps_id: Uuid,
    name: &str,
    status: &str,
    ip_address: Option<std::net::IpAddr>,
    deployment_time_seconds: u64,
    error: Option<&str>,
) -> String {
    let mut data = serde_json::json!({
        "vps_id": vps_id,
        "name": name,
        "status": status,
        "ip_address": ip_address,
        "deployment_time_seconds": deployment_time_seconds,
    });
    if let Some(e) = error {
        data["error"] = serde_json::json!(e);
    }
    serde_json::json!({
        "event": event,
        "timestamp": crate::time::now(),
        "data": data,
    })
    .to_string()
}

/// Wakes the deliverer when something was enqueued.
#[derive(Clone, Default)]
pub struct Outbox {
    notify: Arc<Notify>,
}

impl Outbox {
    pub fn wake(&self) {
        self.notify.notify_one();
    }
}

struct Due {
    id: i64,
    url: String,
    secret: Option<String>,
    body: String,
    event: String,
    attempts: u32,
    created_ms: i64,
}

/// Sends the outbox, forever.
pub struct Deliverer {
    store: Store,
    config: WebhooksConfig,
    outbox: Outbox,
    client: reqwest::Client,
}

impl Deliverer {
    pub fn new(store: Store, config: WebhooksConfig, outbox: Outbox) -> Deliverer {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_s.max(1)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hvnode/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("HTTP client with static settings");
        Deliverer {
            store,
            config,
            outbox,
            client,
        }
    }

    pub fn start(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run())
    }

    async fn run(self) {
        loop {
            let next = match self.deliver_due().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(error = %e, "webhook outbox unreadable");
                    Some(Duration::from_secs(5))
                }
            };
            let wait = next
                .unwrap_or(Duration::from_secs(60))
                .min(Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.outbox.notify.notified() => {}
            }
        }
    }

    /// Sends every due entry; returns how long until the next one is due.
    async fn deliver_due(&self) -> store::Result<Option<Duration>> {
        let due: Vec<Due> = self
            .store
            .call(|c| {
                let mut stmt = c.prepare(
                    "SELECT id, url, secret, body, event, attempts, created_ms FROM webhooks
                     WHERE delivered_at IS NULL AND abandoned_at IS NULL
                       AND next_attempt_ms <= ?1
                     ORDER BY next_attempt_ms LIMIT 32",
                )?;
                let rows = stmt.query_map([now_ms()], |r| {
                    Ok(Due {
                        id: r.get(0)?,
                        url: r.get(1)?,
                        secret: r.get(2)?,
                        body: r.get(3)?,
                        event: r.get(4)?,
                        attempts: r.get(5)?,
                        created_ms: r.get(6)?,
                    })
                })?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            })
            .await?;
        let sends = due.into_iter().map(|d| self.deliver(d));
        for result in futures_util::future::join_all(sends).await {
            result?;
        }
        let next: Option<i64> = self
            .store
            .call(|c| {
                Ok(c.query_row(
                    "SELECT MIN(next_attempt_ms) FROM webhooks
                     WHERE delivered_at IS NULL AND abandoned_at IS NULL",
                    [],
                    |r| r.get(0),
                )
                .optional()?
                .flatten())
            })
            .await?;
        Ok(next.map(|ms| Duration::from_millis((ms - now_ms()).max(0) as u64)))
    }

    async fn deliver(&self, d: Due) -> store::Result<()> {
        let mut req = self
            .client
            .post(&d.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Webhook-Event", &d.event)
            .body(d.body.clone());
        if let Some(secret) = &d.secret {
            req = req.header("X-Webhook-Signature", sign(secret, d.body.as_bytes()));
        }
        let outcome = match req.send().await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(format!("HTTP {}", resp.status().as_u16())),
            Err(e) => Err(describe(&e)),
        };
        let id = d.id;
        match outcome {
            Ok(()) => {
                tracing::info!(event = %d.event, attempts = d.attempts + 1, "webhook delivered");
                let now = crate::time::now();
                self.store
                    .call(move |c| {
                        c.execute(
                            "UPDATE webhooks SET delivered_at = ?2, attempts = attempts + 1
                             WHERE id = ?1",
                            params![id, now],
                        )?;
                        Ok(())
                    })
                    .await
            }
            Err(why) => {
                let attempts = d.attempts + 1;
                let delay = backoff(&self.config, attempts);
                let give_up = now_ms() + delay.as_millis() as i64 - d.created_ms
                    > self.config.max_age_s as i64 * 1000;
                if give_up {
                    tracing::error!(event = %d.event, attempts, error = %why,
                        "webhook abandoned after webhooks.max_age_s");
                } else {
                    tracing::warn!(event = %d.event, attempts, error = %why,
                        retry_in_ms = delay.as_millis() as u64, "webhook delivery failed");
                }
                let (next, now) = (now_ms() + delay.as_millis() as i64, crate::time::now());
                self.store
                    .call(move |c| {
                        c.execute(
                            "UPDATE webhooks SET attempts = ?2, next_attempt_ms = ?3,
                                last_error = ?4,
                                abandoned_at = CASE WHEN ?5 THEN ?6 ELSE NULL END
                             WHERE id = ?1",
                            params![id, attempts, next, why, give_up, now],
                        )?;
                        Ok(())
                    })
                    .await
            }
        }
    }
}

/// The delay before attempt `attempts + 1`.
pub fn backoff(config: &WebhooksConfig, attempts: u32) -> Duration {
    let base = config.initial_backoff_ms.max(1);
    let factor = 1u64 << attempts.saturating_sub(1).min(30);
    Duration::from_millis(base.saturating_mul(factor))
        .min(Duration::from_secs(config.max_backoff_s))
}

/// An error naming only the URL's host: webhook URLs often carry their credential in the
/// path (Slack, Teams, Discord) or the query.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    match e.url() {
        Some(u) => format!("{kind}: {}", url_host(u.as_str())),
        None => kind.to_owned(),
    }
}

/// `scheme://host[:port]` of a URL, and nothing of its path, query or credentials.
pub fn url_host(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match u.port() {
            Some(p) => format!("{}://{}:{p}", u.scheme(), u.host_str().unwrap_or("")),
            None => format!("{}://{}", u.scheme(), u.host_str().unwrap_or("")),
        },
        Err(_) => "(unparseable URL)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        let sig = sign("Jefe", b"what do ya want for nothing?");

        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn only_the_host_of_a_webhook_url_is_told() {
        assert_eq!(
            url_host("https://hooks.example.com/services/T000/B000/SECRETPATH?token=x"),
            "https://hooks.example.com"
        );
        assert_eq!(
            url_host("http://user:pass@10.0.0.5:8080/p"),
            "http://10.0.0.5:8080"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = WebhooksConfig {
            initial_backoff_ms: 1000,
            max_backoff_s: 5,
            ..WebhooksConfig::default()
        };

        let delays: Vec<u64> = (1..=5)
            .map(|a| backoff(&config, a).as_millis() as u64)
            .collect();

        assert_eq!(delays, vec![1000, 2000, 4000, 5000, 5000]);
    }

    #[test]
    fn an_event_is_enqueued_once_per_dedupe_key() {
        let store = crate::store::test_store();
        let hook = NewWebhook {
            dedupe_key: "task:event".into(),
            vps_id: Uuid::nil(),
            event: DEPLOYMENT_COMPLETED,
            url: "http://127.0.0.1:9/hook",
            secret: Some("s"),
            body: "{}".into(),
        };

        let count: i64 = store
            .call_sync(|c| {
                enqueue(c, &hook)?;
                enqueue(c, &hook)?;
                Ok(c.query_row("SELECT COUNT(*) FROM webhooks", [], |r| r.get(0))?)
            })
            .unwrap();

        assert_eq!(count, 1);
        let states = store.call_sync(|c| Ok(count_by_state(c)?)).unwrap();
        assert_eq!(states, [("pending", 1), ("delivered", 0), ("abandoned", 0)]);
        let states = store
            .call_sync(|c| {
                c.execute("UPDATE webhooks SET delivered_at = 'now'", [])?;
                Ok(count_by_state(c)?)
            })
            .unwrap();
        assert_eq!(states, [("pending", 0), ("delivered", 1), ("abandoned", 0)]);
    }

    #[test]
    fn deployment_bodies_carry_the_contract_fields() {
        let body = deployment_body(
            DEPLOYMENT_COMPLETED,
            Uuid::nil(),
            "web1",
            "running",
            Some("192.0.2.10".parse().unwrap()),
            42,
            None,
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();

        assert_eq!(v["event"], "vps.deployment.completed");
        assert!(v["timestamp"].is_string());
        assert_eq!(v["data"]["vps_id"], Uuid::nil().to_string());
        assert_eq!(v["data"]["name"], "web1");
        assert_eq!(v["data"]["status"], "running");
        assert_eq!(v["data"]["ip_address"], "192.0.2.10");
        assert_eq!(v["data"]["deployment_time_seconds"], 42);
    }
}
