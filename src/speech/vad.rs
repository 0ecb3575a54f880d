//! Silero VAD (openvino 16 kHz graph, compiled into the binary) and the
//! speech-timestamp rule of silero's `get_speech_timestamps`.
//!
//! Chunking (models/silero-vad/README.md): 512-sample windows from sample 0, the
//! last zero-padded; model input = 64 samples of context (the tail of the
//! previous input) + 512 new; state [2, 1, 128] carried; one probability per
//! 32 ms window.
//!
//! The graph is cut in two where the state first comes in ([`split`]). The
//! front (STFT and four convolutions, most of the work) does not depend on the
//! state, so it runs on up to [`VAD_BATCH`] windows at once, split across the
//! encoder's pool when there is one; the back (LSTM and decoder) then runs
//! window by window. Per window, the numbers are those of the whole graph.

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;

use tract_linalg::multithread::{Executor, par_chunks_mut};
use tract_onnx::pb::{ModelProto, NodeProto, ValueInfoProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::bail;

use super::SpeechError;
use super::error::inference;
use super::model::{Plan, invalid};
use super::pool::Pool;
use super::rnnt::ordered;

/// New samples per VAD window (32 ms at 16 kHz).
pub const VAD_WINDOW: usize = 512;
/// Most windows scored by one run of the front half (2 s of audio): bounds
/// its buffers (under 1 MiB) whatever the length of the audio pushed at once.
/// 256 ran no faster (60 s: 59-62 ms at one thread, 45-51 ms at two).
pub const VAD_BATCH: usize = 64;
/// Fewest windows of a batch worth splitting across the pool.
const VAD_SPLIT_MIN: usize = 64;
/// Context samples prepended to each window.
const VAD_CONTEXT: usize = 64;
/// One model input: context + window.
const VAD_ROW: usize = VAD_CONTEXT + VAD_WINDOW;
/// Width of what the front half hands the back half, per window: checked
/// against the graph at load; the buffers are sized from the graph.
const VAD_FEATURES: usize = 128;
/// Silero state shape.
const STATE_SHAPE: [usize; 3] = [2, 1, 128];
/// The graph's input names.
const AUDIO_INPUT: &str = "input";
const STATE_INPUT: &str = "state";

static SILERO_ONNX: &[u8] = include_bytes!("assets/silero_vad_16k.onnx");

/// The built-in Silero graph, cut in two ([`split`]), and where to run it.
#[derive(Clone)]
pub(crate) struct VadPlans {
    /// `input [N, 576]` -> the features of N windows (128 each, window-major).
    front: Plan,
    /// features of one window, `state` -> `output`, `stateN`.
    back: Plan,
    /// Shape of one window's features.
    crossing: Vec<usize>,
    /// The encoder's pool, for batches worth splitting.
    pool: Pool,
}

impl VadPlans {
    /// Values per window in the front's output (the crossing tensor's size).
    fn per_window(&self) -> usize {
        self.crossing.iter().product()
    }
}

/// Loads the built-in Silero VAD graph as its two halves.
pub(crate) fn load_vad(pool: Pool) -> Result<VadPlans, SpeechError> {
    let name = Path::new("silero_vad_16k.onnx (built in)");
    let err = invalid(name);
    let onnx = tract_onnx::onnx();
    let proto = onnx
        .proto_model_for_read(&mut &SILERO_ONNX[..])
        .map_err(&err)?;
    let (front, back) = split(&proto).map_err(|why| SpeechError::ModelInvalid {
        file: name.to_path_buf(),
        why,
    })?;
    let mut front = onnx.model_for_proto_model(&front).map_err(&err)?;
    let windows = front.symbols.sym("N");
    front
        .set_input_fact(0, f32::fact([windows.to_dim(), VAD_ROW.to_dim()]).into())
        .map_err(&err)?;
    // A split batch is already one piece per thread: the front's own matmuls
    // stay on the thread that runs them.
    let single = RunOptions {
        executor: Some(Executor::SingleThread),
        ..Default::default()
    };
    let front = front
        .into_optimized()
        .and_then(|m| m.into_runnable_with_options(&single))
        .map_err(&err)?;
    // The crossing tensor's shape for one window: the batch axis set to 1.
    // Only axes of 1 may precede it, so that each window's features are one
    // contiguous run of the front's output.
    let out_shape = front.model().output_fact(0).map_err(&err)?.shape.clone();
    let batch_axis = out_shape.iter().position(|d| *d == windows.to_dim());
    let crossing: Option<Vec<usize>> = batch_axis.and_then(|axis| {
        out_shape
            .iter()
            .enumerate()
            .map(|(i, d)| match d.to_i64() {
                _ if i == axis => Some(1),
                Ok(1) => Some(1),
                Ok(n) if i > axis => usize::try_from(n).ok(),
                _ => None,
            })
            .collect()
    });
    let crossing = crossing
        .filter(|dims| dims.iter().product::<usize>() == VAD_FEATURES)
        .ok_or_else(|| SpeechError::ModelInvalid {
            file: name.to_path_buf(),
            why: format!(
                "the VAD front's output is not {VAD_FEATURES} per window, window-major: {out_shape:?}"
            ),
        })?;
    let mut back = onnx.model_for_proto_model(&back).map_err(&err)?;
    back.set_input_fact(0, f32::fact(&crossing).into())
        .map_err(&err)?;
    back.set_input_fact(1, f32::fact(STATE_SHAPE).into())
        .map_err(&err)?;
    let back = back
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(&err)?;
    Ok(VadPlans {
        front,
        back,
        crossing,
        pool,
    })
}

/// Cuts Silero's graph where the state comes in: the front holds every node
/// that depends on the audio and not on the state, the back every node that
/// depends on the state, and both the constants. Exactly one tensor may cross
/// from front to back; it becomes the front's output and the back's first
/// input (`state` is the second).
fn split(proto: &ModelProto) -> Result<(ModelProto, ModelProto), String> {
    let graph = proto.graph.as_ref().ok_or("no graph")?;
    let mut from_audio: HashSet<&str> = HashSet::from([AUDIO_INPUT]);
    let mut from_state: HashSet<&str> = HashSet::from([STATE_INPUT]);
    let mut front: Vec<NodeProto> = Vec::new();
    let mut back: Vec<NodeProto> = Vec::new();
    let mut crossing: Vec<&str> = Vec::new();
    // ONNX lists nodes in topological order.
    for node in &graph.node {
        let inputs = || node.input.iter().map(String::as_str);
        let outputs = node.output.iter().map(String::as_str);
        if inputs().any(|i| from_state.contains(i)) {
            crossing.extend(inputs().filter(|i| *i != AUDIO_INPUT && from_audio.contains(i)));
            from_state.extend(outputs);
            back.push(node.clone());
        } else if inputs().any(|i| from_audio.contains(i)) {
            from_audio.extend(outputs);
            front.push(node.clone());
        } else {
            front.push(node.clone());
            back.push(node.clone());
        }
    }
    crossing.sort_unstable();
    crossing.dedup();
    let [cut] = crossing[..] else {
        return Err(format!(
            "expected one tensor from the audio half to the state half, found {crossing:?}"
        ));
    };
    if let Some(o) = graph
        .output
        .iter()
        .find(|o| !from_state.contains(o.name.as_str()))
    {
        return Err(format!("output {:?} does not depend on the state", o.name));
    }
    let input = |name: &str| {
        graph
            .input
            .iter()
            .find(|i| i.name == name)
            .cloned()
            .ok_or(format!("no graph input {name:?}"))
    };
    let audio = input(AUDIO_INPUT)?;
    let state = input(STATE_INPUT)?;
    let mut front_proto = proto.clone();
    if let Some(g) = front_proto.graph.as_mut() {
        g.node = front;
        g.input = vec![audio.clone()];
        g.output = vec![ValueInfoProto {
            name: cut.to_string(),
            ..audio.clone()
        }];
    }
    let mut back_proto = proto.clone();
    if let Some(g) = back_proto.graph.as_mut() {
        g.node = back;
        g.input = vec![
            ValueInfoProto {
                name: cut.to_string(),
                ..audio
            },
            state,
        ];
    }
    Ok((front_proto, back_proto))
}

/// Streaming VAD over 16 kHz samples: feed any amount, get one prob per window.
pub struct VadStream {
    plans: VadPlans,
    front: TypedSimpleState,
    back: TypedSimpleState,
    rnn_state: Tensor,
    /// Model inputs waiting for the front half, `VAD_ROW` each.
    batch: Vec<f32>,
    /// The front half's output for `batch`, `per_window` values each.
    features: Vec<f32>,
    /// The last `VAD_CONTEXT` samples of the previous input.
    context: Vec<f32>,
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
    pub(crate) fn new(plans: &VadPlans) -> Result<VadStream, SpeechError> {
        Ok(VadStream {
            plans: plans.clone(),
            front: plans.front.spawn().map_err(inference)?,
            back: plans.back.spawn().map_err(inference)?,
            rnn_state: Tensor::zero::<f32>(&STATE_SHAPE).map_err(inference)?,
            batch: Vec::new(),
            features: Vec::new(),
            context: vec![0.0; VAD_CONTEXT],
            pending: Vec::with_capacity(VAD_WINDOW),
        })
    }

    /// Back to the start-of-stream state.
    pub fn reset(&mut self) -> Result<(), SpeechError> {
        self.rnn_state = Tensor::zero::<f32>(&STATE_SHAPE).map_err(inference)?;
        self.context.iter_mut().for_each(|v| *v = 0.0);
        self.pending.clear();
        self.batch.clear();
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
                self.queue_window();
                if self.batch.len() == VAD_BATCH * VAD_ROW {
                    self.score(probs)?;
                }
            }
        }
        self.score(probs)
    }

    /// Ends the stream: a partial last window is zero-padded and scored.
    pub fn finish(&mut self, probs: &mut Vec<f32>) -> Result<(), SpeechError> {
        if !self.pending.is_empty() {
            self.pending.resize(VAD_WINDOW, 0.0);
            self.queue_window();
        }
        self.score(probs)
    }

    /// Moves the pending window into the batch, behind its context.
    fn queue_window(&mut self) {
        self.batch.extend_from_slice(&self.context);
        self.batch.extend_from_slice(&self.pending);
        self.context
            .copy_from_slice(&self.pending[VAD_WINDOW - VAD_CONTEXT..]);
        self.pending.clear();
    }

    /// Scores the batched windows in order.
    fn score(&mut self, probs: &mut Vec<f32>) -> Result<(), SpeechError> {
        let windows = self.batch.len() / VAD_ROW;
        if windows == 0 {
            return Ok(());
        }
        self.run_front(windows).map_err(inference)?;
        self.batch.clear();
        let per_window = self.plans.per_window();
        for w in 0..windows {
            let features = Tensor::from_shape(
                &self.plans.crossing,
                &self.features[w * per_window..(w + 1) * per_window],
            )
            .map_err(inference)?;
            let state = std::mem::take(&mut self.rnn_state);
            let inputs = ordered([0, 1], [features, state]);
            let mut out = super::tune::run_clean(&mut self.back, inputs).map_err(inference)?;
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
            probs.push(prob);
        }
        Ok(())
    }

    /// The front half over `windows` batched inputs, into `features`: on the
    /// pool in pieces when the batch is large enough, else here in one run.
    fn run_front(&mut self, windows: usize) -> TractResult<()> {
        let per_window = self.plans.per_window();
        self.features.clear();
        self.features.resize(windows * per_window, 0.0);
        let batch = &self.batch;
        if windows < VAD_SPLIT_MIN || !self.plans.pool.is_parallel() {
            return front_into(&mut self.front, batch, &mut self.features);
        }
        let plan = &self.plans.front;
        let features = &mut self.features;
        self.plans.pool.scoped(|| {
            par_chunks_mut(features, per_window, usize::MAX, |first, out| {
                let rows = out.len() / per_window;
                let input = &batch[first * VAD_ROW..(first + rows) * VAD_ROW];
                front_into(&mut plan.spawn()?, input, out)
            })
        })
    }
}

/// Runs the front half on `input` (whole rows) and copies its output to `out`.
fn front_into(state: &mut TypedSimpleState, input: &[f32], out: &mut [f32]) -> TractResult<()> {
    let rows = input.len() / VAD_ROW;
    let input = Tensor::from_shape(&[rows, VAD_ROW], input)?;
    let result = super::tune::run_clean(state, tvec![input.into_tvalue()])?;
    let Some(features) = result.first() else {
        bail!("the VAD front returned nothing");
    };
    let features = features.try_as_plain_ram()?;
    let features = features.as_slice::<f32>()?;
    if features.len() != out.len() {
        bail!(
            "the VAD front returned {} values for {rows} windows",
            features.len()
        );
    }
    out.copy_from_slice(features);
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole graph, run window by window as silero's own wrapper does.
    fn whole_graph_probs(samples: &[f32]) -> Vec<f32> {
        let plan = tract_onnx::onnx()
            .model_for_read(&mut &SILERO_ONNX[..])
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .unwrap();
        let mut state = plan.spawn().unwrap();
        let mut rnn = Tensor::zero::<f32>(&STATE_SHAPE).unwrap();
        let mut row = vec![0.0f32; VAD_ROW];
        let mut probs = Vec::new();
        for window in samples.chunks(VAD_WINDOW) {
            row.copy_within(VAD_WINDOW.., 0);
            row[VAD_CONTEXT..].fill(0.0);
            row[VAD_CONTEXT..VAD_CONTEXT + window.len()].copy_from_slice(window);
            let input = Tensor::from_shape(&[1, VAD_ROW], &row).unwrap();
            let mut out = state
                .run(tvec![input.into_tvalue(), rnn.into_tvalue()])
                .unwrap();
            rnn = out.remove(1).into_tensor();
            probs.push(
                out[0]
                    .try_as_plain_ram()
                    .unwrap()
                    .as_slice::<f32>()
                    .unwrap()[0],
            );
        }
        probs
    }

    fn speech_70s() -> Vec<f32> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/extra/long_70s.wav");
        crate::audio::decode(&std::fs::read(path).unwrap())
            .unwrap()
            .samples
    }

    fn stream_probs(plans: &VadPlans, samples: &[f32], chunk: usize) -> Vec<f32> {
        let mut stream = VadStream::new(plans).unwrap();
        let mut probs = Vec::new();
        for part in samples.chunks(chunk) {
            stream.push(part, &mut probs).unwrap();
        }
        stream.finish(&mut probs).unwrap();
        probs
    }

    #[test]
    fn the_split_graph_scores_as_the_whole_one() {
        // 70 s of speech plus a partial last window.
        let mut samples = speech_70s();
        samples.extend(std::iter::repeat_n(0.01, 300));
        assert!(samples.len() > 4 * VAD_BATCH * VAD_WINDOW);
        let want = whole_graph_probs(&samples);
        let single = load_vad(Pool::new(1)).unwrap();
        let pool = load_vad(Pool::new(2)).unwrap();
        for (plans, chunk) in [
            (&single, samples.len()),
            (&pool, samples.len()),
            (&pool, 1000),
            (&single, 7 * VAD_WINDOW + 3),
        ] {
            let got = stream_probs(plans, &samples, chunk);
            assert_eq!(got.len(), want.len(), "chunk {chunk}");
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            // The same kernels on the same rows: equal here, and far below
            // the 1e-3 the goldens allow against onnxruntime.
            assert!(diff <= 1e-6, "chunk {chunk}: differs by {diff}");
        }
    }

    #[test]
    fn reset_starts_the_stream_over() {
        let samples = speech_70s();
        let plans = load_vad(Pool::new(1)).unwrap();
        let mut stream = VadStream::new(&plans).unwrap();
        let mut first = Vec::new();
        stream.push(&samples[..40_000], &mut first).unwrap();
        stream.reset().unwrap();
        let mut again = Vec::new();
        stream.push(&samples[..40_000], &mut again).unwrap();
        assert_eq!(first, again);
    }

    #[test]
    fn split_needs_a_single_crossing_tensor() {
        let mut proto = tract_onnx::onnx()
            .proto_model_for_read(&mut &SILERO_ONNX[..])
            .unwrap();
        assert!(split(&proto).is_ok());
        // Feed a second audio-side tensor into the first state-side node.
        let graph = proto.graph.as_mut().unwrap();
        let first_back = graph
            .node
            .iter()
            .position(|n| n.input.iter().any(|i| i == STATE_INPUT))
            .unwrap();
        let audio_side = graph
            .node
            .iter()
            .find(|n| n.op_type == "Pad")
            .unwrap()
            .output[0]
            .clone();
        graph.node[first_back].input.push(audio_side);
        let why = split(&proto).unwrap_err();
        assert!(why.contains("expected one tensor"), "{why}");
    }
}
