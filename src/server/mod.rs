//! The app over HTTP: accept loop, connection cap, socket timeouts, drain on shutdown.
//!
//! A blocking `TcpListener` with one thread per connection under a hard cap.
//! The cap counts threads, not connections: a connection's thread holds its
//! place until it has exited, so the process never runs more connection
//! threads than the cap, even while finished ones wind down.
//! When the cap is reached, the connection that has waited longest for its
//! request head (an idle keep-alive or a slowloris) is evicted so real requests
//! still get in; if none can be evicted the newcomer gets 503 and is closed.
//! Heads are parsed by `http/` with size caps and a deadline; handlers run
//! behind a panic fence. Knows `pool` and plain `speech` data, never tract.

pub mod error;
pub mod guard;
pub mod metrics;
mod openai;
mod rest;
mod routes;
pub mod ws;

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::http::{self, HttpError, Response, StatusCode};
use crate::pool::Pool;
use crate::speech::{Engine, ModelInfo};

/// Socket read timeout: a client that sends nothing for this long is dropped
/// (also bounds keep-alive idling between requests).
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket write timeout: a client that stops reading for this long is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for a whole request head from its first byte (slowloris).
pub const HEAD_DEADLINE: Duration = Duration::from_secs(10);
/// How long the accept loop waits for an evicted connection to free its slot.
const EVICTION_WAIT: Duration = Duration::from_millis(200);
/// Longest a joined connection thread still counts against the cap while the
/// kernel finishes its exit (it takes microseconds; this only bounds a stale
/// entry, such as a thread id the kernel has already given to a new thread).
const EXIT_GRACE: Duration = Duration::from_secs(1);
/// SSE keep-alive comment interval.
pub const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// Everything `serve` needs, typed (built from flags by `cli/serve.rs`).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Listen address.
    pub host: String,
    /// Listen port (0: any).
    pub port: u16,
    /// Allowed to bind a non-loopback address.
    pub allow_any_bind: bool,
    /// Origin rules.
    pub origins: guard::OriginPolicy,
    /// Workers.
    pub pool_size: usize,
    /// Longest wait for a worker before 503.
    pub checkout_timeout: Duration,
    /// Requests per minute per client (0 = off).
    pub rate_limit_per_minute: u32,
    /// Burst size.
    pub rate_limit_burst: u32,
    /// Honour forwarding headers from a loopback peer.
    pub trust_proxy: bool,
    /// Largest request body.
    pub body_limit_bytes: u64,
    /// Largest WebSocket frame/message.
    pub ws_frame_max_bytes: usize,
    /// WebSocket idle timeout.
    pub idle_timeout: Duration,
    /// WebSocket session cap.
    pub max_session: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Drain time on shutdown.
    pub shutdown_drain: Duration,
    /// Serve `/metrics`.
    pub metrics: bool,
}

/// The loaded model, once it is ready.
pub struct Loaded {
    /// Worker pool over the engine.
    pub pool: Pool,
    /// The engine (for model info and streaming VAD).
    pub engine: Arc<Engine>,
}

/// Shared server state.
pub struct App {
    /// Configuration.
    pub config: ServeConfig,
    /// Set once the model is loaded; `/ready` is 503 before.
    pub loaded: OnceLock<Loaded>,
    /// Rate limiter.
    pub limiter: guard::RateLimiter,
    /// Counters.
    pub metrics: metrics::Metrics,
    /// Set on SIGTERM/SIGINT.
    pub shutting_down: AtomicBool,
    /// Connections waiting for a request head, oldest first (for eviction).
    waiting_heads: Mutex<BTreeMap<u64, Arc<TcpStream>>>,
    next_id: AtomicU64,
}

impl App {
    /// Fresh state for `config`.
    pub fn new(config: ServeConfig) -> App {
        App {
            limiter: guard::RateLimiter::new(config.rate_limit_per_minute, config.rate_limit_burst),
            config,
            loaded: OnceLock::new(),
            metrics: metrics::Metrics::default(),
            shutting_down: AtomicBool::new(false),
            waiting_heads: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// Model info once loaded.
    pub fn model_info(&self) -> Option<&ModelInfo> {
        self.loaded.get().map(|l| l.engine.info())
    }

    /// True after a shutdown signal.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    fn evict_oldest_waiting(&self) -> bool {
        let oldest = self
            .waiting_heads
            .lock()
            .ok()
            .and_then(|mut map| map.pop_first());
        match oldest {
            Some((_, stream)) => {
                let _ = stream.shutdown(Shutdown::Both);
                true
            }
            None => false,
        }
    }
}

/// The connection threads the accept loop has started and that the kernel
/// still lists.
///
/// A thread holds its place until it is gone, not until its connection ends.
/// A count dropped at the end of the thread's work let a new thread start
/// while the old one wound down (one over the cap for as long as the
/// scheduler kept it there). Even a joined thread finishes its exit in the
/// kernel after `join` returns: a test that sampled `/proc` without pause
/// caught one there, in uninterruptible sleep, beside a full cap of new ones.
/// So a joined thread stays counted while its `/proc` entry exists (Linux),
/// for [`EXIT_GRACE`] at most.
#[derive(Default)]
struct ConnectionThreads {
    running: Vec<JoinHandle<Option<PathBuf>>>,
    /// Joined threads' `/proc/PID/task/TID` entries and when they were joined.
    exiting: Vec<(PathBuf, Instant)>,
}

impl ConnectionThreads {
    /// Joins the threads that have finished, forgets those the kernel has
    /// released, and returns how many are left.
    fn reap(&mut self) -> usize {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].is_finished() {
                // Handlers run behind a panic fence; any other panic was
                // printed by the panic hook when it happened.
                if let Ok(Some(entry)) = self.running.swap_remove(i).join() {
                    self.exiting.push((entry, Instant::now()));
                }
            } else {
                i += 1;
            }
        }
        self.exiting
            .retain(|(entry, joined)| joined.elapsed() < EXIT_GRACE && entry.exists());
        self.running.len() + self.exiting.len()
    }
}

/// The calling thread's `/proc/PID/task/TID` directory, where the kernel
/// lists it until its exit is complete (`None` without `/proc`).
fn own_task_entry() -> Option<PathBuf> {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .map(|task| Path::new("/proc").join(task))
}

/// Binds the listener (after the bind check). Port 0 picks a free port.
pub fn bind(config: &ServeConfig) -> Result<TcpListener, String> {
    guard::check_bind(&config.host, config.allow_any_bind).map_err(|e| e.to_string())?;
    let host = config.host.trim_start_matches('[').trim_end_matches(']');
    TcpListener::bind((host, config.port))
        .map_err(|e| format!("cannot listen on {}:{}: {e}", config.host, config.port))
}

/// Runs the accept loop until `app.shutting_down` is set, then drains.
pub fn serve(app: Arc<App>, listener: TcpListener) -> Result<(), String> {
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let mut threads = ConnectionThreads::default();
    for stream in listener.incoming() {
        if app.is_shutting_down() {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        admit(&app, &mut threads, stream);
    }
    drop(listener);
    log::info!(
        "stopped accepting on {local}; draining for up to {:?}",
        app.config.shutdown_drain
    );
    let deadline = Instant::now() + app.config.shutdown_drain;
    while threads.reap() > 0 && Instant::now() < deadline {
        // Idle keep-alive connections would hold the drain: close them now.
        while app.evict_oldest_waiting() {}
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = threads.reap();
    if left > 0 {
        log::warn!("{left} connection(s) still open after the drain period");
    }
    if let Some(loaded) = app.loaded.get() {
        loaded.pool.shutdown();
    }
    log::info!("shutdown complete");
    Ok(())
}

fn admit(app: &Arc<App>, threads: &mut ConnectionThreads, stream: TcpStream) {
    let cap = app.config.max_connections.max(1);
    let mut running = threads.reap();
    if running >= cap && app.evict_oldest_waiting() {
        let until = Instant::now() + EVICTION_WAIT;
        while running >= cap && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
            running = threads.reap();
        }
    }
    if running >= cap {
        refuse_over_cap(stream);
        return;
    }
    let thread_app = Arc::clone(app);
    let spawned = std::thread::Builder::new()
        .name("gigastt-conn".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            handle_connection(&thread_app, stream);
            own_task_entry()
        });
    match spawned {
        Ok(handle) => threads.running.push(handle),
        Err(e) => log::error!("cannot spawn connection thread: {e}"),
    }
}

fn refuse_over_cap(mut stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let err = error::ApiError::new(
        StatusCode(503),
        "too_many_connections",
        "connection limit reached; retry shortly",
    )
    .retry_after(Duration::from_secs(1));
    let _ = err.to_response().write_to(&mut stream, false);
    let _ = stream.shutdown(Shutdown::Both);
    log::warn!("connection refused: --max-connections reached");
}

/// What a handler did with the connection.
pub(crate) enum Outcome {
    /// A response was written; the connection may serve another request.
    Continue,
    /// The connection must be closed (streamed body, upgrade, error).
    Close,
}

fn handle_connection(app: &Arc<App>, stream: TcpStream) {
    let peer = match stream.peer_addr() {
        Ok(p) => p,
        Err(_) => return,
    };
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    // One more handle, made once, lets the accept loop shut this socket down
    // while it waits for a head (eviction); registering it costs no syscall.
    let Ok(evict_handle) = stream.try_clone().map(Arc::new) else {
        return;
    };
    let mut writer = write_half;
    let mut reader = BufReader::with_capacity(16 * 1024, stream);
    let limits = http::Limits {
        body_limit_bytes: app.config.body_limit_bytes,
        head_deadline: HEAD_DEADLINE,
    };
    loop {
        let id = app.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut map) = app.waiting_heads.lock() {
            map.insert(id, Arc::clone(&evict_handle));
        }
        let head = http::read_head(&mut reader, &limits);
        if let Ok(mut map) = app.waiting_heads.lock() {
            map.remove(&id);
        }
        let request = match head {
            Ok(r) => r,
            Err(HttpError::ConnectionClosed) => return,
            Err(HttpError::Http2Preface) => {
                log::warn!(
                    "{peer}: a client opened with the HTTP/2 preface (h2c), but gigastt speaks HTTP/1.1 only. \
                     If this is a reverse proxy, drop `h2c` from its upstream transport (Caddy: remove \
                     `transport http {{ versions h1 h2c }}`; plain `reverse_proxy 127.0.0.1:9876` works)"
                );
                let _ = writer.write_all(&http::h2_goaway_http11_required());
                let _ = writer.flush();
                return;
            }
            Err(HttpError::Io(_)) => return,
            Err(e) => {
                log::debug!("{peer}: bad request head: {e}");
                let _ = error::ApiError::from(e)
                    .to_response()
                    .write_to(&mut writer, false);
                return;
            }
        };
        if app.is_shutting_down() {
            let _ = error::ApiError::shutting_down()
                .to_response()
                .write_to(&mut writer, false);
            return;
        }
        let started = Instant::now();
        let fenced = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            routes::dispatch(app, &request, &mut reader, &mut writer, peer)
        }));
        let (outcome, status, route) = match fenced {
            Ok(r) => r,
            Err(_) => {
                log::error!(
                    "{peer}: handler panicked on {} {}",
                    request.method,
                    request.path
                );
                let _ = error::ApiError::internal()
                    .to_response()
                    .write_to(&mut writer, false);
                (Outcome::Close, 500, "panic")
            }
        };
        let elapsed = started.elapsed();
        app.metrics.record_request(route, status, elapsed);
        log::info!(
            "{} {} {} {}ms {}",
            request.method,
            request.path,
            status,
            elapsed.as_millis(),
            peer
        );
        match outcome {
            Outcome::Continue if request.wants_keep_alive() && !app.is_shutting_down() => continue,
            _ => return,
        }
    }
}

/// Writes `response`; the connection is kept only if the client wants it and
/// `may_keep` (false when an unread body is still on the wire).
pub(crate) fn send(
    writer: &mut TcpStream,
    request: &http::Request,
    response: &Response,
    may_keep: bool,
) -> Outcome {
    let keep_alive = may_keep && request.wants_keep_alive();
    let written = if request.method == "HEAD" {
        response.write_head_to(writer, keep_alive)
    } else {
        response.write_to(writer, keep_alive)
    };
    match written.and_then(|_| writer.flush()) {
        Ok(()) if keep_alive => Outcome::Continue,
        _ => Outcome::Close,
    }
}

/// The peer's socket address.
pub type Peer = SocketAddr;
