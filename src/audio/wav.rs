//! WAV bytes -> mono f32 via `hound`: PCM 8/16/24/32-bit, IEEE float32,
//! WAVE_FORMAT_EXTENSIBLE, any channel count up to the cap.
//!
//! Truncated data is an error, not a silent partial transcript. The declared
//! length is checked against the duration cap before any sample is decoded.

use std::io::Cursor;

use super::{Audio, AudioError, check_format, check_length, finish};

/// Decodes a RIFF/WAVE file held in memory.
pub fn decode_wav(bytes: &[u8]) -> Result<Audio, AudioError> {
    let reader = hound::WavReader::new(Cursor::new(bytes)).map_err(wav_error)?;
    let spec = reader.spec();
    check_format(spec.channels, spec.sample_rate)?;
    check_length(u64::from(reader.duration()), spec.sample_rate)?;
    let interleaved: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Float, 32) => reader
            .into_samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(wav_error)?,
        (hound::SampleFormat::Int, bits @ 1..=32) => {
            // Full scale of a signed `bits`-wide integer: 16-bit -> 32768 (golden/README.md).
            let scale = 1.0 / (1u64 << (bits - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(wav_error)?
        }
        (format, bits) => {
            return Err(AudioError::UnsupportedFormat(format!(
                "wav {format:?} {bits}-bit"
            )));
        }
    };
    if !interleaved.len().is_multiple_of(usize::from(spec.channels)) {
        return Err(AudioError::Corrupt(
            "sample count is not a whole number of frames".into(),
        ));
    }
    finish(interleaved, spec.channels, spec.sample_rate)
}

fn wav_error(e: hound::Error) -> AudioError {
    match e {
        // The bytes are in memory: a read error can only mean the data ends early.
        hound::Error::IoError(_) => AudioError::Corrupt("wav data is truncated".into()),
        hound::Error::FormatError(why) => AudioError::Corrupt(format!("invalid wav: {why}")),
        hound::Error::Unsupported => AudioError::UnsupportedFormat("wav with this encoding".into()),
        other => AudioError::Corrupt(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav_bytes(spec: hound::WavSpec, samples: &[i32]) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
        for &s in samples {
            w.write_sample(s).unwrap();
        }
        w.finalize().unwrap();
        out.into_inner()
    }

    fn spec(channels: u16, rate: u32, bits: u16) -> hound::WavSpec {
        hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: bits,
            sample_format: hound::SampleFormat::Int,
        }
    }

    #[test]
    fn pcm16_scales_by_32768() {
        let bytes = wav_bytes(spec(1, 16_000, 16), &[16384, -32768, 0]);
        let audio = decode_wav(&bytes).unwrap();
        assert_eq!(audio.samples, vec![0.5, -1.0, 0.0]);
    }

    #[test]
    fn truncated_is_corrupt() {
        let bytes = wav_bytes(spec(1, 16_000, 16), &[1; 1000]);
        let err = decode_wav(&bytes[..bytes.len() - 11]).unwrap_err();
        assert!(matches!(err, AudioError::Corrupt(_)), "{err}");
    }

    #[test]
    fn garbage_after_riff_is_corrupt() {
        let mut bytes = b"RIFF\x10\0\0\0WAVEjunk".to_vec();
        bytes.extend_from_slice(&[0xff; 20]);
        assert!(decode_wav(&bytes).is_err());
    }

    #[test]
    fn absurd_rate_rejected_before_decoding() {
        let bytes = wav_bytes(spec(1, 192_000, 16), &[0; 10]);
        assert!(matches!(
            decode_wav(&bytes),
            Err(AudioError::BadSampleRate(192_000))
        ));
    }
}
