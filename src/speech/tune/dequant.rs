//! The int8 matmul sums, converted to f32 and scaled in one pass on the pool.
//!
//! After each int8 weight matmul tract casts its i32 sums to f32 (`Cast`) and
//! multiplies them by the per-column scales (`OptMulUnicast`): two passes over
//! a `[T, 3072]` tensor, the cast on the calling thread (int8, 10 s, two
//! threads: 14 + 6 ms of 204, the cast slower than on one thread, as it reads
//! what both cores' kernels wrote). [`ScaledCast`] does both, rows split
//! across the pool, and where the product's one reader adds the layer's bias
//! (a [`BroadcastBin`] `Add`, a third pass), it adds that too. Each element is
//! the same conversion (`i32 as f32`, round to nearest even), the same single
//! IEEE multiplication and the same addition, so the bits are the same.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::OptBinUnicast;
use tract_onnx::tract_core::ops::cast::Cast;

use super::broadcast::{BroadcastBin, Operand, Rows, fit_rows};

/// Replaces each f32 `OptMulUnicast` of an optimised graph one of whose
/// operands is a `Cast` from i32 read by nothing else with [`ScaledCast`] on
/// the cast's input, with the bias its product's sole reader adds. Returns how
/// many were replaced, and how many of those with a bias.
pub fn replace_scaled_casts(model: &mut TypedModel) -> TractResult<(usize, usize)> {
    let (mut done, mut biased) = (0, 0);
    for id in 0..model.nodes.len() {
        let Some((op, inputs, last)) = ScaledCast::for_node(model, &model.nodes[id])? else {
            continue;
        };
        let has_bias = op.bias.is_some();
        if super::replace_node(model, last, op, &inputs)? {
            done += 1;
            biased += usize::from(has_bias);
        }
    }
    Ok((done, biased))
}

/// `(sums as f32) * scales`, then `+ bias` where the graph adds one: `sums`
/// an i32 tensor, `scales` and `bias` f32 ones that broadcast into it. Inputs
/// in the multiplication's order, then the bias; operands it does not fit at
/// run time (other shapes, strides) go to a cast and the tract ops it
/// replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaledCast {
    /// Which input holds the sums (0 or 1).
    sums: usize,
    original: OptBinUnicast,
    /// The bias `Add` on the product, which is its input `full`.
    bias: Option<BroadcastBin>,
}

impl ScaledCast {
    /// The op for node `node`, the outlets it reads and the node whose output
    /// it replaces, when the node is an f32 `OptMulUnicast` of a cast from i32
    /// (read by nothing else) and a same-rank f32 operand that broadcasts into
    /// it: the node itself, or the bias `Add` that is its sole reader.
    fn for_node(
        model: &TypedModel,
        node: &TypedNode,
    ) -> TractResult<Option<(ScaledCast, TVec<OutletId>, usize)>> {
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
                let mut op = ScaledCast {
                    sums,
                    original: mul.clone(),
                    bias: None,
                };
                let mut last = node.id;
                if let Some((add, bias)) = bias_add(model, node)? {
                    op.bias = Some(add.op.clone());
                    inputs.push(bias);
                    last = add.id;
                }
                return Ok(Some((op, inputs, last)));
            }
        }
        Ok(None)
    }

    /// The product (plus `bias`) into a new tensor of the sums' shape, rows
    /// split across the pool. A bias comes with rows of the scales' length.
    fn run(sums: &Tensor, scales: &Tensor, bias: Option<&Tensor>) -> TractResult<Tensor> {
        let rows = Rows::new(sums.shape(), scales.shape());
        let sums_view = sums.try_as_plain_ram()?;
        let xs = sums_view.as_slice::<i32>()?;
        let scales = scales.try_as_plain_ram()?;
        let ys = scales.as_slice::<f32>()?;
        let bias_view = bias.map(|b| b.try_as_plain_ram()).transpose()?;
        let bias = match (bias, &bias_view) {
            (Some(b), Some(view)) => Some((Rows::new(sums.shape(), b.shape()), view.as_slice()?)),
            _ => None,
        };
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
                        bias: bias.as_ref().map(|(rows, bs)| (rows, *bs)),
                    });
                    Ok(())
                },
            )?;
        }
        Ok(out)
    }
}

/// The bias `Add` that is the sole reader of `mul`'s product, with the
/// outlet of its other operand.
fn bias_add<'m>(
    model: &'m TypedModel,
    mul: &TypedNode,
) -> TractResult<Option<(BiasAdd<'m>, OutletId)>> {
    let product = OutletId::new(mul.id, 0);
    let Some(add) = super::sole_reader(model, product)? else {
        return Ok(None);
    };
    let Some(op) = add.op_as::<BroadcastBin>() else {
        return Ok(None);
    };
    match op.f32_add_to() {
        Some(full) if add.inputs.len() == 2 && add.inputs[full] == product => {
            Ok(Some((BiasAdd { id: add.id, op }, add.inputs[1 - full])))
        }
        _ => Ok(None),
    }
}

/// The node [`bias_add`] found.
struct BiasAdd<'m> {
    id: usize,
    op: &'m BroadcastBin,
}

/// Whether `bias` can join the row walk of `sums` by `scales`: it fits the
/// rows, and splits the sums into rows of the same length.
fn fits_with_bias(sums: &Tensor, scales: &Tensor, bias: &Tensor) -> bool {
    bias.datum_type() == DatumType::F32
        && fit_rows(sums, bias)
        && Rows::new(sums.shape(), bias.shape()).len == Rows::new(sums.shape(), scales.shape()).len
}

/// `i32 as f32` times its scale, plus its bias where there is one, over
/// output rows `first_row..` in `chunk`, as [`super::wide`] work. A
/// converted i32 is never NaN, so the product is the same in either operand
/// order; the sum is `product + bias`, as [`BroadcastBin`] adds.
struct ScaleRows<'a> {
    rows: &'a Rows,
    first_row: usize,
    chunk: &'a mut [f32],
    xs: &'a [i32],
    ys: &'a [f32],
    bias: Option<(&'a Rows, &'a [f32])>,
}

impl super::Wide for ScaleRows<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let rows = self.rows;
        for (row, to) in self.chunk.chunks_exact_mut(rows.len).enumerate() {
            let row = self.first_row + row;
            let from = &self.xs[row * rows.len..(row + 1) * rows.len];
            let bias = self.bias.map(|(rows, bs)| rows.operand(bs, row));
            match (rows.operand(self.ys, row), bias) {
                (Operand::Scalar(y), None) => {
                    for (o, x) in to.iter_mut().zip(from) {
                        *o = *x as f32 * y;
                    }
                }
                (Operand::Row(ys), None) => {
                    for ((o, x), y) in to.iter_mut().zip(from).zip(ys) {
                        *o = *x as f32 * *y;
                    }
                }
                (Operand::Scalar(y), Some(Operand::Row(bs))) => {
                    for ((o, x), b) in to.iter_mut().zip(from).zip(bs) {
                        *o = *x as f32 * y + *b;
                    }
                }
                (Operand::Row(ys), Some(Operand::Row(bs))) => {
                    for (((o, x), y), b) in to.iter_mut().zip(from).zip(ys).zip(bs) {
                        *o = *x as f32 * *y + *b;
                    }
                }
                (Operand::Scalar(y), Some(Operand::Scalar(b))) => {
                    for (o, x) in to.iter_mut().zip(from) {
                        *o = *x as f32 * y + b;
                    }
                }
                (Operand::Row(ys), Some(Operand::Scalar(b))) => {
                    for ((o, x), y) in to.iter_mut().zip(from).zip(ys) {
                        *o = *x as f32 * *y + b;
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
        ensure!(
            inputs.len() == 2 + usize::from(self.bias.is_some()),
            "ScaledCast on {} inputs",
            inputs.len()
        );
        let (sums, scales) = (&inputs[self.sums], &inputs[1 - self.sums]);
        ensure!(
            sums.datum_type() == DatumType::I32 && scales.datum_type() == DatumType::F32,
            "ScaledCast on {:?} and {:?}",
            sums.datum_type(),
            scales.datum_type()
        );
        let bias = inputs.get(2);
        let fits =
            fit_rows(sums, scales) && bias.is_none_or(|bias| fits_with_bias(sums, scales, bias));
        if fits {
            return Ok(tvec!(
                Self::run(sums, scales, bias.map(|b| &**b))?.into_tvalue()
            ));
        }
        let bias = if self.bias.is_some() {
            inputs.pop()
        } else {
            None
        };
        let cast = inputs[self.sums]
            .cast_to::<f32>()?
            .into_owned()
            .into_tvalue();
        inputs[self.sums] = cast;
        let product = self.original.eval(ctx, inputs)?.remove(0);
        match (&self.bias, bias) {
            (Some(add), Some(bias)) => {
                let full = add
                    .f32_add_to()
                    .context("ScaledCast: a bias that is not an add")?;
                let operands = if full == 0 {
                    tvec![product, bias]
                } else {
                    tvec![bias, product]
                };
                add.eval(ctx, operands)
            }
            _ => Ok(tvec!(product)),
        }
    }
}

impl TypedOp for ScaledCast {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2 + usize::from(self.bias.is_some()));
        let sums = inputs[self.sums];
        ensure!(sums.datum_type == DatumType::I32);
        ensure!(inputs[1 - self.sums].datum_type == DatumType::F32);
        ensure!(
            inputs
                .get(2)
                .is_none_or(|bias| bias.datum_type == DatumType::F32)
        );
        Ok(tvec!(f32::fact(sums.shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::konst::Const;
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

    fn bits(model: TypedModel, inputs: &[&Tensor]) -> Vec<u32> {
        let inputs = inputs.iter().map(|t| (*t).clone().into_tvalue()).collect();
        let out = model
            .into_runnable()
            .expect("plan")
            .run(inputs)
            .expect("run");
        bits_of(&out[0])
    }

    fn bits_of(out: &TValue) -> Vec<u32> {
        let view = out.try_as_plain_ram().expect("plain");
        let xs = view.as_slice::<f32>().expect("f32");
        xs.iter().map(|v| v.to_bits()).collect()
    }

    /// `[1, rows, cols]` sums that need rounding (beyond 2^24) and
    /// `[1, 1, cols]` scales.
    fn sums_and_scales(rows: usize, cols: usize) -> (Tensor, Tensor) {
        let sums: Vec<i32> = (0..rows * cols)
            .map(|i| (i as i32).wrapping_mul(-1_640_531_535) >> 3)
            .collect();
        let scales: Vec<f32> = (0..cols).map(|j| 1.0 / (3.0 + j as f32)).collect();
        (
            Tensor::from_shape(&[1, rows, cols], &sums).expect("sums"),
            Tensor::from_shape(&[1, 1, cols], &scales).expect("scales"),
        )
    }

    /// tract's `Cast` and `OptMulUnicast` against the graph with them
    /// replaced, both operand orders, on sums that need rounding (beyond
    /// 2^24), on one and two threads: the same bits.
    #[test]
    fn same_bits_as_tract_s_cast_and_mul() {
        let (rows, cols) = (300usize, 64usize);
        let (sums, scales) = sums_and_scales(rows, cols);
        for sums_at in 0..2 {
            let plain = cast_then_mul(rows, cols, &scales, sums_at);
            assert!(plain.nodes.iter().any(|n| n.op_is::<OptBinUnicast>()));
            let mut replaced = plain.clone();
            assert_eq!(
                replace_scaled_casts(&mut replaced).expect("replace"),
                (1, 0)
            );
            let replaced = replaced.into_compact().expect("compact");
            assert!(!replaced.nodes.iter().any(|n| n.op_is::<Cast>()));
            let expected = bits(plain, &[&sums]);
            for threads in [1, 2] {
                let executor = tract_linalg::multithread::Executor::multithread(threads);
                let got = tract_linalg::multithread::multithread_tract_scope(executor, || {
                    bits(replaced.clone(), &[&sums])
                });
                assert!(got == expected, "sums at {sums_at}, {threads} threads");
            }
        }
    }

    /// `Cast`, `Mul` by per-column scales and `Add` to a per-column bias over
    /// `[1, T, cols]`, as an int8 matmul ends: `T` symbolic as gigastt loads,
    /// the scales an input (they carry the activations' scale, known only at
    /// run time), optimised, and the broadcasting add run as rows (as
    /// `rewrite_optimized` does first). With `shared`, the product is an
    /// output too.
    fn cast_mul_add(cols: usize, shared: bool) -> TypedModel {
        let mut model = TypedModel::default();
        let t: TDim = model.symbols.sym("T").into();
        let a = model
            .add_source("a", i32::fact(tvec![1.into(), t, cols.to_dim()]))
            .expect("a");
        let s = model.add_source("s", f32::fact([1, 1, cols])).expect("s");
        let c = model
            .wire_node("c", Cast { to: DatumType::F32 }, &[a])
            .expect("c")[0];
        let bias: Vec<f32> = (0..cols).map(|j| (j as f32 - 20.0) * 0.37).collect();
        let b = model
            .add_const("b", Tensor::from_shape(&[1, 1, cols], &bias).expect("bias"))
            .expect("b");
        let m = model.wire_node("m", math::mul(), &[c, s]).expect("m")[0];
        // Bias first, as the ONNX export writes it: tract's unicast and
        // chain ops want the full operand first, so the add stays generic.
        let out = model.wire_node("add", math::add(), &[b, m]).expect("add")[0];
        let outputs = if shared { vec![out, m] } else { vec![out] };
        model.select_output_outlets(&outputs).expect("outputs");
        let mut model = model.into_optimized().expect("optimised");
        super::super::broadcast::replace_broadcast_binops(&mut model).expect("broadcasts");
        model
    }

    /// The bias added in the same pass: the same bits as tract's cast,
    /// multiplication and add, on one and two threads; with the product read
    /// elsewhere too, the add stays.
    #[test]
    fn the_bias_add_joins_with_the_same_bits() {
        let (rows, cols) = (300usize, 64usize);
        let (sums, scales) = sums_and_scales(rows, cols);
        let plain = cast_mul_add(cols, false);
        let mut replaced = plain.clone();
        assert_eq!(
            replace_scaled_casts(&mut replaced).expect("replace"),
            (1, 1)
        );
        let replaced = replaced.into_compact().expect("compact");
        assert!(!replaced.nodes.iter().any(|n| n.op_is::<BroadcastBin>()));
        let expected = bits(plain, &[&sums, &scales]);
        for threads in [1, 2] {
            let executor = tract_linalg::multithread::Executor::multithread(threads);
            let got = tract_linalg::multithread::multithread_tract_scope(executor, || {
                bits(replaced.clone(), &[&sums, &scales])
            });
            assert!(got == expected, "{threads} threads");
        }
        // Scales of another rank than the sums do not fit the row walk: the
        // op falls back to the cast, tract's product and the add it replaced.
        let op = replaced
            .nodes
            .iter()
            .find_map(|n| n.op_as::<ScaledCast>())
            .expect("the op");
        let bias = replaced
            .nodes
            .iter()
            .find_map(|n| n.op_as::<Const>())
            .expect("the bias")
            .val()
            .clone();
        let flat = scales.clone().into_shape(&[cols]).expect("rank 1");
        let inputs = tvec![
            sums.clone().into_tvalue(),
            flat.into_tvalue(),
            bias.into_tensor().into_tvalue()
        ];
        let out = op
            .eval(&EvalContext::out_of_plan(), inputs)
            .expect("fallback");
        assert!(bits_of(&out[0]) == expected, "the fallback");
        let mut shared = cast_mul_add(cols, true);
        assert_eq!(replace_scaled_casts(&mut shared).expect("replace"), (1, 0));
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
        assert_eq!(replace_scaled_casts(&mut model).expect("replace"), (0, 0));
    }
}
