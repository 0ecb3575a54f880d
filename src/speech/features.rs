//! Log-mel front end of GigaAM v3 (rules in golden/README.md).
//!
//! 16 kHz mono -> frames of 320 samples every 160 (no centering, no padding),
//! periodic Hann window and HTK mel filterbank as stored, bf16-rounded, in the
//! v3 checkpoint (the exact float32 values change low-energy bins by up to 10),
//! power spectrum, 64 mel bins, `ln(clamp(x, 1e-9, 1e9))`. Computed in f64 so
//! the result sits within float32 rounding of GigaAM's torch front end.

use std::sync::Arc;

use rustfft::{Fft, FftPlanner, num_complex::Complex};

/// FFT size and window length in samples (golden/README.md: n_fft = win = 320).
pub const N_FFT: usize = 320;
/// Hop between frames in samples (golden/README.md: hop 160).
pub const HOP: usize = 160;
/// Mel bins (golden/README.md: 64, HTK, no norm).
pub const N_MELS: usize = 64;
/// Frequency bins of a real FFT of [`N_FFT`] points.
pub const N_FREQS: usize = N_FFT / 2 + 1;
/// Smallest and largest mel energy before the log (golden/README.md).
const CLAMP_MIN: f64 = 1e-9;
const CLAMP_MAX: f64 = 1e9;

/// The checkpoint's Hann window, bf16-rounded (from onnx-asr's fbanks.npz, MIT).
static WINDOW_F32: &[u8] = include_bytes!("assets/gigaam_v3_window.f32");
/// The checkpoint's mel filterbank [161, 64] row-major, bf16-rounded.
static MEL_FB_F32: &[u8] = include_bytes!("assets/gigaam_v3_mel_fb.f32");

/// Log-mel features `[N_MELS, frames]` row-major, as the encoder takes them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MelFrames {
    /// `data[m * frames + t]`.
    pub data: Vec<f32>,
    /// Number of frames (time steps).
    pub frames: usize,
}

/// Computes log-mel features; reusable across calls (holds the FFT plan).
pub struct FeatureExtractor {
    window: Vec<f64>,
    /// `[N_FREQS, N_MELS]` row-major.
    mel_fb: Vec<f64>,
    fft: Arc<dyn Fft<f64>>,
}

impl std::fmt::Debug for FeatureExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureExtractor").finish_non_exhaustive()
    }
}

impl Default for FeatureExtractor {
    fn default() -> Self {
        Self::new()
    }
}

impl FeatureExtractor {
    /// Builds the extractor from the window and filterbank compiled into the binary.
    pub fn new() -> FeatureExtractor {
        let window = le_f32s(WINDOW_F32);
        let mel_fb = le_f32s(MEL_FB_F32);
        assert_eq!(window.len(), N_FFT, "window asset has 320 values");
        assert_eq!(
            mel_fb.len(),
            N_FREQS * N_MELS,
            "filterbank asset is [161, 64]"
        );
        FeatureExtractor {
            window,
            mel_fb,
            fft: FftPlanner::new().plan_fft_forward(N_FFT),
        }
    }

    /// Number of frames for `num_samples` (0 below one window).
    pub fn num_frames(num_samples: usize) -> usize {
        if num_samples < N_FFT {
            0
        } else {
            (num_samples - N_FFT) / HOP + 1
        }
    }

    /// Log-mel of 16 kHz samples. Fewer than 320 samples give zero frames.
    pub fn log_mel(&self, samples: &[f32]) -> MelFrames {
        let frames = Self::num_frames(samples.len());
        let mut data = vec![0.0f32; N_MELS * frames];
        let mut buf = vec![Complex::new(0.0f64, 0.0); N_FFT];
        let mut scratch = vec![Complex::new(0.0f64, 0.0); self.fft.get_inplace_scratch_len()];
        let mut power = [0.0f64; N_FREQS];
        for t in 0..frames {
            let chunk = &samples[t * HOP..t * HOP + N_FFT];
            for ((b, &x), &w) in buf.iter_mut().zip(chunk).zip(&self.window) {
                *b = Complex::new(f64::from(x) * w, 0.0);
            }
            self.fft.process_with_scratch(&mut buf, &mut scratch);
            for (p, c) in power.iter_mut().zip(&buf) {
                *p = c.norm_sqr();
            }
            // Each bin's energy sums its terms in frequency order, as a
            // loop per bin would; frequency outside, the bins vectorise.
            let mut energy = [0.0f64; N_MELS];
            for (&p, row) in power.iter().zip(self.mel_fb.chunks_exact(N_MELS)) {
                for (e, &w) in energy.iter_mut().zip(row) {
                    *e += p * w;
                }
            }
            for (m, e) in energy.iter().enumerate() {
                data[m * frames + t] = e.clamp(CLAMP_MIN, CLAMP_MAX).ln() as f32;
            }
        }
        MelFrames { data, frames }
    }
}

fn le_f32s(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(4)
        .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_count_rule() {
        assert_eq!(FeatureExtractor::num_frames(319), 0);
        assert_eq!(FeatureExtractor::num_frames(320), 1);
        assert_eq!(FeatureExtractor::num_frames(8001), 49);
        assert_eq!(FeatureExtractor::num_frames(64000), 399);
    }

    #[test]
    fn silence_is_log_clamp_floor() {
        let mel = FeatureExtractor::new().log_mel(&[0.0; 1600]);
        assert_eq!(mel.frames, 9);
        assert!(mel.data.iter().all(|&v| (v - (-20.723267)).abs() < 1e-5));
    }

    /// The energies summed bin by bin, each over the frequencies in order
    /// (the plain form of the loop in `log_mel`): the same bits.
    #[test]
    fn energies_are_the_per_bin_sums_bit_for_bit() {
        let extractor = FeatureExtractor::new();
        let samples: Vec<f32> = (0..16_000u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) as f32 / 8_388_608.0 - 1.0) * 0.3)
            .collect();
        let mel = extractor.log_mel(&samples);
        let mut buf = vec![Complex::new(0.0f64, 0.0); N_FFT];
        for t in [0, 1, mel.frames / 2, mel.frames - 1] {
            let chunk = &samples[t * HOP..t * HOP + N_FFT];
            for ((b, &x), &w) in buf.iter_mut().zip(chunk).zip(&extractor.window) {
                *b = Complex::new(f64::from(x) * w, 0.0);
            }
            extractor.fft.process(&mut buf);
            for m in 0..N_MELS {
                let mut energy = 0.0;
                for (f, c) in buf.iter().take(N_FREQS).enumerate() {
                    energy += c.norm_sqr() * extractor.mel_fb[f * N_MELS + m];
                }
                let expected = energy.clamp(CLAMP_MIN, CLAMP_MAX).ln() as f32;
                assert_eq!(mel.data[m * mel.frames + t].to_bits(), expected.to_bits());
            }
        }
    }

    #[test]
    fn short_input_gives_no_frames() {
        let mel = FeatureExtractor::new().log_mel(&[0.1; 160]);
        assert_eq!(mel.frames, 0);
        assert!(mel.data.is_empty());
    }
}
