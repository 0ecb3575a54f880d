//! Greedy CTC decoding (golden/README.md): per-frame argmax; emit a label when it
//! is not blank and differs from the previous frame's argmax (blank or not).

use super::SpeechError;
use super::rnnt::argmax;
use super::vocab::Token;

/// Decodes log-probs `[frames, classes]` row-major.
pub(crate) fn decode(
    log_probs: &[f32],
    classes: usize,
    frames: usize,
    blank: usize,
) -> Result<Vec<Token>, SpeechError> {
    let mut tokens = Vec::new();
    let mut prev = None;
    for (t, row) in log_probs
        .chunks_exact(classes.max(1))
        .take(frames)
        .enumerate()
    {
        let (k, logp) = argmax(row)?;
        if k != blank && prev != Some(k) {
            tokens.push(Token {
                id: k,
                frame: t,
                prob: logp.exp(),
            });
        }
        prev = Some(k);
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapses_repeats_and_drops_blanks() {
        // classes: 0, 1, blank=2; frames: 1 1 blank 1 0 0
        let frame = |k: usize| {
            let mut row = vec![-5.0f32; 3];
            row[k] = -0.1;
            row
        };
        let lp: Vec<f32> = [1, 1, 2, 1, 0, 0].iter().flat_map(|&k| frame(k)).collect();
        let ids: Vec<usize> = decode(&lp, 3, 6, 2).unwrap().iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![1, 1, 0]);
    }
}
