//! Responses as plain values, written to any `Write`; plus Server-Sent Events.
//!
//! A [`Response`] is a status, header fields and a body in memory, built with
//! chainable constructors and written in one `write_all`. The writer owns
//! framing: it sets `Content-Length`, `Connection` and `Date` itself and drops
//! user headers that would contradict the framing. Header names and values are
//! sanitised on the way out, so no caller can inject a CRLF.
//!
//! Left out: chunked responses (SSE streams until close instead), compression,
//! and anything that knows which body an endpoint sends.

use std::fmt;
use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

/// A status code that knows its reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatusCode(pub u16);

impl StatusCode {
    /// 100: the client may send its body (`Expect: 100-continue`).
    pub const CONTINUE: StatusCode = StatusCode(100);
    /// 101: WebSocket upgrade accepted.
    pub const SWITCHING_PROTOCOLS: StatusCode = StatusCode(101);
    /// 200.
    pub const OK: StatusCode = StatusCode(200);
    /// 204: success, no body (CORS preflight).
    pub const NO_CONTENT: StatusCode = StatusCode(204);
    /// 400.
    pub const BAD_REQUEST: StatusCode = StatusCode(400);
    /// 401.
    pub const UNAUTHORIZED: StatusCode = StatusCode(401);
    /// 403: origin denied.
    pub const FORBIDDEN: StatusCode = StatusCode(403);
    /// 404.
    pub const NOT_FOUND: StatusCode = StatusCode(404);
    /// 405.
    pub const METHOD_NOT_ALLOWED: StatusCode = StatusCode(405);
    /// 408: head or body not received in time.
    pub const REQUEST_TIMEOUT: StatusCode = StatusCode(408);
    /// 413: body over the limit.
    pub const PAYLOAD_TOO_LARGE: StatusCode = StatusCode(413);
    /// 414: request line over the cap.
    pub const URI_TOO_LONG: StatusCode = StatusCode(414);
    /// 415: audio or body format we don't take.
    pub const UNSUPPORTED_MEDIA_TYPE: StatusCode = StatusCode(415);
    /// 429: rate limited.
    pub const TOO_MANY_REQUESTS: StatusCode = StatusCode(429);
    /// 431: head over the caps.
    pub const REQUEST_HEADER_FIELDS_TOO_LARGE: StatusCode = StatusCode(431);
    /// 500.
    pub const INTERNAL_SERVER_ERROR: StatusCode = StatusCode(500);
    /// 501: transfer coding we don't implement.
    pub const NOT_IMPLEMENTED: StatusCode = StatusCode(501);
    /// 503: loading, saturated or shutting down.
    pub const SERVICE_UNAVAILABLE: StatusCode = StatusCode(503);
    /// 505: not HTTP/1.x.
    pub const HTTP_VERSION_NOT_SUPPORTED: StatusCode = StatusCode(505);

    /// The number, e.g. 404.
    pub fn as_u16(self) -> u16 {
        self.0
    }

    /// The reason phrase (RFC 9110 §15); codes we never send get a generic one.
    pub fn reason(self) -> &'static str {
        let known = match self.0 {
            100 => "Continue",
            101 => "Switching Protocols",
            200 => "OK",
            204 => "No Content",
            304 => "Not Modified",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            413 => "Payload Too Large",
            414 => "URI Too Long",
            415 => "Unsupported Media Type",
            429 => "Too Many Requests",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            501 => "Not Implemented",
            503 => "Service Unavailable",
            505 => "HTTP Version Not Supported",
            _ => "",
        };
        match (known, self.0 / 100) {
            ("", 1) => "Informational",
            ("", 2) => "Success",
            ("", 3) => "Redirection",
            ("", 4) => "Client Error",
            ("", _) => "Server Error",
            (known, _) => known,
        }
    }

    /// Whether a response with this status has no body and no
    /// `Content-Length` (1xx, 204, 304: RFC 9110 §8.6).
    pub fn is_bodyless(self) -> bool {
        matches!(self.0, 100..=199 | 204 | 304)
    }
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0, self.reason())
    }
}

/// A complete response: status, header fields, body in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    /// A response with `body` and its `Content-Type`.
    pub fn bytes(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".to_owned(), content_type.to_owned())],
            body,
        }
    }

    /// `application/json` body.
    pub fn json(status: StatusCode, value: &serde_json::Value) -> Response {
        Response::bytes(status, "application/json", value.to_string().into_bytes())
    }

    /// `text/plain; charset=utf-8` body.
    pub fn text(status: StatusCode, text: impl Into<String>) -> Response {
        Response::bytes(
            status,
            "text/plain; charset=utf-8",
            text.into().into_bytes(),
        )
    }

    /// No body, no `Content-Type`.
    pub fn empty(status: StatusCode) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// `101 Switching Protocols` for a WebSocket upgrade, with the
    /// `Sec-WebSocket-Accept` value the caller derived from the client's key.
    pub fn websocket_accept(accept_key: &str) -> Response {
        Response::empty(StatusCode::SWITCHING_PROTOCOLS)
            .with_header("Upgrade", "websocket")
            .with_header("Connection", "Upgrade")
            .with_header("Sec-WebSocket-Accept", accept_key)
    }

    /// Adds a header field (kept in order; repeats allowed). A `Content-Type`
    /// replaces the one set by a constructor.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Response {
        let name = name.into();
        if name.eq_ignore_ascii_case("content-type") {
            self.headers
                .retain(|(n, _)| !n.eq_ignore_ascii_case("content-type"));
        }
        self.headers.push((name, value.into()));
        self
    }

    /// Adds several header fields, as [`Response::with_header`] does.
    pub fn with_headers(self, headers: impl IntoIterator<Item = (String, String)>) -> Response {
        headers.into_iter().fold(self, |response, (name, value)| {
            response.with_header(name, value)
        })
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The header fields set so far (framing headers are added when writing).
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// First value of header `name`, matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Writes status line, headers and body, then flushes. Sets
    /// `Content-Length` (except for 1xx/204/304), `Connection: keep-alive` or
    /// `close` (unless the response set its own, as a 101 does) and `Date`.
    pub fn write_to<W: Write>(&self, w: &mut W, keep_alive: bool) -> io::Result<()> {
        self.write_with_body(w, keep_alive, true)
    }

    /// As [`Response::write_to`] but without the body bytes: the answer to `HEAD`.
    pub fn write_head_to<W: Write>(&self, w: &mut W, keep_alive: bool) -> io::Result<()> {
        self.write_with_body(w, keep_alive, false)
    }

    fn write_with_body<W: Write>(
        &self,
        w: &mut W,
        keep_alive: bool,
        with_body: bool,
    ) -> io::Result<()> {
        let mut out = Vec::with_capacity(256 + self.body.len());
        push_status_line(&mut out, self.status);
        let mut has_connection = false;
        let mut has_date = false;
        for (name, value) in &self.headers {
            if is_framing_header(name) {
                continue;
            }
            has_connection |= name.eq_ignore_ascii_case("connection");
            has_date |= name.eq_ignore_ascii_case("date");
            push_header(&mut out, name, value);
        }
        if !self.status.is_bodyless() {
            push_header(&mut out, "Content-Length", &self.body.len().to_string());
        }
        if !has_connection {
            push_header(
                &mut out,
                "Connection",
                if keep_alive { "keep-alive" } else { "close" },
            );
        }
        if !has_date {
            push_header(&mut out, "Date", &http_date(SystemTime::now()));
        }
        out.extend_from_slice(b"\r\n");
        if with_body && !self.status.is_bodyless() {
            out.extend_from_slice(&self.body);
        }
        w.write_all(&out)?;
        w.flush()
    }
}

/// Writes `HTTP/1.1 100 Continue` and flushes: the go-ahead for a client that
/// sent `Expect: 100-continue`, written before reading its body.
pub fn write_continue<W: Write>(w: &mut W) -> io::Result<()> {
    w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    w.flush()
}

/// `Content-Length` and `Transfer-Encoding` are the writer's to set.
fn is_framing_header(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding")
}

fn push_status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", status.0, status.reason()).as_bytes());
}

/// Appends `name: value\r\n`; a name that is not a token is dropped and
/// CR, LF and NUL in a value become spaces (no header injection).
fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return;
    }
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend(value.trim().bytes().map(|b| {
        if matches!(b, b'\r' | b'\n' | 0) {
            b' '
        } else {
            b
        }
    }));
    out.extend_from_slice(b"\r\n");
}

/// `tchar` from RFC 9110 §5.6.2.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// An IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(time: SystemTime) -> String {
    const WEEKDAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let secs_of_day = secs % 86_400;
    // 1970-01-01 was a Thursday (index 4).
    let weekday = WEEKDAYS[((days + 4) % 7) as usize];
    let (year, month, day) = civil_from_days(days);
    format!(
        "{weekday}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        MONTHS[(month - 1) as usize],
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60
    )
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31): Howard Hinnant's
/// `civil_from_days`, restricted to dates after the epoch.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// A Server-Sent Events stream (WHATWG HTML §9.2) over a response with no
/// length: the body ends when the connection closes. Every write flushes.
#[derive(Debug)]
pub struct SseWriter<W: Write> {
    writer: W,
}

impl<W: Write> SseWriter<W> {
    /// Writes the `200` head (`text/event-stream`, `Cache-Control: no-cache`,
    /// `X-Accel-Buffering: no` so nginx doesn't buffer, `Connection: close`)
    /// plus `extra_headers` (CORS, say), and flushes.
    pub fn start(mut writer: W, extra_headers: &[(String, String)]) -> io::Result<Self> {
        let mut out = Vec::with_capacity(256);
        push_status_line(&mut out, StatusCode::OK);
        push_header(&mut out, "Content-Type", "text/event-stream");
        push_header(&mut out, "Cache-Control", "no-cache");
        push_header(&mut out, "X-Accel-Buffering", "no");
        push_header(&mut out, "Connection", "close");
        push_header(&mut out, "Date", &http_date(SystemTime::now()));
        for (name, value) in extra_headers {
            let ours = [
                "content-type",
                "cache-control",
                "x-accel-buffering",
                "connection",
                "date",
            ];
            if is_framing_header(name) || ours.iter().any(|o| name.eq_ignore_ascii_case(o)) {
                continue;
            }
            push_header(&mut out, name, value);
        }
        out.extend_from_slice(b"\r\n");
        writer.write_all(&out)?;
        writer.flush()?;
        Ok(SseWriter { writer })
    }

    /// Sends one message event; each line of `data` gets its own `data:` line.
    pub fn event(&mut self, data: &str) -> io::Result<()> {
        let mut out = Vec::with_capacity(data.len() + 16);
        push_data_lines(&mut out, data);
        self.send(&out)
    }

    /// Sends an event with an `event:` name (CR/LF in the name become spaces).
    pub fn event_named(&mut self, name: &str, data: &str) -> io::Result<()> {
        let mut out = Vec::with_capacity(name.len() + data.len() + 24);
        out.extend_from_slice(b"event: ");
        out.extend(
            name.bytes()
                .map(|b| if matches!(b, b'\r' | b'\n') { b' ' } else { b }),
        );
        out.push(b'\n');
        push_data_lines(&mut out, data);
        self.send(&out)
    }

    /// Sends a comment line (`: text`), ignored by clients: a keep-alive that
    /// also tells us early when the client has gone.
    pub fn comment(&mut self, text: &str) -> io::Result<()> {
        let mut out = Vec::with_capacity(text.len() + 8);
        for line in split_lines(text) {
            out.extend_from_slice(b": ");
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
        self.send(&out)
    }

    /// Gives back the writer (the stream is still open).
    pub fn into_inner(self) -> W {
        self.writer
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()
    }
}

/// `data: line\n` per line, then the blank line that ends the event.
fn push_data_lines(out: &mut Vec<u8>, data: &str) {
    for line in split_lines(data) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
}

/// Splits on CRLF, LF or CR: all three end a line in an event stream.
fn split_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.find(['\r', '\n']) {
            Some(i) => {
                let skip = if current[i..].starts_with("\r\n") {
                    2
                } else {
                    1
                };
                rest = Some(&current[i + skip..]);
                Some(&current[..i])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

#[cfg(test)]
mod tests;
