//! Renders a [`Transcript`] in the formats clients ask for: our JSON, plain
//! text, SRT, WebVTT and OpenAI's `verbose_json`.
//!
//! Every route and the CLI go through here, so one transcript always reads the
//! same whichever way it leaves. The renderers are pure functions of the
//! transcript: no I/O, no engine, no HTTP. Times are rounded to whole
//! milliseconds, negative or non-finite values become 0.
//!
//! Subtitle cues are built from word times. A cue never spans two segments, has at
//! most [`MAX_CUE_LINES`] lines of at most [`MAX_LINE_CHARS`] characters (counted
//! as Unicode scalar values, so Cyrillic counts one per letter) and lasts at most
//! [`MAX_CUE_MS`]. A single word longer than a line is never cut: it gets a line
//! of its own. Cues never overlap and always end after they start.

use std::fmt;
use std::str::FromStr;

use serde_json::{Value, json};

use crate::speech::transcript::{Transcript, Word};

/// Longest subtitle line, in characters (the common broadcast rule, e.g. Netflix).
pub const MAX_LINE_CHARS: usize = 42;
/// Most lines in one subtitle cue.
pub const MAX_CUE_LINES: usize = 2;
/// Longest subtitle cue, in milliseconds (7 s: the usual reading-time ceiling).
pub const MAX_CUE_MS: u64 = 7_000;
/// Shortest cue we emit, in milliseconds: zero-length cues are invalid for players.
pub const MIN_CUE_MS: u64 = 1;
/// Cues shorter than this, in milliseconds, are stretched towards it into the
/// silence after them (never into the next cue), so a one-word cue stays readable.
pub const PADDED_CUE_MS: u64 = 500;
/// Language name `verbose_json` reports (OpenAI gives the name, not the ISO code).
pub const VERBOSE_LANGUAGE: &str = "russian";

/// A response format, parsed once at the edge from `?format=` or `response_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Our JSON: text, duration, words with confidence, segments.
    Json,
    /// The text and a newline.
    Text,
    /// SubRip subtitles.
    Srt,
    /// WebVTT subtitles.
    Vtt,
    /// OpenAI's `verbose_json`.
    VerboseJson,
}

impl Format {
    /// Every format, in the order `/v1/models` lists them.
    pub const ALL: [Format; 5] = [
        Format::Json,
        Format::Text,
        Format::Srt,
        Format::Vtt,
        Format::VerboseJson,
    ];

    /// The canonical name, as accepted by [`Format::from_str`].
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Text => "text",
            Format::Srt => "srt",
            Format::Vtt => "vtt",
            Format::VerboseJson => "verbose_json",
        }
    }

    /// The `Content-Type` of a response in this format.
    ///
    /// SRT has no registered media type; `application/x-subrip` makes browsers
    /// download instead of show, so we send `text/plain` as OpenAI's API does.
    /// WebVTT has a registered one, `text/vtt`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json | Format::VerboseJson => "application/json",
            Format::Text | Format::Srt => "text/plain; charset=utf-8",
            Format::Vtt => "text/vtt; charset=utf-8",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A format name we don't know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownFormat(pub String);

impl fmt::Display for UnknownFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown format {:?} (expected json, text, srt, vtt or verbose_json)",
            self.0
        )
    }
}

impl std::error::Error for UnknownFormat {}

impl FromStr for Format {
    type Err = UnknownFormat;

    /// Case-insensitive; `txt` is an alias of `text`.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(Format::Json),
            "text" | "txt" => Ok(Format::Text),
            "srt" => Ok(Format::Srt),
            "vtt" => Ok(Format::Vtt),
            "verbose_json" => Ok(Format::VerboseJson),
            _ => Err(UnknownFormat(name.to_owned())),
        }
    }
}

/// Renders `transcript` in `format`: the `Content-Type` and the body.
///
/// `verbose_json` gets its default shape here (segments, no words), as OpenAI
/// answers when no `timestamp_granularities[]` is given.
pub fn render(transcript: &Transcript, format: Format) -> (&'static str, Vec<u8>) {
    let body = match format {
        Format::Json => to_json(transcript).to_string(),
        Format::Text => to_text(transcript),
        Format::Srt => to_srt(transcript),
        Format::Vtt => to_vtt(transcript),
        Format::VerboseJson => to_verbose_json(transcript, false, true).to_string(),
    };
    (format.content_type(), body.into_bytes())
}

/// Our JSON shape (SPEC): `{"text","duration","words":[{"word","start","end",
/// "confidence"}],"segments":[{"start","end","text"}]}`.
///
/// Times are seconds rounded to milliseconds; confidence is rounded to 3 decimals.
pub fn to_json(transcript: &Transcript) -> Value {
    let words: Vec<Value> = transcript
        .words
        .iter()
        .map(|w| {
            json!({
                "word": w.word,
                "start": seconds(w.start),
                "end": seconds(w.end),
                "confidence": confidence(w.confidence),
            })
        })
        .collect();
    let segments: Vec<Value> = transcript
        .segments
        .iter()
        .map(|s| json!({"start": seconds(s.start), "end": seconds(s.end), "text": s.text}))
        .collect();
    json!({
        "text": transcript.text,
        "duration": seconds(transcript.duration),
        "words": words,
        "segments": segments,
    })
}

/// The text and a newline, so a terminal prompt starts on its own line.
pub fn to_text(transcript: &Transcript) -> String {
    format!("{}\n", transcript.text)
}

/// OpenAI's `verbose_json`.
///
/// `words` and `segments` follow `timestamp_granularities[]`: OpenAI returns
/// only the granularities asked for, and asks for `segment` when none is given.
/// So a caller passes `(false, true)` for no granularity, `(true, false)` for
/// `word` alone and `(true, true)` for both. Whisper-only fields we have no
/// value for get neutral constants (`seek` 0, `tokens` [], `temperature` 0,
/// `compression_ratio` 1, `no_speech_prob` 0); `avg_logprob` is the natural log of
/// the segment's mean word confidence.
pub fn to_verbose_json(transcript: &Transcript, words: bool, segments: bool) -> Value {
    let mut body = json!({
        "task": "transcribe",
        "language": VERBOSE_LANGUAGE,
        "duration": seconds(transcript.duration),
        "text": transcript.text,
        "usage": {"type": "duration", "seconds": seconds(transcript.duration).ceil()},
    });
    if segments {
        let list: Vec<Value> = transcript
            .segments
            .iter()
            .enumerate()
            .map(|(id, s)| {
                json!({
                    "id": id,
                    "seek": 0,
                    "start": seconds(s.start),
                    "end": seconds(s.end),
                    "text": s.text,
                    "tokens": [],
                    "temperature": 0.0,
                    "avg_logprob": avg_logprob(transcript.segment_words(s)),
                    "compression_ratio": 1.0,
                    "no_speech_prob": 0.0,
                })
            })
            .collect();
        body["segments"] = Value::Array(list);
    }
    if words {
        let list: Vec<Value> = transcript
            .words
            .iter()
            .map(|w| json!({"word": w.word, "start": seconds(w.start), "end": seconds(w.end)}))
            .collect();
        body["words"] = Value::Array(list);
    }
    body
}

/// SubRip: cues numbered from 1, `hh:mm:ss,mmm` times, a blank line after each
/// cue. No cues gives an empty body, which is a valid empty SRT file.
pub fn to_srt(transcript: &Transcript) -> String {
    let mut out = String::new();
    for (index, cue) in build_cues(transcript).iter().enumerate() {
        out.push_str(&format!(
            "{}\n{} --> {}\n{}\n\n",
            index + 1,
            timestamp(cue.start_ms, ','),
            timestamp(cue.end_ms, ','),
            cue.lines.join("\n"),
        ));
    }
    out
}

/// WebVTT: the `WEBVTT` header and a blank line, then cues with `hh:mm:ss.mmm`
/// times. Cue text is escaped (`&`, `<`, `>`) as the format requires.
pub fn to_vtt(transcript: &Transcript) -> String {
    let mut out = String::from("WEBVTT\n\n");
    for cue in build_cues(transcript) {
        let lines: Vec<String> = cue.lines.iter().map(|l| escape_vtt(l)).collect();
        out.push_str(&format!(
            "{} --> {}\n{}\n\n",
            timestamp(cue.start_ms, '.'),
            timestamp(cue.end_ms, '.'),
            lines.join("\n"),
        ));
    }
    out
}

/// Seconds rounded to milliseconds; negative and non-finite become 0.
fn seconds(value: f64) -> f64 {
    if value.is_finite() && value > 0.0 {
        (value * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

/// A word confidence clamped to 0..=1 and rounded to 3 decimals.
fn confidence(value: f32) -> f64 {
    let value = f64::from(value);
    if value.is_finite() {
        (value.clamp(0.0, 1.0) * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

/// Natural log of the mean word confidence, rounded to 4 decimals; 0 without
/// words. The mean is floored at 1e-6 so the log stays finite (JSON has no -inf).
fn avg_logprob(words: &[Word]) -> f64 {
    if words.is_empty() {
        return 0.0;
    }
    let mean = words.iter().map(|w| confidence(w.confidence)).sum::<f64>() / words.len() as f64;
    (mean.max(1e-6).ln() * 10_000.0).round() / 10_000.0
}

/// Seconds to whole milliseconds; negative and non-finite become 0, and values
/// past `u64` saturate (`as` casts from float saturate).
fn to_ms(seconds: f64) -> u64 {
    if seconds.is_finite() && seconds > 0.0 {
        (seconds * 1000.0).round() as u64
    } else {
        0
    }
}

/// `hh:mm:ss<sep>mmm`; hours grow past two digits instead of wrapping.
fn timestamp(ms: u64, separator: char) -> String {
    let hours = ms / 3_600_000;
    let minutes = ms / 60_000 % 60;
    let secs = ms / 1000 % 60;
    let millis = ms % 1000;
    format!("{hours:02}:{minutes:02}:{secs:02}{separator}{millis:03}")
}

fn escape_vtt(line: &str) -> String {
    line.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A word ready for a cue: text without line breaks, times in milliseconds.
#[derive(Debug, Clone, PartialEq)]
struct Token {
    text: String,
    start_ms: u64,
    end_ms: u64,
}

/// One subtitle cue.
#[derive(Debug, Clone, PartialEq)]
struct Cue {
    start_ms: u64,
    end_ms: u64,
    lines: Vec<String>,
}

impl Cue {
    fn new(token: Token) -> Cue {
        Cue {
            start_ms: token.start_ms,
            end_ms: token.end_ms,
            lines: vec![token.text],
        }
    }

    /// Adds `token` if it fits the line and line-count limits (not the time limit).
    fn try_push(&mut self, token: &Token) -> bool {
        let word_chars = token.text.chars().count();
        let line_count = self.lines.len();
        match self.lines.last_mut() {
            Some(line) if line.chars().count() + 1 + word_chars <= MAX_LINE_CHARS => {
                line.push(' ');
                line.push_str(&token.text);
            }
            _ if line_count < MAX_CUE_LINES => self.lines.push(token.text.clone()),
            _ => return false,
        }
        self.end_ms = self.end_ms.max(token.end_ms);
        true
    }
}

/// All cues of a transcript, in order, with times made valid.
fn build_cues(transcript: &Transcript) -> Vec<Cue> {
    let mut cues = Vec::new();
    for tokens in segment_tokens(transcript) {
        split_into_cues(tokens, &mut cues);
    }
    fix_times(&mut cues, to_ms(transcript.duration));
    cues
}

/// Tokens per segment: the segment's words, or its text spread evenly over its
/// time span when it has no words. A transcript with words or text but no
/// segments counts as one segment.
fn segment_tokens(transcript: &Transcript) -> Vec<Vec<Token>> {
    if transcript.segments.is_empty() {
        let tokens = if transcript.words.is_empty() {
            spread_tokens(&transcript.text, 0, to_ms(transcript.duration))
        } else {
            word_tokens(&transcript.words)
        };
        return vec![tokens];
    }
    transcript
        .segments
        .iter()
        .map(|segment| {
            let words = transcript.segment_words(segment);
            if words.is_empty() {
                spread_tokens(&segment.text, to_ms(segment.start), to_ms(segment.end))
            } else {
                word_tokens(words)
            }
        })
        .collect()
}

fn word_tokens(words: &[Word]) -> Vec<Token> {
    words
        .iter()
        .filter_map(|w| {
            let text = w.word.split_whitespace().collect::<Vec<_>>().join(" ");
            if text.is_empty() {
                return None;
            }
            let start_ms = to_ms(w.start);
            Some(Token {
                text,
                start_ms,
                end_ms: to_ms(w.end).max(start_ms),
            })
        })
        .collect()
}

/// Splits `text` at whitespace and shares `start_ms..end_ms` among the words by
/// their length (a space counts as one character).
fn spread_tokens(text: &str, start_ms: u64, end_ms: u64) -> Vec<Token> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let weights: Vec<u64> = words.iter().map(|w| w.chars().count() as u64 + 1).collect();
    let total = weights.iter().sum::<u64>().max(1) as f64;
    let span = end_ms.saturating_sub(start_ms) as f64;
    let mut before = 0u64;
    let mut tokens = Vec::with_capacity(words.len());
    for (word, weight) in words.iter().zip(weights) {
        let offset = |chars: u64| start_ms + (span * chars as f64 / total).round() as u64;
        tokens.push(Token {
            text: (*word).to_owned(),
            start_ms: offset(before),
            end_ms: offset(before + weight),
        });
        before += weight;
    }
    tokens
}

/// Greedy fill: a token joins the open cue if it fits the line limits and keeps
/// the cue within [`MAX_CUE_MS`]; otherwise the cue closes and a new one opens.
fn split_into_cues(tokens: Vec<Token>, cues: &mut Vec<Cue>) {
    let mut open: Option<Cue> = None;
    for token in tokens {
        if let Some(cue) = open.as_mut() {
            let within_time = token.end_ms.saturating_sub(cue.start_ms) <= MAX_CUE_MS;
            if within_time && cue.try_push(&token) {
                continue;
            }
        }
        if let Some(done) = open.replace(Cue::new(token)) {
            cues.push(done);
        }
    }
    cues.extend(open);
}

/// Makes cue times valid: each cue starts no earlier than the previous one
/// ends, lasts at least [`MIN_CUE_MS`], and a short cue is stretched towards
/// [`PADDED_CUE_MS`] into the gap before the next cue (or up to the audio's
/// end for the last cue).
fn fix_times(cues: &mut [Cue], duration_ms: u64) {
    let mut floor = 0u64;
    for i in 0..cues.len() {
        let start = cues[i].start_ms.max(floor);
        let mut end = cues[i].end_ms.max(start.saturating_add(MIN_CUE_MS));
        let limit = match cues.get(i + 1) {
            Some(next) => next.start_ms,
            None => duration_ms.max(end),
        };
        let padded = start.saturating_add(PADDED_CUE_MS).min(limit);
        end = end.max(padded);
        cues[i].start_ms = start;
        cues[i].end_ms = end;
        floor = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speech::transcript::Segment;

    fn word(text: &str, start: f64, end: f64, confidence: f32) -> Word {
        Word {
            word: text.to_owned(),
            start,
            end,
            confidence,
        }
    }

    /// Two segments, three words: "Привет, мир." (0.1–0.9) and "Как дела?" (2.0–3.0).
    fn sample() -> Transcript {
        let mut t = Transcript {
            duration: 3.5,
            ..Transcript::default()
        };
        t.push_segment(
            0.1,
            0.9,
            vec![word("Привет,", 0.1, 0.5, 0.9), word("мир.", 0.5, 0.9, 0.8)],
        );
        t.push_segment(
            2.0,
            3.0,
            vec![word("Как", 2.0, 2.3, 1.0), word("дела?", 2.3, 3.0, 0.5)],
        );
        t
    }

    /// One segment of `n` words, each `step` seconds long, named w0, w1, ...
    fn words_transcript(words: &[&str], step: f64) -> Transcript {
        let mut t = Transcript::default();
        let list: Vec<Word> = words
            .iter()
            .enumerate()
            .map(|(i, w)| word(w, i as f64 * step, (i + 1) as f64 * step, 1.0))
            .collect();
        t.duration = words.len() as f64 * step;
        t.push_segment(0.0, t.duration, list);
        t
    }

    /// (start, end, lines) of every cue of an SRT body, checked for shape.
    fn parse_srt(body: &str) -> Vec<(String, String, Vec<String>)> {
        let mut cues = Vec::new();
        for (i, block) in body.split_terminator("\n\n").enumerate() {
            let mut lines = block.lines();
            assert_eq!(lines.next(), Some((i + 1).to_string().as_str()));
            let times = lines.next().expect("time line");
            let (start, end) = times.split_once(" --> ").expect("arrow");
            cues.push((
                start.to_owned(),
                end.to_owned(),
                lines.map(str::to_owned).collect(),
            ));
        }
        cues
    }

    fn ms_of(stamp: &str) -> u64 {
        let (hms, ms) = stamp.split_once([',', '.']).expect("millis");
        let parts: Vec<u64> = hms.split(':').map(|p| p.parse().expect("num")).collect();
        ((parts[0] * 60 + parts[1]) * 60 + parts[2]) * 1000 + ms.parse::<u64>().expect("ms")
    }

    fn assert_valid_cues(cues: &[(String, String, Vec<String>)]) {
        let mut floor = 0;
        for (start, end, lines) in cues {
            let (start, end) = (ms_of(start), ms_of(end));
            assert!(start >= floor, "overlap at {start}");
            assert!(end > start, "empty cue at {start}");
            assert!(end - start <= MAX_CUE_MS, "long cue at {start}");
            assert!(!lines.is_empty() && lines.len() <= MAX_CUE_LINES);
            for line in lines {
                assert!(line.chars().count() <= MAX_LINE_CHARS, "{line}");
            }
            floor = end;
        }
    }

    #[test]
    fn format_names_parse_case_insensitively() {
        for format in Format::ALL {
            assert_eq!(format.name().parse::<Format>(), Ok(format));
            assert_eq!(format.name().to_uppercase().parse::<Format>(), Ok(format));
        }
        assert_eq!("TXT".parse::<Format>(), Ok(Format::Text));
        assert_eq!("Verbose_JSON".parse::<Format>(), Ok(Format::VerboseJson));
        let err = "xml".parse::<Format>().expect_err("unknown");
        assert!(err.to_string().contains("\"xml\""));
    }

    #[test]
    fn content_types() {
        assert_eq!(Format::Json.content_type(), "application/json");
        assert_eq!(Format::VerboseJson.content_type(), "application/json");
        assert_eq!(Format::Text.content_type(), "text/plain; charset=utf-8");
        assert_eq!(Format::Srt.content_type(), "text/plain; charset=utf-8");
        assert_eq!(Format::Vtt.content_type(), "text/vtt; charset=utf-8");
    }

    #[test]
    fn json_has_the_spec_shape() {
        let expected = json!({
            "text": "Привет, мир. Как дела?",
            "duration": 3.5,
            "words": [
                {"word": "Привет,", "start": 0.1, "end": 0.5, "confidence": 0.9},
                {"word": "мир.", "start": 0.5, "end": 0.9, "confidence": 0.8},
                {"word": "Как", "start": 2.0, "end": 2.3, "confidence": 1.0},
                {"word": "дела?", "start": 2.3, "end": 3.0, "confidence": 0.5},
            ],
            "segments": [
                {"start": 0.1, "end": 0.9, "text": "Привет, мир."},
                {"start": 2.0, "end": 3.0, "text": "Как дела?"},
            ],
        });
        assert_eq!(to_json(&sample()), expected);
    }

    #[test]
    fn json_rounds_times_to_milliseconds() {
        let mut t = Transcript::default();
        t.push_segment(0.0, 1.0, vec![word("да", 0.123_456, 0.987_654, 0.333_33)]);
        t.duration = f64::NAN;
        let v = to_json(&t);
        assert_eq!(v["words"][0]["start"], json!(0.123));
        assert_eq!(v["words"][0]["end"], json!(0.988));
        assert_eq!(v["words"][0]["confidence"], json!(0.333));
        assert_eq!(v["duration"], json!(0.0));
    }

    #[test]
    fn json_of_empty_transcript() {
        let v = to_json(&Transcript::default());
        assert_eq!(
            v,
            json!({"text": "", "duration": 0.0, "words": [], "segments": []})
        );
    }

    #[test]
    fn text_ends_with_newline() {
        assert_eq!(to_text(&sample()), "Привет, мир. Как дела?\n");
        assert_eq!(to_text(&Transcript::default()), "\n");
    }

    #[test]
    fn srt_golden() {
        let expected = "1\n00:00:00,100 --> 00:00:00,900\nПривет, мир.\n\n\
                        2\n00:00:02,000 --> 00:00:03,000\nКак дела?\n\n";
        assert_eq!(to_srt(&sample()), expected);
    }

    #[test]
    fn vtt_golden() {
        let expected = "WEBVTT\n\n\
                        00:00:00.100 --> 00:00:00.900\nПривет, мир.\n\n\
                        00:00:02.000 --> 00:00:03.000\nКак дела?\n\n";
        assert_eq!(to_vtt(&sample()), expected);
    }

    #[test]
    fn empty_transcript_subtitles() {
        assert_eq!(to_srt(&Transcript::default()), "");
        assert_eq!(to_vtt(&Transcript::default()), "WEBVTT\n\n");
    }

    #[test]
    fn lines_wrap_at_42_characters_counting_cyrillic_as_one() {
        // 10 Cyrillic words of 9 letters: 9 + 1 + 9 + ... → four per line (39
        // chars); a byte count (18 per word) would allow only two.
        let words = ["абвгдежзи"; 10];
        let srt = to_srt(&words_transcript(&words, 0.5));
        let cues = parse_srt(&srt);
        assert_valid_cues(&cues);
        assert_eq!(cues.len(), 2, "{srt}");
        assert_eq!(cues[0].2.len(), 2);
        assert_eq!(cues[0].2[0].chars().count(), 39);
        assert_eq!(cues[0].2[0], ["абвгдежзи"; 4].join(" "));
        assert_eq!(cues[1].2, vec![["абвгдежзи"; 2].join(" ")]);
    }

    #[test]
    fn a_line_of_exactly_42_characters_fits() {
        // Five 6-letter words and four spaces make 34; a space and a 7-letter word, 42.
        let words = ["шесть1", "шесть2", "шесть3", "шесть4", "шесть5", "семь__7"];
        let cues = parse_srt(&to_srt(&words_transcript(&words, 0.2)));
        assert_eq!(cues[0].2[0].chars().count(), 42);
        assert_eq!(cues[0].2.len(), 1);
    }

    #[test]
    fn cues_split_at_7_seconds() {
        // Short words, 1 s each: the line limit never bites, the time limit does.
        let words = ["а"; 16];
        let cues = parse_srt(&to_srt(&words_transcript(&words, 1.0)));
        assert_valid_cues(&cues);
        assert_eq!(cues.len(), 3);
        assert_eq!(
            (cues[0].0.as_str(), cues[0].1.as_str()),
            ("00:00:00,000", "00:00:07,000")
        );
        assert_eq!(
            (cues[1].0.as_str(), cues[1].1.as_str()),
            ("00:00:07,000", "00:00:14,000")
        );
        assert_eq!(cues[2].2, vec!["а а"]);
    }

    #[test]
    fn cues_never_span_segments() {
        let cues = parse_srt(&to_srt(&sample()));
        assert_eq!(cues.len(), 2);
        assert_eq!(cues[0].2, vec!["Привет, мир."]);
    }

    #[test]
    fn long_transcript_times_are_monotonic_and_valid() {
        let text: Vec<String> = (0..500).map(|i| format!("слово{i}")).collect();
        let refs: Vec<&str> = text.iter().map(String::as_str).collect();
        let mut t = Transcript::default();
        // Five segments of 100 words, words of uneven length and some zero-length.
        for chunk in 0..5 {
            let base = chunk as f64 * 60.0;
            let words: Vec<Word> = refs[chunk * 100..(chunk + 1) * 100]
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let start = base + i as f64 * 0.37;
                    let end = if i % 7 == 0 { start } else { start + 0.3 };
                    word(w, start, end, 0.9)
                })
                .collect();
            t.push_segment(base, base + 40.0, words);
        }
        t.duration = 300.0;
        let srt = to_srt(&t);
        let cues = parse_srt(&srt);
        assert_valid_cues(&cues);
        let joined: Vec<String> = cues.iter().flat_map(|c| c.2.clone()).collect();
        assert_eq!(joined.join(" "), t.text);
    }

    #[test]
    fn zero_length_words_get_padded_without_overlap() {
        let mut t = Transcript::default();
        t.push_segment(1.0, 1.0, vec![word("раз", 1.0, 1.0, 1.0)]);
        t.push_segment(1.2, 1.2, vec![word("два", 1.2, 1.2, 1.0)]);
        t.duration = 1.2;
        let srt = to_srt(&t);
        let expected = "1\n00:00:01,000 --> 00:00:01,200\nраз\n\n\
                        2\n00:00:01,200 --> 00:00:01,201\nдва\n\n";
        assert_eq!(srt, expected);
    }

    #[test]
    fn short_last_cue_is_padded_up_to_the_audio_end() {
        let mut t = Transcript::default();
        t.push_segment(0.0, 0.1, vec![word("да", 0.0, 0.1, 1.0)]);
        t.duration = 2.0;
        assert_eq!(to_srt(&t), "1\n00:00:00,000 --> 00:00:00,500\nда\n\n");
    }

    #[test]
    fn timestamps_past_an_hour_and_past_99_hours() {
        assert_eq!(timestamp(3_723_004, ','), "01:02:03,004");
        assert_eq!(timestamp(3_723_004, '.'), "01:02:03.004");
        assert_eq!(timestamp(100 * 3_600_000 + 1, ','), "100:00:00,001");
        let mut t = Transcript::default();
        t.push_segment(3661.5, 3662.0, vec![word("час", 3661.5, 3662.0, 1.0)]);
        t.duration = 3700.0;
        assert_eq!(
            to_vtt(&t),
            "WEBVTT\n\n01:01:01.500 --> 01:01:02.000\nчас\n\n"
        );
    }

    #[test]
    fn negative_and_nan_times_clamp_to_zero() {
        let t = Transcript {
            text: "ой".into(),
            duration: -1.0,
            words: vec![word("ой", -0.5, f64::NAN, 1.0)],
            segments: vec![Segment {
                start: -1.0,
                end: 0.2,
                text: "ой".into(),
                first_word: 0,
                word_count: 1,
            }],
        };
        assert_eq!(to_srt(&t), "1\n00:00:00,000 --> 00:00:00,001\nой\n\n");
        assert_eq!(to_json(&t)["words"][0]["start"], json!(0.0));
    }

    #[test]
    fn segment_without_words_spreads_its_text() {
        let t = Transcript {
            text: "раз два".into(),
            duration: 2.0,
            words: Vec::new(),
            segments: vec![Segment {
                start: 1.0,
                end: 2.0,
                text: "раз два".into(),
                first_word: 0,
                word_count: 0,
            }],
        };
        assert_eq!(to_srt(&t), "1\n00:00:01,000 --> 00:00:02,000\nраз два\n\n");
    }

    #[test]
    fn segmentless_text_becomes_one_span() {
        let t = Transcript {
            text: "только текст".into(),
            duration: 1.5,
            ..Transcript::default()
        };
        assert_eq!(
            to_vtt(&t),
            "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nтолько текст\n\n"
        );
    }

    #[test]
    fn vtt_escapes_markup_and_srt_keeps_it() {
        let mut t = Transcript::default();
        t.push_segment(0.0, 1.0, vec![word("a<b>&c", 0.0, 1.0, 1.0)]);
        assert!(to_vtt(&t).contains("\na&lt;b&gt;&amp;c\n"));
        assert!(to_srt(&t).contains("\na<b>&c\n"));
    }

    #[test]
    fn word_with_line_break_cannot_break_a_cue() {
        let mut t = Transcript::default();
        t.push_segment(0.0, 1.0, vec![word("раз\n\nдва", 0.0, 1.0, 1.0)]);
        assert_eq!(to_srt(&t), "1\n00:00:00,000 --> 00:00:01,000\nраз два\n\n");
    }

    #[test]
    fn overlong_word_keeps_its_own_line() {
        let long = "ы".repeat(50);
        let t = words_transcript(&[&long, "да"], 1.0);
        let cues = parse_srt(&to_srt(&t));
        assert_eq!(cues[0].2, vec![long.clone(), "да".to_owned()]);
    }

    #[test]
    fn verbose_json_default_has_segments_not_words() {
        let v = to_verbose_json(&sample(), false, true);
        assert_eq!(v["task"], "transcribe");
        assert_eq!(v["language"], "russian");
        assert_eq!(v["duration"], json!(3.5));
        assert_eq!(v["text"], "Привет, мир. Как дела?");
        assert!(v.get("words").is_none());
        let expected_first = json!({
            "id": 0, "seek": 0, "start": 0.1, "end": 0.9, "text": "Привет, мир.",
            "tokens": [], "temperature": 0.0,
            "avg_logprob": -0.1625, // ln(mean(0.9, 0.8))
            "compression_ratio": 1.0, "no_speech_prob": 0.0,
        });
        assert_eq!(v["segments"][0], expected_first);
        assert_eq!(v["segments"][1]["id"], 1);
        assert_eq!(v["segments"][1]["avg_logprob"], json!(-0.2877));
    }

    #[test]
    fn verbose_json_words_only_and_both() {
        let v = to_verbose_json(&sample(), true, false);
        assert!(v.get("segments").is_none());
        assert_eq!(
            v["words"][3],
            json!({"word": "дела?", "start": 2.3, "end": 3.0})
        );
        let both = to_verbose_json(&sample(), true, true);
        assert_eq!(both["words"].as_array().map(Vec::len), Some(4));
        assert_eq!(both["segments"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn verbose_json_logprob_stays_finite() {
        let mut t = Transcript::default();
        t.push_segment(0.0, 1.0, vec![word("э", 0.0, 1.0, 0.0)]);
        let v = to_verbose_json(&t, false, true);
        assert!(
            v["segments"][0]["avg_logprob"]
                .as_f64()
                .is_some_and(f64::is_finite)
        );
    }

    #[test]
    fn render_pairs_content_type_and_body() {
        let t = sample();
        for format in Format::ALL {
            let (content_type, body) = render(&t, format);
            assert_eq!(content_type, format.content_type());
            let body = String::from_utf8(body).expect("utf-8");
            match format {
                Format::Json => {
                    let v: Value = serde_json::from_str(&body).expect("json");
                    assert_eq!(v, to_json(&t));
                }
                Format::VerboseJson => {
                    let v: Value = serde_json::from_str(&body).expect("json");
                    assert_eq!(v, to_verbose_json(&t, false, true));
                }
                Format::Text => assert_eq!(body, to_text(&t)),
                Format::Srt => assert_eq!(body, to_srt(&t)),
                Format::Vtt => assert_eq!(body, to_vtt(&t)),
            }
        }
    }
}
