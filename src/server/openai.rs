//! `POST /v1/audio/transcriptions` (OpenAI-compatible). Being written.

use std::io::BufReader;
use std::net::TcpStream;

use super::App;
use super::error::ApiError;
use crate::http::{Request, Response, StatusCode};

pub(crate) fn transcriptions(
    _app: &App,
    _request: &Request,
    _reader: &mut BufReader<TcpStream>,
    _writer: &mut TcpStream,
    _cors: &[(String, String)],
) -> Result<Response, ApiError> {
    Err(ApiError::new(
        StatusCode(501),
        "not_implemented",
        "not yet available",
    ))
}
