//! `SpeechError`: what can go wrong loading or running the engine.

use std::fmt;
use std::path::PathBuf;

/// Errors of the speech engine. Messages name the file and the fix.
#[derive(Debug)]
#[non_exhaustive]
pub enum SpeechError {
    /// The model directory has no usable set of model files.
    ModelNotFound {
        /// Directory searched.
        dir: PathBuf,
        /// Files that were looked for and are missing.
        missing: Vec<String>,
    },
    /// A model file exists but could not be loaded.
    ModelInvalid {
        /// The offending file.
        file: PathBuf,
        /// Why (the tract error chain).
        why: String,
    },
    /// A vocabulary file is malformed.
    BadVocab {
        /// The offending file.
        file: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Running a graph failed (a bug or an out-of-range input).
    Inference(String),
}

impl fmt::Display for SpeechError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpeechError::ModelNotFound { dir, missing } => write!(
                f,
                "no GigaAM v3 model in {} (missing {}); run `gigastt download --model-dir {}` \
                 or `make models`, or pass --model-dir",
                dir.display(),
                missing.join(", "),
                dir.display()
            ),
            SpeechError::ModelInvalid { file, why } => write!(
                f,
                "cannot load {}: {why}; the file may be truncated or corrupt, \
                 re-run `gigastt download` to fetch it again",
                file.display()
            ),
            SpeechError::BadVocab { file, why } => {
                write!(f, "bad vocabulary {}: {why}", file.display())
            }
            SpeechError::Inference(why) => write!(f, "inference failed: {why}"),
        }
    }
}

impl std::error::Error for SpeechError {}

/// Wraps a tract error from running a graph.
pub(crate) fn inference(e: impl fmt::Display) -> SpeechError {
    SpeechError::Inference(format!("{e:#}"))
}
