use super::*;
use std::time::Duration;

fn written(response: &Response, keep_alive: bool) -> String {
    let mut out = Vec::new();
    response.write_to(&mut out, keep_alive).unwrap();
    String::from_utf8(out).unwrap()
}

/// Drops the `Date` line, which changes every second.
fn without_date(text: &str) -> String {
    text.split("\r\n")
        .filter(|line| !line.starts_with("Date: "))
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[test]
fn every_code_we_send_has_its_reason() {
    let codes = [
        (100, "Continue"),
        (101, "Switching Protocols"),
        (200, "OK"),
        (204, "No Content"),
        (400, "Bad Request"),
        (401, "Unauthorized"),
        (403, "Forbidden"),
        (404, "Not Found"),
        (405, "Method Not Allowed"),
        (408, "Request Timeout"),
        (413, "Payload Too Large"),
        (414, "URI Too Long"),
        (415, "Unsupported Media Type"),
        (429, "Too Many Requests"),
        (431, "Request Header Fields Too Large"),
        (500, "Internal Server Error"),
        (501, "Not Implemented"),
        (503, "Service Unavailable"),
        (505, "HTTP Version Not Supported"),
    ];
    for (code, reason) in codes {
        assert_eq!(StatusCode(code).reason(), reason);
    }
    assert_eq!(StatusCode(418).reason(), "Client Error");
    assert_eq!(StatusCode::NOT_FOUND.to_string(), "404 Not Found");
}

#[test]
fn json_response_is_framed() {
    let response = Response::json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
        .with_header("Retry-After", "1");
    let text = written(&response, true);
    assert!(text.contains("Date: "));
    assert_eq!(
        without_date(&text),
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nRetry-After: 1\r\n\
         Content-Length: 15\r\nConnection: keep-alive\r\n\r\n{\"status\":\"ok\"}"
    );
}

#[test]
fn close_and_text_and_content_type_override() {
    let response =
        Response::text(StatusCode::NOT_FOUND, "не найдено").with_header("content-type", "text/vtt");
    let text = written(&response, false);
    assert!(text.starts_with("HTTP/1.1 404 Not Found\r\ncontent-type: text/vtt\r\n"));
    assert!(text.contains("Content-Length: 19\r\nConnection: close\r\n"));
    assert!(text.ends_with("\r\n\r\nне найдено"));
}

#[test]
fn framing_headers_from_callers_are_ignored() {
    let response = Response::text(StatusCode::OK, "abc")
        .with_header("Content-Length", "999")
        .with_header("Transfer-Encoding", "chunked");
    let text = written(&response, true);
    assert!(!text.contains("999") && !text.contains("chunked"));
    assert!(text.contains("Content-Length: 3\r\n"));
}

#[test]
fn header_injection_is_neutralised() {
    let response = Response::empty(StatusCode::OK)
        .with_header("X-Evil", "a\r\nSet-Cookie: x=1")
        .with_header("Bad Name", "v")
        .with_header("X\r\nY", "v");
    let text = written(&response, true);
    assert!(text.contains("X-Evil: a  Set-Cookie: x=1\r\n"));
    assert!(!text.contains("Bad Name") && !text.contains("\r\nY"));
}

#[test]
fn bodyless_statuses_have_no_length() {
    let text = written(&Response::empty(StatusCode::NO_CONTENT), true);
    assert!(!text.contains("Content-Length"));
    let text = written(
        &Response::websocket_accept("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        true,
    );
    assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
    assert!(text.contains("Upgrade: websocket\r\nConnection: Upgrade\r\n"));
    assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    assert!(!text.contains("Content-Length") && !text.contains("keep-alive"));
}

#[test]
fn head_response_has_length_but_no_body() {
    let mut out = Vec::new();
    Response::text(StatusCode::OK, "abc")
        .write_head_to(&mut out, true)
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("Content-Length: 3\r\n"));
    assert!(text.ends_with("\r\n\r\n"));
}

#[test]
fn continue_bytes() {
    let mut out = Vec::new();
    write_continue(&mut out).unwrap();
    assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");
}

#[test]
fn dates_are_imf_fixdate() {
    assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
    let rfc_example = UNIX_EPOCH + Duration::from_secs(784_111_777);
    assert_eq!(http_date(rfc_example), "Sun, 06 Nov 1994 08:49:37 GMT");
    let leap_day = UNIX_EPOCH + Duration::from_secs(951_782_400);
    assert_eq!(http_date(leap_day), "Tue, 29 Feb 2000 00:00:00 GMT");
    let later = UNIX_EPOCH + Duration::from_secs(1_767_225_599);
    assert_eq!(http_date(later), "Wed, 31 Dec 2025 23:59:59 GMT");
}

#[test]
fn sse_stream() {
    let cors = vec![
        ("Access-Control-Allow-Origin".to_owned(), "*".to_owned()),
        ("Content-Length".to_owned(), "5".to_owned()),
    ];
    let mut sse = SseWriter::start(Vec::new(), &cors).unwrap();
    sse.event("{\"type\":\"partial\"}").unwrap();
    sse.event("line one\nline two\r\nthree\rfour").unwrap();
    sse.event_named("done\n", "").unwrap();
    sse.comment("keep-alive").unwrap();
    let text = String::from_utf8(sse.into_inner()).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert_eq!(
        without_date(head),
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
         X-Accel-Buffering: no\r\nConnection: close\r\nAccess-Control-Allow-Origin: *"
    );
    assert_eq!(
        body,
        "data: {\"type\":\"partial\"}\n\n\
         data: line one\ndata: line two\ndata: three\ndata: four\n\n\
         event: done \ndata: \n\n\
         : keep-alive\n\n"
    );
}
