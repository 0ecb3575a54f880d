//! Plain result types that leave the engine: text, words with times, segments.
//!
//! These are the only engine types the server and the output formatters see.
//! Times are seconds from the start of the audio.

use serde::Serialize;

/// One recognised word with its time span and confidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Word {
    /// The word as printed, punctuation attached (e.g. `"стоить?"`).
    pub word: String,
    /// Start time in seconds.
    pub start: f64,
    /// End time in seconds (`>= start`).
    pub end: f64,
    /// Mean probability of the word's tokens, 0..=1.
    pub confidence: f32,
}

/// One stretch of speech between pauses (a VAD segment or a hard cut).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    /// Start time in seconds.
    pub start: f64,
    /// End time in seconds.
    pub end: f64,
    /// Text of the segment.
    pub text: String,
    /// Index of the segment's first word in [`Transcript::words`].
    #[serde(skip)]
    pub first_word: usize,
    /// Number of words in the segment.
    #[serde(skip)]
    pub word_count: usize,
}

/// The whole result for one audio input.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Transcript {
    /// All text, segments joined by a space.
    pub text: String,
    /// Audio duration in seconds.
    pub duration: f64,
    /// Every word, in time order (times never decrease).
    pub words: Vec<Word>,
    /// Segments in time order; words belong to exactly one segment.
    pub segments: Vec<Segment>,
}

impl Transcript {
    /// An empty transcript for `num_samples` of 16 kHz audio.
    pub fn for_samples(num_samples: usize) -> Transcript {
        Transcript {
            duration: num_samples as f64 / super::SAMPLE_RATE_HZ as f64,
            ..Transcript::default()
        }
    }

    /// Appends the words a planned piece keeps, as one segment spanning its keep range.
    pub fn push_piece(&mut self, piece: &super::segment::Piece, words: Vec<Word>) {
        let rate = super::SAMPLE_RATE_HZ as f64;
        self.push_segment(
            piece.keep.start as f64 / rate,
            piece.keep.end as f64 / rate,
            words,
        );
    }

    /// Words of one segment.
    pub fn segment_words(&self, segment: &Segment) -> &[Word] {
        let end = (segment.first_word + segment.word_count).min(self.words.len());
        let start = segment.first_word.min(end);
        &self.words[start..end]
    }

    /// Appends a segment's words (times already absolute), keeping times monotonic.
    pub fn push_segment(&mut self, start: f64, end: f64, words: Vec<Word>) {
        let mut words = words;
        let floor = self.words.last().map_or(0.0, |w| w.end);
        for w in &mut words {
            w.start = w.start.max(floor);
            w.end = w.end.max(w.start);
        }
        let text = words
            .iter()
            .map(|w| w.word.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        if text.is_empty() {
            return;
        }
        if !self.text.is_empty() {
            self.text.push(' ');
        }
        self.text.push_str(&text);
        let seg_start = start.max(self.segments.last().map_or(0.0, |s| s.end));
        let seg_start = seg_start.min(words.first().map_or(seg_start, |w| w.start));
        let seg_end = end.max(words.last().map_or(end, |w| w.end));
        self.segments.push(Segment {
            start: seg_start,
            end: seg_end,
            text,
            first_word: self.words.len(),
            word_count: words.len(),
        });
        self.words.extend(words);
    }
}
