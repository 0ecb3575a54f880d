//! Graph rewrites for what tract 0.23.9 leaves slow in GigaAM's graphs
//! (measured in docs/perf.md). Each one but the softmax, the LayerNorm and the
//! fp32 weight matmuls is exact: the model computes the same numbers, bit for
//! bit, only sooner. Those three take their `exp` and sums their own way, not
//! tract's kernels', so
//! [`Exactness::Bits`] leaves them out, for the tests that compare bits.
//!
//! - [`defer`]: tract's declutter copies a weight for each axis change it
//!   pushes into it, even one that moves no byte; the weights sit the
//!   declutter out as values of our own, and get its changes after it.
//! - [`drop_zero_weight_zero_points`]: the int8 export gives every weight a
//!   per-channel zero point that is all zeros; declared, it makes tract correct
//!   each product with a row sum of the activations at run time.
//! - [`fold_constant_chains`]: tract's constant folding refuses a step whose
//!   output is larger than its input before looking at where the chain ends, so
//!   the int8 column sums `Reduce<Sum>(Cast<i32>(weights))` run on every call.
//!   The sums are taken by rows (`integer_sum`), not by tract's column walk.
//! - [`optimize`] with [`fold_weight_sums`]: tract's optimiser casts each int8
//!   weight to i32 in every round, only to find the cast too large to keep;
//!   the sums it is made for are taken from the bytes before that; and, on a
//!   CPU with AMX, [`amx::fold`] packs each int8 weight for tract's AMX kernel
//!   before tract's packer copies it a byte at a time; elsewhere
//!   [`int8_weights::fold`] packs each for tract's VNNI or AVX2 kernel, in the
//!   weight's own bytes.
//! - [`FastDynamicQuantize`]: tract's `DynamicQuantizeLinear` is a scalar loop
//!   (a libm call per element for the rounding); this one vectorises.
//! - [`gemm::replace_weight_matmuls`]: tract-linalg's f32 kernels run the fp32
//!   weight matmuls without cache blocking, at two thirds of faer's rate. With
//!   [`Exactness::Close`], [`optimize`] runs [`plain::keep`] too: each fp32
//!   weight reaches `gemm` as read from the file, where tract would pack it
//!   into panels (and `gemm` unpack it again), and `gemm` lays it out once in
//!   the blocks faer reads fastest; [`plain::pack_leftovers`] packs those
//!   left to tract's kernels.
//! - [`products::replace_batched_products`]: the attention's products of two
//!   activations (16 heads, `k` 48) pack every head for a kernel whose tiles are
//!   mostly overhead at that `k`; faer reads the heads in place.
//! - [`retarget_weight_matmuls`]: with a symbolic time axis tract gives the fp32
//!   weight matmuls a kernel that is slow and does not scale across threads
//!   (those [`gemm`] leaves, and every one in the bit tests).
//! - [`serialize_row_loops`]: loops of one-row matmuls cost more to dispatch to
//!   the thread pool than to run.
//! - [`broadcast::replace_broadcast_binops`]: with a symbolic time axis tract
//!   cannot prove a broadcasting `Add`/`Sub`/`Mul` long enough for its fast ops
//!   and runs a generic loop.
//! - [`depthwise::replace_depthwise_convs`]: with a symbolic time axis a
//!   depthwise convolution becomes 768 one-row matmuls over an im2col buffer.
//! - [`pack::replace_i8_packs`]: tract shifts and packs the int8 activations
//!   for the VNNI kernel in two passes on one thread.
//! - [`pack::fuse_quantize_packs`]: the quantised activations are a tensor
//!   written only for the packing to read back.
//! - [`batch::replace_batched_packs`]: tract packs the attention's 16 heads
//!   one after another on one thread.
//! - [`pack::pad_amx_reads`]: tract's AMX kernels read past the end of packed
//!   activations whose `k` is not a multiple of 64 (a fault where the buffer
//!   ends a page); such activations are copied into buffers that leave room.
//! - [`dequant::replace_scaled_casts`]: tract converts the int8 matmul sums to
//!   f32 on one thread, scales them in a second pass and adds the bias in a
//!   third.
//! - [`softmax::replace_softmaxes`]: tract's softmax calls three kernels per
//!   row and runs its glue between them on dirty AVX state.
//! - [`norm::replace_layer_norms`]: tract lowers a LayerNorm to four nodes that
//!   each walk the whole tensor, the first a scalar sum on one thread, and a
//!   fifth for its scale and bias.
//!
//! [`rewrite_decluttered`] and [`rewrite_optimized`] run the graph-level ones,
//! before and after tract's optimiser.

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod batch;
pub mod broadcast;
pub mod defer;
pub mod depthwise;
pub mod dequant;
pub mod gemm;
pub mod int8_weights;
pub mod norm;
pub mod pack;
pub mod plain;
pub mod products;
pub mod softmax;

use std::collections::BTreeMap;

use tract_linalg::mmm::{MMMInputFormat, MMMInputValue};
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::matmul::optimized::OptMatMul;

/// What the rewrites did to one graph, for the startup log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rewrites {
    /// Weights left in the model file, then read from it each into its tensor
    /// ([`crate::speech::lean`], [`crate::speech::weights`]).
    pub weights_from_file: usize,
    /// Weights kept out of tract's declutter as values ([`defer`]).
    pub deferred: usize,
    /// The axis changes the declutter made to them, applied after it.
    pub deferred_changes: usize,
    /// Of those weights, the ones whose changes were applied to a copy.
    pub deferred_copies: usize,
    /// Reshapes of a weight folded into it in place ([`defer::fold_reshapes`]).
    pub reshaped: usize,
    /// Weight zero points dropped (all zeros).
    pub zero_points: usize,
    /// Constant chains folded.
    pub folded: usize,
    /// int8 weights packed for tract's AMX kernel by [`amx::fold`].
    pub amx_packed: usize,
    /// int8 weights packed for tract's VNNI or AVX2 kernel by
    /// [`int8_weights::fold`].
    pub int8_packed: usize,
    /// Of those, the ones packed in their own bytes.
    pub int8_packed_in_place: usize,
    /// Packed activations copied where tract's AMX kernel would read past
    /// them ([`pack::pad_amx_reads`]).
    pub amx_tails: usize,
    /// `DynamicQuantizeLinear` nodes replaced.
    pub quantizers: usize,
    /// fp32 weight matmuls run on faer's kernels ([`gemm`]).
    pub gemms: usize,
    /// Of those, the ones whose weights were laid out for faer in a copy,
    /// not in place (shared with another reader, or with a narrower block).
    pub gemm_copies: usize,
    /// fp32 weights kept as read at load, not packed by tract ([`plain`]).
    pub plain_weights: usize,
    /// Of those, the ones packed for tract's kernels after the rewrites.
    pub plain_packed: usize,
    /// The attention's products of two activations run on faer ([`products`]).
    pub products: usize,
    /// fp32 weight matmuls moved to the kernel tract prefers for long inputs.
    pub retargeted: usize,
    /// Loops of one-row matmuls kept on the calling thread.
    pub serialized: usize,
    /// Broadcasting `Add`/`Sub`/`Mul` run as rows ([`broadcast`]).
    pub broadcasts: usize,
    /// Depthwise convolutions run as direct loops ([`depthwise`]).
    pub depthwise: usize,
    /// int8 activation packings run on the pool ([`pack`]).
    pub packs: usize,
    /// Of those, the ones that quantise the activations on the way.
    pub quantized_packs: usize,
    /// Batched f32 packings (the attention's) split over the pool ([`batch`]).
    pub batch_packs: usize,
    /// int8 matmul sums converted and scaled in one pass ([`dequant`]).
    pub scaled_casts: usize,
    /// Of those, the ones that add the layer's bias in the same pass.
    pub biased_casts: usize,
    /// Softmaxes run row by row ([`softmax`]).
    pub softmaxes: usize,
    /// LayerNorms' normalisations run as one op each ([`norm`]).
    pub norms: usize,
    /// Of those, the ones that apply the LayerNorm's scale and bias too.
    pub scaled_norms: usize,
}

impl Rewrites {
    /// Adds the counts of `other` (the same rewrites on another piece).
    pub fn add(&mut self, other: &Rewrites) {
        self.weights_from_file += other.weights_from_file;
        self.deferred += other.deferred;
        self.deferred_changes += other.deferred_changes;
        self.deferred_copies += other.deferred_copies;
        self.reshaped += other.reshaped;
        self.zero_points += other.zero_points;
        self.folded += other.folded;
        self.amx_packed += other.amx_packed;
        self.int8_packed += other.int8_packed;
        self.int8_packed_in_place += other.int8_packed_in_place;
        self.amx_tails += other.amx_tails;
        self.quantizers += other.quantizers;
        self.gemms += other.gemms;
        self.plain_weights += other.plain_weights;
        self.plain_packed += other.plain_packed;
        self.gemm_copies += other.gemm_copies;
        self.products += other.products;
        self.retargeted += other.retargeted;
        self.serialized += other.serialized;
        self.broadcasts += other.broadcasts;
        self.depthwise += other.depthwise;
        self.packs += other.packs;
        self.quantized_packs += other.quantized_packs;
        self.batch_packs += other.batch_packs;
        self.scaled_casts += other.scaled_casts;
        self.biased_casts += other.biased_casts;
        self.softmaxes += other.softmaxes;
        self.norms += other.norms;
        self.scaled_norms += other.scaled_norms;
    }
}

/// Applies the rewrites of a decluttered encoder graph (before tract's
/// optimiser, which would lower what they replace) and records them in `done`.
pub fn rewrite_decluttered(model: &mut TypedModel, done: &mut Rewrites) -> TractResult<()> {
    let replaced = depthwise::replace_depthwise_convs(model)?;
    done.depthwise += replaced;
    if replaced > 0 {
        *model = std::mem::take(model).into_compact()?;
    }
    Ok(())
}

/// Which rewrites [`rewrite_optimized`] may apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exactness {
    /// Only those that keep every bit of tract's output.
    Bits,
    /// Also the softmax, the LayerNorms and the fp32 weight matmuls on faer,
    /// within a few units in the last place of tract's.
    Close,
}

/// Applies the rewrites of an optimised encoder graph (or piece of one), in
/// order, compacts it once, and adds them to the counts in `done`.
/// Repacking the re-targeted weights runs on `executor` when given.
pub fn rewrite_optimized(
    model: &mut TypedModel,
    done: &mut Rewrites,
    executor: Option<tract_linalg::multithread::Executor>,
    exactness: Exactness,
) -> TractResult<()> {
    done.folded += fold_constant_chains(model)?;
    done.quantizers += replace_dynamic_quantize(model)?;
    if exactness == Exactness::Close {
        done.gemms += gemm::replace_weight_matmuls(model, &mut done.gemm_copies)?;
        // Before the batched packings: what these read is the packings' input.
        done.products += products::replace_batched_products(model)?;
        done.plain_packed += plain::pack_leftovers(model)?;
    }
    let mut retarget = || retarget_weight_matmuls(model, KERNEL_N_HINT);
    done.retargeted += match executor {
        Some(pool) => tract_linalg::multithread::multithread_tract_scope(pool, retarget)?,
        None => retarget()?,
    };
    done.serialized += serialize_row_loops(model);
    if exactness == Exactness::Close {
        // Before the broadcasting ops: the norm's chain has one.
        let (norms, scaled) = norm::replace_layer_norms(model)?;
        done.norms += norms;
        done.scaled_norms += scaled;
    }
    done.broadcasts += broadcast::replace_broadcast_binops(model)?;
    done.packs += pack::replace_i8_packs(model)?;
    done.quantized_packs += pack::fuse_quantize_packs(model)?;
    done.batch_packs += batch::replace_batched_packs(model)?;
    done.amx_tails += pack::pad_amx_reads(model)?;
    let (scaled, biased) = dequant::replace_scaled_casts(model)?;
    done.scaled_casts += scaled;
    done.biased_casts += biased;
    if exactness == Exactness::Close {
        done.softmaxes += softmax::replace_softmaxes(model)?;
    }
    *model = std::mem::take(model).into_compact()?;
    Ok(())
}

/// Runs a plan like `state.run(inputs)`, clearing the upper halves of the AVX
/// registers before each node (see [`clear_avx_upper`]).
pub fn run_clean(state: &mut TypedSimpleState, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
    state.run_plan_with_eval(inputs, eval_clean)
}

/// [`run_clean`] with every node on the calling thread, whatever executor the
/// plan was built with (a plan puts its own around each run): for runs side by
/// side on a pool's threads, each of which must not split work over the pool.
pub fn run_clean_serial(
    state: &mut TypedSimpleState,
    inputs: TVec<TValue>,
) -> TractResult<TVec<TValue>> {
    state.run_plan_with_eval(inputs, |ctx, op_state, node, node_inputs| {
        tract_linalg::multithread::multithread_tract_scope(
            tract_linalg::multithread::Executor::SingleThread,
            || eval_clean(ctx, op_state, node, node_inputs),
        )
    })
}

/// One node's evaluation, after clearing the AVX upper state.
fn eval_clean(
    ctx: &EvalContext,
    op_state: Option<&mut (dyn OpState + 'static)>,
    node: &TypedNode,
    inputs: TVec<TValue>,
) -> TractResult<TVec<TValue>> {
    clear_avx_upper();
    tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs)
}

/// Leaves the CPU's AVX registers with clean upper halves (a `VZEROUPPER`),
/// so that code compiled for baseline x86-64 (SSE, as this crate and most of
/// tract are) runs at full speed.
///
/// tract-linalg's hand-written AVX-512 kernels return without `VZEROUPPER`.
/// Until something clears them, every legacy-SSE instruction after one of
/// them pays for the dirty upper state: on this Zen 4 the same quantizer loop,
/// on the same data, ran 4 to 8 times slower after a kernel than in isolation,
/// and the whole int8 encoder 0.41 s instead of 0.32 s (docs/perf.md).
///
/// This crate forbids `unsafe`, so it cannot issue the instruction itself:
/// it runs memchr's AVX2 search over 64 bytes, which LLVM compiles with
/// `target_feature(avx2)` and ends with `VZEROUPPER`, as it ends every function
/// that used the wide registers. About 10 ns. On a CPU without AVX2 memchr
/// takes its SSE2 path, and there is no upper state to clear.
pub fn clear_avx_upper() {
    static BYTES: [u8; 64] = [0; 64];
    std::hint::black_box(memchr::memchr(1, std::hint::black_box(&BYTES)));
}

/// Runs `work` compiled for the widest vectors this CPU has, picked at run
/// time: AVX-512 (x86-64-v4), else AVX2 with FMA (v3), else as built.
///
/// The crate is built for baseline x86-64 so that one binary runs on any box,
/// which leaves our loops at SSE2's four f32 lanes: the quantiser's division
/// ran at 0.35 ns an element, and `f32::mul_add` is a call to a software or
/// dispatched `fmaf` per element. `pulp` detects the CPU and inlines the work
/// into a function compiled with that level's features, so the same loops
/// come out 16 (or 8) lanes wide, and `mul_add` one FMA instruction, with no
/// `unsafe` here. The results are the same bits at every width: each lane
/// does the same IEEE operation (Rust neither reassociates nor contracts
/// float arithmetic), and an FMA is the one rounding `mul_add` promises.
///
/// The work is a [`Wide`] whose `run` is `#[inline(always)]`, not a closure:
/// LLVM declined to inline a closure holding the depthwise loops into the
/// wide build, which then ran them as built, each `mul_add` a call. The
/// upper state is cleared first whichever build runs.
#[inline(always)]
pub(crate) fn wide<W: Wide>(work: W) -> W::Output {
    clear_avx_upper();
    ARCH.dispatch(Dispatch(work))
}

/// The CPU's level, detected once ([`wide`] runs per chunk of every op).
static ARCH: std::sync::LazyLock<pulp::Arch> = std::sync::LazyLock::new(pulp::Arch::new);

/// Work for [`wide`]. Implementations mark `run` `#[inline(always)]` and keep
/// their loops inside it (or in `#[inline(always)]` helpers).
pub(crate) trait Wide {
    type Output;
    fn run(self) -> Self::Output;
}

/// Hands a [`Wide`] to `pulp`, inlined all the way into its build.
struct Dispatch<W>(W);

impl<W: Wide> pulp::WithSimd for Dispatch<W> {
    type Output = W::Output;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> W::Output {
        self.0.run()
    }
}

/// [`quantize`] as [`wide`] work.
struct Quantize<'a> {
    xs: &'a [f32],
    scale: f32,
    zero_point: u8,
    out: &'a mut [u8],
}

impl Wide for Quantize<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        quantize(self.xs, self.scale, self.zero_point, self.out)
    }
}

/// [`min_max`] as [`wide`] work.
struct MinMax<'a>(&'a [f32]);

impl Wide for MinMax<'_> {
    type Output = (f32, f32);

    #[inline(always)]
    fn run(self) -> (f32, f32) {
        min_max(self.0)
    }
}

/// The build [`wide`] runs on this CPU, for the startup log and `/v1/models`.
pub fn wide_level() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    match *ARCH {
        pulp::Arch::V4(_) => "x86-64-v4 (AVX-512)",
        pulp::Arch::V3(_) => "x86-64-v3 (AVX2, FMA)",
        _ => "x86-64 baseline (SSE2)",
    }
    #[cfg(target_arch = "aarch64")]
    match *ARCH {
        pulp::Arch::Neon(_) => "aarch64 NEON",
        _ => "aarch64 baseline",
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    "baseline"
}

/// Replaces node `id` (one output) with `op` reading `inputs`, when `op`
/// gives the node's output fact. Returns whether it did.
fn replace_node(
    model: &mut TypedModel,
    id: usize,
    op: impl TypedOp,
    inputs: &[OutletId],
) -> TractResult<bool> {
    {
        let facts = inputs
            .iter()
            .map(|i| model.outlet_fact(*i))
            .collect::<TractResult<TVec<_>>>()?;
        if op.output_facts(&facts)?.first() != Some(&model.nodes[id].outputs[0].fact) {
            return Ok(false);
        }
    }
    let mut patch = TypedModelPatch::default();
    let taps = inputs
        .iter()
        .map(|i| patch.tap_model(model, *i))
        .collect::<TractResult<TVec<_>>>()?;
    let out = patch.wire_node(&model.nodes[id].name, op, &taps)?;
    patch.shunt_outside(model, id.into(), out[0])?;
    patch.apply(model)?;
    Ok(true)
}

/// Replaces each optimised matmul for which `build` gives an op and its
/// inputs with that op. Returns how many were replaced.
fn replace_matmuls<O: TypedOp>(
    model: &mut TypedModel,
    build: impl Fn(&TypedModel, usize) -> TractResult<Option<(O, TVec<OutletId>)>>,
) -> TractResult<usize> {
    let mut done = 0;
    for id in node_ids(model, |n| n.op_is::<OptMatMul>()) {
        let Some((op, inputs)) = build(model, id)? else {
            continue;
        };
        if replace_node(model, id, op, &inputs)? {
            done += 1;
        }
    }
    Ok(done)
}

/// `node`'s optimised matmul and its output's `m` and `n` axes, when it is
/// an f32 matmul on f32 kernels with both axes known and distinct.
fn f32_matmul(node: &TypedNode) -> Option<(&OptMatMul, usize, usize)> {
    let op = node.op_as::<OptMatMul>()?;
    let f32_dt = f32::datum_type();
    if op.c_fact.datum_type != f32_dt || op.mmm.iter().any(|m| m.internal_type() != f32_dt) {
        return None;
    }
    let (m_axis, n_axis) = (op.c_m_axis?, op.c_n_axis?);
    (m_axis != n_axis).then_some((op, m_axis, n_axis))
}

/// Whether a store spec of an optimised matmul writes a matrix laid out as
/// its output is (`m` and `n` on the output's own axes).
fn same_layout(spec: &tract_linalg::mmm::OutputStoreSpec, m_axis: usize, n_axis: usize) -> bool {
    matches!(spec, tract_linalg::mmm::OutputStoreSpec::View { m_axis: Some(m), n_axis: Some(n), .. } if *m == m_axis && *n == n_axis)
}

/// The one node that reads `outlet`, when exactly one does and the outlet is
/// not a graph output: what a rewrite may fold into the op that writes it.
fn sole_reader(model: &TypedModel, outlet: OutletId) -> TractResult<Option<&TypedNode>> {
    let successors = &model.nodes[outlet.node].outputs[outlet.slot].successors;
    Ok(match successors.as_slice() {
        [inlet] if !model.output_outlets()?.contains(&outlet) => Some(&model.nodes[inlet.node]),
        _ => None,
    })
}

/// The input axes a packing node (tract's `OptMatMulPack`) reads `k` and
/// `mn` from.
fn pack_axes(model: &TypedModel, pack: &TypedNode) -> TractResult<Option<(usize, usize)>> {
    let inputs = model.node_input_facts(pack.id)?;
    let outputs = model.node_output_facts(pack.id)?;
    let axes = pack.op.axes_mapping(&inputs, &outputs)?;
    Ok(axes.axis('K')?.inputs[0]
        .first()
        .copied()
        .zip(axes.axis('M')?.inputs[0].first().copied()))
}

/// The fact of the matrices packed from `input` along `k_axis` and
/// `mn_axis` for `packers` (one format, or tract's two for vectors and
/// matrices), as tract's `OptMatMulPack` declares it.
fn packed_fact(
    input: &TypedFact,
    datum_type: DatumType,
    packers: Vec<Box<dyn MMMInputFormat>>,
    k_axis: usize,
    mn_axis: usize,
) -> TypedFact {
    use tract_onnx::tract_core::ops::matmul::pack::DynPackedExoticFact;
    let exotic = DynPackedExoticFact {
        k: input.shape[k_axis].clone(),
        mn: input.shape[mn_axis].clone(),
        packers,
    };
    datum_type
        .fact(packed_shape(&input.shape, k_axis, mn_axis))
        .with_exotic_fact(exotic)
}

/// One packed matrix `value` as a tensor, the shape of `input_shape` with
/// `k_axis` and `mn_axis` packed away.
fn packed_value(
    input_shape: &[usize],
    k_axis: usize,
    mn_axis: usize,
    value: Box<dyn MMMInputValue>,
    datum_type: DatumType,
) -> TValue {
    let shape = packed_shape(input_shape, k_axis, mn_axis);
    tract_linalg::mmm::PackedMatrixStorage::new_batched(&shape, tvec![value])
        .into_tensor(datum_type)
        .into_tvalue()
}

/// Replaces node `id`'s single output with the constant `value`, the node's
/// own fact (a packing's formats) going with it: the constant tract's
/// folding would have made of it.
fn replace_with_constant(
    model: &mut TypedModel,
    id: usize,
    value: Arc<Tensor>,
    why: &str,
) -> TractResult<()> {
    let node = model.node(id);
    let exotic = node.outputs[0].fact.exotic_fact.clone();
    let mut patch = TypedModelPatch::new(why);
    let konst = Const::new_with_opt_exotic_fact(value, exotic)?;
    let wire = patch.wire_node(&node.name, konst, &[])?[0];
    patch.shunt_outside(model, OutletId::new(id, 0), wire)?;
    patch.apply(model)
}

/// The plain tensor of constant node `id`, taken out of the graph where the
/// constant and its fact are the only holders of it (no other node, piece or
/// op shares it): the node is left a placeholder scalar constant with no value
/// in its fact, for the caller to shunt out. `None`, the graph untouched,
/// otherwise. What tract's folding would copy can then change in place.
fn take_lone_constant(model: &mut TypedModel, id: usize) -> TractResult<Option<Tensor>> {
    let node = &model.nodes[id];
    let Some(konst) = node.op_as::<Const>() else {
        return Ok(None);
    };
    let alone = Arc::strong_count(konst.val()) == 2
        && node.outputs[0].fact.konst.is_some()
        && konst.exotic_fact().is_none()
        && konst.val().is_plain();
    if !alone {
        return Ok(None);
    }
    let node = &mut model.nodes[id];
    node.outputs[0].fact.konst = None;
    let value = take_op::<Const>(node)?.val().clone();
    let tensor =
        Arc::try_unwrap(value).map_err(|_| format_err!("constant {} is shared", node.name))?;
    Ok(Some(tensor))
}

/// The op of `node`, of type `T`, taken out of the graph: the node is left a
/// placeholder scalar constant, so that what the returned op holds it holds
/// with no other holder in the graph.
fn take_op<T: TypedOp + Clone>(node: &mut TypedNode) -> TractResult<T> {
    let taken = std::mem::replace(&mut node.op, Box::new(Const::new(rctensor0(0u8))?));
    taken
        .downcast_ref::<T>()
        .cloned()
        .ok_or_else(|| format_err!("node {} is no {}", node.name, std::any::type_name::<T>()))
}

/// `shape` without the axes a packing consumes.
fn packed_shape<D: Clone>(shape: &[D], k_axis: usize, mn_axis: usize) -> TVec<D> {
    shape
        .iter()
        .enumerate()
        .filter(|(ax, _)| *ax != k_axis && *ax != mn_axis)
        .map(|(_, d)| d.clone())
        .collect()
}

/// Ids of the nodes `keep` selects.
fn node_ids(model: &TypedModel, keep: impl Fn(&TypedNode) -> bool) -> Vec<usize> {
    model
        .nodes
        .iter()
        .filter(|n| keep(n))
        .map(|n| n.id)
        .collect()
}

/// Removes the weight zero point input of `MatMulInteger` and `ConvInteger`
/// nodes whose zero point is an initializer of zeros (ONNX: an absent zero
/// point is zero). Returns how many were removed.
pub fn drop_zero_weight_zero_points(proto: &mut ModelProto) -> usize {
    let Some(graph) = proto.graph.as_mut() else {
        return 0;
    };
    let zeros: std::collections::HashSet<String> = graph
        .initializer
        .iter()
        .filter(|t| initializer_is_zero(t))
        .map(|t| t.name.clone())
        .collect();
    let mut dropped = 0;
    for node in &mut graph.node {
        let integer_op = node.op_type == "MatMulInteger" || node.op_type == "ConvInteger";
        if integer_op && node.input.len() == 4 && zeros.contains(&node.input[3]) {
            node.input.truncate(3);
            dropped += 1;
        }
    }
    dropped
}

/// True when an int8/uint8 initializer holds only zeros (raw or typed data).
fn initializer_is_zero(t: &tract_onnx::pb::TensorProto) -> bool {
    use tract_onnx::pb::tensor_proto::DataType;
    let byte_typed = t.data_type == DataType::Int8 as i32 || t.data_type == DataType::Uint8 as i32;
    if !byte_typed || !t.external_data.is_empty() {
        return false;
    }
    if !t.raw_data.is_empty() {
        t.raw_data.iter().all(|b| *b == 0)
    } else {
        !t.int32_data.is_empty() && t.int32_data.iter().all(|v| *v == 0)
    }
}

/// tract's optimiser ([`TypedModel::optimize`]) with [`fold_weight_sums`] run
/// at the start of each of its rounds, so that the int8 weights' sums are
/// folded as soon as tract's lowering makes them, before its constant
/// propagation. That propagation casts each weight to i32 to see what the
/// cast would cost, finds it four times the weight, throws it away, and does it
/// again in every round (docs/perf.md, "The fourteenth round"). With
/// [`Exactness::Close`] (whose rewrites run the fp32 weight matmuls on faer)
/// [`plain::keep`] runs there too, before tract packs the fp32 weights: the
/// graph then needs [`rewrite_optimized`] with the same exactness before it
/// runs (it packs what faer does not take). Adds what they did to `done`.
pub fn optimize(
    model: &mut TypedModel,
    done: &mut Rewrites,
    exactness: Exactness,
) -> TractResult<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let counts = Arc::new(WeightCounts::default());
    let mut optimizer = tract_onnx::tract_core::optim::Optimizer::codegen();
    optimizer.add_pass(
        0,
        Box::new(WeightsPass {
            counts: counts.clone(),
            plain: exactness == Exactness::Close,
        }),
    );
    model.optimize_with_session(&mut optimizer.session())?;
    done.folded += counts.folded.load(Relaxed);
    done.amx_packed += counts.amx_packed.load(Relaxed);
    done.plain_weights += counts.plain.load(Relaxed);
    done.reshaped += counts.reshaped.load(Relaxed);
    done.int8_packed += counts.int8_packed.load(Relaxed);
    done.int8_packed_in_place += counts.int8_in_place.load(Relaxed);
    Ok(())
}

/// What [`WeightsPass`] did, over every round.
#[derive(Debug, Default)]
struct WeightCounts {
    folded: std::sync::atomic::AtomicUsize,
    amx_packed: std::sync::atomic::AtomicUsize,
    plain: std::sync::atomic::AtomicUsize,
    reshaped: std::sync::atomic::AtomicUsize,
    int8_packed: std::sync::atomic::AtomicUsize,
    int8_in_place: std::sync::atomic::AtomicUsize,
}

/// [`fold_weight_sums`], where tract picked its AMX kernel [`amx::fold`], with
/// [`Exactness::Close`] [`plain::keep`], [`defer::fold_reshapes`] and
/// [`int8_weights::fold`], as a
/// pass at the head of tract's optimiser: each round runs it before
/// tract's constant folding. The optimiser clones its passes for each round,
/// so the counts are shared.
#[derive(Debug, Clone)]
struct WeightsPass {
    counts: Arc<WeightCounts>,
    /// Whether to run [`plain::keep`] (the faer rewrites will follow).
    plain: bool,
}

impl tract_onnx::tract_core::optim::TypedPass for WeightsPass {
    fn reset(&mut self) -> TractResult<()> {
        Ok(())
    }

    fn next(
        &mut self,
        _session: &mut tract_onnx::tract_core::optim::OptimizerSession,
        _model: &TypedModel,
    ) -> TractResult<Option<TypedModelPatch>> {
        Ok(None)
    }

    fn run_direct(&mut self, model: &mut TypedModel) -> TractResult<bool> {
        use std::sync::atomic::Ordering::Relaxed;
        let folded = fold_weight_sums(model)?;
        self.counts.folded.fetch_add(folded, Relaxed);
        #[cfg(target_arch = "x86_64")]
        let packed = amx::fold(model)?;
        #[cfg(not(target_arch = "x86_64"))]
        let packed = 0;
        self.counts.amx_packed.fetch_add(packed, Relaxed);
        let plain = if self.plain { plain::keep(model)? } else { 0 };
        self.counts.plain.fetch_add(plain, Relaxed);
        let reshaped = defer::fold_reshapes(model)?;
        self.counts.reshaped.fetch_add(reshaped, Relaxed);
        let int8 = int8_weights::fold(model)?;
        self.counts.int8_packed.fetch_add(int8.packed, Relaxed);
        self.counts.int8_in_place.fetch_add(int8.in_place, Relaxed);
        Ok(folded + packed + plain + reshaped + int8.packed > 0)
    }
}

/// Replaces each `Reduce<Sum>(Cast<i32>(w))` of a constant int8 or uint8
/// weight `w` (tract's zero-point correction of an int8 matmul) by the sums,
/// taken from the bytes without an i32 copy of the weight. The same integers
/// as tract's cast and reduction. Returns how many were replaced.
pub fn fold_weight_sums(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::cast::Cast;
    use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};
    let mut found = Vec::new();
    for node in &model.nodes {
        let Some(cast) = node.op_as::<Cast>() else {
            continue;
        };
        let [input] = node.inputs.as_slice() else {
            continue;
        };
        let Some(weights) = model.node(input.node).op_as::<Const>() else {
            continue;
        };
        let bytes = [i8::datum_type(), u8::datum_type()];
        if cast.to != i32::datum_type() || !bytes.contains(&weights.val().datum_type()) {
            continue;
        }
        let Some(reduce) = model.single_succ(node.id)? else {
            continue;
        };
        let Some(op) = reduce.op_as::<Reduce>() else {
            continue;
        };
        if let ([axis], Reducer::Sum, 1) = (op.axes.as_slice(), op.reducer, reduce.inputs.len()) {
            found.push((reduce.id, weights.val().clone(), *axis));
        }
    }
    for (reduce, weights, axis) in &found {
        let sums = if weights.datum_type() == i8::datum_type() {
            axis_sums::<i8>(weights, *axis)?
        } else {
            axis_sums::<u8>(weights, *axis)?
        };
        let mut patch = TypedModelPatch::new("fold weight sums");
        let name = format!("{}.folded", model.node(*reduce).name);
        let wire = patch.wire_node(name, Const::new(sums.into_arc_tensor())?, &[])?[0];
        patch.shunt_outside(model, OutletId::new(*reduce, 0), wire)?;
        patch.apply(model)?;
    }
    Ok(found.len())
}

/// The i32 sums of `weights` (i8, u8 or i32) over `axis`, which stays as an
/// axis of one; i32 sums wrap, as tract's do.
fn axis_sums<T: Datum + Copy + Into<i32>>(weights: &Tensor, axis: usize) -> TractResult<Tensor> {
    let shape = weights.shape();
    ensure!(axis < shape.len(), "reduced axis {axis} out of rank");
    let outer: usize = shape[..axis].iter().product();
    let k = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let view = weights.try_as_plain_ram()?;
    let values = view.as_slice::<T>()?;
    let mut sums = vec![0i32; outer * inner];
    if inner == 0 || k == 0 {
        // Nothing to add: the sums of empty rows are zero.
    } else if inner == 1 {
        for (sum, row) in sums.iter_mut().zip(values.chunks_exact(k)) {
            *sum = row.iter().fold(0i32, |acc, &x| acc.wrapping_add(x.into()));
        }
    } else {
        // Row after row into one row of sums: the loop the vectoriser takes.
        for (out, block) in sums
            .chunks_exact_mut(inner)
            .zip(values.chunks_exact(k * inner))
        {
            for row in block.chunks_exact(inner) {
                for (sum, &x) in out.iter_mut().zip(row) {
                    *sum = sum.wrapping_add(x.into());
                }
            }
        }
    }
    let mut kept = shape.to_vec();
    kept[axis] = 1;
    Tensor::from_shape(&kept, &sums)
}

/// Folds chains that start at a node whose inputs are all constants and run
/// through single-input, single-successor nodes, when the chain's end is no
/// larger than what it starts from. Returns how many chains were folded.
pub fn fold_constant_chains(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    let mut from = 0;
    while let Some((end, values, next)) = next_foldable(model, from)? {
        let mut patch = TypedModelPatch::new("fold constant chain");
        for (slot, value) in values.into_iter().enumerate() {
            let name = format!("{}.folded.{slot}", model.node(end).name);
            let wire = patch.wire_node(name, Const::new(value.into_arc_tensor())?, &[])?[0];
            patch.shunt_outside(model, OutletId::new(end, slot), wire)?;
        }
        patch.apply(model)?;
        folded += 1;
        from = next;
    }
    Ok(folded)
}

/// The next chain to fold at or after node `from`: its last node, its values,
/// and where to resume the search.
fn next_foldable(
    model: &TypedModel,
    from: usize,
) -> TractResult<Option<(usize, TVec<TValue>, usize)>> {
    'nodes: for id in from..model.nodes.len() {
        let node = model.node(id);
        if node.inputs.is_empty() || node.op_is::<Const>() || node.outputs.is_empty() {
            continue;
        }
        let inputs: Option<TVec<TValue>> = node
            .inputs
            .iter()
            .map(|i| {
                let source = model.node(i.node);
                source
                    .op_as::<Const>()
                    .map(|c| c.val().clone().into_tvalue())
            })
            .collect();
        let Some(inputs) = inputs else { continue };
        let start_bytes: usize = inputs.iter().map(bytes_of).sum();
        // Stateful or plan-only ops answer None: not foldable.
        let Ok(Some(mut values)) = node.op.eval_out_of_plan(inputs) else {
            continue;
        };
        let mut end = id;
        loop {
            if values.iter().map(bytes_of).sum::<usize>() <= start_bytes {
                break;
            }
            // Too large to keep: fold further, through a single consumer.
            let Some(succ) = model.single_succ(end)? else {
                break;
            };
            if succ.inputs.len() != 1 || model.node(end).outputs.len() != 1 {
                break;
            }
            let next = match integer_sum(succ, &values) {
                Some(sums) => Some(sums?),
                None => succ.op.eval_out_of_plan(values).ok().flatten(),
            };
            let Some(next) = next else {
                continue 'nodes;
            };
            values = next;
            end = succ.id;
        }
        let end_bytes: usize = values.iter().map(bytes_of).sum();
        // Only folds that tract left undone and that keep memory flat; the
        // graph's outputs stay computed nodes.
        let is_output = model.output_outlets()?.iter().any(|o| o.node == end);
        if end != id && end_bytes <= start_bytes && !is_output {
            return Ok(Some((end, values, id + 1)));
        }
    }
    Ok(None)
}

/// `Reduce<Sum>` of one i32 tensor, by rows, when `node` is one: the same
/// integers as tract's reduction, which walks a column at a time and took 6 ms
/// for one 768x3072 weight (200 ms of the int8 load in all). `None` for any
/// other node.
fn integer_sum(node: &TypedNode, values: &[TValue]) -> Option<TractResult<TVec<TValue>>> {
    use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};
    let reduce = node.op_as::<Reduce>()?;
    let [value] = values else { return None };
    if reduce.reducer != Reducer::Sum || value.datum_type() != i32::datum_type() {
        return None;
    }
    let sum = || -> TractResult<TVec<TValue>> {
        // The first axis is summed straight from the weights, without a copy.
        let mut sums: Option<Tensor> = None;
        for &axis in &reduce.axes {
            let from = sums.as_ref().unwrap_or(value);
            sums = Some(axis_sums::<i32>(from, axis)?);
        }
        let sums = sums.unwrap_or_else(|| value.clone().into_tensor());
        Ok(tvec![sums.into_tvalue()])
    };
    Some(sum())
}

fn bytes_of(t: &TValue) -> usize {
    t.len() * t.datum_type().size_of()
}

/// Replaces tract's `DynamicQuantizeLinearU8` with [`FastDynamicQuantize`].
pub fn replace_dynamic_quantize(model: &mut TypedModel) -> TractResult<usize> {
    let targets = node_ids(model, |n| {
        n.op.name() == "DynamicQuantizeLinearU8" && n.inputs.len() == 1
    });
    for &id in &targets {
        let node = model.node(id);
        let patch =
            TypedModelPatch::replace_single_op(model, node, &node.inputs, FastDynamicQuantize)?;
        patch.apply(model)?;
    }
    Ok(targets.len())
}

/// ONNX `DynamicQuantizeLinear` to uint8: scale from the range of the input
/// extended to include zero, zero point rounded half to even, values
/// `clamp(round_half_even(x / scale) + zero_point, 0, 255)`. Same arithmetic as
/// tract's op (division, not a reciprocal), so the same bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FastDynamicQuantize;

impl Op for FastDynamicQuantize {
    fn name(&self) -> StaticName {
        "FastDynamicQuantizeU8".into()
    }

    op_as_typed_op!();
}

impl EvalOp for FastDynamicQuantize {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = inputs[0].cast_to::<f32>()?;
        let view = input.try_as_plain_ram()?;
        let xs = view.as_slice::<f32>()?;
        let mut out = Tensor::zero::<u8>(input.shape())?;
        let (scale, zero_point) = {
            let mut out_view = out.try_as_plain_ram_mut()?;
            dynamic_quantize(xs, out_view.as_slice_mut::<u8>()?)?
        };
        Ok(tvec!(
            out.into_tvalue(),
            tensor0(scale).into_tvalue(),
            tensor0(zero_point).into_tvalue()
        ))
    }
}

impl TypedOp for FastDynamicQuantize {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut quantized = inputs[0].without_value();
        quantized.datum_type = u8::datum_type();
        Ok(tvec!(quantized, f32::scalar_fact(), u8::scalar_fact()))
    }

    as_op!();
}

/// The op's work: the range of `xs`, then each element quantised into `out`,
/// both spread over the thread pool. Returns the scale and zero point.
fn dynamic_quantize(xs: &[f32], out: &mut [u8]) -> TractResult<(f32, u8)> {
    let (scale, zero_point) = scale_and_zero_point(par_min_max(xs)?);
    let total = out.len();
    // Element by element, so any split gives the same bytes.
    tract_linalg::multithread::par_chunks_mut(out, 1, total, |first, chunk| {
        wide(Quantize {
            xs: &xs[first..first + chunk.len()],
            scale,
            zero_point,
            out: chunk,
        });
        Ok(())
    })?;
    Ok((scale, zero_point))
}

/// Blocks [`par_min_max`] splits its input into (more than threads, so that
/// uneven threads still finish together).
const MIN_MAX_BLOCKS: usize = 16;

/// [`min_max`] of `xs`, its blocks spread over the thread pool. Exact in any
/// split: the minimum and maximum do not depend on the order they are taken in
/// (NaNs are skipped and a zero never replaces a zero, in every block and when
/// the blocks are combined).
fn par_min_max(xs: &[f32]) -> TractResult<(f32, f32)> {
    let block = xs.len().div_ceil(MIN_MAX_BLOCKS).max(1);
    let mut parts = vec![(0f32, 0f32); xs.len().div_ceil(block)];
    tract_linalg::multithread::par_chunks_mut(&mut parts, 1, xs.len(), |first, chunk| {
        for (i, part) in chunk.iter_mut().enumerate() {
            let start = (first + i) * block;
            *part = wide(MinMax(&xs[start..(start + block).min(xs.len())]));
        }
        Ok(())
    })?;
    Ok(parts.iter().fold((0f32, 0f32), |(min, max), &(lo, hi)| {
        (
            if lo < min { lo } else { min },
            if hi > max { hi } else { max },
        )
    }))
}

/// The smallest and largest of 0 and `xs`, NaNs skipped: the range ONNX
/// `DynamicQuantizeLinear` quantises over.
#[inline(always)]
fn min_max(xs: &[f32]) -> (f32, f32) {
    // Eight lanes so the compiler keeps the comparisons in vector registers.
    let mut lo = [0f32; 8];
    let mut hi = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for lane in 0..8 {
            let v = chunk[lane];
            lo[lane] = if v < lo[lane] { v } else { lo[lane] };
            hi[lane] = if v > hi[lane] { v } else { hi[lane] };
        }
    }
    let mut min = 0f32;
    let mut max = 0f32;
    for v in lo.into_iter().chain(rest.iter().copied()) {
        if v < min {
            min = v;
        }
    }
    for v in hi.into_iter().chain(rest.iter().copied()) {
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// Scale and zero point of ONNX `DynamicQuantizeLinear` (uint8) for the range
/// `min..=max` from [`min_max`].
fn scale_and_zero_point((min, max): (f32, f32)) -> (f32, u8) {
    let scale = (max - min) / 255.0;
    let zero_point = (-min / scale).round_ties_even().clamp(0.0, 255.0);
    // NaN (all-zero input: 0/0) becomes 0, as `max(0.0)` makes it in tract.
    let zero_point = if zero_point.is_nan() {
        0
    } else {
        zero_point as u8
    };
    (scale, zero_point)
}

/// `clamp(round_half_even(x / scale) + zero_point, 0, 255)` for every x.
///
/// `x / scale` is NaN (scale 0 or infinite x) or within [-255, 255] (x lies in
/// the range the scale came from), and for such a float adding then
/// subtracting 1.5 * 2^23 rounds half to even in the default rounding mode,
/// with plain adds that vectorise on any x86-64 (`f32::round_ties_even` needs
/// SSE4.1 to do so). NaN maps to the zero point, as tract's `NaN as i32` = 0.
#[inline(always)]
fn quantize(xs: &[f32], scale: f32, zero_point: u8, out: &mut [u8]) {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let zp = f32::from(zero_point);
    let step = |x: f32| -> u8 {
        let q = x / scale;
        let rounded = if q.is_nan() { 0.0 } else { (q + ROUND) - ROUND };
        let v = (rounded + zp).clamp(0.0, 255.0);
        // In [0, 255] and integral: the bits of `v + 2^23` hold it exactly.
        (v + 8_388_608.0).to_bits() as u8
    };
    // A plain zip: the vectoriser takes it at any width (16 lanes under
    // AVX-512, five times the baseline build). Written as 16-lane chunks, the
    // wide builds vectorised across chunks instead (gathers, then a byte
    // extract per element) and ran slower than SSE2.
    for (x, y) in xs.iter().zip(out.iter_mut()) {
        *y = step(*x);
    }
}

/// Time-axis length the kernel for a weight matmul is chosen for by
/// [`retarget_weight_matmuls`]: 250 encoder frames, 10 s of audio, the middle
/// of what the segmenter feeds the encoder (pieces of up to 25 s).
pub const KERNEL_N_HINT: usize = 250;

/// Re-targets each fp32 weight matmul to the kernel tract itself picks when the
/// time axis is known (`MmmDispatch::preferred_kernel` at `n_hint` columns):
/// with a symbolic time axis tract falls back to its widest-`mr` kernel group
/// (64x3 on AVX-512), a third slower on one core and no faster on two
/// (docs/perf.md). The weights are repacked once for the new kernel, and the
/// activation packing ahead of the matmul becomes [`PackFor`]. Returns how
/// many matmuls were re-targeted.
pub fn retarget_weight_matmuls(model: &mut TypedModel, n_hint: usize) -> TractResult<usize> {
    let dispatch = tract_linalg::MmmDispatch::native();
    let packs = node_ids(model, |n| {
        n.op.name() == "OptMatMulPack" && n.outputs.len() == 1
    });
    let mut done = 0;
    for pack_id in packs {
        // Every matmul reading this packing moves, or none does: they share it.
        let readers: Vec<usize> = model.node(pack_id).outputs[0]
            .successors
            .iter()
            .map(|s| s.node)
            .collect();
        let mut moved = Vec::new();
        for &reader in &readers {
            match retarget(model, reader, dispatch, n_hint)? {
                Some((op, from, pack)) if from == pack_id => moved.push((reader, op, pack)),
                _ => break,
            }
        }
        let Some(pack) = moved.first().map(|(_, _, p)| p.clone()) else {
            continue;
        };
        if moved.len() != readers.len() || moved.iter().any(|(_, _, p)| *p != pack) {
            continue;
        }
        let pack_input = model.node_input_facts(pack_id)?[0].clone();
        let fact = pack.output_facts(&[&pack_input])?.remove(0);
        model.nodes[pack_id].op = Box::new(pack);
        model.nodes[pack_id].outputs[0].fact = fact;
        for (reader, op, _) in moved {
            model.nodes[reader].op = Box::new(op);
            done += 1;
        }
    }
    Ok(done)
}

/// `weights` packed for `to` straight from their panels, when both formats
/// are tract's plain f32 panels and `to`'s panels are a whole fraction of
/// theirs (AVX-512: 64 rows into 16): each new panel is, record by record, a
/// run of rows of an old one. The bytes tract's packing writes for every row
/// of the matrix; rows past its end and the padding are zeros. `None` for any
/// other pair of formats.
fn split_panels(
    weights: &tract_linalg::mmm::EagerPackedInput,
    to: &dyn MMMInputFormat,
) -> Option<TractResult<Box<dyn MMMInputValue>>> {
    use tract_linalg::pack::PackedFormat;
    let from = weights.format().downcast_ref::<PackedFormat>()?;
    let to = to.downcast_ref::<PackedFormat>()?;
    let f32_panels = |f: &PackedFormat| f.dt == f32::datum_type() && f.r > 0;
    if !f32_panels(from) || !f32_panels(to) || from.r % to.r != 0 {
        return None;
    }
    let split = || -> TractResult<Box<dyn MMMInputValue>> {
        let (m, k) = (weights.mn(), weights.k());
        let size = f32::datum_type().size_of();
        let from_panel = from.single_panel_len(k) * size;
        let source: &[u8] = &weights.packed;
        ensure!(
            source.len() >= m.div_ceil(from.r) * from_panel,
            "short panels"
        );
        // tract's own zeroed buffer for `to`, filled in place.
        let mut split = to.new_packed_buffer(k, m)?;
        let to_panel = split.panel_bytes;
        let packed = Arc::get_mut(&mut split.packed).context("a new buffer is shared")?;
        for (panel, out) in packed.chunks_exact_mut(to_panel).enumerate() {
            let first = panel * to.r;
            let rows = to.r.min(m - first) * size;
            let at = first / from.r * from_panel + first % from.r * size;
            for (record, out) in out.chunks_exact_mut(to.r * size).take(k).enumerate() {
                let at = at + record * from.r * size;
                out[..rows].copy_from_slice(&source[at..at + rows]);
            }
        }
        Ok(Box::new(split))
    };
    Some(split())
}

/// The re-targeted matmul and its new activation packing, when node `id` is an
/// fp32 matmul of constant weights by one packed activation matrix whose
/// kernel is not the one tract would prefer at `n_hint` columns.
fn retarget(
    model: &TypedModel,
    id: usize,
    dispatch: &tract_linalg::MmmDispatch,
    n_hint: usize,
) -> TractResult<Option<(OptMatMul, usize, PackFor)>> {
    use tract_linalg::mmm::{EagerPackedInput, OutputStoreSpec};
    use tract_onnx::tract_core::ops::matmul::ModePicker;
    use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, ProtoFusedSpec};

    let node = model.node(id);
    let Some(op) = node.op_as::<OptMatMul>() else {
        return Ok(None);
    };
    if op.c_fact.datum_type != f32::datum_type()
        || op
            .mmm
            .iter()
            .any(|m| m.internal_type() != f32::datum_type())
    {
        return Ok(None);
    }
    let matmuls: Vec<_> = op
        .micro_ops
        .iter()
        .filter_map(|o| match o {
            ProtoFusedSpec::AddMatMul { a, b, .. } => Some((a, b)),
            _ => None,
        })
        .collect();
    let [(MatMulOperand::Const(weights), MatMulOperand::Input(b_slot))] = matmuls.as_slice() else {
        return Ok(None);
    };
    let Some(weights) = weights.downcast_ref::<EagerPackedInput>() else {
        return Ok(None);
    };
    let Some(&pack_outlet) = node.inputs.get(*b_slot) else {
        return Ok(None);
    };
    let pack_node = model.node(pack_outlet.node);
    let unbatched = model
        .outlet_fact(pack_outlet)?
        .shape
        .iter()
        .all(|d| d.is_one());
    if pack_node.op.name() != "OptMatMulPack" || !unbatched {
        return Ok(None);
    }
    let (m, k) = (weights.mn(), weights.k());
    let Some(kernel) = dispatch.preferred_kernel(f32::datum_type(), Some(m), Some(k), Some(n_hint))
    else {
        return Ok(None);
    };
    if op.mmm.len() == 1 && op.mmm[0].name() == kernel.name() {
        return Ok(None);
    }
    let f32_packed = |f: &dyn MMMInputFormat| {
        f.downcast_ref::<tract_linalg::pack::PackedFormat>()
            .is_some_and(|p| p.dt == f32::datum_type())
    };
    let Some(packing) = kernel
        .packings()
        .iter()
        .position(|(a, b)| f32_packed(&**a) && f32_packed(&**b))
    else {
        return Ok(None);
    };
    let (a_format, b_format) = kernel.packings()[packing].clone();

    let Some((k_axis, mn_axis)) = pack_axes(model, pack_node)? else {
        return Ok(None);
    };

    // Every check passed: the weights repacked for the new kernel (the one
    // costly step).
    let repacked = match split_panels(weights, &*a_format) {
        Some(split) => split?,
        None => {
            // Unpacked row by row into one plain tensor, then packed.
            let mut plain = Tensor::zero::<f32>(&[m, k])?;
            let mut rows = plain.try_as_plain_ram_mut()?;
            for (row, slice) in rows.as_slice_mut::<f32>()?.chunks_exact_mut(k).enumerate() {
                weights.extract_at_mn_f32(row, slice)?;
            }
            a_format.prepare_one(&plain, 1, 0)?
        }
    };

    let (mr, nr) = (kernel.mr(), kernel.nr());
    let respec = |spec: &OutputStoreSpec| match spec {
        OutputStoreSpec::View { m_axis, n_axis, .. } => OutputStoreSpec::View {
            m_axis: *m_axis,
            n_axis: *n_axis,
            mr,
            nr,
        },
        OutputStoreSpec::Strides {
            row_byte_stride,
            col_byte_stride,
            ..
        } => OutputStoreSpec::Strides {
            row_byte_stride: *row_byte_stride,
            col_byte_stride: *col_byte_stride,
            mr,
            nr,
        },
    };
    let mut new_op = op.clone();
    new_op.mmm = vec![kernel];
    new_op.mode_picker = ModePicker::Single;
    let mut repacked = Some(repacked);
    for uop in &mut new_op.micro_ops {
        match uop {
            ProtoFusedSpec::AddMatMul { a, packings, .. } => {
                if let Some(value) = repacked.take() {
                    *a = MatMulOperand::Const(value);
                }
                *packings = vec![(packing, None)];
            }
            ProtoFusedSpec::Store(specs) => {
                let first = specs.first().map(respec);
                *specs = first.into_iter().collect();
            }
            ProtoFusedSpec::AddUnicast(spec, _, _) => *spec = respec(spec),
            _ => (),
        }
    }
    let pack = PackFor {
        format: b_format,
        k_axis,
        mn_axis,
    };
    Ok(Some((new_op, pack_outlet.node, pack)))
}

/// Packs an activation matrix for one kernel (what tract's `OptMatMulPack`
/// does for a single, unbatched matrix; its fields are crate-private).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PackFor {
    format: Box<dyn MMMInputFormat>,
    k_axis: usize,
    mn_axis: usize,
}

impl Op for PackFor {
    fn name(&self) -> StaticName {
        "PackFor".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?}. k axis: {}, mn axis: {}",
            self.format, self.k_axis, self.mn_axis
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for PackFor {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        let packed = self.format.prepare_one(input, self.k_axis, self.mn_axis)?;
        Ok(tvec!(packed_value(
            input.shape(),
            self.k_axis,
            self.mn_axis,
            packed,
            input.datum_type()
        )))
    }
}

impl TypedOp for PackFor {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(packed_fact(
            inputs[0],
            inputs[0].datum_type,
            vec![self.format.clone()],
            self.k_axis,
            self.mn_axis
        )))
    }

    as_op!();
}

/// Wraps matmuls that are a loop of one-row products (the depthwise
/// convolutions with a symbolic time axis: 768 products of 1 x 5 by 5 x T per
/// layer) in [`Serial`]: dispatching each of them to the thread pool costs more
/// than it runs (77 ms on one thread, 248 ms on two, 10 s of audio). Returns
/// how many were wrapped.
pub fn serialize_row_loops(model: &mut TypedModel) -> usize {
    let targets = node_ids(model, |n| {
        n.op_as::<OptMatMul>().is_some_and(|op| {
            let one_row = op.c_m_axis.is_none_or(|ax| op.c_fact.shape[ax].is_one());
            let looped =
                op.c_fact.shape.iter().enumerate().any(|(ax, d)| {
                    Some(ax) != op.c_m_axis && Some(ax) != op.c_n_axis && !d.is_one()
                });
            one_row && looped
        })
    });
    for &id in &targets {
        let inner = model.nodes[id].op.clone();
        model.nodes[id].op = Box::new(Serial(inner));
    }
    targets.len()
}

/// Runs the wrapped op on the calling thread, whatever executor the plan runs
/// under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serial(pub Box<dyn TypedOp>);

impl Op for Serial {
    fn name(&self) -> StaticName {
        format!("Serial({})", self.0.name()).into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        self.0.info()
    }

    op_as_typed_op!();
}

impl EvalOp for Serial {
    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        tract_linalg::multithread::multithread_tract_scope(
            tract_linalg::multithread::Executor::SingleThread,
            || self.0.eval(ctx, inputs),
        )
    }

    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        self.0.eval_out_of_plan(inputs)
    }

    fn state(&self, ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        self.0.state(ctx)
    }

    fn drop_session(&self, session: SessionId, node_id: usize) {
        self.0.drop_session(session, node_id)
    }
}

impl TypedOp for Serial {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.0.output_facts(inputs)
    }

    as_op!();
}

/// The matmul `node` runs, bare or kept on the calling thread ([`Serial`]).
pub(crate) fn opt_matmul(node: &TypedNode) -> Option<&OptMatMul> {
    node.op_as::<OptMatMul>().or_else(|| {
        node.op_as::<Serial>()
            .and_then(|s| s.0.as_op().downcast_ref::<OptMatMul>())
    })
}

/// The matmul kernels a plan uses, with how many products use each
/// (`avx512_mmm_f32_64x3 x226`), for the startup log.
pub fn kernel_summary<'a>(models: impl IntoIterator<Item = &'a TypedModel>) -> String {
    let mut kernels: BTreeMap<String, usize> = BTreeMap::new();
    for node in models.into_iter().flat_map(|m| &m.nodes) {
        if let Some(op) = opt_matmul(node) {
            let names: Vec<String> = op.mmm.iter().map(|m| m.name().to_string()).collect();
            *kernels.entry(names.join("|")).or_default() += 1;
        } else if node.op_is::<gemm::WeightMatMul>() {
            *kernels.entry("faer_f32".into()).or_default() += 1;
        } else if node.op_is::<products::BatchedProduct>() {
            *kernels.entry("faer_f32_batched".into()).or_default() += 1;
        }
    }
    if kernels.is_empty() {
        return "none".into();
    }
    kernels
        .iter()
        .map(|(name, n)| format!("{name} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speech::model::{Build, load_encoder_as};

    /// How far the fp32 encoder output may move with the rewrites that are not
    /// bit-exact, relative to its largest magnitude.
    const CLOSE: f32 = 1e-5;

    /// `model`'s plan with a pool of `threads` (tract's own executor for 1).
    pub(super) fn plan_on(model: &TypedModel, threads: usize) -> Arc<TypedRunnableModel> {
        let executor =
            (threads > 1).then(|| tract_linalg::multithread::Executor::multithread(threads));
        model
            .clone()
            .into_runnable_with_options(&RunOptions {
                executor,
                ..Default::default()
            })
            .expect("plan")
    }

    /// The f32 output of `model`, one input, run with a pool of `threads`.
    pub(super) fn run_f32(model: &TypedModel, input: &Tensor, threads: usize) -> Vec<f32> {
        run_f32_on(model, std::slice::from_ref(input), threads)
    }

    /// The f32 output of `model` on `inputs`, run with a pool of `threads`.
    pub(super) fn run_f32_on(model: &TypedModel, inputs: &[Tensor], threads: usize) -> Vec<f32> {
        let inputs = inputs.iter().map(|t| t.clone().into_tvalue()).collect();
        let out = plan_on(model, threads).run(inputs).expect("run");
        let view = out[0].try_as_plain_ram().expect("plain");
        view.as_slice::<f32>().expect("f32").to_vec()
    }

    /// `replaced` (a rewrite that changes bits) against `plain` (tract's) on
    /// `inputs`: within `ulps` units in the last place of the output's
    /// scale, and the same bits on one and two threads.
    pub(super) fn assert_close_on_any_pool(
        plain: &TypedModel,
        replaced: &TypedModel,
        inputs: &[Tensor],
        ulps: f32,
        what: &str,
    ) {
        let expected = run_f32_on(plain, inputs, 1);
        let scale = expected.iter().fold(0f32, |s, v| s.max(v.abs()));
        assert!(scale > 0.0, "{what}: tract's output is all zeros");
        let mut serial = None;
        for threads in [1, 2] {
            let got = run_f32_on(replaced, inputs, threads);
            assert_eq!(got.len(), expected.len(), "{what}");
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    (g - e).abs() <= ulps * f32::EPSILON * scale,
                    "{what}, {threads} threads, [{i}]: {g} against tract's {e}"
                );
            }
            let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            assert_eq!(*serial.get_or_insert_with(|| bits.clone()), bits, "{what}");
        }
    }

    /// Repeatable floats in [-1, 1) (a 64-bit LCG).
    pub(super) fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// The reference: tract 0.23.9's scalar formulas (`max`/`min`, not
    /// `clamp`, on purpose: they map NaN to 0).
    #[allow(clippy::manual_clamp)]
    fn reference(xs: &[f32]) -> (f32, u8, Vec<u8>) {
        let (min, max) = xs.iter().fold((0f32, 0f32), |(lo, hi), &v| {
            if v < lo {
                (v, hi)
            } else if v > hi {
                (lo, v)
            } else {
                (lo, hi)
            }
        });
        let scale = (max - min) / 255.0;
        let zp = (-min / scale).round_ties_even().max(0.0).min(255.0) as u8;
        let q = xs
            .iter()
            .map(|x| (((x / scale).round_ties_even() as i32) + zp as i32).clamp(0, 255) as u8)
            .collect();
        (scale, zp, q)
    }

    fn check(xs: &[f32]) {
        let (scale, zp) = scale_and_zero_point(min_max(xs));
        let mut out = vec![0u8; xs.len()];
        quantize(xs, scale, zp, &mut out);
        let (rs, rzp, rq) = reference(xs);
        assert!(scale.to_bits() == rs.to_bits() || (scale.is_nan() && rs.is_nan()));
        assert_eq!(zp, rzp);
        assert_eq!(out, rq);
        // The op's own path: the range taken in blocks on a two-thread pool,
        // and the whole op against the serial result.
        let bits = |(lo, hi): (f32, f32)| (lo.to_bits(), hi.to_bits());
        let pool = tract_linalg::multithread::Executor::multithread(2);
        tract_linalg::multithread::multithread_tract_scope(pool, || {
            let blocks = par_min_max(xs).expect("par_min_max");
            assert_eq!(bits(blocks), bits(min_max(xs)));
            let mut q = vec![0u8; xs.len()];
            let (s, z) = dynamic_quantize(xs, &mut q).expect("dynamic_quantize");
            assert_eq!((s.to_bits(), z), (scale.to_bits(), zp));
            assert_eq!(q, out);
        });
    }

    /// `out = w * x + out`, one rounding each.
    struct Fma<'a>(&'a mut [f32], &'a [f32], &'a [f32]);

    impl Wide for Fma<'_> {
        type Output = ();

        #[inline(always)]
        fn run(self) {
            for ((o, x), w) in self.0.iter_mut().zip(self.1).zip(self.2) {
                *o = w.mul_add(*x, *o);
            }
        }
    }

    /// The loops [`wide`] builds for this CPU give the bits of the same loops
    /// built for baseline x86-64. (Run with `--release` to compare vector
    /// code: an unoptimised build keeps the loops scalar either way; CI runs
    /// this module both ways.)
    #[test]
    fn wide_loops_give_the_baseline_bits() {
        let mut rnd = uniform(11);
        for len in [1usize, 15, 16, 17, 1000, 10_007] {
            let mut xs: Vec<f32> = (0..len).map(|_| rnd() * 37.5).collect();
            if len > 16 {
                xs[3] = f32::NAN;
                xs[9] = -0.0;
            }
            let bits = |(lo, hi): (f32, f32)| (lo.to_bits(), hi.to_bits());
            assert_eq!(bits(wide(MinMax(&xs))), bits(min_max(&xs)));
            let (scale, zp) = scale_and_zero_point(min_max(&xs));
            let mut plain = vec![0u8; len];
            quantize(&xs, scale, zp, &mut plain);
            let mut vector = vec![0u8; len];
            wide(Quantize {
                xs: &xs,
                scale,
                zero_point: zp,
                out: &mut vector,
            });
            assert_eq!(vector, plain, "len {len}");
            // One rounding per `mul_add`, as libm's fmaf gives it (finite
            // inputs: a NaN's payload may differ between the two).
            let finite: Vec<f32> = xs
                .iter()
                .map(|x| if x.is_nan() { 1.0 } else { *x })
                .collect();
            let ws: Vec<f32> = (0..len).map(|_| rnd()).collect();
            let mut plain: Vec<f32> = (0..len).map(|_| rnd()).collect();
            let mut vector = plain.clone();
            Fma(&mut plain, &finite, &ws).run();
            wide(Fma(&mut vector, &finite, &ws));
            let to_bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(to_bits(&vector), to_bits(&plain), "len {len}");
        }
        assert!(!wide_level().is_empty());
    }

    #[test]
    fn quantize_matches_the_reference_bit_for_bit() {
        let mut rnd = uniform(7);
        // 100_003: past tract's threshold for splitting over threads.
        for len in [0usize, 1, 7, 8, 9, 100, 4097, 100_003] {
            for spread in [1e-3f32, 1.0, 37.5, 1e6] {
                let xs: Vec<f32> = (0..len).map(|_| rnd() * spread).collect();
                check(&xs);
                let shifted: Vec<f32> = xs.iter().map(|x| x.abs() + 0.5).collect();
                check(&shifted);
                let negative: Vec<f32> = xs.iter().map(|x| -x.abs() - 0.5).collect();
                check(&negative);
            }
        }
        // Exact ties, zeros, NaN and infinities.
        check(&[0.0; 16]);
        check(&[0.0, 255.0, 0.5, 1.5, 2.5, 3.5, 254.5, 100.5, 127.5, 128.5]);
        check(&[-255.0, 0.0, -0.5, -1.5, -2.5, -3.5, -254.5, -100.5]);
        check(&[-1.0, 1.0, 0.5, -0.5, 2.5, 255.0, -255.0, 1.5]);
        check(&[f32::NAN, 1.0, -2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        check(&[f32::INFINITY, 1.0, -2.0]);
    }

    /// Runs the tiny test encoder with and without the rewrites (and the lean
    /// read) on the same input: the outputs must be the same bits, and the
    /// rewrites must have found something to do (or this proves nothing).
    fn same_bits_with_and_without(file: &str) -> Rewrites {
        // Without the softmax and the LayerNorm, the rewrites that change bits.
        same_bits_in("models/gigaam-v3-tiny-random", file)
    }

    fn same_bits_in(dir: &str, file: &str) -> Rewrites {
        let (plain, tuned, rewrites) = plain_and_tuned(dir, file, Build::Tuned(Exactness::Bits));
        let bits = |xs: &[f32]| xs.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(bits(&plain) == bits(&tuned), "{file}: outputs differ");
        rewrites
    }

    /// The encoder output of `dir/file` built by tract alone and as `build`
    /// says, on the same input, and what the rewrites did.
    fn plain_and_tuned(dir: &str, file: &str, build: Build) -> (Vec<f32>, Vec<f32>, Rewrites) {
        let (plain, _) = encoder_output(dir, file, Build::Plain);
        let (tuned, build) = encoder_output(dir, file, build);
        assert_eq!(plain.len(), tuned.len());
        // The tuned load read its weights through `lean`, the plain one through
        // tract's own reader: equal bits cover that too.
        assert!(
            build.rewrites.weights_from_file > 0,
            "{file}: no weight left in the file"
        );
        assert!(build.pieces > 1, "{file}: the graph was not cut");
        assert!(
            build.own_symbols > 0,
            "{file}: no piece has a time symbol of its own"
        );
        (plain, tuned, build.rewrites)
    }

    /// The encoder output of `dir/file` built as `build` says, on 373 frames
    /// of repeatable noise, and how it was built.
    fn encoder_output(
        dir: &str,
        file: &str,
        build: Build,
    ) -> (Vec<f32>, crate::speech::model::EncoderBuild) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(dir)
            .join(file);
        let names = ("audio_signal", "length");
        let (encoder, how) = load_encoder_as(&path, names, None, build).expect("encoder");
        let frames = 373;
        let mut rnd = uniform(11);
        let data: Vec<f32> = (0..64 * frames).map(|_| rnd() * 3.0 - 1.0).collect();
        let signal = Tensor::from_shape(&[1, 64, frames], &data).expect("signal");
        let length = Tensor::from_shape(&[1], &[frames as i64]).expect("length");
        let inputs = tvec![signal.into_tvalue(), length.into_tvalue()];
        let out = encoder
            .pieces
            .spawn()
            .and_then(|mut s| {
                if build == Build::Plain {
                    s.run(inputs, |state, i| state.run(i))
                } else {
                    s.run(inputs, run_clean)
                }
            })
            .expect("encoder run");
        let view = out[0].try_as_plain_ram().expect("plain");
        (view.as_slice::<f32>().expect("f32").to_vec(), how)
    }

    /// The root mean square of `a - b` over that of `a`.
    fn rms_difference(a: &[f32], b: &[f32]) -> f64 {
        let squares = |xs: &mut dyn Iterator<Item = f32>| -> f64 {
            xs.map(|x| f64::from(x) * f64::from(x)).sum()
        };
        let diff = squares(&mut a.iter().zip(b).map(|(x, y)| x - y));
        (diff / squares(&mut a.iter().copied())).sqrt()
    }

    /// The largest difference between `plain` and `tuned`, relative to the
    /// largest magnitude in `plain`.
    fn relative_difference(plain: &[f32], tuned: &[f32]) -> f32 {
        let scale = plain.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = plain
            .iter()
            .zip(tuned)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst / scale
    }

    /// With every rewrite, the softmax and the LayerNorm included, the fp32
    /// encoder output stays within a few units in the last place of its
    /// scale, and the int8 one as close to fp32 as tract's own (the golden
    /// tests hold the token ids).
    #[test]
    fn all_rewrites_keep_the_encoder_output_close() {
        let dir = "models/gigaam-v3-tiny-random";
        let done = assert_close(dir, "v3_e2e_rnnt_encoder.onnx");
        // Its LayerNorms have a scale and bias, as a trained model's do.
        assert_eq!(done.scaled_norms, done.norms, "{done:?}");
        assert_int8_as_close_to_fp32(dir);
    }

    /// Whether tract picks a VNNI kernel here, the only ones that pack for
    /// `PackedI8K4` on x86-64.
    fn vnni() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::arch::is_x86_feature_detected!("avx512vnni")
            || std::arch::is_x86_feature_detected!("avxvnni");
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }

    /// Whether tract runs its AMX kernel here, whose weights [`amx::fold`]
    /// packs: the CPU has AMX and the kernel let the process use its tiles.
    fn amx() -> bool {
        #[cfg(target_arch = "x86_64")]
        return tract_linalg::x86_64::amx::has_amx_int8();
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }

    #[test]
    fn int8_rewrites_change_no_bit_of_the_encoder_output() {
        let done = same_bits_with_and_without("v3_e2e_rnnt_encoder_int8.onnx");
        assert!(done.zero_points > 0, "{done:?}");
        assert!(done.quantizers > 0 && done.scaled_casts > 0, "{done:?}");
        assert!(done.biased_casts > 0 && done.batch_packs > 0, "{done:?}");
        assert!(done.depthwise > 0 && done.broadcasts > 0, "{done:?}");
        if vnni() {
            assert!(done.packs > 0 && done.quantized_packs > 0, "{done:?}");
        }
        assert_eq!(done.amx_packed > 0, amx(), "{done:?}");
        // Where tract packs the weights for its VNNI kernel, ours does, each
        // in the weight's own bytes.
        if vnni() && !amx() {
            assert!(done.int8_packed > 0, "{done:?}");
            assert_eq!(done.int8_packed_in_place, done.int8_packed, "{done:?}");
        }
        assert!(done.deferred > 0 && done.deferred_copies == 0, "{done:?}");
    }

    /// What makes a test process build the plans of a CPU with AMX.
    const AMX_ISA: (&str, &str) = ("TRACT_CPU_ISA", "+amx-int8");

    /// The plans tract builds for a CPU with AMX read nothing past a buffer,
    /// on any x86-64 CPU with AVX-512: a child process, told by
    /// `TRACT_CPU_ISA` that this CPU has AMX, builds them (and runs nothing,
    /// which a CPU without AMX could not) and checks every int8 matmul.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn amx_plans_read_nothing_past_their_buffers() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 here: tract has no AMX kernel to pick");
            return;
        }
        let exe = std::env::current_exe().expect("test binary");
        let child = "speech::tune::tests::amx_plans_in_this_process";
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                child,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(AMX_ISA.0, AMX_ISA.1)
            .output()
            .expect("run the child");
        let printed = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{printed}");
        assert!(printed.contains("1 passed"), "{printed}");
    }

    /// The child of [`amx_plans_read_nothing_past_their_buffers`]: the tiny
    /// int8 encoder (and the full-size one where `make bench` made it), built
    /// by tract alone and with the rewrites, in a process whose tract was
    /// told the CPU has AMX.
    #[test]
    #[cfg(target_arch = "x86_64")]
    #[ignore = "run by amx_plans_read_nothing_past_their_buffers, in a process told the CPU has AMX"]
    fn amx_plans_in_this_process() {
        assert_eq!(
            std::env::var(AMX_ISA.0).as_deref(),
            Ok(AMX_ISA.1),
            "run by amx_plans_read_nothing_past_their_buffers"
        );
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let full = "models/gigaam-v3-full-random/gen";
        let mut dirs = vec!["models/gigaam-v3-tiny-random"];
        if root
            .join(full)
            .join("v3_e2e_rnnt_encoder_int8.onnx")
            .exists()
        {
            dirs.push(full);
        }
        for dir in dirs {
            let path = root.join(dir).join("v3_e2e_rnnt_encoder_int8.onnx");
            for build in [Build::Plain, Build::Tuned(Exactness::Close)] {
                let names = ("audio_signal", "length");
                let (encoder, how) = load_encoder_as(&path, names, None, build).expect("encoder");
                eprintln!("{dir}, {build:?}: {}", how.kernels);
                assert!(how.kernels.contains("avx512amx_mmm_i32"), "{}", how.kernels);
                let over: Vec<String> = encoder
                    .pieces
                    .models()
                    .flat_map(pack::amx_overreads)
                    .collect();
                assert!(over.is_empty(), "{dir}, {build:?}: {over:?}");
                let tails = encoder
                    .pieces
                    .models()
                    .flat_map(|m| &m.nodes)
                    .filter(|n| n.op_is::<pack::AmxTail>())
                    .count();
                eprintln!("{dir}, {build:?}: {tails} packed activations copied for AMX");
                if build != Build::Plain {
                    // GigaAM's int8 activations are all packed by our packers,
                    // which leave the tail: the server's plan copies none.
                    assert_eq!((tails, how.rewrites.amx_tails), (0, 0), "{dir}");
                }
            }
        }
    }

    /// An [`pack::AmxTail`] before every int8 matmul's packed activations in
    /// tract's own plan of the tiny int8 encoder, as [`pack::pad_amx_reads`]
    /// puts them where tract runs AMX (here any kernel reads through them):
    /// the output keeps every bit.
    #[test]
    fn amx_tails_change_no_bit_of_tract_s_output() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/gigaam-v3-tiny-random/v3_e2e_rnnt_encoder_int8.onnx");
        let names = ("audio_signal", "length");
        let onnx = tract_onnx::onnx().model_for_path(&path).expect("onnx");
        let (typed, signal_first) =
            crate::speech::model::type_encoder(onnx, names, &path).expect("typed");
        assert!(signal_first);
        let mut plain = typed.into_optimized().expect("optimised");
        // The reference itself must be safe to run on AMX (`Build::Plain`).
        pack::pad_amx_reads(&mut plain).expect("AMX tails");
        let mut tailed = plain.clone();
        let tails = pack::pad_every_i8_read(&mut tailed).expect("tails");
        // The weight matmuls' (and the depthwise convolutions' but on AMX).
        assert!(tails >= 24, "{tails} tails");
        let frames = 97;
        let mut rnd = uniform(5);
        let data: Vec<f32> = (0..64 * frames).map(|_| rnd() * 3.0 - 1.0).collect();
        let run = |model: TypedModel| {
            let signal = Tensor::from_shape(&[1, 64, frames], &data).expect("signal");
            let length = Tensor::from_shape(&[1], &[frames as i64]).expect("length");
            let out = model
                .into_runnable()
                .and_then(|plan| plan.run(tvec![signal.into_tvalue(), length.into_tvalue()]))
                .expect("run");
            let view = out[0].try_as_plain_ram().expect("plain");
            let values = view.as_slice::<f32>().expect("f32");
            values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert!(run(plain) == run(tailed), "the tails changed the output");
    }

    /// The full-size int8 model (`make bench` generates it), where tract's
    /// fold gate bites: `cargo test --release -- --ignored full_size`.
    #[test]
    #[ignore = "needs the full-size model from make bench"]
    fn full_size_int8_rewrites_change_no_bit() {
        let done = same_bits_in(
            "models/gigaam-v3-full-random/gen",
            "v3_e2e_rnnt_encoder_int8.onnx",
        );
        assert!(
            done.zero_points > 0 && done.folded > 0 && done.quantizers > 0 && done.scaled_casts > 0,
            "{done:?}"
        );
        if vnni() {
            assert!(done.packs > 0 && done.quantized_packs > 0, "{done:?}");
        }
        assert_eq!(done.amx_packed > 0, amx(), "{done:?}");
        if vnni() && !amx() {
            assert!(done.int8_packed > 0, "{done:?}");
            assert_eq!(done.int8_packed_in_place, done.int8_packed, "{done:?}");
        }
        assert!(done.deferred > 0 && done.deferred_copies == 0, "{done:?}");
        assert_int8_as_close_to_fp32("models/gigaam-v3-full-random/gen");
    }

    /// The int8 encoder of `dir` with every rewrite against its fp32 one.
    /// Every layer quantises its activations again, so the last-place
    /// differences of the softmax and the LayerNorm flip roundings that the
    /// next layers spread (1.3 % RMS over the 16 full-size layers, where fp32
    /// moves 7e-7): what must hold is that the output is as close to fp32's
    /// as tract's own int8 is.
    fn assert_int8_as_close_to_fp32(dir: &str) {
        let (fp32, _) = encoder_output(dir, "v3_e2e_rnnt_encoder.onnx", Build::Plain);
        let (plain, tuned, done) = plain_and_tuned(
            dir,
            "v3_e2e_rnnt_encoder_int8.onnx",
            Build::Tuned(Exactness::Close),
        );
        assert!(done.softmaxes > 0 && done.norms > 0, "{done:?}");
        let (theirs, ours) = (rms_difference(&fp32, &plain), rms_difference(&fp32, &tuned));
        eprintln!(
            "{dir}: int8 from fp32, RMS: tract's {theirs:e}, ours {ours:e}; ours from tract's {:e}",
            rms_difference(&plain, &tuned)
        );
        assert!(
            ours <= 1.1 * theirs,
            "tract's int8 {theirs:e} from fp32, ours {ours:e}"
        );
    }

    /// `dir/file` with every rewrite within [`CLOSE`] of tract's output;
    /// returns what the rewrites did.
    fn assert_close(dir: &str, file: &str) -> Rewrites {
        let (plain, tuned, done) = plain_and_tuned(dir, file, Build::Tuned(Exactness::Close));
        assert!(done.softmaxes > 0 && done.norms > 0, "{file}: {done:?}");
        // Each fp32 weight kept as read went to faer, or was packed for tract.
        assert!(done.plain_weights > 0, "{file}: {done:?}");
        assert_eq!(
            done.plain_weights,
            done.gemms + done.plain_packed,
            "{file}: {done:?}"
        );
        let difference = relative_difference(&plain, &tuned);
        eprintln!("{file}: relative difference {difference:e}, {done:?}");
        assert!(
            difference <= CLOSE,
            "{file}: relative difference {difference:e}"
        );
        done
    }

    /// The same for the full-size fp32 encoder (re-targeted kernels, direct
    /// depthwise convolutions, broadcasting ops).
    #[test]
    #[ignore = "needs the full-size model from make bench"]
    fn full_size_fp32_rewrites_change_no_bit() {
        let done = same_bits_in(
            "models/gigaam-v3-full-random/gen",
            "v3_e2e_rnnt_encoder.onnx",
        );
        assert!(done.depthwise > 0 && done.broadcasts > 0, "{done:?}");
        let done = assert_close(
            "models/gigaam-v3-full-random/gen",
            "v3_e2e_rnnt_encoder.onnx",
        );
        // Every weight laid out for faer where it was read: no copy at load.
        assert_eq!(done.gemm_copies, 0, "{done:?}");
    }

    /// A weight's sums over each axis, folded from the bytes, against tract's
    /// cast and reduction of the same graph: i8 and u8, with the extremes.
    #[test]
    fn weight_sums_are_tracts_sums() {
        use tract_onnx::tract_core::ops::cast::cast;
        use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};
        fn graph(weights: Tensor, axis: usize) -> TypedModel {
            let mut model = TypedModel::default();
            let w = model.add_const("w", weights).expect("const");
            let wide = model
                .wire_node("wide", cast(i32::datum_type()), &[w])
                .expect("cast")[0];
            let sums = model
                .wire_node("sums", Reduce::new(tvec![axis], Reducer::Sum), &[wide])
                .expect("reduce");
            model.select_output_outlets(&sums).expect("outputs");
            model
        }
        let shape = [3usize, 5, 7];
        let len = shape.iter().product::<usize>();
        let signed: Vec<i8> = (0..len)
            .map(|i| [i8::MIN, i8::MAX, -1, 0, 1, 37][i % 6].wrapping_add((i / 6) as i8))
            .collect();
        let unsigned: Vec<u8> = signed.iter().map(|&x| x as u8).collect();
        let weights = [
            Tensor::from_shape(&shape, &signed).expect("i8"),
            Tensor::from_shape(&shape, &unsigned).expect("u8"),
        ];
        for w in weights {
            for axis in 0..shape.len() {
                let expected = graph(w.clone(), axis)
                    .into_runnable()
                    .expect("plan")
                    .run(tvec![])
                    .expect("run");
                let mut model = graph(w.clone(), axis);
                assert_eq!(fold_weight_sums(&mut model).expect("fold"), 1);
                let model = model.into_compact().expect("compact");
                assert!(
                    !model
                        .nodes
                        .iter()
                        .any(|n| n.op.name().starts_with("Reduce")),
                    "{:?} axis {axis}: the reduction is still there",
                    w.datum_type()
                );
                let got = model
                    .into_runnable()
                    .expect("plan")
                    .run(tvec![])
                    .expect("run");
                assert_eq!(expected[0], got[0], "{:?} axis {axis}", w.datum_type());
            }
        }
    }

    /// The int8 pattern at full size: column sums of a weight too large for
    /// tract's fold gate once cast to i32. tract leaves it; we fold it.
    #[test]
    fn column_sums_of_a_large_constant_are_folded_once() {
        use tract_onnx::tract_core::ops::cast::cast;
        use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};
        let (rows, cols) = (1024usize, 2048usize);
        let weights: Vec<i8> = (0..rows * cols).map(|i| (i % 251) as i8).collect();
        let mut model = TypedModel::default();
        let x = model.add_source("x", i32::fact([1, cols])).expect("source");
        let w = model
            .add_const("w", Tensor::from_shape(&[rows, cols], &weights).expect("w"))
            .expect("const");
        let wide = model
            .wire_node("wide", cast(i32::datum_type()), &[w])
            .expect("cast")[0];
        let sums = model
            .wire_node("sums", Reduce::new(tvec![0], Reducer::Sum), &[wide])
            .expect("reduce")[0];
        let out = model
            .wire_node("out", tract_onnx::tract_core::ops::math::add(), &[x, sums])
            .expect("add");
        model.select_output_outlets(&out).expect("outputs");
        let mut model = model.into_optimized().expect("optimized");
        let input = || {
            tvec![
                Tensor::from_shape(&[1, cols], &vec![3i32; cols])
                    .expect("x")
                    .into_tvalue()
            ]
        };
        let before = model
            .clone()
            .into_runnable()
            .expect("plan")
            .run(input())
            .expect("run");
        assert!(
            model
                .nodes
                .iter()
                .any(|n| n.op.name().starts_with("Reduce")),
            "tract folded it itself: this test no longer shows anything"
        );
        assert_eq!(fold_constant_chains(&mut model).expect("fold"), 1);
        assert!(
            !model
                .nodes
                .iter()
                .any(|n| n.op.name().starts_with("Reduce"))
        );
        let after = model
            .into_runnable()
            .expect("plan")
            .run(input())
            .expect("run");
        assert_eq!(before[0], after[0]);
    }

    #[test]
    fn integer_sums_are_tract_s_sums() {
        use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};
        let mut rnd = uniform(5);
        let data: Vec<i32> = (0..3 * 7 * 5)
            .map(|_| (rnd() * 255.0 - 128.0) as i32)
            .collect();
        let t = Tensor::from_shape(&[3, 7, 5], &data).expect("tensor");
        let fact = i32::fact([3, 7, 5]);
        for axes in [vec![0], vec![1], vec![2], vec![0, 2], vec![0, 1, 2]] {
            let mut model = TypedModel::default();
            let x = model.add_source("x", fact.clone()).expect("x");
            let op = Reduce::new(axes.iter().copied().collect(), Reducer::Sum);
            let sum = model.wire_node("sum", op, &[x]).expect("sum");
            model.select_output_outlets(&sum).expect("outputs");
            let node = model.node(sum[0].node);
            let values = [t.clone().into_tvalue()];
            let ours = integer_sum(node, &values).expect("a sum").expect("summed");
            let tract = node
                .op
                .eval_out_of_plan(values.into_iter().collect())
                .expect("eval")
                .expect("values");
            assert_eq!(ours, tract, "axes {axes:?}");
        }
        // Anything else is left to tract.
        let mut model = TypedModel::default();
        let x = model.add_source("x", fact).expect("x");
        let max = Reduce::new(tvec![0], Reducer::Max);
        let out = model.wire_node("max", max, &[x]).expect("max");
        assert!(integer_sum(model.node(out[0].node), &[t.into_tvalue()]).is_none());
    }

    /// Weights packed in 64-row panels, split into 16-row ones, against
    /// tract's packing of the plain matrix for 16 rows: every row the same,
    /// every byte of the rows the same, the rest zeros. Sizes off the panels'
    /// widths, padding records and alignments tract uses, and pairs of
    /// formats it must leave alone.
    #[test]
    fn split_panels_are_tracts_packing() {
        use tract_linalg::mmm::EagerPackedInput;
        use tract_linalg::pack::PackedFormat;
        let f32_dt = f32::datum_type();
        for (m, k) in [
            (64usize, 8usize),
            (100, 7),
            (768, 33),
            (1, 5),
            (17, 1),
            (130, 64),
        ] {
            for (pad, align) in [(0usize, 64usize), (1, 128)] {
                let data: Vec<f32> = (0..m * k).map(|i| i as f32 + 0.25).collect();
                let plain = Tensor::from_shape(&[m, k], &data).expect("plain");
                let from = PackedFormat::new(f32_dt, 64, align).with_end_padding_record(pad);
                let to = PackedFormat::new(f32_dt, 16, align).with_end_padding_record(pad);
                let packed = from.prepare_one(&plain, 1, 0).expect("64 rows");
                let packed = packed.downcast_ref::<EagerPackedInput>().expect("eager");
                let ours = split_panels(packed, &to).expect("applies").expect("split");
                let ours = ours.downcast_ref::<EagerPackedInput>().expect("eager");
                let tract = to.prepare_one(&plain, 1, 0).expect("16 rows");
                let tract = tract.downcast_ref::<EagerPackedInput>().expect("eager");
                let case = format!("{m}x{k}, padding {pad}, alignment {align}");
                assert_eq!(ours.packed.len(), tract.packed.len(), "{case}");
                assert_eq!(ours.panel_bytes, tract.panel_bytes, "{case}");
                assert_eq!((ours.mn(), ours.k()), (m, k), "{case}");
                assert!(ours.format().dyn_eq(&to), "{case}");
                let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
                for row in 0..m {
                    ours.extract_at_mn_f32(row, &mut a).expect("ours");
                    tract.extract_at_mn_f32(row, &mut b).expect("tract");
                    assert_eq!(a, b, "{case}, row {row}");
                    assert_eq!(a, data[row * k..][..k], "{case}, row {row}");
                }
                // Byte for byte where tract writes rows; zeros elsewhere.
                let record = 16 * 4;
                for (panel, (o, t)) in ours
                    .packed
                    .chunks_exact(ours.panel_bytes)
                    .zip(tract.packed.chunks_exact(tract.panel_bytes))
                    .enumerate()
                {
                    let rows = 16.min(m - panel * 16) * 4;
                    for (r, (o, t)) in o.chunks(record).zip(t.chunks(record)).enumerate() {
                        let (valid, rest) = if r < k { (rows, record) } else { (0, record) };
                        assert_eq!(o[..valid], t[..valid], "{case}, panel {panel}");
                        assert!(
                            o[valid..rest.min(o.len())].iter().all(|b| *b == 0),
                            "{case}, panel {panel}, record {r}"
                        );
                    }
                }
            }
        }
        // Not a whole fraction, or not f32: left to the plain path.
        let plain = Tensor::from_shape(&[32, 4], &[1f32; 128]).expect("plain");
        let narrow = PackedFormat::new(f32_dt, 16, 64)
            .prepare_one(&plain, 1, 0)
            .expect("16");
        let narrow = narrow.downcast_ref::<EagerPackedInput>().expect("eager");
        assert!(split_panels(narrow, &PackedFormat::new(f32_dt, 64, 64)).is_none());
        assert!(split_panels(narrow, &PackedFormat::new(f32_dt, 12, 64)).is_none());
        let half = PackedFormat::new(f16::datum_type(), 8, 64);
        assert!(split_panels(narrow, &half).is_none());
    }

    #[test]
    fn fp32_rewrites_change_no_bit_of_the_encoder_output() {
        let done = same_bits_with_and_without("v3_e2e_rnnt_encoder.onnx");
        assert!(done.depthwise > 0, "the depthwise convolutions: {done:?}");
        assert!(done.broadcasts > 0 && done.batch_packs > 0, "{done:?}");
        // Where tract's symbolic pick is not its preferred kernel (AVX-512:
        // 64x3 vs 16x12), the weight matmuls must have moved.
        let preferred = tract_linalg::MmmDispatch::native()
            .preferred_kernel(f32::datum_type(), Some(768), Some(768), Some(KERNEL_N_HINT))
            .map(|k| k.name().to_string());
        if preferred.is_some_and(|name| name.contains("avx512_mmm_f32_16x12")) {
            assert!(done.retargeted > 0, "{done:?}");
        }
    }
}
