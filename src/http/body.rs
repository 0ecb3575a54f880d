//! Request bodies: framing rules and a bounded `Read` over the stream.
//!
//! [`BodyFraming::from_request`] applies RFC 9112 §6 (and refuses the
//! ambiguous cases that enable request smuggling); [`BodyReader`] then yields
//! exactly the body's bytes — `Content-Length` or `chunked` — and stops with
//! 413 the moment the body limit would be crossed, before reading those bytes.
//! Whatever follows the body stays in the stream for the next request.
//!
//! Left out: transfer codings other than `chunked`, trailer fields (read,
//! capped and dropped), and bodies framed by connection close (requests
//! can't use that).

use std::io::{self, BufRead, Read};

use super::HttpError;
use super::request::{Request, Version};

/// Longest chunk-size line, extensions included, in bytes.
pub const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;
/// Most bytes of trailer fields after the last chunk, in bytes.
pub const MAX_TRAILER_BYTES: usize = 8 * 1024;
/// Most hex digits in a chunk size (16 fill a u64).
const MAX_CHUNK_SIZE_DIGITS: usize = 16;
/// Scratch buffer used by [`BodyReader::drain`], in bytes.
const DRAIN_BUFFER_BYTES: usize = 8 * 1024;

/// How the request says its body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No `Content-Length`, no `Transfer-Encoding`: the body is empty.
    Empty,
    /// Exactly this many bytes follow the head.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl BodyFraming {
    /// Reads the framing headers of `request` (RFC 9112 §6.1–6.3).
    ///
    /// Errors: both headers → 400 (smuggling); `Transfer-Encoding` on HTTP/1.0
    /// or not ending in `chunked` → 400; another coding → 501; a
    /// `Content-Length` that is not one decimal number (repeats must agree) → 400.
    pub fn from_request(request: &Request) -> Result<BodyFraming, HttpError> {
        let has_length = request.header("content-length").is_some();
        let codings: Vec<String> = request
            .headers_all("transfer-encoding")
            .flat_map(|v| v.split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .collect();
        if !codings.is_empty() {
            if has_length {
                return Err(HttpError::ConflictingFraming);
            }
            if request.version == Version::Http10 {
                return Err(HttpError::InvalidTransferEncoding);
            }
            if codings.last().map(String::as_str) != Some("chunked") {
                return Err(HttpError::InvalidTransferEncoding);
            }
            let (earlier, last) = codings.split_at(codings.len() - 1);
            return match earlier.iter().find(|c| !c.is_empty()) {
                Some(c) if c == "chunked" => Err(HttpError::InvalidTransferEncoding),
                Some(c) => Err(HttpError::UnsupportedTransferEncoding(c.clone())),
                None if last[0] == "chunked" => Ok(BodyFraming::Chunked),
                None => Err(HttpError::InvalidTransferEncoding),
            };
        }
        let mut length: Option<u64> = None;
        for piece in request
            .headers_all("content-length")
            .flat_map(|v| v.split(','))
        {
            let value = parse_decimal(piece.trim()).ok_or(HttpError::InvalidContentLength)?;
            if length.is_some_and(|seen| seen != value) {
                return Err(HttpError::InvalidContentLength);
            }
            length = Some(value);
        }
        Ok(length.map_or(BodyFraming::Empty, BodyFraming::Length))
    }

    /// Refuses a declared `Content-Length` over `limit_bytes` (413) before a
    /// single body byte is read. Chunked bodies are checked while streaming.
    pub fn check_declared_length(self, limit_bytes: u64) -> Result<(), HttpError> {
        match self {
            BodyFraming::Length(n) if n > limit_bytes => {
                Err(HttpError::PayloadTooLarge { limit_bytes })
            }
            _ => Ok(()),
        }
    }
}

/// 1 to 19 ASCII digits (no sign, no spaces) as a u64.
fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Where a [`BodyReader`] is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Fixed-length body with this many bytes left.
    Length { remaining_bytes: u64 },
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Inside a chunk with this many bytes left.
    ChunkData { remaining_bytes: u64 },
    /// Expecting the CRLF after a chunk's data.
    ChunkEnd,
    /// The body is complete; reads return 0.
    Done,
}

/// `Read` over one request body that yields exactly its bytes and enforces
/// the body limit while streaming. Errors come out of `read` as `io::Error`s
/// that carry an [`HttpError`]; `HttpError::from(io_error)` recovers it.
#[derive(Debug)]
pub struct BodyReader<R> {
    inner: R,
    state: State,
    limit_bytes: u64,
    read_bytes: u64,
}

impl<R: BufRead> BodyReader<R> {
    /// A reader for a body with `framing`; fails with 413 up front when a
    /// declared length is over `limit_bytes`.
    pub fn new(inner: R, framing: BodyFraming, limit_bytes: u64) -> Result<Self, HttpError> {
        framing.check_declared_length(limit_bytes)?;
        let state = match framing {
            BodyFraming::Empty | BodyFraming::Length(0) => State::Done,
            BodyFraming::Length(n) => State::Length { remaining_bytes: n },
            BodyFraming::Chunked => State::ChunkSize,
        };
        Ok(BodyReader {
            inner,
            state,
            limit_bytes,
            read_bytes: 0,
        })
    }

    /// [`BodyFraming::from_request`] and [`BodyReader::new`] in one step.
    pub fn for_request(request: &Request, inner: R, limit_bytes: u64) -> Result<Self, HttpError> {
        Self::new(inner, BodyFraming::from_request(request)?, limit_bytes)
    }

    /// Whether the whole body (and, for chunked, its trailer) has been read.
    pub fn is_finished(&self) -> bool {
        self.state == State::Done
    }

    /// Body bytes handed out so far.
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes
    }

    /// Reads and discards the rest of the body so the next request on a
    /// keep-alive connection starts at the right byte. Still bounded by the
    /// body limit. Returns the bytes discarded.
    pub fn drain(&mut self) -> Result<u64, HttpError> {
        let mut scratch = [0u8; DRAIN_BUFFER_BYTES];
        let mut drained_bytes = 0u64;
        loop {
            match self.read(&mut scratch) {
                Ok(0) => return Ok(drained_bytes),
                Ok(n) => drained_bytes += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HttpError::from(e)),
            }
        }
    }

    /// Gives back the stream, positioned wherever reading stopped.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// One step of the state machine; `Ok(0)` only at the end of the body.
    fn read_body(&mut self, out: &mut [u8]) -> Result<usize, HttpError> {
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::Length { remaining_bytes } => {
                    let n = self.copy_from_inner(out, remaining_bytes)?;
                    let remaining_bytes = remaining_bytes - n as u64;
                    self.state = if remaining_bytes == 0 {
                        State::Done
                    } else {
                        State::Length { remaining_bytes }
                    };
                    return Ok(n);
                }
                State::ChunkSize => {
                    let line = read_crlf_line(&mut self.inner, MAX_CHUNK_LINE_BYTES)?;
                    let size = parse_chunk_size(&line)?;
                    if size == 0 {
                        read_trailer(&mut self.inner)?;
                        self.state = State::Done;
                        return Ok(0);
                    }
                    if self.read_bytes.saturating_add(size) > self.limit_bytes {
                        return Err(HttpError::PayloadTooLarge {
                            limit_bytes: self.limit_bytes,
                        });
                    }
                    self.state = State::ChunkData {
                        remaining_bytes: size,
                    };
                }
                State::ChunkData { remaining_bytes } => {
                    let n = self.copy_from_inner(out, remaining_bytes)?;
                    let remaining_bytes = remaining_bytes - n as u64;
                    self.state = if remaining_bytes == 0 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData { remaining_bytes }
                    };
                    return Ok(n);
                }
                State::ChunkEnd => {
                    let line = read_crlf_line(&mut self.inner, 2)?;
                    if !line.is_empty() {
                        return Err(HttpError::MalformedChunk("chunk data longer than its size"));
                    }
                    self.state = State::ChunkSize;
                }
            }
        }
    }

    /// Copies up to `remaining_bytes` buffered bytes into `out`.
    fn copy_from_inner(
        &mut self,
        out: &mut [u8],
        remaining_bytes: u64,
    ) -> Result<usize, HttpError> {
        let available = fill_buf_retrying(&mut self.inner)?;
        if available.is_empty() {
            return Err(HttpError::BodyIncomplete);
        }
        let wanted = usize::try_from(remaining_bytes).unwrap_or(usize::MAX);
        let n = available.len().min(out.len()).min(wanted);
        out[..n].copy_from_slice(&available[..n]);
        self.inner.consume(n);
        self.read_bytes += n as u64;
        if self.read_bytes > self.limit_bytes {
            // Unreachable for well-built readers; kept so the cap never depends on it.
            return Err(HttpError::PayloadTooLarge {
                limit_bytes: self.limit_bytes,
            });
        }
        Ok(n)
    }
}

impl<R: BufRead> Read for BodyReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        self.read_body(out).map_err(HttpError::into_io)
    }
}

/// `fill_buf` that retries on `Interrupted`; timeouts stay I/O errors (408).
fn fill_buf_retrying<R: BufRead>(inner: &mut R) -> Result<&[u8], HttpError> {
    loop {
        match inner.fill_buf() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Returning the slice from here trips the borrow checker (NLL
            // problem case 3); the second call below just returns the buffer.
            _ => break,
        }
    }
    inner.fill_buf().map_err(HttpError::Io)
}

/// Reads one line that must end in CRLF, without the CRLF; at most
/// `max_bytes` bytes before the CRLF.
fn read_crlf_line<R: BufRead>(inner: &mut R, max_bytes: usize) -> Result<Vec<u8>, HttpError> {
    let mut line = Vec::new();
    loop {
        let available = fill_buf_retrying(inner)?;
        if available.is_empty() {
            return Err(HttpError::BodyIncomplete);
        }
        let (used, found_lf) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        line.extend_from_slice(&available[..used]);
        inner.consume(used);
        if found_lf {
            line.pop();
            if line.pop() != Some(b'\r') {
                return Err(HttpError::MalformedChunk("line not ended by CRLF"));
            }
            if line.len() > max_bytes {
                return Err(HttpError::MalformedChunk("line too long"));
            }
            return Ok(line);
        }
        if line.len() > max_bytes + 1 {
            return Err(HttpError::MalformedChunk("line too long"));
        }
    }
}

/// `1*HEXDIG *( BWS ";" chunk-ext )` (RFC 9112 §7.1.1); extensions are ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, HttpError> {
    let (size, extensions) = match line.iter().position(|&b| b == b';') {
        Some(i) => (&line[..i], &line[i..]),
        None => (line, &[][..]),
    };
    if extensions
        .iter()
        .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        return Err(HttpError::MalformedChunk("control byte in chunk extension"));
    }
    let digits = size.trim_ascii_end();
    if digits.is_empty()
        || digits.len() > MAX_CHUNK_SIZE_DIGITS
        || !digits.iter().all(u8::is_ascii_hexdigit)
    {
        return Err(HttpError::MalformedChunk("bad chunk size"));
    }
    let text =
        std::str::from_utf8(digits).map_err(|_| HttpError::MalformedChunk("bad chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| HttpError::MalformedChunk("bad chunk size"))
}

/// Reads trailer fields up to the blank line and drops them (RFC 9112 §7.1.2).
fn read_trailer<R: BufRead>(inner: &mut R) -> Result<(), HttpError> {
    let mut trailer_bytes = 0usize;
    loop {
        let line = read_crlf_line(inner, MAX_TRAILER_BYTES)?;
        if line.is_empty() {
            return Ok(());
        }
        trailer_bytes += line.len() + 2;
        if trailer_bytes > MAX_TRAILER_BYTES {
            return Err(HttpError::MalformedChunk("trailer too large"));
        }
        let name_end = line.iter().position(|&b| b == b':');
        if name_end.is_none_or(|i| i == 0 || line[..i].iter().any(|b| b.is_ascii_whitespace())) {
            return Err(HttpError::MalformedChunk("bad trailer field"));
        }
    }
}

#[cfg(test)]
mod tests;
