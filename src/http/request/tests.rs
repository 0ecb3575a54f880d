use super::*;
use crate::http::StatusCode;
use std::io::{BufReader, Cursor, Read};

fn parse(bytes: &[u8]) -> Result<Request, HttpError> {
    read_head(&mut Cursor::new(bytes.to_vec()), &Limits::default())
}

/// A reader that hands out one byte per `read`, like a slow client.
struct OneByteAtATime(Cursor<Vec<u8>>);
impl Read for OneByteAtATime {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(1);
        self.0.read(&mut buf[..n])
    }
}

#[test]
fn parses_a_simple_get_with_query() {
    let req = parse(
        b"GET /v1/transcribe?format=srt&x=a+b%21&flag HTTP/1.1\r\nHost: h\r\nX-Y:  z \r\n\r\n",
    )
    .unwrap();
    assert_eq!(req.method, "GET");
    assert_eq!(req.path, "/v1/transcribe");
    assert_eq!(req.version, Version::Http11);
    assert_eq!(req.query_param("format"), Some("srt"));
    assert_eq!(req.query_param("x"), Some("a b!"));
    assert_eq!(req.query_param("flag"), Some(""));
    assert_eq!(req.header("x-y"), Some("z"));
    assert_eq!(req.header("HOST"), Some("h"));
    assert!(req.wants_keep_alive());
}

#[test]
fn query_decoding_keeps_bad_escapes_and_handles_utf8() {
    assert_eq!(decode_component("%D0%BF%D1%80%2"), "пр%2");
    assert_eq!(decode_component("100%zz"), "100%zz");
    assert_eq!(decode_component("%FF"), "\u{FFFD}");
    let pairs = parse_query("a=1&&b=%3D=&timestamp_granularities%5B%5D=word");
    assert_eq!(
        pairs,
        vec![
            ("a".into(), "1".into()),
            ("b".into(), "==".into()),
            ("timestamp_granularities[]".into(), "word".into())
        ]
    );
}

#[test]
fn pipelined_requests_leave_the_second_one_readable() {
    let bytes =
        b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\nrest".to_vec();
    let mut reader = BufReader::new(Cursor::new(bytes));
    let first = read_head(&mut reader, &Limits::default()).unwrap();
    let second = read_head(&mut reader, &Limits::default()).unwrap();
    assert_eq!((first.path.as_str(), second.path.as_str()), ("/a", "/b"));
    let mut leftover = String::new();
    reader.read_to_string(&mut leftover).unwrap();
    assert_eq!(leftover, "rest");
}

#[test]
fn slow_client_one_byte_per_read() {
    let bytes = b"\r\nPOST /x HTTP/1.0\r\nContent-Length: 2\r\n\r\nab".to_vec();
    let mut reader = BufReader::new(OneByteAtATime(Cursor::new(bytes)));
    let req = read_head(&mut reader, &Limits::default()).unwrap();
    assert_eq!(req.method, "POST");
    assert_eq!(req.version, Version::Http10);
    assert!(!req.wants_keep_alive());
    let mut body = String::new();
    reader.read_to_string(&mut body).unwrap();
    assert_eq!(body, "ab");
}

#[test]
fn bare_lf_heads_are_accepted() {
    let req = parse(b"GET / HTTP/1.1\nHost: h\n\n").unwrap();
    assert_eq!(req.path, "/");
}

#[test]
fn clean_eof_is_connection_closed_and_mid_head_eof_is_400() {
    assert!(matches!(parse(b""), Err(HttpError::ConnectionClosed)));
    let e = parse(b"GET / HTTP/1.1\r\nHost").unwrap_err();
    assert_eq!(e.status(), StatusCode::BAD_REQUEST);
}

#[test]
fn oversized_head_is_431() {
    let mut bytes = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
    for i in 0..20 {
        bytes.extend_from_slice(format!("X-Pad-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    bytes.extend_from_slice(b"\r\n");
    let e = parse(&bytes).unwrap_err();
    assert!(matches!(e, HttpError::HeadTooLarge { .. }));
    assert_eq!(e.status().as_u16(), 431);
}

#[test]
fn oversized_head_stops_reading_at_the_cap() {
    let mut bytes = b"GET / HTTP/1.1\r\nX: ".to_vec();
    bytes.extend(std::iter::repeat_n(b'a', 100 * 1024));
    let mut cursor = Cursor::new(bytes);
    let e = read_head(&mut cursor, &Limits::default()).unwrap_err();
    assert!(matches!(e, HttpError::HeadTooLarge { .. }));
    assert!(cursor.position() <= (MAX_HEAD_BYTES + 1) as u64);
}

#[test]
fn too_many_headers_is_431() {
    let mut bytes = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
    for i in 0..MAX_HEADERS {
        bytes.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    bytes.extend_from_slice(b"\r\n");
    let e = parse(&bytes).unwrap_err();
    assert!(matches!(
        e,
        HttpError::TooManyHeaders { limit: MAX_HEADERS }
    ));
    assert_eq!(e.status().as_u16(), 431);
}

#[test]
fn long_request_line_is_414() {
    let target = "/".to_owned() + &"a".repeat(MAX_REQUEST_LINE_BYTES);
    let e = parse(format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes()).unwrap_err();
    assert!(matches!(e, HttpError::RequestLineTooLong { .. }));
    assert_eq!(e.status().as_u16(), 414);
}

#[test]
fn bad_syntax_is_400() {
    for bad in [
        &b"GET\r\n\r\n"[..],
        b"GET / HTTP/1.1 extra\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header: v\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",
        b"GET / FTP/1.1\r\nHost: h\r\n\r\n",
        b"GET relative HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n",
        b"\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
    ] {
        let e = parse(bad).unwrap_err();
        assert_eq!(
            e.status().as_u16(),
            400,
            "{:?} -> {e:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn other_versions_are_505() {
    for bad in [
        &b"GET / HTTP/2.0\r\n\r\n"[..],
        b"GET / HTTP/0.9\r\n\r\n",
        b"GET / HTTP/3\r\n\r\n",
    ] {
        let e = parse(bad).unwrap_err();
        assert!(matches!(e, HttpError::UnsupportedVersion(_)), "{e:?}");
        assert_eq!(e.status().as_u16(), 505);
    }
}

#[test]
fn http10_needs_no_host() {
    let req = parse(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
    assert!(req.wants_keep_alive());
}

#[test]
fn options_star_and_absolute_form() {
    let req = parse(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    assert_eq!(req.path, "*");
    let req = parse(b"GET http://h:1/v1/models?a=b HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    assert_eq!(req.path, "/v1/models");
    assert_eq!(req.query_param("a"), Some("b"));
    let req = parse(b"GET HTTP://h?a=b HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    assert_eq!(req.path, "/");
    assert_eq!(req.query_param("a"), Some("b"));
}

#[test]
fn keep_alive_rules() {
    let req = parse(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: foo, Close\r\n\r\n").unwrap();
    assert!(!req.wants_keep_alive());
    let req = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(!req.wants_keep_alive());
}

#[test]
fn h2_preface_is_detected() {
    let mut cursor = Cursor::new(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00".to_vec());
    let e = read_head(&mut cursor, &Limits::default()).unwrap_err();
    assert!(matches!(e, HttpError::Http2Preface));
    // A PRI line that is not the preface is just another unsupported version.
    let e = parse(b"PRI / HTTP/2.0\r\n\r\n").unwrap_err();
    assert!(matches!(e, HttpError::UnsupportedVersion(_)));
}

#[test]
fn goaway_bytes_are_exact() {
    assert_eq!(
        h2_goaway_http11_required(),
        vec![
            0, 0, 0, 4, 0, 0, 0, 0, 0, // SETTINGS, empty
            0, 0, 8, 7, 0, 0, 0, 0, 0, // GOAWAY header, 8-byte payload
            0, 0, 0, 0, // last stream id 0
            0, 0, 0, 0x0d, // HTTP_1_1_REQUIRED
        ]
    );
}

#[test]
fn expect_100_continue() {
    let req = parse(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\n\r\n").unwrap();
    assert!(req.needs_continue());
    let req = parse(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").unwrap();
    assert!(!req.needs_continue());
    let req = parse(b"POST / HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    assert!(!req.needs_continue());
}

const WS_HEAD: &str = "GET /v1/ws HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\n\
    Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

#[test]
fn websocket_upgrade_detection() {
    assert!(parse(WS_HEAD.as_bytes()).unwrap().is_websocket_upgrade());
    let cases = [
        WS_HEAD.replace("GET", "POST"),
        WS_HEAD.replace("HTTP/1.1", "HTTP/1.0"),
        WS_HEAD.replace("Upgrade: WebSocket", "Upgrade: h2c"),
        WS_HEAD.replace("keep-alive, Upgrade", "keep-alive"),
        WS_HEAD.replace("Version: 13", "Version: 8"),
        WS_HEAD.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
    ];
    for case in cases {
        let req = parse(case.as_bytes()).unwrap();
        assert!(!req.is_websocket_upgrade(), "{case}");
    }
}

#[test]
fn websocket_frames_after_the_head_stay_in_the_reader() {
    let mut bytes = WS_HEAD.as_bytes().to_vec();
    bytes.extend_from_slice(&[0x81, 0x85, 1, 2, 3, 4]);
    let mut reader = BufReader::new(Cursor::new(bytes));
    let req = read_head(&mut reader, &Limits::default()).unwrap();
    assert!(req.is_websocket_upgrade());
    assert_eq!(reader.buffer(), &[0x81, 0x85, 1, 2, 3, 4]);
}

#[test]
fn head_deadline_counts_from_first_byte() {
    let limits = Limits {
        head_deadline: Duration::ZERO,
        ..Limits::default()
    };
    let mut reader = BufReader::new(OneByteAtATime(Cursor::new(
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\n".to_vec(),
    )));
    let e = read_head(&mut reader, &limits).unwrap_err();
    assert!(matches!(e, HttpError::HeadTimeout));
    assert_eq!(e.status().as_u16(), 408);
}

#[test]
fn socket_timeout_mid_head_is_408() {
    struct Stalls(Cursor<Vec<u8>>);
    impl Read for Stalls {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.read(buf)? {
                0 => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(n),
            }
        }
    }
    let mut reader = BufReader::new(Stalls(Cursor::new(b"GET / HT".to_vec())));
    let e = read_head(&mut reader, &Limits::default()).unwrap_err();
    assert!(matches!(e, HttpError::HeadTimeout));
    let mut idle = BufReader::new(Stalls(Cursor::new(Vec::new())));
    let e = read_head(&mut idle, &Limits::default()).unwrap_err();
    assert!(
        matches!(e, HttpError::Io(_)),
        "idle keep-alive timeout stays an I/O error"
    );
}
