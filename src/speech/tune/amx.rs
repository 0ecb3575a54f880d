//! The int8 weights packed for tract's AMX kernel, a row or a tile at a time.
//!
//! On a CPU with AMX (Intel Sapphire Rapids and later, where the kernel lets the
//! process use its tiles) tract runs the int8 matmuls with
//! `avx512amx_mmm_i32_16x16`, whose weights it packs as `PackedAmxA`: panels of
//! `r` rows, each row its `k` bytes padded with zeros to a multiple of 64. Its
//! optimiser folds that packing of each constant weight at load, and its packer
//! copies one byte at a time through both strides: 15 % of the int8 load's CPU
//! on the Intel Xeon (docs/perf.md, seventeenth round). Laid end to end, the
//! panels are one row-major `[r * panels, k padded]` matrix, so [`fold`] packs
//! each such weight itself before tract's constant folding reaches it: a copy
//! per row where `k` is the inner axis, and where the weight is stored
//! `k`-major, 8 x 8 byte tiles transposed in registers. The same bytes as
//! tract's packer.

use tract_linalg::x86_64::amx::PackedAmxA;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::konst::Const;

/// Replaces each `OptMatMulPack` into `PackedAmxA` of a constant i8 weight,
/// read by nothing else, with the constant it evaluates to, packed by
/// [`pack`]. Returns how many it replaced.
pub fn fold(model: &mut TypedModel) -> TractResult<usize> {
    let mut found = vec![];
    for node in &model.nodes {
        if let Some(job) = foldable(model, node)? {
            found.push((node.id, job));
        }
    }
    for (id, job) in &found {
        let (k, mn, k_stride, mn_stride) =
            super::pack::matrix(&job.weight, job.k_axis, job.mn_axis)?;
        let view = job.weight.try_as_plain_ram()?;
        let packed = pack(&job.format, view.as_bytes(), k, mn, k_stride, mn_stride)?;
        let value = super::pack::packed_matrix(
            &job.format,
            job.weight.shape(),
            job.k_axis,
            job.mn_axis,
            packed,
        );
        let why = "pack an int8 weight for AMX";
        super::replace_with_constant(model, *id, value.into_arc_tensor(), why)?;
    }
    Ok(found.len())
}

impl super::pack::Panels for PackedAmxA {
    fn panel_len(&self, k: usize) -> usize {
        self.single_panel_len(k)
    }
}

/// A weight to pack: its format, value, and the axes of the matrix in it.
struct Job {
    format: PackedAmxA,
    weight: Arc<Tensor>,
    k_axis: usize,
    mn_axis: usize,
}

/// The packing `node` does, when it packs one matrix of a constant i8
/// weight (read by nothing else) into `PackedAmxA` alone.
fn foldable(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Job>> {
    let Some((format, k_axis, mn_axis)) = super::pack::weight_packing::<PackedAmxA>(model, node)?
    else {
        return Ok(None);
    };
    let Some(weight) = model.node(node.inputs[0].node).op_as::<Const>() else {
        return Ok(None);
    };
    Ok(Some(Job {
        format,
        weight: weight.val().clone(),
        k_axis,
        mn_axis,
    }))
}

/// `src`, a `k` x `mn` matrix of bytes at element strides `k_stride` and
/// `mn_stride`, in `format`'s layout: row `m` of the matrix at byte
/// `m * k_padded`, `k_padded` being `k` rounded up to `format`'s row length
/// (64), rows padded to whole panels of `format.r`, the padding zero.
pub fn pack(
    format: &PackedAmxA,
    src: &[u8],
    k: usize,
    mn: usize,
    k_stride: usize,
    mn_stride: usize,
) -> TractResult<Blob> {
    let mut packed =
        Tensor::zero_aligned::<i8>(&[format.len(k, mn)], format.alignment())?.into_blob()?;
    if k == 0 || mn == 0 {
        return Ok(packed);
    }
    let last = (k - 1) * k_stride + (mn - 1) * mn_stride;
    ensure!(
        last < src.len(),
        "a {k} x {mn} matrix at strides {k_stride}, {mn_stride} does not fit in {} bytes",
        src.len()
    );
    let row_len = format.single_panel_len(k) / format.r;
    let rows = packed.as_bytes_mut().chunks_exact_mut(row_len).take(mn);
    if k_stride == 1 {
        for (m, row) in rows.enumerate() {
            let at = m * mn_stride;
            row[..k].copy_from_slice(&src[at..at + k]);
        }
        return Ok(packed);
    }
    // Stored k-major: eight rows at a time, each across the whole of `k`.
    // Where `mn` is the inner axis, eight `k` of eight rows are eight words
    // read from eight lines, turned in registers ([`super::pack::transpose8`]) into eight
    // words of eight `k`, one for each row; a byte at a time this was as slow
    // as tract's packer.
    let k8 = k / 8 * 8;
    let mut rows: Vec<&mut [u8]> = rows.collect();
    for (g, group) in rows.chunks_mut(8).enumerate() {
        let first = g * 8;
        let tiled = if group.len() == 8 && mn_stride == 1 {
            k8
        } else {
            0
        };
        for kk in (0..tiled).step_by(8) {
            let mut tile = [0u64; 8];
            for (i, word) in tile.iter_mut().enumerate() {
                let at = (kk + i) * k_stride + first;
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&src[at..at + 8]);
                *word = u64::from_le_bytes(bytes);
            }
            super::pack::transpose8(&mut tile);
            for (row, word) in group.iter_mut().zip(tile) {
                row[kk..kk + 8].copy_from_slice(&word.to_le_bytes());
            }
        }
        for kk in tiled..k {
            let at = first * mn_stride + kk * k_stride;
            for (i, row) in group.iter_mut().enumerate() {
                row[kk] = src[at + i * mn_stride];
            }
        }
    }
    Ok(packed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_linalg::mmm::{EagerPackedInput, MMMInputFormat};

    /// tract's own packing of `t` (its bytes).
    fn tracts(format: &PackedAmxA, t: &Tensor, k_axis: usize, mn_axis: usize) -> Vec<u8> {
        let value = format.prepare_one(t, k_axis, mn_axis).unwrap();
        let eager = value.downcast_ref::<EagerPackedInput>().unwrap();
        eager.packed.as_bytes().to_vec()
    }

    fn ours(format: &PackedAmxA, t: &Tensor, k_axis: usize, mn_axis: usize) -> Vec<u8> {
        let (k, mn, ks, ms) = super::super::pack::matrix(t, k_axis, mn_axis).unwrap();
        let bytes = t.try_as_plain_ram().unwrap().as_bytes().to_vec();
        pack(format, &bytes, k, mn, ks, ms)
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    fn matrix(rows: usize, cols: usize) -> Tensor {
        let values: Vec<i8> = (0..rows * cols)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as i8)
            .collect();
        Tensor::from_shape(&[rows, cols], &values).unwrap()
    }

    #[test]
    fn packs_the_same_bytes_as_tract_in_both_layouts() {
        // Sizes around the 64-byte rows, the 16-row panels and the 64-row blocks.
        for (mn, k) in [
            (1, 1),
            (5, 7),
            (16, 64),
            (17, 65),
            (48, 128),
            (130, 200),
            (64, 63),
        ] {
            for format in [PackedAmxA::new(16), PackedAmxA::new(8)] {
                // Stored mn-major ([mn, k]: k the inner axis) and k-major.
                for (t, k_axis, mn_axis) in [(matrix(mn, k), 1, 0), (matrix(k, mn), 0, 1)] {
                    assert_eq!(
                        ours(&format, &t, k_axis, mn_axis),
                        tracts(&format, &t, k_axis, mn_axis),
                        "{mn} x {k}, k axis {k_axis}, r {}",
                        format.r
                    );
                }
            }
        }
    }

    #[test]
    fn packs_a_matrix_with_neither_stride_one() {
        // The first of three matrices interleaved in a [k, mn, 3] tensor:
        // k at stride 15, mn at stride 3.
        let format = PackedAmxA::new(16);
        let t = matrix(9, 3 * 5).into_shape(&[9, 5, 3]).unwrap();
        let (k_axis, mn_axis) = (0, 1);
        let (k, mn, ks, ms) = super::super::pack::matrix(&t, k_axis, mn_axis).unwrap();
        assert!(ks != 1 && ms != 1);
        let bytes = t.try_as_plain_ram().unwrap().as_bytes().to_vec();
        let ours = pack(&format, &bytes, k, mn, ks, ms).unwrap();
        let plain = t.slice(2, 0, 1).unwrap().into_shape(&[9, 5]).unwrap();
        assert_eq!(ours.as_bytes(), tracts(&format, &plain, 0, 1));
    }

    #[test]
    fn a_matrix_past_its_bytes_is_an_error() {
        let format = PackedAmxA::new(16);
        let err = pack(&format, &[0u8; 10], 4, 3, 1, 4).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        assert!(pack(&format, &[0u8; 12], 4, 3, 1, 4).is_ok());
    }
}
