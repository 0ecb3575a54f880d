//! Token ids -> text and word timings.
//!
//! Vocab files are `TOKEN ID` lines; the blank is the last id. Pieces that start
//! with `▁` (U+2581) begin a new word; text = pieces joined, `▁` -> space,
//! leading spaces stripped (= SentencePiece decode, golden/README.md).

use std::path::Path;

use super::SpeechError;
use super::transcript::Word;

/// Encoder frame length in seconds: 10 ms hop x subsampling 4.
pub const FRAME_SECS: f64 = 0.04;
/// SentencePiece word-start marker.
const WORD_START: char = '\u{2581}';

/// A decoded token: id, encoder frame, and its probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Token {
    /// Vocabulary id.
    pub id: usize,
    /// Encoder frame (40 ms units from the segment start).
    pub frame: usize,
    /// Probability of the chosen token, 0..=1.
    pub prob: f32,
}

/// The model's vocabulary.
#[derive(Debug, Clone)]
pub struct Vocab {
    pieces: Vec<String>,
}

impl Vocab {
    /// Reads a `TOKEN ID` file; ids must be 0..n in order.
    pub fn load(path: &Path) -> Result<Vocab, SpeechError> {
        let bad = |why: String| SpeechError::BadVocab {
            file: path.to_path_buf(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        Vocab::parse(&text).map_err(bad)
    }

    /// Parses vocab text (see [`Vocab::load`]).
    pub fn parse(text: &str) -> Result<Vocab, String> {
        let mut pieces = Vec::new();
        for (line_no, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let (piece, id) = line
                .rsplit_once(' ')
                .ok_or_else(|| format!("line {}: expected `TOKEN ID`", line_no + 1))?;
            let id: usize = id
                .trim()
                .parse()
                .map_err(|_| format!("line {}: bad id {id:?}", line_no + 1))?;
            if id != pieces.len() {
                return Err(format!("line {}: id {id} out of order", line_no + 1));
            }
            pieces.push(piece.to_string());
        }
        if pieces.len() < 2 {
            return Err("fewer than two tokens".into());
        }
        Ok(Vocab { pieces })
    }

    /// Number of ids including the blank.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Always false for a loaded vocab (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The blank id (the last one).
    pub fn blank(&self) -> usize {
        self.pieces.len() - 1
    }

    /// Text of a token sequence.
    pub fn text(&self, ids: &[usize]) -> String {
        let joined: String = ids
            .iter()
            .filter_map(|&id| self.pieces.get(id))
            .map(|p| p.as_str())
            .collect();
        joined.replace(WORD_START, " ").trim_start().to_string()
    }

    /// Groups tokens into words with times relative to `offset_secs`.
    pub fn words(&self, tokens: &[Token], offset_secs: f64) -> Vec<Word> {
        let mut words = Vec::new();
        let mut current: Option<(String, usize, usize, f32, usize)> = None;
        for token in tokens {
            let Some(piece) = self.pieces.get(token.id) else {
                continue;
            };
            let starts_word = piece.starts_with(WORD_START);
            let body = piece.trim_start_matches(WORD_START);
            match current.as_mut() {
                Some((text, _, last, prob_sum, n)) if !starts_word || text.is_empty() => {
                    text.push_str(body);
                    *last = token.frame;
                    *prob_sum += token.prob;
                    *n += 1;
                }
                _ => {
                    if let Some(done) = current.take() {
                        push_word(&mut words, done, offset_secs);
                    }
                    current = Some((body.to_string(), token.frame, token.frame, token.prob, 1));
                }
            }
        }
        if let Some(done) = current.take() {
            push_word(&mut words, done, offset_secs);
        }
        words
    }
}

fn push_word(
    words: &mut Vec<Word>,
    (text, first, last, prob_sum, n): (String, usize, usize, f32, usize),
    offset: f64,
) {
    if text.is_empty() {
        return;
    }
    words.push(Word {
        word: text,
        start: offset + first as f64 * FRAME_SECS,
        end: offset + (last + 1) as f64 * FRAME_SECS,
        confidence: prob_sum / n as f32,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Vocab {
        Vocab::parse("<unk> 0\n\u{2581}При 1\nвет 2\n\u{2581}мир 3\n! 4\n<blk> 5\n").unwrap()
    }

    #[test]
    fn blank_is_last() {
        assert_eq!(vocab().blank(), 5);
        assert_eq!(vocab().len(), 6);
    }

    #[test]
    fn text_joins_pieces() {
        assert_eq!(vocab().text(&[1, 2, 3, 4]), "Привет мир!");
    }

    #[test]
    fn words_have_times_and_confidence() {
        let t = |id, frame, prob| Token { id, frame, prob };
        let words = vocab().words(
            &[t(1, 2, 1.0), t(2, 3, 0.5), t(3, 10, 0.8), t(4, 11, 0.6)],
            1.0,
        );
        assert_eq!(words.len(), 2);
        assert_eq!(words[0].word, "Привет");
        assert!((words[0].start - 1.08).abs() < 1e-9);
        assert!((words[0].end - 1.16).abs() < 1e-9);
        assert!((words[0].confidence - 0.75).abs() < 1e-6);
        assert_eq!(words[1].word, "мир!");
    }

    #[test]
    fn rejects_out_of_order_ids() {
        assert!(Vocab::parse("a 0\nb 2\n").is_err());
        assert!(Vocab::parse("a 0\nb x\n").is_err());
    }
}
