//! (method, path) -> handler, with the guards run first as plain functions:
//! origin (403 before any body byte is read) and rate limit (429), both skipped
//! for `/health`. CORS headers are added to every answer to a browser.

use std::io::{BufReader, Read};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use super::error::ApiError;
use super::guard::{self, OriginDecision};
use super::{App, Outcome, Peer, rest, send, ws};
use crate::http::{BodyReader, Request, Response, StatusCode, write_continue};

/// Route names double as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Health,
    Ready,
    Models,
    Transcribe,
    TranscribeStream,
    OpenAi,
    Ws,
    Metrics,
}

impl Route {
    fn find(path: &str) -> Option<(Route, &'static [&'static str])> {
        Some(match path {
            "/health" => (Route::Health, &["GET", "HEAD"]),
            "/ready" => (Route::Ready, &["GET", "HEAD"]),
            "/v1/models" => (Route::Models, &["GET", "HEAD"]),
            "/v1/transcribe" => (Route::Transcribe, &["POST"]),
            "/v1/transcribe/stream" => (Route::TranscribeStream, &["POST"]),
            "/v1/audio/transcriptions" => (Route::OpenAi, &["POST"]),
            "/v1/ws" => (Route::Ws, &["GET"]),
            "/metrics" => (Route::Metrics, &["GET"]),
            _ => return None,
        })
    }

    fn label(self) -> &'static str {
        match self {
            Route::Health => "/health",
            Route::Ready => "/ready",
            Route::Models => "/v1/models",
            Route::Transcribe => "/v1/transcribe",
            Route::TranscribeStream => "/v1/transcribe/stream",
            Route::OpenAi => "/v1/audio/transcriptions",
            Route::Ws => "/v1/ws",
            Route::Metrics => "/metrics",
        }
    }
}

/// The body of a request, with `100-continue` answered and the limit enforced.
pub(crate) fn read_body(
    app: &App,
    request: &Request,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
) -> Result<Vec<u8>, ApiError> {
    let limit = app.config.body_limit_bytes;
    let mut body = BodyReader::for_request(request, reader, limit)?;
    if request.needs_continue() {
        write_continue(writer).map_err(|e| ApiError::from(crate::http::HttpError::Io(e)))?;
    }
    let mut bytes = Vec::new();
    body.read_to_end(&mut bytes)
        .map_err(|e| ApiError::from(crate::http::HttpError::from(e)))?;
    Ok(bytes)
}

/// Runs guards and the handler; returns the outcome, status and route label.
pub(crate) fn dispatch(
    app: &Arc<App>,
    request: &Request,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    peer: Peer,
) -> (Outcome, u16, &'static str) {
    let origin = request.header("Origin");
    let Some((route, methods)) = Route::find(&request.path) else {
        return finish(writer, request, Err(ApiError::not_found()), &[], "other");
    };
    let label = route.label();
    let decision = if route == Route::Health {
        OriginDecision::Allow
    } else {
        guard::check_origin(origin, &app.config.origins)
    };
    if decision == OriginDecision::Deny {
        log::warn!(
            "{peer}: origin {:?} denied on {label}",
            origin.unwrap_or_default()
        );
        let err = ApiError::new(
            StatusCode(403),
            "origin_denied",
            "origin not allowed; see --allow-origin",
        );
        return finish(writer, request, Err(err), &[], label);
    }
    let cors = if origin.is_some() {
        guard::cors_headers(decision, origin)
    } else {
        Vec::new()
    };
    if request.method == "OPTIONS" {
        let response = Response::empty(StatusCode(204)).with_headers(cors);
        return (
            send(writer, request, &response, !has_body(request)),
            204,
            label,
        );
    }
    if !methods.contains(&request.method.as_str()) {
        let err = ApiError::new(
            StatusCode(405),
            "method_not_allowed",
            format!("use {}", methods.join(" or ")),
        );
        let response = err
            .to_response()
            .with_header("Allow", methods.join(", "))
            .with_headers(cors);
        return (
            send(writer, request, &response, !has_body(request)),
            405,
            label,
        );
    }
    // Health checks (proxies poll /health and /ready) never spend a client's tokens.
    if !matches!(route, Route::Health | Route::Ready) && app.limiter.is_enabled() {
        let ip = guard::client_ip(
            peer,
            request.header("X-Forwarded-For"),
            request.header("X-Real-IP"),
            app.config.trust_proxy,
        );
        if let Err(retry) = app.limiter.check(ip, Instant::now()) {
            log::warn!("{peer}: rate limited ({ip})");
            let err = ApiError::new(StatusCode(429), "rate_limited", "too many requests")
                .retry_after(retry);
            return finish(writer, request, Err(err), &cors, label);
        }
    }
    let result = match route {
        Route::Health => Ok(rest::health(app)),
        Route::Ready => Ok(rest::ready(app)),
        Route::Models => rest::models(app),
        Route::Metrics if app.config.metrics => Ok(rest::metrics(app)),
        Route::Metrics => Err(ApiError::not_found()),
        Route::Transcribe => rest::transcribe(app, request, reader, writer),
        Route::TranscribeStream => {
            return match rest::transcribe_stream(app, request, reader, writer, &cors) {
                Ok(()) => (Outcome::Close, 200, label),
                Err(e) => finish(writer, request, Err(e), &cors, label),
            };
        }
        Route::OpenAi => {
            use super::openai::{self, Reply};
            return match openai::transcriptions(app, request, reader, writer, &cors) {
                Reply::Send(r) => finish(writer, request, Ok(r), &cors, label),
                Reply::Close(r) => {
                    let (_, status, label) = finish(writer, request, Ok(r), &cors, label);
                    (Outcome::Close, status, label)
                }
                Reply::Streamed => (Outcome::Close, 200, label),
            };
        }
        Route::Ws => {
            return match ws::upgrade(app, request, reader, writer, peer) {
                Ok(()) => (Outcome::Close, 101, label),
                Err(e) => finish(writer, request, Err(e), &cors, label),
            };
        }
    };
    finish(writer, request, result, &cors, label)
}

fn has_body(request: &Request) -> bool {
    request
        .header("Content-Length")
        .is_some_and(|v| v.trim() != "0")
        || request.header("Transfer-Encoding").is_some()
}

/// Writes a handler's result. An error before the body was read closes the
/// connection (the unread body would otherwise be taken for the next request).
fn finish(
    writer: &mut TcpStream,
    request: &Request,
    result: Result<Response, ApiError>,
    cors: &[(String, String)],
    label: &'static str,
) -> (Outcome, u16, &'static str) {
    let (response, is_error) = match result {
        Ok(r) => (r, false),
        Err(e) => (e.to_response(), true),
    };
    let response = response.with_headers(cors.iter().cloned());
    let status = response.status().as_u16();
    // After an error we cannot know how much of a body was read: close.
    let may_keep = !(is_error && has_body(request));
    (send(writer, request, &response, may_keep), status, label)
}
