//! Probe for docs/perf.md: the VAD over the first N seconds (default 60) of
//! tests/fixtures/extra/long_70s.wav, at one and two encoder threads; median
//! and fastest of 9 runs of `Recognizer::speech_regions`.
//!
//!     cargo run --release --example vad_probe -- 60
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Instant;

fn main() {
    let wav = std::fs::read("tests/fixtures/extra/long_70s.wav").unwrap();
    let samples = gigastt::audio::decode(&wav).unwrap().samples;
    let secs: usize = std::env::args().nth(1).map_or(60, |s| s.parse().unwrap());
    let samples = &samples[..secs * 16000];
    for threads in [1, 2] {
        let opts = gigastt::speech::EngineOptions {
            encoder_threads: threads,
            ..Default::default()
        };
        let engine = gigastt::speech::Engine::load(
            std::path::Path::new("models/gigaam-v3-tiny-random"),
            &opts,
        )
        .unwrap();
        let mut rec = engine.recognizer().unwrap();
        let mut times = Vec::new();
        for _ in 0..9 {
            let t = Instant::now();
            let r = rec.speech_regions(samples).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(!r.is_empty());
        }
        times.sort_by(f64::total_cmp);
        eprintln!(
            "threads {threads}: median {:.1} ms, min {:.1}",
            times[4], times[0]
        );
    }
}
