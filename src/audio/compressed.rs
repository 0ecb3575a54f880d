//! Compressed audio through symphonia's pure-Rust decoders: FLAC, Ogg/Vorbis,
//! MP3 and M4A/AAC (cargo feature `formats`, on by default).
//!
//! The container is sniffed from the bytes by symphonia's probe, never from a
//! file name or Content-Type. Frames are downmixed to mono as they are decoded
//! and the duration cap is enforced while decoding, so a bomb (a tiny file that
//! claims hours of audio) stops at the cap instead of filling memory. Opus is
//! not supported: there is no kept pure-Rust Opus decoder.

use std::io::Cursor;

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CODEC_TYPE_NULL, DecoderOptions};
use symphonia::core::errors::Error;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use super::{Audio, AudioError, MAX_AUDIO_SECS, check_format, finish};

/// Gapless playback trims encoder delay and padding (MP3's LAME header, AAC's
/// priming): without it the audio is shifted by tens of milliseconds.
const FORMAT_OPTIONS: FormatOptions = FormatOptions {
    enable_gapless: true,
    prebuild_seek_index: false,
    seek_index_fill_rate: 20,
};

/// Corrupt packets tolerated before the file is declared corrupt.
const MAX_BAD_PACKETS: usize = 16;

/// Decodes any container symphonia recognises; `None` when it recognises none.
pub(crate) fn decode_compressed(bytes: &[u8]) -> Option<Result<Audio, AudioError>> {
    let source = MediaSourceStream::new(Box::new(Cursor::new(bytes.to_vec())), Default::default());
    let probed = symphonia::default::get_probe()
        .format(
            &Hint::new(),
            source,
            &FORMAT_OPTIONS,
            &MetadataOptions::default(),
        )
        .ok()?;
    let skip = if bytes.len() > 8 && &bytes[4..8] == b"ftyp" {
        mp4_priming_samples(bytes)
    } else {
        0
    };
    Some(decode_probed(probed.format).map(|mut audio| {
        // Priming is in source samples; the audio is at 16 kHz now.
        let skip =
            (skip as f64 * 16_000.0 / f64::from(audio.source_rate_hz.max(1))).round() as usize;
        audio.samples.drain(..skip.min(audio.samples.len()));
        audio
    }))
}

/// Encoder priming of an MP4 audio track: the `media_time` of the first edit in
/// its `elst` box, in media timescale units (the sample rate for audio, as
/// encoders write it). symphonia 0.5 does not apply MP4 edit lists, so AAC would
/// start 1024 (or 2112) samples late.
fn mp4_priming_samples(bytes: &[u8]) -> u64 {
    let Some(at) = bytes.windows(4).position(|w| w == b"elst") else {
        return 0;
    };
    let body = &bytes[at + 4..];
    let be32 = |b: &[u8]| {
        b.get(..4)
            .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
    };
    let (Some(&version), Some(count)) = (body.first(), be32(body.get(4..).unwrap_or_default()))
    else {
        return 0;
    };
    if count == 0 {
        return 0;
    }
    let entry = body.get(8..).unwrap_or_default();
    let media_time: i64 = if version == 1 {
        entry
            .get(8..16)
            .map(|x| i64::from_be_bytes([x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]]))
            .unwrap_or(0)
    } else {
        entry
            .get(4..8)
            .map(|x| i64::from(i32::from_be_bytes([x[0], x[1], x[2], x[3]])))
            .unwrap_or(0)
    };
    // Sanity: priming is a few thousand samples at most.
    if (1..=16_384).contains(&media_time) {
        media_time as u64
    } else {
        0
    }
}

fn decode_probed(
    mut format: Box<dyn symphonia::core::formats::FormatReader>,
) -> Result<Audio, AudioError> {
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| AudioError::Corrupt("no audio track".into()))?;
    let track_id = track.id;
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| AudioError::UnsupportedFormat(format!("codec: {e}")))?;
    let mut rate_hz = track.codec_params.sample_rate.unwrap_or(0);
    let mut channels = track
        .codec_params
        .channels
        .map(|c| c.count() as u16)
        .unwrap_or(0);
    if rate_hz != 0 && channels != 0 {
        check_format(channels, rate_hz)?;
    }
    let mut mono: Vec<f32> = Vec::new();
    let mut buffer: Option<SampleBuffer<f32>> = None;
    let mut bad_packets = 0;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(Error::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(Error::ResetRequired) => break,
            Err(e) => return Err(AudioError::Corrupt(e.to_string())),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            Err(Error::DecodeError(_)) if bad_packets < MAX_BAD_PACKETS => {
                bad_packets += 1;
                continue;
            }
            Err(e) => return Err(AudioError::Corrupt(e.to_string())),
        };
        let spec = *decoded.spec();
        if rate_hz == 0 || channels == 0 {
            rate_hz = spec.rate;
            channels = spec.channels.count() as u16;
            check_format(channels, rate_hz)?;
        }
        let buf = match buffer.as_mut() {
            Some(b) if b.capacity() >= decoded.capacity() * spec.channels.count() => b,
            _ => buffer.insert(SampleBuffer::new(decoded.capacity() as u64, spec)),
        };
        buf.copy_interleaved_ref(decoded);
        let n = usize::from(channels.max(1));
        mono.extend(
            buf.samples()
                .chunks_exact(n)
                .map(|f| f.iter().sum::<f32>() / n as f32),
        );
        if mono.len() as f64 > f64::from(MAX_AUDIO_SECS) * f64::from(rate_hz.max(1)) {
            return Err(AudioError::TooLong {
                secs: mono.len() as f64 / f64::from(rate_hz.max(1)),
                max_secs: MAX_AUDIO_SECS,
            });
        }
    }
    if mono.is_empty() {
        return Err(AudioError::Corrupt("no audio decoded".into()));
    }
    finish(mono, 1, rate_hz).map(|mut a| {
        a.source_channels = channels;
        a
    })
}
