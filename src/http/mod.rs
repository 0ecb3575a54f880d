//! HTTP/1.1 as bytes: request heads, bodies, responses, SSE and multipart.
//!
//! This layer knows the protocol and nothing about the app: it uses no other
//! module of the crate, never sees routes, audio or models, and decides no
//! policy beyond framing and the hard caps named in each file. Every cap is a
//! named constant; runtime values (body limit, head deadline) travel in
//! [`Limits`]. Errors are one enum, [`HttpError`], that knows its status code;
//! `server/error.rs` turns it into a JSON reply.
//!
//! Left out on purpose: HTTP/2 (we only recognise its preface to say no),
//! TLS, compression, and any transfer coding other than `chunked`.

use std::fmt;
use std::io;

pub mod body;
pub mod multipart;
pub mod request;
pub mod response;

pub use body::{BodyFraming, BodyReader};
pub use multipart::{
    MultipartError, MultipartLimits, Part, boundary_from_content_type, parse_multipart,
};
pub use request::{Limits, Request, Version, h2_goaway_http11_required, read_head};
pub use response::{Response, SseWriter, StatusCode, write_continue};

/// Everything that can go wrong while reading a request, one variant per
/// status the client should see.
#[derive(Debug)]
#[non_exhaustive]
pub enum HttpError {
    /// The socket failed (timeouts included: see [`HttpError::status`]).
    Io(io::Error),
    /// The peer closed the connection before sending any byte of a head:
    /// the normal end of a keep-alive connection; nothing to answer.
    ConnectionClosed,
    /// The head did not arrive before the head deadline (slow client).
    HeadTimeout,
    /// The request line alone is longer than the cap.
    RequestLineTooLong {
        /// The cap that was crossed, in bytes.
        limit_bytes: usize,
    },
    /// The head (request line and headers) is longer than the cap.
    HeadTooLarge {
        /// The cap that was crossed, in bytes.
        limit_bytes: usize,
    },
    /// More header fields than the cap.
    TooManyHeaders {
        /// The cap that was crossed, in header fields.
        limit: usize,
    },
    /// The head is not valid HTTP/1.x syntax.
    MalformedHead(String),
    /// A well-formed version we do not speak (HTTP/0.9, HTTP/2.0 as text, HTTP/3...).
    UnsupportedVersion(String),
    /// The connection opened with the HTTP/2 prior-knowledge preface; answer
    /// with [`h2_goaway_http11_required`] and close.
    Http2Preface,
    /// Both `Content-Length` and `Transfer-Encoding` were sent (request smuggling).
    ConflictingFraming,
    /// `Content-Length` is not one non-negative decimal number.
    InvalidContentLength,
    /// `Transfer-Encoding` that does not end in `chunked`, or HTTP/1.0 with one.
    InvalidTransferEncoding,
    /// A transfer coding other than `chunked` (gzip, deflate...).
    UnsupportedTransferEncoding(String),
    /// The body is longer than the body limit (declared or found while streaming).
    PayloadTooLarge {
        /// The body limit that was crossed, in bytes.
        limit_bytes: u64,
    },
    /// A chunked body broke its framing.
    MalformedChunk(&'static str),
    /// The connection closed before the body was complete.
    BodyIncomplete,
}

impl HttpError {
    /// The status code a client should see for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::Io(e) if is_timeout(e) => StatusCode::REQUEST_TIMEOUT,
            HttpError::Io(_) => StatusCode::BAD_REQUEST,
            HttpError::ConnectionClosed => StatusCode::BAD_REQUEST,
            HttpError::HeadTimeout => StatusCode::REQUEST_TIMEOUT,
            HttpError::RequestLineTooLong { .. } => StatusCode::URI_TOO_LONG,
            HttpError::HeadTooLarge { .. } | HttpError::TooManyHeaders { .. } => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            HttpError::MalformedHead(_) => StatusCode::BAD_REQUEST,
            HttpError::UnsupportedVersion(_) | HttpError::Http2Preface => {
                StatusCode::HTTP_VERSION_NOT_SUPPORTED
            }
            HttpError::ConflictingFraming
            | HttpError::InvalidContentLength
            | HttpError::InvalidTransferEncoding => StatusCode::BAD_REQUEST,
            HttpError::UnsupportedTransferEncoding(_) => StatusCode::NOT_IMPLEMENTED,
            HttpError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::MalformedChunk(_) | HttpError::BodyIncomplete => StatusCode::BAD_REQUEST,
        }
    }

    /// Wraps this error in an `io::Error` so it can cross a `Read` impl;
    /// `HttpError::from(io_error)` gets it back.
    pub(crate) fn into_io(self) -> io::Error {
        match self {
            HttpError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// Socket read timeouts surface as `TimedOut` or, on Unix, `WouldBlock`.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

impl From<io::Error> for HttpError {
    /// Unwraps an `HttpError` that travelled inside an `io::Error` (from
    /// [`BodyReader`]'s `Read` impl); anything else stays an I/O error.
    fn from(e: io::Error) -> Self {
        if !e.get_ref().is_some_and(|inner| inner.is::<HttpError>()) {
            return HttpError::Io(e);
        }
        match e.into_inner().map(|inner| inner.downcast::<HttpError>()) {
            Some(Ok(http)) => *http,
            // Not reached: the payload was checked to be an HttpError above.
            Some(Err(other)) => HttpError::Io(io::Error::other(other)),
            None => HttpError::Io(io::ErrorKind::InvalidData.into()),
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Io(e) if is_timeout(e) => write!(f, "timed out reading the request"),
            HttpError::Io(_) => write!(f, "connection error while reading the request"),
            HttpError::ConnectionClosed => write!(f, "connection closed"),
            HttpError::HeadTimeout => write!(f, "request head not received in time"),
            HttpError::RequestLineTooLong { limit_bytes } => {
                write!(f, "request line longer than {limit_bytes} bytes")
            }
            HttpError::HeadTooLarge { limit_bytes } => {
                write!(f, "request head larger than {limit_bytes} bytes")
            }
            HttpError::TooManyHeaders { limit } => write!(f, "more than {limit} header fields"),
            HttpError::MalformedHead(why) => write!(f, "malformed request: {why}"),
            HttpError::UnsupportedVersion(v) => write!(f, "unsupported HTTP version {v:?}"),
            HttpError::Http2Preface => {
                write!(f, "HTTP/2 is not supported; talk HTTP/1.1 to this server")
            }
            HttpError::ConflictingFraming => {
                write!(f, "both Content-Length and Transfer-Encoding were sent")
            }
            HttpError::InvalidContentLength => write!(f, "invalid Content-Length"),
            HttpError::InvalidTransferEncoding => write!(f, "invalid Transfer-Encoding"),
            HttpError::UnsupportedTransferEncoding(coding) => {
                write!(f, "unsupported transfer coding {coding:?}")
            }
            HttpError::PayloadTooLarge { limit_bytes } => {
                write!(f, "request body larger than {limit_bytes} bytes")
            }
            HttpError::MalformedChunk(why) => write!(f, "malformed chunked body: {why}"),
            HttpError::BodyIncomplete => {
                write!(f, "connection closed before the body was complete")
            }
        }
    }
}

impl std::error::Error for HttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HttpError::Io(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
