//! `/v1/ws` WebSocket sessions. Being written.

use std::io::BufReader;
use std::net::TcpStream;
use std::sync::Arc;

use super::error::ApiError;
use super::{App, Peer};
use crate::http::{Request, StatusCode};

pub(crate) fn upgrade(
    _app: &Arc<App>,
    _request: &Request,
    _reader: &mut BufReader<TcpStream>,
    _writer: &mut TcpStream,
    _peer: Peer,
) -> Result<(), ApiError> {
    Err(ApiError::new(
        StatusCode(501),
        "not_implemented",
        "not yet available",
    ))
}
