//! The int8 weights packed for tract's int8 kernels in their own bytes.
//!
//! Where tract runs the int8 matmuls with its AVX-512 VNNI or AVX2 kernel, its
//! optimiser folds the packing of each constant weight into `PackedI8K4`
//! panels (panels of `r` rows, four consecutive `k` per row): a new buffer as
//! large as the weight, zeroed and then written a byte at a time by tract's
//! generic packer, after which the weight is dropped. For the full-size
//! encoder that is 147 MiB of fresh memory and 7 % of the int8 load's CPU
//! (docs/perf.md, the twenty-third round).
//!
//! Where `k` is a multiple of four and `mn` of the panel height, as in every
//! GigaAM weight, the panels hold exactly the weight's bytes, so [`fold`]
//! packs such a weight into its own tensor: its bytes copied aside, then
//! written back as panels by [`super::pack`]'s packer, which turns eight rows
//! of four `k` in registers where the weight is stored `k`-major. A weight
//! another node or piece holds, or whose panels are padded, is packed into a
//! new buffer the same way. Either way the panels are tract's bytes (tested).

use tract_linalg::pack::PackedI8K4;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::konst::Const;

/// What [`fold`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Folded {
    /// int8 weights packed for tract's kernel.
    pub packed: usize,
    /// Of those, the ones packed in their own bytes.
    pub in_place: usize,
}

/// Replaces each `OptMatMulPack` into `PackedI8K4` of a constant i8 weight,
/// one matrix read by nothing else, with the constant it evaluates to: in the
/// weight's own bytes where [`take_in_place`] can, else in a new buffer.
pub fn fold(model: &mut TypedModel) -> TractResult<Folded> {
    let mut done = Folded::default();
    // One buffer for every weight's bytes set aside, grown to the largest.
    let mut aside = Vec::new();
    for id in 0..model.nodes.len() {
        let Some((format, k_axis, mn_axis)) =
            super::pack::weight_packing::<PackedI8K4>(model, &model.nodes[id])?
        else {
            continue;
        };
        let weight = model.nodes[id].inputs[0].node;
        let shape: TVec<usize> = model
            .outlet_fact(OutletId::new(weight, 0))?
            .shape
            .as_concrete()
            .map(|s| s.into())
            .ok_or_else(|| format_err!("a weight of unknown shape"))?;
        let packed = match take_in_place(model, weight, &format, k_axis, mn_axis)? {
            Some(tensor) => {
                done.in_place += 1;
                pack_in_place(&format, tensor, k_axis, mn_axis, &mut aside)?
            }
            None => {
                let Some(konst) = model.nodes[weight].op_as::<Const>() else {
                    bail!("weight {} is no constant", model.nodes[weight].name);
                };
                pack_new(&format, konst.val(), k_axis, mn_axis)?
            }
        };
        let value = super::pack::packed_matrix(&format, &shape, k_axis, mn_axis, packed);
        let why = "pack an int8 weight";
        super::replace_with_constant(model, id, value.into_arc_tensor(), why)?;
        done.packed += 1;
    }
    Ok(done)
}

/// The weight of constant node `id`, taken out of the graph, when its panels
/// fit its own bytes exactly (no padding) at the alignment `format` wants and
/// nothing else holds it.
fn take_in_place(
    model: &mut TypedModel,
    id: usize,
    format: &PackedI8K4,
    k_axis: usize,
    mn_axis: usize,
) -> TractResult<Option<Tensor>> {
    let Some(konst) = model.nodes[id].op_as::<Const>() else {
        return Ok(None);
    };
    let weight = konst.val();
    let (k, mn) = (weight.shape()[k_axis], weight.shape()[mn_axis]);
    let bytes = weight.try_as_plain_ram()?.as_bytes();
    let aligned = (bytes.as_ptr() as usize).is_multiple_of(format.alignment());
    if format.len(k, mn) != bytes.len() || !aligned {
        return Ok(None);
    }
    super::take_lone_constant(model, id)
}

/// Packs `weight` into its own bytes (sized and aligned by [`take_in_place`]),
/// its bytes first copied into `aside`.
fn pack_in_place(
    format: &PackedI8K4,
    mut weight: Tensor,
    k_axis: usize,
    mn_axis: usize,
    aside: &mut Vec<u8>,
) -> TractResult<Blob> {
    let (k, mn, k_stride, mn_stride) = super::pack::matrix(&weight, k_axis, mn_axis)?;
    aside.clear();
    aside.extend_from_slice(weight.try_as_plain_ram()?.as_bytes());
    super::pack::ensure_fits(aside.len(), k, mn, k_stride, mn_stride)?;
    {
        let mut view = weight.try_as_plain_ram_mut()?;
        let out = view.as_bytes_mut();
        let fill = super::pack::matrix_filler(format.r, aside, k, k_stride, mn_stride, 0);
        super::pack::fill_panels(format, k, mn, out, fill)?;
    }
    weight.into_blob()
}

/// Packs `weight` into a new zeroed buffer (its padding left zero).
fn pack_new(
    format: &PackedI8K4,
    weight: &Tensor,
    k_axis: usize,
    mn_axis: usize,
) -> TractResult<Blob> {
    let (k, mn, k_stride, mn_stride) = super::pack::matrix(weight, k_axis, mn_axis)?;
    let total = format.len(k, mn);
    let mut packed = Tensor::zero_aligned::<i8>(&[total], format.alignment())?.into_blob()?;
    let src = weight.try_as_plain_ram()?;
    super::pack::ensure_fits(src.as_bytes().len(), k, mn, k_stride, mn_stride)?;
    let fill = super::pack::matrix_filler(format.r, src.as_bytes(), k, k_stride, mn_stride, 0);
    super::pack::fill_panels(format, k, mn, packed.as_bytes_mut(), fill)?;
    Ok(packed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_linalg::mmm::{EagerPackedInput, MMMInputFormat};

    /// tract's own packing of `t` (its bytes).
    fn tracts(format: &PackedI8K4, t: &Tensor, k_axis: usize, mn_axis: usize) -> Vec<u8> {
        let value = format.prepare_one(t, k_axis, mn_axis).expect("tract packs");
        let eager = value
            .downcast_ref::<EagerPackedInput>()
            .expect("packed in memory");
        eager.packed.as_bytes().to_vec()
    }

    fn matrix(rows: usize, cols: usize) -> Tensor {
        let values: Vec<i8> = (0..rows * cols)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as i8)
            .collect();
        Tensor::from_shape(&[rows, cols], &values).expect("a matrix")
    }

    /// In a new buffer and, where the panels fit the weight exactly, in its
    /// own bytes: tract's bytes, for both layouts, around the panel heights
    /// and the quads of `k`.
    #[test]
    fn packs_the_same_bytes_as_tract_in_place_or_not() {
        for (mn, k) in [
            (1, 1),
            (5, 7),
            (8, 4),
            (16, 64),
            (17, 65),
            (24, 12),
            (48, 128),
            (64, 63),
        ] {
            for format in [PackedI8K4::new(8), PackedI8K4::new(16), PackedI8K4::new(4)] {
                // Stored mn-major ([mn, k]: k the inner axis) and k-major.
                for (t, k_axis, mn_axis) in [(matrix(mn, k), 1, 0), (matrix(k, mn), 0, 1)] {
                    let theirs = tracts(&format, &t, k_axis, mn_axis);
                    let what = format!("{mn} x {k}, k axis {k_axis}, r {}", format.r);
                    let new = pack_new(&format, &t, k_axis, mn_axis).expect("packs");
                    assert_eq!(new.as_bytes(), theirs.as_slice(), "{what}");
                    if format.len(k, mn) == t.len() {
                        let at = t.try_as_plain_ram().expect("plain").as_bytes().as_ptr();
                        let own = pack_in_place(&format, t, k_axis, mn_axis, &mut Vec::new())
                            .expect("packs");
                        assert_eq!(own.as_bytes(), theirs.as_slice(), "{what}");
                        assert_eq!(own.as_bytes().as_ptr(), at, "{what}: its own bytes");
                    }
                }
            }
        }
    }

    /// A matrix that does not fit the bytes it is packed from is an error,
    /// not a read past them.
    #[test]
    fn a_weight_past_its_bytes_is_an_error() {
        let err = super::super::pack::ensure_fits(10, 4, 3, 1, 4).expect_err("past the end");
        assert!(err.to_string().contains("does not fit"), "{err}");
        assert!(super::super::pack::ensure_fits(12, 4, 3, 1, 4).is_ok());
        assert!(super::super::pack::ensure_fits(0, 0, 3, 1, 4).is_ok());
    }
}
