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
mod tests {
    use super::*;
    use crate::http::{BodyFraming, BodyReader};
    use std::io::Cursor;

    fn parse(body: &[u8], boundary: &str) -> Result<Vec<Part>, MultipartError> {
        parse_multipart(
            Cursor::new(body.to_vec()),
            boundary,
            &MultipartLimits::default(),
        )
    }

    /// A reader that hands out at most `n` bytes per read.
    struct Trickle(Cursor<Vec<u8>>, usize);
    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.1);
            self.0.read(&mut buf[..n])
        }
    }

    const OPENAI_BODY: &[u8] = b"--XyZ\r\n\
        Content-Disposition: form-data; name=\"model\"\r\n\r\n\
        whisper-1\r\n\
        --XyZ\r\n\
        Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
        Content-Type: audio/wav\r\n\r\n\
        RIFF\r\n--XyY\r\n-XyZ a--XyZ\r\n\
        --XyZ--\r\n";

    #[test]
    fn boundary_from_content_type_variants() {
        let ok = [
            ("multipart/form-data; boundary=abc", "abc"),
            ("Multipart/Form-Data;BOUNDARY=abc;charset=utf-8", "abc"),
            (
                "multipart/form-data; charset=utf-8; boundary=\"a b:c\"",
                "a b:c",
            ),
            (
                "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
                "----WebKitFormBoundary7MA4YWxkTrZu0gW",
            ),
        ];
        for (ct, boundary) in ok {
            assert_eq!(boundary_from_content_type(ct).unwrap(), boundary, "{ct}");
        }
        let long = format!("multipart/form-data; boundary={}", "a".repeat(71));
        let bad = [
            ("application/json", 415),
            ("multipart/mixed; boundary=a", 415),
            ("multipart/form-data", 400),
            ("multipart/form-data; charset=utf-8", 400),
            ("multipart/form-data; boundary=", 400),
            ("multipart/form-data; boundary=\"unterminated", 400),
            ("multipart/form-data; boundary=\"ends with space \"", 400),
            ("multipart/form-data; boundary=a<b", 400),
            (long.as_str(), 400),
        ];
        for (ct, status) in bad {
            let e = boundary_from_content_type(ct).unwrap_err();
            assert_eq!(e.status().as_u16(), status, "{ct} -> {e:?}");
        }
    }

    #[test]
    fn parses_fields_and_a_file_with_crlf_and_boundary_lookalikes_in_data() {
        let parts = parse(OPENAI_BODY, "XyZ").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "model");
        assert_eq!(parts[0].text().unwrap(), "whisper-1");
        assert!(!parts[0].is_file());
        assert_eq!(parts[1].name, "file");
        assert_eq!(parts[1].filename.as_deref(), Some("a.wav"));
        assert_eq!(parts[1].content_type.as_deref(), Some("audio/wav"));
        assert_eq!(parts[1].data, b"RIFF\r\n--XyY\r\n-XyZ a--XyZ");
        // A line that starts with the delimiter but goes on is not data (RFC 2046
        // forbids the boundary inside a part): it is a broken delimiter.
        let clash = b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n--bb\r\n--b--";
        assert!(matches!(
            parse(clash, "b"),
            Err(MultipartError::MalformedDelimiter)
        ));
    }

    #[test]
    fn same_result_when_the_body_trickles_in() {
        for step in [1, 2, 3, 7] {
            let reader = Trickle(Cursor::new(OPENAI_BODY.to_vec()), step);
            let parts = parse_multipart(reader, "XyZ", &MultipartLimits::default()).unwrap();
            assert_eq!(parts, parse(OPENAI_BODY, "XyZ").unwrap(), "step {step}");
        }
    }

    #[test]
    fn quoted_boundary_preamble_epilogue_and_padding() {
        let ct = "multipart/form-data; boundary=\"b ound\"";
        let boundary = boundary_from_content_type(ct).unwrap();
        let body = b"This is the preamble.\r\nIt is ignored.\r\n--b ound \t\r\n\
            content-disposition: Form-Data; name=language\r\n\r\n\
            ru\r\n--b ound--\r\nThis is the epilogue, also ignored.\r\n--b ound\r\ngarbage";
        let parts = parse(body, &boundary).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].name, "language");
        assert_eq!(parts[0].text().unwrap(), "ru");
    }

    #[test]
    fn empty_form_and_empty_part() {
        assert!(parse(b"--b--\r\n", "b").unwrap().is_empty());
        let parts = parse(
            b"--b\r\nContent-Disposition: form-data; name=\"p\"\r\n\r\n\r\n--b--",
            "b",
        )
        .unwrap();
        assert_eq!(parts[0].data, b"");
    }

    #[test]
    fn filename_forms() {
        let body = b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a \\\"q\\\".wav\"; filename*=UTF-8''%D0%B7%D0%B0%D0%BF%D0%B8%D1%81%D1%8C.wav\r\n\r\nx\r\n--b--";
        let parts = parse(body, "b").unwrap();
        assert_eq!(parts[0].filename.as_deref(), Some("запись.wav"));
        let body = b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a \\\"q\\\".wav\"\r\n\r\nx\r\n--b--";
        assert_eq!(
            parse(body, "b").unwrap()[0].filename.as_deref(),
            Some("a \"q\".wav")
        );
    }

    #[test]
    fn missing_closing_boundary_is_unexpected_end() {
        for body in [
            &b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue"[..],
            b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue\r\n--b",
            b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n",
            b"no boundary at all",
            b"",
        ] {
            let e = parse(body, "b").unwrap_err();
            assert!(matches!(e, MultipartError::UnexpectedEnd), "{e:?}");
            assert_eq!(e.status().as_u16(), 400);
        }
    }

    #[test]
    fn header_errors() {
        let cases: [(&[u8], &str); 9] = [
            (b"--b\r\n\r\ndata\r\n--b--", "MissingDisposition"),
            (b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--", "MissingDisposition"),
            (b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--", "MissingName"),
            (b"--b\r\nContent-Disposition: form-data; filename=\"a\"\r\n\r\nx\r\n--b--", "MissingName"),
            (b"--b\r\nContent-Disposition: attachment; name=\"a\"\r\n\r\nx\r\n--b--", "MalformedPartHeaders"),
            (b"--b\r\nContent-Disposition: form-data; name=\"a\"; name=\"b\"\r\n\r\nx\r\n--b--", "MalformedPartHeaders"),
            (b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\nBad Header\r\n\r\nx\r\n--b--", "MalformedPartHeaders"),
            (b"--bX\r\n", "MalformedDelimiter"),
            (b"--b  x\r\n", "MalformedDelimiter"),
        ];
        for (body, expected) in cases {
            let e = parse(body, "b").unwrap_err();
            assert_eq!(
                format!("{e:?}"),
                expected,
                "{:?}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(e.status().as_u16(), 400);
        }
    }

    #[test]
    fn oversized_part_headers_are_refused() {
        let body = format!(
            "--b\r\nContent-Disposition: form-data; name=\"a\"\r\nX-Pad: {}\r\n\r\nx\r\n--b--",
            "p".repeat(MAX_PART_HEADER_BYTES)
        );
        assert!(matches!(
            parse(body.as_bytes(), "b"),
            Err(MultipartError::MalformedPartHeaders)
        ));
    }

    #[test]
    fn oversized_field_and_file_are_413() {
        let field = format!(
            "--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n{}\r\n--b--",
            "x".repeat(MAX_FIELD_BYTES + 1)
        );
        let e = parse(field.as_bytes(), "b").unwrap_err();
        assert!(matches!(&e, MultipartError::PartTooLarge { name, .. } if name == "prompt"));
        assert_eq!(e.status().as_u16(), 413);

        let limits = MultipartLimits {
            max_file_bytes: 10,
            ..MultipartLimits::default()
        };
        let file = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n0123456789A\r\n--b--";
        let e = parse_multipart(Cursor::new(file.to_vec()), "b", &limits).unwrap_err();
        assert!(matches!(
            e,
            MultipartError::PartTooLarge {
                limit_bytes: 10,
                ..
            }
        ));
        let exact = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n0123456789\r\n--b--";
        assert_eq!(
            parse_multipart(Cursor::new(exact.to_vec()), "b", &limits).unwrap()[0]
                .data
                .len(),
            10
        );
    }

    #[test]
    fn total_cap_and_body_reader_limit_are_413() {
        let limits = MultipartLimits {
            max_total_bytes: 20,
            ..MultipartLimits::default()
        };
        let e = parse_multipart(Cursor::new(OPENAI_BODY.to_vec()), "XyZ", &limits).unwrap_err();
        assert!(matches!(e, MultipartError::TooLarge { limit_bytes: 20 }));

        let chunked = format!("{:x}\r\n", OPENAI_BODY.len()).into_bytes();
        let mut wire = chunked;
        wire.extend_from_slice(OPENAI_BODY);
        wire.extend_from_slice(b"\r\n0\r\n\r\n");
        let mut stream = Cursor::new(wire);
        let body = BodyReader::new(&mut stream, BodyFraming::Chunked, 50).unwrap();
        let e = parse_multipart(body, "XyZ", &MultipartLimits::default()).unwrap_err();
        assert!(matches!(
            e,
            MultipartError::Body(HttpError::PayloadTooLarge { limit_bytes: 50 })
        ));
        assert_eq!(e.status().as_u16(), 413);
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn too_many_parts_and_files() {
        let mut body = Vec::new();
        for i in 0..=MAX_PARTS {
            body.extend_from_slice(
                format!("--b\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nv\r\n")
                    .as_bytes(),
            );
        }
        body.extend_from_slice(b"--b--");
        let e = parse(&body, "b").unwrap_err();
        assert!(matches!(
            e,
            MultipartError::TooManyParts { limit: MAX_PARTS }
        ));

        let two_files =
            b"--b\r\nContent-Disposition: form-data; name=\"a\"; filename=\"1\"\r\n\r\nx\r\n\
            --b\r\nContent-Disposition: form-data; name=\"b\"; filename=\"2\"\r\n\r\ny\r\n--b--";
        assert!(matches!(
            parse(two_files, "b"),
            Err(MultipartError::TooManyFiles { limit: 1 })
        ));
    }

    #[test]
    fn preamble_cap() {
        let body = vec![b'p'; MAX_PREAMBLE_BYTES + 100 + READ_CHUNK_BYTES];
        assert!(matches!(
            parse(&body, "b"),
            Err(MultipartError::PreambleTooLarge)
        ));
    }

    #[test]
    fn invalid_utf8_field_is_reported_by_text() {
        let parts = parse(
            b"--b\r\nContent-Disposition: form-data; name=\"t\"\r\n\r\n\xff\r\n--b--",
            "b",
        )
        .unwrap();
        assert!(matches!(
            parts[0].text(),
            Err(MultipartError::InvalidUtf8 { .. })
        ));
    }
}
