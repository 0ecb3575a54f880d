//! The int8 matmul sums, converted to f32 and scaled in one pass on the pool.
//!
//! After each int8 weight matmul tract casts its i32 sums to f32 (`Cast`) and
//! multiplies them by the per-column scales (`OptMulUnicast`): two passes over
//! a `[T, 3072]` tensor, the cast on the calling thread (int8, 10 s, two
//! threads: 14 + 6 ms of 204, the cast slower than on one thread, as it reads
//! what both cores' kernels wrote). [`ScaledCast`] does both, rows split
//! across the pool. Each element is the same conversion (`i32 as f32`, round
//! to nearest even) and the same single IEEE multiplication, so the bits are
//! the same.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::OptBinUnicast;
use tract_onnx::tract_core::ops::cast::Cast;

use super::broadcast::{Operand, Rows, fit_rows};

/// Replaces each f32 `OptMulUnicast` of an optimised graph one of whose
/// operands is a `Cast` from i32 read by nothing else with [`ScaledCast`] on
/// the cast's input. Returns how many were replaced.
pub fn replace_scaled_casts(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in 0..model.nodes.len() {
        let Some((op, inputs)) = ScaledCast::for_node(model, &model.nodes[id])? else {
            continue;
        };
        if super::replace_node(model, id, op, &inputs)? {
            done += 1;
        }
    }
    Ok(done)
}

/// `(sums as f32) * scales`: `sums` an i32 tensor, `scales` an f32 one that
/// broadcasts into it. Inputs in the multiplication's order; operands it does
/// not fit at run time (other shapes, strides) go to a cast and the tract op
/// it replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaledCast {
    /// Which input holds the sums (0 or 1).
    sums: usize,
    original: OptBinUnicast,
}

impl ScaledCast {
    /// The op for node `node` and the outlets it reads, when the node is an
    /// f32 `OptMulUnicast` of a cast from i32 (read by nothing else) and a
    /// same-rank f32 operand that broadcasts into it.
    fn for_node(
        model: &TypedModel,
        node: &TypedNode,
    ) -> TractResult<Option<(ScaledCast, TVec<OutletId>)>> {
        let Some(mul) = node.op_as::<OptBinUnicast>() else {
            return Ok(None);
        };
        if mul.binop.name() != "Mul" || node.inputs.len() != 2 {
            return Ok(None);
        }
        let out = &node.outputs[0].fact;
        for sums in 0..2 {
            let cast_outlet = node.inputs[sums];
            let cast = model.node(cast_outlet.node);
            let from_i32 = cast.op_as::<Cast>().is_some_and(|c| c.to == DatumType::F32)
                && cast.inputs.len() == 1
                && model.outlet_fact(cast.inputs[0])?.datum_type == DatumType::I32;
            let alone = cast.outputs.len() == 1 && cast.outputs[0].successors.len() == 1;
            let scales = model.outlet_fact(node.inputs[1 - sums])?;
            let broadcasts = scales.datum_type == DatumType::F32
                && out.datum_type == DatumType::F32
                && scales.rank() == out.rank()
                && scales
                    .shape
                    .iter()
                    .zip(out.shape.iter())
                    .all(|(s, o)| s == o || s.is_one());
            if from_i32 && alone && broadcasts {
                let mut inputs: TVec<OutletId> = node.inputs.iter().copied().collect();
                inputs[sums] = cast.inputs[0];
                let op = ScaledCast {
                    sums,
                    original: mul.clone(),
                };
                return Ok(Some((op, inputs)));
            }
        }
        Ok(None)
    }

    /// The product into a new tensor of the sums' shape, rows split across
    /// the pool.
    fn run(sums: &Tensor, scales: &Tensor) -> TractResult<Tensor> {
        let rows = Rows::new(sums.shape(), scales.shape());
        let sums_view = sums.try_as_plain_ram()?;
        let xs = sums_view.as_slice::<i32>()?;
        let scales = scales.try_as_plain_ram()?;
        let ys = scales.as_slice::<f32>()?;
        let mut out = Tensor::zero::<f32>(sums.shape())?;
        {
            let mut out_view = out.try_as_plain_ram_mut()?;
            let outs = out_view.as_slice_mut::<f32>()?;
            if outs.is_empty() {
                return Ok(out);
            }
            let total = outs.len();
            tract_linalg::multithread::par_chunks_mut(
                outs,
                rows.len,
                total,
                |first_row, chunk| {
                    super::wide(ScaleRows {
                        rows: &rows,
                        first_row,
                        chunk,
                        xs,
                        ys,
                    });
                    Ok(())
                },
            )?;
        }
        Ok(out)
    }
}

/// `i32 as f32` times its scale, over output rows `first_row..` in `chunk`,
/// as [`super::wide`] work. A converted i32 is never NaN, so the product is
/// the same in either operand order.
struct ScaleRows<'a> {
    rows: &'a Rows,
    first_row: usize,
    chunk: &'a mut [f32],
    xs: &'a [i32],
    ys: &'a [f32],
}

impl super::Wide for ScaleRows<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let rows = self.rows;
        for (row, to) in self.chunk.chunks_exact_mut(rows.len).enumerate() {
            let row = self.first_row + row;
            let from = &self.xs[row * rows.len..(row + 1) * rows.len];
            match rows.operand(self.ys, row) {
                Operand::Scalar(y) => {
                    for (o, x) in to.iter_mut().zip(from) {
                        *o = *x as f32 * y;
                    }
                }
                Operand::Row(ys) => {
                    for ((o, x), y) in to.iter_mut().zip(from).zip(ys) {
                        *o = *x as f32 * *y;
                    }
                }
            }
        }
    }
}

impl Op for ScaledCast {
    fn name(&self) -> StaticName {
        "ScaledCast".into()
    }

    op_as_typed_op!();
}

impl EvalOp for ScaledCast {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (sums, scales) = (&inputs[self.sums], &inputs[1 - self.sums]);
        ensure!(
            sums.datum_type() == DatumType::I32 && scales.datum_type() == DatumType::F32,
            "ScaledCast on {:?} and {:?}",
            sums.datum_type(),
            scales.datum_type()
        );
        if !fit_rows(sums, scales) {
            let cast = sums.cast_to::<f32>()?.into_owned().into_tvalue();
            inputs[self.sums] = cast;
            return self.original.eval(ctx, inputs);
        }
        Ok(tvec!(Self::run(sums, scales)?.into_tvalue()))
    }
}

impl TypedOp for ScaledCast {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let sums = inputs[self.sums];
        ensure!(sums.datum_type == DatumType::I32);
        ensure!(inputs[1 - self.sums].datum_type == DatumType::F32);
        Ok(tvec!(f32::fact(sums.shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math;

    /// `Cast` to f32 then `Mul` by `scales`, optimised by tract, with the sums
    /// as operand `sums_at`.
    fn cast_then_mul(rows: usize, cols: usize, scales: &Tensor, sums_at: usize) -> TypedModel {
        let mut model = TypedModel::default();
        let a = model
            .add_source("a", i32::fact([1, rows, cols]))
            .expect("a");
        let c = model
            .wire_node("c", Cast { to: DatumType::F32 }, &[a])
            .expect("c")[0];
        let s = model.add_const("s", scales.clone()).expect("s");
        let inputs = if sums_at == 0 { [c, s] } else { [s, c] };
        let m = model.wire_node("m", math::mul(), &inputs).expect("m");
        model.select_output_outlets(&m).expect("outputs");
        model.into_optimized().expect("optimised")
    }

    fn bits(model: TypedModel, sums: &Tensor) -> Vec<u32> {
        let out = model
            .into_runnable()
            .expect("plan")
            .run(tvec![sums.clone().into_tvalue()])
            .expect("run");
        let view = out[0].try_as_plain_ram().expect("plain");
        let xs = view.as_slice::<f32>().expect("f32");
        xs.iter().map(|v| v.to_bits()).collect()
    }

    /// tract's `Cast` and `OptMulUnicast` against the graph with them
    /// replaced, both operand orders, on sums that need rounding (beyond
    /// 2^24), on one and two threads: the same bits.
    #[test]
    fn same_bits_as_tract_s_cast_and_mul() {
        let (rows, cols) = (300usize, 64usize);
        let sums: Vec<i32> = (0..rows * cols)
            .map(|i| (i as i32).wrapping_mul(-1_640_531_535) >> 3)
            .collect();
        let sums = Tensor::from_shape(&[1, rows, cols], &sums).expect("sums");
        let scales: Vec<f32> = (0..cols).map(|j| 1.0 / (3.0 + j as f32)).collect();
        let scales = Tensor::from_shape(&[1, 1, cols], &scales).expect("scales");
        for sums_at in 0..2 {
            let plain = cast_then_mul(rows, cols, &scales, sums_at);
            assert!(plain.nodes.iter().any(|n| n.op_is::<OptBinUnicast>()));
            let mut replaced = plain.clone();
            assert_eq!(replace_scaled_casts(&mut replaced).expect("replace"), 1);
            let replaced = replaced.into_compact().expect("compact");
            assert!(!replaced.nodes.iter().any(|n| n.op_is::<Cast>()));
            let expected = bits(plain, &sums);
            for threads in [1, 2] {
                let executor = tract_linalg::multithread::Executor::multithread(threads);
                let got = tract_linalg::multithread::multithread_tract_scope(executor, || {
                    bits(replaced.clone(), &sums)
                });
                assert!(got == expected, "sums at {sums_at}, {threads} threads");
            }
        }
    }

    /// A cast read by another node too stays, and nothing is replaced.
    #[test]
    fn a_cast_with_other_readers_is_left_alone() {
        let mut model = TypedModel::default();
        let a = model.add_source("a", i32::fact([1, 8, 16])).expect("a");
        let c = model
            .wire_node("c", Cast { to: DatumType::F32 }, &[a])
            .expect("c")[0];
        let s = model
            .add_const(
                "s",
                Tensor::from_shape(&[1, 1, 16], &[0.5f32; 16]).expect("s"),
            )
            .expect("s");
        let m = model.wire_node("m", math::mul(), &[c, s]).expect("m")[0];
        model.select_output_outlets(&[m, c]).expect("outputs");
        let mut model = model.into_optimized().expect("optimised");
        assert_eq!(replace_scaled_casts(&mut model).expect("replace"), 0);
    }
}
