//! Find model files, detect RNN-T or CTC and fp32 or int8, load and optimise graphs.
//!
//! Each graph goes load -> input facts -> `into_optimized` -> runnable plan, and
//! the plan is shared in an `Arc`: N workers hold one copy of the weights. The
//! encoder gets a symbolic time axis `T` (so one plan serves every length), its
//! declared output facts are ignored (the export names them wrongly), and it is
//! optimised layer by layer ([`super::pieces`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::DimLike;
use tract_onnx::tract_hir::internal::InferenceFact;

use super::SpeechError;
use super::features::N_MELS;
use super::tune::Exactness;

/// Fewest feature frames the encoder runs on (30 ms of audio); shorter input is
/// silence to us. Declared to tract as an assertion on `T`.
pub const MIN_ENCODER_FRAMES: usize = 2;

/// A runnable graph, shared by every worker.
pub(crate) type Plan = Arc<TypedRunnableModel>;

/// Which head the model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Encoder + decoder + joint, greedy transducer decoding (punctuated text).
    Rnnt,
    /// Encoder with a CTC head, greedy CTC decoding.
    Ctc,
}

impl Variant {
    /// Lower-case name used in flags and `/v1/models`.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Rnnt => "rnnt",
            Variant::Ctc => "ctc",
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "rnnt" | "rnn-t" => Ok(Variant::Rnnt),
            "ctc" => Ok(Variant::Ctc),
            other => Err(format!("unknown variant {other:?} (rnnt or ctc)")),
        }
    }
}

/// Numeric precision of the encoder weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// float32 weights.
    Fp32,
    /// int8 weights (dynamic quantisation), 4x smaller.
    Int8,
}

impl Precision {
    /// Lower-case name used in flags and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
        }
    }
}

/// What the user asked for; `Auto` prefers int8 when both files exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrecisionChoice {
    /// int8 when present, else fp32.
    #[default]
    Auto,
    /// Exactly this precision.
    Only(Precision),
}

impl std::str::FromStr for PrecisionChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(PrecisionChoice::Auto),
            "fp32" | "f32" => Ok(PrecisionChoice::Only(Precision::Fp32)),
            "int8" | "i8" => Ok(PrecisionChoice::Only(Precision::Int8)),
            other => Err(format!("unknown precision {other:?} (auto, fp32 or int8)")),
        }
    }
}

/// The files of one model, resolved on disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// Directory they live in.
    pub dir: PathBuf,
    /// RNN-T or CTC.
    pub variant: Variant,
    /// Encoder precision picked.
    pub precision: Precision,
    /// Encoder (RNN-T) or the whole CTC graph.
    pub encoder: PathBuf,
    /// RNN-T decoder (prediction network).
    pub decoder: Option<PathBuf>,
    /// RNN-T joint network.
    pub joint: Option<PathBuf>,
    /// Vocabulary.
    pub vocab: PathBuf,
}

/// File-name stems we know, best first: (variant, stem of graph files, vocab names).
const LAYOUTS: &[(Variant, &str, &[&str])] = &[
    (Variant::Rnnt, "v3_e2e_rnnt", &["v3_e2e_rnnt_vocab.txt"]),
    (
        Variant::Rnnt,
        "v3_rnnt",
        &["v3_rnnt_vocab.txt", "v3_vocab.txt"],
    ),
    (Variant::Ctc, "v3_e2e_ctc", &["v3_e2e_ctc_vocab.txt"]),
    (
        Variant::Ctc,
        "v3_ctc",
        &["v3_ctc_vocab.txt", "v3_vocab.txt"],
    ),
];

/// Looks in `dir` for a complete model; `variant` restricts the search.
pub fn find_model(
    dir: &Path,
    variant: Option<Variant>,
    precision: PrecisionChoice,
) -> Result<ModelFiles, SpeechError> {
    let mut first_missing: Option<Vec<String>> = None;
    for &(v, stem, vocabs) in LAYOUTS {
        if variant.is_some_and(|want| want != v) {
            continue;
        }
        let mut missing = Vec::new();
        let graph = |suffix: &str| dir.join(format!("{stem}{suffix}.onnx"));
        let (enc_name, extra): (&str, &[&str]) = match v {
            Variant::Rnnt => ("_encoder", &["_decoder", "_joint"]),
            Variant::Ctc => ("", &[]),
        };
        let fp32 = graph(enc_name);
        let int8 = graph(&format!("{enc_name}_int8"));
        let encoder = match precision {
            PrecisionChoice::Auto if int8.is_file() => Some((int8.clone(), Precision::Int8)),
            PrecisionChoice::Auto | PrecisionChoice::Only(Precision::Fp32) => {
                fp32.is_file().then_some((fp32.clone(), Precision::Fp32))
            }
            PrecisionChoice::Only(Precision::Int8) => {
                int8.is_file().then_some((int8.clone(), Precision::Int8))
            }
        };
        if encoder.is_none() {
            let want = match precision {
                PrecisionChoice::Only(Precision::Int8) => int8,
                _ => fp32,
            };
            missing.push(file_name(&want));
        }
        let others: Vec<PathBuf> = extra.iter().map(|s| graph(s)).collect();
        missing.extend(others.iter().filter(|p| !p.is_file()).map(|p| file_name(p)));
        let vocab = vocabs.iter().map(|n| dir.join(n)).find(|p| p.is_file());
        if vocab.is_none() {
            missing.push(vocabs[0].to_string());
        }
        match (encoder, vocab) {
            (Some((encoder, precision)), Some(vocab)) if missing.is_empty() => {
                let mut others = others.into_iter();
                return Ok(ModelFiles {
                    dir: dir.to_path_buf(),
                    variant: v,
                    precision,
                    encoder,
                    decoder: others.next(),
                    joint: others.next(),
                    vocab,
                });
            }
            _ => {
                if first_missing.is_none() {
                    first_missing = Some(missing);
                }
            }
        }
    }
    Err(SpeechError::ModelNotFound {
        dir: dir.to_path_buf(),
        missing: first_missing.unwrap_or_default(),
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub(super) fn invalid(file: &Path) -> impl Fn(TractError) -> SpeechError + '_ {
    move |e| SpeechError::ModelInvalid {
        file: file.to_path_buf(),
        why: format!("{e:#}"),
    }
}

/// Index of the model input called `name`, or the error naming the file.
fn input_index(model: &InferenceModel, name: &str, file: &Path) -> Result<usize, SpeechError> {
    let outlets = model.input_outlets().map_err(invalid(file))?;
    outlets
        .iter()
        .position(|o| model.node(o.node).name == name)
        .ok_or_else(|| SpeechError::ModelInvalid {
            file: file.to_path_buf(),
            why: format!("no input named {name:?}"),
        })
}

/// Loads an encoder-like graph `[1, 64, T] f32, [1] i64 -> ...` with a symbolic `T`,
/// tuned and cut into pieces (see [`super::pieces`]).
pub(crate) fn load_encoder(
    path: &Path,
    names: (&str, &str),
    executor: Option<tract_linalg::multithread::Executor>,
) -> Result<(Encoder, EncoderBuild), SpeechError> {
    load_encoder_as(path, names, executor, Build::Tuned(Exactness::Close))
}

/// How [`load_encoder_as`] builds the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Build {
    /// tract alone, in one piece: the reference the rewrites are tested against
    /// (where tract's AMX kernels would read past the end of its packed int8
    /// activations, they are copied into buffers that do not end there:
    /// [`super::tune::pack::pad_amx_reads`]).
    #[cfg_attr(not(test), allow(dead_code))]
    Plain,
    /// The lean read, the `tune` rewrites, one piece per layer; with
    /// [`Exactness::Bits`] only those that keep tract's bits (what the bit
    /// tests hold against [`Build::Plain`]).
    Tuned(Exactness),
}

/// An encoder plan and the position of its inputs.
#[derive(Debug, Clone)]
pub(crate) struct Encoder {
    pub pieces: Arc<super::pieces::Pieces>,
    /// Whether the features come before the length.
    pub signal_first: bool,
}

/// Sets the encoder's input facts (a symbolic `T` frames) and types it; true
/// when the features come before the length.
pub(crate) fn type_encoder(
    mut model: InferenceModel,
    names: (&str, &str),
    path: &Path,
) -> Result<(TypedModel, bool), SpeechError> {
    let err = invalid(path);
    let signal = input_index(&model, names.0, path)?;
    let length = input_index(&model, names.1, path)?;
    // With T >= 2 proven, tract fuses bias adds into the matmuls (a symbolic T
    // could be 1, which broadcasts differently): ~10 % faster on 10 s at one
    // thread (docs/perf.md). The recognizer never runs the encoder on fewer frames.
    model
        .symbols
        .add_assertion(format!("T >= {MIN_ENCODER_FRAMES}"))
        .map_err(&err)?;
    let frames = model.symbols.sym("T");
    let mut inputs = vec![
        (
            signal,
            f32::fact([1.to_dim(), N_MELS.to_dim(), frames.to_dim()]).into(),
        ),
        (length, i64::fact([1]).into()),
    ];
    inputs.sort_by_key(|(ix, _)| *ix);
    for (ix, fact) in inputs {
        model.set_input_fact(ix, fact).map_err(&err)?;
    }
    for ix in 0..model.output_outlets().map_err(&err)?.len() {
        model
            .set_output_fact(ix, InferenceFact::default())
            .map_err(&err)?;
    }
    Ok((model.into_typed().map_err(&err)?, signal < length))
}

/// [`load_encoder`], built as `build` says.
pub(crate) fn load_encoder_as(
    path: &Path,
    names: (&str, &str),
    executor: Option<tract_linalg::multithread::Executor>,
    build: Build,
) -> Result<(Encoder, EncoderBuild), SpeechError> {
    let err = invalid(path);
    let mut stages = Stages::new();
    let onnx = tract_onnx::onnx()
        .with_ignore_output_shapes(true)
        .with_ignore_value_info(true);
    let mut rewrites = super::tune::Rewrites::default();
    let (model, signal_first) = if build != Build::Plain {
        // The weights stay in the file until they are read, each straight into
        // its tensor, so the file, the decoded protobuf and the tensors are
        // never all in memory at once (docs/perf.md, "Memory allocator and
        // loading"), and they are read on every core while tract parses and
        // types the graph without them (`speech::weights`).
        let mut lean =
            super::lean::read(path, super::lean::EXTERNAL_MIN_BYTES).map_err(|e| err(e.into()))?;
        rewrites.weights_from_file = lean.external;
        let mut proto = onnx
            .proto_model_for_read(&mut lean.bytes.as_slice())
            .map_err(&err)?;
        // The bytes are decoded: nothing reads them again (docs/perf.md, the
        // twenty-fourth round: what the load holds at its peak).
        lean.bytes = Vec::new();
        rewrites.zero_points = super::tune::drop_zero_weight_zero_points(&mut proto);
        let invalid_because = |why: String| SpeechError::ModelInvalid {
            file: path.to_path_buf(),
            why,
        };
        let graph = proto
            .graph
            .as_mut()
            .ok_or_else(|| invalid_because("no graph".into()))?;
        let weights =
            super::weights::take_from_file(graph, &lean.location).map_err(invalid_because)?;
        let file = lean.dir.join(&lean.location);
        let (typed, tensors) = super::weights::read_beside(&file, &weights, || {
            let mut parsed = onnx.parse(&proto, lean.dir.to_str()).map_err(&err)?;
            // Parsed: the protobuf goes before the typing, the load's peak.
            drop(proto);
            super::weights::declare(&mut parsed.model, &parsed.outlets_by_name, &weights)
                .map_err(&err)?;
            stages.mark("read");
            type_encoder(parsed.model, names, path)
        });
        let (mut typed, signal_first) = typed?;
        let tensors = tensors.map_err(|e| err(e.into()))?;
        super::weights::install(&mut typed, &weights, tensors).map_err(&err)?;
        (typed, signal_first)
    } else {
        let proto = onnx.proto_model_for_path(path).map_err(&err)?;
        let dir = path.parent().and_then(Path::to_str);
        let model = onnx.parse(&proto, dir).map_err(&err)?.model;
        stages.mark("read");
        type_encoder(model, names, path)?
    };
    stages.mark("typed");
    let options = RunOptions {
        executor: executor.clone(),
        ..Default::default()
    };
    let pieces = match build {
        Build::Plain => model
            .into_optimized()
            .and_then(|mut m| super::tune::pack::pad_amx_reads(&mut m).map(|_| m))
            .and_then(|m| m.into_runnable_with_options(&options))
            .and_then(super::pieces::Pieces::whole)
            .map_err(&err)?,
        Build::Tuned(exactness) => {
            // Declutter, rewrite and optimise layer by layer, on every core:
            // tract's passes slow down with the size of the graph
            // (docs/perf.md, "Load time and memory").
            // A piece that panics fails the build (`Pieces::build`), so a
            // poisoned lock holds nothing anyone reads.
            let done = std::sync::Mutex::new(rewrites);
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let pieces = super::pieces::Pieces::build(model, threads, |mut part| {
                let mut own = super::tune::Rewrites::default();
                super::tune::defer::declutter(&mut part, &mut own)?;
                super::tune::rewrite_decluttered(&mut part, &mut own)?;
                super::tune::optimize(&mut part, &mut own, exactness)?;
                super::tune::rewrite_optimized(&mut part, &mut own, executor.clone(), exactness)?;
                done.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .add(&own);
                part.into_runnable_with_options(&options)
            })
            .map_err(&err)?;
            rewrites = done
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            pieces
        }
    };
    stages.mark("optimise");
    let kernels = super::tune::kernel_summary(pieces.models());
    let build = EncoderBuild {
        rewrites,
        kernels,
        pieces: pieces.len(),
        own_symbols: pieces.own_symbols(),
        stages: stages.done,
    };
    let encoder = Encoder {
        pieces: Arc::new(pieces),
        signal_first,
    };
    Ok((encoder, build))
}

/// How the encoder plan was built, for the startup log.
#[derive(Debug, Clone)]
pub(crate) struct EncoderBuild {
    pub rewrites: super::tune::Rewrites,
    /// Matmul kernels tract picked, with counts.
    pub kernels: String,
    /// Pieces the encoder was cut into (see [`super::pieces`]).
    pub pieces: usize,
    /// Pieces sized by a time symbol of their own, not an expression of `T`.
    pub own_symbols: usize,
    /// Load stages and their wall time: "read 250 ms, typed 110 ms, ...".
    pub stages: String,
}

/// Wall time of each load stage, for the startup log.
struct Stages {
    last: std::time::Instant,
    done: String,
}

impl Stages {
    fn new() -> Stages {
        Stages {
            last: std::time::Instant::now(),
            done: String::new(),
        }
    }

    fn mark(&mut self, stage: &str) {
        let now = std::time::Instant::now();
        if !self.done.is_empty() {
            self.done.push_str(", ");
        }
        let ms = now.duration_since(self.last).as_millis();
        self.done.push_str(&format!("{stage} {ms} ms"));
        self.last = now;
    }
}

/// Loads a graph whose inputs are fully declared in the file (decoder, joint, VAD).
pub(crate) fn load_fixed(path: &Path) -> Result<Plan, SpeechError> {
    let err = invalid(path);
    tract_onnx::onnx()
        .model_for_path(path)
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(err)
}

/// Concrete size of axis `axis` of input `ix` of a plan.
pub(crate) fn input_dim(plan: &Plan, ix: usize, axis: usize) -> Result<usize, SpeechError> {
    let fact = plan
        .model()
        .input_fact(ix)
        .map_err(super::error::inference)?;
    fact.shape
        .get(axis)
        .and_then(|d| d.to_usize().ok())
        .ok_or_else(|| SpeechError::Inference(format!("input {ix} axis {axis} is not concrete")))
}
