//! Audio in: bytes of a container or raw PCM frames -> 16 kHz mono `f32` in [-1, 1].
//!
//! This module knows nothing of models or HTTP. WAV is decoded with `hound`,
//! other rates are brought to 16 kHz by a band-limited windowed-sinc resampler
//! (`resample.rs`), and WebSocket PCM16 frames go through `pcm.rs`.

#[cfg(feature = "formats")]
mod compressed;
pub mod pcm;
pub mod resample;
pub mod wav;

use std::fmt;

/// Sample rate the engine runs at (GigaAM v3: golden/README.md).
pub const ENGINE_RATE_HZ: u32 = 16_000;
/// Lowest input sample rate we accept.
pub const MIN_RATE_HZ: u32 = 8_000;
/// Highest input sample rate we accept.
pub const MAX_RATE_HZ: u32 = 48_000;
/// Longest audio we decode, in seconds (2 h: 460 MB of f32 at 16 kHz).
pub const MAX_AUDIO_SECS: u32 = 2 * 60 * 60;
/// Most channels we downmix.
pub const MAX_CHANNELS: u16 = 32;

/// Decoded audio at [`ENGINE_RATE_HZ`], mono.
#[derive(Debug, Clone, Default)]
pub struct Audio {
    /// Samples in [-1, 1] at 16 kHz.
    pub samples: Vec<f32>,
    /// Sample rate of the input before resampling.
    pub source_rate_hz: u32,
    /// Channel count of the input before downmixing.
    pub source_channels: u16,
}

impl Audio {
    /// Duration in seconds.
    pub fn duration_secs(&self) -> f64 {
        self.samples.len() as f64 / f64::from(ENGINE_RATE_HZ)
    }
}

/// Why audio could not be decoded. Each variant has one message a user can act on.
#[derive(Debug)]
#[non_exhaustive]
pub enum AudioError {
    /// No bytes at all.
    Empty,
    /// The bytes are not a container we can read; names what we support.
    UnsupportedFormat(String),
    /// A WAV file that is broken or truncated.
    Corrupt(String),
    /// Channel count of zero or above [`MAX_CHANNELS`].
    BadChannels(u16),
    /// Sample rate outside [`MIN_RATE_HZ`]..=[`MAX_RATE_HZ`].
    BadSampleRate(u32),
    /// Longer than the cap.
    TooLong { secs: f64, max_secs: u32 },
    /// Reading the input failed.
    Io(std::io::Error),
}

impl fmt::Display for AudioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AudioError::Empty => write!(f, "empty audio: no bytes received"),
            AudioError::UnsupportedFormat(what) => write!(
                f,
                "unsupported audio format ({what}); supported: {}",
                supported_formats().join(", ")
            ),
            AudioError::Corrupt(why) => write!(f, "corrupt audio: {why}"),
            AudioError::BadChannels(n) => {
                write!(f, "unsupported channel count {n} (1..={MAX_CHANNELS})")
            }
            AudioError::BadSampleRate(hz) => write!(
                f,
                "unsupported sample rate {hz} Hz ({MIN_RATE_HZ}..={MAX_RATE_HZ} Hz)"
            ),
            AudioError::TooLong { secs, max_secs } => {
                write!(f, "audio too long: {secs:.0} s (limit {max_secs} s)")
            }
            AudioError::Io(e) => write!(f, "reading audio failed: {e}"),
        }
    }
}

impl std::error::Error for AudioError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AudioError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for AudioError {
    fn from(e: std::io::Error) -> Self {
        AudioError::Io(e)
    }
}

/// Container formats this build decodes.
pub fn supported_formats() -> Vec<&'static str> {
    let mut formats = vec!["wav (PCM 8/16/24/32-bit, float32)"];
    if cfg!(feature = "formats") {
        formats.extend(["flac", "ogg/vorbis", "mp3", "m4a/aac"]);
    }
    formats
}

/// Decodes a whole file's bytes (format sniffed from content, never from a name).
pub fn decode(bytes: &[u8]) -> Result<Audio, AudioError> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    if bytes.len() >= 12 && (&bytes[0..4] == b"RIFF" || &bytes[0..4] == b"RIFX") {
        return wav::decode_wav(bytes);
    }
    #[cfg(feature = "formats")]
    if let Some(result) = compressed::decode_compressed(bytes) {
        return result;
    }
    Err(AudioError::UnsupportedFormat(sniff(bytes).to_string()))
}

/// A short name for what the bytes look like, for error messages.
fn sniff(bytes: &[u8]) -> &'static str {
    let starts = |magic: &[u8]| bytes.starts_with(magic);
    if starts(b"fLaC") {
        "flac"
    } else if starts(b"OggS") {
        "ogg"
    } else if starts(b"ID3") || (bytes.len() > 1 && bytes[0] == 0xFF && bytes[1] & 0xE0 == 0xE0) {
        "mp3"
    } else if bytes.len() > 8 && &bytes[4..8] == b"ftyp" {
        "mp4/m4a"
    } else if starts(b"\x1a\x45\xdf\xa3") {
        "webm/matroska"
    } else {
        "unknown"
    }
}

/// Downmixes interleaved frames to mono by averaging, checks limits, resamples to 16 kHz.
pub(crate) fn finish(
    interleaved: Vec<f32>,
    channels: u16,
    rate_hz: u32,
) -> Result<Audio, AudioError> {
    check_format(channels, rate_hz)?;
    let mono = if channels == 1 {
        interleaved
    } else {
        let n = usize::from(channels);
        interleaved
            .chunks_exact(n)
            .map(|frame| frame.iter().sum::<f32>() / f32::from(channels))
            .collect()
    };
    let samples = resample::to_engine_rate(&mono, rate_hz);
    Ok(Audio {
        samples,
        source_rate_hz: rate_hz,
        source_channels: channels,
    })
}

/// Checks channel count, rate and declared length before any sample is decoded.
pub(crate) fn check_format(channels: u16, rate_hz: u32) -> Result<(), AudioError> {
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(AudioError::BadChannels(channels));
    }
    if !(MIN_RATE_HZ..=MAX_RATE_HZ).contains(&rate_hz) {
        return Err(AudioError::BadSampleRate(rate_hz));
    }
    Ok(())
}

/// Fails when `frames` at `rate_hz` exceeds [`MAX_AUDIO_SECS`].
pub(crate) fn check_length(frames: u64, rate_hz: u32) -> Result<(), AudioError> {
    let secs = frames as f64 / f64::from(rate_hz.max(1));
    if secs > f64::from(MAX_AUDIO_SECS) {
        return Err(AudioError::TooLong {
            secs,
            max_secs: MAX_AUDIO_SECS,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_error() {
        assert!(matches!(decode(&[]), Err(AudioError::Empty)));
    }

    #[test]
    fn unknown_bytes_name_supported_formats() {
        let err = decode(b"\x1a\x45\xdf\xa3 not really webm").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("webm"), "{msg}");
        assert!(msg.contains("wav"), "{msg}");
    }

    #[test]
    fn garbage_is_unsupported_not_a_panic() {
        for bytes in [
            &b"hello world, not audio"[..],
            &[0u8; 64][..],
            &b"fLaC\0\0\0\0"[..],
            &b"OggS"[..],
        ] {
            assert!(decode(bytes).is_err());
        }
    }

    #[test]
    fn downmix_averages_channels() {
        let audio = finish(vec![1.0, 0.0, 0.5, 0.5], 2, 16_000).unwrap();
        assert_eq!(audio.samples, vec![0.5, 0.5]);
    }

    #[test]
    fn rejects_absurd_rates_and_channels() {
        assert!(matches!(
            check_format(0, 16_000),
            Err(AudioError::BadChannels(0))
        ));
        assert!(matches!(
            check_format(1, 7_999),
            Err(AudioError::BadSampleRate(_))
        ));
        assert!(matches!(
            check_format(1, 96_000),
            Err(AudioError::BadSampleRate(_))
        ));
        assert!(check_length(u64::from(MAX_AUDIO_SECS) * 16_000 + 16_001, 16_000).is_err());
    }
}
