//! Errors as the client sees them: the envelope, and the one table from error code to HTTP
//! status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::errors::ErrorCode;
use crate::vm::VmError;

/// The HTTP status of an answer with `code` (declared with the code in `crate::errors`).
pub fn http_status(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.status()).expect("every declared status is a valid HTTP status")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

/// Every error answer: `{"success": false, "error", "error_code", "message"}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    #[schema(schema_with = super::openapi::always_false)]
    success: bool,
    /// A short title of the code.
    error: &'a str,
    #[schema(value_type = ErrorCode)]
    error_code: &'a str,
    /// What went wrong, for a human.
    message: &'a str,
}

/// The wire form of `error_code`: every contract code, and `INTERNAL_ERROR` for a request
/// that failed inside the agent (a panic caught by the router).
impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let codes = ErrorCode::ALL
            .iter()
            .map(|c| c.as_str())
            .chain([super::INTERNAL_ERROR]);
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(codes))
            .into()
    }
}

impl utoipa::ToSchema for ErrorCode {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = http_status(self.code);
        let body = ErrorBody {
            success: false,
            error: self.code.title(),
            error_code: self.code.as_str(),
            message: &self.message,
        };
        (status, axum::Json(body)).into_response()
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> ApiError {
        let code = e.code();
        // Host paths, library and store errors are the operator's to read in the log; the
        // answer carries what a customer may see.
        let message = match &e {
            VmError::Internal(_) | VmError::Store(_) => {
                tracing::error!(error = %crate::errors::chain(&e), "internal error");
                "internal error; the agent's log has the details".to_owned()
            }
            other => {
                if http_status(code).is_server_error() {
                    tracing::error!(code = code.as_str(), error = %crate::errors::chain(other),
                        "request failed");
                }
                other.public_message()
            }
        };
        ApiError { code, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn test_missing_vm_maps_to_not_found() {
        let e: ApiError = VmError::NotFound(Uuid::nil()).into();

        assert_eq!(e.code, ErrorCode::VpsNotFound);
        assert_eq!(http_status(e.code), StatusCode::NOT_FOUND);
    }

    #[test]
    fn every_code_has_the_contract_status() {
        let expected = [
            ("NO_API_KEY", 401),
            ("INVALID_API_KEY", 401),
            ("VPS_NOT_FOUND", 404),
            ("TASK_NOT_FOUND", 404),
            ("SNAPSHOT_NOT_FOUND", 404),
            ("NETWORK_NOT_FOUND", 404),
            ("IP_NOT_FOUND", 404),
            ("ROUTE_NOT_FOUND", 404),
            ("METHOD_NOT_ALLOWED", 405),
            ("VPS_EXISTS", 409),
            ("TASK_IN_PROGRESS", 409),
            ("INVALID_STATE", 409),
            ("MISSING_FIELDS", 400),
            ("INVALID_JSON", 400),
            ("INVALID_HOSTNAME", 400),
            ("PASSWORD_TOO_SHORT", 400),
            ("PASSWORD_TOO_LONG", 400),
            ("PASSWORD_WEAK", 400),
            ("INVALID_SSH_KEY", 400),
            ("INVALID_TEMPLATE", 400),
            ("INVALID_NAME", 400),
            ("INVALID_RESOURCES", 400),
            ("CONFIRMATION_REQUIRED", 400),
            ("INSUFFICIENT_CAPACITY", 409),
            ("IP_POOL_EXHAUSTED", 409),
            ("IP_IN_USE", 409),
            ("PRIMARY_IP", 400),
            ("INVALID_TICKET", 403),
            ("PAYLOAD_TOO_LARGE", 413),
            ("HYPERVISOR_UNAVAILABLE", 503),
            ("START_FAILED", 500),
            ("STOP_FAILED", 500),
            ("RESTART_FAILED", 500),
            ("DELETE_FAILED", 500),
            ("STATUS_FAILED", 500),
            ("CONSOLE_FAILED", 500),
            ("DEPLOYMENT_FAILED", 500),
            ("NETWORK_FAILED", 500),
            ("WEBSOCKET_REQUIRED", 426),
            ("SNAPSHOT_EXISTS", 409),
            ("SNAPSHOT_LIMIT", 409),
            ("INSUFFICIENT_STORAGE", 507),
            ("SNAPSHOT_FAILED", 500),
            ("NETWORK_EXISTS", 409),
            ("REQUEST_TIMEOUT", 408),
            ("CONSOLE_LIMIT", 409),
            ("SNAPSHOT_QUOTA_EXCEEDED", 409),
            ("VPS_ID_CONFLICT", 409),
            ("INSUFFICIENT_SCOPE", 403),
            ("EXPIRED_API_KEY", 401),
            ("IP_NOT_ALLOWED", 403),
        ];

        for (name, status) in expected {
            let code = ErrorCode::parse(name).unwrap_or_else(|| panic!("{name} is not a code"));
            assert_eq!(http_status(code).as_u16(), status, "{name}");
        }
        assert_eq!(expected.len(), ErrorCode::ALL.len());
    }

    #[test]
    fn internal_details_stay_in_the_log() {
        let e: ApiError = VmError::Internal("disk I/O error at /var/lib/x".into()).into();

        assert!(!e.message.contains("/var/lib"));
    }
}
