//! The security checks that run before any work: bind address, Origin, CORS
//! headers, per-IP rate limit and the client IP behind a trusted proxy.
//!
//! Each check is a plain function (or one small type) over plain values, with
//! no I/O and no other crate module, so every rule of the deployment guide has
//! a unit test here. The server calls them before dispatch.
//!
//! Left out: TLS and authentication (the proxy's job, per the deployment
//! guide), `Host`-header checks, and any logging (the caller logs refusals).

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most client keys the rate limiter remembers at once, in entries.
pub const MAX_TRACKED_IPS: usize = 10_000;
/// How long browsers may cache a CORS preflight answer, in seconds.
pub const CORS_MAX_AGE_SECS: u32 = 600;
/// Methods the API answers, for `Access-Control-Allow-Methods`.
const CORS_ALLOW_METHODS: &str = "GET, POST, OPTIONS";
/// Request headers a browser may send, for `Access-Control-Allow-Headers`.
const CORS_ALLOW_HEADERS: &str = "Content-Type, Authorization";
/// Response headers a browser script may read, for `Access-Control-Expose-Headers`.
const CORS_EXPOSE_HEADERS: &str = "Retry-After";

// ---------------------------------------------------------------- bind

/// Why [`check_bind`] refused a host.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BindError {
    /// The host is not a loopback address and binding anywhere was not allowed.
    NotLoopback {
        /// The host as given.
        host: String,
    },
    /// The host is empty.
    EmptyHost,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindError::NotLoopback { host } => write!(
                f,
                "refusing to listen on non-loopback host {host:?}: gigastt has no TLS and no \
                 auth, so keep it on 127.0.0.1 behind a reverse proxy (see the deployment \
                 guide), or pass --bind-all (or set GIGASTT_ALLOW_BIND_ANY=1) to expose it anyway"
            ),
            BindError::EmptyHost => write!(f, "the --host value is empty"),
        }
    }
}

impl std::error::Error for BindError {}

/// Allows loopback hosts (127.0.0.0/8, `::1`, `[::1]`, `localhost`) always and
/// anything else (0.0.0.0, ::, LAN addresses, other names) only with `allow_any`
/// (`--bind-all` / `GIGASTT_ALLOW_BIND_ANY=1`).
pub fn check_bind(host: &str, allow_any: bool) -> Result<(), BindError> {
    let host = host.trim();
    if host.is_empty() {
        return Err(BindError::EmptyHost);
    }
    if allow_any || is_loopback_host(host) {
        Ok(())
    } else {
        Err(BindError::NotLoopback {
            host: host.to_owned(),
        })
    }
}

/// `localhost`, or an IP literal (IPv6 optionally bracketed) that is loopback.
fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    literal
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

// ---------------------------------------------------------------- origin

/// Which browser origins may call the API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    /// `--allow-origin` values: exact origins such as `https://app.example.com`.
    pub allowed: Vec<String>,
    /// `--cors-allow-any`: any origin, answered with `Access-Control-Allow-Origin: *`.
    pub allow_any: bool,
}

/// What [`check_origin`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginDecision {
    /// Allowed: no Origin (curl), a loopback origin or an allow-listed one.
    /// CORS headers echo the origin.
    Allow,
    /// Allowed only because of `--cors-allow-any`: CORS headers say `*`.
    AllowAny,
    /// Refused: answer 403 `origin_denied` before any work.
    Deny,
}

/// The rules of the deployment guide, in order:
///
/// 1. no `Origin` header → [`OriginDecision::Allow`] (curl, scripts, proxies);
/// 2. a loopback origin → `Allow`: scheme `http` or `https` (a page served by
///    this machine either way), host `localhost`, any IPv4 in 127.0.0.0/8 or
///    `[::1]`, any port or none. Not loopback: `localhost.evil.com`,
///    `127.0.0.1.nip.io`, `localhost.` and IPv4-mapped `[::ffff:127.0.0.1]`
///    (browsers never serialise a loopback page's origin that way; allow-list
///    it if you need it);
/// 3. an exact match of an `--allow-origin` value → `Allow`: scheme and host
///    compared case-insensitively, default ports (80/443) equal to none, one
///    trailing `/` ignored; any scheme works if listed (`chrome-extension://id`);
/// 4. `--cors-allow-any` → [`OriginDecision::AllowAny`];
/// 5. anything else → [`OriginDecision::Deny`], including `null`, the empty
///    string and anything that is not a bare `scheme://host[:port]` (userinfo,
///    paths, queries, `file://`).
pub fn check_origin(origin: Option<&str>, policy: &OriginPolicy) -> OriginDecision {
    let Some(raw) = origin else {
        return OriginDecision::Allow;
    };
    if let Some(parsed) = Origin::parse(raw) {
        let listed = policy
            .allowed
            .iter()
            .filter_map(|entry| Origin::parse(entry))
            .any(|entry| entry == parsed);
        if parsed.is_loopback() || listed {
            return OriginDecision::Allow;
        }
    }
    if policy.allow_any {
        OriginDecision::AllowAny
    } else {
        OriginDecision::Deny
    }
}

/// Whether `value` is an origin `--allow-origin` can ever match: the CLI uses
/// this to refuse a typo at startup instead of denying every request.
pub fn is_valid_origin(value: &str) -> bool {
    Origin::parse(value).is_some()
}

/// An origin's host, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OriginHost {
    /// A registered name, lowercased.
    Name(String),
    /// An IPv4 literal.
    V4(Ipv4Addr),
    /// A bracketed IPv6 literal.
    V6(Ipv6Addr),
}

/// `scheme://host[:port]` (RFC 6454 §6.2), normalised for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: OriginHost,
    /// `None` for no port or the scheme's default port.
    port: Option<u16>,
}

impl Origin {
    /// Parses a serialised origin; `None` for `null`, userinfo, paths, queries,
    /// fragments, empty hosts or ports, and anything else that is not an origin.
    fn parse(text: &str) -> Option<Origin> {
        let (scheme, rest) = text.split_once("://")?;
        let mut scheme_bytes = scheme.bytes();
        if !scheme_bytes.next()?.is_ascii_alphabetic()
            || !scheme_bytes.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            return None;
        }
        let scheme = scheme.to_ascii_lowercase();
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty()
            || authority
                .bytes()
                .any(|b| b"/?#@\\%".contains(&b) || b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return None;
        }
        let (host, port_text) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (literal, after) = bracketed.split_once(']')?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':')?),
            };
            (OriginHost::V6(literal.parse().ok()?), port)
        } else {
            let (name, port) = match authority.split_once(':') {
                Some((name, port)) => (name, Some(port)),
                None => (authority, None),
            };
            let name = name.to_ascii_lowercase();
            let host = match name.parse::<Ipv4Addr>() {
                Ok(v4) => OriginHost::V4(v4),
                Err(_) if is_reg_name(&name) => OriginHost::Name(name),
                Err(_) => return None,
            };
            (host, port)
        };
        let port = match port_text {
            None => None,
            Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
                Some(p.parse::<u16>().ok()?)
            }
            Some(_) => return None,
        };
        let default_port = match scheme.as_str() {
            "http" | "ws" => Some(80),
            "https" | "wss" => Some(443),
            _ => None,
        };
        let port = port.filter(|p| Some(*p) != default_port);
        Some(Origin { scheme, host, port })
    }

    /// Loopback per rule 2 of [`check_origin`].
    fn is_loopback(&self) -> bool {
        (self.scheme == "http" || self.scheme == "https")
            && match &self.host {
                OriginHost::Name(name) => name == "localhost",
                OriginHost::V4(v4) => v4.is_loopback(),
                OriginHost::V6(v6) => *v6 == Ipv6Addr::LOCALHOST,
            }
    }
}

/// Letters, digits, `-`, `_` and `.` (no empty label); what browsers send.
fn is_reg_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// CORS headers for a response or a preflight answer. `Allow` echoes the
/// origin, `AllowAny` says `*`; both list methods, request headers, exposed
/// headers and max-age. Every answer carries `Vary: Origin` so caches keep
/// per-origin copies; `Deny` or no Origin gets only that.
pub fn cors_headers(decision: OriginDecision, origin: Option<&str>) -> Vec<(String, String)> {
    let header = |name: &str, value: &str| (name.to_owned(), value.to_owned());
    let mut headers = vec![header("Vary", "Origin")];
    let allow_origin = match (decision, origin) {
        (OriginDecision::Allow, Some(origin)) => origin,
        (OriginDecision::AllowAny, _) => "*",
        _ => return headers,
    };
    headers.extend([
        header("Access-Control-Allow-Origin", allow_origin),
        header("Access-Control-Allow-Methods", CORS_ALLOW_METHODS),
        header("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
        header("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS),
        header("Access-Control-Max-Age", &CORS_MAX_AGE_SECS.to_string()),
    ]);
    headers
}

// ---------------------------------------------------------------- rate limit

/// One client's token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated_at: Instant,
}

/// Per-client token bucket: `burst` requests at once, refilled at
/// `per_minute` a minute. IPv4-mapped IPv6 counts as IPv4; other IPv6
/// clients are keyed by their /64, since one host usually holds a whole /64.
/// Memory is bounded by [`MAX_TRACKED_IPS`]: at capacity, full buckets (which
/// carry no state) are dropped, then the least recently used one.
#[derive(Debug)]
pub struct RateLimiter {
    tokens_per_sec: f64,
    capacity_tokens: f64,
    max_tracked: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    /// A limiter for `--rate-limit-per-minute` and `--rate-limit-burst`;
    /// `per_minute` 0 turns it off; a `burst` of 0 counts as 1.
    pub fn new(per_minute: u32, burst: u32) -> RateLimiter {
        RateLimiter::with_max_tracked(per_minute, burst, MAX_TRACKED_IPS)
    }

    fn with_max_tracked(per_minute: u32, burst: u32, max_tracked: usize) -> RateLimiter {
        RateLimiter {
            tokens_per_sec: f64::from(per_minute) / 60.0,
            capacity_tokens: f64::from(burst.max(1)),
            max_tracked: max_tracked.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the limiter does anything.
    pub fn is_enabled(&self) -> bool {
        self.tokens_per_sec > 0.0
    }

    /// Takes one token for `ip` at `now`; `Err(retry_after)` when none is left.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if !self.is_enabled() {
            return Ok(());
        }
        let key = bucket_key(ip);
        // A poisoned map is still a valid map of buckets: keep limiting.
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(&key) && buckets.len() >= self.max_tracked {
            self.evict(&mut buckets, now);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.capacity_tokens,
            updated_at: now,
        });
        let tokens = self.refilled(bucket, now);
        bucket.updated_at = bucket.updated_at.max(now);
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            Ok(())
        } else {
            bucket.tokens = tokens;
            Err(Duration::from_secs_f64(
                (1.0 - tokens) / self.tokens_per_sec,
            ))
        }
    }

    /// How many client keys are tracked now.
    pub fn tracked_clients(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Tokens in `bucket` at `now`, capped at the burst size.
    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed_secs = now
            .saturating_duration_since(bucket.updated_at)
            .as_secs_f64();
        (bucket.tokens + elapsed_secs * self.tokens_per_sec).min(self.capacity_tokens)
    }

    /// Frees room for one more key: drop full buckets, else the stalest one.
    fn evict(&self, buckets: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        buckets.retain(|_, bucket| self.refilled(bucket, now) < self.capacity_tokens);
        if buckets.len() >= self.max_tracked {
            let stalest = buckets
                .iter()
                .min_by_key(|(_, bucket)| bucket.updated_at)
                .map(|(key, _)| *key);
            if let Some(key) = stalest {
                buckets.remove(&key);
            }
        }
    }
}

/// IPv4 as is (mapped IPv6 unwrapped), IPv6 reduced to its /64.
fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

// ---------------------------------------------------------------- client IP

/// The client's address for logs and rate limiting. Forwarded headers count
/// only with `trust_proxy` and a loopback peer (the proxy on this machine).
/// Then the right-most `X-Forwarded-For` entry wins: that is the one our proxy
/// appended; entries to its left came from the client and can be forged, so a
/// garbled right-most entry is not skipped over. Next `X-Real-IP`, else the
/// peer. Entries may carry a port (`1.2.3.4:5`, `[::1]:5`).
pub fn client_ip(
    peer: SocketAddr,
    x_forwarded_for: Option<&str>,
    x_real_ip: Option<&str>,
    trust_proxy: bool,
) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    if !trust_proxy || !peer_ip.is_loopback() {
        return peer_ip;
    }
    x_forwarded_for
        .and_then(|list| list.rsplit(',').next())
        .and_then(parse_forwarded_ip)
        .or_else(|| x_real_ip.and_then(parse_forwarded_ip))
        .unwrap_or(peer_ip)
}

/// An IP, with or without a port or brackets; `None` for anything else.
fn parse_forwarded_ip(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let ip = text
        .parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            let inner = text.strip_prefix('[')?.strip_suffix(']')?;
            inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests;
