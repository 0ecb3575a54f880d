//! Cutting long audio into encoder-sized pieces at pauses.
//!
//! GigaAM was trained on clips of at most 30 s and degrades on long input, so no
//! segment is longer than [`MAX_SEGMENT_SECS`]. Audio up to that length is one
//! segment, exactly as GigaAM's own `transcribe()` sees it. Longer audio is cut in
//! the pauses the Silero VAD finds: speech regions are packed greedily into
//! segments, each cut placed in the middle of the silence between two regions.
//! Stretches with no speech at all are skipped. A region longer than the cap is
//! cut hard with [`OVERLAP_SECS`] of overlap; words are kept from the side of the
//! cut where they start, so nothing is counted twice.

use std::ops::Range;

/// Longest audio fed to the encoder at once, in seconds.
pub const MAX_SEGMENT_SECS: f64 = 25.0;
/// Overlap of two hard-cut pieces of one long speech region, in seconds.
pub const OVERLAP_SECS: f64 = 1.0;
/// Silence kept around speech inside a segment, in seconds (at most half the gap).
pub const SEGMENT_PAD_SECS: f64 = 0.5;
/// Pauses at least this long always end a segment, in seconds; shorter ones
/// (breaths inside a sentence) are kept inside while the segment fits the cap.
pub const CUT_PAUSE_SECS: f64 = 0.5;

/// One piece to transcribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Samples fed to the encoder.
    pub samples: Range<usize>,
    /// Words starting in this range (sample units) are kept; others belong to a neighbour.
    pub keep: Range<usize>,
}

/// Plans the pieces for `num_samples` at `rate_hz` given VAD speech regions.
pub fn plan(num_samples: usize, rate_hz: usize, speech: &[Range<usize>]) -> Vec<Piece> {
    let max_len = (MAX_SEGMENT_SECS * rate_hz as f64) as usize;
    if num_samples <= max_len {
        return if num_samples == 0 {
            Vec::new()
        } else {
            vec![Piece {
                samples: 0..num_samples,
                keep: 0..num_samples,
            }]
        };
    }
    let pad = (SEGMENT_PAD_SECS * rate_hz as f64) as usize;
    // Pad each region into its neighbouring silence, never past the gap's midpoint.
    let mut padded: Vec<Range<usize>> = Vec::with_capacity(speech.len());
    for (i, r) in speech.iter().enumerate() {
        let lo = if i == 0 {
            0
        } else {
            (speech[i - 1].end + r.start) / 2
        };
        let hi = speech
            .get(i + 1)
            .map_or(num_samples, |n| (r.end + n.start) / 2);
        padded.push(r.start.saturating_sub(pad).max(lo)..(r.end + pad).min(hi).min(num_samples));
    }
    // Regions separated by short pauses are packed into segments of at most
    // max_len; a long pause always starts a new segment.
    let cut_gap = (CUT_PAUSE_SECS * rate_hz as f64) as usize;
    let mut groups: Vec<Range<usize>> = Vec::new();
    for (i, r) in padded.into_iter().enumerate() {
        let gap = if i == 0 {
            usize::MAX
        } else {
            speech[i].start.saturating_sub(speech[i - 1].end)
        };
        match groups.last_mut() {
            Some(g) if gap < cut_gap && r.end - g.start <= max_len => g.end = r.end,
            _ => groups.push(r),
        }
    }
    let overlap = (OVERLAP_SECS * rate_hz as f64) as usize;
    let mut pieces = Vec::new();
    for g in groups {
        if g.end - g.start <= max_len {
            pieces.push(Piece {
                samples: g.clone(),
                keep: g,
            });
            continue;
        }
        // Hard cuts: pieces of max_len, neighbours overlapping by `overlap`;
        // the boundary of what each keeps is the middle of the overlap.
        let step = max_len - overlap;
        let mut start = g.start;
        let mut keep_start = g.start;
        loop {
            let end = (start + max_len).min(g.end);
            let last = end == g.end;
            let keep_end = if last { g.end } else { end - overlap / 2 };
            pieces.push(Piece {
                samples: start..end,
                keep: keep_start..keep_end,
            });
            if last {
                break;
            }
            keep_start = keep_end;
            start += step;
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: usize = 16_000;

    #[test]
    fn short_audio_is_one_piece() {
        let p = plan(10 * RATE, RATE, &[]);
        assert_eq!(
            p,
            vec![Piece {
                samples: 0..10 * RATE,
                keep: 0..10 * RATE
            }]
        );
        assert!(plan(0, RATE, &[]).is_empty());
    }

    #[test]
    fn regions_pack_and_cut_in_silence() {
        let s = |a: f64, b: f64| (a * RATE as f64) as usize..(b * RATE as f64) as usize;
        let speech = vec![s(1.0, 10.0), s(10.2, 20.0), s(20.3, 30.0), s(40.0, 45.0)];
        let p = plan(60 * RATE, RATE, &speech);
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|x| x.samples.len() <= 25 * RATE));
        // Short pauses are packed up to the cap: the first cut lies in the 20..20.3 s pause.
        assert!(p[0].samples.end > 20 * RATE && p[0].samples.end <= 20 * RATE + 4800);
        // The 10 s pause before 40 s always cuts; the long silence 45..60 s is skipped.
        assert!(p[2].samples.start > 30 * RATE && p[2].samples.end < 46 * RATE);
    }

    #[test]
    fn long_region_is_hard_cut_with_overlap() {
        let speech: Vec<Range<usize>> = std::iter::once(0..70 * RATE).collect();
        let p = plan(70 * RATE, RATE, &speech);
        assert!(p.len() >= 3);
        for w in p.windows(2) {
            assert!(w[1].samples.start < w[0].samples.end, "pieces overlap");
            assert_eq!(w[0].keep.end, w[1].keep.start, "kept ranges tile");
        }
        assert!(p.iter().all(|x| x.samples.len() <= 25 * RATE));
        assert_eq!(p.last().unwrap().keep.end, 70 * RATE);
    }
}
