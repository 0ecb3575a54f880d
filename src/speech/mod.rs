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
pub mod weights;

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
/// The tiny test model's file `file` (random weights, the real model's I/O).
#[cfg(test)]
pub(crate) fn tiny_model_file(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/gigaam-v3-tiny-random")
        .join(file)
}

/// Turns transparent huge pages off for this whole process; call it before
/// [`Engine::load`].
///
/// With them on, the kernel backs the allocator's memory 2 MiB at a time, and
/// clears each huge page when first touched: the load's short-lived buffers,
/// freed but kept by the allocator for a second, then hold whole huge pages.
/// Off, the full-size int8 load peaks at ~335 MiB instead of ~400 and the fp32
/// at ~1005 MiB instead of ~1115; a first load into fresh memory takes 0.56 s
/// instead of 0.9 s (int8) and 0.66 s instead of 1.8 s (fp32); and the runs
/// take as long as before (docs/perf.md, the twenty-fourth round). It changes
/// the process, not just the engine, so the binary calls it, not
/// [`Engine::load`]. Returns `false` where there is nothing to turn off (not
/// Linux).
pub fn huge_pages_off() -> std::io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        rustix::thread::disable_transparent_huge_pages(true)?;
        Ok(true)
    }
    #[cfg(not(target_os = "linux"))]
    Ok(false)
}

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
    /// Of those, the pieces optimised with a time symbol of their own.
    pub encoder_own_symbols: usize,
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
        // The small graphs load on a thread of their own while the encoder's
        // file is read and typed on this one, which leaves the other cores
        // idle until the encoder's layers are optimised.
        let small = || -> Result<_, SpeechError> {
            let decoder = files
                .decoder
                .as_deref()
                .map(model::load_fixed)
                .transpose()?;
            let joint = files.joint.as_deref().map(model::load_fixed).transpose()?;
            let vad = vad::load_vad(pool.clone())?;
            let vocab = vocab::Vocab::load(&files.vocab)?;
            Ok((decoder, joint, vad, vocab))
        };
        let (encoder, small) = std::thread::scope(|scope| {
            let small = scope.spawn(small);
            let encoder = model::load_encoder(&files.encoder, names, pool.executor());
            (encoder, small.join())
        });
        let (encoder, build) = encoder?;
        let (decoder, joint, vad, vocab) =
            small.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
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
            encoder_own_symbols: build.own_symbols,
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
        Ok(Recognizer {
            engine: Arc::clone(self),
            main: Lane::new(self, MAX_SYMBOLS_PER_FRAME)?,
            side: Vec::new(),
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

/// How much faster one piece runs split over a pool than on one of its
/// threads, as a share of the thread count. Measured on the 2-core Intel Xeon,
/// int8, 10 s: 0.87 s at one thread, 0.59 s at two, 1.47x of 2 (docs/perf.md,
/// "The thirteenth round"); two pieces side by side keep their one-thread speed.
const POOLED_EFFICIENCY: f64 = 0.7;

/// Whether pieces of `lens` samples finish sooner side by side on `lanes` of
/// the pool's `threads`, longest first, each to the lane free first, than one
/// after another over all the threads. The cost of a piece is taken as its
/// length.
fn side_by_side_pays(lens: &[usize], lanes: usize, threads: usize) -> bool {
    let mut sorted = lens.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let mut ends = vec![0usize; lanes.max(1)];
    for len in sorted {
        if let Some(first_free) = ends.iter_mut().min() {
            *first_free += len;
        }
    }
    let side = ends.into_iter().max().unwrap_or(0) as f64;
    let pooled = lens.iter().sum::<usize>() as f64 / (threads as f64 * POOLED_EFFICIENCY);
    side < pooled
}

/// Per-worker state: run states of every graph, reused for each job.
pub struct Recognizer {
    engine: Arc<Engine>,
    /// Runs a single piece, split over the engine's pool.
    main: Lane,
    /// With `main`, runs pieces side by side, one per pool thread; made the
    /// first time a long input needs them.
    side: Vec<Lane>,
    vad: VadStream,
}

impl std::fmt::Debug for Recognizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recognizer").finish_non_exhaustive()
    }
}

/// How a lane runs the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    /// Over the engine's pool, started on one of its threads.
    Pooled,
    /// On the calling thread alone (a pool thread, beside another lane).
    Serial,
}

/// The run states one piece needs: the encoder's and the RNN-T decoder's.
struct Lane {
    encoder: pieces::PiecesState,
    rnnt: Option<rnnt::RnntDecoder>,
}

impl Lane {
    fn new(engine: &Engine, max_symbols: usize) -> Result<Lane, SpeechError> {
        let rnnt = match (&engine.decoder, &engine.joint) {
            (Some(d), Some(j)) => {
                let mut r = rnnt::RnntDecoder::new(d, j, engine.vocab.blank())?;
                r.set_max_symbols(max_symbols);
                Some(r)
            }
            _ => None,
        };
        Ok(Lane {
            encoder: engine.encoder.pieces.spawn().map_err(inference)?,
            rnnt,
        })
    }

    /// The RNN-T emission limit per frame its decoder keeps.
    fn max_symbols(&self) -> usize {
        self.rnnt
            .as_ref()
            .map_or(MAX_SYMBOLS_PER_FRAME, rnnt::RnntDecoder::max_symbols)
    }

    fn encode(
        &mut self,
        engine: &Engine,
        mel: &MelFrames,
        split: Split,
    ) -> Result<Encoded, SpeechError> {
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
        let inputs = if engine.encoder.signal_first {
            tvec![signal.into_tvalue(), length.into_tvalue()]
        } else {
            tvec![length.into_tvalue(), signal.into_tvalue()]
        };
        let encoder = &mut self.encoder;
        let out = match split {
            Split::Pooled => engine.pool.install(|| encoder.run(inputs, tune::run_clean)),
            Split::Serial => encoder.run(inputs, tune::run_clean_serial),
        }
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
        let (dim, frames) = match engine.info.variant {
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

    fn tokens(
        &mut self,
        engine: &Engine,
        samples: &[f32],
        split: Split,
    ) -> Result<Vec<Token>, SpeechError> {
        let mel = engine.features.log_mel(samples);
        // Under 30 ms (fewer than two frames) cannot hold a word.
        if mel.frames < model::MIN_ENCODER_FRAMES {
            return Ok(Vec::new());
        }
        let encoded = self.encode(engine, &mel, split)?;
        let blank = engine.vocab.blank();
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

    /// Words of one planned piece (absolute times, only those it keeps).
    fn planned(
        &mut self,
        engine: &Engine,
        samples: &[f32],
        piece: &segment::Piece,
        split: Split,
    ) -> Result<Vec<Word>, SpeechError> {
        let rate = SAMPLE_RATE_HZ as f64;
        let slice = samples
            .get(piece.samples.clone())
            .ok_or_else(|| SpeechError::Inference("piece outside the audio".into()))?;
        let tokens = self.tokens(engine, slice, split)?;
        let words = engine
            .vocab
            .words(&tokens, piece.samples.start as f64 / rate);
        let (lo, hi) = (piece.keep.start as f64 / rate, piece.keep.end as f64 / rate);
        Ok(words
            .into_iter()
            .filter(|w| w.start >= lo && (w.start < hi || piece.keep.end == piece.samples.end))
            .collect())
    }
}

impl Recognizer {
    /// The engine this recognizer runs.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Sets the RNN-T emission limit per frame (default 10, GigaAM's torch decoder).
    pub fn set_max_symbols(&mut self, n: usize) {
        for lane in std::iter::once(&mut self.main).chain(&mut self.side) {
            if let Some(r) = lane.rnnt.as_mut() {
                r.set_max_symbols(n);
            }
        }
    }

    /// Encoder run states this recognizer holds: one, and one more per pool
    /// thread once a long input has run side by side.
    pub fn lanes(&self) -> usize {
        1 + self.side.len()
    }

    /// Log-mel features of 16 kHz samples.
    pub fn features(&self, samples: &[f32]) -> MelFrames {
        self.engine.features.log_mel(samples)
    }

    /// Runs the encoder (RNN-T) or the whole CTC graph on features.
    pub fn encode(&mut self, mel: &MelFrames) -> Result<Encoded, SpeechError> {
        self.main.encode(&self.engine, mel, Split::Pooled)
    }

    /// Tokens of one piece of audio (at most [`segment::MAX_SEGMENT_SECS`]).
    pub fn tokens(&mut self, samples: &[f32]) -> Result<Vec<Token>, SpeechError> {
        self.main.tokens(&self.engine, samples, Split::Pooled)
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
        self.main
            .planned(&self.engine, samples, piece, Split::Pooled)
    }

    /// Words of each planned piece, handed to `done(i, words)` in the order of
    /// `pieces`. With a pool, pieces run side by side, one per thread, where
    /// that is expected to finish sooner than each in turn over the whole pool
    /// ([`side_by_side_pays`]).
    pub fn transcribe_pieces(
        &mut self,
        samples: &[f32],
        pieces: &[segment::Piece],
        mut done: impl FnMut(usize, Vec<Word>),
    ) -> Result<(), SpeechError> {
        let lens: Vec<usize> = pieces.iter().map(|p| p.samples.len()).collect();
        let threads = self.engine.pool.threads();
        let lanes = threads.min(pieces.len());
        if lanes < 2 || !side_by_side_pays(&lens, lanes, threads) {
            for (i, piece) in pieces.iter().enumerate() {
                done(i, self.transcribe_planned(samples, piece)?);
            }
            return Ok(());
        }
        while self.side.len() + 1 < lanes {
            let max_symbols = self.main.max_symbols();
            self.side.push(Lane::new(&self.engine, max_symbols)?);
        }
        // Longest first, so that no long piece starts last and runs alone.
        let mut order: Vec<usize> = (0..pieces.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
        let engine = &*self.engine;
        let workers: Vec<&mut Lane> = std::iter::once(&mut self.main)
            .chain(&mut self.side)
            .take(lanes)
            .collect();
        let mut finished: Vec<Option<Vec<Word>>> = vec![None; pieces.len()];
        let mut next = 0;
        let mut failure = None;
        engine.pool.side_by_side(
            workers,
            order.len(),
            |lane, job| {
                let i = order[job];
                (i, lane.planned(engine, samples, &pieces[i], Split::Serial))
            },
            |_, (i, result)| match result {
                Ok(words) => {
                    finished[i] = Some(words);
                    while let Some(words) = finished.get_mut(next).and_then(Option::take) {
                        done(next, words);
                        next += 1;
                    }
                    true
                }
                Err(e) => {
                    failure.get_or_insert(e);
                    false
                }
            },
        );
        match failure {
            Some(e) => Err(e),
            None if next < pieces.len() => Err(SpeechError::Inference(
                "a piece run side by side returned nothing".into(),
            )),
            None => Ok(()),
        }
    }

    /// Whole pipeline: plan pieces, transcribe them (side by side where that
    /// pays), stitch. `progress(done, total)` is called after each piece, in order.
    pub fn transcribe(
        &mut self,
        samples: &[f32],
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Transcript, SpeechError> {
        let pieces = self.plan_pieces(samples)?;
        let mut transcript = Transcript::for_samples(samples.len());
        self.transcribe_pieces(samples, &pieces, |i, words| {
            transcript.push_piece(&pieces[i], words);
            progress(i + 1, pieces.len());
        })?;
        Ok(transcript)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_off_turns_them_off_for_the_process() {
        assert!(huge_pages_off().unwrap());
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.lines().any(|l| l == "THP_enabled:\t0"), "{status}");
    }

    #[test]
    fn side_by_side_pays_where_the_lanes_stay_busy() {
        let s = SAMPLE_RATE_HZ;
        // The 60 s benchmark prefix: 13 pieces of 1.1-4.9 s.
        let many = [49, 11, 30, 42, 25, 18, 37, 22, 45, 14, 28, 33, 20].map(|d| d * s / 10);
        assert!(side_by_side_pays(&many, 2, 2));
        // Two hard-cut halves of one long region.
        assert!(side_by_side_pays(&[25 * s, 25 * s], 2, 2));
        assert!(side_by_side_pays(&[25 * s, 24 * s, 12 * s], 2, 2));
        // One long piece and a short one: the long one alone on one thread
        // takes longer than both over two.
        assert!(!side_by_side_pays(&[25 * s, 2 * s], 2, 2));
        // Two pieces on a four-thread pool use two of its threads.
        assert!(!side_by_side_pays(&[10 * s, 10 * s], 2, 4));
        assert!(side_by_side_pays(&[10 * s; 4], 4, 4));
    }
}
