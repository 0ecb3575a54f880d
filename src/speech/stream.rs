//! Utterance segmentation for live audio: partial results while speech goes
//! on, a final one at each pause.
//!
//! Samples (16 kHz) go through the Silero VAD window by window. Speech starts at
//! a window with p >= 0.5 and ends after [`END_SILENCE_SECS`] of windows with
//! p < 0.35 (silero's thresholds); that end is a cut: everything since the last
//! cut becomes one utterance for a final result. Before any speech only the
//! last [`PRE_ROLL_SECS`] are kept, so memory stays flat on silent streams, and
//! an utterance never grows past [`segment::MAX_SEGMENT_SECS`](super::segment::MAX_SEGMENT_SECS).

use super::SpeechError;
use super::segment::MAX_SEGMENT_SECS;
use super::vad::{SpeechParams, VAD_WINDOW, VadStream};

/// Silence that ends an utterance, in seconds.
pub const END_SILENCE_SECS: f64 = 0.6;
/// Audio kept before speech starts, in seconds.
pub const PRE_ROLL_SECS: f64 = 1.0;
/// New speech between two partial results, in seconds.
pub const PARTIAL_EVERY_SECS: f64 = 1.0;

const RATE: f64 = super::SAMPLE_RATE_HZ as f64;

/// Something the caller should transcribe.
#[derive(Debug, Clone, PartialEq)]
pub enum Utterance {
    /// Speech goes on: the utterance so far, for a partial result.
    Partial {
        /// Samples since the last cut.
        samples: Vec<f32>,
        /// Stream position of the first sample.
        offset_samples: usize,
    },
    /// A pause (or the length cap) closed the utterance.
    Final {
        /// Samples of the utterance.
        samples: Vec<f32>,
        /// Stream position of the first sample.
        offset_samples: usize,
    },
}

/// Online endpointing over a VAD stream.
#[derive(Debug)]
pub struct UtteranceTracker {
    vad: VadStream,
    params: SpeechParams,
    /// Samples since the last cut; `buf[0]` is stream sample `buf_start`.
    buf: Vec<f32>,
    buf_start: usize,
    /// Samples received in total.
    total: usize,
    /// Windows scored so far.
    windows: usize,
    in_speech: bool,
    speech_seen: bool,
    silence_samples: usize,
    since_partial: usize,
    probs: Vec<f32>,
}

impl UtteranceTracker {
    /// A tracker over a fresh VAD stream.
    pub fn new(vad: VadStream) -> UtteranceTracker {
        UtteranceTracker {
            vad,
            params: SpeechParams::default(),
            buf: Vec::new(),
            buf_start: 0,
            total: 0,
            windows: 0,
            in_speech: false,
            speech_seen: false,
            silence_samples: 0,
            since_partial: 0,
            probs: Vec::new(),
        }
    }

    /// Seconds of audio received.
    pub fn received_secs(&self) -> f64 {
        self.total as f64 / RATE
    }

    /// Feeds samples; returns utterances to transcribe, in order.
    pub fn push(&mut self, samples: &[f32]) -> Result<Vec<Utterance>, SpeechError> {
        let mut out = Vec::new();
        self.buf.extend_from_slice(samples);
        self.total += samples.len();
        self.probs.clear();
        self.vad.push(samples, &mut self.probs)?;
        let probs = std::mem::take(&mut self.probs);
        for &p in &probs {
            self.windows += 1;
            let window_end = (self.windows * VAD_WINDOW).min(self.total);
            if p >= self.params.threshold {
                self.in_speech = true;
                self.speech_seen = true;
                self.silence_samples = 0;
            } else if self.in_speech && p < self.params.neg_threshold {
                self.silence_samples += VAD_WINDOW;
                if self.silence_samples as f64 >= END_SILENCE_SECS * RATE
                    && let Some(u) = self.cut(window_end)
                {
                    out.push(u);
                }
            }
            if self.in_speech {
                self.since_partial += VAD_WINDOW;
            }
        }
        self.probs = probs;
        if !self.speech_seen {
            let keep = (PRE_ROLL_SECS * RATE) as usize;
            if self.buf.len() > keep {
                let drop = self.buf.len() - keep;
                self.buf.drain(..drop);
                self.buf_start += drop;
            }
        }
        if self.buf.len() as f64 >= MAX_SEGMENT_SECS * RATE {
            if let Some(u) = self.cut(self.total) {
                out.push(u);
            }
        } else if self.in_speech && self.since_partial as f64 >= PARTIAL_EVERY_SECS * RATE {
            self.since_partial = 0;
            out.push(Utterance::Partial {
                samples: self.buf.clone(),
                offset_samples: self.buf_start,
            });
        }
        Ok(out)
    }

    /// Ends the stream: everything since the last cut, if it held speech.
    pub fn flush(&mut self) -> Option<Utterance> {
        let end = self.total;
        if self.speech_seen {
            self.cut(end)
        } else {
            None
        }
    }

    /// Closes the utterance at stream position `at`.
    fn cut(&mut self, at: usize) -> Option<Utterance> {
        let len = at.saturating_sub(self.buf_start).min(self.buf.len());
        let samples: Vec<f32> = self.buf.drain(..len).collect();
        let offset_samples = self.buf_start;
        self.buf_start += len;
        self.in_speech = false;
        self.speech_seen = false;
        self.silence_samples = 0;
        self.since_partial = 0;
        (!samples.is_empty()).then_some(Utterance::Final {
            samples,
            offset_samples,
        })
    }
}
