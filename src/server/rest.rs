//! `/health`, `/ready`, `/v1/models`, `/metrics`, `/v1/transcribe[/stream]`.

use std::io::BufReader;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use super::error::ApiError;
use super::routes::read_body;
use super::{App, SSE_KEEPALIVE};
use crate::http::{Request, Response, SseWriter, StatusCode};
use crate::output::{self, Format};
use crate::pool::{Event, Pool, PoolError};
use crate::speech::Transcript;
use crate::speech::segment::Piece;

/// Sample rates the WebSocket accepts (SPEC.md).
pub const SUPPORTED_RATES_HZ: &[u32] = &[8_000, 16_000, 24_000, 44_100, 48_000];

pub(crate) fn health(app: &App) -> Response {
    Response::json(
        StatusCode(200),
        &json!({
            "status": "ok",
            "model": app.model_info().map(|i| i.id.clone()),
            "version": env!("CARGO_PKG_VERSION"),
        }),
    )
}

pub(crate) fn ready(app: &App) -> Response {
    let (status, code, available, total) = match app.loaded.get() {
        _ if app.is_shutting_down() => ("shutting_down", 503, 0, 0),
        None => ("loading", 503, 0, 0),
        Some(l) => {
            let s = l.pool.stats();
            let available = s.size.saturating_sub(s.busy);
            if available == 0 && s.waiting > 0 {
                ("saturated", 503, 0, s.size)
            } else {
                ("ready", 200, available, s.size)
            }
        }
    };
    let response = Response::json(
        StatusCode(code),
        &json!({"status": status, "pool_available": available, "pool_total": total}),
    );
    if code == 503 {
        response.with_header("Retry-After", "1")
    } else {
        response
    }
}

pub(crate) fn models(app: &App) -> Result<Response, ApiError> {
    let loaded = app.loaded.get().ok_or_else(loading)?;
    let info = loaded.engine.info();
    let mut model = json!({
        "id": info.id,
        "object": "model",
        "owned_by": "gigastt",
        "variant": info.variant.as_str(),
        "precision": info.precision.as_str(),
        "sample_rate": crate::speech::SAMPLE_RATE_HZ,
        "vocab_size": info.vocab_size,
        "pool_size": loaded.pool.size(),
        "encoder_threads": info.encoder_threads,
        "encoder_kernels": info.encoder_kernels,
        "loop_simd": info.loop_simd,
        "formats": output::Format::ALL.iter().map(|f| f.name()).collect::<Vec<_>>(),
        "audio_formats": crate::audio::supported_formats(),
        "supported_rates": SUPPORTED_RATES_HZ,
        "test_model": info.is_test_model,
    });
    if info.is_test_model {
        model["warning"] =
            json!("TEST model with random weights, not GigaAM; run `gigastt download`");
    }
    Ok(Response::json(
        StatusCode(200),
        &json!({"object": "list", "data": [model]}),
    ))
}

pub(crate) fn metrics(app: &App) -> Response {
    let stats = app.loaded.get().map(|l| l.pool.stats());
    Response::bytes(
        StatusCode(200),
        "text/plain; version=0.0.4",
        app.metrics.render(stats).into_bytes(),
    )
}

/// 503 while the model loads (REST and WebSocket upgrades alike).
pub(crate) fn loading() -> ApiError {
    ApiError::new(StatusCode(503), "model_loading", "model is still loading")
        .retry_after(std::time::Duration::from_secs(1))
}

/// The pool, or 503 while loading / shutting down.
pub(crate) fn pool(app: &App) -> Result<&Pool, ApiError> {
    if app.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    app.loaded.get().map(|l| &l.pool).ok_or_else(loading)
}

/// Decodes a request body into shared 16 kHz samples.
pub(crate) fn decode_body(bytes: &[u8]) -> Result<Arc<Vec<f32>>, ApiError> {
    let audio = crate::audio::decode(bytes)?;
    Ok(Arc::new(audio.samples))
}

fn format_param(request: &Request) -> Result<Format, ApiError> {
    match request.query_param("format") {
        None => Ok(Format::Json),
        Some(f) => f.parse().map_err(|_| {
            ApiError::new(
                StatusCode(400),
                "bad_format",
                format!("unknown format {f:?}; use json, text, srt or vtt"),
            )
        }),
    }
}

pub(crate) fn transcribe(
    app: &App,
    request: &Request,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
) -> Result<Response, ApiError> {
    let format = format_param(request)?;
    let pool = pool(app)?;
    let bytes = read_body(app, request, reader, writer)?;
    let samples = decode_body(&bytes)?;
    drop(bytes);
    let started = Instant::now();
    let transcript = pool.transcribe(Arc::clone(&samples), app.config.checkout_timeout)?;
    app.metrics
        .record_work(transcript.duration, started.elapsed());
    let (content_type, body) = output::render(&transcript, format);
    Ok(Response::bytes(StatusCode(200), content_type, body))
}

pub(crate) fn transcribe_stream(
    app: &App,
    request: &Request,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    cors: &[(String, String)],
) -> Result<(), ApiError> {
    let pool = pool(app)?;
    let bytes = read_body(app, request, reader, writer)?;
    let samples = decode_body(&bytes)?;
    drop(bytes);
    let started = Instant::now();
    let pieces = pool.plan(&samples, app.config.checkout_timeout)?;
    stream_sse(
        app,
        pool,
        (&samples, &pieces, started),
        writer,
        cors,
        |t| {
            let seg = t.segments.last()?;
            let words = Transcript {
                words: t.segment_words(seg).to_vec(),
                ..Default::default()
            };
            Some(json!({
                "type": "partial",
                "text": seg.text,
                "start": round_ms(seg.start),
                "end": round_ms(seg.end),
                "words": output::to_json(&words)["words"],
            }))
        },
        |result| match result {
            Ok(transcript) => {
                let mut data = output::to_json(&transcript);
                data["type"] = json!("final");
                data
            }
            Err(e) => {
                let e = ApiError::from(e);
                json!({"type": "error", "code": e.code, "message": e.message})
            }
        },
    );
    Ok(())
}

/// Writes a transcription as Server-Sent Events, shared by our stream route and
/// the OpenAI one: `on_segment` renders each finished segment (None: skip), a
/// comment keeps the stream alive every [`SSE_KEEPALIVE`], and `last` renders
/// the closing event from the outcome. A client that goes away stops the writes,
/// not the transcription (its workers are already committed).
pub(crate) fn stream_sse(
    app: &App,
    pool: &Pool,
    (samples, pieces, started): (&Arc<Vec<f32>>, &[Piece], Instant),
    writer: &mut TcpStream,
    cors: &[(String, String)],
    mut on_segment: impl FnMut(&Transcript) -> Option<serde_json::Value>,
    last: impl FnOnce(Result<Transcript, PoolError>) -> serde_json::Value,
) {
    let Ok(mut sse) = SseWriter::start(&mut *writer, cors) else {
        return;
    };
    let mut is_broken = false;
    let result = pool.transcribe_pieces(samples, pieces, SSE_KEEPALIVE, |event| {
        if is_broken {
            return;
        }
        let sent = match event {
            Event::Segment(t) => match on_segment(t) {
                Some(data) => sse.event(&data.to_string()),
                None => Ok(()),
            },
            Event::Heartbeat => sse.comment("keep-alive"),
        };
        is_broken = sent.is_err();
    });
    if let Ok(t) = &result {
        app.metrics.record_work(t.duration, started.elapsed());
    }
    let _ = sse.event(&last(result).to_string());
}

fn round_ms(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}
