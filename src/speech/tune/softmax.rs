//! The attention softmax, one row at a time on clean vector state.
//!
//! tract's f32 `Softmax` walks each row of 250 with three kernel calls (max,
//! exp-and-sum, scale) and runs its own glue between them with the AVX upper
//! state left dirty by the kernels. On the Intel Xeon of docs/perf.md's ninth
//! round that cost 5–7 ms per layer (int8, 10 s: 83 ms of 880). [`RowSoftmax`]
//! runs whole rows in [`super::wide`] loops, rows split across the pool.
//!
//! It changes bits (as the LayerNorm, [`super::norm`], does): tract's `exp` is
//! its own polynomial, inside its kernels. Ours ([`exp_neg`]) is Cephes' single
//! precision one, within two units in the last place of the true value. The
//! tests bound each row against f64, the fp32 encoder output within 1e-5 of
//! tract's, the int8 one no further from fp32 than tract's own int8, and the
//! golden token ids. Each element takes the same operations at every vector
//! width, and the sum the same order (fixed lanes), so the bits do not depend
//! on the CPU.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

use super::broadcast::row_major;

/// Replaces each f32 `Softmax` over the last axis of an optimised graph with
/// [`RowSoftmax`]. Returns how many were replaced.
pub fn replace_softmaxes(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        let Some(softmax) = node.op_as::<Softmax>() else {
            continue;
        };
        let fact = model.outlet_fact(node.inputs[0])?;
        let Some(last) = fact.rank().checked_sub(1) else {
            continue;
        };
        if softmax.kind != SoftmaxKind::Softmax
            || softmax.quant_output_dt.is_some()
            || fact.datum_type != DatumType::F32
            || softmax.axes.as_slice() != [last]
        {
            continue;
        }
        let op = RowSoftmax {
            original: softmax.clone(),
        };
        let inputs = node.inputs.clone();
        if super::replace_node(model, id, op, &inputs)? {
            done += 1;
        }
    }
    Ok(done)
}

/// Softmax over the last axis of an f32 tensor, row by row. Tensors it does
/// not fit at run time (not row-major) go to the tract op it replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSoftmax {
    original: Softmax,
}

impl Op for RowSoftmax {
    fn name(&self) -> StaticName {
        "RowSoftmax".into()
    }

    op_as_typed_op!();
}

impl EvalOp for RowSoftmax {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "RowSoftmax on {} inputs", inputs.len());
        let input = &inputs[0];
        let len = input.shape().last().copied().unwrap_or(0);
        if input.datum_type() != DatumType::F32 || len == 0 || !row_major(input) {
            return self.original.eval(ctx, inputs);
        }
        let mut out = args_1!(inputs).into_tensor();
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let xs = view.as_slice_mut::<f32>()?;
            let total = xs.len();
            tract_linalg::multithread::par_chunks_mut(xs, len, total, |_, chunk| {
                super::wide(Rows { chunk, len });
                Ok(())
            })?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for RowSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.original.output_facts(inputs)
    }

    as_op!();
}

/// [`softmax`] of each row of `len` in `chunk`, as [`super::wide`] work.
struct Rows<'a> {
    chunk: &'a mut [f32],
    len: usize,
}

impl super::Wide for Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for row in self.chunk.chunks_exact_mut(self.len) {
            softmax(row);
        }
    }
}

/// Lanes of the maximum and the sum: fixed, so that their order, and the
/// bits, do not depend on the vector width.
const LANES: usize = 16;

/// `exp(x - max) / sum` over `row`, in place, in four passes over a row that
/// stays in the L1 cache: each is a plain loop the vectoriser takes at any
/// width.
#[inline(always)]
fn softmax(row: &mut [f32]) {
    let max = row_max(row);
    for x in row.iter_mut() {
        *x = exp_neg(*x - max);
    }
    let scale = 1.0 / row_sum(row);
    for x in row.iter_mut() {
        *x *= scale;
    }
}

/// The largest element of `row`, NaNs skipped (they come through the `exp`).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    lanes
        .into_iter()
        .chain(rest.iter().copied())
        .fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m })
}

/// The sum of `row`, in [`LANES`] running sums added pairwise at the end.
#[inline(always)]
pub(super) fn row_sum(row: &[f32]) -> f32 {
    lane_sum(row, |v| v)
}

/// The sum of `f` over `row`, in [`LANES`] running sums added pairwise at the
/// end, then the elements past the last full chunk in order.
#[inline(always)]
pub(super) fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (s, &v) in lanes.iter_mut().zip(chunk) {
            *s += f(v);
        }
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    rest.iter().fold(lanes[0], |s, &v| s + f(v))
}

/// Below this `exp_neg` gives 0: e^-80 is 1.8e-35, and every quotient of a
/// larger term by a sum of fewer than 1500 terms stays a normal float, so the
/// softmax never makes subnormals (they cost an assist per element on x86, in
/// this pass and in the matmul that reads the probabilities).
const EXP_CUTOFF: f32 = -80.0;

/// `e^x` for `x <= 0` (NaN stays NaN), Cephes' `expf`: `x = n ln 2 + r` with
/// `|r| <= ln 2 / 2`, `e^r` by a degree-7 polynomial, `2^n` built in the
/// exponent bits. Plain multiplications and additions (no FMA), so every
/// vector width and the scalar build give the same bits.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 in two parts, the first with 9 significant bits so that `n * LN2_HI`
    // is exact for every n here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        // Cephes writes 5.0000001201e-1, which is 0.5 in f32.
        0.5,
    ];
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * r + c;
    }
    let y = p * (r * r) + r + 1.0;
    // n in [-116, 0] here: `t`'s bits are ROUND's plus n, and n + 127 is a
    // normal float's biased exponent.
    let pow2 = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if x < EXP_CUTOFF { 0.0 } else { y * pow2 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speech::tune::Wide;
    use crate::speech::tune::tests::{run_f32, uniform};

    /// Relative error of `got` against the f64 value `want`.
    fn relative(got: f32, want: f64) -> f64 {
        ((f64::from(got) - want) / want).abs()
    }

    /// Two units in the last place of a float in [1, 2).
    const TWO_ULP: f64 = 2.0 * f32::EPSILON as f64;

    #[test]
    fn exp_is_within_two_ulp_down_to_the_cutoff() {
        let steps = 1_000_000;
        let mut worst = 0f64;
        for i in 0..=steps {
            let x = EXP_CUTOFF * i as f32 / steps as f32;
            worst = worst.max(relative(exp_neg(x), f64::from(x).exp()));
        }
        assert!(worst <= TWO_ULP, "worst relative error {worst:e}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(-0.0), 1.0);
        assert_eq!(exp_neg(EXP_CUTOFF - 1e-3), 0.0);
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
        assert!(exp_neg(f32::NAN).is_nan());
    }

    /// Softmax of `row` in f64, from the f32 differences `x - max` (their
    /// rounding is the input's, in any f32 softmax).
    fn reference(row: &[f32]) -> Vec<f64> {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let exps: Vec<f64> = row.iter().map(|&v| f64::from(v - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.iter().map(|e| e / sum).collect()
    }

    /// Rows like the attention's: logits spread over +-`spread`, some masked
    /// to -inf, of lengths around the lanes and the 10 s row of 250.
    #[test]
    fn rows_match_the_f64_softmax() {
        let mut rnd = uniform(3);
        for len in [1usize, 2, 15, 16, 17, 250, 251, 625] {
            for spread in [0.5f32, 8.0, 100.0] {
                let mut row: Vec<f32> = (0..len).map(|_| rnd() * spread).collect();
                if len > 16 {
                    row[len / 3] = f32::NEG_INFINITY;
                }
                let want = reference(&row);
                softmax(&mut row);
                let mut sum = 0f64;
                for (i, (&got, &want)) in row.iter().zip(&want).enumerate() {
                    sum += f64::from(got);
                    if want < 1e-34 {
                        // Below the cutoff: 0, or the tiny value itself.
                        assert!(
                            got >= 0.0 && f64::from(got) < 1e-33,
                            "len {len}, [{i}]: {got:e}"
                        );
                    } else {
                        let error = relative(got, want);
                        assert!(
                            error <= 4.0 * TWO_ULP,
                            "len {len}, spread {spread}, [{i}]: {error:e}"
                        );
                    }
                    assert!(
                        got == 0.0 || got.is_normal(),
                        "len {len}, [{i}]: subnormal {got:e}"
                    );
                }
                assert!((sum - 1.0).abs() < 1e-5, "len {len}: sums to {sum}");
            }
        }
    }

    #[test]
    fn a_nan_makes_its_row_nan_and_leaves_the_others() {
        let mut rows = vec![0.5f32; 40];
        rows[3] = f32::NAN;
        Rows {
            chunk: &mut rows,
            len: 20,
        }
        .run();
        assert!(rows[..20].iter().all(|v| v.is_nan()));
        assert!(rows[20..].iter().all(|&v| v == 0.05));
    }

    /// The loops [`super::super::wide`] builds for this CPU give the bits of
    /// the same loops built for baseline x86-64 (`--release` compares vector
    /// code; CI runs the module both ways).
    #[test]
    fn wide_rows_give_the_baseline_bits() {
        let mut rnd = uniform(5);
        for len in [1usize, 7, 16, 33, 250, 1000] {
            let data: Vec<f32> = (0..len * 9).map(|_| rnd() * 60.0).collect();
            let mut plain = data.clone();
            Rows {
                chunk: &mut plain,
                len,
            }
            .run();
            let mut vector = data;
            super::super::wide(Rows {
                chunk: &mut vector,
                len,
            });
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&vector) == bits(&plain), "len {len}");
        }
    }

    /// A graph softmax over `axis` of `[2, 3, rows, len]`, optimised by tract.
    fn softmax_graph(rows: usize, len: usize, axis: usize) -> TypedModel {
        let mut model = TypedModel::default();
        let a = model
            .add_source("a", f32::fact([2, 3, rows, len]))
            .expect("a");
        let op = Softmax {
            axes: tvec![axis],
            quant_output_dt: None,
            kind: SoftmaxKind::Softmax,
        };
        let s = model.wire_node("s", op, &[a]).expect("softmax");
        model.select_output_outlets(&s).expect("outputs");
        model.into_optimized().expect("optimised")
    }

    /// tract's softmax against the graph with it replaced, on one and two
    /// threads: within a few units in the last place, and the same bits on
    /// either pool.
    #[test]
    fn close_to_tract_s_softmax_on_any_pool() {
        let (rows, len) = (37usize, 250usize);
        let mut rnd = uniform(9);
        let data: Vec<f32> = (0..6 * rows * len).map(|_| rnd() * 20.0).collect();
        let input = Tensor::from_shape(&[2, 3, rows, len], &data).expect("input");
        let plain = softmax_graph(rows, len, 3);
        let mut replaced = plain.clone();
        assert_eq!(replace_softmaxes(&mut replaced).expect("replace"), 1);
        let replaced = replaced.into_compact().expect("compact");
        assert!(!replaced.nodes.iter().any(|n| n.op_is::<Softmax>()));
        let expected = run_f32(&plain, &input, 1);
        let mut serial = None;
        for threads in [1, 2] {
            let got = run_f32(&replaced, &input, threads);
            for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
                let close = (g - e).abs() <= 8.0 * f32::EPSILON * e.abs() || (g - e).abs() < 1e-30;
                assert!(
                    close,
                    "{threads} threads, [{i}]: {g:e} against tract's {e:e}"
                );
            }
            let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            assert_eq!(*serial.get_or_insert_with(|| bits.clone()), bits);
        }
    }

    /// A softmax over another axis than the last stays tract's.
    #[test]
    fn other_axes_are_left_alone() {
        let mut model = softmax_graph(5, 8, 2);
        assert_eq!(replace_softmaxes(&mut model).expect("replace"), 0);
    }
}
