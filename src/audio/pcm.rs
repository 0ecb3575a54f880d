//! PCM16 little-endian byte frames (WebSocket binary messages) -> f32 samples.
//!
//! A frame may end in the middle of a sample; the odd byte is carried into the
//! next frame so no sample is lost or shifted.

/// Turns a stream of PCM16 LE byte chunks into samples in [-1, 1].
#[derive(Debug, Default)]
pub struct Pcm16Decoder {
    carry: Option<u8>,
}

impl Pcm16Decoder {
    /// Appends the samples of `bytes` to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<f32>) {
        let mut rest = bytes;
        if let Some(low) = self.carry.take() {
            match rest.split_first() {
                Some((&high, tail)) => {
                    out.push(sample(low, high));
                    rest = tail;
                }
                None => {
                    self.carry = Some(low);
                    return;
                }
            }
        }
        let mut pairs = rest.chunks_exact(2);
        out.extend(pairs.by_ref().map(|p| sample(p[0], p[1])));
        self.carry = pairs.remainder().first().copied();
    }

    /// True when half a sample is waiting for its second byte.
    pub fn has_partial_sample(&self) -> bool {
        self.carry.is_some()
    }
}

fn sample(low: u8, high: u8) -> f32 {
    f32::from(i16::from_le_bytes([low, high])) / 32768.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_byte_is_carried() {
        let mut dec = Pcm16Decoder::default();
        let mut out = Vec::new();
        let bytes = [0x00, 0x40, 0x00, 0x80, 0xff];
        dec.push(&bytes[..3], &mut out);
        assert_eq!(out, vec![0.5]);
        assert!(dec.has_partial_sample());
        dec.push(&bytes[3..], &mut out);
        assert_eq!(out, vec![0.5, -1.0]);
        assert!(dec.has_partial_sample());
        dec.push(&[0x7f], &mut out);
        assert_eq!(out.len(), 3);
        assert!((out[2] - 32767.0 / 32768.0).abs() < 1e-9);
    }
}
