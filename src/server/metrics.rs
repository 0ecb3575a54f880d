//! Counters for `/metrics` (Prometheus text format, only with `--metrics`).
//!
//! Requests by route and status, a latency histogram, pool use, live WebSocket
//! sessions, audio seconds transcribed and inference seconds. A small map under
//! a `Mutex`, never held across I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::pool::PoolStats;

/// Upper bounds of the latency histogram, in seconds.
const LATENCY_BUCKETS_SECS: &[f64] = &[
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency_counts: Mutex<Vec<u64>>,
    latency_sum_us: AtomicU64,
    latency_total: AtomicU64,
    /// Live WebSocket sessions.
    pub ws_sessions: AtomicUsize,
    audio_ms: AtomicU64,
    inference_ms: AtomicU64,
}

impl Metrics {
    /// Counts one finished request.
    pub fn record_request(&self, route: &'static str, status: u16, elapsed: Duration) {
        if let Ok(mut map) = self.requests.lock() {
            *map.entry((route, status)).or_insert(0) += 1;
        }
        let secs = elapsed.as_secs_f64();
        if let Ok(mut counts) = self.latency_counts.lock() {
            if counts.is_empty() {
                counts.resize(LATENCY_BUCKETS_SECS.len(), 0);
            }
            for (count, &le) in counts.iter_mut().zip(LATENCY_BUCKETS_SECS) {
                if secs <= le {
                    *count += 1;
                }
            }
        }
        self.latency_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.latency_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds transcribed audio and the time it took.
    pub fn record_work(&self, audio_secs: f64, inference: Duration) {
        self.audio_ms
            .fetch_add((audio_secs * 1000.0) as u64, Ordering::Relaxed);
        self.inference_ms
            .fetch_add(inference.as_millis() as u64, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self, pool: Option<PoolStats>) -> String {
        let mut out = String::new();
        out.push_str("# HELP gigastt_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE gigastt_requests_total counter\n");
        if let Ok(map) = self.requests.lock() {
            for ((route, status), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "gigastt_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP gigastt_request_duration_seconds Request latency.\n");
        out.push_str("# TYPE gigastt_request_duration_seconds histogram\n");
        let total = self.latency_total.load(Ordering::Relaxed);
        if let Ok(counts) = self.latency_counts.lock() {
            for (i, &le) in LATENCY_BUCKETS_SECS.iter().enumerate() {
                let n = counts.get(i).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "gigastt_request_duration_seconds_bucket{{le=\"{le}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "gigastt_request_duration_seconds_bucket{{le=\"+Inf\"}} {total}"
        );
        let sum = self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "gigastt_request_duration_seconds_sum {sum}");
        let _ = writeln!(out, "gigastt_request_duration_seconds_count {total}");
        if let Some(p) = pool {
            gauge(
                &mut out,
                "gigastt_pool_size",
                "Inference workers.",
                p.size as f64,
            );
            gauge(
                &mut out,
                "gigastt_pool_in_use",
                "Workers running a job.",
                p.busy as f64,
            );
            gauge(
                &mut out,
                "gigastt_pool_waiting",
                "Jobs waiting for a worker.",
                p.waiting as f64,
            );
        }
        gauge(
            &mut out,
            "gigastt_ws_sessions",
            "Live WebSocket sessions.",
            self.ws_sessions.load(Ordering::Relaxed) as f64,
        );
        counter(
            &mut out,
            "gigastt_audio_seconds_total",
            "Audio transcribed, seconds.",
            self.audio_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        );
        counter(
            &mut out,
            "gigastt_inference_seconds_total",
            "Time spent transcribing, seconds.",
            self.inference_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        );
        out
    }
}

fn gauge(out: &mut String, name: &str, help: &str, v: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

fn counter(out: &mut String, name: &str, help: &str, v: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

#[cfg(test)]
mod tests;
