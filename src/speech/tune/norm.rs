//! LayerNorm's normalisation as one op over its axis.
//!
//! tract lowers each `LayerNormalization` to four nodes: a `Reduce<Sum>` over
//! the normalised axis, its product by `1/n`, an `OptSubByScalar` and an
//! `RmsNorm`, then its own pass for the scale and bias where they are not 1
//! and 0 (a trained model's never are). The sum is a scalar walk on one
//! thread, and every node reads or writes the whole tensor: 96 of them cost
//! ~29 ms of a 10 s int8 run on the Intel Xeon of docs/perf.md. [`AxisNorm`]
//! does the four in one [`super::wide`] loop nest per row, which stays in the
//! L1 cache for its three passes (mean, variance, scale), and applies the
//! scale and bias in the last of them. The conv module's norm is over the
//! channels of `[1, 768, T]`, not the last axis: there the same passes run
//! down blocks of columns.
//!
//! Its sums are taken in fixed lanes (columns: in row order), not in tract's
//! kernel order, so it is not bit-exact: it is applied with
//! [`super::Exactness::Close`] only, under the same closeness tests as the
//! softmax.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::{OptBinByScalar, OptBinChain, OptBinUnicast, TypedBinOp};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};

use super::softmax::{lane_sum, row_sum};

/// Replaces each f32 `Reduce<Sum>` → `Mul` by a constant → `Sub` → `RmsNorm`
/// chain over one axis (tract's lowered LayerNorm) with [`AxisNorm`], with
/// the scale and bias that follow it when nothing else reads the normalised
/// tensor. Returns how many were replaced, and how many of those with their
/// scale and bias.
pub fn replace_layer_norms(model: &mut TypedModel) -> TractResult<(usize, usize)> {
    let (mut done, mut scaled) = (0, 0);
    for id in 0..model.nodes.len() {
        let Some((input, mut op)) = AxisNorm::for_node(model, &model.nodes[id])? else {
            continue;
        };
        let mut last = id;
        if let Some((affine, node)) = affine_after(model, OutletId::new(id, 0), op.axis)? {
            op.affine = Some(affine);
            last = node;
        }
        let has_affine = op.affine.is_some();
        if super::replace_node(model, last, op, &[input])? {
            done += 1;
            scaled += usize::from(has_affine);
        }
    }
    Ok((done, scaled))
}

/// `(x - mean) / sqrt(mean((x - mean)²) + eps)` over one axis of an f32
/// tensor, with `mean = sum * recip` as tract's lowering computes it, then
/// scaled and shifted per position along the axis where the model does.
#[derive(Debug, Clone, PartialEq)]
pub struct AxisNorm {
    axis: usize,
    /// The constant tract multiplies the sum by (`1/n` in f32).
    recip: f32,
    eps: f32,
    affine: Option<Affine>,
}

/// A LayerNorm's scale and bias: one of each per position along its axis.
#[derive(Debug, Clone, PartialEq)]
struct Affine {
    scale: Vec<f32>,
    bias: Vec<f32>,
}

impl Eq for AxisNorm {}

impl AxisNorm {
    /// The op and its input, when `node` is the `RmsNorm` of the chain
    /// [`replace_layer_norms`] looks for and nothing else reads the chain's
    /// inner nodes.
    fn for_node(model: &TypedModel, node: &TypedNode) -> TractResult<Option<(OutletId, AxisNorm)>> {
        let Some(rms) = node.op_as::<RmsNorm>() else {
            return Ok(None);
        };
        let outputs = model.output_outlets()?;
        let only_use = |outlet: OutletId| -> Option<&TypedNode> {
            let producer = &model.nodes[outlet.node];
            (producer.outputs.len() == 1
                && producer.outputs[0].successors.len() == 1
                && !outputs.contains(&outlet))
            .then_some(producer)
        };
        // x - mean
        let Some(sub) = only_use(node.inputs[0]) else {
            return Ok(None);
        };
        if bin_name(sub) != Some("Sub") || sub.inputs.len() != 2 {
            return Ok(None);
        }
        let x = sub.inputs[0];
        let fact = model.outlet_fact(x)?;
        let axis = rms.axis;
        if fact.datum_type != DatumType::F32 || axis >= fact.rank() {
            return Ok(None);
        }
        // mean = sum * recip
        let Some(mean) = only_use(sub.inputs[1]) else {
            return Ok(None);
        };
        if bin_name(mean) != Some("Mul") || mean.inputs.len() != 2 {
            return Ok(None);
        }
        let mut sum = None;
        let mut recip = None;
        for &input in &mean.inputs {
            match &model.outlet_fact(input)?.konst {
                Some(k) if k.len() == 1 && k.datum_type() == DatumType::F32 => {
                    recip = Some(k.cast_to_scalar::<f32>()?);
                }
                _ => sum = Some(input),
            }
        }
        let (Some(sum), Some(recip)) = (sum, recip) else {
            return Ok(None);
        };
        let Some(reduce) = only_use(sum) else {
            return Ok(None);
        };
        let is_sum = reduce
            .op_as::<Reduce>()
            .is_some_and(|op| op.reducer == Reducer::Sum && op.axes.as_slice() == [axis]);
        if !is_sum
            || reduce.inputs.as_slice() != [x]
            || model.outlet_fact(sum)?.shape != model.outlet_fact(sub.inputs[1])?.shape
        {
            return Ok(None);
        }
        let eps = rms.eps.cast_to_scalar::<f32>()?;
        let op = AxisNorm {
            axis,
            recip,
            eps,
            affine: None,
        };
        Ok(Some((x, op)))
    }
}

/// The scale and bias applied to `norm` (a normalisation over `axis`), and
/// the node that outputs the result: the sole reader of `norm` is tract's
/// fused `OptBinChain(Mul+Add)`, or a `Mul` whose sole reader is an `Add`,
/// each by a constant laid along the axis. tract computes `norm * scale`,
/// rounds, then adds the bias; [`AxisNorm`] does the same two operations.
fn affine_after(
    model: &TypedModel,
    norm: OutletId,
    axis: usize,
) -> TractResult<Option<(Affine, usize)>> {
    let fact = model.outlet_fact(norm)?;
    let Ok(len) = fact.shape[axis].to_usize() else {
        return Ok(None);
    };
    // The constant operand of `node` along the axis, where its other operand
    // is `from`.
    let along = |node: &TypedNode, from: OutletId| -> TractResult<Option<Vec<f32>>> {
        let [a, b] = node.inputs.as_slice() else {
            return Ok(None);
        };
        let other = if *a == from {
            *b
        } else if *b == from {
            *a
        } else {
            return Ok(None);
        };
        constant_along(model, other, fact.rank(), axis, len)
    };
    let Some(reader) = super::sole_reader(model, norm)? else {
        return Ok(None);
    };
    if let Some(chain) = reader.op_as::<OptBinChain>() {
        let names: Vec<_> = chain.steps.iter().map(|s| s.binop.name()).collect();
        if names != ["Mul", "Add"] || reader.inputs.len() != 3 || reader.inputs[0] != norm {
            return Ok(None);
        }
        let scale = constant_along(model, reader.inputs[1], fact.rank(), axis, len)?;
        let bias = constant_along(model, reader.inputs[2], fact.rank(), axis, len)?;
        return Ok(scale
            .zip(bias)
            .map(|(scale, bias)| (Affine { scale, bias }, reader.id)));
    }
    if bin_name(reader) != Some("Mul") {
        return Ok(None);
    }
    let Some(scale) = along(reader, norm)? else {
        return Ok(None);
    };
    let scaled = OutletId::new(reader.id, 0);
    let Some(add) = super::sole_reader(model, scaled)?.filter(|n| bin_name(n) == Some("Add"))
    else {
        return Ok(None);
    };
    let Some(bias) = along(add, scaled)? else {
        return Ok(None);
    };
    Ok(Some((Affine { scale, bias }, add.id)))
}

/// The values of `outlet` when it is an f32 constant of rank `rank` that is
/// `len` long on `axis` and 1 on every other axis.
fn constant_along(
    model: &TypedModel,
    outlet: OutletId,
    rank: usize,
    axis: usize,
    len: usize,
) -> TractResult<Option<Vec<f32>>> {
    let Some(k) = &model.outlet_fact(outlet)?.konst else {
        return Ok(None);
    };
    let laid = k.datum_type() == DatumType::F32
        && k.rank() == rank
        && k.shape()
            .iter()
            .enumerate()
            .all(|(ax, &d)| d == if ax == axis { len } else { 1 });
    if !laid {
        return Ok(None);
    }
    Ok(Some(k.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()))
}

/// The element-wise operation of a tract binary node, in any of the forms its
/// optimiser leaves (generic, by scalar, unicast); `None` for other nodes and
/// for ones that change the datum type.
fn bin_name(node: &TypedNode) -> Option<&'static str> {
    if let Some(op) = node.op_as::<TypedBinOp>() {
        op.1.is_none().then(|| op.0.name())
    } else if let Some(op) = node.op_as::<OptBinByScalar>() {
        Some(op.binop.name())
    } else {
        node.op_as::<OptBinUnicast>().map(|op| op.binop.name())
    }
}

impl Op for AxisNorm {
    fn name(&self) -> StaticName {
        "AxisNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let affine = if self.affine.is_some() {
            ", scale and bias"
        } else {
            ""
        };
        Ok(vec![format!("axis {}{affine}", self.axis)])
    }

    op_as_typed_op!();
}

impl EvalOp for AxisNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "AxisNorm on {} inputs", inputs.len());
        let shape = inputs[0].shape();
        ensure!(
            self.axis < shape.len(),
            "AxisNorm over axis {} of {shape:?}",
            self.axis
        );
        let len = shape[self.axis];
        if let Some(affine) = &self.affine {
            ensure!(
                affine.scale.len() == len && affine.bias.len() == len,
                "AxisNorm: a scale and bias of {} for an axis of {len}",
                affine.scale.len()
            );
        }
        let inner: usize = shape[self.axis + 1..].iter().product();
        // tract's tensors are dense in logical order: the slice is blocks of
        // `len` rows of `inner`.
        let mut out = args_1!(inputs).into_tensor();
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let xs = view.as_slice_mut::<f32>()?;
            if len > 0 && inner > 0 {
                // On the calling thread: the tensor is small (768 KiB at 10 s)
                // and the passes bound by memory, so splitting it across the
                // pool only moved it between the cores' caches (docs/perf.md).
                super::wide(Blocks {
                    xs,
                    len,
                    inner,
                    op: self,
                });
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for AxisNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == DatumType::F32);
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// [`AxisNorm`] over `xs`, blocks of `len` rows of `inner`, as
/// [`super::wide`] work: along each row where `inner` is 1 (the norm is
/// over the last axis), else down each column.
struct Blocks<'a> {
    xs: &'a mut [f32],
    len: usize,
    inner: usize,
    op: &'a AxisNorm,
}

impl super::Wide for Blocks<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        if self.inner == 1 {
            for row in self.xs.chunks_exact_mut(self.len) {
                self.op.row(row);
            }
        } else {
            for block in self.xs.chunks_exact_mut(self.len * self.inner) {
                for start in (0..self.inner).step_by(COLUMNS) {
                    let width = COLUMNS.min(self.inner - start);
                    self.op.columns(block, self.inner, start..start + width);
                }
            }
        }
    }
}

/// Columns at a time down a norm that is not over the last axis: 768 rows
/// of them are 192 KiB, within the L2 cache for the three passes.
const COLUMNS: usize = 64;

impl AxisNorm {
    /// One row, in place, in three passes; each is a plain loop the vectoriser
    /// takes at any width, and the sums' lanes are fixed, so the bits do not
    /// depend on the CPU.
    #[inline(always)]
    fn row(&self, row: &mut [f32]) {
        let mean = row_sum(row) * self.recip;
        for x in row.iter_mut() {
            *x -= mean;
        }
        let squares = lane_sum(row, |v| v * v);
        let scale = 1.0 / (squares / row.len() as f32 + self.eps).sqrt();
        match &self.affine {
            None => {
                for x in row.iter_mut() {
                    *x *= scale;
                }
            }
            // Left to right, as tract's two passes round: ((x · s) · g) + b.
            Some(a) => {
                for ((x, &g), &b) in row.iter_mut().zip(&a.scale).zip(&a.bias) {
                    *x = *x * scale * g + b;
                }
            }
        }
    }

    /// Columns `range` of `block`, rows of `inner`, in place, in the same
    /// three passes; each column's sums run in row order.
    #[inline(always)]
    fn columns(&self, block: &mut [f32], inner: usize, range: std::ops::Range<usize>) {
        let mut means = [0f32; COLUMNS];
        let means = &mut means[..range.len()];
        for row in block.chunks_exact(inner) {
            for (s, &v) in means.iter_mut().zip(&row[range.clone()]) {
                *s += v;
            }
        }
        for s in means.iter_mut() {
            *s *= self.recip;
        }
        let mut scales = [0f32; COLUMNS];
        let scales = &mut scales[..range.len()];
        for row in block.chunks_exact_mut(inner) {
            let part = &mut row[range.clone()];
            for ((v, &mean), q) in part.iter_mut().zip(means.iter()).zip(scales.iter_mut()) {
                *v -= mean;
                *q += *v * *v;
            }
        }
        let n = (block.len() / inner) as f32;
        for q in scales.iter_mut() {
            *q = 1.0 / (*q / n + self.eps).sqrt();
        }
        for (r, row) in block.chunks_exact_mut(inner).enumerate() {
            let part = row[range.clone()].iter_mut().zip(scales.iter());
            match &self.affine {
                None => {
                    for (v, &scale) in part {
                        *v *= scale;
                    }
                }
                Some(a) => {
                    let (g, b) = (a.scale[r], a.bias[r]);
                    for (v, &scale) in part {
                        *v = *v * scale * g + b;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speech::tune::Wide;
    use crate::speech::tune::tests::{run_f32, uniform};
    use tract_onnx::tract_core::ops::math;

    const EPS: f32 = 1e-5;

    /// The normalisation of `row` in f64.
    fn reference(row: &[f32]) -> Vec<f64> {
        let n = row.len() as f64;
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = row
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        let scale = 1.0 / (var + f64::from(EPS)).sqrt();
        row.iter().map(|&v| (f64::from(v) - mean) * scale).collect()
    }

    fn op(len: usize) -> AxisNorm {
        AxisNorm {
            axis: 0,
            recip: 1.0 / len as f32,
            eps: EPS,
            affine: None,
        }
    }

    /// A scale near 1 and a bias near 0 for each of `len` positions, as a
    /// trained LayerNorm has.
    fn affine(len: usize) -> Affine {
        Affine {
            scale: (0..len).map(|i| 1.0 + 0.1 * (i as f32).sin()).collect(),
            bias: (0..len).map(|i| 0.05 * (i as f32).cos()).collect(),
        }
    }

    /// Rows like the encoder's (a mean off zero, a spread, an outlier), of
    /// lengths around the lanes and the model's 768: within a few units in
    /// the last place of the f32 inputs' own rounding.
    #[test]
    fn rows_match_the_f64_norm() {
        let mut rnd = uniform(21);
        for len in [2usize, 15, 16, 17, 64, 768, 1001] {
            for (offset, spread) in [(0.0f32, 1.0f32), (5.0, 3.0), (-40.0, 0.5)] {
                let mut row: Vec<f32> = (0..len).map(|_| offset + rnd() * spread).collect();
                row[len / 2] += 20.0 * spread;
                let want = reference(&row);
                op(len).row(&mut row);
                // The mean's rounding, a unit of |offset| + spread, over the
                // row's deviation bounds what any f32 norm can keep.
                for (i, (&got, &want)) in row.iter().zip(&want).enumerate() {
                    let error = (f64::from(got) - want).abs();
                    assert!(
                        error <= 1e-5 * (1.0 + f64::from(offset.abs() / spread)),
                        "len {len}, offset {offset}, [{i}]: {got} against {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_constant_row_gives_zeros_and_a_nan_stays_in_its_row() {
        let mut rows = vec![3.25f32; 40];
        rows[25] = f32::NAN;
        Blocks {
            xs: &mut rows,
            len: 20,
            inner: 1,
            op: &op(20),
        }
        .run();
        assert!(rows[..20].iter().all(|&v| v == 0.0), "{rows:?}");
        assert!(rows[20..].iter().all(|v| v.is_nan()));
    }

    /// The loops [`super::super::wide`] builds for this CPU give the bits of
    /// the baseline build, along rows and down columns (70 of them: a full
    /// group and a part).
    #[test]
    fn wide_blocks_give_the_baseline_bits() {
        let mut rnd = uniform(23);
        for len in [1usize, 7, 16, 33, 768] {
            for inner in [1usize, 70] {
                let data: Vec<f32> = (0..len * inner * 3).map(|_| 2.0 + rnd() * 6.0).collect();
                for scaled in [false, true] {
                    let mut op = op(len);
                    op.affine = scaled.then(|| affine(len));
                    let mut plain = data.clone();
                    Blocks {
                        xs: &mut plain,
                        len,
                        inner,
                        op: &op,
                    }
                    .run();
                    let mut vector = data.clone();
                    super::super::wide(Blocks {
                        xs: &mut vector,
                        len,
                        inner,
                        op: &op,
                    });
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert!(
                        bits(&vector) == bits(&plain),
                        "len {len}, inner {inner}, scaled {scaled}"
                    );
                }
            }
        }
    }

    /// tract's lowered LayerNorm over `len` (`T` symbolic, as gigastt loads),
    /// optimised: of `[1, T, len]` over the last axis, or of `[1, len, T]`
    /// over the middle one (the conv module's), then scaled and shifted by
    /// `affine`. With `shared_mean` the mean is also an output, so the chain
    /// must stay.
    fn norm_graph(
        len: usize,
        last: bool,
        shared_mean: bool,
        affine: Option<&Affine>,
    ) -> TypedModel {
        let mut model = TypedModel::default();
        let t: TDim = model.symbols.sym("T").into();
        let (shape, axis) = if last {
            (tvec![1.into(), t, len.to_dim()], 2)
        } else {
            (tvec![1.into(), len.to_dim(), t], 1)
        };
        let x = model.add_source("x", f32::fact(shape)).expect("x");
        let reduce = Reduce {
            axes: tvec![axis],
            reducer: Reducer::Sum,
        };
        let sum = model.wire_node("sum", reduce, &[x]).expect("sum");
        let recip = model
            .add_const("recip", tensor3(&[[[1.0 / len as f32]]]))
            .expect("recip");
        let mean = model
            .wire_node("mean", math::mul(), &[sum[0], recip])
            .expect("mean");
        let d = model.wire_node("d", math::sub(), &[x, mean[0]]).expect("d");
        let rms = RmsNorm {
            axis,
            eps: tensor0(EPS).into_arc_tensor(),
        };
        let mut out = model.wire_node("norm", rms, &d).expect("norm");
        if let Some(a) = affine {
            let along = |v: &[f32]| {
                let shape = if last { [1, 1, len] } else { [1, len, 1] };
                Tensor::from_shape(&shape, v).expect("along")
            };
            let scale = model.add_const("scale", along(&a.scale)).expect("scale");
            let bias = model.add_const("bias", along(&a.bias)).expect("bias");
            out = model
                .wire_node("scaled", math::mul(), &[out[0], scale])
                .expect("scaled");
            out = model
                .wire_node("shifted", math::add(), &[out[0], bias])
                .expect("shifted");
        }
        let mut outputs = out.to_vec();
        if shared_mean {
            outputs.push(mean[0]);
        }
        model.select_output_outlets(&outputs).expect("outputs");
        model.into_optimized().expect("optimised")
    }

    /// The chain replaced in tract's optimised graph, against tract and f64,
    /// over either axis, with and without a scale and bias, with one and two
    /// threads in the pool: close, and the same bits.
    #[test]
    fn close_to_tract_s_layer_norm_on_any_pool() {
        let (frames, len) = (300usize, 768usize);
        let mut rnd = uniform(25);
        let data: Vec<f32> = (0..frames * len).map(|_| 1.5 + rnd() * 4.0).collect();
        let trained = affine(len);
        for (last, scaled) in [(true, false), (false, false), (true, true), (false, true)] {
            let affine = scaled.then_some(&trained);
            let shape = if last {
                [1, frames, len]
            } else {
                [1, len, frames]
            };
            let input = Tensor::from_shape(&shape, &data).expect("input");
            let plain = norm_graph(len, last, false, affine);
            let mut replaced = plain.clone();
            let done = replace_layer_norms(&mut replaced).expect("replace");
            assert_eq!(done, (1, usize::from(scaled)));
            let replaced = replaced.into_compact().expect("compact");
            assert_eq!(replaced.nodes.len(), 2, "{replaced}");
            let expected = run_f32(&plain, &input, 1);
            // The f64 norm of each row (or column), laid out as the input.
            let mut want = vec![0f64; data.len()];
            for f in 0..frames {
                let index = |c: usize| if last { f * len + c } else { c * frames + f };
                let row: Vec<f32> = (0..len).map(|c| data[index(c)]).collect();
                for (c, v) in reference(&row).into_iter().enumerate() {
                    want[index(c)] = match affine {
                        Some(a) => v * f64::from(a.scale[c]) + f64::from(a.bias[c]),
                        None => v,
                    };
                }
            }
            let mut serial = None;
            for threads in [1, 2] {
                let got = run_f32(&replaced, &input, threads);
                for (i, ((&g, &e), &w)) in got.iter().zip(&expected).zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 && (f64::from(g) - w).abs() <= 1e-5,
                        "last {last}, scaled {scaled}, {threads} threads, [{i}]: {g}, \
                         tract's {e}, f64 {w}"
                    );
                }
                let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                assert_eq!(*serial.get_or_insert_with(|| bits.clone()), bits);
            }
        }
    }

    /// A chain whose mean something else reads stays tract's.
    #[test]
    fn a_shared_mean_is_left_alone() {
        for last in [true, false] {
            let mut model = norm_graph(16, last, true, None);
            assert_eq!(replace_layer_norms(&mut model).expect("replace"), (0, 0));
        }
    }
}
