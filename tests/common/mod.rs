//! The router harness the in-process API tests share: the real router and `App` on a
//! temporary store, without libvirt (pointed at a socket that does not exist, which is
//! also how the agent behaves while libvirtd is down).

#![allow(dead_code)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;
use hvnode::api::auth::hash_token;
use hvnode::app::App;
use hvnode::config::Config;
use hvnode::hypervisor::Libvirt;
use hvnode::store::Store;
use hvnode::tasks::faults::FaultPoints;
use serde_json::Value;
use tower::ServiceExt;

pub const TOKEN: &str = "test-token-0123456789";
pub const VM: &str = "0b9f9c1e-3c3a-4f57-9d49-7f1f0c1a2b3c";

pub struct Harness {
    pub router: axum::Router,
    _dir: tempfile::TempDir,
}

/// The router on a store that `seed` fills first.
pub fn harness_with(seed: impl FnOnce(&Store)) -> Harness {
    harness_configured(|_| {}, seed)
}

/// The router with `configure` applied to its configuration, on a store that `seed`
/// fills first.
pub fn harness_configured(
    configure: impl FnOnce(&mut Config),
    seed: impl FnOnce(&Store),
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::load(None, Vec::<(String, String)>::new()).unwrap();
    config.api.token_sha256 = vec![hash_token(TOKEN)];
    configure(&mut config);
    config.storage.image_dir = dir.path().join("images");
    config.storage.vm_dir = dir.path().join("vms");
    config.libvirt.uri = "qemu+unix:///system?socket=/nonexistent/hvnode-test.sock".into();
    let store = Store::open(&dir.path().join("state.db")).unwrap();
    seed(&store);
    let hv = Arc::new(Libvirt::new(
        &config.libvirt.uri,
        config.libvirt.connections,
    ));
    let app = Arc::new(App::with_parts(config, store, hv, FaultPoints::none()));
    Harness {
        router: hvnode::api::router(app),
        _dir: dir,
    }
}

pub fn harness() -> Harness {
    harness_with(|_| {})
}

/// What the router answered.
pub struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A request with the bearer `token`, if any.
pub fn request(method: Method, path: &str, token: Option<&str>, body: Body) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(body).unwrap()
}

impl Harness {
    /// Sends `req` through the router and reads the whole answer.
    pub async fn answer(&self, req: Request<Body>) -> Answer {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Answer {
            status: resp.status(),
            content_type,
            body: resp
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        }
    }

    /// Sends `req` and parses the answer as JSON (every answer of the API is).
    pub async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let a = self.answer(req).await;
        (a.status, a.json())
    }
}
