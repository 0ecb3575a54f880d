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
        (
            b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--",
            "MissingDisposition",
        ),
        (
            b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--",
            "MissingName",
        ),
        (
            b"--b\r\nContent-Disposition: form-data; filename=\"a\"\r\n\r\nx\r\n--b--",
            "MissingName",
        ),
        (
            b"--b\r\nContent-Disposition: attachment; name=\"a\"\r\n\r\nx\r\n--b--",
            "MalformedPartHeaders",
        ),
        (
            b"--b\r\nContent-Disposition: form-data; name=\"a\"; name=\"b\"\r\n\r\nx\r\n--b--",
            "MalformedPartHeaders",
        ),
        (
            b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\nBad Header\r\n\r\nx\r\n--b--",
            "MalformedPartHeaders",
        ),
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
            format!("--b\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nv\r\n").as_bytes(),
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
