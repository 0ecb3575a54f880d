//! The speech engine: the only module that knows tract.
//!
//! [`Engine`] is loaded once (graphs optimised, weights in memory once) and shared
//! in an `Arc`; each worker gets its own [`Recognizer`] holding per-graph run
//! states. Input is 16 kHz mono `f32`; output is a [`Transcript`]. Long audio is
//! cut at pauses ([`segment`]) so no more than 25 s reaches the encoder.

mod ctc;
pub mod error;
pub mod features;
pub mod lean;
pub mod model;
pub mod pieces;
mod pool;
mod rnnt;
pub mod segment;
pub mod stream;
pub mod transcript;
pub mod tune;
pub mod vad;
pub mod vocab;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tract_onnx::prelude::*;

pub use error::SpeechError;
pub use features::{FeatureExtractor, MelFrames};
pub use model::{Precision, PrecisionChoice, Variant};
pub use rnnt::MAX_SYMBOLS_PER_FRAME;
pub use transcript::{Segment, Transcript, Word};
pub use vad::VadStream;
pub use vocab::Token;

use error::inference;
use model::{ModelFiles, Plan};

/// Log targets of the inference engine that are chatty at debug level.
pub const NOISY_LOG_TARGETS: &[&str] = &[
    "tract_core",
    "tract_onnx",
    "tract_hir",
    "tract_linalg",
    "tract_data",
];

/// Sample rate the engine takes.
pub const SAMPLE_RATE_HZ: usize = 16_000;
/// Encoder width of the published GigaAM v3 models (the tiny test model has 64).
const REAL_ENCODER_DIM: usize = 768;
/// Byte size of the published fp32 e2e RNN-T encoder (SPEC.md).
const REAL_RNNT_ENCODER_BYTES: u64 = 885_084_534;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Force RNN-T or CTC; `None` picks RNN-T when its files are there.
    pub variant: Option<Variant>,
    /// Encoder precision.
    pub precision: PrecisionChoice,
    /// Threads for the encoder's matrix products (1 = no thread pool).
    pub encoder_threads: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            variant: None,
            precision: PrecisionChoice::Auto,
            encoder_threads: 1,
        }
    }
}

/// What was loaded, for logs and `/v1/models`.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Model id, e.g. `gigaam-v3-e2e-rnnt`; test models say so in the id.
    pub id: String,
    /// RNN-T or CTC.
    pub variant: Variant,
    /// Encoder precision in use.
    pub precision: Precision,
    /// Directory the files came from.
    pub dir: PathBuf,
    /// Vocabulary size including blank.
    pub vocab_size: usize,
    /// Encoder output width.
    pub encoder_dim: usize,
    /// True for the random-weight test/benchmark models: never real GigaAM.
    pub is_test_model: bool,
    /// Load time in milliseconds.
    pub load_ms: u128,
    /// Threads the encoder uses.
    pub encoder_threads: usize,
    /// Matmul kernels the encoder plan uses, with counts.
    pub encoder_kernels: String,
    /// The vector build our own loops (quantiser, depthwise, broadcasts,
    /// scaling) run on this CPU, picked at run time (`tune::wide`).
    pub loop_simd: &'static str,
    /// Pieces the encoder graph was cut into and optimised as (see [`pieces`]).
    pub encoder_pieces: usize,
    /// The encoder's load stages with their wall time.
    pub encoder_stages: String,
    /// Graph rewrites applied to the encoder (see `tune`).
    pub encoder_rewrites: tune::Rewrites,
}

/// The loaded model: immutable, shared by all workers.
pub struct Engine {
    info: ModelInfo,
    files: ModelFiles,
    encoder: model::Encoder,
    decoder: Option<Plan>,
    joint: Option<Plan>,
    vad: vad::VadPlans,
    vocab: vocab::Vocab,
    features: FeatureExtractor,
    /// The encoder's thread pool and its turn ([`pool::Pool`]). Runs are
    /// started on one of its own threads ([`pool::Pool::install`]); the
    /// recognizers share it and take turns.
    pool: pool::Pool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Finds and loads the model in `dir`.
    pub fn load(dir: &Path, options: &EngineOptions) -> Result<Arc<Engine>, SpeechError> {
        let started = Instant::now();
        let files = model::find_model(dir, options.variant, options.precision)?;
        let threads = options.encoder_threads.max(1);
        let pool = pool::Pool::new(threads);
        let names = match files.variant {
            Variant::Rnnt => ("audio_signal", "length"),
            Variant::Ctc => ("features", "feature_lengths"),
        };
        let (encoder, build) = model::load_encoder(&files.encoder, names, pool.executor())?;
        let decoder = files
            .decoder
            .as_deref()
            .map(model::load_fixed)
            .transpose()?;
        let joint = files.joint.as_deref().map(model::load_fixed).transpose()?;
        let vad = vad::load_vad(pool.clone())?;
        let vocab = vocab::Vocab::load(&files.vocab)?;
        let encoder_dim = match &joint {
            Some(j) => {
                let ix = rnnt::input_positions(j, ["enc"])?[0];
                model::input_dim(j, ix, 1)?
            }
            None => REAL_ENCODER_DIM,
        };
        let is_test_model = encoder_dim != REAL_ENCODER_DIM
            || dir.to_string_lossy().contains("random")
            || (files.variant == Variant::Rnnt
                && files.precision == Precision::Fp32
                && std::fs::metadata(&files.encoder).map(|m| m.len()).ok()
                    != Some(REAL_RNNT_ENCODER_BYTES));
        let base = match files.variant {
            Variant::Rnnt => "gigaam-v3-e2e-rnnt",
            Variant::Ctc => "gigaam-v3-e2e-ctc",
        };
        let id = if is_test_model {
            format!("{base}-TEST-MODEL-random-weights")
        } else {
            base.to_string()
        };
        let info = ModelInfo {
            id,
            variant: files.variant,
            precision: files.precision,
            dir: dir.to_path_buf(),
            vocab_size: vocab.len(),
            encoder_dim,
            is_test_model,
            load_ms: started.elapsed().as_millis(),
            encoder_threads: threads,
            encoder_kernels: build.kernels,
            loop_simd: tune::wide_level(),
            encoder_pieces: build.pieces,
            encoder_stages: build.stages,
            encoder_rewrites: build.rewrites,
        };
        Ok(Arc::new(Engine {
            info,
            files,
            encoder,
            decoder,
            joint,
            vad,
            vocab,
            features: FeatureExtractor::new(),
            pool,
        }))
    }

    /// What was loaded.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Path of the encoder file in use.
    pub fn encoder_path(&self) -> &Path {
        &self.files.encoder
    }

    /// A per-worker recognizer (its own run states over the shared plans).
    pub fn recognizer(self: &Arc<Self>) -> Result<Recognizer, SpeechError> {
        let rnnt = match (&self.decoder, &self.joint) {
            (Some(d), Some(j)) => Some(rnnt::RnntDecoder::new(d, j, self.vocab.blank())?),
            _ => None,
        };
        Ok(Recognizer {
            engine: Arc::clone(self),
            encoder: self.encoder.pieces.spawn().map_err(inference)?,
            rnnt,
            vad: VadStream::new(&self.vad)?,
        })
    }

    /// A fresh streaming VAD (one per live stream).
    pub fn vad_stream(&self) -> Result<VadStream, SpeechError> {
        VadStream::new(&self.vad)
    }

    /// Text of token ids.
    pub fn text_of(&self, ids: &[usize]) -> String {
        self.vocab.text(ids)
    }
}

/// Encoder output for one input: `data[d * frames + t]`, `len` valid frames.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Row-major `[dim, frames]`.
    pub data: Vec<f32>,
    /// Width (768 for GigaAM v3).
    pub dim: usize,
    /// Frames in `data`.
    pub frames: usize,
    /// Valid frames (the model's `encoded_len`).
    pub len: usize,
}

/// Per-worker state: run states of every graph, reused for each job.
pub struct Recognizer {
    engine: Arc<Engine>,
    encoder: pieces::PiecesState,
    rnnt: Option<rnnt::RnntDecoder>,
    vad: VadStream,
}

impl std::fmt::Debug for Recognizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recognizer").finish_non_exhaustive()
    }
}

impl Recognizer {
    /// The engine this recognizer runs.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Sets the RNN-T emission limit per frame (default 10, GigaAM's torch decoder).
    pub fn set_max_symbols(&mut self, n: usize) {
        if let Some(r) = self.rnnt.as_mut() {
            r.set_max_symbols(n);
        }
    }

    /// Log-mel features of 16 kHz samples.
    pub fn features(&self, samples: &[f32]) -> MelFrames {
        self.engine.features.log_mel(samples)
    }

    /// Runs the encoder (RNN-T) or the whole CTC graph on features.
    pub fn encode(&mut self, mel: &MelFrames) -> Result<Encoded, SpeechError> {
        if mel.frames < model::MIN_ENCODER_FRAMES {
            return Err(SpeechError::Inference(format!(
                "{} feature frame(s): the encoder needs at least {}",
                mel.frames,
                model::MIN_ENCODER_FRAMES
            )));
        }
        let signal =
            Tensor::from_shape(&[1, features::N_MELS, mel.frames], &mel.data).map_err(inference)?;
        let length = Tensor::from_shape(&[1], &[mel.frames as i64]).map_err(inference)?;
        let inputs = if self.engine.encoder.signal_first {
            tvec![signal.into_tvalue(), length.into_tvalue()]
        } else {
            tvec![length.into_tvalue(), signal.into_tvalue()]
        };
        let encoder = &mut self.encoder;
        let out = self
            .engine
            .pool
            .install(|| encoder.run(inputs, tune::run_clean))
            .map_err(inference)?;
        let main = out
            .first()
            .ok_or_else(|| SpeechError::Inference("encoder returned nothing".into()))?;
        let shape = main.shape().to_vec();
        if shape.len() != 3 {
            return Err(SpeechError::Inference(format!(
                "encoder output rank {shape:?}"
            )));
        }
        let data = main
            .try_as_plain_ram()
            .and_then(|v| v.as_slice::<f32>().map(<[f32]>::to_vec))
            .map_err(inference)?;
        // RNN-T: [1, dim, frames]; CTC: [1, frames, classes] (dim = classes).
        let (dim, frames) = match self.engine.info.variant {
            Variant::Rnnt => (shape[1], shape[2]),
            Variant::Ctc => (shape[2], shape[1]),
        };
        let len = match out.get(1) {
            Some(l) => l
                .cast_to_scalar::<i64>()
                .map(|v| v.max(0) as usize)
                .unwrap_or(frames)
                .min(frames),
            None => frames,
        };
        Ok(Encoded {
            data,
            dim,
            frames,
            len,
        })
    }

    /// Tokens of one piece of audio (at most [`segment::MAX_SEGMENT_SECS`]).
    pub fn tokens(&mut self, samples: &[f32]) -> Result<Vec<Token>, SpeechError> {
        let mel = self.features(samples);
        // Under 30 ms (fewer than two frames) cannot hold a word.
        if mel.frames < model::MIN_ENCODER_FRAMES {
            return Ok(Vec::new());
        }
        let encoded = self.encode(&mel)?;
        let blank = self.engine.vocab.blank();
        match self.rnnt.as_mut() {
            Some(r) => {
                if r.enc_dim() != encoded.dim {
                    return Err(SpeechError::Inference(format!(
                        "encoder width {} but joint expects {}",
                        encoded.dim,
                        r.enc_dim()
                    )));
                }
                r.decode(&encoded.data, encoded.frames, encoded.len)
            }
            None => ctc::decode(&encoded.data, encoded.dim, encoded.len, blank),
        }
    }

    /// Words of one piece, times shifted by `offset_secs`.
    pub fn transcribe_piece(
        &mut self,
        samples: &[f32],
        offset_secs: f64,
    ) -> Result<Vec<Word>, SpeechError> {
        let tokens = self.tokens(samples)?;
        Ok(self.engine.vocab.words(&tokens, offset_secs))
    }

    /// Speech regions of a whole signal (sample ranges), by Silero VAD.
    pub fn speech_regions(
        &mut self,
        samples: &[f32],
    ) -> Result<Vec<std::ops::Range<usize>>, SpeechError> {
        self.vad.reset()?;
        let mut probs = Vec::with_capacity(samples.len() / vad::VAD_WINDOW + 1);
        self.vad.push(samples, &mut probs)?;
        self.vad.finish(&mut probs)?;
        Ok(vad::speech_timestamps(
            &probs,
            samples.len(),
            &vad::SpeechParams::default(),
        ))
    }

    /// Pieces to transcribe: the whole signal if short, else cut at pauses.
    pub fn plan_pieces(&mut self, samples: &[f32]) -> Result<Vec<segment::Piece>, SpeechError> {
        let max = (segment::MAX_SEGMENT_SECS * SAMPLE_RATE_HZ as f64) as usize;
        let speech = if samples.len() > max {
            self.speech_regions(samples)?
        } else {
            Vec::new()
        };
        Ok(segment::plan(samples.len(), SAMPLE_RATE_HZ, &speech))
    }

    /// Words of one planned piece (absolute times, only those it keeps).
    pub fn transcribe_planned(
        &mut self,
        samples: &[f32],
        piece: &segment::Piece,
    ) -> Result<Vec<Word>, SpeechError> {
        let rate = SAMPLE_RATE_HZ as f64;
        let slice = samples
            .get(piece.samples.clone())
            .ok_or_else(|| SpeechError::Inference("piece outside the audio".into()))?;
        let words = self.transcribe_piece(slice, piece.samples.start as f64 / rate)?;
        let (lo, hi) = (piece.keep.start as f64 / rate, piece.keep.end as f64 / rate);
        Ok(words
            .into_iter()
            .filter(|w| w.start >= lo && (w.start < hi || piece.keep.end == piece.samples.end))
            .collect())
    }

    /// Whole pipeline: plan pieces, transcribe each in turn, stitch.
    /// `progress(done, total)` is called after each piece.
    pub fn transcribe(
        &mut self,
        samples: &[f32],
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Transcript, SpeechError> {
        let pieces = self.plan_pieces(samples)?;
        let mut transcript = Transcript::for_samples(samples.len());
        for (i, piece) in pieces.iter().enumerate() {
            let words = self.transcribe_planned(samples, piece)?;
            transcript.push_piece(piece, words);
            progress(i + 1, pieces.len());
        }
        Ok(transcript)
    }
}
