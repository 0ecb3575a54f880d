//! Black-box tests of the `gigastt` command line: `transcribe` on the golden
//! fixtures in every output format, odd WAV flavours, broken input, exit codes
//! and `help serve`.
//!
//! Expected texts are the goldens for the tiny random model at fp32
//! (`inputs.<name>.rnnt.max_symbols_10.text`), compared exactly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use serde_json::Value;
use support::{
    TempFile, assert_monotonic_words, bin, concat_wav, fixture, golden_text, golos_names,
    golos_path, normalize, root, tiny_model,
};

/// `gigastt ARGS`, run from the repository root with no GIGASTT_* variables.
fn gigastt(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args).current_dir(root()).stdin(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("GIGASTT_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// `gigastt transcribe FILE --model-dir tiny --precision fp32 EXTRA...`.
fn transcribe(file: &str, extra: &[&str]) -> Output {
    transcribe_command(file, extra)
        .output()
        .expect("run gigastt")
}

/// The command [`transcribe`] runs, for a test to add to.
fn transcribe_command(file: &str, extra: &[&str]) -> Command {
    let model = tiny_model().display().to_string();
    let mut args = vec!["transcribe", file, "--model-dir", &model];
    if !extra.contains(&"--precision") {
        args.extend(["--precision", "fp32"]);
    }
    args.extend_from_slice(extra);
    gigastt(&args)
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Text of a successful `transcribe`, trimmed; panics with stderr otherwise.
fn transcribe_ok(file: &str, extra: &[&str]) -> String {
    let out = transcribe(file, extra);
    assert!(
        out.status.success(),
        "transcribe {file} {extra:?} failed: {:?}\n{}",
        out.status,
        stderr(&out)
    );
    stdout(&out).trim().to_string()
}

fn transcribe_json(file: &str) -> Value {
    let text = transcribe_ok(file, &["--format", "json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// stderr lines that are not log records (those start with a timestamp).
fn message_lines(err: &str) -> Vec<&str> {
    err.lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.starts_with(|c: char| c.is_ascii_digit()))
        .collect()
}

fn path_str(p: &std::path::Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------- goldens

#[test]
fn transcribe_prints_the_golden_text_for_every_golos_fixture() {
    for name in golos_names() {
        let text = transcribe_ok(&path_str(&golos_path(&name)), &[]);
        assert_eq!(text, golden_text(&name), "{name}");
    }
}

#[test]
fn transcribe_several_files_prints_one_line_each_in_order() {
    let files: Vec<String> = golos_names()
        .iter()
        .take(3)
        .map(|n| path_str(&golos_path(n)))
        .collect();
    let model = path_str(&tiny_model());
    let mut args = vec!["transcribe"];
    args.extend(files.iter().map(String::as_str));
    args.extend(["--model-dir", &model, "--precision", "fp32"]);
    let out = gigastt(&args).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let expected: Vec<String> = golos_names()
        .iter()
        .take(3)
        .map(|n| golden_text(n))
        .collect();
    assert_eq!(lines, expected);
}

#[test]
fn int8_precision_gives_the_same_text_on_golos() {
    for name in ["golos_00", "golos_03", "golos_07"] {
        let text = transcribe_ok(&path_str(&golos_path(name)), &["--precision", "int8"]);
        assert_eq!(text, golden_text(name), "{name} at int8");
    }
}

#[test]
fn json_format_has_text_duration_words_and_segments() {
    let json = transcribe_json(&path_str(&golos_path("golos_00")));
    assert_eq!(json["text"], golden_text("golos_00"));
    let duration = json["duration"].as_f64().expect("duration");
    assert!((duration - 4.0).abs() < 0.01, "duration {duration}");
    let words = json["words"].as_array().expect("words");
    assert_eq!(words.len(), 6, "{json}");
    for w in words {
        assert!(w["word"].is_string(), "{w}");
        assert!(w["start"].is_number() && w["end"].is_number(), "{w}");
        let c = w["confidence"].as_f64().expect("confidence");
        assert!((0.0..=1.0).contains(&c), "{w}");
    }
    let joined: Vec<&str> = words.iter().map(|w| w["word"].as_str().unwrap()).collect();
    assert_eq!(joined.join(" "), golden_text("golos_00"));
    let segments = json["segments"].as_array().expect("segments");
    assert!(!segments.is_empty());
    for s in segments {
        assert!(s["start"].is_number() && s["end"].is_number() && s["text"].is_string());
    }
    assert_monotonic_words(&json);
}

#[test]
fn srt_format_is_numbered_cues_with_comma_milliseconds() {
    let text = transcribe_ok(&path_str(&golos_path("golos_00")), &["--format", "srt"]);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("1"), "{text}");
    let timing = lines.next().unwrap_or_default();
    let (from, to) = timing
        .split_once(" --> ")
        .unwrap_or_else(|| panic!("{text}"));
    for t in [from, to] {
        assert_eq!(t.len(), "00:00:00,000".len(), "{t:?}");
        assert_eq!(&t[8..9], ",", "{t:?}");
    }
    assert_eq!(
        normalize(&text.lines().skip(2).collect::<Vec<_>>().join(" ")),
        normalize(&golden_text("golos_00"))
    );
}

#[test]
fn vtt_format_has_header_and_dot_milliseconds() {
    let text = transcribe_ok(&path_str(&golos_path("golos_00")), &["--format", "vtt"]);
    assert!(text.starts_with("WEBVTT"), "{text}");
    let timing = text
        .lines()
        .find(|l| l.contains(" --> "))
        .unwrap_or_else(|| panic!("no cue: {text}"));
    assert!(
        timing.split(" --> ").all(|t| t.trim().contains('.')),
        "{timing}"
    );
    assert!(
        normalize(&text).contains(&normalize(&golden_text("golos_00"))),
        "{text}"
    );
}

// ---------------------------------------------------------------- wav flavours

#[test]
fn s24_and_f32_wavs_give_exactly_the_golos_00_text() {
    for file in ["extra/golos_00_s24.wav", "extra/golos_00_f32.wav"] {
        let text = transcribe_ok(&path_str(&fixture(file)), &[]);
        assert_eq!(text, golden_text("golos_00"), "{file}");
    }
}

#[test]
fn resampled_and_stereo_wavs_transcribe_to_text_of_similar_length() {
    let reference = golden_text("golos_00").chars().count() as f64;
    for file in [
        "extra/golos_00_48k_stereo.wav",
        "extra/golos_00_44k1.wav",
        "extra/golos_00_8k.wav",
    ] {
        let text = transcribe_ok(&path_str(&fixture(file)), &[]);
        let len = text.chars().count() as f64;
        assert!(
            (0.5 * reference..=2.0 * reference).contains(&len),
            "{file}: {text:?} is not of similar length to the golden text"
        );
    }
}

#[test]
fn other_fixtures_never_error() {
    for file in [
        "extra/russian-warmup.wav",
        "extra/beckett.wav",
        "synthetic/silence_1s.wav",
        "synthetic/noise_2s.wav",
        "synthetic/sine440_3s.wav",
        "synthetic/clip_160.wav",
        "synthetic/clip_8001.wav",
    ] {
        transcribe_ok(&path_str(&fixture(file)), &[]);
    }
}

// ---------------------------------------------------------------- broken input

fn assert_one_clear_error(out: &Output, what: &str, mentions: &[&str]) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: {:?}\n{}",
        out.status,
        stderr(out)
    );
    assert!(out.stdout.is_empty(), "{what}: stdout {:?}", stdout(out));
    let err = stderr(out);
    let lines = message_lines(&err);
    assert_eq!(
        lines.len(),
        1,
        "{what}: want one clear stderr line, got {lines:#?}"
    );
    let line = lines[0].to_lowercase();
    for m in mentions {
        assert!(
            line.contains(&m.to_lowercase()),
            "{what}: {line:?} lacks {m:?}"
        );
    }
    assert!(!err.contains("panicked"), "{what}: {err}");
}

#[test]
fn truncated_wav_exits_1_with_one_clear_line() {
    let bytes = std::fs::read(golos_path("golos_00")).unwrap();
    for keep in [30, 1000] {
        let file = TempFile::new(".wav");
        std::fs::write(file.path(), &bytes[..keep]).unwrap();
        let p = path_str(file.path());
        let out = transcribe(&p, &["--log-level", "error"]);
        assert_one_clear_error(&out, &format!("truncated to {keep} bytes"), &[&p]);
    }
}

#[test]
fn random_bytes_exit_1_with_one_clear_line() {
    // A fixed xorshift stream: reproducible "random" bytes.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..5000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let file = TempFile::new(".wav");
    std::fs::write(file.path(), &bytes).unwrap();
    let p = path_str(file.path());
    let out = transcribe(&p, &["--log-level", "error"]);
    assert_one_clear_error(&out, "random bytes", &[&p, "format"]);
}

#[test]
fn missing_input_file_exits_1() {
    let out = transcribe("/nonexistent/gigastt-test.wav", &["--log-level", "error"]);
    assert_one_clear_error(&out, "missing file", &["/nonexistent/gigastt-test.wav"]);
}

// ---------------------------------------------------------------- stdin, exit codes

#[test]
fn dash_reads_the_file_from_stdin() {
    let model = path_str(&tiny_model());
    let mut child = gigastt(&[
        "transcribe",
        "-",
        "--model-dir",
        &model,
        "--precision",
        "fp32",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let bytes = std::fs::read(golos_path("golos_01")).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&bytes));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), golden_text("golos_01"));
}

#[test]
fn missing_model_dir_exits_3_and_points_to_download() {
    let dir = TempFile::new("-no-model");
    let dir_s = path_str(dir.path());
    let out = gigastt(&[
        "transcribe",
        &path_str(&golos_path("golos_00")),
        "--model-dir",
        &dir_s,
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("gigastt download"),
        "{}",
        stderr(&out)
    );

    let out = gigastt(&["serve", "--port", "0", "--model-dir", &dir_s])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "serve: {}", stderr(&out));
    assert!(
        stderr(&out).contains("gigastt download"),
        "serve: {}",
        stderr(&out)
    );
}

/// A model directory like the tiny one, with the encoder of `precision` cut
/// to `keep` bytes (the weights are read straight from that file).
fn model_with_cut_encoder(precision: &str, keep: usize) -> (TempFile, String) {
    let dir = TempFile::new("-cut-model");
    std::fs::create_dir_all(dir.path()).unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let from = entry.unwrap().path();
        std::fs::copy(&from, dir.path().join(from.file_name().unwrap())).unwrap();
    }
    let encoder = match precision {
        "int8" => "v3_e2e_rnnt_encoder_int8.onnx",
        _ => "v3_e2e_rnnt_encoder.onnx",
    };
    let path = dir.path().join(encoder);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..keep.min(bytes.len())]).unwrap();
    (dir, path_str(&path))
}

#[test]
fn a_cut_encoder_file_exits_3_naming_it_and_the_fix() {
    for precision in ["fp32", "int8"] {
        for keep in [100, 700_000] {
            let (dir, encoder) = model_with_cut_encoder(precision, keep);
            let out = gigastt(&[
                "transcribe",
                &path_str(&golos_path("golos_00")),
                "--model-dir",
                &path_str(dir.path()),
                "--precision",
                precision,
            ])
            .output()
            .unwrap();
            let err = stderr(&out);
            let what = format!("{precision} encoder cut to {keep} bytes");
            assert_eq!(out.status.code(), Some(3), "{what}: {err}");
            assert!(err.contains(&encoder), "{what}: {err}");
            assert!(err.contains("gigastt download"), "{what}: {err}");
            assert!(!err.contains("panicked"), "{what}: {err}");
            std::fs::remove_dir_all(dir.path()).unwrap();
        }
    }
}

#[test]
fn unknown_flag_exits_2() {
    for args in [
        vec!["transcribe", "x.wav", "--no-such-flag"],
        vec!["serve", "--no-such-flag"],
    ] {
        let out = gigastt(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("--no-such-flag"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn bad_flag_values_exit_2() {
    for args in [
        vec!["serve", "--port", "not-a-port"],
        vec!["transcribe", "x.wav", "--format", "mp3"],
        vec!["serve", "--precision", "fp64"],
    ] {
        let out = gigastt(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn help_serve_lists_every_flag_with_its_env_var() {
    let out = gigastt(&["help", "serve"]).output().unwrap();
    assert!(out.status.success());
    let help = stdout(&out);
    // SPEC.md's serve flags plus the engine flags.
    let flags = [
        ("--host", "GIGASTT_HOST"),
        ("--port", "GIGASTT_PORT"),
        ("--bind-all", "GIGASTT_ALLOW_BIND_ANY"),
        ("--allow-origin", "GIGASTT_ALLOW_ORIGIN"),
        ("--cors-allow-any", "GIGASTT_CORS_ALLOW_ANY"),
        ("--model-dir", "GIGASTT_MODEL_DIR"),
        ("--pool-size", "GIGASTT_POOL_SIZE"),
        (
            "--pool-checkout-timeout-secs",
            "GIGASTT_POOL_CHECKOUT_TIMEOUT_SECS",
        ),
        ("--rate-limit-per-minute", "GIGASTT_RATE_LIMIT_PER_MINUTE"),
        ("--rate-limit-burst", "GIGASTT_RATE_LIMIT_BURST"),
        ("--trust-proxy", "GIGASTT_TRUST_PROXY"),
        ("--body-limit-bytes", "GIGASTT_BODY_LIMIT_BYTES"),
        ("--ws-frame-max-bytes", "GIGASTT_WS_FRAME_MAX_BYTES"),
        ("--idle-timeout-secs", "GIGASTT_IDLE_TIMEOUT_SECS"),
        ("--max-session-secs", "GIGASTT_MAX_SESSION_SECS"),
        ("--max-connections", "GIGASTT_MAX_CONNECTIONS"),
        ("--shutdown-drain-secs", "GIGASTT_SHUTDOWN_DRAIN_SECS"),
        ("--metrics", "GIGASTT_METRICS"),
        ("--log-level", "GIGASTT_LOG_LEVEL"),
        ("--variant", "GIGASTT_VARIANT"),
        ("--precision", "GIGASTT_PRECISION"),
        ("--threads", "GIGASTT_THREADS"),
    ];
    for (flag, env) in flags {
        let needle = format!("{flag} ");
        let line_has_flag = help
            .lines()
            .any(|l| l.trim_start().starts_with(&needle) || l.trim() == flag);
        assert!(line_has_flag, "help serve lacks {flag}:\n{help}");
        assert!(help.contains(env), "help serve lacks {env}:\n{help}");
    }
    // SPEC defaults.
    for default in [
        "127.0.0.1",
        "9876",
        "52428800",
        "524288",
        "[default: 300]",
        "[default: 3600]",
        "[default: 10]",
        "[default: 0]",
        "[default: info]",
    ] {
        assert!(
            help.contains(default),
            "help serve lacks {default}:\n{help}"
        );
    }
    // Every flag in the help is one we know about (no undocumented drift).
    for line in help
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("--"))
    {
        let flag = line.split_whitespace().next().unwrap();
        assert!(
            flags.iter().any(|(f, _)| *f == flag),
            "help serve lists {flag}, which this test does not know"
        );
    }
}

#[test]
fn env_var_sets_a_flag() {
    // GIGASTT_FORMAT=json does what --format json does.
    let model = path_str(&tiny_model());
    let out = gigastt(&[
        "transcribe",
        &path_str(&golos_path("golos_02")),
        "--model-dir",
        &model,
        "--precision",
        "fp32",
    ])
    .env("GIGASTT_FORMAT", "json")
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_str(stdout(&out).trim()).expect("JSON from GIGASTT_FORMAT");
    assert_eq!(json["text"], golden_text("golos_02"));
}

#[test]
fn rust_backtrace_without_rust_lib_backtrace_gets_a_warning() {
    // With RUST_BACKTRACE on, every error tract's optimiser drops captures a
    // backtrace (a load several times longer); RUST_LIB_BACKTRACE=0 avoids it.
    let file = path_str(&golos_path("golos_02"));
    let run = |backtrace: &str, lib: Option<&str>| {
        let mut cmd = transcribe_command(&file, &[]);
        cmd.env("RUST_BACKTRACE", backtrace);
        match lib {
            Some(v) => cmd.env("RUST_LIB_BACKTRACE", v),
            None => cmd.env_remove("RUST_LIB_BACKTRACE"),
        };
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out).trim(), golden_text("golos_02"));
        stderr(&out).contains("RUST_LIB_BACKTRACE=0")
    };
    assert!(run("1", None), "no warning with RUST_BACKTRACE=1");
    assert!(run("full", None), "no warning with RUST_BACKTRACE=full");
    assert!(!run("1", Some("0")), "a warning with RUST_LIB_BACKTRACE=0");
    assert!(!run("0", None), "a warning with RUST_BACKTRACE=0");
}

// ---------------------------------------------------------------- long audio

/// Golos sentences (normalised) whose text appears in `text`.
fn golos_sentences_in(text: &str) -> Vec<String> {
    let haystack = normalize(text);
    golos_names()
        .into_iter()
        .filter(|n| haystack.contains(&normalize(&golden_text(n))))
        .collect()
}

#[test]
fn long_70s_has_monotonic_word_times_and_the_golos_sentences() {
    let json = transcribe_json(&path_str(&fixture("extra/long_70s.wav")));
    let duration = json["duration"].as_f64().unwrap();
    assert!((duration - 70.0).abs() < 0.01, "duration {duration}");
    let words = assert_monotonic_words(&json);
    assert!(words > 0);
    for w in json["words"].as_array().unwrap() {
        assert!(w["end"].as_f64().unwrap() <= 70.0 + 1e-6, "{w}");
    }
    let text = json["text"].as_str().unwrap();
    let found = golos_sentences_in(text);
    assert!(
        found.len() >= 3,
        "long_70s.wav (golos_00..09 then golos_00..03, 1 s of silence between) should contain \
         several golos sentences; found {found:?} in {text:?}; segments: {}",
        json["segments"]
    );
}

/// ~20 minutes of audio: 17 copies of long_70s (19.8 min). About 30 s with the
/// tiny model on 2 cores (debug build, optimised dependencies), so it stays a
/// regular test.
#[test]
fn twenty_minutes_transcribe_without_error_with_monotonic_times() {
    let wav = concat_wav("extra/long_70s.wav", 17);
    let started = Instant::now();
    let json = transcribe_json(&path_str(wav.path()));
    eprintln!("20-minute transcribe took {:?}", started.elapsed());
    let duration = json["duration"].as_f64().unwrap();
    assert!((duration - 17.0 * 70.0).abs() < 0.1, "duration {duration}");
    let words = assert_monotonic_words(&json);
    assert!(words > 17, "only {words} words in 20 minutes");
    let last_end = json["words"].as_array().unwrap().last().unwrap()["end"]
        .as_f64()
        .unwrap();
    assert!(last_end > 17.0 * 70.0 - 70.0, "words stop at {last_end} s");
}
