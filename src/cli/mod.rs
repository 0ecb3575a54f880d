//! Command-line front: `gigastt serve | transcribe | download | health | help`.
//!
//! `run` parses, dispatches and maps every outcome to an exit code scripts can
//! trust (see [`Exit`]); errors are printed once, as one line, on stderr.

pub mod download;
pub mod flags;
pub mod serve;
pub mod transcribe;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use flags::{Flag, RawFlags};

/// Exit codes (documented in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything worked.
    Ok = 0,
    /// At least one input could not be transcribed (bad audio), or the server failed.
    Failed = 1,
    /// Bad command line.
    Usage = 2,
    /// The model could not be found or loaded.
    Model = 3,
    /// Downloading the model failed.
    Download = 4,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub exit: Exit,
    /// One-line message.
    pub message: String,
}

impl CliError {
    pub(crate) fn new(exit: Exit, message: impl Into<String>) -> CliError {
        CliError {
            exit,
            message: message.into(),
        }
    }

    pub(crate) fn usage(message: impl Into<String>) -> CliError {
        CliError::new(Exit::Usage, message)
    }
}

const USAGE: &str = "gigastt — local Russian speech-to-text (GigaAM v3)

usage:
  gigastt serve [FLAGS]                       HTTP/WebSocket server on 127.0.0.1:9876
  gigastt transcribe FILE... [FLAGS]          print transcripts (FILE '-' reads stdin)
  gigastt download [--model-dir DIR] [--variant rnnt|rnnt-int8|ctc|ctc-int8]
  gigastt health [--url URL]                  exit 0 when a server answers /health
  gigastt help [serve|transcribe|download]    flags and their GIGASTT_* env vars
  gigastt --version
";

/// Runs the command line (without the program name) and returns the exit code.
pub fn run(args: Vec<OsString>) -> ExitCode {
    match dispatch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("gigastt: {}", e.message);
            }
            e.exit.into()
        }
    }
}

fn dispatch(mut args: Vec<OsString>) -> Result<(), CliError> {
    if args.is_empty() {
        print!("{USAGE}");
        return Err(CliError::usage("no command given"));
    }
    let command = args.remove(0).to_string_lossy().into_owned();
    let env = |k: &str| std::env::var(k).ok();
    let wants_help = args.iter().any(|a| a == "--help" || a == "-h");
    match command.as_str() {
        "--version" | "-V" | "version" => {
            println!("gigastt {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        "help" | "--help" | "-h" => {
            let topic = args.first().map(|a| a.to_string_lossy().into_owned());
            print!("{}", help_for(topic.as_deref()));
            Ok(())
        }
        _ if wants_help => {
            print!("{}", help_for(Some(&command)));
            Ok(())
        }
        "serve" => {
            let raw = parse(args, &[flags::SERVE_FLAGS, flags::MODEL_FLAGS], &env)?;
            init_logging(&raw)?;
            serve::run(&raw)
        }
        "transcribe" => {
            let raw = parse(args, &[flags::TRANSCRIBE_FLAGS, flags::MODEL_FLAGS], &env)?;
            init_logging(&raw)?;
            transcribe::run(&raw)
        }
        "download" => {
            let raw = parse(args, &[flags::DOWNLOAD_FLAGS, flags::MODEL_FLAGS], &env)?;
            init_logging(&raw)?;
            run_download(&raw)
        }
        "health" => {
            let raw = parse(args, &[flags::HEALTH_FLAGS], &env)?;
            health(&raw)
        }
        other => {
            print!("{USAGE}");
            Err(CliError::usage(format!("unknown command {other:?}")))
        }
    }
}

fn parse(
    args: Vec<OsString>,
    tables: &[&[Flag]],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RawFlags, CliError> {
    flags::parse(args, tables, env).map_err(CliError::usage)
}

fn help_for(topic: Option<&str>) -> String {
    let tables: &[&[Flag]] = match topic {
        Some("serve") => &[flags::SERVE_FLAGS, flags::MODEL_FLAGS],
        Some("transcribe") => &[flags::TRANSCRIBE_FLAGS, flags::MODEL_FLAGS],
        Some("download") => &[flags::DOWNLOAD_FLAGS, flags::MODEL_FLAGS],
        Some("health") => &[flags::HEALTH_FLAGS],
        _ => return USAGE.to_string(),
    };
    let name = topic.unwrap_or_default();
    format!(
        "usage: gigastt {name} [FLAGS]\n\nflags (each also read from its env var):\n{}",
        flags::help(tables)
    )
}

fn init_logging(raw: &RawFlags) -> Result<(), CliError> {
    let level: log::LevelFilter = raw
        .parse("log-level")
        .map_err(CliError::usage)?
        .unwrap_or(log::LevelFilter::Info);
    // The engine's dependencies log every optimisation pass at debug: keep them to warnings.
    let logger = crate::speech::NOISY_LOG_TARGETS.iter().fold(
        simple_logger::SimpleLogger::new().with_level(level),
        |logger, target| logger.with_module_level(target, log::LevelFilter::Warn.min(level)),
    );
    let _ = logger.with_utc_timestamps().init();
    Ok(())
}

/// The model directory: --model-dir, $GIGASTT_MODEL_DIR, ./models if it holds a
/// model, else ~/.gigastt/models.
pub fn resolve_model_dir(raw: &RawFlags) -> PathBuf {
    if let Some(dir) = raw.get("model-dir") {
        return PathBuf::from(dir);
    }
    let local = Path::new("models");
    if crate::speech::model::find_model(local, None, Default::default()).is_ok() {
        return local.to_path_buf();
    }
    home_models_dir()
}

/// `~/.gigastt/models`.
pub fn home_models_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".gigastt")
        .join("models")
}

/// CPU cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn health(raw: &RawFlags) -> Result<(), CliError> {
    let url = raw.get("url").unwrap_or("http://127.0.0.1:9876/health");
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(5))
        .build();
    match agent.get(url).call() {
        Ok(resp) if resp.status() == 200 => {
            println!("ok");
            Ok(())
        }
        Ok(resp) => Err(CliError::new(
            Exit::Failed,
            format!("{url} answered {}", resp.status()),
        )),
        Err(e) => Err(CliError::new(Exit::Failed, format!("{url}: {e}"))),
    }
}

/// Engine options from the model flags; `workers` sizes the default thread count.
pub(crate) fn engine_options(
    raw: &RawFlags,
    workers: usize,
) -> Result<crate::speech::EngineOptions, CliError> {
    let threads: Option<usize> = raw.parse("threads").map_err(CliError::usage)?;
    Ok(crate::speech::EngineOptions {
        variant: raw.parse("variant").map_err(CliError::usage)?,
        precision: raw
            .parse("precision")
            .map_err(CliError::usage)?
            .unwrap_or_default(),
        encoder_threads: threads.unwrap_or_else(|| (cores() / workers.max(1)).max(1)),
    })
}

/// Warns when `RUST_BACKTRACE` is on and `RUST_LIB_BACKTRACE` is not set.
///
/// tract's optimiser tries rewrites that fail with an error, thousands of them
/// in a load, and each error then captures a backtrace: the static binary's
/// encoder optimisation took 6.5-8.5 s instead of 0.7-1 s (docs/perf.md, the
/// fifteenth round). `RUST_LIB_BACKTRACE=0` beside it keeps backtraces for
/// panics only. This crate cannot set it for itself: changing the process's
/// environment is `unsafe`.
fn warn_of_backtraces() {
    let on = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
    if on && std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        log::warn!(
            "RUST_BACKTRACE is set: every error tract's optimiser tries and drops captures a \
             backtrace, which makes the model load several times longer; set \
             RUST_LIB_BACKTRACE=0 beside it to keep backtraces for panics only"
        );
    }
}

/// Loads the engine, logging what was chosen; a test model is announced loudly.
pub(crate) fn load_engine(
    raw: &RawFlags,
    workers: usize,
) -> Result<std::sync::Arc<crate::speech::Engine>, CliError> {
    let dir = resolve_model_dir(raw);
    let options = engine_options(raw, workers)?;
    warn_of_backtraces();
    let huge_pages = match crate::speech::huge_pages_off() {
        Ok(true) => "off",
        Ok(false) => "as the system sets them",
        Err(e) => {
            log::warn!(
                "could not turn transparent huge pages off ({e}): the model load will take more \
                 memory and, into fresh memory, more time"
            );
            "on"
        }
    };
    let engine = crate::speech::Engine::load(&dir, &options)
        .map_err(|e| CliError::new(Exit::Model, e.to_string()))?;
    let info = engine.info();
    log::info!(
        "model {} loaded from {} in {} ms (encoder: {}): {} {}, vocab {}, encoder threads {}, \
         transparent huge pages {}",
        info.id,
        dir.display(),
        info.load_ms,
        info.encoder_stages,
        info.variant.as_str(),
        info.precision.as_str(),
        info.vocab_size,
        info.encoder_threads,
        huge_pages
    );
    let r = &info.encoder_rewrites;
    log::info!(
        "encoder in {} pieces ({} with a time symbol of their own), kernels: {}, our loops: {}; rewrites: {} weights read from the file into their tensors, \
         {} kept out of tract's declutter ({} of its axis changes applied after it, {} of those weights on a copy), {} reshapes of a weight folded into it in place, \
         {} fp32 weight matmuls ({} of their weights laid out for it in a copy) and {} attention products run on faer, \
         {} fp32 weights kept as read ({} of them packed for tract's kernels after all), {} moved to the long-input kernel, \
         {} row-loop matmuls kept on one thread, {} zero weight zero points dropped, \
         {} constant chains folded, {} int8 weights packed for AMX, \
         {} int8 weights packed for tract's int8 kernel ({} in their own bytes), \
         {} packed activations copied where AMX would read past them, {} quantizers vectorised, {} broadcasting element-wise ops \
         run as rows, {} depthwise convolutions run directly, {} int8 activation packings \
         run on the pool ({} quantised on the way), {} batched packings run on the pool, \
         {} int8 matmul sums scaled in one pass \
         ({} with their bias), {} softmaxes run as rows, {} LayerNorms run as one op each \
         ({} with their scale and bias)",
        info.encoder_pieces,
        info.encoder_own_symbols,
        info.encoder_kernels,
        info.loop_simd,
        r.weights_from_file,
        r.deferred,
        r.deferred_changes,
        r.deferred_copies,
        r.reshaped,
        r.gemms,
        r.gemm_copies,
        r.products,
        r.plain_weights,
        r.plain_packed,
        r.retargeted,
        r.serialized,
        r.zero_points,
        r.folded,
        r.amx_packed,
        r.int8_packed,
        r.int8_packed_in_place,
        r.amx_tails,
        r.quantizers,
        r.broadcasts,
        r.depthwise,
        r.packs,
        r.quantized_packs,
        r.batch_packs,
        r.scaled_casts,
        r.biased_casts,
        r.softmaxes,
        r.norms,
        r.scaled_norms
    );
    if info.is_test_model {
        log::warn!(
            "{} is a TEST model with random weights, not GigaAM: its transcripts are meaningless \
             outside the test fixtures. Run `gigastt download` for the real model.",
            dir.display()
        );
    }
    Ok(engine)
}

/// `gigastt download`: fetch the real weights into the model directory.
fn run_download(raw: &RawFlags) -> Result<(), CliError> {
    let dir = match raw.get("model-dir") {
        Some(d) => PathBuf::from(d),
        None => home_models_dir(),
    };
    let mut options = download::DownloadOptions::new(&dir);
    if let Some(v) = raw.get("variant") {
        options.variant = v
            .parse()
            .map_err(|e: download::ParseVariantError| CliError::usage(e.0))?;
    }
    if let Some(url) = raw.get("base-url") {
        options.base_url = url.to_string();
    }
    options.allow_unverified = raw.is_set("allow-unverified");
    std::fs::create_dir_all(&dir).map_err(|e| {
        CliError::new(
            Exit::Download,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    let report = download::download(&options, &mut |p| download::print_progress_line(p))
        .map_err(|e| CliError::new(Exit::Download, e.to_string()))?;
    for f in &report.files {
        println!("{}  {}", f.sha256, f.path.display());
    }
    eprintln!(
        "model ready in {}: run `gigastt serve --model-dir {}`",
        dir.display(),
        dir.display()
    );
    Ok(())
}
