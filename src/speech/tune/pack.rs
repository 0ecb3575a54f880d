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
//!
//! Where the bytes come straight from the activations' quantiser
//! ([`super::FastDynamicQuantize`]) and nothing else reads them,
//! [`QuantizePack`] quantises each row into the panels as it packs: the u8
//! tensor between the two (written, then read back) is never made.
//!
//! tract's AMX kernels read the same panels 64 `k` at a time, past the end of
//! a matrix whose `k` is not a multiple of 64 ([`amx_tail`]): both packers
//! leave those bytes, zeroed, after the panels, and [`pad_amx_reads`] copies
//! any other packed activations an AMX kernel reads (tract's own, in its
//! plans of the depthwise convolutions) into buffers that leave them too.

use tract_linalg::mmm::{
    EagerPackedInput, MMMInputFormat, MMMInputValue, PackedExoticFact, PackedMatrixStorage,
};
use tract_linalg::pack::PackedI8K4;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, ProtoFusedSpec};
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
        let Some((format, k_axis, mn_axis)) = sole_format::<PackedI8K4>(model, node)? else {
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
        // `x - 128` in wrapping u8 is `x ^ 0x80`: the i8 `OffsetU8asI8` makes.
        let flip = if self.from_u8 { SHIFT } else { 0 };
        let fill = matrix_filler(self.format.r, src, k, k_stride, mn_stride, flip);
        pack_panels(&self.format, k, mn, fill)
    }
}

/// Fills a panel of `r` rows from `src`, a `k` x `mn` matrix of bytes at
/// element strides `k_stride` and `mn_stride`, each byte XORed with `flip`:
/// the closure [`pack_panels`] and [`fill_panels`] take.
pub(super) fn matrix_filler(
    r: usize,
    src: &[u8],
    k: usize,
    k_stride: usize,
    mn_stride: usize,
    flip: u8,
) -> impl Fn(&mut [u8], usize, usize) + Sync + Send + '_ {
    move |panel, first_row, rows| {
        if k_stride == 1 {
            for row in 0..rows {
                let at = (first_row + row) * mn_stride;
                fill_row(panel, r, row, &src[at..at + k], flip);
            }
            return;
        }
        // Rows contiguous along `mn` (a weight stored `k`-major, the conv
        // module's transposed activations): four `k` of eight rows are four
        // words, turned in registers into eight quads, one for each row.
        let tiled = if mn_stride == 1 && r.is_multiple_of(8) {
            rows / 8 * 8
        } else {
            0
        };
        let quads = k / 4;
        let flip8 = u64::from_ne_bytes([flip; 8]);
        for group in (0..tiled).step_by(8) {
            for q in 0..quads {
                let mut tile = [0u64; 8];
                for (kr, word) in tile.iter_mut().take(4).enumerate() {
                    let at = (q * 4 + kr) * k_stride + first_row + group;
                    let mut bytes = [0u8; 8];
                    bytes.copy_from_slice(&src[at..at + 8]);
                    *word = u64::from_le_bytes(bytes) ^ flip8;
                }
                transpose8(&mut tile);
                let block = q * r * 4 + group * 4;
                for (row, word) in tile.iter().enumerate() {
                    let at = block + row * 4;
                    panel[at..at + 4].copy_from_slice(&word.to_le_bytes()[..4]);
                }
            }
        }
        // One `k` at a time across the rest of the panel's rows (and every
        // row's last `k % 4`): reading down `k` row by row instead took a
        // cache line per byte.
        for kk in 0..k {
            let first = if kk < quads * 4 { tiled } else { 0 };
            let at = kk * k_stride + first_row * mn_stride;
            let block = (kk / 4) * r * 4 + kk % 4;
            for row in first..rows {
                panel[block + row * 4] = src[at + row * mn_stride] ^ flip;
            }
        }
    }
}

/// Fails unless a `k` x `mn` matrix at element strides `k_stride` and
/// `mn_stride` fits in `len` bytes.
pub(super) fn ensure_fits(
    len: usize,
    k: usize,
    mn: usize,
    k_stride: usize,
    mn_stride: usize,
) -> TractResult<()> {
    if k > 0 && mn > 0 {
        let last = (k - 1) * k_stride + (mn - 1) * mn_stride;
        ensure!(
            last < len,
            "a {k} x {mn} matrix at strides {k_stride}, {mn_stride} does not fit in {len} bytes"
        );
    }
    Ok(())
}

/// Transposes the 8 x 8 bytes of `tile` (byte `j` of word `i`, counted from
/// the least significant, to byte `i` of word `j`): three rounds that swap
/// the off-diagonal halves of 2 x 2 blocks of bytes, of pairs of bytes, then
/// of quads.
pub(super) fn transpose8(tile: &mut [u64; 8]) {
    for (width, mask) in [
        (8, 0x00ff_00ff_00ff_00ff_u64),
        (16, 0x0000_ffff_0000_ffff),
        (32, 0x0000_0000_ffff_ffff),
    ] {
        let step = width / 8;
        for i in (0..8).filter(|i| i & step == 0) {
            let (a, b) = (tile[i], tile[i + step]);
            let swap = ((a >> width) ^ b) & mask;
            tile[i] = a ^ (swap << width);
            tile[i + step] = b ^ swap;
        }
    }
}

/// The format of `node` and the axes it packs from, when `node` is an
/// `OptMatMulPack` of one input into one format, of type `F`.
pub(super) fn sole_format<'a, F: MMMInputFormat>(
    model: &TypedModel,
    node: &'a TypedNode,
) -> TractResult<Option<(&'a F, usize, usize)>> {
    if node.op.name() != "OptMatMulPack" || node.inputs.len() != 1 || node.outputs.len() != 1 {
        return Ok(None);
    }
    let Some(exotic) = node.outputs[0]
        .fact
        .exotic_fact()
        .and_then(|e| e.downcast_ref::<DynPackedExoticFact>())
    else {
        return Ok(None);
    };
    let [packer] = exotic.packers.as_slice() else {
        return Ok(None);
    };
    let Some(format) = packer.downcast_ref::<F>() else {
        return Ok(None);
    };
    Ok(super::pack_axes(model, node)?.map(|(k, mn)| (format, k, mn)))
}

/// The format and axes of `node`, when it packs one matrix of a constant
/// plain i8 weight, read by nothing else, into one format, of type `F`: a
/// packing a fold of ours may do in tract's place.
pub(super) fn weight_packing<F: MMMInputFormat + Clone>(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(F, usize, usize)>> {
    let Some((format, k_axis, mn_axis)) = sole_format::<F>(model, node)? else {
        return Ok(None);
    };
    let input = node.inputs[0];
    let Some(weight) = model.node(input.node).op_as::<Const>() else {
        return Ok(None);
    };
    let weight = weight.val();
    let sole_reader = model.outlet_successors(input).len() == 1;
    let one_matrix = weight
        .shape()
        .iter()
        .enumerate()
        .all(|(ax, &d)| ax == k_axis || ax == mn_axis || d == 1);
    let plain_i8 = weight.datum_type() == DatumType::I8 && weight.is_plain();
    Ok((sole_reader && plain_i8 && one_matrix).then(|| (format.clone(), k_axis, mn_axis)))
}

/// The sizes of `input` along `k_axis` and `mn_axis`, and its element
/// strides along them.
pub(super) fn matrix(
    input: &Tensor,
    k_axis: usize,
    mn_axis: usize,
) -> TractResult<(usize, usize, usize, usize)> {
    let stride = |ax: usize| usize::try_from(input.strides()[ax]).ok();
    let (Some(k_stride), Some(mn_stride)) = (stride(k_axis), stride(mn_axis)) else {
        bail!("negative strides {:?} to pack", input.strides());
    };
    Ok((
        input.shape()[k_axis],
        input.shape()[mn_axis],
        k_stride,
        mn_stride,
    ))
}

/// The top bit: XORed into a u8 it makes `x - 128` as an i8.
const SHIFT: u8 = 0x80;

/// How many `k` tract's AMX int8 kernels (`avx512amx_mmm_i32_8x8` and
/// `_16x16`, tract 0.23.9) take in one step: each `tileloadd` of the
/// activations reads 16 blocks of four `k`, `4 r` bytes each, from a panel.
pub const AMX_K_STEP: usize = 64;

/// The bytes tract's AMX kernels read past the end of a `PackedI8K4` matrix
/// of `r` rows a panel and `k` columns. They read every panel for `k` rounded
/// up to [`AMX_K_STEP`], but `PackedI8K4` pads `k` only to a multiple of four,
/// so the last panel is read up to `60 r` bytes past its end. The weights'
/// panels are padded with zeros to the same `k` (`PackedAmxA`), so those bytes
/// change no sum; but where the buffer ends at the end of a mapped page (musl's
/// allocator places large buffers so) the load faults: SIGSEGV, seen on the
/// Intel Xeon (docs/perf.md, eighteenth round). Our packers leave this many
/// zero bytes after the panels.
pub fn amx_tail(r: usize, k: usize) -> usize {
    (k.next_multiple_of(AMX_K_STEP) - k.next_multiple_of(4)) * r
}

/// How far from its first byte tract's AMX kernels read a packed matrix:
/// every panel for `k` rounded up to [`AMX_K_STEP`], `r` rows of it.
fn amx_read_end(matrix: &EagerPackedInput) -> usize {
    let r = matrix.fact.format.r();
    match matrix.mn.div_ceil(r) {
        0 => 0,
        panels => (panels - 1) * matrix.panel_bytes + matrix.k().next_multiple_of(AMX_K_STEP) * r,
    }
}

/// The matmuls of `model` that one of tract's AMX int8 kernels would run
/// reading past the end of their activations ([`amx_tail`]): `k` not a
/// multiple of [`AMX_K_STEP`] (or not known), and the packed activations not
/// from [`PackI8K4`], [`QuantizePack`] or [`AmxTail`]. Their node names; none
/// where tract picked no AMX kernel.
#[cfg(test)]
pub(super) fn amx_overreads(model: &TypedModel) -> Vec<String> {
    overread_inputs(model)
        .into_iter()
        .map(|(id, _)| model.node(id).name.clone())
        .collect()
}

/// The matmuls [`amx_overreads`] names, each with the input slot of its
/// activations (`None` where they are a constant).
fn overread_inputs(model: &TypedModel) -> Vec<(usize, Option<usize>)> {
    i8_activations(model)
        .into_iter()
        .filter(|a| a.on_amx && !a.whole_steps && !a.ours)
        .map(|a| (a.node, a.slot))
        .collect()
}

/// The packed int8 activations one matmul reads.
struct I8Activations {
    /// The matmul.
    node: usize,
    /// Its input that they are, `None` for a constant.
    slot: Option<usize>,
    /// One of tract's AMX kernels may read them.
    on_amx: bool,
    /// `k` is a multiple of [`AMX_K_STEP`].
    whole_steps: bool,
    /// Packed by [`PackI8K4`] or [`QuantizePack`], or copied by [`AmxTail`].
    ours: bool,
}

/// The packed int8 (`PackedI8K4`) activations of every matmul in `model`.
fn i8_activations(model: &TypedModel) -> Vec<I8Activations> {
    let mut found = vec![];
    for node in &model.nodes {
        let Some(op) = super::opt_matmul(node) else {
            continue;
        };
        for uop in &op.micro_ops {
            let ProtoFusedSpec::AddMatMul {
                geo, b, packings, ..
            } = uop
            else {
                continue;
            };
            // The kernels (one per mode) that read these activations as `PackedI8K4`.
            let kernels: Vec<_> = op
                .mmm
                .iter()
                .zip(packings)
                .filter(|(mmm, (packing, _))| {
                    mmm.packings()
                        .get(*packing)
                        .is_some_and(|(_, b)| b.downcast_ref::<PackedI8K4>().is_some())
                })
                .map(|(mmm, _)| mmm.name())
                .collect();
            if kernels.is_empty() {
                continue;
            }
            let slot = match b {
                MatMulOperand::Input(slot) => Some(*slot),
                MatMulOperand::Const(_) => None,
            };
            let ours = slot.and_then(|s| node.inputs.get(s)).is_some_and(|input| {
                let packer = model.node(input.node);
                packer.op_is::<PackI8K4>()
                    || packer.op_is::<QuantizePack>()
                    || packer.op_is::<AmxTail>()
            });
            found.push(I8Activations {
                node: node.id,
                slot,
                on_amx: kernels.iter().any(|n| n.starts_with("avx512amx_mmm_i32")),
                whole_steps: geo.k.to_usize().is_ok_and(|k| k % AMX_K_STEP == 0),
                ours,
            });
        }
    }
    found
}

/// Puts an [`AmxTail`] before each matmul that one of tract's AMX kernels
/// would run reading past the end of its packed activations
/// ([`amx_overreads`]), on that input alone. Returns how many it put; fails
/// on a matmul whose activations are a constant (none in GigaAM's graphs).
pub fn pad_amx_reads(model: &mut TypedModel) -> TractResult<usize> {
    let mut at = vec![];
    for (id, slot) in overread_inputs(model) {
        let Some(slot) = slot else {
            bail!(
                "{}: tract's AMX kernel would read past its constant activations",
                model.node(id).name
            );
        };
        at.push((id, slot));
    }
    put_tails(model, &at)
}

/// Puts an [`AmxTail`] on input `slot` of node `id` for each `(id, slot)`
/// of `at`; returns how many it put.
fn put_tails(model: &mut TypedModel, at: &[(usize, usize)]) -> TractResult<usize> {
    for &(id, slot) in at {
        let input = model.node(id).inputs[slot];
        let fact = model.outlet_fact(input)?.clone();
        let name = format!("{}.amx_tail", model.node(id).name);
        let tail = model.add_node(name, AmxTail, tvec!(fact))?;
        model.add_edge(input, InletId::new(tail, 0))?;
        model.add_edge(OutletId::new(tail, 0), InletId::new(id, slot))?;
    }
    Ok(at.len())
}

/// Puts an [`AmxTail`] before every matmul's packed int8 activations that
/// are not ours, whatever the kernel: what [`pad_amx_reads`] does on a CPU
/// with AMX, for a test on any CPU. Returns how many it put.
#[cfg(test)]
pub(super) fn pad_every_i8_read(model: &mut TypedModel) -> TractResult<usize> {
    let at: Vec<_> = i8_activations(model)
        .into_iter()
        .filter(|a| !a.ours)
        .filter_map(|a| Some((a.node, a.slot?)))
        .collect();
    put_tails(model, &at)
}

/// Copies packed int8 activations (tract's, of any batch) into buffers that
/// end where tract's AMX kernels stop reading ([`amx_tail`]): the same bytes,
/// then zeros.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AmxTail;

impl Op for AmxTail {
    fn name(&self) -> StaticName {
        "AmxTail".into()
    }

    op_as_typed_op!();
}

impl EvalOp for AmxTail {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        let storage = input.try_storage_as::<PackedMatrixStorage>()?;
        let mut values: TVec<Box<dyn MMMInputValue>> = tvec![];
        for value in storage.values() {
            let Some(eager) = value.downcast_ref::<EagerPackedInput>() else {
                bail!("AmxTail: {value} is not a packed matrix in memory");
            };
            let bytes = eager.packed.as_bytes();
            let read_end = amx_read_end(eager);
            let align = eager.packed.layout().align();
            let mut blob =
                Tensor::zero_aligned::<i8>(&[bytes.len().max(read_end)], align)?.into_blob()?;
            blob.as_bytes_mut()[..bytes.len()].copy_from_slice(bytes);
            values.push(Box::new(EagerPackedInput {
                fact: eager.fact.clone(),
                packed: Arc::new(blob),
                panel_bytes: eager.panel_bytes,
                mn: eager.mn,
            }));
        }
        let output = PackedMatrixStorage::new_batched(storage.batch_shape(), values)
            .into_tensor(input.datum_type());
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for AmxTail {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].clone()))
    }

    as_op!();
}

/// A zeroed buffer for `k` x `mn` in `format`, its panels filled by
/// [`fill_panels`]; then [`amx_tail`] zero bytes.
fn pack_panels(
    format: &PackedI8K4,
    k: usize,
    mn: usize,
    fill: impl Fn(&mut [u8], usize, usize) + Sync + Send,
) -> TractResult<Blob> {
    let total = format.len(k, mn);
    // The zeroed tail after the panels is what tract's AMX kernels read past
    // them (`amx_tail`); no kernel gets anything from it.
    let mut packed =
        Tensor::zero_aligned::<i8>(&[total + amx_tail(format.r, k)], format.alignment())?
            .into_blob()?;
    fill_panels(format, k, mn, &mut packed.as_bytes_mut()[..total], fill)?;
    Ok(packed)
}

/// Hands each panel of `out` (`k` x `mn` in `format`, `format.len(k, mn)`
/// bytes) to `fill` with the first `mn` row it holds and how many it holds
/// (the last panel may hold fewer than `r`), the panels split across the pool.
pub(super) fn fill_panels(
    format: &PackedI8K4,
    k: usize,
    mn: usize,
    out: &mut [u8],
    fill: impl Fn(&mut [u8], usize, usize) + Sync + Send,
) -> TractResult<()> {
    let r = format.r;
    let panel_len = format.single_panel_len(k);
    let total = format.len(k, mn);
    ensure!(
        out.len() == total,
        "{} bytes for {total} of panels",
        out.len()
    );
    if panel_len == 0 {
        return Ok(());
    }
    tract_linalg::multithread::par_chunks_mut(out, panel_len, total, |first, chunk| {
        for (i, panel) in chunk.chunks_exact_mut(panel_len).enumerate() {
            let first_row = (first + i) * r;
            fill(panel, first_row, r.min(mn - first_row));
        }
        Ok(())
    })
}

/// A packing format whose panels are all one length.
pub(super) trait Panels: MMMInputFormat + Clone {
    /// The bytes of one panel of `k` columns.
    fn panel_len(&self, k: usize) -> usize;
}

impl Panels for PackedI8K4 {
    fn panel_len(&self, k: usize) -> usize {
        self.single_panel_len(k)
    }
}

/// The packed matrix `packed` of `input_shape` as the tensor tract's
/// `OptMatMulPack` outputs.
pub(super) fn packed_matrix<F: Panels>(
    format: &F,
    input_shape: &[usize],
    k_axis: usize,
    mn_axis: usize,
    packed: Blob,
) -> TValue {
    let (k, mn) = (input_shape[k_axis], input_shape[mn_axis]);
    let value = EagerPackedInput {
        fact: PackedExoticFact {
            format: Box::new(format.clone()),
            mn: mn.to_dim(),
            k,
        },
        packed: Arc::new(packed),
        panel_bytes: format.panel_len(k),
        mn,
    };
    super::packed_value(input_shape, k_axis, mn_axis, Box::new(value), DatumType::I8)
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
        let (k, mn, k_stride, mn_stride) = matrix(input, self.k_axis, self.mn_axis)?;
        let view = input.try_as_plain_ram()?;
        let packed = self.pack(view.as_bytes(), k, mn, k_stride, mn_stride)?;
        Ok(tvec!(packed_matrix(
            &self.format,
            input.shape(),
            self.k_axis,
            self.mn_axis,
            packed
        )))
    }
}

impl TypedOp for PackI8K4 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == self.input_type());
        Ok(tvec!(super::packed_fact(
            inputs[0],
            DatumType::I8,
            vec![Box::new(self.format.clone())],
            self.k_axis,
            self.mn_axis
        )))
    }

    as_op!();
}

/// Fuses each [`PackI8K4`] from u8 whose input is the quantised tensor of an
/// f32 [`super::FastDynamicQuantize`], read by nothing else, into one
/// [`QuantizePack`]. Returns how many were fused.
pub fn fuse_quantize_packs(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        let Some(pack) = node.op_as::<PackI8K4>() else {
            continue;
        };
        let bytes = node.inputs[0];
        let quantiser = &model.nodes[bytes.node];
        let fusable = pack.from_u8
            && quantiser.op_is::<super::FastDynamicQuantize>()
            && bytes.slot == 0
            && super::sole_reader(model, bytes)?.is_some()
            && model.outlet_fact(quantiser.inputs[0])?.datum_type == DatumType::F32
            // Rows along `k`: where `mn` is the inner axis (the conv module's
            // transposed activations) a fused pass measured no faster.
            && pack.k_axis + 1 == model.outlet_fact(bytes)?.rank();
        if !fusable {
            continue;
        }
        let op = QuantizePack {
            format: pack.format.clone(),
            k_axis: pack.k_axis,
            mn_axis: pack.mn_axis,
        };
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, quantiser.inputs[0])?;
        let outs = patch.wire_node(&quantiser.name, op, &[x])?;
        if patch.outlet_fact(outs[0])? != &node.outputs[0].fact {
            continue;
        }
        patch.shunt_outside(model, OutletId::new(id, 0), outs[0])?;
        for slot in 1..3 {
            patch.shunt_outside(model, OutletId::new(quantiser.id, slot), outs[slot])?;
        }
        patch.apply(model)?;
        done += 1;
    }
    Ok(done)
}

/// ONNX `DynamicQuantizeLinear` to u8 of an f32 matrix, packed for the VNNI
/// kernel as [`PackI8K4`] packs the u8 bytes: the same outputs as
/// [`super::FastDynamicQuantize`] followed by [`PackI8K4`] (the packed
/// matrix, the scale and the zero point), the same bytes, without the u8
/// tensor between them. Each row is quantised into a buffer of one row and
/// packed from there while it is in the L1 cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuantizePack {
    format: PackedI8K4,
    k_axis: usize,
    mn_axis: usize,
}

impl Op for QuantizePack {
    fn name(&self) -> StaticName {
        "QuantizePackI8K4".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?}. k axis: {}, mn axis: {}",
            self.format, self.k_axis, self.mn_axis
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QuantizePack {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        ensure!(
            input.datum_type() == DatumType::F32,
            "QuantizePackI8K4: {:?} input, expected F32",
            input.datum_type()
        );
        let (k, mn, k_stride, mn_stride) = matrix(input, self.k_axis, self.mn_axis)?;
        let view = input.try_as_plain_ram()?;
        let xs = view.as_slice::<f32>()?;
        let (scale, zero_point) = super::scale_and_zero_point(super::par_min_max(xs)?);
        let packed = pack_panels(&self.format, k, mn, |panel, first_row, rows| {
            super::wide(QuantizePanel {
                xs,
                panel,
                r: self.format.r,
                first_row,
                rows,
                k,
                k_stride,
                mn_stride,
                scale,
                zero_point,
            })
        })?;
        Ok(tvec!(
            packed_matrix(
                &self.format,
                input.shape(),
                self.k_axis,
                self.mn_axis,
                packed
            ),
            tensor0(scale).into_tvalue(),
            tensor0(zero_point).into_tvalue()
        ))
    }
}

impl TypedOp for QuantizePack {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == DatumType::F32);
        Ok(tvec!(
            super::packed_fact(
                inputs[0],
                DatumType::I8,
                vec![Box::new(self.format.clone())],
                self.k_axis,
                self.mn_axis
            ),
            f32::scalar_fact(),
            u8::scalar_fact()
        ))
    }

    as_op!();
}

/// One panel of [`QuantizePack`] (rows `first_row..first_row + rows` of
/// `mn`) as [`super::wide`] work.
struct QuantizePanel<'a> {
    xs: &'a [f32],
    panel: &'a mut [u8],
    r: usize,
    first_row: usize,
    rows: usize,
    k: usize,
    k_stride: usize,
    mn_stride: usize,
    scale: f32,
    zero_point: u8,
}

impl super::Wide for QuantizePanel<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let k = self.k;
        let mut bytes = vec![0u8; k];
        // Only for a row that is not contiguous (`k` not the inner axis).
        let mut gathered = Vec::new();
        for row in 0..self.rows {
            let at = (self.first_row + row) * self.mn_stride;
            let values = if self.k_stride == 1 {
                &self.xs[at..at + k]
            } else {
                gathered.clear();
                gathered.extend((0..k).map(|kk| self.xs[at + kk * self.k_stride]));
                &gathered[..]
            };
            super::quantize(values, self.scale, self.zero_point, &mut bytes);
            fill_row(self.panel, self.r, row, &bytes, SHIFT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_linalg::mmm::{MMMInputFormat, MMMInputValue, PackedMatrixStorage};

    /// The packed bytes, their alignment, panel size, `mn` and `k` of one
    /// packed matrix.
    type Packed = (Vec<u8>, usize, usize, usize, usize);

    /// The panels of `value`, without the zero bytes after them (which
    /// tract's own packers do not leave, and ours must: [`amx_tail`]).
    fn packed(value: &dyn MMMInputValue) -> Packed {
        let eager = value
            .downcast_ref::<EagerPackedInput>()
            .expect("eager packed");
        let bytes = eager.packed.as_bytes();
        let panels = eager.mn.div_ceil(eager.fact.format.r()) * eager.panel_bytes;
        assert!(
            bytes[panels..].iter().all(|b| *b == 0),
            "non-zero bytes after the panels"
        );
        (
            bytes[..panels].to_vec(),
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
    fn transposes_eight_by_eight_bytes() {
        let mut tile = [0u64; 8];
        for (i, word) in tile.iter_mut().enumerate() {
            *word = u64::from_le_bytes(std::array::from_fn(|j| (i * 8 + j) as u8));
        }
        transpose8(&mut tile);
        for (j, word) in tile.iter().enumerate() {
            let expected: [u8; 8] = std::array::from_fn(|i| (i * 8 + j) as u8);
            assert_eq!(word.to_le_bytes(), expected, "word {j}");
        }
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

    /// Stored `[k, rows]`, as the conv module's activations are, with a
    /// last panel part full, on one and two threads.
    #[test]
    fn packs_a_matrix_stored_k_major() {
        for (rows, k) in [(21, 10), (37, 130), (250, 768)] {
            let format = PackedI8K4::new(16);
            let values: Vec<i8> = bytes(rows, k).into_iter().map(|b| b as i8).collect();
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
            for threads in [1, 2] {
                let executor = tract_linalg::multithread::Executor::multithread(threads);
                let input = Tensor::from_shape(&[k, rows], &transposed).expect("tensor");
                let got = tract_linalg::multithread::multithread_tract_scope(executor, || {
                    run(&op, input)
                });
                assert_eq!(got, expected, "{rows}x{k}, {threads} threads");
            }
        }
    }

    /// Activations like a layer's: spread around zero, a run of exact
    /// zeros, and a NaN where `nan`.
    fn activations(len: usize, nan: bool) -> Vec<f32> {
        let mut rnd = super::super::tests::uniform(31);
        let mut xs: Vec<f32> = (0..len).map(|_| rnd() * 3.0 - 1.0).collect();
        for x in xs.iter_mut().skip(len / 3).take(5) {
            *x = 0.0;
        }
        if nan {
            xs[len / 2] = f32::NAN;
        }
        xs
    }

    /// The quantiser then the packing, as tract would run them after the
    /// other rewrites: the packed matrix, the scale and the zero point.
    fn two_ops(op: &QuantizePack, input: &Tensor) -> (Packed, f32, u8) {
        let ctx = EvalContext::out_of_plan();
        let quantised = super::super::FastDynamicQuantize
            .eval(&ctx, tvec![input.clone().into_tvalue()])
            .expect("quantise");
        let pack = PackI8K4 {
            format: op.format.clone(),
            k_axis: op.k_axis,
            mn_axis: op.mn_axis,
            from_u8: true,
        };
        let packed = run(&pack, quantised[0].clone().into_tensor());
        let scale = quantised[1].cast_to_scalar::<f32>().expect("scale");
        let zero_point = quantised[2].cast_to_scalar::<u8>().expect("zero point");
        (packed, scale, zero_point)
    }

    /// The fused op against the two, with `k` the inner axis (the attention
    /// and feed-forward matmuls) and the outer one (the conv module's), on
    /// one and two threads: the same bytes, scale and zero point.
    #[test]
    fn quantises_and_packs_the_same_bytes_as_the_two_ops() {
        for (rows, k) in [(1, 1), (5, 7), (16, 64), (37, 130), (250, 768)] {
            for (k_inner, nan) in [(true, false), (false, false), (true, true)] {
                let (shape, k_axis, mn_axis) = if k_inner {
                    ([1, rows, k], 2, 1)
                } else {
                    ([1, k, rows], 1, 2)
                };
                let input = Tensor::from_shape(&shape, &activations(rows * k, nan)).expect("x");
                let op = QuantizePack {
                    format: PackedI8K4::new(16),
                    k_axis,
                    mn_axis,
                };
                let expected = two_ops(&op, &input);
                for threads in [1, 2] {
                    let executor = tract_linalg::multithread::Executor::multithread(threads);
                    let out = tract_linalg::multithread::multithread_tract_scope(executor, || {
                        op.eval(
                            &EvalContext::out_of_plan(),
                            tvec![input.clone().into_tvalue()],
                        )
                        .expect("eval")
                    });
                    let storage = out[0]
                        .try_storage_as::<PackedMatrixStorage>()
                        .expect("packed storage");
                    let got = (
                        packed(storage.value()),
                        out[1].cast_to_scalar::<f32>().expect("scale"),
                        out[2].cast_to_scalar::<u8>().expect("zero point"),
                    );
                    assert!(
                        got == expected,
                        "{rows}x{k}, k inner {k_inner}, NaN {nan}, {threads} threads"
                    );
                }
            }
        }
    }

    /// Both packers leave the bytes the AMX kernels read past the last panel,
    /// for every `k` (tract's own packer, the reference, leaves none where `k`
    /// is not a multiple of 64), with either panel width those kernels take.
    #[test]
    fn leave_the_bytes_the_amx_kernels_read_past_the_panels() {
        for r in [8, 16] {
            for (rows, k) in [(1, 1), (5, 7), (16, 64), (17, 65), (37, 130), (250, 768)] {
                let format = PackedI8K4::new(r);
                let pack = PackI8K4 {
                    format: format.clone(),
                    k_axis: 1,
                    mn_axis: 0,
                    from_u8: false,
                };
                let input = Tensor::from_shape(&[rows, k], &vec![1i8; rows * k]).expect("i8");
                let out = pack
                    .eval(&EvalContext::out_of_plan(), tvec![input.into_tvalue()])
                    .expect("pack");
                let quantize = QuantizePack {
                    format: format.clone(),
                    k_axis: 1,
                    mn_axis: 0,
                };
                let input =
                    Tensor::from_shape(&[rows, k], &activations(rows * k, false)).expect("f32");
                let quantized = quantize
                    .eval(&EvalContext::out_of_plan(), tvec![input.into_tvalue()])
                    .expect("quantize and pack");
                for (what, out) in [("PackI8K4", &out[0]), ("QuantizePack", &quantized[0])] {
                    let storage = out
                        .try_storage_as::<PackedMatrixStorage>()
                        .expect("packed storage");
                    let value = storage.value();
                    let eager = value.downcast_ref::<EagerPackedInput>().expect("eager");
                    assert!(
                        eager.packed.len() >= amx_read_end(eager),
                        "{what} r {r}, {rows}x{k}: {} bytes, read to {}",
                        eager.packed.len(),
                        amx_read_end(eager)
                    );
                    // The bytes only: no more than that, and zeros (`packed`).
                    assert_eq!(eager.packed.len(), format.len(k, rows) + amx_tail(r, k));
                    packed(value);
                }
            }
        }
        // The reference: tract's packer stops at the panels.
        let matrix = Tensor::from_shape(&[5, 7], &[1i8; 35]).expect("i8");
        let theirs = PackedI8K4::new(16)
            .prepare_one(&matrix, 1, 0)
            .expect("pack");
        let eager = theirs.downcast_ref::<EagerPackedInput>().expect("eager");
        assert!(eager.packed.len() < amx_read_end(eager));
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
