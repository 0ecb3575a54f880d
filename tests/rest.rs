//! The REST surface of the real binary on a real socket: endpoints, formats,
//! body framing (Content-Length, chunked, `Expect: 100-continue`, keep-alive),
//! the guards (origin, rate limit, bind), the pool's 503, shutdown drain, the
//! HTTP/2-preface refusal and a slowloris swarm.
//!
//! Every test starts its own `gigastt serve --port 0` with the tiny model at
//! fp32 (tests/support), so tests are independent and run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::{
    HttpResponse, Server, base_serve_args, connect, fixture_bytes, golden_text, golos_names,
    read_one, read_response, request_head, thread_count,
};

fn golos(name: &str) -> Vec<u8> {
    fixture_bytes(&format!("golos/{name}.wav"))
}

fn assert_json_error(r: &HttpResponse, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert!(
        r.header("Content-Type")
            .unwrap_or_default()
            .starts_with("application/json"),
        "error without JSON content type: {:?}",
        r.headers
    );
    let json = r.json();
    assert!(
        json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{json}"
    );
    if !code.is_empty() {
        assert_eq!(json["code"], code, "{json}");
    }
}

fn retry_after_secs(r: &HttpResponse) -> u64 {
    r.header("Retry-After")
        .unwrap_or_else(|| panic!("no Retry-After on {}: {:?}", r.status, r.headers))
        .trim()
        .parse()
        .expect("Retry-After in whole seconds")
}

// ---------------------------------------------------------------- endpoints

#[test]
fn health_ready_and_models() {
    let server = Server::start(&[]);
    let health = server.get("/health");
    assert_eq!(health.status, 200);
    let json = health.json();
    assert_eq!(json["status"], "ok");
    assert!(
        json["model"].is_string() && json["version"].is_string(),
        "{json}"
    );

    let ready = server.get("/ready");
    assert_eq!(ready.status, 200);
    let json = ready.json();
    assert_eq!(json["status"], "ready");
    assert!(json["pool_total"].as_u64().unwrap() >= 1, "{json}");
    assert_eq!(json["pool_available"], json["pool_total"], "{json}");

    let models = server.get("/v1/models");
    assert_eq!(models.status, 200);
    let json = models.json();
    let model = &json["data"][0];
    assert_eq!(model["test_model"], true, "{json}");
    assert!(
        model["warning"].as_str().is_some_and(|w| !w.is_empty()),
        "a test model must carry a warning: {json}"
    );
    assert_eq!(model["sample_rate"], 16000, "{json}");
    assert_eq!(model["vocab_size"], 1025, "{json}");
    // The encoder plan names the matmul kernels tract picked.
    assert!(
        model["encoder_kernels"]
            .as_str()
            .is_some_and(|k| k.contains("mmm_") && k.contains(" x")),
        "{json}"
    );
    // And the vector build our own loops picked for this CPU.
    assert!(
        model["loop_simd"]
            .as_str()
            .is_some_and(|s| s.contains("x86-64") || s.contains("aarch64") || s == "baseline"),
        "{json}"
    );
}

/// The server turns transparent huge pages off for itself before it loads the
/// model (smaller and, into fresh memory, faster loads: docs/perf.md), and
/// says so in its startup log.
#[cfg(target_os = "linux")]
#[test]
fn the_server_runs_without_transparent_huge_pages() {
    let server = Server::start(&[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "{status}");
    assert!(
        server.log_text().contains("transparent huge pages off"),
        "{}",
        server.log_text()
    );
}

#[test]
fn transcribe_every_golos_file_gives_the_golden_text() {
    let server = Server::start(&[]);
    for name in golos_names() {
        let r = server.post("/v1/transcribe", &golos(&name));
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let json = r.json();
        assert_eq!(json["text"], golden_text(&name), "{name}");
        assert!(json["duration"].as_f64().unwrap() > 0.0);
        assert!(
            json["words"].is_array() && json["segments"].is_array(),
            "{json}"
        );
        support::assert_monotonic_words(&json);
    }
}

#[test]
fn transcribe_formats_text_srt_vtt_json() {
    let server = Server::start(&[]);
    let body = golos("golos_01");
    let expected = golden_text("golos_01");

    let text = server.post("/v1/transcribe?format=text", &body);
    assert_eq!(text.status, 200);
    assert!(
        text.header("Content-Type")
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(text.text().trim(), expected);

    let srt = server.post("/v1/transcribe?format=srt", &body);
    assert_eq!(srt.status, 200);
    let srt = srt.text();
    assert!(
        srt.starts_with("1\n") || srt.starts_with("1\r\n"),
        "{srt:?}"
    );
    assert!(srt.contains(" --> ") && srt.contains(','), "{srt:?}");
    assert_eq!(
        support::normalize(&srt.lines().skip(2).collect::<Vec<_>>().join(" ")),
        support::normalize(&expected)
    );

    let vtt = server.post("/v1/transcribe?format=vtt", &body);
    assert_eq!(vtt.status, 200);
    let vtt = vtt.text();
    assert!(vtt.starts_with("WEBVTT"), "{vtt:?}");
    assert!(support::normalize(&vtt).contains(&support::normalize(&expected)));

    let json = server.post("/v1/transcribe?format=json", &body);
    assert_eq!(json.json()["text"], expected);

    let bad = server.post("/v1/transcribe?format=xml", &body);
    assert_json_error(&bad, 400, "");
}

#[test]
fn empty_body_is_400_and_garbage_is_415_or_400() {
    let server = Server::start(&[]);
    let empty = server.post("/v1/transcribe", b"");
    assert_json_error(&empty, 400, "");

    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let r = server.post("/v1/transcribe", &garbage);
    assert!(
        r.status == 415 || r.status == 400,
        "{} {}",
        r.status,
        r.text()
    );
    assert_json_error(&r, r.status, "");

    let mut truncated = golos("golos_00");
    truncated.truncate(1000);
    let r = server.post("/v1/transcribe", &truncated);
    assert!(
        r.status == 415 || r.status == 400,
        "{} {}",
        r.status,
        r.text()
    );
    assert_json_error(&r, r.status, "");

    // Internal details never reach a client.
    for r in [&empty, &r] {
        let text = r.text();
        assert!(
            !text.contains("src/") && !text.contains("panicked"),
            "{text}"
        );
    }
}

#[test]
fn not_found_and_method_not_allowed() {
    let server = Server::start(&[]);
    let r = server.get("/no/such/route");
    assert_json_error(&r, 404, "");

    let r = server.get("/v1/transcribe");
    assert_json_error(&r, 405, "");
    assert!(
        r.header("Allow").unwrap_or_default().contains("POST"),
        "{:?}",
        r.headers
    );

    let r = server.request("DELETE", "/health", &[], &[]);
    assert_json_error(&r, 405, "");
}

#[test]
fn metrics_only_with_the_flag() {
    let plain = Server::start(&[]);
    assert_eq!(plain.get("/metrics").status, 404);
    let server = Server::start(&["--metrics"]);
    server.post("/v1/transcribe", &golos("golos_07"));
    let r = server.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("# TYPE"), "{}", r.text());
}

// ---------------------------------------------------------------- body framing

#[test]
fn body_over_the_limit_is_413() {
    let server = Server::start(&["--body-limit-bytes", "100000"]);
    let body = golos("golos_03"); // 174,158 bytes
    assert!(body.len() > 100_000);
    let r = server.post("/v1/transcribe", &body);
    assert_json_error(&r, 413, "payload_too_large");
    // Just under the limit still works.
    let r = server.post("/v1/transcribe", &golos("golos_07")); // 65,358 bytes
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["text"], golden_text("golos_07"));
}

#[test]
fn declared_length_over_the_limit_is_refused_before_the_body() {
    let server = Server::start(&["--body-limit-bytes", "100000"]);
    let mut stream = connect(server.port);
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let head = request_head("POST", "/v1/transcribe", &[], Some(10_000_000));
    stream.write_all(head.as_bytes()).unwrap();
    // No body byte is sent: the answer must come anyway.
    let started = Instant::now();
    let r = read_response(&mut BufReader::new(stream)).expect("413 without the body");
    assert_json_error(&r, 413, "payload_too_large");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn chunked_body_over_the_limit_is_413() {
    let server = Server::start(&["--body-limit-bytes", "100000"]);
    let mut stream = connect(server.port);
    let head = request_head(
        "POST",
        "/v1/transcribe",
        &[("Transfer-Encoding", "chunked")],
        None,
    );
    stream.write_all(head.as_bytes()).unwrap();
    let body = golos("golos_03");
    for chunk in body.chunks(16 * 1024) {
        if stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .and_then(|_| stream.write_all(chunk))
            .and_then(|_| stream.write_all(b"\r\n"))
            .is_err()
        {
            break; // the server may stop reading once over the limit
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let r = read_response(&mut BufReader::new(stream)).unwrap();
    assert_json_error(&r, 413, "payload_too_large");
}

#[test]
fn expect_100_continue() {
    let server = Server::start(&[]);
    let body = golos("golos_02");
    let stream = connect(server.port);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let head = request_head(
        "POST",
        "/v1/transcribe",
        &[("Expect", "100-continue")],
        Some(body.len()),
    );
    writer.write_all(head.as_bytes()).unwrap();
    let interim = read_one(&mut reader).unwrap();
    assert_eq!(interim.status, 100, "want 100 Continue before the body");
    writer.write_all(&body).unwrap();
    let r = read_response(&mut reader).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["text"], golden_text("golos_02"));
}

#[test]
fn expect_100_continue_over_the_limit_gets_413_instead_of_100() {
    let server = Server::start(&["--body-limit-bytes", "100000"]);
    let mut stream = connect(server.port);
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let head = request_head(
        "POST",
        "/v1/transcribe",
        &[("Expect", "100-continue")],
        Some(1_000_000),
    );
    stream.write_all(head.as_bytes()).unwrap();
    let r = read_one(&mut BufReader::new(stream)).unwrap();
    assert_json_error(&r, 413, "payload_too_large");
}

#[test]
fn keep_alive_serves_two_requests_on_one_connection() {
    let server = Server::start(&[]);
    let stream = connect(server.port);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for name in ["golos_05", "golos_08"] {
        let body = golos(name);
        let head = request_head(
            "POST",
            "/v1/transcribe",
            &[("Connection", "keep-alive")],
            Some(body.len()),
        );
        writer.write_all(head.as_bytes()).unwrap();
        writer.write_all(&body).unwrap();
        let r = read_response(&mut reader).unwrap();
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(r.json()["text"], golden_text(name));
    }
    // And a GET after two POSTs, still on the same socket.
    let head = request_head("GET", "/health", &[("Connection", "keep-alive")], None);
    writer.write_all(head.as_bytes()).unwrap();
    assert_eq!(read_response(&mut reader).unwrap().status, 200);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start(&[]);
    let stream = connect(server.port);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let a = golos("golos_07");
    let b = golos("golos_02");
    let mut bytes = Vec::new();
    for body in [&a, &b] {
        bytes.extend_from_slice(
            request_head(
                "POST",
                "/v1/transcribe?format=text",
                &[("Connection", "keep-alive")],
                Some(body.len()),
            )
            .as_bytes(),
        );
        bytes.extend_from_slice(body);
    }
    writer.write_all(&bytes).unwrap();
    let first = read_response(&mut reader).unwrap();
    let second = read_response(&mut reader).unwrap();
    assert_eq!(first.text().trim(), golden_text("golos_07"));
    assert_eq!(second.text().trim(), golden_text("golos_02"));
}

#[test]
fn chunked_upload() {
    let server = Server::start(&[]);
    let body = golos("golos_04");
    let stream = connect(server.port);
    let mut writer = stream.try_clone().unwrap();
    let head = request_head(
        "POST",
        "/v1/transcribe",
        &[("Transfer-Encoding", "chunked")],
        None,
    );
    writer.write_all(head.as_bytes()).unwrap();
    // Odd chunk sizes, with a chunk extension on one of them.
    let mut rest = &body[..];
    let mut i = 0;
    while !rest.is_empty() {
        let n = rest.len().min(7_777 + i * 1000);
        let ext = if i == 1 { ";name=value" } else { "" };
        writer
            .write_all(format!("{n:X}{ext}\r\n").as_bytes())
            .unwrap();
        writer.write_all(&rest[..n]).unwrap();
        writer.write_all(b"\r\n").unwrap();
        rest = &rest[n..];
        i += 1;
    }
    writer.write_all(b"0\r\n\r\n").unwrap();
    let r = read_response(&mut BufReader::new(stream)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["text"], golden_text("golos_04"));
}

// ---------------------------------------------------------------- origin, CORS

#[test]
fn foreign_origin_is_denied_before_the_body_is_read() {
    let server = Server::start(&[]);
    let mut stream = connect(server.port);
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // 40 MB declared (under the 50 MiB default limit), none sent.
    let head = request_head(
        "POST",
        "/v1/transcribe",
        &[("Origin", "https://evil.example")],
        Some(40_000_000),
    );
    stream.write_all(head.as_bytes()).unwrap();
    let started = Instant::now();
    let r = read_response(&mut BufReader::new(stream)).expect("403 without the body");
    assert_json_error(&r, 403, "origin_denied");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        r.header("Access-Control-Allow-Origin").is_none(),
        "denied origin got CORS headers: {:?}",
        r.headers
    );
    // /health is exempt.
    let r = server.request("GET", "/health", &[("Origin", "https://evil.example")], &[]);
    assert_eq!(r.status, 200);
}

#[test]
fn early_refusals_close_the_connection_and_say_so() {
    // A response sent before the body was read cannot be followed by another
    // request on the same socket (the unread body is in the way), so the
    // server must say `Connection: close` (RFC 9112 9.6) and close.
    let server = Server::start(&["--body-limit-bytes", "100000"]);
    for (headers, length, status) in [
        (
            vec![
                ("Origin", "https://evil.example"),
                ("Connection", "keep-alive"),
            ],
            1000,
            403,
        ),
        (vec![("Connection", "keep-alive")], 1_000_000, 413),
    ] {
        let mut stream = connect(server.port);
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let head = request_head("POST", "/v1/transcribe", &headers, Some(length));
        stream.write_all(head.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let r = read_response(&mut reader).unwrap();
        assert_eq!(r.status, status);
        let mut rest = Vec::new();
        let closed = matches!(reader.read_to_end(&mut rest), Ok(0));
        assert!(
            closed,
            "{status}: connection left open after an early refusal"
        );
        assert_eq!(
            r.header("Connection")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("close"),
            "{status}: early refusal closes the connection but announces {:?}",
            r.header("Connection")
        );
    }
}

#[test]
fn allowed_and_loopback_origins_get_cors_headers() {
    let server = Server::start(&["--allow-origin", "https://app.example"]);
    let body = golos("golos_09");
    for origin in [
        "https://app.example",
        "http://127.0.0.1:3000",
        "http://localhost:8080",
    ] {
        let r = server.request("POST", "/v1/transcribe", &[("Origin", origin)], &body);
        assert_eq!(r.status, 200, "{origin}: {}", r.text());
        assert_eq!(r.json()["text"], golden_text("golos_09"));
        assert_eq!(
            r.header("Access-Control-Allow-Origin"),
            Some(origin),
            "{:?}",
            r.headers
        );
        assert!(
            r.header("Vary").unwrap_or_default().contains("Origin"),
            "{origin}: no Vary: Origin {:?}",
            r.headers
        );
    }
    let r = server.request(
        "GET",
        "/v1/models",
        &[("Origin", "https://app.example.evil")],
        &[],
    );
    assert_eq!(r.status, 403);
    // No Origin at all (curl, SDKs): allowed, no CORS headers needed.
    let r = server.get("/v1/models");
    assert_eq!(r.status, 200);
    assert!(r.header("Access-Control-Allow-Origin").is_none());
}

#[test]
fn cors_allow_any_answers_with_a_wildcard() {
    let server = Server::start(&["--cors-allow-any"]);
    let r = server.request(
        "GET",
        "/v1/models",
        &[("Origin", "https://anything.example")],
        &[],
    );
    assert_eq!(r.status, 200);
    let acao = r.header("Access-Control-Allow-Origin").unwrap_or_default();
    assert!(
        acao == "*" || acao == "https://anything.example",
        "{acao:?}"
    );
}

#[test]
fn options_preflight() {
    let server = Server::start(&["--allow-origin", "https://app.example"]);
    let r = server.request(
        "OPTIONS",
        "/v1/transcribe",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
        &[],
    );
    assert!(r.status == 204 || r.status == 200, "{}", r.status);
    assert_eq!(
        r.header("Access-Control-Allow-Origin"),
        Some("https://app.example")
    );
    let methods = r.header("Access-Control-Allow-Methods").unwrap_or_default();
    assert!(methods.contains("POST"), "{:?}", r.headers);
    let headers = r.header("Access-Control-Allow-Headers").unwrap_or_default();
    assert!(
        headers.to_ascii_lowercase().contains("content-type"),
        "{:?}",
        r.headers
    );

    let denied = server.request(
        "OPTIONS",
        "/v1/transcribe",
        &[
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
        &[],
    );
    assert_eq!(denied.status, 403);
}

// ---------------------------------------------------------------- rate limit, pool

#[test]
fn rate_limit_gives_429_with_retry_after() {
    let server = Server::start(&["--rate-limit-per-minute", "2", "--rate-limit-burst", "2"]);
    let statuses: Vec<u16> = (0..2).map(|_| server.get("/v1/models").status).collect();
    assert_eq!(statuses, [200, 200]);
    let r = server.get("/v1/models");
    assert_json_error(&r, 429, "rate_limited");
    let secs = retry_after_secs(&r);
    assert!((1..=60).contains(&secs), "Retry-After {secs}");
    assert!(
        r.json()["retry_after_ms"].as_u64().is_some(),
        "{}",
        r.text()
    );
    // Uploads count too; /health never does.
    assert_eq!(
        server.post("/v1/transcribe", &golos("golos_00")).status,
        429
    );
    for _ in 0..5 {
        assert_eq!(server.get("/health").status, 200);
    }
}

#[test]
fn trust_proxy_keys_the_rate_limit_by_forwarded_address() {
    let limit = ["--rate-limit-per-minute", "1", "--rate-limit-burst", "1"];
    let get = |server: &Server, xff: &str| {
        server
            .request("GET", "/v1/models", &[("X-Forwarded-For", xff)], &[])
            .status
    };
    // With --trust-proxy (loopback peer): one bucket per forwarded client.
    let mut args = limit.to_vec();
    args.push("--trust-proxy");
    let trusting = Server::start(&args);
    assert_eq!(get(&trusting, "203.0.113.1"), 200);
    assert_eq!(
        get(&trusting, "203.0.113.2"),
        200,
        "second client shares the first's bucket"
    );
    assert_eq!(get(&trusting, "203.0.113.1"), 429);
    // The last hop counts: what a proxy appended, not what a client claimed.
    assert_eq!(get(&trusting, "198.51.100.7, 203.0.113.2"), 429);

    // Without it: forwarded headers are ignored, everybody is 127.0.0.1.
    let plain = Server::start(&limit);
    assert_eq!(get(&plain, "203.0.113.1"), 200);
    assert_eq!(
        get(&plain, "203.0.113.2"),
        429,
        "XFF honoured without --trust-proxy"
    );
}

#[test]
fn zero_checkout_timeout_still_serves_an_idle_pool() {
    // 0 s means "don't wait for a busy worker", not "refuse everything".
    let server = Server::start(&["--pool-size", "1", "--pool-checkout-timeout-secs", "0"]);
    let r = server.post("/v1/transcribe", &golos("golos_00"));
    assert_eq!(r.status, 200, "idle pool, one request: {}", r.text());
    assert_eq!(r.json()["text"], golden_text("golos_00"));
}

#[test]
fn ready_is_exempt_from_the_rate_limit() {
    // docs/deployment.md, Health checks: neither /health nor /ready "counts
    // against the rate limit" (load balancers poll /ready every few seconds).
    let server = Server::start(&["--rate-limit-per-minute", "1", "--rate-limit-burst", "1"]);
    let statuses: Vec<u16> = (0..4).map(|_| server.get("/ready").status).collect();
    assert_eq!(statuses, [200, 200, 200, 200], "/ready is rate limited");
    assert_eq!(
        server.get("/v1/models").status,
        200,
        "/ready spent the bucket"
    );
}

#[test]
fn saturated_pool_gives_503_with_retry_after() {
    // Checkout timeout 0: a request that finds the one worker busy is refused
    // at once (docs/deployment.md: "503 pool_saturated with Retry-After right
    // away instead of queueing").
    let server = Server::start(&["--pool-size", "1", "--pool-checkout-timeout-secs", "0"]);
    let body = fixture_bytes("extra/long_70s.wav");
    let responses: Vec<HttpResponse> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5)
            .map(|_| s.spawn(|| server.post("/v1/transcribe", &body)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    assert!(statuses.contains(&200), "{statuses:?}");
    let busy: Vec<&HttpResponse> = responses.iter().filter(|r| r.status == 503).collect();
    assert!(
        !busy.is_empty(),
        "5 concurrent uploads on one worker, none refused: {statuses:?}"
    );
    for r in busy {
        assert_json_error(r, 503, "pool_saturated");
        assert!(retry_after_secs(r) >= 1);
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    // Once idle again, /ready is 200 and a request succeeds.
    let r = server.post("/v1/transcribe", &golos("golos_00"));
    assert_eq!(r.status, 200);
}

// ---------------------------------------------------------------- bind

#[test]
fn non_loopback_host_needs_bind_all() {
    let refused = Server::try_start(&["--host", "0.0.0.0"]);
    let failure = refused
        .err()
        .expect("0.0.0.0 without --bind-all must not serve");
    assert_eq!(
        failure.status.and_then(|s| s.code()),
        Some(2),
        "{}",
        failure.stderr
    );
    assert!(failure.stderr.contains("--bind-all"), "{}", failure.stderr);

    let server = Server::start(&["--host", "0.0.0.0", "--bind-all"]);
    assert_eq!(server.get("/health").status, 200);

    let mut args = base_serve_args();
    args.extend(["--host".into(), "0.0.0.0".into()]);
    let by_env = Server::spawn(&args, &[("GIGASTT_ALLOW_BIND_ANY", "1")])
        .unwrap_or_else(|f| panic!("GIGASTT_ALLOW_BIND_ANY=1 did not allow 0.0.0.0: {f:?}"));
    assert_eq!(by_env.get("/health").status, 200);
}

// ---------------------------------------------------------------- shutdown

#[test]
fn sigterm_drains_the_in_flight_request_and_exits_0() {
    let mut server = Server::start(&["--pool-size", "1"]);
    let body = fixture_bytes("extra/long_70s.wav");
    let mut stream = connect(server.port);
    let head = request_head("POST", "/v1/transcribe?format=text", &[], Some(body.len()));
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body).unwrap();
    // Let the request reach a worker, then ask the server to stop.
    std::thread::sleep(Duration::from_millis(300));
    server.signal("TERM");
    let r = read_response(&mut BufReader::new(stream)).expect("in-flight response");
    assert_eq!(
        r.status,
        200,
        "in-flight request cut by SIGTERM: {}",
        r.text()
    );
    assert!(r.text().trim().len() > 20, "{}", r.text());
    let status = server
        .wait_exit(Duration::from_secs(20))
        .expect("server still running 20 s after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", server.log_text());
    // A new connection after the exit is refused.
    assert!(TcpStream::connect(server.addr()).is_err());
}

#[test]
fn sigterm_on_an_idle_server_exits_0_quickly() {
    let mut server = Server::start(&[]);
    // An idle keep-alive connection must not hold the drain for its full time.
    let mut idle = connect(server.port);
    idle.write_all(
        request_head("GET", "/health", &[("Connection", "keep-alive")], None).as_bytes(),
    )
    .unwrap();
    let started = Instant::now();
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_secs(15))
        .expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", server.log_text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------- h2c

#[test]
fn http2_preface_gets_settings_then_goaway_http_1_1_required() {
    let server = Server::start(&[]);
    let mut stream = connect(server.port);
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // What an h2c client sends: the preface and an empty SETTINGS frame.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .unwrap();
    stream.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).unwrap();
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    // Parse frames: 3-byte length, type, flags, 4-byte stream id, payload.
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = (usize::from(bytes[at]) << 16)
            | (usize::from(bytes[at + 1]) << 8)
            | usize::from(bytes[at + 2]);
        let kind = bytes[at + 3];
        let payload = bytes.get(at + 9..at + 9 + len).unwrap_or_default().to_vec();
        frames.push((kind, payload));
        at += 9 + len;
    }
    assert!(!frames.is_empty(), "no HTTP/2 frames in {bytes:?}");
    assert_eq!(frames[0].0, 0x4, "first frame is not SETTINGS: {frames:?}");
    let goaway = frames
        .iter()
        .find(|(kind, _)| *kind == 0x7)
        .unwrap_or_else(|| panic!("no GOAWAY: {frames:?}"));
    assert!(goaway.1.len() >= 8, "{goaway:?}");
    let code = u32::from_be_bytes([goaway.1[4], goaway.1[5], goaway.1[6], goaway.1[7]]);
    assert_eq!(code, 0xd, "GOAWAY error code is not HTTP_1_1_REQUIRED");
    let line = server
        .wait_for_log(&["h2c"], Duration::from_secs(2))
        .unwrap_or_else(|| panic!("no log line naming h2c:\n{}", server.log_text()));
    assert!(line.contains("WARN"), "{line}");
    // The server is fine afterwards.
    assert_eq!(server.get("/health").status, 200);
}

// ---------------------------------------------------------------- SSE

#[test]
fn sse_stream_sends_partials_then_a_final() {
    let server = Server::start(&[]);
    let body = fixture_bytes("extra/long_70s.wav");
    let r = server.post("/v1/transcribe/stream", &body);
    assert_eq!(r.status, 200);
    assert!(
        r.header("Content-Type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = r.text();
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(kinds.len() >= 2, "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"final"), "{kinds:?}");
    assert!(
        kinds[..kinds.len() - 1].iter().all(|k| *k == "partial"),
        "{kinds:?}"
    );
    let last = events.last().unwrap();
    assert!(
        last["text"].as_str().is_some_and(|t| !t.is_empty()),
        "{last}"
    );
    // The final equals what /v1/transcribe says for the same audio.
    let plain = server.post("/v1/transcribe", &body).json();
    assert_eq!(last["text"], plain["text"]);
}

/// One worker of two threads takes an upload's pieces a few at a time and
/// runs them side by side: the partials still come one per segment in order,
/// and the text is that of one-thread workers taking one piece each.
#[test]
fn a_two_thread_worker_streams_the_same_text_as_one_thread_workers() {
    let body = fixture_bytes("extra/long_70s.wav");
    let want = Server::start(&["--pool-size", "2", "--threads", "1"])
        .post("/v1/transcribe", &body)
        .json();
    let server = Server::start(&["--pool-size", "1", "--threads", "2"]);
    let r = server.post("/v1/transcribe/stream", &body);
    assert_eq!(r.status, 200);
    let events: Vec<serde_json::Value> = r
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect();
    let partials: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "partial")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert!(partials.len() >= 2, "{} partials", partials.len());
    let last = events.last().unwrap();
    assert_eq!(last["type"], "final");
    assert_eq!(last["text"], want["text"]);
    // One partial per segment, in order.
    assert_eq!(partials.join(" "), want["text"].as_str().unwrap());
    assert_eq!(
        server.post("/v1/transcribe", &body).json()["words"],
        want["words"]
    );
}

#[test]
fn sse_stream_of_a_short_file_has_the_golden_text() {
    let server = Server::start(&[]);
    let r = server.post("/v1/transcribe/stream", &golos("golos_06"));
    assert_eq!(r.status, 200);
    let last = r
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .next_back()
        .map(|d| serde_json::from_str::<serde_json::Value>(d.trim()).unwrap())
        .expect("an event");
    assert_eq!(last["type"], "final");
    assert_eq!(last["text"], golden_text("golos_06"));
}

// ---------------------------------------------------------------- slowloris

#[test]
fn slowloris_swarm_keeps_health_fast_and_threads_capped() {
    const CAP: usize = 64;
    const SOCKETS: usize = 1000;
    let cap = CAP.to_string();
    let server = Server::start(&["--max-connections", &cap]);
    let baseline = server.thread_count().expect("/proc/PID/status Threads");
    // Sampled all the time, not now and then: a thread over the cap may live
    // only while an evicted connection's thread winds down.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (pid, sampling) = (server.pid(), Arc::clone(&sampling));
        std::thread::spawn(move || {
            let mut max = 0;
            while sampling.load(Ordering::Relaxed) {
                max = max.max(thread_count(pid).unwrap_or(0));
            }
            max
        })
    };
    let mut swarm = Vec::with_capacity(SOCKETS);
    for i in 0..SOCKETS {
        match TcpStream::connect(server.addr()) {
            Ok(mut s) => {
                // Half a header, then silence.
                let _ =
                    s.write_all(b"POST /v1/transcribe HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le");
                swarm.push(s);
            }
            Err(e) => panic!("connect {i} failed: {e}"),
        }
    }
    let started = Instant::now();
    let health = server.get("/health");
    let took = started.elapsed();
    sampling.store(false, Ordering::Relaxed);
    let max_threads = sampler.join().expect("the sampler");
    assert_eq!(health.status, 200, "{}", health.text());
    assert!(
        took < Duration::from_secs(1),
        "/health took {took:?} with {SOCKETS} stalled sockets"
    );
    assert!(
        max_threads <= baseline + CAP,
        "threads reached {max_threads} (baseline {baseline}, cap {CAP})"
    );
    // A real upload still gets through the swarm.
    let r = server.post("/v1/transcribe", &golos("golos_00"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["text"], golden_text("golos_00"));
    drop(swarm);
}
