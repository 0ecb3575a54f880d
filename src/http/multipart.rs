//! Strict `multipart/form-data` (RFC 7578 over RFC 2046 §5.1) read from a stream.
//!
//! The parser pulls the body through a small window, so memory holds the parts
//! it keeps plus one read buffer, never a second copy of the body. It is strict
//! where leniency would hide bugs or smuggle data: the boundary must be valid,
//! every part needs `Content-Disposition: form-data; name=...`, and a body that
//! ends before the closing delimiter is an error. Caps: part count, file count,
//! part-header bytes, bytes per text field, bytes per file, total bytes.
//!
//! Left out: nested `multipart/mixed`, `Content-Transfer-Encoding` (RFC 7578
//! §4.7 deprecates it), charset handling (text fields are UTF-8), and the
//! epilogue, which is left unread for the body reader's `drain`.

use std::fmt;
use std::io::{self, Read};

use super::{HttpError, StatusCode, is_timeout};

/// Longest boundary, in bytes (RFC 2046 §5.1.1).
pub const MAX_BOUNDARY_BYTES: usize = 70;
/// Most parts in one body, in parts.
pub const MAX_PARTS: usize = 32;
/// Most parts with a `filename` (uploaded files) in one body, in parts.
pub const MAX_FILE_PARTS: usize = 1;
/// Largest text field (a part without `filename`), in bytes.
pub const MAX_FIELD_BYTES: usize = 64 * 1024;
/// Longest header block of one part, blank line included, in bytes.
pub const MAX_PART_HEADER_BYTES: usize = 8 * 1024;
/// Most header fields in one part, in fields.
pub const MAX_PART_HEADERS: usize = 16;
/// Longest preamble before the first delimiter, in bytes.
pub const MAX_PREAMBLE_BYTES: usize = 8 * 1024;
/// Bytes pulled from the reader per read, in bytes.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Runtime caps for one multipart body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultipartLimits {
    /// Most body bytes read in total, in bytes (the body limit).
    pub max_total_bytes: u64,
    /// Largest file part, in bytes.
    pub max_file_bytes: u64,
    /// Largest text field, in bytes.
    pub max_field_bytes: usize,
    /// Most parts, in parts.
    pub max_parts: usize,
    /// Most file parts, in parts.
    pub max_file_parts: usize,
    /// Longest part header block, in bytes.
    pub max_part_header_bytes: usize,
}

impl MultipartLimits {
    /// The default caps with files and the total bounded by `body_limit_bytes`.
    pub fn for_body_limit(body_limit_bytes: u64) -> MultipartLimits {
        MultipartLimits {
            max_total_bytes: body_limit_bytes,
            max_file_bytes: body_limit_bytes,
            max_field_bytes: MAX_FIELD_BYTES,
            max_parts: MAX_PARTS,
            max_file_parts: MAX_FILE_PARTS,
            max_part_header_bytes: MAX_PART_HEADER_BYTES,
        }
    }
}

impl Default for MultipartLimits {
    fn default() -> Self {
        MultipartLimits::for_body_limit(super::request::DEFAULT_BODY_LIMIT_BYTES)
    }
}

/// One form field or file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The `name` parameter of `Content-Disposition`.
    pub name: String,
    /// The `filename` (or decoded `filename*`) parameter, if any.
    pub filename: Option<String>,
    /// The part's `Content-Type`, if sent.
    pub content_type: Option<String>,
    /// The part's bytes.
    pub data: Vec<u8>,
}

impl Part {
    /// Whether this part is an uploaded file (it has a `filename`).
    pub fn is_file(&self) -> bool {
        self.filename.is_some()
    }

    /// The data as UTF-8 text.
    pub fn text(&self) -> Result<&str, MultipartError> {
        std::str::from_utf8(&self.data).map_err(|_| MultipartError::InvalidUtf8 {
            name: self.name.clone(),
        })
    }
}

/// Everything that can go wrong in a multipart body.
#[derive(Debug)]
#[non_exhaustive]
pub enum MultipartError {
    /// The `Content-Type` is not `multipart/form-data` (415).
    NotMultipart,
    /// `multipart/form-data` without a `boundary` parameter.
    MissingBoundary,
    /// A boundary that is empty, too long or has characters RFC 2046 forbids.
    InvalidBoundary,
    /// No delimiter within the preamble cap.
    PreambleTooLarge,
    /// A delimiter line followed by something other than CRLF or `--`.
    MalformedDelimiter,
    /// A part header block that does not parse or is over its caps.
    MalformedPartHeaders,
    /// A part without `Content-Disposition`.
    MissingDisposition,
    /// A `Content-Disposition` without `name`.
    MissingName,
    /// A part over its cap (413).
    PartTooLarge {
        /// The part's name.
        name: String,
        /// The cap that was crossed, in bytes.
        limit_bytes: u64,
    },
    /// The whole body over the total cap (413).
    TooLarge {
        /// The cap that was crossed, in bytes.
        limit_bytes: u64,
    },
    /// More parts than the cap.
    TooManyParts {
        /// The cap, in parts.
        limit: usize,
    },
    /// More file parts than the cap.
    TooManyFiles {
        /// The cap, in parts.
        limit: usize,
    },
    /// The body ended before the closing delimiter.
    UnexpectedEnd,
    /// A text field that is not UTF-8 (from [`Part::text`]).
    InvalidUtf8 {
        /// The field's name.
        name: String,
    },
    /// The body reader failed (limit, framing).
    Body(HttpError),
    /// The socket failed.
    Io(io::Error),
}

impl MultipartError {
    /// The status code a client should see for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            MultipartError::NotMultipart => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            MultipartError::PartTooLarge { .. } | MultipartError::TooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            MultipartError::Body(e) => e.status(),
            MultipartError::Io(e) if is_timeout(e) => StatusCode::REQUEST_TIMEOUT,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl From<io::Error> for MultipartError {
    /// Recovers a [`HttpError`] from [`super::BodyReader`]; other errors stay I/O.
    fn from(e: io::Error) -> Self {
        match HttpError::from(e) {
            HttpError::Io(e) => MultipartError::Io(e),
            other => MultipartError::Body(other),
        }
    }
}

impl fmt::Display for MultipartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MultipartError::NotMultipart => write!(f, "expected multipart/form-data"),
            MultipartError::MissingBoundary => write!(f, "multipart/form-data without boundary"),
            MultipartError::InvalidBoundary => write!(f, "invalid multipart boundary"),
            MultipartError::PreambleTooLarge => write!(f, "no multipart boundary found"),
            MultipartError::MalformedDelimiter => write!(f, "malformed multipart delimiter"),
            MultipartError::MalformedPartHeaders => write!(f, "malformed multipart part headers"),
            MultipartError::MissingDisposition => {
                write!(f, "multipart part without Content-Disposition")
            }
            MultipartError::MissingName => write!(f, "multipart part without a name"),
            MultipartError::PartTooLarge { name, limit_bytes } => {
                write!(f, "multipart part {name:?} larger than {limit_bytes} bytes")
            }
            MultipartError::TooLarge { limit_bytes } => {
                write!(f, "multipart body larger than {limit_bytes} bytes")
            }
            MultipartError::TooManyParts { limit } => {
                write!(f, "more than {limit} multipart parts")
            }
            MultipartError::TooManyFiles { limit } => write!(f, "more than {limit} files"),
            MultipartError::UnexpectedEnd => write!(f, "multipart body ended early"),
            MultipartError::InvalidUtf8 { name } => write!(f, "field {name:?} is not UTF-8"),
            MultipartError::Body(e) => write!(f, "{e}"),
            MultipartError::Io(_) => write!(f, "connection error while reading the body"),
        }
    }
}

impl std::error::Error for MultipartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MultipartError::Body(e) => Some(e),
            MultipartError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// The boundary from a `Content-Type` such as
/// `multipart/form-data; boundary="a b"` (quoted or token, ≤ 70 bytes).
pub fn boundary_from_content_type(content_type: &str) -> Result<String, MultipartError> {
    let mut pieces = content_type.split(';');
    let media_type = pieces.next().unwrap_or_default().trim();
    if !media_type.eq_ignore_ascii_case("multipart/form-data") {
        return Err(MultipartError::NotMultipart);
    }
    let params = content_type
        .find(';')
        .map_or("", |i| &content_type[i + 1..]);
    let params = parse_params(params).ok_or(MultipartError::MissingBoundary)?;
    let boundary = params
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("boundary"))
        .map(|(_, value)| value)
        .ok_or(MultipartError::MissingBoundary)?;
    if is_valid_boundary(&boundary) {
        Ok(boundary)
    } else {
        Err(MultipartError::InvalidBoundary)
    }
}

/// `bchars` (RFC 2046 §5.1.1): 1–70 of them, not ending in a space.
fn is_valid_boundary(boundary: &str) -> bool {
    !boundary.is_empty()
        && boundary.len() <= MAX_BOUNDARY_BYTES
        && !boundary.ends_with(' ')
        && boundary
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&b))
}

/// `; name=value; name="quoted \" value"` into pairs; `None` if malformed.
fn parse_params(text: &str) -> Option<Vec<(String, String)>> {
    let mut params = Vec::new();
    let mut rest = text.trim_start_matches([' ', '\t', ';']);
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let name = rest[..eq].trim();
        if name.is_empty() || name.contains([';', ' ', '"']) {
            return None;
        }
        let after = rest[eq + 1..].trim_start_matches([' ', '\t']);
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()? {
                        (_, c @ ('"' | '\\')) => value.push(c),
                        (_, c) => {
                            value.push('\\');
                            value.push(c);
                        }
                    },
                    (_, c) => value.push(c),
                }
            };
            let remaining = quoted[end + 1..].trim_start_matches([' ', '\t']);
            if !(remaining.is_empty() || remaining.starts_with(';')) {
                return None;
            }
            (value, remaining)
        } else {
            let end = after.find(';').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.push((name.to_ascii_lowercase(), value));
        rest = remaining.trim_start_matches([' ', '\t', ';']);
    }
    Some(params)
}

/// `form-data; name="x"; filename="y"` → (name, filename).
fn parse_disposition(value: &str) -> Result<(String, Option<String>), MultipartError> {
    let (kind, params) = value.split_once(';').unwrap_or((value, ""));
    if !kind.trim().eq_ignore_ascii_case("form-data") {
        return Err(MultipartError::MalformedPartHeaders);
    }
    let params = parse_params(params).ok_or(MultipartError::MalformedPartHeaders)?;
    let mut name = None;
    let mut filename = None;
    let mut filename_ext = None;
    for (key, value) in params {
        let slot = match key.as_str() {
            "name" => &mut name,
            "filename" => &mut filename,
            "filename*" => &mut filename_ext,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(MultipartError::MalformedPartHeaders);
        }
    }
    let name = name.ok_or(MultipartError::MissingName)?;
    let filename = filename_ext
        .and_then(|ext| decode_ext_value(&ext))
        .or(filename);
    Ok((name, filename))
}

/// RFC 8187 `UTF-8''percent%20encoded`; other charsets are ignored.
fn decode_ext_value(value: &str) -> Option<String> {
    let (charset, rest) = value.split_once('\'')?;
    let (_language, encoded) = rest.split_once('\'')?;
    if !charset.eq_ignore_ascii_case("utf-8") {
        return None;
    }
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut iter = encoded.bytes();
    while let Some(b) = iter.next() {
        if b == b'%' {
            let hex = [iter.next()?, iter.next()?];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).ok()
}

/// A sliding window over the reader.
struct Window<R> {
    reader: R,
    buffer: Vec<u8>,
    start: usize,
    is_eof: bool,
    read_bytes: u64,
    max_total_bytes: u64,
}

impl<R: Read> Window<R> {
    fn available(&self) -> &[u8] {
        &self.buffer[self.start..]
    }

    fn advance(&mut self, n: usize) {
        self.start += n;
    }

    /// Reads more bytes; `Ok(false)` at end of stream.
    fn fill(&mut self) -> Result<bool, MultipartError> {
        if self.is_eof {
            return Ok(false);
        }
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        let old_len = self.buffer.len();
        self.buffer.resize(old_len + READ_CHUNK_BYTES, 0);
        let n = loop {
            match self.reader.read(&mut self.buffer[old_len..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buffer.truncate(old_len);
                    return Err(MultipartError::from(e));
                }
            }
        };
        self.buffer.truncate(old_len + n);
        self.read_bytes += n as u64;
        if self.read_bytes > self.max_total_bytes {
            return Err(MultipartError::TooLarge {
                limit_bytes: self.max_total_bytes,
            });
        }
        self.is_eof = n == 0;
        Ok(n > 0)
    }

    /// Makes at least `n` bytes available; `Ok(false)` if the stream ends first.
    fn ensure(&mut self, n: usize) -> Result<bool, MultipartError> {
        while self.available().len() < n {
            if !self.fill()? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Position of `needle` in `haystack`, anchored on its first byte (CR here).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut from = 0;
    while let Some(offset) = haystack[from..].iter().position(|&b| b == first) {
        let at = from + offset;
        if haystack[at..].starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Parses a whole `multipart/form-data` body from `reader` (usually a
/// [`super::BodyReader`]) and returns its parts in order. Parsing stops at the
/// closing delimiter (reads may run ahead, within the body); drain the body
/// reader afterwards to reuse the connection.
pub fn parse_multipart<R: Read>(
    reader: R,
    boundary: &str,
    limits: &MultipartLimits,
) -> Result<Vec<Part>, MultipartError> {
    if !is_valid_boundary(boundary) {
        return Err(MultipartError::InvalidBoundary);
    }
    let delimiter = format!("\r\n--{boundary}").into_bytes();
    // A virtual CRLF lets a body that starts with "--boundary" match the delimiter.
    let mut window = Window {
        reader,
        buffer: b"\r\n".to_vec(),
        start: 0,
        is_eof: false,
        read_bytes: 0,
        max_total_bytes: limits.max_total_bytes,
    };
    skip_preamble(&mut window, &delimiter)?;
    let mut parts: Vec<Part> = Vec::new();
    while !read_delimiter_tail(&mut window)? {
        if parts.len() >= limits.max_parts {
            return Err(MultipartError::TooManyParts {
                limit: limits.max_parts,
            });
        }
        let (name, filename, content_type) = read_part_headers(&mut window, limits)?;
        let limit_bytes = if filename.is_some() {
            if parts.iter().filter(|p| p.is_file()).count() >= limits.max_file_parts {
                return Err(MultipartError::TooManyFiles {
                    limit: limits.max_file_parts,
                });
            }
            limits.max_file_bytes
        } else {
            limits.max_field_bytes as u64
        };
        let data = read_part_data(&mut window, &delimiter, &name, limit_bytes)?;
        parts.push(Part {
            name,
            filename,
            content_type,
            data,
        });
    }
    Ok(parts)
}

/// Skips everything up to and including the first delimiter.
fn skip_preamble<R: Read>(window: &mut Window<R>, delimiter: &[u8]) -> Result<(), MultipartError> {
    loop {
        if let Some(i) = find(window.available(), delimiter) {
            window.advance(i + delimiter.len());
            return Ok(());
        }
        if window.available().len() > MAX_PREAMBLE_BYTES + delimiter.len() {
            return Err(MultipartError::PreambleTooLarge);
        }
        if !window.fill()? {
            return Err(MultipartError::UnexpectedEnd);
        }
    }
}

/// After a delimiter: `--` ends the body (true); optional padding + CRLF
/// starts a part (false).
fn read_delimiter_tail<R: Read>(window: &mut Window<R>) -> Result<bool, MultipartError> {
    if !window.ensure(2)? {
        return Err(MultipartError::UnexpectedEnd);
    }
    if window.available().starts_with(b"--") {
        window.advance(2);
        return Ok(true);
    }
    // Transport padding (RFC 2046 §5.1.1), bounded by the header cap.
    let mut padding_bytes = 0usize;
    loop {
        let padding = window
            .available()
            .iter()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
        window.advance(padding);
        padding_bytes += padding;
        if padding_bytes > MAX_PART_HEADER_BYTES {
            return Err(MultipartError::MalformedDelimiter);
        }
        if !window.ensure(2)? {
            return Err(MultipartError::UnexpectedEnd);
        }
        if window.available().starts_with(b"\r\n") {
            window.advance(2);
            return Ok(false);
        }
        if !matches!(window.available()[0], b' ' | b'\t') {
            return Err(MultipartError::MalformedDelimiter);
        }
    }
}

/// Reads one part's header block; returns (name, filename, content type).
fn read_part_headers<R: Read>(
    window: &mut Window<R>,
    limits: &MultipartLimits,
) -> Result<(String, Option<String>, Option<String>), MultipartError> {
    // A part with no header fields at all starts with the blank line.
    if !window.ensure(2)? {
        return Err(MultipartError::UnexpectedEnd);
    }
    if window.available().starts_with(b"\r\n") {
        return Err(MultipartError::MissingDisposition);
    }
    let end = loop {
        if let Some(i) = find(window.available(), b"\r\n\r\n") {
            break i + 4;
        }
        if window.available().len() > limits.max_part_header_bytes {
            return Err(MultipartError::MalformedPartHeaders);
        }
        if !window.fill()? {
            return Err(MultipartError::UnexpectedEnd);
        }
    };
    if end > limits.max_part_header_bytes {
        return Err(MultipartError::MalformedPartHeaders);
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_PART_HEADERS];
    let block = &window.available()[..end];
    let headers = match httparse::parse_headers(block, &mut slots) {
        Ok(httparse::Status::Complete((_, headers))) => headers,
        _ => return Err(MultipartError::MalformedPartHeaders),
    };
    let value_of = |wanted: &str| -> Result<Option<String>, MultipartError> {
        let mut found = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(wanted));
        let first = found.next();
        if found.next().is_some() {
            return Err(MultipartError::MalformedPartHeaders);
        }
        first
            .map(|h| {
                std::str::from_utf8(h.value)
                    .map(|v| v.trim().to_owned())
                    .map_err(|_| MultipartError::MalformedPartHeaders)
            })
            .transpose()
    };
    let disposition = value_of("content-disposition")?.ok_or(MultipartError::MissingDisposition)?;
    let content_type = value_of("content-type")?;
    let (name, filename) = parse_disposition(&disposition)?;
    window.advance(end);
    Ok((name, filename, content_type))
}

/// Reads a part's data up to the next delimiter, which is consumed.
fn read_part_data<R: Read>(
    window: &mut Window<R>,
    delimiter: &[u8],
    name: &str,
    limit_bytes: u64,
) -> Result<Vec<u8>, MultipartError> {
    let mut data = Vec::new();
    let too_large = || MultipartError::PartTooLarge {
        name: name.to_owned(),
        limit_bytes,
    };
    loop {
        let available = window.available();
        let (take, found) = match find(available, delimiter) {
            Some(i) => (i, true),
            // Keep a tail that could be the start of a delimiter.
            None => (available.len().saturating_sub(delimiter.len() - 1), false),
        };
        if (data.len() + take) as u64 > limit_bytes {
            return Err(too_large());
        }
        data.extend_from_slice(&available[..take]);
        if found {
            window.advance(take + delimiter.len());
            return Ok(data);
        }
        window.advance(take);
        if !window.fill()? {
            return Err(MultipartError::UnexpectedEnd);
        }
    }
}

#[cfg(test)]
mod tests;
