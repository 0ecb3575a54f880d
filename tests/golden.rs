//! Token-for-token parity with GigaAM's own pipeline (tests/golden, made with
//! GigaAM's code, torch and onnxruntime; see tests/golden/README.md).
//!
//! Tolerances (from the golden README): features 1e-3 abs, encoder output 1e-4
//! abs, VAD probabilities 1e-3 abs; token ids and frames exact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gigastt::speech::{
    Engine, EngineOptions, Precision, PrecisionChoice, Recognizer, Variant, vad,
};
use serde_json::Value;

const TINY: &str = "models/gigaam-v3-tiny-random";
const FEATURES_TOL: f32 = 1e-3;
const ENCODED_TOL: f32 = 1e-4;
const VAD_TOL: f32 = 1e-3;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden() -> Value {
    let text = std::fs::read_to_string(root().join("tests/golden/golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Golden paths are relative to shared/; ours live under tests/.
fn wav_samples(rel: &str) -> Vec<f32> {
    let bytes = std::fs::read(root().join("tests").join(rel)).unwrap();
    gigastt::audio::decode(&bytes).unwrap().samples
}

fn f32s(name: &str) -> Vec<f32> {
    std::fs::read(root().join("tests/golden").join(name))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn engine(variant: Variant, precision: Precision) -> Arc<Engine> {
    engine_with_threads(variant, precision, 1)
}

fn engine_with_threads(variant: Variant, precision: Precision, threads: usize) -> Arc<Engine> {
    let options = EngineOptions {
        variant: Some(variant),
        precision: PrecisionChoice::Only(precision),
        encoder_threads: threads,
    };
    Engine::load(&root().join(TINY), &options).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn inputs() -> Vec<(String, Value)> {
    golden()["inputs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn ids_frames(rec: &mut Recognizer, samples: &[f32]) -> (Vec<usize>, Vec<usize>) {
    let tokens = rec.tokens(samples).unwrap();
    (
        tokens.iter().map(|t| t.id).collect(),
        tokens.iter().map(|t| t.frame).collect(),
    )
}

#[test]
fn features_match_within_1e3() {
    let fx = gigastt::speech::FeatureExtractor::new();
    for (name, g) in inputs() {
        let samples = wav_samples(g["wav"].as_str().unwrap());
        let mel = fx.log_mel(&samples);
        let Some(file) = g["features_file"].as_str() else {
            assert_eq!(mel.frames, 0, "{name}: too short for a frame");
            continue;
        };
        let shape = usizes(&g["features_shape"]);
        assert_eq!(mel.frames, shape[1], "{name}: frame count");
        let diff = max_abs_diff(&mel.data, &f32s(file));
        assert!(diff <= FEATURES_TOL, "{name}: features differ by {diff}");
    }
}

#[test]
fn encoder_matches_within_1e4() {
    let engine = engine(Variant::Rnnt, Precision::Fp32);
    let mut rec = engine.recognizer().unwrap();
    for (name, g) in inputs() {
        let Some(file) = g["encoded_file"].as_str() else {
            continue;
        };
        let samples = wav_samples(g["wav"].as_str().unwrap());
        let encoded = rec.encode(&rec.features(&samples)).unwrap();
        assert_eq!(
            encoded.len,
            g["encoded_len"].as_u64().unwrap() as usize,
            "{name}"
        );
        assert_eq!(
            vec![encoded.dim, encoded.frames],
            usizes(&g["encoded_shape"]),
            "{name}"
        );
        let diff = max_abs_diff(&encoded.data, &f32s(file));
        assert!(diff <= ENCODED_TOL, "{name}: encoded differs by {diff}");
    }
}

#[test]
fn rnnt_ids_and_frames_are_identical() {
    let engine = engine(Variant::Rnnt, Precision::Fp32);
    let mut rec = engine.recognizer().unwrap();
    for max_symbols in [10, 3] {
        rec.set_max_symbols(max_symbols);
        for (name, g) in inputs() {
            let samples = wav_samples(g["wav"].as_str().unwrap());
            let (ids, frames) = ids_frames(&mut rec, &samples);
            let want = &g["rnnt"][format!("max_symbols_{max_symbols}")];
            if want.is_null() {
                assert!(ids.is_empty(), "{name}: no golden, expected empty");
                continue;
            }
            assert_eq!(
                ids,
                usizes(&want["ids"]),
                "{name} max_symbols {max_symbols}: ids"
            );
            assert_eq!(
                frames,
                usizes(&want["frames"]),
                "{name} max_symbols {max_symbols}: frames"
            );
            assert_eq!(
                engine.text_of(&ids),
                want["text"].as_str().unwrap(),
                "{name}: text"
            );
        }
    }
}

#[test]
fn ctc_ids_and_frames_are_identical() {
    let engine = engine(Variant::Ctc, Precision::Fp32);
    let mut rec = engine.recognizer().unwrap();
    for (name, g) in inputs() {
        let samples = wav_samples(g["wav"].as_str().unwrap());
        let (ids, frames) = ids_frames(&mut rec, &samples);
        let want = &g["ctc"];
        if want.is_null() {
            assert!(ids.is_empty(), "{name}");
            continue;
        }
        assert_eq!(ids, usizes(&want["ids"]), "{name}: ctc ids");
        assert_eq!(frames, usizes(&want["frames"]), "{name}: ctc frames");
        assert_eq!(
            engine.text_of(&ids),
            want["text"].as_str().unwrap(),
            "{name}: ctc text"
        );
    }
}

/// Decodes every golden input whose fp32 ids `precision` must reproduce (for
/// int8, those its golden marks `same_ids_as_fp32`) and checks the ids against
/// the fp32 golden. Returns how many inputs were checked.
fn check_golden_ids(rec: &mut Recognizer, precision: Precision) -> usize {
    let key = match precision {
        Precision::Int8 => "int8_encoder_max_symbols_10",
        _ => "max_symbols_10",
    };
    let mut checked = 0;
    for (name, g) in inputs() {
        let want = &g["rnnt"][key];
        if want.is_null()
            || (precision == Precision::Int8 && want["same_ids_as_fp32"] != Value::Bool(true))
        {
            continue;
        }
        let samples = wav_samples(g["wav"].as_str().unwrap());
        let (ids, _) = ids_frames(rec, &samples);
        assert_eq!(
            ids,
            usizes(&g["rnnt"]["max_symbols_10"]["ids"]),
            "{name}: {precision:?} ids"
        );
        checked += 1;
    }
    checked
}

#[test]
fn int8_encoder_decodes_to_the_same_ids() {
    let engine = engine(Variant::Rnnt, Precision::Int8);
    assert_eq!(engine.info().precision, Precision::Int8);
    let mut rec = engine.recognizer().unwrap();
    let checked = check_golden_ids(&mut rec, Precision::Int8);
    assert!(checked >= 10, "only {checked} inputs checked");
}

/// With a two-thread encoder pool, runs start on the pool's threads (see
/// `Engine::on_pool`); two recognizers sharing it at once must still give the
/// golden ids, for both precisions.
#[test]
fn a_shared_two_thread_pool_decodes_to_the_same_ids() {
    for precision in [Precision::Fp32, Precision::Int8] {
        let engine = engine_with_threads(Variant::Rnnt, precision, 2);
        assert_eq!(engine.info().encoder_threads, 2);
        let checked: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    let engine = Arc::clone(&engine);
                    s.spawn(move || {
                        let mut rec = engine.recognizer().unwrap();
                        check_golden_ids(&mut rec, precision)
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert!(
            checked >= 20,
            "{precision:?}: only {checked} decodes checked"
        );
    }
}

/// Long audio on a two-thread engine runs its pieces side by side, one per
/// pool thread: the words, their times and the progress must be those of the
/// same pieces run in turn on one thread, for each graph kind and precision.
#[test]
fn pieces_side_by_side_give_the_words_of_pieces_in_turn() {
    let samples = wav_samples("fixtures/extra/long_70s.wav");
    for (variant, precision) in [
        (Variant::Rnnt, Precision::Fp32),
        (Variant::Rnnt, Precision::Int8),
        (Variant::Ctc, Precision::Fp32),
    ] {
        let one = engine_with_threads(variant, precision, 1);
        let mut in_turn = one.recognizer().unwrap();
        let want = in_turn.transcribe(&samples, |_, _| {}).unwrap();
        assert_eq!(in_turn.lanes(), 1);
        assert!(
            want.words.len() >= 20,
            "{variant:?}: {} words",
            want.words.len()
        );
        let two = engine_with_threads(variant, precision, 2);
        let mut rec = two.recognizer().unwrap();
        for round in 0..2 {
            let mut progress = Vec::new();
            let got = rec
                .transcribe(&samples, |done, total| progress.push((done, total)))
                .unwrap();
            assert_eq!(rec.lanes(), 2, "{variant:?} {precision:?}: ran in turn");
            assert_eq!(
                got.words, want.words,
                "{variant:?} {precision:?} round {round}"
            );
            assert_eq!(got.text, want.text);
            let total = progress.len();
            assert!(total >= 4, "{total} pieces");
            let expected: Vec<_> = (1..=total).map(|d| (d, total)).collect();
            assert_eq!(progress, expected);
        }
    }
}

#[test]
fn vad_probabilities_and_segments_match() {
    let text = std::fs::read_to_string(root().join("tests/golden/vad.json")).unwrap();
    let vad_golden: Value = serde_json::from_str(&text).unwrap();
    let engine = engine(Variant::Rnnt, Precision::Fp32);
    for (wav, g) in vad_golden["files"].as_object().unwrap() {
        let samples = wav_samples(wav);
        let mut stream = engine.vad_stream().unwrap();
        let mut probs = Vec::new();
        // Feed in odd-sized chunks: streaming must equal whole-file chunking.
        for chunk in samples.chunks(1000) {
            stream.push(chunk, &mut probs).unwrap();
        }
        stream.finish(&mut probs).unwrap();
        let want: Vec<f32> = g["probs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let diff = max_abs_diff(&probs, &want);
        assert!(diff <= VAD_TOL, "{wav}: VAD probs differ by {diff}");
        let regions = vad::speech_timestamps(&probs, samples.len(), &vad::SpeechParams::default());
        let got: Vec<[usize; 2]> = regions.iter().map(|r| [r.start, r.end]).collect();
        let want: Vec<[usize; 2]> = g["speech_timestamps_samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| match s {
                Value::Array(a) => [
                    a[0].as_u64().unwrap() as usize,
                    a[1].as_u64().unwrap() as usize,
                ],
                obj => [
                    obj["start"].as_u64().unwrap() as usize,
                    obj["end"].as_u64().unwrap() as usize,
                ],
            })
            .collect();
        assert_eq!(got, want, "{wav}: speech timestamps");
    }
}

#[test]
fn golos_fixtures_decode_to_their_golden_sentences() {
    let engine = engine(Variant::Rnnt, Precision::Fp32);
    let mut rec = engine.recognizer().unwrap();
    for (name, g) in inputs()
        .into_iter()
        .filter(|(n, _)| n.starts_with("golos_"))
    {
        let samples = wav_samples(g["wav"].as_str().unwrap());
        let transcript = rec.transcribe(&samples, |_, _| {}).unwrap();
        assert_eq!(
            transcript.text,
            g["rnnt"]["max_symbols_10"]["text"].as_str().unwrap(),
            "{name}"
        );
        assert!(!Path::new(TINY).is_absolute());
    }
}

#[test]
fn inputs_under_two_frames_are_silence_not_errors() {
    // The encoder plan asserts T >= 2 (docs/perf.md): 320..479 samples give one
    // frame, which the recognizer must treat as silence instead of running it.
    let engine = engine(Variant::Rnnt, Precision::Fp32);
    let mut rec = engine.recognizer().unwrap();
    for n in [0, 100, 319, 320, 479] {
        assert!(rec.tokens(&vec![0.3; n]).unwrap().is_empty(), "{n} samples");
    }
    assert!(
        rec.transcribe(&[0.3; 479], |_, _| {})
            .unwrap()
            .text
            .is_empty()
    );
    // Two frames do run the encoder.
    let mel = rec.features(&[0.1; 480]);
    assert_eq!(mel.frames, 2);
    assert!(rec.encode(&mel).is_ok());
}
