//! `/v1/ws`: WebSocket sessions (protocol of SPEC.md, compatible with gigastt clients).
//!
//! Our HTTP layer validates the upgrade after the origin and rate checks and
//! answers 101 itself; tungstenite then takes the same socket, with frame and
//! message caps. One thread per session runs a plain read loop with a short
//! socket timeout, so it can also notice finished jobs, the idle timeout, the
//! session cap (close 1008) and shutdown (last final, then close 1001).
//!
//! Audio: binary PCM16 LE mono frames at the configured rate (default 48 kHz),
//! resampled to 16 kHz; the speech engine's [`UtteranceTracker`] decides when a
//! partial or a final is due, and each becomes a stream-priority pool job.

use std::collections::VecDeque;
use std::io::BufReader;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use super::error::ApiError;
use super::rest::SUPPORTED_RATES_HZ;
use super::{App, Peer};
use crate::audio::pcm::Pcm16Decoder;
use crate::audio::resample::Resampler;
use crate::http::{Request, Response, StatusCode};
use crate::pool::{Pending, Priority};
use crate::speech::stream::{Utterance, UtteranceTracker};
use crate::speech::{SAMPLE_RATE_HZ, Word};

/// Sample rate assumed until the client configures one (as gigastt clients expect).
pub const DEFAULT_RATE_HZ: u32 = 48_000;
/// How often the session loop wakes up when the client is silent.
const POLL: Duration = Duration::from_millis(50);
/// A partial that cannot start within this is skipped (the next one will do).
const PARTIAL_CHECKOUT: Duration = Duration::from_secs(1);
/// Protocol version in the `ready` message.
const PROTOCOL_VERSION: &str = "1.0";

/// Validates the upgrade, answers 101 and runs the session to its end.
pub(crate) fn upgrade(
    app: &Arc<App>,
    request: &Request,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    peer: Peer,
) -> Result<(), ApiError> {
    if !request.is_websocket_upgrade() {
        return Err(ApiError::new(
            StatusCode(400),
            "bad_upgrade",
            "expected a WebSocket upgrade (version 13)",
        ));
    }
    if app.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    let loaded = app.loaded.get().ok_or_else(super::rest::loading)?;
    let key = request.header("Sec-WebSocket-Key").unwrap_or_default();
    let accept = tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    Response::websocket_accept(&accept)
        .write_to(writer, true)
        .map_err(|e| ApiError::from(crate::http::HttpError::Io(e)))?;
    let leftover = reader.buffer().to_vec();
    let stream = reader
        .get_ref()
        .try_clone()
        .map_err(|e| ApiError::from(crate::http::HttpError::Io(e)))?;
    let _ = stream.set_read_timeout(Some(POLL));
    let max = app.config.ws_frame_max_bytes.max(1024);
    let config = WebSocketConfig::default()
        .max_frame_size(Some(max))
        .max_message_size(Some(max));
    let socket = WebSocket::from_partially_read(stream, leftover, Role::Server, Some(config));
    app.metrics.ws_sessions.fetch_add(1, Ordering::Relaxed);
    let tracker = loaded
        .engine
        .vad_stream()
        .map(UtteranceTracker::new)
        .map_err(|e| {
            log::error!("cannot start VAD: {e}");
            ApiError::internal()
        });
    let result = match tracker {
        Ok(tracker) => Session::new(app, socket, tracker).run(),
        Err(e) => Err(e.message),
    };
    app.metrics.ws_sessions.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(reason) => log::info!("{peer}: websocket session ended ({reason})"),
        Err(e) => log::debug!("{peer}: websocket session ended with error: {e}"),
    }
    Ok(())
}

/// What a job returns: the words, and the audio and worker time it took.
struct Transcribed {
    words: Vec<Word>,
    audio_secs: f64,
    inference: Duration,
}

/// A transcription job of this session.
struct Job {
    is_final: bool,
    pending: Pending<Transcribed>,
}

struct Session<'a> {
    app: &'a App,
    socket: WebSocket<TcpStream>,
    tracker: UtteranceTracker,
    pcm: Pcm16Decoder,
    resampler: Resampler,
    rate_hz: u32,
    audio_started: bool,
    jobs: VecDeque<Job>,
    samples: Vec<f32>,
    resampled: Vec<f32>,
}

impl<'a> Session<'a> {
    fn new(app: &'a App, socket: WebSocket<TcpStream>, tracker: UtteranceTracker) -> Session<'a> {
        Session {
            app,
            socket,
            tracker,
            pcm: Pcm16Decoder::default(),
            resampler: Resampler::new(DEFAULT_RATE_HZ, SAMPLE_RATE_HZ as u32),
            rate_hz: DEFAULT_RATE_HZ,
            audio_started: false,
            jobs: VecDeque::new(),
            samples: Vec::new(),
            resampled: Vec::new(),
        }
    }

    fn send(&mut self, value: Value) -> Result<(), String> {
        self.socket
            .send(Message::text(value.to_string()))
            .map_err(|e| e.to_string())
    }

    fn error(&mut self, code: &str, message: &str) -> Result<(), String> {
        self.send(json!({"type": "error", "code": code, "message": message}))
    }

    fn close(&mut self, code: CloseCode, reason: &str) {
        let _ = self.socket.close(Some(CloseFrame {
            code,
            reason: reason.to_string().into(),
        }));
        // Give the client a moment to answer the close, then drop the socket.
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            match self.socket.read() {
                Err(tungstenite::Error::Io(e)) if is_timeout(&e) => continue,
                Err(_) => break,
                Ok(_) => continue,
            }
        }
    }

    /// The session loop; `Ok` carries why it ended.
    fn run(mut self) -> Result<&'static str, String> {
        let info = self.app.model_info().map(|i| i.id.clone());
        self.send(json!({
            "type": "ready",
            "model": info,
            "sample_rate": DEFAULT_RATE_HZ,
            "version": PROTOCOL_VERSION,
            "supported_rates": SUPPORTED_RATES_HZ,
        }))?;
        let started = Instant::now();
        let mut last_heard = Instant::now();
        loop {
            self.deliver_finished()?;
            if self.app.is_shutting_down() {
                self.flush_and_wait()?;
                self.close(CloseCode::Away, "server shutting down");
                return Ok("shutdown");
            }
            if started.elapsed() >= self.app.config.max_session {
                self.flush_and_wait()?;
                let _ = self.error("session_limit", "maximum session length reached");
                self.close(CloseCode::Policy, "maximum session length reached");
                return Ok("session cap");
            }
            if last_heard.elapsed() >= self.app.config.idle_timeout {
                let _ = self.error("idle_timeout", "no data received; closing");
                self.close(CloseCode::Away, "idle timeout");
                return Ok("idle timeout");
            }
            let message = match self.socket.read() {
                Ok(m) => m,
                Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                    let _ = self.socket.flush();
                    continue;
                }
                Err(tungstenite::Error::Capacity(e)) => {
                    let _ = self.error(
                        "frame_too_large",
                        &format!("{e}; limit is --ws-frame-max-bytes"),
                    );
                    self.close(CloseCode::Size, "frame too large");
                    return Ok("frame too large");
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Ok("closed");
                }
                Err(e) => return Err(e.to_string()),
            };
            last_heard = Instant::now();
            match message {
                Message::Binary(bytes) => self.on_audio(&bytes)?,
                Message::Text(text) => {
                    if self.on_text(text.as_str())? {
                        self.flush_and_wait()?;
                        self.close(CloseCode::Normal, "stopped");
                        return Ok("stop");
                    }
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                Message::Close(_) => {
                    // tungstenite queued the echo of the client's Close: send it.
                    let _ = self.socket.flush();
                    return Ok("client closed");
                }
            }
        }
    }

    /// Handles a control message; true on `stop`.
    fn on_text(&mut self, text: &str) -> Result<bool, String> {
        let parsed: Result<Value, _> = serde_json::from_str(text);
        let Ok(value) = parsed else {
            self.error("bad_message", "message is not valid JSON")?;
            return Ok(false);
        };
        match value.get("type").and_then(Value::as_str) {
            Some("stop") => Ok(true),
            Some("configure") => {
                if self.audio_started {
                    self.error(
                        "configure_after_audio",
                        "configure must come before the first audio frame",
                    )?;
                    return Ok(false);
                }
                let rate = value.get("sample_rate");
                match rate
                    .and_then(whole_number)
                    .and_then(|r| u32::try_from(r).ok())
                    .filter(|r| SUPPORTED_RATES_HZ.contains(r))
                {
                    Some(r) => {
                        self.rate_hz = r;
                        self.resampler = Resampler::new(r, SAMPLE_RATE_HZ as u32);
                        self.send(json!({"type": "configured", "sample_rate": r}))?;
                    }
                    None => self.error(
                        "unsupported_sample_rate",
                        &format!(
                            "sample_rate {} not supported; use one of {SUPPORTED_RATES_HZ:?}",
                            rate.map_or("(missing)".to_string(), Value::to_string)
                        ),
                    )?,
                }
                Ok(false)
            }
            Some(other) => {
                self.error("bad_message", &format!("unknown message type {other:?}"))?;
                Ok(false)
            }
            None => {
                self.error("bad_message", "message has no \"type\"")?;
                Ok(false)
            }
        }
    }

    fn on_audio(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.audio_started = true;
        self.samples.clear();
        self.pcm.push(bytes, &mut self.samples);
        self.resampled.clear();
        self.resampler.process(&self.samples, &mut self.resampled);
        let chunk = std::mem::take(&mut self.resampled);
        let utterances = self.tracker.push(&chunk).map_err(|e| e.to_string());
        self.resampled = chunk;
        for u in utterances? {
            self.submit(u)?;
        }
        Ok(())
    }

    fn submit(&mut self, utterance: Utterance) -> Result<(), String> {
        let (samples, offset, is_final) = match utterance {
            Utterance::Partial {
                samples,
                offset_samples,
            } => {
                // One partial at a time; skip while any job is still running.
                if !self.jobs.is_empty() {
                    return Ok(());
                }
                (samples, offset_samples, false)
            }
            Utterance::Final {
                samples,
                offset_samples,
            } => {
                // A partial still running would hold a worker this final may
                // need (with a zero checkout it would be refused): let it end.
                while let Some(pos) = self.jobs.iter().position(|j| !j.is_final) {
                    if let Some(job) = self.jobs.remove(pos) {
                        let _ = job.pending.wait();
                    }
                }
                (samples, offset_samples, true)
            }
        };
        let offset_secs = offset as f64 / SAMPLE_RATE_HZ as f64;
        let Some(loaded) = self.app.loaded.get() else {
            return Ok(());
        };
        let checkout = if is_final {
            self.app.config.checkout_timeout
        } else {
            PARTIAL_CHECKOUT
        };
        let audio_secs = samples.len() as f64 / SAMPLE_RATE_HZ as f64;
        match loaded
            .pool
            .submit(Priority::Stream, Some(checkout), move |rec| {
                // Timed on the worker: inference only, not the wait in the queue.
                let started = Instant::now();
                let words = rec.transcribe_piece(&samples, offset_secs)?;
                Ok(Transcribed {
                    words,
                    audio_secs,
                    inference: started.elapsed(),
                })
            }) {
            Ok(pending) => self.jobs.push_back(Job { is_final, pending }),
            Err(e) if is_final => {
                let e = ApiError::from(e);
                self.send(json!({
                    "type": "error", "code": e.code, "message": e.message,
                    "retry_after_ms": e.retry_after.map(|d| d.as_millis() as u64),
                }))?;
            }
            Err(_) => {}
        }
        Ok(())
    }

    /// Sends results of finished jobs, in submission order.
    fn deliver_finished(&mut self) -> Result<(), String> {
        while let Some(result) = self.jobs.front().and_then(|j| j.pending.try_take()) {
            let Some(job) = self.jobs.pop_front() else {
                break;
            };
            self.deliver(job.is_final, result)?;
        }
        Ok(())
    }

    fn deliver(
        &mut self,
        is_final: bool,
        result: Result<Transcribed, crate::pool::PoolError>,
    ) -> Result<(), String> {
        match result {
            Ok(Transcribed {
                words,
                audio_secs,
                inference,
            }) => {
                let text = words
                    .iter()
                    .map(|w| w.word.as_str())
                    .collect::<Vec<_>>()
                    .join(" ");
                if is_final && text.is_empty() {
                    // A pause after noise with no words: nothing to report.
                    Ok(())
                } else if is_final {
                    // Finals only: partials re-read audio a final will count.
                    self.app.metrics.record_work(audio_secs, inference);
                    self.send(json!({
                        "type": "final",
                        "text": text,
                        "words": words.iter().map(word_json).collect::<Vec<_>>(),
                    }))
                } else if !text.is_empty() {
                    self.send(json!({"type": "partial", "text": text}))
                } else {
                    Ok(())
                }
            }
            Err(e) if is_final => {
                let e = ApiError::from(e);
                self.send(json!({
                    "type": "error", "code": e.code, "message": e.message,
                    "retry_after_ms": e.retry_after.map(|d| d.as_millis() as u64),
                }))
            }
            Err(_) => Ok(()),
        }
    }

    /// Flushes buffered audio into a last final and waits for every job.
    fn flush_and_wait(&mut self) -> Result<(), String> {
        self.samples.clear();
        self.resampler.flush(&mut self.samples);
        let tail = std::mem::take(&mut self.samples);
        for u in self.tracker.push(&tail).map_err(|e| e.to_string())? {
            self.submit(u)?;
        }
        if let Some(u) = self.tracker.flush() {
            self.submit(u)?;
        }
        while let Some(job) = self.jobs.pop_front() {
            let result = job.pending.wait();
            self.deliver(job.is_final, result)?;
        }
        Ok(())
    }
}

fn word_json(w: &Word) -> Value {
    let ms = |s: f64| (s * 1000.0).round() / 1000.0;
    json!({"word": w.word, "start": ms(w.start), "end": ms(w.end), "confidence": (f64::from(w.confidence) * 1000.0).round() / 1000.0})
}

/// A JSON number that is a whole number (16000 or 16000.0), as u64.
fn whole_number(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= f64::from(u32::MAX))
            .map(|f| f as u64)
    })
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}
