//! `make bench`, our side: the whole pipeline and the encoder alone, timed on one model.
//!
//! One run covers one precision and one thread count, in its own process, so the
//! peak RSS it reports belongs to that run alone. It times `Engine::load`. Then,
//! for each prefix of the audio (4, 10 and 60 s by default), it takes the median
//! of N `Recognizer::transcribe` calls, which cover features, VAD when the audio is
//! over 25 s, the encoder and greedy decoding. It also takes the median of N
//! encoder-only calls on the same features. For audio the engine cuts, that figure
//! is the sum over the engine's own pieces. Each piece's features `[1, 64, T]` go
//! to `--inputs` as raw little-endian f32, so `bench/ort_bench.py` can time
//! onnxruntime on exactly the tensors we ran. The results come out as one JSON
//! object; `bench/report.py` turns them into the table.
//!
//! This is not a criterion bench: one full-size encoder call takes seconds, and
//! the numbers are set beside another runtime's, measured in another process.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use gigastt::audio;
use gigastt::speech::{
    Engine, EngineOptions, MelFrames, Precision, PrecisionChoice, Recognizer, SAMPLE_RATE_HZ,
};
use serde_json::{Value, json};

/// The allocator the gigastt binary uses (src/main.rs), so the numbers are its.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BenchResult<T> = Result<T, Box<dyn Error>>;

const USAGE: &str = "\
usage: bench --model DIR --audio WAV [options]
  --precision fp32|int8      encoder precision (default fp32)
  --threads N                encoder threads (default 1)
  --reps N                   timed repetitions after one warm-up; median reported (default 5)
  --durations 4,10,60        audio prefixes in seconds (default 4,10,60)
  --recognizers 1,2,4        also report RSS with this many recognizers from one engine
  --inputs DIR               write each piece's features and encoder output here
  --json FILE                write the results here (default: stdout)";

/// Parsed command line.
struct Args {
    model_dir: PathBuf,
    audio_path: PathBuf,
    precision: PrecisionChoice,
    threads: usize,
    reps: usize,
    durations_secs: Vec<f64>,
    recognizer_counts: Vec<usize>,
    inputs_dir: Option<PathBuf>,
    json_path: Option<PathBuf>,
}

fn parse_list<T: std::str::FromStr>(s: &str) -> Result<Vec<T>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse().map_err(|_| format!("bad list item {p:?}")))
        .collect()
}

fn parse_args() -> BenchResult<Args> {
    let mut p = pico_args::Arguments::from_env();
    if p.contains(["-h", "--help"]) {
        println!("{USAGE}");
        std::process::exit(0);
    }
    let args = Args {
        model_dir: p.value_from_str("--model")?,
        audio_path: p.value_from_str("--audio")?,
        precision: p
            .opt_value_from_str("--precision")?
            .unwrap_or(PrecisionChoice::Only(Precision::Fp32)),
        threads: p.opt_value_from_str("--threads")?.unwrap_or(1),
        reps: p.opt_value_from_str("--reps")?.unwrap_or(5),
        durations_secs: p
            .opt_value_from_fn("--durations", parse_list)?
            .unwrap_or_else(|| vec![4.0, 10.0, 60.0]),
        recognizer_counts: p
            .opt_value_from_fn("--recognizers", parse_list)?
            .unwrap_or_default(),
        inputs_dir: p.opt_value_from_str("--inputs")?,
        json_path: p.opt_value_from_str("--json")?,
    };
    let rest = p.finish();
    if !rest.is_empty() {
        return Err(format!("unexpected arguments {rest:?}\n{USAGE}").into());
    }
    if args.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    Ok(args)
}

/// Median of the timed runs after one untimed warm-up, plus every timed run.
fn time_median(
    reps: usize,
    mut run: impl FnMut() -> BenchResult<()>,
) -> BenchResult<(f64, Vec<f64>)> {
    run()?;
    let mut secs = Vec::with_capacity(reps);
    for _ in 0..reps {
        let started = Instant::now();
        run()?;
        secs.push(started.elapsed().as_secs_f64());
    }
    let mut sorted = secs.clone();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    };
    Ok((median, secs))
}

/// A `/proc/self/status` field in MiB (`VmHWM`: peak RSS, `VmRSS`: current).
fn proc_status_mib(field: &str) -> Option<f64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The larger of two readings, either of which may be missing.
fn larger(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Resets the peak RSS (`VmHWM`) to the current RSS, so the next reading is
/// the peak since now (Linux's `clear_refs` value 5). False where it cannot.
fn reset_peak_rss() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn write_f32(path: &Path, data: &[f32]) -> BenchResult<()> {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(path, bytes)?;
    Ok(())
}

/// RSS after load and with each count of live recognizers, each having run once.
fn recognizer_rss(
    engine: &std::sync::Arc<Engine>,
    counts: &[usize],
    samples: &[f32],
) -> BenchResult<Value> {
    let mut live: Vec<Recognizer> = Vec::new();
    let mut rows = vec![json!({"recognizers": 0, "rss_mib": proc_status_mib("VmRSS")})];
    for &count in counts {
        while live.len() < count {
            let mut rec = engine.recognizer()?;
            rec.transcribe(samples, |_, _| {})?;
            live.push(rec);
        }
        rows.push(json!({"recognizers": count, "rss_mib": proc_status_mib("VmRSS")}));
    }
    Ok(Value::Array(rows))
}

/// Times one audio prefix: whole pipeline, then the encoder alone on the same pieces.
fn bench_duration(
    rec: &mut Recognizer,
    samples: &[f32],
    secs: f64,
    args: &Args,
    label: &str,
) -> BenchResult<Value> {
    // The memory this duration needs: the peak while it is transcribed,
    // against the RSS it starts from (the load's peak would hide it).
    let rss_before = proc_status_mib("VmRSS");
    let peak_reset = reset_peak_rss();
    let pieces = rec.plan_pieces(samples)?;
    let mels: Vec<MelFrames> = pieces
        .iter()
        .map(|p| rec.features(&samples[p.samples.clone()]))
        .collect();
    let mut words = 0;
    let (whole_s, whole_runs) = time_median(args.reps, || {
        words = rec.transcribe(samples, |_, _| {})?.words.len();
        Ok(())
    })?;
    let peak_whole = peak_reset.then(|| proc_status_mib("VmHWM")).flatten();
    eprintln!("  {label} {secs} s whole pipeline: {whole_s:.3} s");
    let (encoder_s, encoder_runs) = time_median(args.reps, || {
        for mel in &mels {
            rec.encode(mel)?;
        }
        Ok(())
    })?;
    eprintln!(
        "  {label} {secs} s encoder only ({} pieces): {encoder_s:.3} s",
        mels.len()
    );
    let peak_end = peak_reset.then(|| proc_status_mib("VmHWM")).flatten();
    let mut piece_files = Vec::new();
    if let Some(dir) = &args.inputs_dir {
        for (i, mel) in mels.iter().enumerate() {
            let stem = format!("{secs}s_piece{i}");
            write_f32(&dir.join(format!("{stem}.f32")), &mel.data)?;
            // Our encoder output for the first piece, so the Python side can compare outputs.
            let encoded = if i == 0 {
                let out = rec.encode(mel)?;
                let name = format!("{stem}_encoded_{label}.f32");
                write_f32(&dir.join(&name), &out.data)?;
                json!({"file": name, "dim": out.dim, "frames": out.frames})
            } else {
                Value::Null
            };
            piece_files.push(
                json!({"file": format!("{stem}.f32"), "frames": mel.frames, "encoded": encoded}),
            );
        }
    }
    Ok(json!({
        "duration_secs": secs,
        "pieces": piece_files,
        "piece_count": mels.len(),
        "whole_median_s": whole_s,
        "whole_runs_s": whole_runs,
        "encoder_median_s": encoder_s,
        "encoder_runs_s": encoder_runs,
        "rtf": whole_s / secs,
        "rss_before_mib": rss_before,
        "peak_rss_whole_mib": peak_whole,
        "peak_rss_mib": peak_end,
        "words": words,
    }))
}

fn main() -> BenchResult<()> {
    let args = parse_args()?;
    // As the binary does before it loads the engine (src/cli/mod.rs).
    let huge_pages_off = gigastt::speech::huge_pages_off()?;
    let audio = audio::decode(&fs::read(&args.audio_path)?)?;
    if let Some(dir) = &args.inputs_dir {
        fs::create_dir_all(dir)?;
    }
    let options = EngineOptions {
        precision: args.precision,
        encoder_threads: args.threads,
        ..EngineOptions::default()
    };
    let started = Instant::now();
    let engine = Engine::load(&args.model_dir, &options)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let info = engine.info().clone();
    let label = format!("{}_t{}", info.precision.as_str(), args.threads);
    eprintln!(
        "{label}: {} loaded in {load_ms:.0} ms (encoder in {} pieces: {})",
        engine.encoder_path().display(),
        info.encoder_pieces,
        info.encoder_stages
    );
    let rss_after_load = proc_status_mib("VmRSS");
    let peak_after_load = proc_status_mib("VmHWM");

    let prefix = |secs: f64| -> BenchResult<&[f32]> {
        let n = (secs * SAMPLE_RATE_HZ as f64).round() as usize;
        audio
            .samples
            .get(..n)
            .ok_or_else(|| format!("{} is shorter than {secs} s", args.audio_path.display()).into())
    };
    let shortest = args
        .durations_secs
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    let recognizers = if args.recognizer_counts.is_empty() || !shortest.is_finite() {
        Value::Null
    } else {
        recognizer_rss(&engine, &args.recognizer_counts, prefix(shortest)?)?
    };

    let mut rec = engine.recognizer()?;
    let mut durations = Vec::new();
    // Each duration resets the peak, so the process's peak is the largest
    // of the readings taken before each reset.
    let mut peak_after_runs = proc_status_mib("VmHWM");
    for &secs in &args.durations_secs {
        let row = bench_duration(&mut rec, prefix(secs)?, secs, &args, &label)?;
        let peak = row["peak_rss_mib"].as_f64();
        peak_after_runs = larger(peak_after_runs, peak);
        durations.push(row);
    }
    let peak_after_runs = larger(peak_after_runs, proc_status_mib("VmHWM"));
    let encoder_path = engine.encoder_path().to_path_buf();
    let encoder_bytes = fs::metadata(&encoder_path).map(|m| m.len()).ok();
    // The same load once more in this process, whose memory is already
    // faulted in: on the VM we measure on, the first load after a quiet spell
    // pays ~2 s for fresh memory (bench/README.md).
    drop(rec);
    drop(engine);
    let started = Instant::now();
    let again = Engine::load(&args.model_dir, &options)?;
    let load_again_ms = started.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "{label}: loaded again in {load_again_ms:.0} ms ({})",
        again.info().encoder_stages
    );
    drop(again);
    let result = json!({
        "runtime": "gigastt",
        "precision": info.precision.as_str(),
        "threads": args.threads,
        "reps": args.reps,
        "encoder_file": encoder_path,
        "encoder_file_mib": encoder_bytes.map(|b| b as f64 / 1048576.0),
        "huge_pages_off": huge_pages_off,
        "load_ms": load_ms,
        "load_stages": info.encoder_stages,
        "load_again_ms": load_again_ms,
        "rss_after_load_mib": rss_after_load,
        "peak_rss_after_load_mib": peak_after_load,
        "peak_rss_after_runs_mib": peak_after_runs,
        "recognizer_rss": recognizers,
        "durations": durations,
    });
    let text = serde_json::to_string_pretty(&result)?;
    match &args.json_path {
        Some(path) => fs::write(path, text + "\n")?,
        None => println!("{text}"),
    }
    Ok(())
}
