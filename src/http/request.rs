//! Reading one HTTP/1.x request head from a buffered stream, under hard caps.
//!
//! The reader works through `fill_buf`/`consume` and never consumes a byte past
//! the blank line that ends the head, so what follows (a body, a pipelined
//! request, WebSocket frames after our 101) stays in the `BufRead` for the
//! next reader. Parsing is `httparse`'s; this file adds the caps, the version
//! rules, the HTTP/2 preface check and a small typed [`Request`].
//!
//! Left out: bodies (see `body.rs`), routing, percent-decoding of the path
//! (the router matches raw paths), and any notion of which headers the app wants.

use std::io::{self, BufRead};
use std::time::{Duration, Instant};

use super::{HttpError, is_timeout};

/// Longest request line (method, target, version) we accept, in bytes.
pub const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;
/// Longest head (request line plus header fields plus blank line), in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header fields in one head, in fields.
pub const MAX_HEADERS: usize = 64;
/// Most stray CR/LF bytes tolerated before a request line (RFC 9112 §2.2), in bytes.
const MAX_LEADING_EMPTY_LINE_BYTES: usize = 8;
/// Default body limit, in bytes (SPEC: `--body-limit-bytes 52428800`).
pub const DEFAULT_BODY_LIMIT_BYTES: u64 = 52_428_800;
/// Default time a client gets to send a whole head once its first byte arrived.
pub const DEFAULT_HEAD_DEADLINE: Duration = Duration::from_secs(10);

/// The HTTP/2 prior-knowledge preface (RFC 9113 §3.4) as its first line.
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Runtime limits for reading requests; the server builds one from its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body, in bytes; enforced while streaming (413).
    pub body_limit_bytes: u64,
    /// Time allowed for a whole head, counted from its first byte (408).
    /// Idle keep-alive waits before that byte are the socket timeout's job.
    pub head_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_limit_bytes: DEFAULT_BODY_LIMIT_BYTES,
            head_deadline: DEFAULT_HEAD_DEADLINE,
        }
    }
}

/// The two protocol versions we speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: connections close unless the client asks for keep-alive.
    Http10,
    /// HTTP/1.1: connections persist unless either side says `close`.
    Http11,
}

impl Version {
    /// The version as it appears on the wire, e.g. `HTTP/1.1`.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// A parsed request head. The body, if any, is still in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method as sent (case-sensitive per RFC 9110), e.g. `POST`.
    pub method: String,
    /// Raw path without the query, e.g. `/v1/transcribe`; `*` for `OPTIONS *`.
    pub path: String,
    /// Query pairs in order, percent-decoded, `+` read as a space.
    pub query: Vec<(String, String)>,
    /// Protocol version.
    pub version: Version,
    /// Header fields in order, names as sent, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// First value of header `name`, matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers_all(name).next()
    }

    /// Every value of header `name`, in order, matched case-insensitively.
    pub fn headers_all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// First value of query parameter `name` (exact, case-sensitive match).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// True when any `Connection` header lists `token` (case-insensitive).
    pub fn has_connection_token(&self, token: &str) -> bool {
        self.headers_all("connection").any(|v| has_token(v, token))
    }

    /// Whether the client wants the connection kept open after this exchange:
    /// HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`.
    pub fn wants_keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.has_connection_token("close"),
            Version::Http10 => {
                self.has_connection_token("keep-alive") && !self.has_connection_token("close")
            }
        }
    }

    /// Whether this is a valid WebSocket opening handshake (RFC 6455 §4.2.1):
    /// HTTP/1.1 `GET`, `Upgrade: websocket`, `Connection` with the `upgrade`
    /// token, `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key`.
    pub fn is_websocket_upgrade(&self) -> bool {
        self.method == "GET"
            && self.version == Version::Http11
            && self
                .headers_all("upgrade")
                .any(|v| has_token(v, "websocket"))
            && self.has_connection_token("upgrade")
            && self.header("sec-websocket-version") == Some("13")
            && self
                .header("sec-websocket-key")
                .is_some_and(|key| !key.is_empty())
    }

    /// Whether the client waits for `100 Continue` before sending its body
    /// (`Expect: 100-continue` on HTTP/1.1); answer with `write_continue`.
    pub fn needs_continue(&self) -> bool {
        self.version == Version::Http11
            && self
                .header("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    }
}

/// True when comma-separated header value `value` lists `token`, ignoring case.
pub(crate) fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Reads one request head from `reader`, consuming exactly its bytes.
///
/// Errors: [`HttpError::ConnectionClosed`] on a clean EOF before the first
/// byte; 414/431 over the caps; 400 on bad syntax; 505 on other versions;
/// [`HttpError::Http2Preface`] on an HTTP/2 preface; 408 when the head takes
/// longer than `limits.head_deadline` or the socket times out.
pub fn read_head<R: BufRead>(reader: &mut R, limits: &Limits) -> Result<Request, HttpError> {
    let head = read_head_bytes(reader, limits.head_deadline)?;
    parse_head(&head)
}

/// What one pass over the buffered bytes found.
enum Scan {
    /// The head is complete.
    Done,
    /// Need more bytes.
    More,
    /// Stop with this error.
    Fail(HttpError),
}

/// Copies bytes up to and including the blank line that ends a head.
fn read_head_bytes<R: BufRead>(reader: &mut R, deadline: Duration) -> Result<Vec<u8>, HttpError> {
    let mut head = Vec::with_capacity(1024);
    let mut skipped_bytes = 0usize;
    let mut request_line_done = false;
    let mut started: Option<Instant> = None;
    loop {
        let available = match reader.fill_buf() {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) && head.is_empty() && skipped_bytes == 0 => {
                return Err(HttpError::Io(e));
            }
            Err(e) if is_timeout(&e) => return Err(HttpError::HeadTimeout),
            Err(e) => return Err(HttpError::Io(e)),
        };
        if available.is_empty() {
            return Err(if head.is_empty() && skipped_bytes == 0 {
                HttpError::ConnectionClosed
            } else {
                HttpError::MalformedHead("connection closed inside the head".into())
            });
        }
        let started_at = *started.get_or_insert_with(Instant::now);
        let mut used = 0;
        let mut scan = Scan::More;
        for &byte in available {
            used += 1;
            if head.is_empty() && (byte == b'\r' || byte == b'\n') {
                skipped_bytes += 1;
                if skipped_bytes > MAX_LEADING_EMPTY_LINE_BYTES {
                    scan = Scan::Fail(HttpError::MalformedHead(
                        "empty lines before request".into(),
                    ));
                    break;
                }
                continue;
            }
            head.push(byte);
            if byte == b'\n' {
                if !request_line_done {
                    request_line_done = true;
                    if head == H2_PREFACE_LINE {
                        scan = Scan::Fail(HttpError::Http2Preface);
                        break;
                    }
                }
                if head.ends_with(b"\n\r\n") || head.ends_with(b"\n\n") {
                    scan = Scan::Done;
                    break;
                }
            }
            if !request_line_done && head.len() > MAX_REQUEST_LINE_BYTES {
                scan = Scan::Fail(HttpError::RequestLineTooLong {
                    limit_bytes: MAX_REQUEST_LINE_BYTES,
                });
                break;
            }
            if head.len() > MAX_HEAD_BYTES {
                scan = Scan::Fail(HttpError::HeadTooLarge {
                    limit_bytes: MAX_HEAD_BYTES,
                });
                break;
            }
        }
        reader.consume(used);
        match scan {
            Scan::Done => return Ok(head),
            Scan::Fail(e) => return Err(e),
            Scan::More if started_at.elapsed() > deadline => return Err(HttpError::HeadTimeout),
            Scan::More => {}
        }
    }
}

/// Parses a complete head (ending in a blank line) into a [`Request`].
fn parse_head(head: &[u8]) -> Result<Request, HttpError> {
    let version = check_version(head)?;
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut slots);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(HttpError::MalformedHead("incomplete head".into()));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::TooManyHeaders { limit: MAX_HEADERS });
        }
        Err(e) => return Err(HttpError::MalformedHead(e.to_string())),
    }
    let method = parsed.method.unwrap_or_default().to_owned();
    let target = parsed.path.unwrap_or_default();
    let mut headers = Vec::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let value = std::str::from_utf8(field.value)
            .map_err(|_| HttpError::MalformedHead(format!("non-UTF-8 value in {}", field.name)))?;
        headers.push((field.name.to_owned(), value.trim().to_owned()));
    }
    let (path, query) = split_target(&method, target)?;
    let request = Request {
        method,
        path,
        query,
        version,
        headers,
    };
    if version == Version::Http11 && request.headers_all("host").count() != 1 {
        return Err(HttpError::MalformedHead(
            "HTTP/1.1 needs exactly one Host".into(),
        ));
    }
    Ok(request)
}

/// Reads the version token ourselves so that other versions get 505, not 400.
fn check_version(head: &[u8]) -> Result<Version, HttpError> {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = head[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&head[..line_end]);
    let token = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
    match token {
        b"HTTP/1.1" => Ok(Version::Http11),
        b"HTTP/1.0" => Ok(Version::Http10),
        _ if is_version_syntax(token) => Err(HttpError::UnsupportedVersion(
            String::from_utf8_lossy(token).into_owned(),
        )),
        _ => Err(HttpError::MalformedHead("bad request line".into())),
    }
}

/// `HTTP/` DIGIT [`.` DIGIT]: well-formed, even if not a version we speak.
fn is_version_syntax(token: &[u8]) -> bool {
    match token.strip_prefix(b"HTTP/") {
        Some([major]) => major.is_ascii_digit(),
        Some([major, b'.', minor]) => major.is_ascii_digit() && minor.is_ascii_digit(),
        _ => false,
    }
}

/// Splits a request target into raw path and decoded query (RFC 9112 §3.2).
type PathAndQuery = (String, Vec<(String, String)>);
fn split_target(method: &str, target: &str) -> Result<PathAndQuery, HttpError> {
    if target == "*" {
        return if method == "OPTIONS" {
            Ok(("*".to_owned(), Vec::new()))
        } else {
            Err(HttpError::MalformedHead(
                "'*' target is for OPTIONS only".into(),
            ))
        };
    }
    let origin_form = if target.starts_with('/') {
        target
    } else if let Some(rest) = strip_scheme(target) {
        // absolute-form: drop the authority; the path starts at the next '/'.
        match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => &rest[i..],
            Some(i) => return Ok(("/".to_owned(), parse_query(&rest[i + 1..]))),
            None => "/",
        }
    } else {
        return Err(HttpError::MalformedHead(
            "unsupported request target".into(),
        ));
    };
    let without_fragment = origin_form.split('#').next().unwrap_or_default();
    Ok(match without_fragment.split_once('?') {
        Some((path, query)) => (path.to_owned(), parse_query(query)),
        None => (without_fragment.to_owned(), Vec::new()),
    })
}

/// `http://` or `https://` (any case) stripped, for absolute-form targets.
fn strip_scheme(target: &str) -> Option<&str> {
    ["http://", "https://"].iter().find_map(|scheme| {
        let prefix = target.get(..scheme.len())?;
        prefix
            .eq_ignore_ascii_case(scheme)
            .then(|| &target[scheme.len()..])
    })
}

/// Decodes `a=1&b=x+y&c` into pairs; empty pieces are skipped.
pub(crate) fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (key, value) = piece.split_once('=').unwrap_or((piece, ""));
            (decode_component(key), decode_component(value))
        })
        .collect()
}

/// Percent-decodes one query component, `+` as space; bad escapes stay literal,
/// bytes that are not UTF-8 become U+FFFD.
pub(crate) fn decode_component(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| {
                    let h = std::str::from_utf8(h).ok()?;
                    u8::from_str_radix(h, 16).ok()
                });
                if let Some(byte) = hex {
                    out.push(byte);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An empty SETTINGS frame and a GOAWAY (last stream 0, HTTP_1_1_REQUIRED)
/// per RFC 9113 §6.5 and §6.8: what we send to a client that opened with the
/// HTTP/2 preface, before closing.
pub fn h2_goaway_http11_required() -> Vec<u8> {
    /// Frame types and the error code, RFC 9113 §6.5, §6.8 and §7.
    const TYPE_SETTINGS: u8 = 0x4;
    const TYPE_GOAWAY: u8 = 0x7;
    const HTTP_1_1_REQUIRED: u32 = 0xd;
    let mut out = Vec::with_capacity(9 + 9 + 8);
    // SETTINGS: length 0, type, flags 0, stream 0.
    out.extend_from_slice(&[0, 0, 0, TYPE_SETTINGS, 0, 0, 0, 0, 0]);
    // GOAWAY: length 8, type, flags 0, stream 0; last-stream-id 0, error code.
    out.extend_from_slice(&[0, 0, 8, TYPE_GOAWAY, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&HTTP_1_1_REQUIRED.to_be_bytes());
    out
}

#[cfg(test)]
mod tests;
