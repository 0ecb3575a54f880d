use super::*;
use crate::http::request::{Limits, read_head};
use std::io::{BufReader, Cursor};

fn request(head: &str) -> Request {
    read_head(
        &mut Cursor::new(head.as_bytes().to_vec()),
        &Limits::default(),
    )
    .unwrap()
}

fn framing(headers: &str) -> Result<BodyFraming, HttpError> {
    BodyFraming::from_request(&request(&format!(
        "POST / HTTP/1.1\r\nHost: h\r\n{headers}\r\n"
    )))
}

fn read_all(
    body: &[u8],
    framing: BodyFraming,
    limit_bytes: u64,
) -> (Result<Vec<u8>, HttpError>, Vec<u8>) {
    let mut stream = Cursor::new(body.to_vec());
    let result = BodyReader::new(&mut stream, framing, limit_bytes).and_then(|mut reader| {
        let mut out = Vec::new();
        reader.read_to_end(&mut out).map_err(HttpError::from)?;
        Ok(out)
    });
    let position = stream.position() as usize;
    (result, body[position..].to_vec())
}

#[test]
fn framing_rules() {
    assert_eq!(framing("").unwrap(), BodyFraming::Empty);
    assert_eq!(
        framing("Content-Length: 12\r\n").unwrap(),
        BodyFraming::Length(12)
    );
    assert_eq!(
        framing("Content-Length: 5\r\nContent-Length: 5, 5\r\n").unwrap(),
        BodyFraming::Length(5)
    );
    assert_eq!(
        framing("Transfer-Encoding: Chunked\r\n").unwrap(),
        BodyFraming::Chunked
    );
    for bad in [
        "Content-Length: -1\r\n",
        "Content-Length: +1\r\n",
        "Content-Length: 1 2\r\n",
        "Content-Length: 0x10\r\n",
        "Content-Length: 99999999999999999999\r\n",
        "Content-Length: 1\r\nContent-Length: 2\r\n",
        "Content-Length: \r\n",
    ] {
        assert!(
            matches!(framing(bad), Err(HttpError::InvalidContentLength)),
            "{bad}"
        );
    }
}

#[test]
fn content_length_with_transfer_encoding_is_400() {
    let e = framing("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n").unwrap_err();
    assert!(matches!(e, HttpError::ConflictingFraming));
    assert_eq!(e.status().as_u16(), 400);
}

#[test]
fn transfer_encoding_rules() {
    let e = framing("Transfer-Encoding: gzip, chunked\r\n").unwrap_err();
    assert_eq!(e.status().as_u16(), 501);
    for bad in [
        "Transfer-Encoding: chunked, gzip\r\n",
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: identity\r\n",
        "Transfer-Encoding: \r\n",
    ] {
        assert_eq!(framing(bad).unwrap_err().status().as_u16(), 400, "{bad}");
    }
    let old = request("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert!(matches!(
        BodyFraming::from_request(&old),
        Err(HttpError::InvalidTransferEncoding)
    ));
}

#[test]
fn content_length_body_is_exact_and_leaves_the_rest() {
    let (body, rest) = read_all(b"hello worldGET /next", BodyFraming::Length(11), 100);
    assert_eq!(body.unwrap(), b"hello world");
    assert_eq!(rest, b"GET /next");
}

#[test]
fn declared_length_over_limit_is_413_before_reading() {
    let mut stream = Cursor::new(b"0123456789".to_vec());
    let e = BodyReader::new(&mut stream, BodyFraming::Length(10), 9).unwrap_err();
    assert!(matches!(e, HttpError::PayloadTooLarge { limit_bytes: 9 }));
    assert_eq!(e.status().as_u16(), 413);
    assert_eq!(stream.position(), 0);
    assert!(BodyFraming::Length(9).check_declared_length(9).is_ok());
}

#[test]
fn short_content_length_body_is_incomplete() {
    let (body, _) = read_all(b"abc", BodyFraming::Length(5), 100);
    assert!(matches!(body, Err(HttpError::BodyIncomplete)));
}

#[test]
fn drain_discards_the_rest_for_keep_alive() {
    let mut stream = BufReader::new(Cursor::new(b"abcdefNEXT".to_vec()));
    let mut reader = BodyReader::new(&mut stream, BodyFraming::Length(6), 100).unwrap();
    let mut two = [0u8; 2];
    reader.read_exact(&mut two).unwrap();
    assert_eq!(reader.drain().unwrap(), 4);
    assert!(reader.is_finished());
    assert_eq!(reader.read_bytes(), 6);
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "NEXT");
}

#[test]
fn chunked_with_extensions_and_trailers() {
    let wire = b"4;name=\"va;l\"\r\nWiki\r\n5 ; x\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0;last\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\nNEXT";
    let (body, rest) = read_all(wire, BodyFraming::Chunked, 1000);
    assert_eq!(body.unwrap(), b"Wikipedia in\r\n\r\nchunks.");
    assert_eq!(rest, b"NEXT");
}

#[test]
fn chunked_one_byte_at_a_time() {
    struct OneByte(Cursor<Vec<u8>>);
    impl Read for OneByte {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(1);
            self.0.read(&mut buf[..n])
        }
    }
    let wire = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n".to_vec();
    let mut stream = BufReader::with_capacity(1, OneByte(Cursor::new(wire)));
    let mut reader = BodyReader::new(&mut stream, BodyFraming::Chunked, 100).unwrap();
    let mut out = Vec::new();
    reader.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"abcde");
}

#[test]
fn chunked_over_limit_fails_at_the_chunk_that_crosses_it() {
    let wire = b"5\r\nabcde\r\n5\r\nfghij\r\n0\r\n\r\n";
    let mut stream = Cursor::new(wire.to_vec());
    let mut reader = BodyReader::new(&mut stream, BodyFraming::Chunked, 8).unwrap();
    let mut first = [0u8; 5];
    reader.read_exact(&mut first).unwrap();
    let e = HttpError::from(reader.read(&mut [0u8; 16]).unwrap_err());
    assert!(matches!(e, HttpError::PayloadTooLarge { limit_bytes: 8 }));
    // The second chunk's data was never read.
    assert_eq!(stream.position(), 13);
    let (body, _) = read_all(b"ffffffffffffffff\r\n", BodyFraming::Chunked, 8);
    assert_eq!(body.unwrap_err().status().as_u16(), 413);
}

#[test]
fn malformed_chunks_are_400() {
    for bad in [
        &b"x\r\nabc\r\n0\r\n\r\n"[..],
        b"3\nabc\r\n0\r\n\r\n",
        b"3\r\nabcd\r\n0\r\n\r\n",
        b"-3\r\nabc\r\n0\r\n\r\n",
        b" 3\r\nabc\r\n0\r\n\r\n",
        b"10000000000000000\r\n",
        b"3;a\x01b\r\nabc\r\n0\r\n\r\n",
        b"0\r\nno colon\r\n\r\n",
        b"3\r\nabc\r\n0\r\n",
        b"3\r\nab",
    ] {
        let (body, _) = read_all(bad, BodyFraming::Chunked, 1000);
        let e = body.unwrap_err();
        assert_eq!(
            e.status().as_u16(),
            400,
            "{:?} -> {e:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let long = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_LINE_BYTES));
    let (body, _) = read_all(long.as_bytes(), BodyFraming::Chunked, 1000);
    assert!(matches!(body, Err(HttpError::MalformedChunk(_))));
}

#[test]
fn keep_alive_sequence_head_chunked_body_head() {
    let wire = b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
        2\r\nhi\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n";
    let mut stream = BufReader::new(Cursor::new(wire.to_vec()));
    let first = read_head(&mut stream, &Limits::default()).unwrap();
    let mut body = BodyReader::for_request(&first, &mut stream, 100).unwrap();
    let mut bytes = Vec::new();
    body.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes, b"hi");
    assert!(body.is_finished());
    let second = read_head(&mut stream, &Limits::default()).unwrap();
    assert_eq!(second.path, "/b");
}

#[test]
fn empty_and_zero_length_bodies_read_nothing() {
    let (body, rest) = read_all(b"GET", BodyFraming::Empty, 0);
    assert!(body.unwrap().is_empty());
    assert_eq!(rest, b"GET");
    let (body, _) = read_all(b"", BodyFraming::Length(0), 0);
    assert!(body.unwrap().is_empty());
}
