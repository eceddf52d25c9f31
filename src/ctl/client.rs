//! One request to the agent's Unix socket, answered with the envelope's `data`.

use std::path::Path;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot connect to {path}: {source} (is hvnode running? are you root or in its admin group?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("request failed: {0}")]
    Http(String),
    #[error("{code}: {message}")]
    Api { code: String, message: String },
}

pub struct Client<'a> {
    socket: &'a Path,
}

impl<'a> Client<'a> {
    pub fn new(socket: &'a Path) -> Self {
        Client { socket }
    }

    /// Sends one request and returns the envelope's `data`.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CtlError> {
        let stream = tokio::net::UnixStream::connect(self.socket)
            .await
            .map_err(|source| CtlError::Connect {
                path: self.socket.display().to_string(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| CtlError::Http(e.to_string()))?;
        tokio::spawn(conn);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CtlError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| CtlError::Http(e.to_string()))?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CtlError::Http(e.to_string()))?
            .to_bytes();
        let envelope: Value = serde_json::from_slice(&bytes)
            .map_err(|e| CtlError::Http(format!("unreadable answer: {e}")))?;
        if envelope["success"] == Value::Bool(true) {
            Ok(envelope["data"].clone())
        } else {
            Err(CtlError::Api {
                code: envelope["error_code"]
                    .as_str()
                    .unwrap_or("UNKNOWN")
                    .to_owned(),
                message: envelope["message"].as_str().unwrap_or_default().to_owned(),
            })
        }
    }
}
