//! Request extractors whose every rejection is an envelope error.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::error::ApiError;
use crate::errors::ErrorCode;

/// A JSON body. Any content type is accepted; a body that is not JSON of the expected shape
/// is `INVALID_JSON`, one over the size limit `PAYLOAD_TOO_LARGE`.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorCode::PayloadTooLarge, "request body exceeds 1 MiB")
            } else {
                ApiError::new(ErrorCode::InvalidJson, format!("cannot read body: {r}"))
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            "request body is empty; send a JSON object",
        ));
    }
    let invalid = |e: serde_json::Error| {
        ApiError::new(
            ErrorCode::InvalidJson,
            format!("request body is not valid: {e}"),
        )
    };
    // Every body is an object. serde would read an array into a struct's fields in order
    // (`[null, null]` as an empty add-address request), so the shape is checked first; the
    // parse itself stays strict (a repeated key is still refused).
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            "request body must be a JSON object",
        ));
    }
    serde_json::from_slice(bytes).map_err(invalid)
}

/// An optional JSON body: empty means `T::default()`.
pub struct OptionalJson<T>(pub T);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorCode::PayloadTooLarge, "request body exceeds 1 MiB")
            } else {
                ApiError::new(ErrorCode::InvalidJson, format!("cannot read body: {r}"))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        parse_json(&bytes).map(OptionalJson)
    }
}

/// The query string as name → value; malformed encoding is `INVALID_JSON`.
pub struct QueryMap(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryMap {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|e| {
            ApiError::new(ErrorCode::InvalidJson, format!("invalid query string: {e}"))
        })?;
        let mut map = HashMap::with_capacity(pairs.len());
        for (k, v) in pairs {
            // `?limit=5&limit=` has no one meaning: refused rather than guessed.
            if map.insert(k.clone(), v).is_some() {
                return Err(ApiError::new(
                    ErrorCode::InvalidJson,
                    format!("query parameter {k} is given more than once"),
                ));
            }
        }
        Ok(QueryMap(map))
    }
}

impl QueryMap {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// A non-negative integer parameter (at most `i64::MAX`, as the OpenAPI document's
    /// `int64` says).
    pub fn number(&self, key: &str) -> Result<Option<u64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.parse::<i64>()
                    .ok()
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::InvalidJson,
                            format!("query parameter {key} must be a non-negative integer"),
                        )
                    })
            })
            .transpose()
    }

    pub fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") => Ok(true),
            Some(_) => Err(ApiError::new(
                ErrorCode::InvalidJson,
                format!("query parameter {key} must be true or false"),
            )),
        }
    }
}

/// A VM id from the path; anything that is not a UUID names no VM.
pub fn vm_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::new(ErrorCode::VpsNotFound, format!("VPS {raw:?} not found")))
}

pub fn task_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::new(ErrorCode::TaskNotFound, format!("task {raw:?} not found")))
}

/// Path parameters. axum's own `Path` answers a malformed segment (bad percent-encoding,
/// not UTF-8) in plain text; this one answers in the envelope: no resource has that path.
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(r) => Err(ApiError::new(
                ErrorCode::RouteNotFound,
                format!("no resource at {}: {}", parts.uri.path(), r.body_text()),
            )),
        }
    }
}
