//! GigaAM's depthwise convolutions (768 channels, 5 taps, padding 2) as one
//! direct loop per channel.
//!
//! With a symbolic time axis tract lowers a depthwise `Conv` to an im2col and a
//! batched matmul of 768 one-row products, 1 x 5 by 5 x T each (fp32 10 s: 84 ms
//! of 710 at one thread; int8 45 ms of 450). [`Depthwise1d`] computes the same
//! sums directly, channel rows split across the pool:
//!
//! - int8 (`Conv` with i32 output over u8/i8 input): integer sums of
//!   `w * (x - x_zero_point)`, padding contributing zero as in ONNX
//!   `ConvInteger`. Integer addition is exact in any order.
//! - fp32: tract's kernel clears its accumulator to +0, adds each tap with a
//!   fused multiply-add in tap order, padding read as 0.0, then adds the bias.
//!   `f32::mul_add` rounds once, like the kernel's FMA, and the taps go in the
//!   same order, so the bits are the same.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::nn::DataFormat;

/// Replaces the depthwise 1-D convolutions of a decluttered graph. Returns how
/// many were replaced.
pub fn replace_depthwise_convs(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in 0..model.nodes.len() {
        let Some(op) = Depthwise1d::for_node(model, &model.nodes[id])? else {
            continue;
        };
        let node = &model.nodes[id];
        let inputs: TVec<OutletId> = if op.quantized {
            tvec![node.inputs[0], node.inputs[3]]
        } else {
            tvec![node.inputs[0]]
        };
        if super::replace_node(model, id, op, &inputs)? {
            done += 1;
        }
    }
    Ok(done)
}

/// A depthwise convolution over the last axis of `[N, C, T]`, stride 1, no
/// dilation, `taps` `[C, K]` (f32 or i8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Depthwise1d {
    taps: Arc<Tensor>,
    /// Per-channel bias (fp32 only).
    bias: Option<Arc<Tensor>>,
    pad_before: usize,
    pad_after: usize,
    /// int8: inputs are the u8/i8 signal and its i32 zero point; output i32.
    quantized: bool,
}

/// The value of a `Const` input.
fn konst(model: &TypedModel, outlet: OutletId) -> Option<Arc<Tensor>> {
    model
        .node(outlet.node)
        .op_as::<Const>()
        .map(|c| c.val().clone())
}

/// Whether `t` is a constant whose every element, as f64, is `v`.
fn all_equal(t: &Tensor, v: f64) -> bool {
    t.cast_to::<f64>()
        .ok()
        .and_then(|c| {
            c.try_as_plain_ram()
                .ok()
                .and_then(|r| r.as_slice::<f64>().ok().map(|s| s.iter().all(|x| *x == v)))
        })
        .unwrap_or(false)
}

impl Depthwise1d {
    fn for_node(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Depthwise1d>> {
        let Some(conv) = node.op_as::<Conv>() else {
            return Ok(None);
        };
        let spec = &conv.pool_spec;
        let channels = spec.input_channels;
        let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&x| x == 1));
        let (pad_before, pad_after) = match &spec.padding {
            PaddingSpec::Explicit(b, a) if b.len() == 1 && a.len() == 1 => (b[0], a[0]),
            PaddingSpec::Valid => (0, 0),
            _ => return Ok(None),
        };
        if spec.data_format != DataFormat::NCHW
            || spec.kernel_shape.len() != 1
            || !ones(&spec.strides)
            || !ones(&spec.dilations)
            || conv.kernel_fmt != KernelFormat::OIHW
            || conv.group != channels
            || spec.output_channels != channels
            || channels < 2
        {
            return Ok(None);
        }
        let k = spec.kernel_shape[0];
        let x = model.outlet_fact(node.inputs[0])?;
        if x.rank() != 3 || x.shape[1] != channels.to_dim() {
            return Ok(None);
        }
        let Some(taps) = node.inputs.get(1).and_then(|i| konst(model, *i)) else {
            return Ok(None);
        };
        if taps.shape() != [channels, 1, k] {
            return Ok(None);
        }
        let taps = taps
            .clone()
            .into_tensor()
            .into_shape(&[channels, k])?
            .into_arc_tensor();
        match (conv.q_params, x.datum_type) {
            (None, DatumType::F32)
                if taps.datum_type() == DatumType::F32
                    && taps.try_as_plain_ram().is_ok_and(|r| {
                        r.as_slice::<f32>()
                            .is_ok_and(|w| w.iter().all(|v| v.is_finite()))
                    }) =>
            {
                let bias = match node.inputs.get(2) {
                    None => None,
                    Some(b) => match konst(model, *b) {
                        Some(b) if b.datum_type() == DatumType::F32 && b.len() == channels => {
                            Some(b.into_tensor().into_shape(&[channels])?.into_arc_tensor())
                        }
                        _ => return Ok(None),
                    },
                };
                Ok(Some(Depthwise1d {
                    taps,
                    bias,
                    pad_before,
                    pad_after,
                    quantized: false,
                }))
            }
            (Some(DatumType::I32), DatumType::U8 | DatumType::I8)
                if taps.datum_type() == DatumType::I8 && node.inputs.len() == 9 =>
            {
                // [x, taps, bias, x_zp, x_scale, taps_zp, taps_scale, y_zp, y_scale]:
                // only x and its zero point may vary; bias and the other zero
                // points zero, scales one (an i32 output ignores them anyway).
                let fixed = [(2, 0.0), (4, 1.0), (5, 0.0), (6, 1.0), (7, 0.0), (8, 1.0)];
                let plain = fixed.iter().all(|&(ix, v)| {
                    konst(model, node.inputs[ix]).is_some_and(|t| all_equal(&t, v))
                });
                let zp = model.outlet_fact(node.inputs[3])?;
                if !plain || zp.datum_type != DatumType::I32 || zp.shape.volume() != 1.to_dim() {
                    return Ok(None);
                }
                Ok(Some(Depthwise1d {
                    taps,
                    bias: None,
                    pad_before,
                    pad_after,
                    quantized: true,
                }))
            }
            _ => Ok(None),
        }
    }

    fn k(&self) -> usize {
        self.taps.shape()[1]
    }

    fn output_len(&self, t: usize) -> TractResult<usize> {
        (t + self.pad_before + self.pad_after)
            .checked_sub(self.k() - 1)
            .context("input shorter than the kernel")
    }

    /// `out[c, t] = finish(c, sum over taps j of taps[c, j] * x[c, t + j - pad_before])`,
    /// accumulated by `step` in tap order into `out` (zeroed), over the taps
    /// that fall inside `x`.
    fn run<X: Datum + Copy, W: Datum + Copy, A: Datum + Copy>(
        &self,
        x: &Tensor,
        out: &mut Tensor,
        widen: impl Fn(X) -> A + Sync + Send,
        step: impl Fn(A, W, A) -> A + Sync + Send,
        finish: impl Fn(usize, A) -> A + Sync + Send,
    ) -> TractResult<()> {
        let (channels, t_in) = (x.shape()[1], x.shape()[2]);
        let t_out = out.shape()[2];
        let k = self.k();
        let x = x.try_as_plain_ram()?;
        let x = x.as_slice::<X>()?;
        let taps = self.taps.try_as_plain_ram()?;
        let taps = taps.as_slice::<W>()?;
        let mut view = out.try_as_plain_ram_mut()?;
        let out = view.as_slice_mut::<A>()?;
        if out.is_empty() {
            return Ok(());
        }
        let total = out.len() * k;
        let layout = Layout {
            x,
            taps,
            channels,
            t_in,
            t_out,
            k,
            pad_before: self.pad_before,
        };
        tract_linalg::multithread::par_chunks_mut(out, t_out, total, |first_row, chunk| {
            let fill = Fill {
                layout: &layout,
                first_row,
                chunk,
                widen: &widen,
                step: &step,
                finish: &finish,
            };
            // fp32 wide: each `mul_add` one FMA, 35 -> 3 ms an encoder at one
            // thread. The int8 sums ran slower wide (5 against 3 ms): rows of
            // 250 leave most of a 64-element unrolled body to its scalar tail.
            if self.quantized {
                super::clear_avx_upper();
                super::Wide::run(fill);
            } else {
                super::wide(fill);
            }
            Ok(())
        })
    }
}

/// Where [`Depthwise1d::run`] reads from, for the rows one thread fills.
struct Layout<'a, X, W> {
    x: &'a [X],
    taps: &'a [W],
    channels: usize,
    t_in: usize,
    t_out: usize,
    k: usize,
    pad_before: usize,
}

/// Output rows `first_row..` into `chunk`, as [`super::wide`] work.
struct Fill<'a, X, W, A, Widen, Step, Finish> {
    layout: &'a Layout<'a, X, W>,
    first_row: usize,
    chunk: &'a mut [A],
    widen: &'a Widen,
    step: &'a Step,
    finish: &'a Finish,
}

impl<X, W, A, Widen, Step, Finish> super::Wide for Fill<'_, X, W, A, Widen, Step, Finish>
where
    X: Copy,
    W: Copy,
    A: Copy,
    Widen: Fn(X) -> A,
    Step: Fn(A, W, A) -> A,
    Finish: Fn(usize, A) -> A,
{
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let Fill {
            layout,
            first_row,
            chunk,
            widen,
            step,
            finish,
        } = self;
        let (t_in, k, pb) = (layout.t_in, layout.k, layout.pad_before);
        for (i, row) in chunk.chunks_exact_mut(layout.t_out).enumerate() {
            let r = first_row + i;
            let c = r % layout.channels;
            let xs = &layout.x[r * t_in..(r + 1) * t_in];
            // Tap by tap over the outputs it reaches: each output still
            // takes its taps in order. Padded taps are skipped: they add
            // nothing (int8: `x_zero_point - x_zero_point`; fp32: `w * 0.0`
            // added to an accumulator that is never -0.0).
            for (j, &w) in layout.taps[c * k..(c + 1) * k].iter().enumerate() {
                let lo = pb.saturating_sub(j);
                let hi = (t_in + pb).saturating_sub(j).min(layout.t_out);
                if lo >= hi {
                    continue;
                }
                let start = lo + j - pb;
                for (y, &v) in row[lo..hi].iter_mut().zip(&xs[start..start + (hi - lo)]) {
                    *y = step(*y, w, widen(v));
                }
            }
            for y in row.iter_mut() {
                *y = finish(c, *y);
            }
        }
    }
}

impl Op for Depthwise1d {
    fn name(&self) -> StaticName {
        "Depthwise1d".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} taps, padding {}/{}, {}",
            self.k(),
            self.pad_before,
            self.pad_after,
            if self.quantized { "int8" } else { "f32" }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Depthwise1d {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        ensure!(
            x.rank() == 3,
            "Depthwise1d wants [N, C, T], got {:?}",
            x.shape()
        );
        ensure!(x.shape()[1] == self.taps.shape()[0], "channel count");
        let shape = [x.shape()[0], x.shape()[1], self.output_len(x.shape()[2])?];
        if self.quantized {
            let zp = inputs[1].cast_to_scalar::<i32>()?;
            let mut out = Tensor::zero::<i32>(&shape)?;
            let step = |acc: i32, w: i8, v: i32| acc + i32::from(w) * v;
            let finish = |_, acc| acc;
            match x.datum_type() {
                DatumType::U8 => {
                    self.run::<u8, i8, i32>(x, &mut out, |v| i32::from(v) - zp, step, finish)?
                }
                DatumType::I8 => {
                    self.run::<i8, i8, i32>(x, &mut out, |v| i32::from(v) - zp, step, finish)?
                }
                dt => bail!("Depthwise1d on {dt:?}"),
            }
            Ok(tvec!(out.into_tvalue()))
        } else {
            let mut out = Tensor::zero::<f32>(&shape)?;
            let bias_view = self
                .bias
                .as_ref()
                .map(|b| b.try_as_plain_ram())
                .transpose()?;
            let bias = bias_view
                .as_ref()
                .map(|v| v.as_slice::<f32>())
                .transpose()?;
            self.run::<f32, f32, f32>(
                x,
                &mut out,
                |v| v,
                |acc, w, v| w.mul_add(v, acc),
                |c, acc| bias.map_or(acc, |b| acc + b[c]),
            )?;
            Ok(tvec!(out.into_tvalue()))
        }
    }
}

impl TypedOp for Depthwise1d {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(x.rank() == 3);
        let t =
            x.shape[2].clone() + (self.pad_before + self.pad_after) as i64 - (self.k() as i64 - 1);
        let dt = if self.quantized {
            DatumType::I32
        } else {
            DatumType::F32
        };
        Ok(tvec!(dt.fact([x.shape[0].clone(), x.shape[1].clone(), t])))
    }

    as_op!();
}
