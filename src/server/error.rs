//! `ApiError` -> status + `{"error","code","retry_after_ms"}` in one place.
//!
//! The client gets a short message; the log gets the chain. Internal details
//! (paths, tract errors) never reach a client.

use std::time::Duration;

use serde_json::json;

use crate::audio::AudioError;
use crate::http::{HttpError, MultipartError, Response, StatusCode};
use crate::pool::PoolError;

/// A refusal or failure, ready to become a response.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Short human message (safe to show).
    pub message: String,
    /// Retry hint for 429/503.
    pub retry_after: Option<Duration>,
}

/// Retry hint given with `pool_saturated` and `shutting_down`.
pub const SATURATED_RETRY_AFTER: Duration = Duration::from_secs(1);

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Adds a retry hint.
    pub fn retry_after(mut self, after: Duration) -> ApiError {
        self.retry_after = Some(after);
        self
    }

    /// 404.
    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode(404), "not_found", "no such route")
    }

    /// 503 while saturated.
    pub fn saturated() -> ApiError {
        ApiError::new(
            StatusCode(503),
            "pool_saturated",
            "all workers are busy; retry shortly",
        )
        .retry_after(SATURATED_RETRY_AFTER)
    }

    /// 503 while shutting down.
    pub fn shutting_down() -> ApiError {
        ApiError::new(StatusCode(503), "shutting_down", "server is shutting down")
            .retry_after(SATURATED_RETRY_AFTER)
    }

    /// 500 with no details.
    pub fn internal() -> ApiError {
        ApiError::new(StatusCode(500), "internal_error", "internal server error")
    }

    /// Seconds for a `Retry-After` header (at least 1).
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|d| d.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// The JSON body of SPEC.md.
    pub fn body(&self) -> serde_json::Value {
        let mut body = json!({ "error": self.message, "code": self.code });
        if let Some(d) = self.retry_after {
            body["retry_after_ms"] = json!(d.as_millis() as u64);
        }
        body
    }

    /// As a response (with `Retry-After` where it applies).
    pub fn to_response(&self) -> Response {
        let response = Response::json(self.status, &self.body());
        match self.retry_after_secs() {
            Some(secs) => response.with_header("Retry-After", secs.to_string()),
            None => response,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl From<HttpError> for ApiError {
    fn from(e: HttpError) -> Self {
        let status = e.status();
        let code = match status.as_u16() {
            413 => "payload_too_large",
            408 => "request_timeout",
            431 => "headers_too_large",
            505 => "http_version_not_supported",
            501 => "not_implemented",
            _ => "bad_request",
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<MultipartError> for ApiError {
    fn from(e: MultipartError) -> Self {
        let status = e.status();
        let code = match status.as_u16() {
            413 => "payload_too_large",
            415 => "unsupported_media_type",
            408 => "request_timeout",
            _ => "bad_request",
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<AudioError> for ApiError {
    fn from(e: AudioError) -> Self {
        match e {
            AudioError::UnsupportedFormat(_) => {
                ApiError::new(StatusCode(415), "unsupported_media_type", e.to_string())
            }
            AudioError::TooLong { .. } => {
                ApiError::new(StatusCode(413), "payload_too_large", e.to_string())
            }
            AudioError::Empty => ApiError::new(StatusCode(400), "empty_audio", e.to_string()),
            _ => ApiError::new(StatusCode(400), "bad_audio", e.to_string()),
        }
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Saturated => ApiError::saturated(),
            PoolError::ShuttingDown => ApiError::shutting_down(),
            PoolError::Speech(inner) => {
                log::error!("transcription failed: {inner}");
                ApiError::internal()
            }
            PoolError::Failed => ApiError::internal(),
        }
    }
}

#[cfg(test)]
mod tests;
