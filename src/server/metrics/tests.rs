use super::*;

#[test]
fn renders_counters_and_histogram() {
    let m = Metrics::default();
    m.record_request("/health", 200, Duration::from_millis(3));
    m.record_request("/v1/transcribe", 503, Duration::from_secs(2));
    m.record_work(4.0, Duration::from_millis(500));
    let text = m.render(Some(PoolStats {
        size: 2,
        busy: 1,
        waiting: 0,
    }));
    assert!(text.contains("gigastt_requests_total{route=\"/health\",status=\"200\"} 1"));
    assert!(text.contains("gigastt_request_duration_seconds_bucket{le=\"0.005\"} 1"));
    assert!(text.contains("gigastt_request_duration_seconds_count 2"));
    assert!(text.contains("gigastt_pool_in_use 1"));
    assert!(text.contains("gigastt_audio_seconds_total 4"));
}
