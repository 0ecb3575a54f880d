//! `gigastt transcribe FILE...`: file -> text on stdout.
//!
//! Each file is decoded, cut at pauses when long, and printed in the chosen
//! format. A bad file prints one line on stderr and the run goes on; the exit
//! code is then 1. A progress bar is drawn on stderr for long audio on a terminal.

use std::io::{IsTerminal, Read, Write};

use super::flags::RawFlags;
use super::{CliError, Exit, load_engine};
use crate::output::{Format, render};

/// Audio longer than this (seconds) gets a progress bar on a terminal.
const PROGRESS_MIN_SECS: f64 = 30.0;

/// Runs the command.
pub fn run(raw: &RawFlags) -> Result<(), CliError> {
    if raw.free.is_empty() {
        return Err(CliError::usage(
            "transcribe needs at least one FILE (or - for stdin)",
        ));
    }
    let format: Format = raw
        .parse("format")
        .map_err(CliError::usage)?
        .unwrap_or(Format::Text);
    let engine = load_engine(raw, 1)?;
    let mut recognizer = engine
        .recognizer()
        .map_err(|e| CliError::new(Exit::Model, e.to_string()))?;
    let mut failed = 0;
    let stdout = std::io::stdout();
    for name in &raw.free {
        match transcribe_one(name, &mut recognizer) {
            Ok(transcript) => {
                let (_, bytes) = render(&transcript, format);
                let mut out = stdout.lock();
                let written = out.write_all(&bytes).and_then(|_| out.flush());
                if let Err(e) = written {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(());
                    }
                    return Err(CliError::new(Exit::Failed, format!("writing output: {e}")));
                }
            }
            Err(message) => {
                eprintln!("gigastt: {name}: {message}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        // Each failure already printed its own line; a summary only helps with several files.
        let summary = if raw.free.len() > 1 {
            format!("{failed} of {} files failed", raw.free.len())
        } else {
            String::new()
        };
        return Err(CliError::new(Exit::Failed, summary));
    }
    Ok(())
}

fn transcribe_one(
    name: &str,
    recognizer: &mut crate::speech::Recognizer,
) -> Result<crate::speech::Transcript, String> {
    let bytes = if name == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| format!("reading stdin: {e}"))?;
        buf
    } else {
        std::fs::read(name).map_err(|e| e.to_string())?
    };
    let audio = crate::audio::decode(&bytes).map_err(|e| e.to_string())?;
    drop(bytes);
    let show_progress =
        std::io::stderr().is_terminal() && audio.duration_secs() > PROGRESS_MIN_SECS;
    let transcript = recognizer
        .transcribe(&audio.samples, |done, total| {
            if show_progress {
                draw_progress(done, total);
            }
        })
        .map_err(|e| e.to_string())?;
    if show_progress {
        eprintln!();
    }
    Ok(transcript)
}

fn draw_progress(done: usize, total: usize) {
    const WIDTH: usize = 30;
    let filled = WIDTH * done / total.max(1);
    eprint!(
        "\r[{}{}] {done}/{total} segments",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled)
    );
    let _ = std::io::stderr().flush();
}
