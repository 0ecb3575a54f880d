//! Greedy RNN-T decoding exactly as GigaAM's torch `RNNTGreedyDecoding`
//! (golden/README.md): start from the blank label with zero state; per encoder
//! frame, up to `max_symbols` times: joint(enc_t, dec) -> argmax; blank moves to
//! the next frame, anything else is emitted and advances the decoder state.
//!
//! The decoder output only changes on an emission, so it is computed once per
//! emission and reused across blanks (same ids, fewer decoder calls).

use tract_onnx::prelude::*;

use super::SpeechError;
use super::error::inference;
use super::model::{Plan, input_dim};
use super::vocab::Token;

/// GigaAM torch decoder's limit of emissions per encoder frame.
pub const MAX_SYMBOLS_PER_FRAME: usize = 10;

/// Per-worker RNN-T decoding state: decoder and joint graph states.
pub(crate) struct RnntDecoder {
    decoder: TypedSimpleState,
    joint: TypedSimpleState,
    /// Decoder input positions of `x`, `h.1`, `c.1`.
    dec_inputs: [usize; 3],
    /// Joint input positions of `enc`, `dec`.
    joint_inputs: [usize; 2],
    hidden: usize,
    enc_dim: usize,
    blank: usize,
    max_symbols: usize,
}

/// Positions of named inputs in a plan, in the order of `names`.
pub(crate) fn input_positions<const N: usize>(
    plan: &Plan,
    names: [&str; N],
) -> Result<[usize; N], SpeechError> {
    let model = plan.model();
    let outlets = model.input_outlets().map_err(inference)?;
    let mut out = [0usize; N];
    for (slot, name) in out.iter_mut().zip(names) {
        *slot = outlets
            .iter()
            .position(|o| model.node(o.node).name == name)
            .ok_or_else(|| SpeechError::Inference(format!("graph has no input {name:?}")))?;
    }
    Ok(out)
}

impl RnntDecoder {
    pub(crate) fn new(
        decoder: &Plan,
        joint: &Plan,
        blank: usize,
    ) -> Result<RnntDecoder, SpeechError> {
        let dec_inputs = input_positions(decoder, ["x", "h.1", "c.1"])?;
        let joint_inputs = input_positions(joint, ["enc", "dec"])?;
        let hidden = input_dim(decoder, dec_inputs[1], 2)?;
        let enc_dim = input_dim(joint, joint_inputs[0], 1)?;
        Ok(RnntDecoder {
            decoder: decoder.spawn().map_err(inference)?,
            joint: joint.spawn().map_err(inference)?,
            dec_inputs,
            joint_inputs,
            hidden,
            enc_dim,
            blank,
            max_symbols: MAX_SYMBOLS_PER_FRAME,
        })
    }

    /// Encoder width the joint expects.
    pub(crate) fn enc_dim(&self) -> usize {
        self.enc_dim
    }

    /// Sets the per-frame emission limit (10 = GigaAM torch, 3 = onnx-asr).
    pub(crate) fn set_max_symbols(&mut self, n: usize) {
        self.max_symbols = n.max(1);
    }

    /// The per-frame emission limit.
    pub(crate) fn max_symbols(&self) -> usize {
        self.max_symbols
    }

    /// Decodes `frames` encoder frames of `encoded` (`[enc_dim, stride]` row-major).
    pub(crate) fn decode(
        &mut self,
        encoded: &[f32],
        stride: usize,
        frames: usize,
    ) -> Result<Vec<Token>, SpeechError> {
        let mut tokens = Vec::new();
        let mut h = Tensor::zero::<f32>(&[1, 1, self.hidden]).map_err(inference)?;
        let mut c = h.clone();
        let mut last = self.blank;
        let (mut dec, mut h_next, mut c_next) = self.step_decoder(last, &h, &c)?;
        let mut enc_t = vec![0.0f32; self.enc_dim];
        for t in 0..frames.min(stride) {
            for (d, v) in enc_t.iter_mut().enumerate() {
                *v = encoded[d * stride + t];
            }
            let enc = Tensor::from_shape(&[1, self.enc_dim, 1], &enc_t).map_err(inference)?;
            for _ in 0..self.max_symbols {
                let (k, logp) = self.step_joint(&enc, &dec)?;
                if k == self.blank {
                    break;
                }
                tokens.push(Token {
                    id: k,
                    frame: t,
                    prob: logp.exp(),
                });
                last = k;
                h = h_next;
                c = c_next;
                (dec, h_next, c_next) = self.step_decoder(last, &h, &c)?;
            }
        }
        Ok(tokens)
    }

    fn step_decoder(
        &mut self,
        label: usize,
        h: &Tensor,
        c: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor), SpeechError> {
        let x = Tensor::from_shape(&[1, 1], &[label as i64]).map_err(inference)?;
        let inputs = ordered(self.dec_inputs, [x, h.clone(), c.clone()]);
        let mut out = super::tune::run_clean(&mut self.decoder, inputs).map_err(inference)?;
        if out.len() != 3 {
            return Err(SpeechError::Inference(
                "decoder must return dec, h, c".into(),
            ));
        }
        let c = out.remove(2).into_tensor();
        let h = out.remove(1).into_tensor();
        // dec [1, 1, H] -> the joint's [1, H, 1]: same memory order.
        let dec = out
            .remove(0)
            .into_tensor()
            .into_shape(&[1, self.hidden, 1])
            .map_err(inference)?;
        Ok((dec, h, c))
    }

    fn step_joint(&mut self, enc: &Tensor, dec: &Tensor) -> Result<(usize, f32), SpeechError> {
        let inputs = ordered(self.joint_inputs, [enc.clone(), dec.clone()]);
        let out = super::tune::run_clean(&mut self.joint, inputs).map_err(inference)?;
        let logits = out
            .first()
            .ok_or_else(|| SpeechError::Inference("joint returned nothing".into()))?;
        let view = logits.try_as_plain_ram().map_err(inference)?;
        argmax(view.as_slice::<f32>().map_err(inference)?)
    }
}

/// Puts `values` at the graph input positions `positions` (a permutation).
pub(crate) fn ordered<const N: usize>(positions: [usize; N], values: [Tensor; N]) -> TVec<TValue> {
    let mut pairs: Vec<(usize, Tensor)> = positions.into_iter().zip(values).collect();
    pairs.sort_by_key(|(p, _)| *p);
    pairs.into_iter().map(|(_, t)| t.into_tvalue()).collect()
}

/// Index and value of the largest element (first wins on ties, as torch).
pub(crate) fn argmax(values: &[f32]) -> Result<(usize, f32), SpeechError> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in values.iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.ok_or_else(|| SpeechError::Inference("empty logits".into()))
}
