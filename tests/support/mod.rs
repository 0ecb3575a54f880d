//! Shared by the black-box tests: the real `gigastt` binary on port 0, a tiny
//! HTTP/1.1 client over `std::net::TcpStream`, fixtures and golden texts.
//!
//! The client is deliberately raw (no connection pool, no redirects, no
//! automatic `Expect`): the tests need to send half a head, a declared length
//! with no body, two requests on one socket, and to see exactly what comes back.
//! Each test binary uses a different subset, hence `dead_code` is allowed.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The test model: GigaAM v3 I/O with random weights (models/gigaam-v3-tiny-random).
pub const TINY_MODEL: &str = "models/gigaam-v3-tiny-random";
/// How long a server may take from spawn to `/ready` 200.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Socket read timeout of the test client: a hung server fails the test, not CI.
pub const CLIENT_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gigastt"))
}

/// Absolute path of the tiny test model.
pub fn tiny_model() -> PathBuf {
    root().join(TINY_MODEL)
}

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// Bytes of `tests/fixtures/<rel>`.
pub fn fixture_bytes(rel: &str) -> Vec<u8> {
    std::fs::read(fixture(rel)).unwrap_or_else(|e| panic!("read fixture {rel}: {e}"))
}

/// `golos_00` .. `golos_09`.
pub fn golos_names() -> Vec<String> {
    (0..10).map(|i| format!("golos_{i:02}")).collect()
}

/// `tests/fixtures/golos/<name>.wav`.
pub fn golos_path(name: &str) -> PathBuf {
    fixture(&format!("golos/{name}.wav"))
}

/// Expected transcript of a golden input with the tiny model at fp32
/// (`inputs.<name>.rnnt.max_symbols_10.text` in tests/golden/golden.json).
pub fn golden_text(name: &str) -> String {
    let text = std::fs::read_to_string(root().join("tests/golden/golden.json")).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    golden["inputs"][name]["rnnt"]["max_symbols_10"]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no golden text for {name}"))
        .to_string()
}

/// The arguments every test server gets before its own: tiny model, fp32, port 0.
pub fn base_serve_args() -> Vec<String> {
    vec![
        "serve".into(),
        "--port".into(),
        "0".into(),
        "--model-dir".into(),
        tiny_model().display().to_string(),
        "--precision".into(),
        "fp32".into(),
    ]
}

// ---------------------------------------------------------------- server

/// A running `gigastt serve`; killed on drop.
pub struct Server {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    log: Arc<Mutex<Vec<String>>>,
    rate_limited: bool,
}

/// Why a server did not come up.
#[derive(Debug)]
pub struct StartFailure {
    /// Exit status, if it exited.
    pub status: Option<ExitStatus>,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Server {
    /// `gigastt serve` with the tiny model on port 0 plus `extra`; waits for `/ready`.
    pub fn start(extra: &[&str]) -> Server {
        Server::try_start(extra).unwrap_or_else(|f| panic!("server did not start: {f:?}"))
    }

    /// Like [`Server::start`], but a failure to come up is returned, not a panic.
    pub fn try_start(extra: &[&str]) -> Result<Server, StartFailure> {
        let mut args = base_serve_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::spawn(&args, &[])
    }

    /// Spawns `gigastt` with exactly `args` (and extra env), waits for the
    /// "listening on" line and for `/ready` 200.
    pub fn spawn(args: &[String], envs: &[(&str, &str)]) -> Result<Server, StartFailure> {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // A developer's GIGASTT_* variables must not change what is tested.
        for (key, _) in std::env::vars() {
            if key.starts_with("GIGASTT_") {
                cmd.env_remove(key);
            }
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn gigastt");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = mpsc::channel();
        let thread_log = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut port_tx = Some(port_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = parse_listening_port(&line)
                    && let Some(tx) = port_tx.take()
                {
                    let _ = tx.send(port);
                }
                if std::env::var_os("GIGASTT_TEST_ECHO_LOG").is_some() {
                    eprintln!("[server] {line}");
                }
                thread_log.lock().unwrap().push(line);
            }
        });
        let fail = |child: &mut Child, log: &Arc<Mutex<Vec<String>>>| {
            let _ = child.kill();
            let status = child.wait().ok();
            std::thread::sleep(Duration::from_millis(50));
            StartFailure {
                status,
                stderr: log.lock().unwrap().join("\n"),
            }
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let port = loop {
            if let Ok(port) = port_rx.recv_timeout(Duration::from_millis(50)) {
                break port;
            }
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return Err(StartFailure {
                    status: Some(status),
                    stderr: log.lock().unwrap().join("\n"),
                });
            }
            if Instant::now() > deadline {
                return Err(fail(&mut child, &log));
            }
        };
        let rate_limited = args.iter().any(|a| a == "--rate-limit-per-minute")
            || envs
                .iter()
                .any(|(k, _)| *k == "GIGASTT_RATE_LIMIT_PER_MINUTE");
        let server = Server {
            child,
            port,
            log,
            rate_limited,
        };
        Server::wait_ready(server, deadline)
    }

    /// Ready means the model is loaded: the "ready: N worker(s)" log line, or
    /// `/ready` 200. Only the log is used when a rate limit is on, so that
    /// waiting for a test server never spends the test's tokens.
    fn wait_ready(mut server: Server, deadline: Instant) -> Result<Server, StartFailure> {
        let rate_limited = server.rate_limited;
        loop {
            if server.log_lines().iter().any(|l| l.contains("] ready: ")) {
                return Ok(server);
            }
            if !rate_limited
                && let Ok(r) = server.try_get("/ready")
                && r.status == 200
            {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return Err(StartFailure {
                    status: Some(status),
                    stderr: server.log_text(),
                });
            }
            if Instant::now() > deadline {
                let _ = server.child.kill();
                return Err(StartFailure {
                    status: server.child.wait().ok(),
                    stderr: server.log_text(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything logged so far, one line per entry.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Everything logged so far.
    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    /// Waits up to `timeout` for a log line containing all of `needles`.
    pub fn wait_for_log(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .log_lines()
                .into_iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Some(line);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal by name (`TERM`, `INT`) with the `kill` command.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `Threads:` from /proc/PID/status (Linux).
    pub fn thread_count(&self) -> Option<usize> {
        thread_count(self.pid())
    }

    /// A fresh connection to the server.
    pub fn connect(&self) -> TcpStream {
        connect(self.port)
    }

    /// GET `path` on a fresh connection.
    pub fn get(&self, path: &str) -> HttpResponse {
        self.request("GET", path, &[], &[])
    }

    fn try_get(&self, path: &str) -> std::io::Result<HttpResponse> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let head = request_head("GET", path, &[], None);
        stream.write_all(head.as_bytes())?;
        read_response(&mut BufReader::new(stream))
    }

    /// POST `body` to `path` on a fresh connection.
    pub fn post(&self, path: &str, body: &[u8]) -> HttpResponse {
        self.request("POST", path, &[], body)
    }

    /// One request on a fresh connection (`Connection: close`; Content-Length
    /// for any POST or non-empty body).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        request(self.port, method, path, headers, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port from `listening on http://HOST:PORT ...`.
pub fn parse_listening_port(line: &str) -> Option<u16> {
    let rest = &line[line.find("listening on http://")? + "listening on http://".len()..];
    let addr = rest.split_whitespace().next()?;
    addr.rsplit(':').next()?.trim_end_matches('/').parse().ok()
}

// ---------------------------------------------------------------- client

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// Body (de-chunked).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Body as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Body as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// `code` of a JSON error body.
    pub fn error_code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_string()
    }
}

/// A connected client socket with the client read timeout.
pub fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to server");
    stream
        .set_read_timeout(Some(CLIENT_READ_TIMEOUT))
        .expect("set read timeout");
    stream
}

/// A request head. `content_length` adds the header; `Connection: close` is
/// added unless `headers` set `Connection` themselves.
pub fn request_head(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    content_length: Option<usize>,
) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(n) = content_length {
        head.push_str(&format!("Content-Length: {n}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    head
}

/// One request on a fresh connection; see [`Server::request`].
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut stream = connect(port);
    let has_length = headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
    });
    let length = (!has_length && (method == "POST" || !body.is_empty())).then_some(body.len());
    let head = request_head(method, path, headers, length);
    stream.write_all(head.as_bytes()).expect("send head");
    // The server may answer (and close) before reading the body: a failed
    // body write is not an error as long as a response comes back.
    let _ = stream.write_all(body);
    read_response(&mut BufReader::new(stream)).expect("read response")
}

/// Reads one final response (1xx interim responses are skipped). The body is
/// framed by Content-Length, chunked encoding, or the end of the stream.
pub fn read_response(reader: &mut impl BufRead) -> std::io::Result<HttpResponse> {
    loop {
        let response = read_one(reader)?;
        if !(100..200).contains(&response.status) {
            return Ok(response);
        }
    }
}

/// Reads one response, 1xx included (an interim response has no body).
pub fn read_one(reader: &mut impl BufRead) -> std::io::Result<HttpResponse> {
    let (status, headers) = read_head(reader)?;
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(HttpResponse {
            status,
            headers,
            body: Vec::new(),
        });
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(len) = find("content-length") {
        let len: usize = len.trim().parse().map_err(invalid)?;
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(invalid)?;
            if size == 0 {
                // Trailers end at an empty line.
                loop {
                    line.clear();
                    if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            line.clear();
            reader.read_line(&mut line)?;
        }
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Status line and headers.
pub fn read_head(reader: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| invalid(format!("bad status line {line:?}")))?
        .parse()
        .map_err(invalid)?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            break;
        }
        if let Some((k, v)) = trimmed.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

fn invalid(e: impl ToString) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

// ---------------------------------------------------------------- files

static TEMP_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A file under the system temp dir, removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// A fresh, unique path ending in `suffix` (not created).
    pub fn new(suffix: &str) -> TempFile {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::SeqCst);
        TempFile(
            std::env::temp_dir().join(format!("gigastt-test-{}-{n}{suffix}", std::process::id())),
        )
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A 16 kHz mono s16 WAV made of `copies` back-to-back copies of the fixture `rel`.
pub fn concat_wav(rel: &str, copies: usize) -> TempFile {
    let mut reader = hound::WavReader::open(fixture(rel)).expect("open fixture wav");
    let spec = reader.spec();
    assert_eq!(spec.sample_format, hound::SampleFormat::Int);
    assert_eq!(spec.bits_per_sample, 16);
    let samples: Vec<i16> = reader.samples::<i16>().map(|s| s.unwrap()).collect();
    let out = TempFile::new(".wav");
    let mut writer = hound::WavWriter::create(out.path(), spec).expect("create wav");
    for _ in 0..copies {
        for &s in &samples {
            writer.write_sample(s).unwrap();
        }
    }
    writer.finalize().unwrap();
    out
}

/// Checks that word timings are well-formed and never go back in time;
/// returns the number of words.
pub fn assert_monotonic_words(transcript: &Value) -> usize {
    let words = transcript["words"].as_array().expect("words array");
    let mut last_start = f64::NEG_INFINITY;
    for (i, w) in words.iter().enumerate() {
        let start = w["start"].as_f64().expect("word start");
        let end = w["end"].as_f64().expect("word end");
        assert!(start <= end, "word {i} ends before it starts: {w}");
        assert!(
            start >= last_start,
            "word {i} starts at {start} before the previous word ({last_start}): {w}"
        );
        last_start = start;
    }
    let segments = transcript["segments"].as_array().expect("segments array");
    let mut last_end = f64::NEG_INFINITY;
    for (i, s) in segments.iter().enumerate() {
        let start = s["start"].as_f64().expect("segment start");
        let end = s["end"].as_f64().expect("segment end");
        assert!(start <= end, "segment {i} ends before it starts: {s}");
        assert!(
            start >= last_end - 1e-6,
            "segment {i} starts at {start}, before the previous one ended ({last_end})"
        );
        last_end = end;
    }
    words.len()
}

/// Lower-cased letters and spaces only, for "contains this sentence" checks.
pub fn normalize(text: &str) -> String {
    let mapped: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    mapped.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The `Threads:` count of process `pid`, from `/proc`.
pub fn thread_count(pid: u32) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}
