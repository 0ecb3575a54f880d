use super::*;

// ---- bind

#[test]
fn loopback_binds_are_always_allowed() {
    for host in [
        "127.0.0.1",
        "127.1.2.3",
        "::1",
        "[::1]",
        "localhost",
        "LocalHost",
        "::ffff:127.0.0.1",
    ] {
        assert_eq!(check_bind(host, false), Ok(()), "{host}");
    }
}

#[test]
fn other_binds_need_bind_all() {
    for host in [
        "0.0.0.0",
        "::",
        "[::]",
        "192.168.1.10",
        "10.0.0.1",
        "example.com",
        "localhost.",
        "127.0.0.1:9876",
    ] {
        let e = check_bind(host, false).unwrap_err();
        let message = e.to_string();
        assert!(
            message.contains("--bind-all") && message.contains("GIGASTT_ALLOW_BIND_ANY=1"),
            "{message}"
        );
        assert_eq!(check_bind(host, true), Ok(()), "{host}");
    }
    assert_eq!(check_bind("  ", true), Err(BindError::EmptyHost));
}

// ---- origin

fn decide(origin: &str, allowed: &[&str], allow_any: bool) -> OriginDecision {
    let policy = OriginPolicy {
        allowed: allowed.iter().map(|s| s.to_string()).collect(),
        allow_any,
    };
    check_origin(Some(origin), &policy)
}

#[test]
fn no_origin_is_allowed() {
    assert_eq!(
        check_origin(None, &OriginPolicy::default()),
        OriginDecision::Allow
    );
}

#[test]
fn loopback_origins_are_allowed() {
    for origin in [
        "http://127.0.0.1:9876",
        "http://127.0.0.1",
        "http://127.0.0.2:80",
        "http://127.255.255.254:1",
        "http://[::1]:8080",
        "http://[::1]",
        "http://[0:0:0:0:0:0:0:1]:3000",
        "http://localhost:3000",
        "http://localhost",
        "HTTP://LOCALHOST:3000",
        "http://localhost:3000/",
        "https://localhost:8443",
        "https://127.0.0.1",
    ] {
        assert_eq!(
            decide(origin, &[], false),
            OriginDecision::Allow,
            "{origin}"
        );
    }
}

#[test]
fn lookalike_and_malformed_origins_are_denied() {
    for origin in [
        "http://localhost.evil.com",
        "http://127.0.0.1.nip.io",
        "http://localhost@evil.com",
        "http://evil.com@localhost",
        "http://user:pass@localhost:3000",
        "null",
        "",
        " ",
        "http://localhost:3000/path",
        "http://localhost/?q",
        "http://localhost#x",
        "http://localhost:",
        "http://localhost:99999",
        "http://localhost:+80",
        "http://[::ffff:127.0.0.1]:1",
        "http://[::1",
        "http://[::1]x",
        "http://[fe80::1%25eth0]",
        "http://127.1",
        "http://0x7f.0.0.1",
        "http://2130706433",
        "http://localhost.",
        "file://",
        "file:///etc/passwd",
        "chrome-extension://abcdefghijklmnop",
        "ws://localhost:3000",
        "localhost:3000",
        "//localhost",
        "http://local%68ost",
        "http://localhost\\@evil.com",
        "http://loc alhost",
        "http://",
        "http://evil.com",
    ] {
        assert_eq!(
            decide(origin, &[], false),
            OriginDecision::Deny,
            "{origin:?}"
        );
    }
}

#[test]
fn allow_listed_origins_match_exactly() {
    let allowed = [
        "https://stt.example.com",
        "https://app.example.com:8443/",
        "chrome-extension://abcdef",
        "HTTP://Mixed.Example",
    ];
    for origin in [
        "https://stt.example.com",
        "https://stt.example.com/",
        "HTTPS://STT.EXAMPLE.COM",
        "https://stt.example.com:443",
        "https://app.example.com:8443",
        "chrome-extension://abcdef",
        "http://mixed.example:80",
    ] {
        assert_eq!(
            decide(origin, &allowed, false),
            OriginDecision::Allow,
            "{origin}"
        );
    }
    for origin in [
        "http://stt.example.com",
        "https://stt.example.com:8443",
        "https://stt.example.com.evil.com",
        "https://evil.stt.example.com",
        "https://app.example.com",
        "chrome-extension://other",
        "https://stt.example.com//",
    ] {
        assert_eq!(
            decide(origin, &allowed, false),
            OriginDecision::Deny,
            "{origin}"
        );
    }
}

#[test]
fn null_and_invalid_allow_list_entries_never_match() {
    assert_eq!(decide("null", &["null"], false), OriginDecision::Deny);
    assert_eq!(
        decide("http://a.com/x", &["http://a.com/x"], false),
        OriginDecision::Deny
    );
    assert!(
        !is_valid_origin("null")
            && !is_valid_origin("example.com")
            && !is_valid_origin("http://a.com/x")
    );
    assert!(is_valid_origin("https://stt.example.com") && is_valid_origin("http://[::1]:9876"));
}

#[test]
fn cors_allow_any_is_a_wildcard_for_the_rest() {
    assert_eq!(
        decide("https://evil.com", &[], true),
        OriginDecision::AllowAny
    );
    assert_eq!(decide("null", &[], true), OriginDecision::AllowAny);
    assert_eq!(
        decide("http://localhost:3000", &[], true),
        OriginDecision::Allow
    );
    assert_eq!(
        decide("https://a.com", &["https://a.com"], true),
        OriginDecision::Allow
    );
}

// ---- CORS headers

fn get<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn cors_headers_echo_or_wildcard() {
    let echo = cors_headers(OriginDecision::Allow, Some("http://localhost:3000"));
    assert_eq!(
        get(&echo, "Access-Control-Allow-Origin"),
        Some("http://localhost:3000")
    );
    assert_eq!(get(&echo, "Vary"), Some("Origin"));
    assert_eq!(
        get(&echo, "Access-Control-Allow-Methods"),
        Some("GET, POST, OPTIONS")
    );
    assert_eq!(
        get(&echo, "Access-Control-Allow-Headers"),
        Some("Content-Type, Authorization")
    );
    assert_eq!(get(&echo, "Access-Control-Max-Age"), Some("600"));
    let any = cors_headers(OriginDecision::AllowAny, Some("https://x.com"));
    assert_eq!(get(&any, "Access-Control-Allow-Origin"), Some("*"));
    for (decision, origin) in [
        (OriginDecision::Deny, Some("https://x.com")),
        (OriginDecision::Allow, None),
    ] {
        let only_vary = cors_headers(decision, origin);
        assert_eq!(only_vary, vec![("Vary".to_owned(), "Origin".to_owned())]);
    }
}

// ---- rate limit

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn zero_per_minute_is_off() {
    let limiter = RateLimiter::new(0, 10);
    let now = Instant::now();
    assert!(!limiter.is_enabled());
    for _ in 0..1000 {
        assert_eq!(limiter.check(ip("1.2.3.4"), now), Ok(()));
    }
    assert_eq!(limiter.tracked_clients(), 0);
}

#[test]
fn burst_then_refill_at_the_per_minute_rate() {
    let limiter = RateLimiter::new(60, 3);
    let t0 = Instant::now();
    let client = ip("1.2.3.4");
    for _ in 0..3 {
        assert_eq!(limiter.check(client, t0), Ok(()));
    }
    let retry = limiter.check(client, t0).unwrap_err();
    assert_eq!(retry, Duration::from_secs(1));
    let half = limiter
        .check(client, t0 + Duration::from_millis(500))
        .unwrap_err();
    assert!((half.as_secs_f64() - 0.5).abs() < 1e-6, "{half:?}");
    assert_eq!(limiter.check(client, t0 + Duration::from_secs(1)), Ok(()));
    assert!(limiter.check(client, t0 + Duration::from_secs(1)).is_err());
    // A long pause refills only up to the burst.
    let later = t0 + Duration::from_secs(3600);
    for _ in 0..3 {
        assert_eq!(limiter.check(client, later), Ok(()));
    }
    assert!(limiter.check(client, later).is_err());
}

#[test]
fn clients_have_separate_buckets_and_burst_zero_means_one() {
    let limiter = RateLimiter::new(1, 0);
    let now = Instant::now();
    assert_eq!(limiter.check(ip("10.0.0.1"), now), Ok(()));
    assert_eq!(
        limiter.check(ip("10.0.0.1"), now),
        Err(Duration::from_secs(60))
    );
    assert_eq!(limiter.check(ip("10.0.0.2"), now), Ok(()));
}

#[test]
fn ipv6_shares_a_bucket_per_64_and_mapped_v4_is_v4() {
    let limiter = RateLimiter::new(1, 1);
    let now = Instant::now();
    assert_eq!(limiter.check(ip("2001:db8:1:2::1"), now), Ok(()));
    assert!(limiter.check(ip("2001:db8:1:2:ffff::9"), now).is_err());
    assert_eq!(limiter.check(ip("2001:db8:1:3::1"), now), Ok(()));
    assert_eq!(limiter.check(ip("192.0.2.1"), now), Ok(()));
    assert!(limiter.check(ip("::ffff:192.0.2.1"), now).is_err());
}

#[test]
fn earlier_instants_do_not_panic_or_refill() {
    let limiter = RateLimiter::new(60, 1);
    let t1 = Instant::now() + Duration::from_secs(10);
    assert_eq!(limiter.check(ip("1.1.1.1"), t1), Ok(()));
    assert!(
        limiter
            .check(ip("1.1.1.1"), t1 - Duration::from_secs(5))
            .is_err()
    );
}

#[test]
fn memory_is_bounded_by_evicting_full_then_stalest_buckets() {
    let limiter = RateLimiter::with_max_tracked(60, 2, 3);
    let t0 = Instant::now();
    for last in 1..=3 {
        assert_eq!(limiter.check(ip(&format!("10.0.0.{last}")), t0), Ok(()));
    }
    assert_eq!(limiter.tracked_clients(), 3);
    // Two seconds later every bucket is full again: all are dropped.
    let t1 = t0 + Duration::from_secs(2);
    assert_eq!(limiter.check(ip("10.0.0.4"), t1), Ok(()));
    assert_eq!(limiter.tracked_clients(), 1);
    // Nobody full: the stalest (10.0.0.4 at t1) goes.
    assert_eq!(
        limiter.check(ip("10.0.0.5"), t1 + Duration::from_millis(100)),
        Ok(())
    );
    assert_eq!(
        limiter.check(ip("10.0.0.6"), t1 + Duration::from_millis(200)),
        Ok(())
    );
    assert_eq!(
        limiter.check(ip("10.0.0.7"), t1 + Duration::from_millis(300)),
        Ok(())
    );
    assert_eq!(limiter.tracked_clients(), 3);
    let buckets = limiter.buckets.lock().unwrap();
    assert!(!buckets.contains_key(&ip("10.0.0.4")));
    assert!(buckets.contains_key(&ip("10.0.0.7")));
}

#[test]
fn default_cap_is_ten_thousand() {
    let limiter = RateLimiter::new(60, 1);
    let now = Instant::now();
    for n in 0..(MAX_TRACKED_IPS as u32 + 50) {
        let _ = limiter.check(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), now);
    }
    assert_eq!(limiter.tracked_clients(), MAX_TRACKED_IPS);
}

// ---- client IP

fn peer(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn forwarded_headers_are_ignored_without_trust_proxy() {
    let ip = client_ip(
        peer("127.0.0.1:5000"),
        Some("203.0.113.9"),
        Some("203.0.113.8"),
        false,
    );
    assert_eq!(ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
}

#[test]
fn forwarded_headers_are_ignored_from_a_remote_peer() {
    let ip = client_ip(
        peer("198.51.100.7:5000"),
        Some("203.0.113.9"),
        Some("203.0.113.8"),
        true,
    );
    assert_eq!(ip, "198.51.100.7".parse::<IpAddr>().unwrap());
}

#[test]
fn right_most_forwarded_for_wins_behind_a_loopback_proxy() {
    let got = |xff, real| client_ip(peer("[::1]:5000"), xff, real, true).to_string();
    assert_eq!(got(Some("1.1.1.1, 203.0.113.9"), None), "203.0.113.9");
    assert_eq!(got(Some(" 2001:db8::5 "), None), "2001:db8::5");
    assert_eq!(got(Some("[2001:db8::5]:443"), None), "2001:db8::5");
    assert_eq!(got(Some("203.0.113.9:1234"), None), "203.0.113.9");
    assert_eq!(got(Some("::ffff:203.0.113.9"), None), "203.0.113.9");
    // A garbled right-most entry is not skipped for a forgeable one on its left.
    assert_eq!(
        got(Some("1.1.1.1, garbage"), Some("203.0.113.8")),
        "203.0.113.8"
    );
    assert_eq!(got(Some("1.1.1.1, "), None), "::1");
    assert_eq!(got(None, Some("203.0.113.8")), "203.0.113.8");
    assert_eq!(got(None, Some("nonsense")), "::1");
    assert_eq!(got(None, None), "::1");
}

#[test]
fn mapped_loopback_peer_counts_as_loopback() {
    let ip = client_ip(
        peer("[::ffff:127.0.0.1]:5000"),
        Some("203.0.113.9"),
        None,
        true,
    );
    assert_eq!(ip.to_string(), "203.0.113.9");
}
