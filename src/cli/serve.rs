//! `gigastt serve`: flags -> [`ServeConfig`], bind, load the model in the
//! background (so `/health` answers and `/ready` says 503 meanwhile), serve until
//! SIGTERM/SIGINT, drain, exit 0.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::flags::RawFlags;
use super::{CliError, Exit, cores, load_engine};
use crate::pool::Pool;
use crate::server::{self, App, Loaded, ServeConfig, guard};

/// Builds the typed config; every error names its flag.
pub fn config(raw: &RawFlags) -> Result<ServeConfig, CliError> {
    let num = |name: &str| -> Result<u64, CliError> {
        raw.parse::<u64>(name)
            .map_err(CliError::usage)?
            .ok_or_else(|| CliError::usage(format!("--{name} needs a value")))
    };
    let secs = |name: &str| num(name).map(Duration::from_secs);
    let origins: Vec<String> = raw.all("allow-origin").to_vec();
    if let Some(bad) = origins.iter().find(|o| !guard::is_valid_origin(o)) {
        return Err(CliError::usage(format!(
            "--allow-origin {bad:?} is not an origin (scheme://host[:port], no path)"
        )));
    }
    let pool_size: Option<usize> = raw.parse("pool-size").map_err(CliError::usage)?;
    Ok(ServeConfig {
        host: raw.get("host").unwrap_or("127.0.0.1").to_string(),
        port: raw.parse("port").map_err(CliError::usage)?.unwrap_or(9876),
        allow_any_bind: raw.is_set("bind-all"),
        origins: guard::OriginPolicy {
            allowed: origins,
            allow_any: raw.is_set("cors-allow-any"),
        },
        pool_size: pool_size.unwrap_or_else(cores).max(1),
        checkout_timeout: secs("pool-checkout-timeout-secs")?,
        rate_limit_per_minute: num("rate-limit-per-minute")? as u32,
        rate_limit_burst: num("rate-limit-burst")? as u32,
        trust_proxy: raw.is_set("trust-proxy"),
        body_limit_bytes: num("body-limit-bytes")?,
        ws_frame_max_bytes: num("ws-frame-max-bytes")? as usize,
        idle_timeout: secs("idle-timeout-secs")?,
        max_session: secs("max-session-secs")?,
        max_connections: num("max-connections")?.max(1) as usize,
        shutdown_drain: secs("shutdown-drain-secs")?,
        metrics: raw.is_set("metrics"),
    })
}

/// Runs the server.
pub fn run(raw: &RawFlags) -> Result<(), CliError> {
    let config = config(raw)?;
    let listener = server::bind(&config).map_err(|e| CliError::new(Exit::Usage, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::new(Exit::Failed, e.to_string()))?;
    let app = Arc::new(App::new(config));
    install_signal_handlers(&app, addr)?;
    log::info!("listening on http://{addr} (HTTP/1.1, REST + SSE + WebSocket)");
    let engine = load_engine(raw, app.config.pool_size)?;
    let pool = Pool::start(&engine, app.config.pool_size)
        .map_err(|e| CliError::new(Exit::Model, e.to_string()))?;
    log::info!("ready: {} worker(s)", pool.size());
    let _ = app.loaded.set(Loaded { pool, engine });
    server::serve(app, listener).map_err(|e| CliError::new(Exit::Failed, e))
}

/// SIGTERM/SIGINT set the shutdown flag and wake the accept loop.
fn install_signal_handlers(app: &Arc<App>, addr: std::net::SocketAddr) -> Result<(), CliError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| CliError::new(Exit::Failed, format!("cannot install signal handlers: {e}")))?;
    let app = Arc::clone(app);
    std::thread::Builder::new()
        .name("gigastt-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig} received: shutting down");
                app.shutting_down.store(true, Ordering::SeqCst);
                // Wake the blocking accept() with a connection to ourselves.
                let wake = if addr.ip().is_unspecified() {
                    std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
                } else {
                    addr
                };
                let _ = std::net::TcpStream::connect_timeout(&wake, Duration::from_secs(1));
            }
        })
        .map_err(|e| CliError::new(Exit::Failed, e.to_string()))?;
    Ok(())
}
