//! Every flag as data: name, `GIGASTT_*` env var, default and doc. One table
//! drives parsing (pico-args), env fallback and `gigastt help`.
//!
//! Parsing is two-stage (as ripgrep): [`RawFlags`] holds checked raw strings and
//! does no I/O; `serve.rs`/`transcribe.rs` turn them into typed configs.

use std::collections::HashMap;
use std::ffi::OsString;

/// What a flag takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `--flag VALUE`, last one wins.
    Value(&'static str),
    /// `--flag VALUE`, repeatable (env var: comma-separated).
    Multi(&'static str),
    /// `--flag` alone (env var: 1/true/yes/on).
    Switch,
}

/// One flag's definition.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    /// Long name without dashes.
    pub name: &'static str,
    /// `--name`.
    pub long: &'static str,
    /// Environment variable read when the flag is absent.
    pub env: &'static str,
    /// Value shape.
    pub kind: Kind,
    /// Default as text (None: unset).
    pub default: Option<&'static str>,
    /// One-line doc.
    pub doc: &'static str,
}

/// Builds a [`Flag`]; `long` is `--name`, made at compile time for pico-args.
macro_rules! flag {
    ($name:literal, $env:literal, $kind:expr, $default:expr, $doc:expr $(,)?) => {
        Flag {
            name: $name,
            long: concat!("--", $name),
            env: $env,
            kind: $kind,
            default: $default,
            doc: $doc,
        }
    };
}

/// Default port (SPEC.md).
pub const DEFAULT_PORT: &str = "9876";
/// Default connection cap: sized for a small box.
pub const DEFAULT_MAX_CONNECTIONS: &str = "256";

/// Flags shared by every command that loads the model.
pub const MODEL_FLAGS: &[Flag] = &[
    flag!(
        "model-dir",
        "GIGASTT_MODEL_DIR",
        Kind::Value("DIR"),
        None,
        "model directory [default: ./models if it holds a model, else ~/.gigastt/models]"
    ),
    flag!(
        "variant",
        "GIGASTT_VARIANT",
        Kind::Value("rnnt|ctc"),
        None,
        "model head; default: RNN-T when its files are present, else CTC"
    ),
    flag!(
        "precision",
        "GIGASTT_PRECISION",
        Kind::Value("auto|fp32|int8"),
        Some("auto"),
        "encoder weights; auto prefers int8 when both files exist"
    ),
    flag!(
        "threads",
        "GIGASTT_THREADS",
        Kind::Value("N"),
        None,
        "encoder threads per worker [default: max(1, cores / pool size)]"
    ),
    flag!(
        "log-level",
        "GIGASTT_LOG_LEVEL",
        Kind::Value("LEVEL"),
        Some("info"),
        "error, warn, info, debug or trace"
    ),
];

/// `gigastt serve` flags (defaults match SPEC.md and the deployment guide).
pub const SERVE_FLAGS: &[Flag] = &[
    flag!(
        "host",
        "GIGASTT_HOST",
        Kind::Value("ADDR"),
        Some("127.0.0.1"),
        "address to listen on; non-loopback needs --bind-all"
    ),
    flag!(
        "port",
        "GIGASTT_PORT",
        Kind::Value("PORT"),
        Some(DEFAULT_PORT),
        "port to listen on (0 = any free port)"
    ),
    flag!(
        "bind-all",
        "GIGASTT_ALLOW_BIND_ANY",
        Kind::Switch,
        None,
        "allow a non-loopback --host (e.g. 0.0.0.0 in a container)"
    ),
    flag!(
        "allow-origin",
        "GIGASTT_ALLOW_ORIGIN",
        Kind::Multi("URL"),
        None,
        "also allow this browser Origin (repeatable; loopback origins are always allowed)"
    ),
    flag!(
        "cors-allow-any",
        "GIGASTT_CORS_ALLOW_ANY",
        Kind::Switch,
        None,
        "allow every Origin (wildcard CORS; development only)"
    ),
    flag!(
        "pool-size",
        "GIGASTT_POOL_SIZE",
        Kind::Value("N"),
        None,
        "inference workers sharing the one model [default: CPU cores]"
    ),
    flag!(
        "pool-checkout-timeout-secs",
        "GIGASTT_POOL_CHECKOUT_TIMEOUT_SECS",
        Kind::Value("SECS"),
        Some("30"),
        "a job that cannot start within this gets 503 pool_saturated"
    ),
    flag!(
        "rate-limit-per-minute",
        "GIGASTT_RATE_LIMIT_PER_MINUTE",
        Kind::Value("N"),
        Some("0"),
        "requests per minute per client IP (0 = off)"
    ),
    flag!(
        "rate-limit-burst",
        "GIGASTT_RATE_LIMIT_BURST",
        Kind::Value("N"),
        Some("10"),
        "requests a client may make at once before the rate applies"
    ),
    flag!(
        "trust-proxy",
        "GIGASTT_TRUST_PROXY",
        Kind::Switch,
        None,
        "take the client IP from X-Forwarded-For / X-Real-IP when the peer is loopback"
    ),
    flag!(
        "body-limit-bytes",
        "GIGASTT_BODY_LIMIT_BYTES",
        Kind::Value("BYTES"),
        Some("52428800"),
        "largest request body"
    ),
    flag!(
        "ws-frame-max-bytes",
        "GIGASTT_WS_FRAME_MAX_BYTES",
        Kind::Value("BYTES"),
        Some("524288"),
        "largest WebSocket frame or message"
    ),
    flag!(
        "idle-timeout-secs",
        "GIGASTT_IDLE_TIMEOUT_SECS",
        Kind::Value("SECS"),
        Some("300"),
        "close a WebSocket session that sends nothing for this long"
    ),
    flag!(
        "max-session-secs",
        "GIGASTT_MAX_SESSION_SECS",
        Kind::Value("SECS"),
        Some("3600"),
        "close a WebSocket session after this long (close code 1008)"
    ),
    flag!(
        "max-connections",
        "GIGASTT_MAX_CONNECTIONS",
        Kind::Value("N"),
        Some(DEFAULT_MAX_CONNECTIONS),
        "open connections at most; past it new ones get 503"
    ),
    flag!(
        "shutdown-drain-secs",
        "GIGASTT_SHUTDOWN_DRAIN_SECS",
        Kind::Value("SECS"),
        Some("10"),
        "on SIGTERM/SIGINT, time given to in-flight requests"
    ),
    flag!(
        "metrics",
        "GIGASTT_METRICS",
        Kind::Switch,
        None,
        "serve Prometheus metrics on /metrics"
    ),
];

/// `gigastt transcribe` flags.
pub const TRANSCRIBE_FLAGS: &[Flag] = &[flag!(
    "format",
    "GIGASTT_FORMAT",
    Kind::Value("text|json|srt|vtt"),
    Some("text"),
    "output format",
)];

/// `gigastt download` flags.
pub const DOWNLOAD_FLAGS: &[Flag] = &[
    flag!(
        "base-url",
        "GIGASTT_DOWNLOAD_URL",
        Kind::Value("URL"),
        None,
        "where to fetch from [default: Hugging Face istupakov/gigaam-v3-onnx]"
    ),
    flag!(
        "allow-unverified",
        "GIGASTT_ALLOW_UNVERIFIED",
        Kind::Switch,
        None,
        "accept files that have no known SHA-256"
    ),
];

/// `gigastt health` flags.
pub const HEALTH_FLAGS: &[Flag] = &[flag!(
    "url",
    "GIGASTT_HEALTH_URL",
    Kind::Value("URL"),
    Some("http://127.0.0.1:9876/health"),
    "URL to check",
)];

/// Values after parsing: flag name -> values (switches hold "true").
#[derive(Debug, Default, Clone)]
pub struct RawFlags {
    values: HashMap<&'static str, Vec<String>>,
    /// Positional arguments left over.
    pub free: Vec<String>,
}

impl RawFlags {
    /// Last value of a flag (or its env var, or its default).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    /// All values of a repeatable flag.
    pub fn all(&self, name: &str) -> &[String] {
        self.values.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// True when a switch is on.
    pub fn is_set(&self, name: &str) -> bool {
        self.get(name).is_some_and(|v| v == "true")
    }

    /// Typed value; the error names the flag and its env var.
    pub fn parse<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, String>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|e| format!("invalid value {v:?} for --{name}: {e}")),
        }
    }
}

fn is_truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// Parses `args` against `tables`, then fills gaps from env vars and defaults.
/// Unknown `--flags` are an error; `env` is injectable for tests.
pub fn parse(
    args: Vec<OsString>,
    tables: &[&[Flag]],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RawFlags, String> {
    let mut p = pico_args::Arguments::from_vec(args);
    let mut raw = RawFlags::default();
    for f in tables.iter().flat_map(|t| t.iter()) {
        let key = f.long;
        let from_args: Vec<String> = match f.kind {
            Kind::Switch => {
                if p.contains(key) {
                    vec!["true".into()]
                } else {
                    Vec::new()
                }
            }
            Kind::Value(_) => p
                .opt_value_from_str::<_, String>(key)
                .map_err(|e| format!("--{}: {e}", f.name))?
                .into_iter()
                .collect(),
            Kind::Multi(_) => p
                .values_from_str::<_, String>(key)
                .map_err(|e| format!("--{}: {e}", f.name))?,
        };
        let values = if !from_args.is_empty() {
            from_args
        } else if let Some(v) = env(f.env).filter(|v| !v.is_empty()) {
            match f.kind {
                Kind::Switch if is_truthy(&v) => vec!["true".into()],
                Kind::Switch => Vec::new(),
                Kind::Value(_) => vec![v],
                Kind::Multi(_) => v
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            }
        } else {
            f.default.map(|d| vec![d.to_string()]).unwrap_or_default()
        };
        if !values.is_empty() {
            raw.values.insert(f.name, values);
        }
    }
    for rest in p.finish() {
        let s = rest.to_string_lossy().into_owned();
        if s.starts_with("--") && s.len() > 2 {
            return Err(format!("unknown flag {s} (see `gigastt help`)"));
        }
        raw.free.push(s);
    }
    Ok(raw)
}

/// Help text for a command's flag tables.
pub fn help(tables: &[&[Flag]]) -> String {
    let mut out = String::new();
    for f in tables.iter().flat_map(|t| t.iter()) {
        let value = match f.kind {
            Kind::Value(v) | Kind::Multi(v) => format!(" {v}"),
            Kind::Switch => String::new(),
        };
        out.push_str(&format!("  --{}{value}\n      {}", f.name, f.doc));
        if let Some(d) = f.default {
            out.push_str(&format!(" [default: {d}]"));
        }
        out.push_str(&format!("\n      env: {}\n", f.env));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_with(args: &[&str], env: &[(&str, &str)]) -> Result<RawFlags, String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(
            args.iter().map(OsString::from).collect(),
            &[SERVE_FLAGS, MODEL_FLAGS],
            &|k| env.get(k).cloned(),
        )
    }

    #[test]
    fn defaults_match_spec() {
        let raw = parse_with(&[], &[]).unwrap();
        assert_eq!(raw.get("host"), Some("127.0.0.1"));
        assert_eq!(raw.get("port"), Some("9876"));
        assert_eq!(raw.get("rate-limit-per-minute"), Some("0"));
        assert_eq!(raw.get("rate-limit-burst"), Some("10"));
        assert_eq!(raw.get("body-limit-bytes"), Some("52428800"));
        assert_eq!(raw.get("ws-frame-max-bytes"), Some("524288"));
        assert_eq!(raw.get("idle-timeout-secs"), Some("300"));
        assert_eq!(raw.get("max-session-secs"), Some("3600"));
        assert_eq!(raw.get("shutdown-drain-secs"), Some("10"));
        assert_eq!(raw.get("log-level"), Some("info"));
        assert!(!raw.is_set("bind-all"));
        assert!(!raw.is_set("metrics"));
    }

    #[test]
    fn args_beat_env_beat_defaults() {
        let raw = parse_with(
            &["--port", "1234"],
            &[("GIGASTT_PORT", "5555"), ("GIGASTT_HOST", "::1")],
        )
        .unwrap();
        assert_eq!(raw.get("port"), Some("1234"));
        assert_eq!(raw.get("host"), Some("::1"));
    }

    #[test]
    fn bind_all_from_guide_env_var() {
        assert!(
            parse_with(&[], &[("GIGASTT_ALLOW_BIND_ANY", "1")])
                .unwrap()
                .is_set("bind-all")
        );
        assert!(
            !parse_with(&[], &[("GIGASTT_ALLOW_BIND_ANY", "0")])
                .unwrap()
                .is_set("bind-all")
        );
        assert!(parse_with(&["--bind-all"], &[]).unwrap().is_set("bind-all"));
    }

    #[test]
    fn allow_origin_repeats() {
        let raw = parse_with(
            &[
                "--allow-origin",
                "https://a.example",
                "--allow-origin",
                "https://b.example",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(raw.all("allow-origin").len(), 2);
        let raw = parse_with(
            &[],
            &[(
                "GIGASTT_ALLOW_ORIGIN",
                "https://a.example, https://b.example",
            )],
        )
        .unwrap();
        assert_eq!(raw.all("allow-origin").len(), 2);
    }

    #[test]
    fn unknown_flag_is_an_error() {
        assert!(
            parse_with(&["--bogus"], &[])
                .unwrap_err()
                .contains("--bogus")
        );
    }

    #[test]
    fn bad_number_names_the_flag() {
        let raw = parse_with(&["--port", "x"], &[]).unwrap();
        assert!(raw.parse::<u16>("port").unwrap_err().contains("--port"));
    }

    #[test]
    fn help_lists_flag_and_env() {
        let h = help(&[SERVE_FLAGS]);
        for f in SERVE_FLAGS {
            assert!(h.contains(&format!("--{}", f.name)));
            assert!(h.contains(f.env));
        }
    }
}
