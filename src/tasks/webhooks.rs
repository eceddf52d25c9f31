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
//!
//! Webhook URLs come from customers. Each attempt resolves the URL's host itself and
//! refuses it when any address is not public (loopback, private, link-local and the cloud
//! metadata address, CGNAT, unique-local, multicast, …) unless `webhooks.allow_private`;
//! the request then goes to exactly the addresses checked, so a name that resolves
//! differently a moment later (DNS rebinding) cannot slip through. A refusal is recorded as
//! the attempt's error.

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
    /// For destinations written as addresses: nothing to pin, connections are reused.
    client: reqwest::Client,
}

impl Deliverer {
    pub fn new(store: Store, config: WebhooksConfig, outbox: Outbox) -> Deliverer {
        let client = Deliverer::builder(&config)
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

    fn builder(config: &WebhooksConfig) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_s.max(1)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hvnode/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
    }

    /// The client for `url` (for a host name, one bound to the addresses it was checked
    /// at), or why the destination is refused.
    async fn client_for(&self, url: &str) -> Result<reqwest::Client, String> {
        let parsed = reqwest::Url::parse(url).map_err(|_| "unparseable URL".to_owned())?;
        let host = parsed
            .host_str()
            .ok_or_else(|| "a URL without a host".to_owned())?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = parsed
            .port_or_known_default()
            .ok_or_else(|| "a URL without a port".to_owned())?;
        let literal = host.parse::<std::net::IpAddr>().ok();
        let addrs: Vec<std::net::SocketAddr> = match literal {
            Some(ip) => vec![std::net::SocketAddr::new(ip, port)],
            None => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|_| format!("{host} does not resolve"))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(format!("{host} does not resolve"));
        }
        if !self.config.allow_private {
            if let Some(a) = addrs.iter().find(|a| !is_public(a.ip())) {
                return Err(format!(
                    "destination refused: {host} is {}, not a public address \
                     (webhooks.allow_private)",
                    a.ip()
                ));
            }
        }
        if literal.is_some() {
            return Ok(self.client.clone());
        }
        Deliverer::builder(&self.config)
            .resolve_to_addrs(&host, &addrs)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))
    }

    async fn deliver(&self, d: Due) -> store::Result<()> {
        let client = match self.client_for(&d.url).await {
            Ok(c) => c,
            Err(why) => return self.failed(&d, why).await,
        };
        let mut req = client
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
            Err(why) => self.failed(&d, why).await,
        }
    }

    /// Records a failed attempt: a retry after the backoff, or the end after max_age_s.
    async fn failed(&self, d: &Due, why: String) -> store::Result<()> {
        let id = d.id;
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

/// The delay before attempt `attempts + 1`.
pub fn backoff(config: &WebhooksConfig, attempts: u32) -> Duration {
    let base = config.initial_backoff_ms.max(1);
    let factor = 1u64 << attempts.saturating_sub(1).min(30);
    Duration::from_millis(base.saturating_mul(factor))
        .min(Duration::from_secs(config.max_backoff_s))
}

/// Whether `ip` is an address on the public internet: not loopback, unspecified, private
/// (RFC 1918), shared (CGNAT), link-local (the cloud metadata address among them),
/// unique-local, multicast, broadcast, documentation, benchmarking or reserved.
pub fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (18..20).contains(&o[1]))
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x64 && s[1] == 0xff9b)
                || s[0] == 0x0100)
        }
    }
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

    /// A receiver on loopback answering 200 to every request; counts them.
    async fn receiver() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let mut buf = vec![0u8; 8192];
                let _ = c.read(&mut buf).await;
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = c
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            }
        });
        (url, hits)
    }

    fn state(store: &Store, key: &str) -> (Option<String>, Option<String>) {
        let key = key.to_owned();
        store
            .call_sync(move |c| {
                Ok(c.query_row(
                    "SELECT delivered_at, last_error FROM webhooks WHERE dedupe_key = ?1",
                    [key],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?)
            })
            .unwrap()
    }

    #[tokio::test]
    async fn a_private_destination_is_refused_unless_allowed() {
        let (url, hits) = receiver().await;
        let store = crate::store::test_store();
        for key in ["refused", "allowed"] {
            let url = url.clone();
            store
                .call_sync(move |c| {
                    Ok(enqueue(
                        c,
                        &NewWebhook {
                            dedupe_key: key.into(),
                            vps_id: Uuid::new_v4(),
                            event: DEPLOYMENT_COMPLETED,
                            url: &url,
                            secret: None,
                            body: "{}".into(),
                        },
                    )?)
                })
                .unwrap();
        }
        // Refused: nothing reaches the receiver, and the entry says why.
        let strict = Deliverer::new(
            store.clone(),
            WebhooksConfig {
                initial_backoff_ms: 1,
                ..WebhooksConfig::default()
            },
            Outbox::default(),
        );
        strict.deliver_due().await.unwrap();
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        let (delivered, error) = state(&store, "refused");
        assert!(delivered.is_none());
        let error = error.unwrap_or_default();
        assert!(
            error.contains("destination refused") && error.contains("127.0.0.1"),
            "{error}"
        );
        // Allowed: the same entries, the same receiver, delivered.
        let open = Deliverer::new(
            store.clone(),
            WebhooksConfig {
                allow_private: true,
                ..WebhooksConfig::default()
            },
            Outbox::default(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        open.deliver_due().await.unwrap();
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(state(&store, "allowed").0.is_some());
        // A name is checked by what it resolves to.
        let named = url.replace("127.0.0.1", "localhost");
        let why = strict.client_for(&named).await.unwrap_err();
        assert!(why.contains("not a public address"), "{why}");
    }

    #[test]
    fn only_public_addresses_are_public() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "fc00::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "2001:db8::1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "203.0.114.1",
            "2a00:1450::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
    }

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
