//! Silero VAD (openvino 16 kHz graph, compiled into the binary) and the
//! speech-timestamp rule of silero's `get_speech_timestamps`.
//!
//! Chunking (models/silero-vad/README.md): 512-sample windows from sample 0, the
//! last zero-padded; model input = 64 samples of context (the tail of the
//! previous input) + 512 new; state [2, 1, 128] carried; one probability per
//! 32 ms window.

use std::ops::Range;
use std::path::Path;

use tract_onnx::prelude::*;

use super::SpeechError;
use super::error::inference;
use super::model::{Plan, load_fixed_bytes};
use super::rnnt::{input_positions, ordered};

/// New samples per VAD window (32 ms at 16 kHz).
pub const VAD_WINDOW: usize = 512;
/// Context samples prepended to each window.
const VAD_CONTEXT: usize = 64;
/// Silero state shape.
const STATE_SHAPE: [usize; 3] = [2, 1, 128];

static SILERO_ONNX: &[u8] = include_bytes!("assets/silero_vad_16k.onnx");

/// Loads the built-in Silero VAD graph.
pub(crate) fn load_vad() -> Result<Plan, SpeechError> {
    load_fixed_bytes(SILERO_ONNX, Path::new("silero_vad_16k.onnx (built in)"))
}

/// Streaming VAD over 16 kHz samples: feed any amount, get one prob per window.
pub struct VadStream {
    state: TypedSimpleState,
    inputs: [usize; 2],
    rnn_state: Tensor,
    window: Vec<f32>,
    pending: Vec<f32>,
}

impl std::fmt::Debug for VadStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VadStream")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl VadStream {
    pub(crate) fn new(plan: &Plan) -> Result<VadStream, SpeechError> {
        Ok(VadStream {
            state: plan.spawn().map_err(inference)?,
            inputs: input_positions(plan, ["input", "state"])?,
            rnn_state: Tensor::zero::<f32>(&STATE_SHAPE).map_err(inference)?,
            window: vec![0.0; VAD_CONTEXT + VAD_WINDOW],
            pending: Vec::with_capacity(VAD_WINDOW),
        })
    }

    /// Back to the start-of-stream state.
    pub fn reset(&mut self) -> Result<(), SpeechError> {
        self.rnn_state = Tensor::zero::<f32>(&STATE_SHAPE).map_err(inference)?;
        self.window.iter_mut().for_each(|v| *v = 0.0);
        self.pending.clear();
        Ok(())
    }

    /// Feeds samples; appends one probability per completed window.
    pub fn push(&mut self, samples: &[f32], probs: &mut Vec<f32>) -> Result<(), SpeechError> {
        let mut rest = samples;
        while !rest.is_empty() {
            let take = (VAD_WINDOW - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() == VAD_WINDOW {
                probs.push(self.run_window()?);
            }
        }
        Ok(())
    }

    /// Ends the stream: a partial last window is zero-padded and scored.
    pub fn finish(&mut self, probs: &mut Vec<f32>) -> Result<(), SpeechError> {
        if !self.pending.is_empty() {
            self.pending.resize(VAD_WINDOW, 0.0);
            probs.push(self.run_window()?);
        }
        Ok(())
    }

    fn run_window(&mut self) -> Result<f32, SpeechError> {
        // Context = last 64 samples of the previous input.
        self.window.copy_within(VAD_WINDOW.., 0);
        self.window[VAD_CONTEXT..].copy_from_slice(&self.pending);
        self.pending.clear();
        let input =
            Tensor::from_shape(&[1, VAD_CONTEXT + VAD_WINDOW], &self.window).map_err(inference)?;
        let inputs = ordered(self.inputs, [input, self.rnn_state.clone()]);
        let mut out = super::tune::run_clean(&mut self.state, inputs).map_err(inference)?;
        if out.len() != 2 {
            return Err(SpeechError::Inference(
                "VAD must return output, stateN".into(),
            ));
        }
        self.rnn_state = out.remove(1).into_tensor();
        let prob = out[0]
            .try_as_plain_ram()
            .and_then(|v| v.as_slice::<f32>().map(|s| s.first().copied()))
            .map_err(inference)?
            .ok_or_else(|| SpeechError::Inference("empty VAD output".into()))?;
        Ok(prob)
    }
}

/// Parameters of silero's `get_speech_timestamps` (its defaults).
#[derive(Debug, Clone, Copy)]
pub struct SpeechParams {
    /// Probability at or above which a window is speech.
    pub threshold: f32,
    /// Probability below which speech may end.
    pub neg_threshold: f32,
    /// Shortest speech kept, in samples.
    pub min_speech_samples: usize,
    /// Silence needed to end speech, in samples.
    pub min_silence_samples: usize,
    /// Padding added around speech, in samples.
    pub speech_pad_samples: usize,
}

impl Default for SpeechParams {
    fn default() -> Self {
        SpeechParams {
            threshold: 0.5,
            neg_threshold: 0.35,
            min_speech_samples: 4_000,
            min_silence_samples: 1_600,
            speech_pad_samples: 480,
        }
    }
}

/// Speech regions (sample ranges) from per-window probabilities, as silero does.
pub fn speech_timestamps(probs: &[f32], num_samples: usize, p: &SpeechParams) -> Vec<Range<usize>> {
    let mut speeches: Vec<Range<usize>> = Vec::new();
    let mut start: Option<usize> = None;
    let mut temp_end = 0usize;
    for (i, &prob) in probs.iter().enumerate() {
        let pos = VAD_WINDOW * i;
        if prob >= p.threshold && temp_end != 0 {
            temp_end = 0;
        }
        let Some(s) = start else {
            if prob >= p.threshold {
                start = Some(pos);
            }
            continue;
        };
        if prob < p.neg_threshold {
            if temp_end == 0 {
                temp_end = pos;
            }
            if pos - temp_end < p.min_silence_samples {
                continue;
            }
            if temp_end - s > p.min_speech_samples {
                speeches.push(s..temp_end);
            }
            start = None;
            temp_end = 0;
        }
    }
    if let Some(s) = start
        && num_samples.saturating_sub(s) > p.min_speech_samples
    {
        speeches.push(s..num_samples);
    }
    let pad = p.speech_pad_samples;
    let n = speeches.len();
    for i in 0..n {
        if i == 0 {
            speeches[0].start = speeches[0].start.saturating_sub(pad);
        }
        if i + 1 < n {
            let silence = speeches[i + 1].start.saturating_sub(speeches[i].end);
            if silence < 2 * pad {
                speeches[i].end += silence / 2;
                speeches[i + 1].start = speeches[i + 1].start.saturating_sub(silence / 2);
            } else {
                speeches[i].end = (speeches[i].end + pad).min(num_samples);
                speeches[i + 1].start = speeches[i + 1].start.saturating_sub(pad);
            }
        } else {
            speeches[i].end = (speeches[i].end + pad).min(num_samples);
        }
    }
    speeches
}
