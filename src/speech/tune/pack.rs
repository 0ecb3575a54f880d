//! The int8 activations, packed for the VNNI kernel on the thread pool.
//!
//! Before each int8 weight matmul tract shifts the quantised activations from
//! u8 to i8 (`OffsetU8asI8`, `x - 128`) and then packs them for the kernel
//! (`OptMatMulPack` into `PackedI8K4`: panels of `r` rows, four consecutive `k`
//! per row). Both passes run on the calling thread, the packing a byte at a
//! time through strided loops (int8, 10 s, two threads: 22 ms of 204, while the
//! second core waits). [`PackI8K4`] does the shift and the packing in one pass,
//! its panels split across the pool. It only moves bytes (the shift is a
//! flip of the top bit), so the packed panels are the same bytes as tract's.

use tract_linalg::mmm::{EagerPackedInput, PackedExoticFact};
use tract_linalg::pack::PackedI8K4;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::matmul::pack::DynPackedExoticFact;

/// Replaces each unbatched `OptMatMulPack` into `PackedI8K4` of an optimised
/// graph with [`PackI8K4`], taking the shift from u8 into it when its input is
/// an `OffsetU8asI8`. The shift node stays for any other reader and is dropped
/// by the next compaction otherwise. Returns how many packs were replaced.
pub fn replace_i8_packs(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in 0..model.nodes.len() {
        let Some((op, input)) = PackI8K4::for_node(model, &model.nodes[id])? else {
            continue;
        };
        if super::replace_node(model, id, op, &[input])? {
            done += 1;
        }
    }
    Ok(done)
}

/// Packs one matrix of i8 (or of u8, shifted to i8 on the way) into tract's
/// `PackedI8K4` layout: for panel `p` of `r` rows along `mn`, byte
/// `(k / 4) * r * 4 + row * 4 + k % 4` holds element `(p * r + row, k)`, with
/// `k` padded to a multiple of four and the last panel padded to `r` rows, the
/// padding zero.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PackI8K4 {
    format: PackedI8K4,
    k_axis: usize,
    mn_axis: usize,
    /// The input is u8, shifted by -128 into i8 (`OffsetU8asI8`).
    from_u8: bool,
}

impl PackI8K4 {
    /// The op for node `node` and the outlet it reads, when the node is an
    /// unbatched `OptMatMulPack` into `PackedI8K4`.
    fn for_node(model: &TypedModel, node: &TypedNode) -> TractResult<Option<(PackI8K4, OutletId)>> {
        if node.op.name() != "OptMatMulPack" || node.inputs.len() != 1 || node.outputs.len() != 1 {
            return Ok(None);
        }
        let fact = &node.outputs[0].fact;
        let Some(exotic) = fact
            .exotic_fact()
            .and_then(|e| e.downcast_ref::<DynPackedExoticFact>())
        else {
            return Ok(None);
        };
        let [packer] = exotic.packers.as_slice() else {
            return Ok(None);
        };
        let Some(format) = packer.downcast_ref::<PackedI8K4>() else {
            return Ok(None);
        };
        let Some((k_axis, mn_axis)) = super::pack_axes(model, node)? else {
            return Ok(None);
        };
        let fact = model.outlet_fact(node.inputs[0])?;
        // One matrix: every axis but k and mn is 1.
        let unbatched = fact
            .shape
            .iter()
            .enumerate()
            .all(|(ax, d)| ax == k_axis || ax == mn_axis || d.is_one());
        if fact.datum_type != DatumType::I8 || !unbatched {
            return Ok(None);
        }
        let mut op = PackI8K4 {
            format: format.clone(),
            k_axis,
            mn_axis,
            from_u8: false,
        };
        let mut input = node.inputs[0];
        let source = model.node(input.node);
        if source.op.name() == "OffsetU8asI8"
            && source.inputs.len() == 1
            && model.outlet_fact(source.inputs[0])?.datum_type == DatumType::U8
        {
            op.from_u8 = true;
            input = source.inputs[0];
        }
        Ok(Some((op, input)))
    }

    fn input_type(&self) -> DatumType {
        if self.from_u8 {
            DatumType::U8
        } else {
            DatumType::I8
        }
    }

    /// The packed bytes of `src` (a `k` x `mn` matrix at element strides
    /// `k_stride`, `mn_stride`), panels split across the pool.
    fn pack(
        &self,
        src: &[u8],
        k: usize,
        mn: usize,
        k_stride: usize,
        mn_stride: usize,
    ) -> TractResult<Blob> {
        let r = self.format.r;
        let panel_len = self.format.single_panel_len(k);
        let mut packed =
            Tensor::zero_aligned::<i8>(&[self.format.len(k, mn)], self.format.alignment())?
                .into_blob()?;
        if panel_len == 0 {
            return Ok(packed);
        }
        // `x - 128` in wrapping u8 is `x ^ 0x80`: the i8 `OffsetU8asI8` makes.
        let flip = if self.from_u8 { 0x80u8 } else { 0 };
        let total = packed.len();
        tract_linalg::multithread::par_chunks_mut(
            packed.as_bytes_mut(),
            panel_len,
            total,
            |first, chunk| {
                for (i, panel) in chunk.chunks_exact_mut(panel_len).enumerate() {
                    let first_row = (first + i) * r;
                    for row in 0..r.min(mn - first_row) {
                        let at = (first_row + row) * mn_stride;
                        if k_stride == 1 {
                            fill_row(panel, r, row, &src[at..at + k], flip);
                        } else {
                            for kk in 0..k {
                                panel[(kk / 4) * r * 4 + row * 4 + kk % 4] =
                                    src[at + kk * k_stride] ^ flip;
                            }
                        }
                    }
                }
                Ok(())
            },
        )?;
        Ok(packed)
    }
}

/// Writes row `row` of a panel of `r` rows from its `k` contiguous bytes
/// `line`, each XORed with `flip`: four bytes into each block of `r * 4`.
fn fill_row(panel: &mut [u8], r: usize, row: usize, line: &[u8], flip: u8) {
    let flip4 = u32::from_ne_bytes([flip; 4]);
    let (quads, tail) = line.split_at(line.len() / 4 * 4);
    let mut blocks = panel.chunks_exact_mut(r * 4);
    // Quads first: `zip` takes from its first iterator first, so the block
    // for the tail is left in `blocks`.
    for (quad, block) in quads.chunks_exact(4).zip(&mut blocks) {
        let v = u32::from_ne_bytes([quad[0], quad[1], quad[2], quad[3]]) ^ flip4;
        block[row * 4..row * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    if let Some(block) = blocks.next() {
        for (to, from) in block[row * 4..].iter_mut().zip(tail) {
            *to = from ^ flip;
        }
    }
}

impl Op for PackI8K4 {
    fn name(&self) -> StaticName {
        "PackI8K4".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?}. k axis: {}, mn axis: {}, from u8: {}",
            self.format, self.k_axis, self.mn_axis, self.from_u8
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for PackI8K4 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        ensure!(
            input.datum_type() == self.input_type(),
            "PackI8K4: {:?} input, expected {:?}",
            input.datum_type(),
            self.input_type()
        );
        let (k, mn) = (input.shape()[self.k_axis], input.shape()[self.mn_axis]);
        let stride = |ax: usize| usize::try_from(input.strides()[ax]).ok();
        let (Some(k_stride), Some(mn_stride)) = (stride(self.k_axis), stride(self.mn_axis)) else {
            bail!("PackI8K4: negative strides {:?}", input.strides());
        };
        let view = input.try_as_plain_ram()?;
        let packed = self.pack(view.as_bytes(), k, mn, k_stride, mn_stride)?;
        let value = EagerPackedInput {
            fact: PackedExoticFact {
                format: Box::new(self.format.clone()),
                mn: mn.to_dim(),
                k,
            },
            packed: Arc::new(packed),
            panel_bytes: self.format.single_panel_len(k),
            mn,
        };
        Ok(tvec!(super::packed_value(
            input.shape(),
            self.k_axis,
            self.mn_axis,
            Box::new(value),
            DatumType::I8
        )))
    }
}

impl TypedOp for PackI8K4 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == self.input_type());
        Ok(tvec!(super::packed_fact(
            inputs[0],
            DatumType::I8,
            Box::new(self.format.clone()),
            self.k_axis,
            self.mn_axis
        )))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_linalg::mmm::{MMMInputFormat, MMMInputValue, PackedMatrixStorage};

    /// The packed bytes, their alignment, panel size, `mn` and `k` of one
    /// packed matrix.
    type Packed = (Vec<u8>, usize, usize, usize, usize);

    fn packed(value: &dyn MMMInputValue) -> Packed {
        let eager = value
            .downcast_ref::<EagerPackedInput>()
            .expect("eager packed");
        (
            eager.packed.as_bytes().to_vec(),
            eager.packed.layout().align(),
            eager.panel_bytes,
            eager.mn,
            eager.k(),
        )
    }

    fn run(op: &PackI8K4, input: Tensor) -> Packed {
        let out = op
            .eval(&EvalContext::out_of_plan(), tvec![input.into_tvalue()])
            .expect("eval");
        let storage = out[0]
            .try_storage_as::<PackedMatrixStorage>()
            .expect("packed storage");
        packed(storage.value())
    }

    /// `rows` x `k` bytes, every value of a byte present for large sizes.
    fn bytes(rows: usize, k: usize) -> Vec<u8> {
        (0..rows * k).map(|i| (i * 131 % 256) as u8).collect()
    }

    #[test]
    fn packs_the_same_bytes_as_tract_with_and_without_the_shift() {
        for (rows, k) in [(1, 1), (5, 7), (16, 64), (37, 130), (250, 768)] {
            let format = PackedI8K4::new(16);
            let bytes = bytes(rows, k);
            let shifted: Vec<i8> = bytes.iter().map(|b| b.wrapping_sub(128) as i8).collect();
            let matrix = Tensor::from_shape(&[rows, k], &shifted).expect("tensor");
            let expected = packed(&*format.prepare_one(&matrix, 1, 0).expect("tract packs"));
            for threads in [1, 2] {
                let executor = tract_linalg::multithread::Executor::multithread(threads);
                tract_linalg::multithread::multithread_tract_scope(executor, || {
                    let from_u8 = PackI8K4 {
                        format: format.clone(),
                        k_axis: 2,
                        mn_axis: 1,
                        from_u8: true,
                    };
                    let input = Tensor::from_shape(&[1, rows, k], &bytes).expect("u8");
                    assert_eq!(run(&from_u8, input), expected, "{rows}x{k} from u8");
                    let from_i8 = PackI8K4 {
                        from_u8: false,
                        ..from_u8
                    };
                    let input = Tensor::from_shape(&[1, rows, k], &shifted).expect("i8");
                    assert_eq!(run(&from_i8, input), expected, "{rows}x{k} from i8");
                });
            }
        }
    }

    #[test]
    fn packs_a_matrix_stored_k_major() {
        let (rows, k) = (21, 10);
        let format = PackedI8K4::new(16);
        let values: Vec<i8> = bytes(rows, k).into_iter().map(|b| b as i8).collect();
        // The same matrix stored as `[k, rows]`.
        let mut transposed = vec![0i8; rows * k];
        for row in 0..rows {
            for kk in 0..k {
                transposed[kk * rows + row] = values[row * k + kk];
            }
        }
        let matrix = Tensor::from_shape(&[rows, k], &values).expect("tensor");
        let expected = packed(&*format.prepare_one(&matrix, 1, 0).expect("tract packs"));
        let op = PackI8K4 {
            format,
            k_axis: 0,
            mn_axis: 1,
            from_u8: false,
        };
        let input = Tensor::from_shape(&[k, rows], &transposed).expect("tensor");
        assert_eq!(run(&op, input), expected);
    }

    #[test]
    fn refuses_an_input_of_the_wrong_type() {
        let op = PackI8K4 {
            format: PackedI8K4::new(16),
            k_axis: 1,
            mn_axis: 0,
            from_u8: true,
        };
        let input = Tensor::from_shape(&[2, 4], &[0i8; 8]).expect("tensor");
        let err = op
            .eval(&EvalContext::out_of_plan(), tvec![input.into_tvalue()])
            .expect_err("i8 where u8 is expected");
        assert!(err.to_string().contains("expected U8"), "{err}");
    }
}
