//! Compressed audio decodes to the same transcript as its WAV original
//! (fixtures made with sox and lame from tests/fixtures/golos; see README there).
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "formats")]

use std::path::PathBuf;

use gigastt::audio::{self, AudioError};
use gigastt::speech::{Engine, EngineOptions, Precision, PrecisionChoice};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text_of(rec: &mut gigastt::speech::Recognizer, rel: &str) -> String {
    let bytes = std::fs::read(root().join(rel)).unwrap();
    let audio = audio::decode(&bytes).unwrap_or_else(|e| panic!("{rel}: {e}"));
    rec.transcribe(&audio.samples, |_, _| {}).unwrap().text
}

#[test]
fn compressed_fixtures_match_their_wav_originals() {
    let options = EngineOptions {
        precision: PrecisionChoice::Only(Precision::Fp32),
        ..EngineOptions::default()
    };
    let engine = Engine::load(&root().join("models/gigaam-v3-tiny-random"), &options).unwrap();
    let mut rec = engine.recognizer().unwrap();
    let dir = root().join("tests/fixtures/compressed");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        if !["flac", "ogg", "mp3", "m4a"].contains(&ext) {
            continue;
        }
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let wav = if stem.contains("48k") {
            format!("tests/fixtures/extra/{stem}.wav")
        } else {
            format!("tests/fixtures/golos/{stem}.wav")
        };
        let rel = format!("tests/fixtures/compressed/{stem}.{ext}");
        assert_eq!(text_of(&mut rec, &rel), text_of(&mut rec, &wav), "{rel}");
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} compressed fixtures");
}

#[test]
fn flac_is_lossless() {
    let flac = audio::decode(
        &std::fs::read(root().join("tests/fixtures/compressed/golos_00.flac")).unwrap(),
    )
    .unwrap();
    let wav =
        audio::decode(&std::fs::read(root().join("tests/fixtures/golos/golos_00.wav")).unwrap())
            .unwrap();
    assert_eq!(flac.samples, wav.samples);
}

#[test]
fn truncated_or_garbled_compressed_audio_is_an_error_not_a_panic() {
    for name in ["golos_00.flac", "golos_00.ogg", "golos_00.mp3"] {
        let bytes = std::fs::read(root().join("tests/fixtures/compressed").join(name)).unwrap();
        // Cut to the first 300 bytes: headers only.
        let _ = audio::decode(&bytes[..300]);
        // Garble the middle.
        let mut garbled = bytes.clone();
        for b in garbled.iter_mut().skip(bytes.len() / 3).take(2000) {
            *b = b.wrapping_mul(31).wrapping_add(7);
        }
        let _ = audio::decode(&garbled);
    }
    assert!(matches!(
        audio::decode(b"OggS\0\0\0\0"),
        Err(AudioError::UnsupportedFormat(_) | AudioError::Corrupt(_))
    ));
}
