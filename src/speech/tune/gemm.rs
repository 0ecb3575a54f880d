//! The fp32 weight matmuls on faer's kernels.
//!
//! tract-linalg's f32 kernels walk the whole of `k` for every tile of the
//! output, with no blocking for the caches: on the Zen 4 of docs/perf.md's
//! nineteenth round its 16x12 kernel ran GigaAM's weight matmuls at 36–38 G
//! multiply-accumulates a second on one core, where faer (a BLIS-style
//! blocked GEMM that packs both operands per cache block and picks AVX-512 or
//! AVX2 at run time) runs the same shapes at 49–55 G, and 93–108 G on two.
//! Those matmuls are 85 % of the fp32 encoder.
//!
//! [`replace_weight_matmuls`] takes each optimised fp32 matmul of constant
//! weights by one activation matrix, its weights as read
//! ([`super::plain::PlainWeights`], where [`super::plain::keep`] ran) or
//! unpacked once from tract's panels, and runs it as a [`WeightMatMul`]:
//! faer's product, then what tract fused after it (a bias per output
//! feature, a scale, a clamp) in one pass. The bias is written
//! into the output before the product adds to it, as tract adds it after the
//! sum. It changes bits (faer sums `k` in its own blocks), so it runs only
//! with [`super::Exactness::Close`]; the tests hold the fp32 encoder output
//! within [`super::tests`]' `CLOSE` of tract's, and the golden token ids.
//!
//! The weights are laid out once, at load, in blocks of [`WEIGHT_BLOCK`]
//! output features, each block contiguous (in the weight's own tensor, which
//! nothing else holds by then), and each block is one faer product (the
//! blocks split over the pool, each on one thread, so the bits do not depend
//! on the pool).
//! faer packs its left operand (here the weights) on every call, reading it
//! a column of the kernel's rows at a time; from a whole `k x m` matrix that
//! read is strided by `m` and ran the short pieces' products (`n` ~115
//! frames) at 43–46 G multiply-accumulates a second on one core, against
//! 48–51 G from contiguous blocks (docs/perf.md, twenty-second round).

use std::fmt;

use tract_linalg::BinOp;
use tract_linalg::mmm::{EagerPackedInput, MMMInputValue};
use tract_linalg::multithread::par_chunks_mut;
use tract_linalg::pack::PackedFormat;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, ProtoFusedSpec};

use super::plain::PlainWeights;

/// Replaces each fp32 matmul of constant weights by one unbatched activation
/// matrix in an optimised graph with a [`WeightMatMul`], when every op tract
/// fused into it is one [`Fused`] knows (a residual added in the matmul's
/// store, which tract fuses in none of GigaAM's, keeps tract's). Returns how many were replaced.
/// Then lays each one's weights out in blocks, in place where the replaced
/// matmul held the last other reference; adds to `copied` those laid out in
/// a copy instead.
pub fn replace_weight_matmuls(model: &mut TypedModel, copied: &mut usize) -> TractResult<usize> {
    let done = super::replace_matmuls(model, weight_matmul)?;
    for node in &mut model.nodes {
        if let Some(op) = node.op_as_mut::<WeightMatMul>()
            && op.weights.layout != Layout::Blocks
            && op.weights.arrange()? == Arranged::Copied
        {
            *copied += 1;
        }
    }
    Ok(done)
}

/// The [`WeightMatMul`] for node `id` and its inputs (the node's, with the
/// packed activations replaced by the matrix they were packed from), when it
/// is an fp32 matmul this module runs.
fn weight_matmul(
    model: &TypedModel,
    id: usize,
) -> TractResult<Option<(WeightMatMul, TVec<OutletId>)>> {
    let node = model.node(id);
    let Some((op, m_axis, n_axis)) = super::f32_matmul(node) else {
        return Ok(None);
    };
    let f32_dt = f32::datum_type();
    let c_shape = &op.c_fact.shape;
    let lone = |ax: usize| ax == m_axis || ax == n_axis || c_shape[ax].is_one();
    if !(0..c_shape.rank()).all(lone) {
        return Ok(None);
    }
    let mut product = None;
    let mut fused = Vec::new();
    let mut stored = false;
    for uop in &op.micro_ops {
        if stored {
            return Ok(None);
        }
        match uop {
            ProtoFusedSpec::AddMatMul {
                a: MatMulOperand::Const(weights),
                b: MatMulOperand::Input(slot),
                ..
            } if product.is_none() => product = Some((weights, *slot)),
            ProtoFusedSpec::BinScalar(slot, bin) if product.is_some() => {
                fused.push(Fused::Scalar(*slot, *bin))
            }
            ProtoFusedSpec::BinPerRow(slot, bin, _) if product.is_some() => {
                fused.push(Fused::PerFeature(*slot, *bin))
            }
            ProtoFusedSpec::Store(specs) if product.is_some() => {
                if !specs.iter().all(|s| super::same_layout(s, m_axis, n_axis)) {
                    return Ok(None);
                }
                stored = true;
            }
            _ => return Ok(None),
        }
    }
    let (Some((weights, x_slot)), true) = (product, stored) else {
        return Ok(None);
    };
    let (m, k) = (weights.mn(), weights.k());
    if c_shape[m_axis].to_usize().ok() != Some(m) {
        return Ok(None);
    }
    // The activations: tract's packing of a plain f32 matrix, read from its input.
    let Some(&packed) = node.inputs.get(x_slot) else {
        return Ok(None);
    };
    let pack_node = model.node(packed.node);
    if !matches!(&*pack_node.op.name(), "OptMatMulPack" | "PackFor")
        || !model.outlet_fact(packed)?.shape.iter().all(|d| d.is_one())
    {
        return Ok(None);
    }
    let Some((k_axis, x_n_axis)) = super::pack_axes(model, pack_node)? else {
        return Ok(None);
    };
    let x = pack_node.inputs[0];
    let x_fact = model.outlet_fact(x)?;
    let x_lone = |ax: usize| ax == k_axis || ax == x_n_axis || x_fact.shape[ax].is_one();
    if x_fact.datum_type != f32_dt
        || k_axis == x_n_axis
        || x_fact.shape[k_axis].to_usize().ok() != Some(k)
        || x_fact.shape[x_n_axis] != c_shape[n_axis]
        || !(0..x_fact.rank()).all(x_lone)
    {
        return Ok(None);
    }
    // What the fused ops read must be what they will be given.
    for f in &fused {
        let (slot, len) = match f {
            Fused::Scalar(slot, _) => (*slot, TDim::from(1)),
            Fused::PerFeature(slot, _) => (*slot, TDim::from(m)),
        };
        let Some(&input) = node.inputs.get(slot) else {
            return Ok(None);
        };
        let fact = model.outlet_fact(input)?;
        if slot == x_slot || fact.datum_type != f32_dt || fact.shape.volume() != len {
            return Ok(None);
        }
    }
    let weights = if let Some(plain) = weights.downcast_ref::<PlainWeights>() {
        Weights::new(plain.tensor().clone(), k, m, plain.k_major())?
    } else if let Some(packed) = weights.downcast_ref::<EagerPackedInput>() {
        let Some(unpacked) = plain_weights(packed)? else {
            return Ok(None);
        };
        Weights::new(Arc::new(unpacked), k, m, true)?
    } else {
        return Ok(None);
    };
    let mut inputs: TVec<OutletId> = node.inputs.iter().copied().collect();
    inputs[x_slot] = x;
    let op = WeightMatMul {
        weights,
        x_slot,
        k_axis,
        x_n_axis,
        c_fact: f32_dt.fact(c_shape.clone()),
        m_axis,
        n_axis,
        fused,
    };
    Ok(Some((op, inputs)))
}

/// tract's f32 weight panels unpacked into the plain `k x m` matrix (row `k`
/// holds the weights of every output feature for input feature `k`), or
/// `None` for another packing than plain f32 panels.
///
/// A panel of `r` features holds, for each `k` in turn, its `r` weights:
/// each such record is a run of one row of the plain matrix.
fn plain_weights(weights: &EagerPackedInput) -> TractResult<Option<Tensor>> {
    let Some(format) = weights.format().downcast_ref::<PackedFormat>() else {
        return Ok(None);
    };
    if format.dt != f32::datum_type() || format.r == 0 {
        return Ok(None);
    }
    let (m, k, r) = (weights.mn(), weights.k(), format.r);
    let size = f32::datum_type().size_of();
    let panel = format.single_panel_len(k) * size;
    let source: &[u8] = &weights.packed;
    ensure!(source.len() >= m.div_ceil(r) * panel, "short f32 panels");
    let mut plain = Tensor::zero::<f32>(&[k, m])?;
    {
        let mut view = plain.try_as_plain_ram_mut()?;
        let rows = view.as_slice_mut::<f32>()?;
        for (kk, row) in rows.chunks_exact_mut(m).enumerate() {
            for (p, out) in row.chunks_mut(r).enumerate() {
                let at = p * panel + kk * r * size;
                let bytes = &source[at..at + out.len() * size];
                for (w, b) in out.iter_mut().zip(bytes.chunks_exact(size)) {
                    *w = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
    }
    Ok(Some(plain))
}

/// Output features per block of the fp32 weights laid out for faer: the rows of
/// faer's AVX-512 f32 kernel (96), which its AVX2 kernel's (24) divide.
pub const WEIGHT_BLOCK: usize = 96;

/// How the values of a [`Weights`] lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// As read: for each `k`, the weights of every output feature in a row.
    KMajor,
    /// As read: for each output feature, its weights of every `k` in a row.
    FeatureMajor,
    /// Blocks of [`WEIGHT_BLOCK`] output features (the last one narrower
    /// where `m` is not a multiple), one after another, each `k`-major.
    Blocks,
}

/// The `k x m` f32 weights of a [`WeightMatMul`], each block of
/// [`WEIGHT_BLOCK`] output features one product for faer: strided views of
/// the matrix as read, until [`Weights::arrange`] lays it out in blocks.
#[derive(Clone)]
struct Weights {
    values: Arc<Tensor>,
    k: usize,
    m: usize,
    layout: Layout,
}

/// How [`Weights::arrange`] laid the weights out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arranged {
    /// In the tensor as read, which nothing else held.
    InPlace,
    /// In a copy: the tensor was shared, or `k`-major with a narrower block.
    Copied,
}

impl Weights {
    fn new(values: Arc<Tensor>, k: usize, m: usize, k_major: bool) -> TractResult<Weights> {
        ensure!(
            values.datum_type() == f32::datum_type() && values.len() == k * m,
            "{:?} {:?} weights for {k} x {m} f32",
            values.datum_type(),
            values.shape()
        );
        let layout = if k_major {
            Layout::KMajor
        } else {
            Layout::FeatureMajor
        };
        Ok(Weights {
            values,
            k,
            m,
            layout,
        })
    }

    /// How many blocks.
    fn blocks(&self) -> usize {
        self.m.div_ceil(WEIGHT_BLOCK)
    }

    /// Block `b` of `values` (this one's) as the `k x width` matrix faer reads.
    fn block<'a>(&self, values: &'a [f32], b: usize) -> faer::MatRef<'a, f32> {
        let (k, m) = (self.k, self.m);
        let start = b * WEIGHT_BLOCK;
        let width = WEIGHT_BLOCK.min(m - start);
        match self.layout {
            Layout::KMajor => {
                faer::MatRef::from_row_major_slice(values, k, m).subcols(start, width)
            }
            Layout::FeatureMajor => {
                faer::MatRef::from_column_major_slice(values, k, m).subcols(start, width)
            }
            Layout::Blocks => {
                faer::MatRef::from_row_major_slice(&values[start * k..][..width * k], k, width)
            }
        }
    }

    /// Lays the weights out in blocks, each contiguous: in the tensor itself
    /// where nothing else holds it, else in a copy.
    fn arrange(&mut self) -> TractResult<Arranged> {
        let (k, m, layout) = (self.k, self.m, self.layout);
        let movable = layout != Layout::KMajor || m % WEIGHT_BLOCK == 0;
        if let (Some(tensor), true) = (Arc::get_mut(&mut self.values), movable) {
            let mut view = tensor.try_as_plain_ram_mut()?;
            let values = view.as_slice_mut::<f32>()?;
            match layout {
                Layout::KMajor => move_chunks(values, k, m / WEIGHT_BLOCK),
                Layout::FeatureMajor => transpose_blocks(values, k, m),
                Layout::Blocks => {}
            }
            self.layout = Layout::Blocks;
            return Ok(Arranged::InPlace);
        }
        let mut blocks = Tensor::zero::<f32>(self.values.shape())?;
        {
            let from = self.values.try_as_plain_ram()?;
            let from = from.as_slice::<f32>()?;
            let mut to = blocks.try_as_plain_ram_mut()?;
            let mut to = to.as_slice_mut::<f32>()?;
            for b in 0..self.blocks() {
                let block = self.block(from, b);
                for kk in 0..k {
                    let (row, rest) = to.split_at_mut(block.ncols());
                    for (j, w) in row.iter_mut().enumerate() {
                        *w = block[(kk, j)];
                    }
                    to = rest;
                }
            }
        }
        self.values = Arc::new(blocks);
        self.layout = Layout::Blocks;
        Ok(Arranged::Copied)
    }
}

/// A `k`-major `k x (chunks * WEIGHT_BLOCK)` matrix laid out in blocks in
/// place: it is a `k x chunks` matrix of runs of [`WEIGHT_BLOCK`] weights,
/// transposed by following each cycle of the permutation once.
fn move_chunks(values: &mut [f32], k: usize, chunks: usize) {
    let count = k * chunks;
    // The run at `i` (row `i / chunks`, block `i % chunks`) goes to `to(i)`.
    let to = |i: usize| (i % chunks) * k + i / chunks;
    let mut moved = vec![false; count];
    let mut carried = [0f32; WEIGHT_BLOCK];
    for start in 0..count {
        if moved[start] {
            continue;
        }
        carried.copy_from_slice(&values[start * WEIGHT_BLOCK..][..WEIGHT_BLOCK]);
        let mut at = to(start);
        while at != start {
            carried.swap_with_slice(&mut values[at * WEIGHT_BLOCK..][..WEIGHT_BLOCK]);
            moved[at] = true;
            at = to(at);
        }
        values[start * WEIGHT_BLOCK..][..WEIGHT_BLOCK].copy_from_slice(&carried);
        moved[start] = true;
    }
}

/// A feature-major `k x m` matrix laid out in blocks in place: each block's
/// features are a contiguous run of it already, transposed through a
/// scratch copy of one block.
fn transpose_blocks(values: &mut [f32], k: usize, m: usize) {
    let mut scratch = Vec::with_capacity(WEIGHT_BLOCK.min(m) * k);
    for (b, block) in values.chunks_mut(WEIGHT_BLOCK * k).enumerate() {
        let width = WEIGHT_BLOCK.min(m - b * WEIGHT_BLOCK);
        scratch.clear();
        scratch.extend_from_slice(block);
        for (kk, row) in block.chunks_exact_mut(width).enumerate() {
            for (j, w) in row.iter_mut().enumerate() {
                *w = scratch[j * k + kk];
            }
        }
    }
}

/// The same weights, bit for bit, laid out alike (so that equality is
/// one: a NaN equals itself). tract compares ops while it optimises: the
/// first weight that differs ends it, with nothing allocated.
impl PartialEq for Weights {
    fn eq(&self, other: &Weights) -> bool {
        if (self.k, self.m, self.layout) != (other.k, other.m, other.layout) {
            return false;
        }
        if Arc::ptr_eq(&self.values, &other.values) {
            return true;
        }
        let (Ok(a), Ok(b)) = (
            self.values.try_as_plain_ram(),
            other.values.try_as_plain_ram(),
        ) else {
            return false;
        };
        match (a.as_slice::<f32>(), b.as_slice::<f32>()) {
            (Ok(a), Ok(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
            _ => false,
        }
    }
}

impl Eq for Weights {}

impl fmt::Debug for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} x {} f32 weights, {:?}", self.k, self.m, self.layout)
    }
}

/// An op tract fused after the product, applied to it in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fused {
    /// `c = c op s`, `s` the one value of input `slot`.
    Scalar(usize, BinOp),
    /// `c = c op v[feature]`, `v` input `slot`, one value per output feature.
    PerFeature(usize, BinOp),
}

/// `a op b` as tract's kernels apply a fused op (`SubF` subtracts `a`).
#[inline(always)]
fn apply(bin: BinOp, a: f32, b: f32) -> f32 {
    match bin {
        BinOp::Min => {
            if a < b {
                a
            } else {
                b
            }
        }
        BinOp::Max => {
            if a > b {
                a
            } else {
                b
            }
        }
        BinOp::Add => a + b,
        BinOp::Mul => a * b,
        BinOp::Sub => a - b,
        BinOp::SubF => b - a,
    }
}

/// An fp32 matmul of constant weights by an activation matrix, on faer, with
/// the ops tract had fused after it. The output has the optimised matmul's
/// shape and layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightMatMul {
    /// The `k x m` weights.
    weights: Weights,
    /// Which input holds the activations, and their `k` and `n` axes.
    x_slot: usize,
    k_axis: usize,
    x_n_axis: usize,
    /// The output: its fact and the axes of the output features and of `n`.
    c_fact: TypedFact,
    m_axis: usize,
    n_axis: usize,
    fused: Vec<Fused>,
}

impl Op for WeightMatMul {
    fn name(&self) -> StaticName {
        "WeightMatMul".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "faer f32, m {} k {} ({:?}, by {WEIGHT_BLOCK}), then {:?}",
            self.weights.m, self.weights.k, self.weights.layout, self.fused
        )])
    }

    op_as_typed_op!();
}

/// `f` of the `len` f32 values of a fused op's input, borrowed in place (no
/// copy per run); an error for any other length.
fn with_operand<R>(value: &TValue, len: usize, f: impl FnOnce(&[f32]) -> R) -> TractResult<R> {
    let view = value.try_as_plain_ram()?;
    let values = view.as_slice::<f32>()?;
    ensure!(
        values.len() == len,
        "WeightMatMul: an operand of {} values for {len}",
        values.len()
    );
    Ok(f(values))
}

impl EvalOp for WeightMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.get(self.x_slot).context("no activations")?;
        let (k, m) = (self.weights.k, self.weights.m);
        ensure!(
            x.datum_type() == f32::datum_type() && x.shape()[self.k_axis] == k,
            "WeightMatMul: activations {:?}, k {k}",
            x.shape()
        );
        let n = x.shape()[self.x_n_axis];
        let mut shape: TVec<usize> = tvec![1; self.c_fact.rank()];
        shape[self.m_axis] = m;
        shape[self.n_axis] = n;
        let mut out = Tensor::zero::<f32>(&shape)?;
        let mut fused = self.fused.as_slice();
        let mut accumulate = faer::Accum::Replace;
        let features_inner = self.m_axis > self.n_axis;
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let c = view.as_slice_mut::<f32>()?;
            // The bias first, where tract adds it first: the product adds to it.
            if let Some((Fused::PerFeature(slot, BinOp::Add), rest)) = fused.split_first() {
                with_operand(&inputs[*slot], m, |bias| {
                    per_feature(c, bias, n, features_inner, |_, b| b)
                })?;
                accumulate = faer::Accum::Add;
                fused = rest;
            }
            let xs = x.try_as_plain_ram()?;
            let xs = xs.as_slice::<f32>()?;
            let lhs = if self.k_axis > self.x_n_axis {
                faer::MatRef::from_row_major_slice(xs, n, k)
            } else {
                faer::MatRef::from_column_major_slice(xs, n, k)
            };
            let dst = if features_inner {
                faer::MatMut::from_row_major_slice_mut(c, n, m)
            } else {
                faer::MatMut::from_column_major_slice_mut(c, n, m)
            };
            // The output's columns of each block of weights, one product each.
            let ws = self.weights.values.try_as_plain_ram()?;
            let ws = ws.as_slice::<f32>()?;
            let mut columns = Vec::with_capacity(self.weights.blocks());
            let mut rest = dst;
            for _ in 0..self.weights.blocks() {
                let width = WEIGHT_BLOCK.min(rest.ncols());
                let (block, others) = rest.split_at_col_mut(width);
                columns.push(block);
                rest = others;
            }
            par_chunks_mut(&mut columns, 1, n * k * m, |first, chunk| {
                for (b, dst) in (first..).zip(chunk) {
                    let rhs = self.weights.block(ws, b);
                    let dst = dst.as_mut();
                    faer::linalg::matmul::matmul(dst, accumulate, lhs, rhs, 1f32, faer::Par::Seq);
                }
                Ok(())
            })?;
            for f in fused {
                match *f {
                    Fused::Scalar(slot, bin) => {
                        let s = with_operand(&inputs[slot], 1, |s| s[0])?;
                        super::wide(Scale { c, s, bin });
                    }
                    Fused::PerFeature(slot, bin) => {
                        with_operand(&inputs[slot], m, |v| {
                            per_feature(c, v, n, features_inner, |a, b| apply(bin, a, b))
                        })?;
                    }
                }
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

/// `c = f(c, v[feature])` over an `n x m` output, features the inner axis or
/// the outer one.
fn per_feature(
    c: &mut [f32],
    v: &[f32],
    n: usize,
    features_inner: bool,
    f: impl Fn(f32, f32) -> f32,
) {
    if features_inner {
        for row in c.chunks_exact_mut(v.len()) {
            for (a, &b) in row.iter_mut().zip(v) {
                *a = f(*a, b);
            }
        }
    } else {
        for (column, &b) in c.chunks_exact_mut(n.max(1)).zip(v) {
            for a in column {
                *a = f(*a, b);
            }
        }
    }
}

/// A fused scalar op over the whole output, as [`super::wide`] work.
struct Scale<'a> {
    c: &'a mut [f32],
    s: f32,
    bin: BinOp,
}

impl super::Wide for Scale<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let (s, bin) = (self.s, self.bin);
        for a in self.c.iter_mut() {
            *a = apply(bin, *a, s);
        }
    }
}

impl TypedOp for WeightMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs.get(self.x_slot).context("no activations")?;
        let mut shape = self.c_fact.shape.clone();
        shape.set(self.n_axis, x.shape[self.x_n_axis].clone());
        Ok(tvec!(f32::datum_type().fact(shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speech::tune::tests::{assert_close_on_any_pool, uniform};
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::einsum::EinSum;
    use tract_onnx::tract_core::ops::konst::Const;
    use tract_onnx::tract_core::ops::math;
    use tract_onnx::tract_core::ops::matmul::optimized::OptMatMul;

    /// A layer as GigaAM's: `x` (`[1, T, k]`, `T` symbolic) by constant
    /// weights (`expr` says the layout), a bias per feature, a scale, a ReLU
    /// and a residual, decluttered; tract's optimiser fuses all but the
    /// residual into its matmul.
    fn layer(expr: &str, k: usize, m: usize, features_last: bool) -> TypedModel {
        let mut model = TypedModel::default();
        let t: TDim = model.symbols.sym("T").into();
        let x = model
            .add_source("x", f32::fact(tvec![1.to_dim(), t.clone(), k.to_dim()]))
            .expect("x");
        let mut rnd = uniform(7);
        let weights: Vec<f32> = (0..k * m).map(|_| rnd() * 0.1).collect();
        let w = model
            .add_const("w", Tensor::from_shape(&[k, m], &weights).expect("w"))
            .expect("w");
        let y = model
            .wire_node(
                "mm",
                EinSum::new(expr.parse().expect("expr"), f32::datum_type()),
                &[x, w],
            )
            .expect("matmul")[0];
        let bias: Vec<f32> = (0..m).map(|_| rnd()).collect();
        let (bias_shape, out_shape): (TVec<usize>, TVec<TDim>) = if features_last {
            (tvec![1, 1, m], tvec![1.to_dim(), t, m.to_dim()])
        } else {
            (tvec![1, m, 1], tvec![1.to_dim(), m.to_dim(), t])
        };
        let residual = model.add_source("r", f32::fact(out_shape)).expect("r");
        let b = model
            .add_const("b", Tensor::from_shape(&bias_shape, &bias).expect("b"))
            .expect("b");
        let half = model
            .add_const("half", tensor3(&[[[0.5f32]]]))
            .expect("half");
        let zero = model.add_const("zero", tensor3(&[[[0f32]]])).expect("zero");
        let mut wire = |name: &str, op: TypedBinOp, a: OutletId, b: OutletId| {
            model.wire_node(name, op, &[a, b]).expect(name)[0]
        };
        let y = wire("bias", math::add(), y, b);
        let y = wire("scale", math::mul(), y, half);
        let y = wire("relu", math::max(), y, zero);
        let y = wire("residual", math::add(), y, residual);
        model.select_output_outlets(&[y]).expect("outputs");
        model.into_decluttered().expect("decluttered")
    }

    /// The layer's output with the weight matmul on faer against tract's,
    /// for both output layouts and a frame count off every block size, on
    /// one and two threads: within a few units in the last place of the
    /// scale, and the same bits on either pool. The weights come unpacked
    /// from tract's panels, or (our optimiser) as the layer's own tensor.
    #[test]
    fn close_to_tract_s_matmul_with_its_fused_ops_on_any_pool() {
        use crate::speech::tune::{Exactness, Rewrites, optimize};
        // A whole block of output features and a narrower one.
        let (k, m) = (96usize, WEIGHT_BLOCK + 40);
        let cases = [("atk,kn->atn", true), ("atk,kn->ant", false)];
        for ((expr, features_last), kept) in cases.into_iter().flat_map(|c| [(c, false), (c, true)])
        {
            let typed = layer(expr, k, m, features_last);
            let plain = typed.clone().into_optimized().expect("optimised");
            let mut done = Rewrites::default();
            let mut replaced = if kept {
                let mut ours = typed.clone();
                optimize(&mut ours, &mut done, Exactness::Close).expect("ours");
                ours
            } else {
                plain.clone()
            };
            assert_eq!(done.plain_weights, usize::from(kept), "{replaced}");
            assert_eq!(
                replace_weight_matmuls(&mut replaced, &mut 0).expect("replace"),
                1,
                "{plain}"
            );
            let replaced = replaced.into_compact().expect("compact");
            let ours = replaced
                .nodes
                .iter()
                .find_map(|n| n.op_as::<WeightMatMul>());
            let ours = ours.expect("a WeightMatMul");
            // What tract fused: bias (first, into the output), scale, ReLU
            // (the residual stays an add of its own, as in GigaAM's graphs).
            assert_eq!(ours.fused.len(), 3, "{:?}", ours.fused);
            // The blocks hold the layer's weights, kept or unpacked.
            let read = typed.nodes.iter().filter_map(|n| n.op_as::<Const>());
            let layer_s = read
                .filter(|c| c.val().shape() == [k, m])
                .collect::<Vec<_>>();
            let [layer_s] = layer_s.as_slice() else {
                panic!("{} weights of {k} x {m}", layer_s.len())
            };
            let layer_s = layer_s.val().try_as_plain_ram().expect("plain");
            let layer_s = layer_s.as_slice::<f32>().expect("f32");
            let what = format!("{expr}, kept {kept}");
            assert_eq!(ours.weights.layout, Layout::Blocks, "{what}");
            assert_holds(&ours.weights, |kk, f| layer_s[kk * m + f], &what);
            assert!(
                !replaced.nodes.iter().any(|n| n.op_is::<OptMatMul>()),
                "{replaced}"
            );
            let mut rnd = uniform(13);
            let frames = 37;
            let x: Vec<f32> = (0..frames * k).map(|_| rnd()).collect();
            let r: Vec<f32> = (0..frames * m).map(|_| rnd()).collect();
            let r_shape = if features_last {
                [1, frames, m]
            } else {
                [1, m, frames]
            };
            let inputs = [
                Tensor::from_shape(&[1, frames, k], &x).expect("x"),
                Tensor::from_shape(&r_shape, &r).expect("r"),
            ];
            let what = format!("{expr}, kept {kept}");
            assert_close_on_any_pool(&plain, &replaced, &inputs, 16.0, &what);
        }
    }

    /// Each block of `weights` holds the matrix `value(k, feature)`'s own
    /// columns, the last one narrower where `m` is not a multiple of the
    /// block; once arranged, contiguous, one after another.
    fn assert_holds(weights: &Weights, value: impl Fn(usize, usize) -> f32, what: &str) {
        let (k, m) = (weights.k, weights.m);
        let view = weights.values.try_as_plain_ram().expect("plain");
        let values = view.as_slice::<f32>().expect("f32");
        for b in 0..weights.blocks() {
            let block = weights.block(values, b);
            let start = b * WEIGHT_BLOCK;
            let width = WEIGHT_BLOCK.min(m - start);
            assert_eq!(
                (block.nrows(), block.ncols()),
                (k, width),
                "{what}: block {b}"
            );
            for kk in 0..k {
                for j in 0..width {
                    let expected = value(kk, start + j);
                    let at = format!("{what}: block {b}, k {kk}, feature {}", start + j);
                    assert_eq!(block[(kk, j)], expected, "{at}");
                    if weights.layout == Layout::Blocks {
                        assert_eq!(values[start * k + kk * width + j], expected, "{at}");
                    }
                }
            }
        }
    }

    /// Either layout as read, whole blocks or a narrower last one, held
    /// elsewhere or not: the same blocks, laid out in place where nothing
    /// else holds the tensor and the runs to move are whole blocks.
    #[test]
    fn weights_are_laid_out_in_blocks_in_place_or_in_a_copy() {
        let k = 5usize;
        let value = |kk: usize, f: usize| (kk * 1000 + f) as f32;
        for m in [2 * WEIGHT_BLOCK, 2 * WEIGHT_BLOCK + 7, 7] {
            let k_major: Vec<f32> = (0..k * m).map(|i| value(i / m, i % m)).collect();
            let feature_major: Vec<f32> = (0..k * m).map(|i| value(i % k, i / k)).collect();
            for (values, shape, is_k_major) in
                [(&k_major, [k, m], true), (&feature_major, [m, k], false)]
            {
                for shared in [false, true] {
                    let what = format!("m {m}, k-major {is_k_major}, shared {shared}");
                    let tensor = Arc::new(Tensor::from_shape(&shape, values).expect("tensor"));
                    let elsewhere = shared.then(|| tensor.clone());
                    let mut weights = Weights::new(tensor, k, m, is_k_major).expect("weights");
                    assert_holds(&weights, value, &what);
                    let in_place = !shared && (!is_k_major || m % WEIGHT_BLOCK == 0);
                    let expected = if in_place {
                        Arranged::InPlace
                    } else {
                        Arranged::Copied
                    };
                    assert_eq!(weights.arrange().expect("arrange"), expected, "{what}");
                    assert_eq!(weights.layout, Layout::Blocks, "{what}");
                    assert_holds(&weights, value, &what);
                    if let Some(elsewhere) = elsewhere {
                        // The other reader's tensor is as it was read.
                        let view = elsewhere.try_as_plain_ram().expect("plain");
                        assert_eq!(view.as_slice::<f32>().expect("f32"), values.as_slice());
                    }
                }
            }
        }
        let seven: Vec<f32> = (0..k * 7).map(|i| i as f32).collect();
        let tensor = Arc::new(Tensor::from_shape(&[k, 7], &seven).expect("tensor"));
        assert!(Weights::new(tensor, k, 8, true).is_err());
    }

    #[test]
    fn weights_unpack_from_any_panel_height() {
        use tract_linalg::mmm::MMMInputFormat;
        let (m, k) = (37usize, 11usize);
        let plain: Vec<f32> = (0..m * k).map(|i| i as f32).collect();
        // tract packs the weights as `m x k` (rows: output features).
        let weights = Tensor::from_shape(&[m, k], &plain).expect("weights");
        for r in [1usize, 16, 64] {
            let format = PackedFormat::new(f32::datum_type(), r, 16);
            let packed = format.prepare_one(&weights, 1, 0).expect("pack");
            let packed = packed.downcast_ref::<EagerPackedInput>().expect("eager");
            let unpacked = plain_weights(packed).expect("unpack").expect("f32 panels");
            assert_eq!(unpacked.shape(), &[k, m]);
            let view = unpacked.try_as_plain_ram().expect("plain");
            let got = view.as_slice::<f32>().expect("f32");
            for (kk, row) in got.chunks_exact(m).enumerate() {
                for (j, &w) in row.iter().enumerate() {
                    assert_eq!(w, plain[j * k + kk], "r {r}: k {kk}, feature {j}");
                }
            }
        }
    }
}
