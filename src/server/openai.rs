//! `POST /v1/audio/transcriptions`: OpenAI's transcription API over our engine,
//! so the `openai` SDKs and tools built on them work with `base_url` changed.
//!
//! The `multipart/form-data` body streams through the strict parser (no second
//! copy of the upload), [`parse_form`] checks the fields, and the file is
//! transcribed as on `/v1/transcribe`. Fields:
//! - `file` (required, a file part): format sniffed from the bytes, never the name;
//! - `model`: optional; any name runs the loaded model and is never echoed;
//! - `language`: `ru`, `russian` (any case) or empty; anything else is a 400;
//! - `prompt`, `temperature`: accepted and ignored (greedy decoding, no prompting);
//! - `response_format`: `json` (`{"text","usage"}`), `text`, `srt`, `vtt`, `verbose_json`;
//! - `timestamp_granularities[]`: `word`, `segment`; only with `verbose_json`, as
//!   OpenAI enforces. None given means segments only, as OpenAI answers;
//! - `stream`: `true` answers with Server-Sent Events as OpenAI's streaming models
//!   do: `transcript.text.delta` per finished segment (a leading space on all but
//!   the first, so the deltas join into the text), then one `transcript.text.done`.
//!   No `[DONE]` line (OpenAI's SDK ends at the close). Only with `json` or `text`.
//!
//! Other fields (`include[]`, `chunking_strategy`...) are ignored. Errors take
//! OpenAI's shape `{"error":{"message","type","param","code"}}` with our codes;
//! only the rate limiter's 429, answered before this handler, keeps ours.

use std::io::BufReader;
use std::net::TcpStream;
use std::time::Instant;

use serde_json::{Value, json};

use super::error::ApiError;
use super::{App, SSE_KEEPALIVE, rest};
use crate::http::{
    BodyReader, HttpError, MultipartLimits, Part, Request, Response, StatusCode,
    boundary_from_content_type, parse_multipart, write_continue,
};
use crate::output::{self, Format};
use crate::speech::Transcript;

/// What the handler did; `routes.rs` writes the response or just closes.
pub(crate) enum Reply {
    /// Write this response; the body was read to its end (keep-alive is fine).
    Send(Response),
    /// Write this response and close: part of the body may still be unread.
    Close(Response),
    /// A Server-Sent Events stream was written; close.
    Streamed,
}

/// An [`ApiError`] plus the form field it is about, rendered OpenAI's way.
#[derive(Debug)]
pub(crate) struct OpenAiError {
    error: ApiError,
    param: Option<String>,
}

impl OpenAiError {
    /// A 400 about field `param`.
    fn invalid(param: &str, code: &'static str, message: impl Into<String>) -> OpenAiError {
        let error = ApiError::new(StatusCode::BAD_REQUEST, code, message);
        OpenAiError {
            error,
            param: Some(param.to_owned()),
        }
    }

    /// `{"error":{"message","type","param","code"}}`.
    fn body(&self) -> Value {
        let kind = match self.error.status.as_u16() {
            500.. => "server_error",
            _ => "invalid_request_error",
        };
        let (message, code) = (&self.error.message, self.error.code);
        json!({"error": {"message": message, "type": kind, "param": self.param, "code": code}})
    }

    fn to_response(&self) -> Response {
        let response = Response::json(self.error.status, &self.body());
        match self.error.retry_after_secs() {
            Some(secs) => response.with_header("Retry-After", secs.to_string()),
            None => response,
        }
    }
}

impl<E: Into<ApiError>> From<E> for OpenAiError {
    fn from(e: E) -> Self {
        OpenAiError {
            error: e.into(),
            param: None,
        }
    }
}

/// A 400 `invalid_value` about field `param`.
fn bad(param: &str, message: impl Into<String>) -> OpenAiError {
    OpenAiError::invalid(param, "invalid_value", message)
}

/// The checked fields of one request.
#[derive(Debug)]
pub(crate) struct Form {
    /// The uploaded file's bytes.
    pub(crate) file: Vec<u8>,
    /// `response_format`; [`Format::Json`] means OpenAI's `{"text"}`.
    pub(crate) format: Format,
    /// `verbose_json` lists words.
    pub(crate) words: bool,
    /// `verbose_json` lists segments.
    pub(crate) segments: bool,
    /// Answer with Server-Sent Events.
    pub(crate) stream: bool,
}

/// Checks the form fields (see the module doc); pure, so it is tested alone.
/// Fields named `...[]` may repeat; any other field sent twice is a 400.
pub(crate) fn parse_form(parts: Vec<Part>) -> Result<Form, OpenAiError> {
    const GRANULARITIES: &str = "timestamp_granularities[]";
    let (mut file, mut format, mut stream) = (None, Format::Json, false);
    let (mut words, mut segments, mut has_granularity) = (false, false, false);
    let mut seen: Vec<String> = Vec::new();
    for part in parts {
        let name = part.name.as_str();
        if !name.ends_with("[]") && seen.iter().any(|s| s == name) {
            return Err(bad(name, format!("field {name:?} was sent more than once")));
        }
        seen.push(name.to_owned());
        match (name, part.is_file()) {
            ("file", true) => {
                file = Some(part.data);
                continue;
            }
            ("file", false) => return Err(bad(name, "`file` must be a file upload")),
            (_, true) => return Err(bad(name, format!("send the audio as `file`, not {name:?}"))),
            _ => {}
        }
        let value = part.text().map_err(|e| bad(name, e.to_string()))?.trim();
        match name {
            "language" if !matches!(value.to_lowercase().as_str(), "" | "ru" | "russian") => {
                let message = format!(
                    "language {value:?} is not supported: this server transcribes Russian only \
                     (send \"ru\" or leave it out)"
                );
                return Err(OpenAiError::invalid(name, "unsupported_language", message));
            }
            // OpenAI's names, exactly: no `txt` alias, no other case.
            "response_format" => {
                format = Format::ALL
                    .into_iter()
                    .find(|f| f.name() == value)
                    .ok_or_else(|| {
                        let names = "json, text, srt, vtt or verbose_json";
                        bad(
                            name,
                            format!("unknown response_format {value:?}; use {names}"),
                        )
                    })?;
            }
            "stream" => {
                stream = match value.to_ascii_lowercase().as_str() {
                    "true" | "1" => true,
                    "false" | "0" | "" => false,
                    _ => {
                        return Err(bad(
                            name,
                            format!("`stream` must be true or false, not {value:?}"),
                        ));
                    }
                };
            }
            GRANULARITIES | "timestamp_granularities" => {
                has_granularity = true;
                match value {
                    "word" => words = true,
                    "segment" => segments = true,
                    _ => {
                        let message =
                            format!("unknown timestamp granularity {value:?}; use word or segment");
                        return Err(bad(GRANULARITIES, message));
                    }
                }
            }
            // model: any name runs the loaded model; prompt, temperature and
            // newer fields (include[], chunking_strategy) have no effect here.
            _ => {}
        }
    }
    let file = file.ok_or_else(|| {
        let message = "missing `file`: upload the audio as a multipart file field named \"file\"";
        OpenAiError::invalid("file", "missing_required_parameter", message)
    })?;
    if has_granularity && format != Format::VerboseJson {
        let message = "`timestamp_granularities[]` is only supported when `response_format` \
                       is set to `verbose_json`";
        return Err(bad(GRANULARITIES, message));
    }
    if stream && !matches!(format, Format::Json | Format::Text) {
        let message = format!("`stream` needs response_format json or text, not {format}");
        return Err(bad("stream", message));
    }
    let segments = segments || !has_granularity;
    Ok(Form {
        file,
        format,
        words,
        segments,
        stream,
    })
}

/// Handles one request; errors come back as OpenAI-shaped responses.
pub(crate) fn transcriptions(
    app: &App,
    request: &Request,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    cors: &[(String, String)],
) -> Reply {
    match read_form(app, request, reader, writer) {
        Ok(form) => {
            transcribe(app, form, writer, cors).unwrap_or_else(|e| Reply::Send(e.to_response()))
        }
        Err(reply) => reply,
    }
}

/// Reads and checks the form. Errors before the body's end close the connection.
fn read_form(
    app: &App,
    request: &Request,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
) -> Result<Form, Reply> {
    let close = |e: OpenAiError| Reply::Close(e.to_response().with_header("Connection", "close"));
    rest::pool(app).map_err(|e| close(e.into()))?;
    let content_type = request.header("Content-Type").unwrap_or_default();
    let boundary = boundary_from_content_type(content_type).map_err(|e| close(e.into()))?;
    let limit_bytes = app.config.body_limit_bytes;
    let mut body =
        BodyReader::for_request(request, &mut *reader, limit_bytes).map_err(|e| close(e.into()))?;
    if request.needs_continue() {
        write_continue(writer).map_err(|e| close(HttpError::Io(e).into()))?;
    }
    let limits = MultipartLimits::for_body_limit(limit_bytes);
    let parts = parse_multipart(&mut body, &boundary, &limits).map_err(|e| close(e.into()))?;
    body.drain().map_err(|e| close(e.into()))?;
    parse_form(parts).map_err(|e| Reply::Send(e.to_response()))
}

fn transcribe(
    app: &App,
    form: Form,
    writer: &mut TcpStream,
    cors: &[(String, String)],
) -> Result<Reply, OpenAiError> {
    let pool = rest::pool(app)?;
    let samples = rest::decode_body(&form.file).map_err(|e| OpenAiError {
        error: e,
        param: Some("file".into()),
    })?;
    let started = Instant::now();
    let pieces = pool.plan(&samples, app.config.checkout_timeout)?;
    if form.stream {
        rest::stream_sse(
            app,
            pool,
            (&samples, &pieces, started),
            writer,
            cors,
            |t| {
                let segment = t.segments.last()?;
                let space = if t.segments.len() > 1 { " " } else { "" };
                let delta = format!("{space}{}", segment.text);
                Some(json!({"type": "transcript.text.delta", "delta": delta}))
            },
            |result| match result {
                Ok(t) => json!({"type": "transcript.text.done", "text": t.text}),
                Err(e) => {
                    let mut data = OpenAiError::from(e).body();
                    data["type"] = json!("error");
                    data
                }
            },
        );
        return Ok(Reply::Streamed);
    }
    let transcript = pool.transcribe_pieces(&samples, &pieces, SSE_KEEPALIVE, |_| {})?;
    app.metrics
        .record_work(transcript.duration, started.elapsed());
    Ok(Reply::Send(render(&transcript, &form)))
}

/// The 200 response in the asked format.
fn render(transcript: &Transcript, form: &Form) -> Response {
    let verbose = output::to_verbose_json(transcript, form.words, form.segments);
    match form.format {
        Format::Json => Response::json(
            StatusCode::OK,
            &json!({"text": transcript.text, "usage": verbose["usage"]}),
        ),
        Format::VerboseJson => Response::json(StatusCode::OK, &verbose),
        other => {
            let (content_type, body) = output::render(transcript, other);
            Response::bytes(StatusCode::OK, content_type, body)
        }
    }
}

#[cfg(test)]
mod tests;
