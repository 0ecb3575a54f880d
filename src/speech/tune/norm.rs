//! LayerNorm's normalisation as one op over its axis.
//!
//! tract lowers each `LayerNormalization` to four nodes: a `Reduce<Sum>` over
//! the normalised axis, its product by `1/n`, an `OptSubByScalar` and an
//! `RmsNorm` (then its own pass for the scale and bias, where they are not 1
//! and 0). The sum is a scalar walk on one thread, and every node reads or
//! writes the whole tensor: 96 of them cost ~29 ms of a 10 s int8 run on the
//! Intel Xeon of docs/perf.md. [`AxisNorm`] does the four in one
//! [`super::wide`] loop nest per row, which stays in the L1 cache for its
//! three passes (mean, variance, scale). The conv module's norm is over the
//! channels of `[1, 768, T]`, not the last axis: there the same passes run
//! down blocks of columns.
//!
//! Its sums are taken in fixed lanes (columns: in row order), not in tract's
//! kernel order, so it is not bit-exact: it is applied with
//! [`super::Exactness::Close`] only, under the same closeness tests as the
//! softmax.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::{OptBinByScalar, OptBinUnicast, TypedBinOp};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};

use super::softmax::{lane_sum, row_sum};

/// Replaces each f32 `Reduce<Sum>` → `Mul` by a constant → `Sub` → `RmsNorm`
/// chain over one axis (tract's lowered LayerNorm) with [`AxisNorm`]. Returns
/// how many were replaced.
pub fn replace_layer_norms(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in 0..model.nodes.len() {
        let Some((input, op)) = AxisNorm::for_node(model, &model.nodes[id])? else {
            continue;
        };
        if super::replace_node(model, id, op, &[input])? {
            done += 1;
        }
    }
    Ok(done)
}

/// `(x - mean) / sqrt(mean((x - mean)²) + eps)` over one axis of an f32
/// tensor, with `mean = sum * recip` as tract's lowering computes it.
#[derive(Debug, Clone, PartialEq)]
pub struct AxisNorm {
    axis: usize,
    /// The constant tract multiplies the sum by (`1/n` in f32).
    recip: f32,
    eps: f32,
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
        Ok(Some((x, AxisNorm { axis, recip, eps })))
    }
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
        for x in row.iter_mut() {
            *x *= scale;
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
        for row in block.chunks_exact_mut(inner) {
            for (v, &scale) in row[range.clone()].iter_mut().zip(scales.iter()) {
                *v *= scale;
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
                let mut plain = data.clone();
                let op = op(len);
                Blocks {
                    xs: &mut plain,
                    len,
                    inner,
                    op: &op,
                }
                .run();
                let mut vector = data;
                super::super::wide(Blocks {
                    xs: &mut vector,
                    len,
                    inner,
                    op: &op,
                });
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(bits(&vector) == bits(&plain), "len {len}, inner {inner}");
            }
        }
    }

    /// tract's lowered LayerNorm over `len` (`T` symbolic, as gigastt loads),
    /// optimised: of `[1, T, len]` over the last axis, or of `[1, len, T]`
    /// over the middle one (the conv module's). With `shared_mean` the mean
    /// is also an output, so the chain must stay.
    fn norm_graph(len: usize, last: bool, shared_mean: bool) -> TypedModel {
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
        let out = model.wire_node("norm", rms, &d).expect("norm");
        let mut outputs = out.to_vec();
        if shared_mean {
            outputs.push(mean[0]);
        }
        model.select_output_outlets(&outputs).expect("outputs");
        model.into_optimized().expect("optimised")
    }

    /// The chain replaced in tract's optimised graph, against tract and f64,
    /// over either axis, with one and two threads in the pool: close, and the
    /// same bits.
    #[test]
    fn close_to_tract_s_layer_norm_on_any_pool() {
        let (frames, len) = (300usize, 768usize);
        let mut rnd = uniform(25);
        let data: Vec<f32> = (0..frames * len).map(|_| 1.5 + rnd() * 4.0).collect();
        for last in [true, false] {
            let shape = if last {
                [1, frames, len]
            } else {
                [1, len, frames]
            };
            let input = Tensor::from_shape(&shape, &data).expect("input");
            let plain = norm_graph(len, last, false);
            let mut replaced = plain.clone();
            assert_eq!(replace_layer_norms(&mut replaced).expect("replace"), 1);
            let replaced = replaced.into_compact().expect("compact");
            assert_eq!(replaced.nodes.len(), 2, "{replaced}");
            let expected = run_f32(&plain, &input, 1);
            // The f64 norm of each row (or column), laid out as the input.
            let mut want = vec![0f64; data.len()];
            for f in 0..frames {
                let index = |c: usize| if last { f * len + c } else { c * frames + f };
                let row: Vec<f32> = (0..len).map(|c| data[index(c)]).collect();
                for (c, v) in reference(&row).into_iter().enumerate() {
                    want[index(c)] = v;
                }
            }
            let mut serial = None;
            for threads in [1, 2] {
                let got = run_f32(&replaced, &input, threads);
                for (i, ((&g, &e), &w)) in got.iter().zip(&expected).zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 && (f64::from(g) - w).abs() <= 1e-5,
                        "last {last}, {threads} threads, [{i}]: {g}, tract's {e}, f64 {w}"
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
            let mut model = norm_graph(16, last, true);
            assert_eq!(replace_layer_norms(&mut model).expect("replace"), 0);
        }
    }
}
