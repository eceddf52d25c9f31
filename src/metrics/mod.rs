//! Live status and metrics: the sampler, the status document, and the Prometheus
//! exposition of `GET /metrics`.

pub mod prometheus;
pub mod sampler;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Mutex;

pub use sampler::{Sample, Sampler};
pub use status::StatusDoc;

/// API requests served, by matched route, method and status, for `/metrics`.
#[derive(Default)]
pub struct RequestCounters {
    counts: Mutex<BTreeMap<(String, String, u16), u64>>,
}

impl RequestCounters {
    pub fn record(&self, route: &str, method: &str, status: u16) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        // Routes are the router's patterns ("/v1/vms/{id}"), never raw paths, so the
        // number of series stays bounded whatever clients send.
        match counts.get_mut(&(route.to_owned(), method.to_owned(), status)) {
            Some(n) => *n += 1,
            None => {
                counts.insert((route.to_owned(), method.to_owned(), status), 1);
            }
        }
    }

    pub fn snapshot(&self) -> Vec<((String, String, u16), u64)> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}
