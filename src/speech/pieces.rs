//! A graph cut into pieces that are optimised one by one and run in order.
//!
//! tract's declutter and optimiser cost more than linear time in the size of
//! the graph: every patch they apply scans the whole graph (docs/perf.md,
//! upstream report 7), so decluttering and optimising GigaAM's int8 encoder in
//! one piece took 2.2 s. Cut before each of its 16 layers, the same work takes
//! a fraction of that, the pieces are optimised on several threads at once, and
//! each piece drops its unoptimised weights as soon as it is done.
//!
//! Cuts go only between layers (see `layer_starts`). Constants are copied
//! into every piece that reads them, never passed between pieces, so each piece
//! still sees its weights as constants. A piece whose inputs are sized by an
//! expression of the graph's time symbol (`(T+3)/4` after the subsampling) is
//! sized by a bare symbol of its own instead (`own_time_symbol`), which keeps
//! tract's proofs about its shapes cheap. The pieces compute exactly what the
//! whole graph computes: the tests compare them bit for bit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::MultiBroadcastTo;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::source::TypedSource;

/// A cut graph: runnable pieces and how values flow between them.
#[derive(Debug)]
pub struct Pieces {
    pieces: Vec<Piece>,
    /// Slots of the graph's outputs.
    outputs: Vec<usize>,
    /// Slots in all; the graph's inputs are the first ones.
    slots: usize,
    /// For each graph input, its symbolic axes: (axis, symbol).
    input_symbols: Vec<Vec<(usize, Symbol)>>,
    /// How many pieces have a time symbol of their own ([`own_time_symbol`]).
    own_symbols: usize,
}

#[derive(Debug)]
struct Piece {
    plan: Arc<TypedRunnableModel>,
    /// Slots the piece's inputs are read from, in the order of its inputs.
    inputs: Vec<usize>,
    /// Slots its outputs are written to.
    outputs: Vec<usize>,
    /// Slots whose last reader is this piece (freed after it runs).
    frees: Vec<usize>,
    /// For each of its inputs, the axes whose size is a bare symbol.
    symbols: Vec<Vec<(usize, Symbol)>>,
}

/// A graph cut into parts, before each part is optimised.
struct Cut {
    parts: Vec<Part>,
    graph_outputs: Vec<usize>,
    slots: usize,
}

/// One part of a [`Cut`]: its graph and the slots it reads and writes.
struct Part {
    model: TypedModel,
    inputs: Vec<usize>,
    outputs: Vec<usize>,
}

impl Pieces {
    /// Cuts `model` (typed, not yet decluttered) before each of its layers
    /// and makes each piece runnable with `finish` (declutter, optimise,
    /// rewrite, plan), on up to `threads` threads at once. `model` is consumed
    /// so that its weights are held only by the pieces that use them. A graph
    /// with no `/layers.N/` names stays whole.
    pub fn build(
        model: TypedModel,
        threads: usize,
        finish: impl Fn(TypedModel) -> TractResult<Arc<TypedRunnableModel>> + Sync,
    ) -> TractResult<Pieces> {
        let input_symbols = symbolic_axes(&model)?;
        let Cut {
            parts,
            graph_outputs,
            slots,
        } = cut(&model)?;
        drop(model);
        // The last piece that touches each slot frees it (a value no later
        // piece reads, right after it is written); the graph's outputs stay.
        let mut last_use = vec![usize::MAX; slots];
        for (ix, part) in parts.iter().enumerate() {
            for &s in part.outputs.iter().chain(&part.inputs) {
                last_use[s] = ix;
            }
        }
        for &s in &graph_outputs {
            last_use[s] = usize::MAX;
        }
        let (models, slots_of): (Vec<_>, Vec<_>) = parts
            .into_iter()
            .map(|p| (p.model, (p.inputs, p.outputs)))
            .unzip();
        // One symbol of its own for each expression parts' inputs are sized by.
        let mut own: Vec<(TDim, Symbol)> = vec![];
        let mut jobs = vec![];
        for model in models {
            let local = match input_expression(&model)? {
                Some(e) => match own.iter().find(|(x, _)| *x == e) {
                    Some(pair) => Some(pair.clone()),
                    None => {
                        let sym = model.symbols.new_with_prefix("L");
                        model.symbols.add_assertion(format!("{sym} >= 1"))?;
                        own.push((e.clone(), sym.clone()));
                        Some((e, sym))
                    }
                },
                None => None,
            };
            jobs.push((model, local));
        }
        let localised = AtomicUsize::new(0);
        let plans = finish_all(jobs, threads, &|(model, local): (TypedModel, _)| {
            // The original is dropped here when replaced, so that the
            // optimiser's packed weights do not join its unpacked ones. A
            // piece that cannot be re-sized (an error included: this is only a
            // shortcut for the optimiser) stays as it was.
            let model = match local.map(|(e, sym)| own_time_symbol(&model, &e, &sym)) {
                Some(Ok(Some(m))) => {
                    localised.fetch_add(1, Ordering::Relaxed);
                    drop(model);
                    m
                }
                _ => model,
            };
            finish(model)
        })?;
        let pieces = plans
            .into_iter()
            .zip(slots_of)
            .enumerate()
            .map(|(ix, (plan, (inputs, outputs)))| {
                Ok(Piece {
                    symbols: symbolic_axes(plan.model())?,
                    plan,
                    inputs,
                    outputs,
                    frees: (0..slots).filter(|&s| last_use[s] == ix).collect(),
                })
            })
            .collect::<TractResult<_>>()?;
        Ok(Pieces {
            pieces,
            outputs: graph_outputs,
            slots,
            input_symbols,
            own_symbols: localised.into_inner(),
        })
    }

    /// A plan run whole, as one piece.
    pub fn whole(plan: Arc<TypedRunnableModel>) -> TractResult<Pieces> {
        let model = plan.model();
        let input_symbols = symbolic_axes(model)?;
        let inputs = model.input_outlets()?.len();
        let outputs = model.output_outlets()?.len();
        Ok(Pieces {
            pieces: vec![Piece {
                symbols: input_symbols.clone(),
                plan,
                inputs: (0..inputs).collect(),
                outputs: (inputs..inputs + outputs).collect(),
                frees: (0..inputs).collect(),
            }],
            outputs: (inputs..inputs + outputs).collect(),
            slots: inputs + outputs,
            input_symbols,
            own_symbols: 0,
        })
    }

    /// How many pieces have a time symbol of their own instead of an
    /// expression of the graph's.
    pub fn own_symbols(&self) -> usize {
        self.own_symbols
    }

    /// How many pieces the graph was cut into.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Never true: a graph has at least one piece.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The optimised pieces, in run order.
    pub fn models(&self) -> impl Iterator<Item = &TypedModel> {
        self.pieces.iter().map(|p| p.plan.model())
    }

    /// A run state (one per worker).
    pub fn spawn(self: &Arc<Self>) -> TractResult<PiecesState> {
        Ok(PiecesState {
            states: self
                .pieces
                .iter()
                .map(|p| p.plan.spawn())
                .collect::<TractResult<_>>()?,
            values: vec![None; self.slots],
            pieces: Arc::clone(self),
        })
    }
}

/// For each input of `model`, the axes whose size is a bare symbol.
fn symbolic_axes(model: &TypedModel) -> TractResult<Vec<Vec<(usize, Symbol)>>> {
    model
        .input_outlets()?
        .iter()
        .map(|o| {
            let fact = model.outlet_fact(*o)?;
            Ok(fact
                .shape
                .iter()
                .enumerate()
                .filter_map(|(axis, d)| match d {
                    TDim::Sym(s) => Some((axis, s.clone())),
                    _ => None,
                })
                .collect())
        })
        .collect()
}

/// Cuts `model` into parts, each a graph of its own whose inputs are the
/// values earlier parts (or the graph's inputs) computed.
fn cut(model: &TypedModel) -> TractResult<Cut> {
    let order = model.eval_order()?;
    let graph_inputs = model.input_outlets()?.to_vec();
    let work: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&n| !model.node(n).op_is::<Const>() && !graph_inputs.iter().any(|o| o.node == n))
        .collect();
    let mut position = vec![usize::MAX; model.nodes.len()];
    for (ix, &n) in work.iter().enumerate() {
        position[n] = ix;
    }
    let outputs = model.output_outlets()?;
    // Where each value computed by a work node is last read (work.len() when
    // it is a graph output).
    let last_read = |o: OutletId| -> usize {
        if outputs.contains(&o) {
            return work.len();
        }
        model
            .outlet_successors(o)
            .iter()
            .map(|i| position[i.node])
            .filter(|&p| p != usize::MAX)
            .max()
            .unwrap_or(position[o.node])
    };
    let mut bounds = vec![0];
    bounds.extend(layer_starts(model, &work));
    bounds.push(work.len());

    // Slots: the graph's inputs first, then each part's outputs as cut.
    let mut slot_of: HashMap<OutletId, usize> = graph_inputs
        .iter()
        .enumerate()
        .map(|(ix, o)| (*o, ix))
        .collect();
    let mut slots = graph_inputs.len();
    let mut parts = vec![];
    for range in bounds.windows(2) {
        let (start, end) = (range[0], range[1]);
        let mut part = TypedModel {
            symbols: model.symbols.clone(),
            ..TypedModel::default()
        };
        let mut map: HashMap<OutletId, OutletId> = HashMap::new();
        let mut reads = vec![];
        for &n in &work[start..end] {
            let node = model.node(n);
            let mut wires = tvec![];
            for &input in &node.inputs {
                if let Some(w) = map.get(&input) {
                    wires.push(*w);
                    continue;
                }
                let producer = model.node(input.node);
                let wire = if producer.op_is::<Const>() {
                    let facts = producer.outputs.iter().map(|o| o.fact.clone()).collect();
                    let id = part.add_node(producer.name.clone(), producer.op.clone(), facts)?;
                    OutletId::new(id, input.slot)
                } else {
                    let name = format!("{}#{}", producer.name, input.slot);
                    let fact = model.outlet_fact(input)?;
                    match &fact.konst {
                        // Known at load: a constant here too, so it still folds.
                        Some(value) => part.add_const(name, value.clone())?,
                        None => {
                            let slot = *slot_of.get(&input).with_context(|| {
                                format!("no slot for {input:?} of {}", producer.name)
                            })?;
                            reads.push(slot);
                            part.add_source(name, fact.clone())?
                        }
                    }
                };
                map.insert(input, wire);
                wires.push(wire);
            }
            let facts = node.outputs.iter().map(|o| o.fact.clone()).collect();
            let id = part.add_node(node.name.clone(), node.op.clone(), facts)?;
            for (ix, w) in wires.into_iter().enumerate() {
                part.add_edge(w, InletId::new(id, ix))?;
            }
            for slot in 0..node.outputs.len() {
                map.insert(OutletId::new(n, slot), OutletId::new(id, slot));
            }
        }
        let mut writes = vec![];
        let mut part_outputs = vec![];
        for &n in &work[start..end] {
            for slot in 0..model.node(n).outputs.len() {
                let o = OutletId::new(n, slot);
                if last_read(o) >= end {
                    let wire = map
                        .get(&o)
                        .copied()
                        .context("a node of the piece is unmapped")?;
                    slot_of.insert(o, slots);
                    writes.push(slots);
                    slots += 1;
                    part_outputs.push(wire);
                }
            }
        }
        part.select_output_outlets(&part_outputs)?;
        parts.push(Part {
            model: part,
            inputs: reads,
            outputs: writes,
        });
    }
    let graph_outputs = outputs
        .iter()
        .map(|o| {
            slot_of
                .get(o)
                .copied()
                .with_context(|| format!("graph output {o:?} is computed by no piece"))
        })
        .collect::<TractResult<_>>()?;
    Ok(Cut {
        parts,
        graph_outputs,
        slots,
    })
}

/// Sizes of a part's time axis, to check a re-sized part against the original
/// with: the first few lengths, where rounding in the subsampling bites, and
/// some long ones.
const CHECK_LENGTHS: [i64; 8] = [2, 3, 4, 5, 6, 7, 1000, 3001];

/// The one expression a part's inputs are sized by, when it is not a bare
/// symbol: after the encoder's subsampling, `(T+3)/4` in every layer.
fn input_expression(part: &TypedModel) -> TractResult<Option<TDim>> {
    let mut found: Option<TDim> = None;
    for &o in part.input_outlets()? {
        for d in part.outlet_fact(o)?.shape.iter() {
            if d.to_i64().is_ok() {
                continue;
            }
            match &found {
                Some(e) if e == d => {}
                Some(_) => return Ok(None),
                None => found = Some(d.clone()),
            }
        }
    }
    Ok(found.filter(|e| {
        !matches!(e, TDim::Sym(_))
            && e.symbols().len() == 1
            && (e.clone() - 1).prove_positive_or_zero()
    }))
}

/// `part` with its inputs sized by `own` where they were sized by
/// `expression` (see [`input_expression`]), and every shape in it re-derived
/// from those; `None` where the re-sized part's shapes are not those of
/// `part` for every length in [`CHECK_LENGTHS`], or still mention the graph's
/// symbol.
///
/// tract proves facts about the sizes of every binary op's inputs in every
/// optimiser round (which input to broadcast, whether to swap them). With
/// `(T+3)/4` in every shape, simplifying those expressions was 18 % of the
/// int8 encoder's load on the Intel Xeon (docs/perf.md, the fifteenth round);
/// with a bare symbol they are trivial. The piece is run on its inputs, and
/// [`PiecesState::run`] reads `own` off them.
fn own_time_symbol(
    part: &TypedModel,
    expression: &TDim,
    own: &Symbol,
) -> TractResult<Option<TypedModel>> {
    let Some(old) = expression.symbols().into_iter().next() else {
        return Ok(None);
    };
    let to = TDim::Sym(own.clone());
    let resize = |dims: &[TDim]| -> TractResult<TVec<TDim>> {
        dims.iter().map(|d| replaced(d, expression, &to)).collect()
    };
    let mut local = part.clone();
    for node in &mut local.nodes {
        if let Some(source) = node.op_as::<TypedSource>() {
            let mut fact = source.fact.clone();
            fact.shape = resize(&fact.shape)?.into();
            node.op = Box::new(TypedSource { fact });
        } else if let Some(k) = node.op_as::<Const>() {
            if k.val().datum_type() != TDim::datum_type() {
                continue;
            }
            let dims = resize(k.val().try_as_plain_ram()?.as_slice::<TDim>()?)?;
            let tensor = tract_ndarray::ArrayD::from_shape_vec(k.val().shape(), dims.into_vec())?;
            node.op = Box::new(Const::new(Arc::new(tensor.into()))?);
        } else if let Some(to_shape) = node.op_as::<MultiBroadcastTo>() {
            // The encoder's mask is broadcast to the time axis's size.
            let shape = resize(&to_shape.shape)?.into();
            node.op = Box::new(MultiBroadcastTo { shape });
        }
    }
    local.refresh_output_facts()?;
    for length in CHECK_LENGTHS {
        let at = SymbolValues::default().with(&old, length);
        let Ok(size) = expression.eval_to_i64(&at) else {
            return Ok(None);
        };
        let own_at = SymbolValues::default().with(own, size);
        for (was, now) in part.nodes.iter().zip(&local.nodes) {
            for (a, b) in was.outputs.iter().zip(&now.outputs) {
                let same = a.fact.datum_type == b.fact.datum_type
                    && a.fact.rank() == b.fact.rank()
                    && a.fact.shape.iter().zip(b.fact.shape.iter()).all(|(x, y)| {
                        y.symbols().iter().all(|s| s == own)
                            && x.eval_to_i64(&at).ok() == y.eval_to_i64(&own_at).ok()
                    })
                    && !mentions(&b.fact, &old)?;
                if !same {
                    return Ok(None);
                }
            }
        }
    }
    Ok(Some(local))
}

/// `dim` with `from` replaced by `to` wherever it occurs whole; an error if
/// `dim` holds a kind of expression this does not look into.
fn replaced(dim: &TDim, from: &TDim, to: &TDim) -> TractResult<TDim> {
    if dim == from {
        return Ok(to.clone());
    }
    let all = |v: &[TDim]| -> TractResult<Vec<TDim>> {
        v.iter().map(|d| replaced(d, from, to)).collect()
    };
    Ok(match dim {
        TDim::Val(_) | TDim::Sym(_) => dim.clone(),
        TDim::Add(v) => TDim::Add(all(v)?),
        TDim::Mul(v) => TDim::Mul(all(v)?),
        TDim::MulInt(k, d) => TDim::MulInt(*k, Box::new(replaced(d, from, to)?)),
        TDim::Div(d, q) => TDim::Div(Box::new(replaced(d, from, to)?), *q),
        other => bail!("no replacing in {other}"),
    }
    .simplify())
}

/// Whether `old` appears in `fact`'s value or element expression.
fn mentions(fact: &TypedFact, old: &Symbol) -> TractResult<bool> {
    if let Some(k) = &fact.konst
        && k.datum_type() == TDim::datum_type()
        && k.try_as_plain_ram()?
            .as_slice::<TDim>()?
            .iter()
            .any(|d| d.symbols().contains(old))
    {
        return Ok(true);
    }
    Ok(fact
        .uniform_tdim
        .as_ref()
        .is_some_and(|d| d.symbols().contains(old)))
}

/// Positions in `work` where a layer starts: the node is the first of
/// `/layers.N/` and every node before it belongs to an earlier layer (or to
/// none), every node after it to this layer or a later one (or to none).
///
/// Cuts go only there. Inside a layer, tract's optimiser fuses patterns (a
/// scaled matmul, a normalisation) whose halves compute other bits when split;
/// the layers of an encoder only pass the residual stream and a few shared
/// tensors (mask, positions) to each other.
fn layer_starts(model: &TypedModel, work: &[usize]) -> Vec<usize> {
    let layer = |n: usize| -> Option<usize> {
        let name = &model.node(n).name;
        let rest = &name[name.find("/layers.")? + "/layers.".len()..];
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        (digits > 0 && rest[digits..].starts_with('/'))
            .then(|| rest[..digits].parse().ok())
            .flatten()
    };
    let layers: Vec<Option<usize>> = work.iter().map(|&n| layer(n)).collect();
    // latest[p]: the highest layer among work[..p]; earliest[p]: the lowest
    // among work[p..].
    let mut latest = vec![None; work.len() + 1];
    for (p, l) in layers.iter().enumerate() {
        latest[p + 1] = latest[p].max(*l);
    }
    let mut earliest = vec![None; work.len() + 1];
    for p in (0..work.len()).rev() {
        earliest[p] = match (earliest[p + 1], layers[p]) {
            (Some(a), Some(b)) => Some(usize::min(a, b)),
            (a, b) => a.or(b),
        };
    }
    (1..work.len())
        .filter(|&p| {
            layers[p].is_some_and(|l| {
                latest[p].is_none_or(|before| before < l) && earliest[p] == Some(l)
            })
        })
        .collect()
}

/// Runs `finish` on every part, on up to `threads` threads; the plans come
/// back in part order.
fn finish_all<P: Send>(
    parts: Vec<P>,
    threads: usize,
    finish: &(impl Fn(P) -> TractResult<Arc<TypedRunnableModel>> + Sync),
) -> TractResult<Vec<Arc<TypedRunnableModel>>> {
    let count = parts.len();
    let queue = Mutex::new(parts.into_iter().enumerate());
    let work = || -> TractResult<Vec<(usize, Arc<TypedRunnableModel>)>> {
        let mut done = vec![];
        loop {
            let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some((ix, part)) = next else {
                return Ok(done);
            };
            done.push((ix, finish(part).with_context(|| format!("piece {ix}"))?));
        }
    };
    let results = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads.clamp(1, count.max(1)))
            .map(|_| scope.spawn(work))
            .collect();
        let mut results = vec![work()];
        for h in helpers {
            results.push(
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a piece's optimiser panicked"))),
            );
        }
        results
    });
    let mut plans = vec![];
    for result in results {
        plans.extend(result?);
    }
    plans.sort_by_key(|(ix, _)| *ix);
    Ok(plans.into_iter().map(|(_, plan)| plan).collect())
}

/// One worker's run states over [`Pieces`].
#[derive(Debug)]
pub struct PiecesState {
    pieces: Arc<Pieces>,
    states: Vec<TypedSimpleState>,
    values: Vec<Option<TValue>>,
}

impl PiecesState {
    /// Runs every piece in order on `inputs`, each through `run` (which runs
    /// one plan's state, as `TypedSimpleState::run` does); returns the graph's
    /// outputs.
    pub fn run(
        &mut self,
        inputs: TVec<TValue>,
        run: impl Fn(&mut TypedSimpleState, TVec<TValue>) -> TractResult<TVec<TValue>>,
    ) -> TractResult<TVec<TValue>> {
        let pieces = &*self.pieces;
        ensure!(
            inputs.len() == pieces.input_symbols.len(),
            "{} inputs given, the graph takes {}",
            inputs.len(),
            pieces.input_symbols.len()
        );
        // Later pieces see the time axis only as expressions of it (after
        // subsampling), which tract cannot always solve: resolve it here.
        let mut symbols = vec![];
        for (value, axes) in inputs.iter().zip(&pieces.input_symbols) {
            for (axis, sym) in axes {
                let size = value.shape().get(*axis).with_context(|| {
                    format!("input of rank {} has no axis {axis}", value.rank())
                })?;
                symbols.push((sym.clone(), *size as i64));
            }
        }
        self.values.iter_mut().for_each(|v| *v = None);
        for (slot, value) in inputs.into_iter().enumerate() {
            self.values[slot] = Some(value);
        }
        for (piece, state) in pieces.pieces.iter().zip(&mut self.states) {
            let inputs = piece
                .inputs
                .iter()
                .map(|&s| {
                    self.values[s]
                        .clone()
                        .context("value read before it was computed")
                })
                .collect::<TractResult<TVec<_>>>()?;
            for (sym, value) in &symbols {
                state.turn_state.resolved_symbols.set(sym, *value);
            }
            // A piece's own symbol, from its inputs (tract would find it too,
            // but only where a failed run has not left an old value behind).
            for (value, axes) in inputs.iter().zip(&piece.symbols) {
                for (axis, sym) in axes {
                    if let Some(size) = value.shape().get(*axis) {
                        state.turn_state.resolved_symbols.set(sym, *size as i64);
                    }
                }
            }
            let outputs = run(state, inputs)?;
            ensure!(
                outputs.len() == piece.outputs.len(),
                "a piece returned {} values, {} expected",
                outputs.len(),
                piece.outputs.len()
            );
            for (&slot, value) in piece.outputs.iter().zip(outputs) {
                self.values[slot] = Some(value);
            }
            for &slot in &piece.frees {
                self.values[slot] = None;
            }
        }
        pieces
            .outputs
            .iter()
            .map(|&s| self.values[s].take().context("graph output not computed"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::array::Slice;
    use tract_onnx::tract_core::ops::downsample::Downsample;
    use tract_onnx::tract_core::ops::math::{add, mul};

    /// `x * 2` before the layers, two layers that read values from further
    /// back than the piece before them, and an output from the middle.
    fn layered(names: [&str; 4]) -> TypedModel {
        let mut model = TypedModel::default();
        let t = model.symbols.sym("T");
        let x = model.add_source("x", f32::fact([t.to_dim()])).expect("x");
        let two = model.add_const("two", tensor1(&[2f32])).expect("two");
        let pre = model.wire_node(names[0], mul(), &[x, two]).expect("pre")[0];
        let first = model.wire_node(names[1], add(), &[pre, x]).expect("first")[0];
        let second = model
            .wire_node(names[2], mul(), &[first, pre])
            .expect("second")[0];
        let last = model
            .wire_node(names[3], add(), &[second, two])
            .expect("last")[0];
        model
            .select_output_outlets(&[last, first])
            .expect("outputs");
        model
    }

    /// `model` optimised whole, and cut into pieces on two threads.
    fn whole_and_pieces(model: TypedModel) -> (Arc<TypedRunnableModel>, Arc<Pieces>) {
        let whole = model
            .clone()
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .expect("whole plan");
        let pieces = Pieces::build(model, 2, |m| m.into_optimized()?.into_runnable())
            .map(Arc::new)
            .expect("pieces");
        (whole, pieces)
    }

    /// Cuts `model`, checks that the pieces compute what the whole graph
    /// computes (twice, on one state), and returns how many pieces there were.
    fn pieces_of(model: TypedModel) -> usize {
        let (whole, pieces) = whole_and_pieces(model);
        let input = || tvec![tensor1(&[1f32, -2.0, 3.5, 0.25, 8.0]).into_tvalue()];
        let expected = whole.run(input()).expect("whole run");
        let mut state = pieces.spawn().expect("state");
        let got = state.run(input(), |s, i| s.run(i)).expect("pieces run");
        // Twice: the state is reused by the next request.
        let again = state.run(input(), |s, i| s.run(i)).expect("second run");
        assert_eq!(expected, got);
        assert_eq!(got, again);
        pieces.len()
    }

    #[test]
    fn a_layered_graph_is_cut_before_each_layer_and_computes_the_same() {
        let names = [
            "/pre/Mul",
            "/layers.0/Add",
            "/layers.1/Mul",
            "/layers.1/out/Add",
        ];
        assert_eq!(pieces_of(layered(names)), 3);
    }

    #[test]
    fn a_value_known_at_load_crosses_as_a_constant() {
        // `known` is no `Const` node, but its value is known at load (as tract
        // leaves shape arithmetic before declutter); layers.1 reads it.
        let mut model = TypedModel::default();
        let t = model.symbols.sym("T");
        let x = model.add_source("x", f32::fact([t.to_dim()])).expect("x");
        let three = model.add_const("three", tensor1(&[3f32])).expect("three");
        let fact = model.outlet_fact(three).expect("fact").clone();
        let id = model
            .add_node(
                "/pre/known",
                tract_onnx::tract_core::ops::identity::Identity,
                tvec![fact],
            )
            .expect("known");
        model.add_edge(three, InletId::new(id, 0)).expect("edge");
        let known = OutletId::new(id, 0);
        let pre = model
            .wire_node("/pre/Mul", mul(), &[x, known])
            .expect("pre")[0];
        let first = model
            .wire_node("/layers.0/Add", add(), &[pre, x])
            .expect("first")[0];
        let last = model
            .wire_node("/layers.1/Mul", mul(), &[first, known])
            .expect("last");
        model.select_output_outlets(&last).expect("outputs");
        let pieces = Pieces::build(model.clone(), 1, |m| m.into_optimized()?.into_runnable())
            .expect("pieces");
        assert_eq!(pieces.len(), 3);
        assert_eq!(
            pieces.pieces[2].inputs.len(),
            1,
            "only layers.0's sum is passed"
        );
        assert_eq!(pieces_of(model), 3);
    }

    /// `x` subsampled by 4 before three layers, so that their inputs are sized
    /// by `(T+3)/4` (the third broadcasts to that size); a fourth layer's op
    /// holds that size in an attribute not re-sized.
    fn subsampled() -> TypedModel {
        let mut model = TypedModel::default();
        model.symbols.add_assertion("T >= 2").expect("assertion");
        let t = model.symbols.sym("T");
        let x = model.add_source("x", f32::fact([t.to_dim()])).expect("x");
        let down = Downsample::new(0, 4, 0);
        let down = model.wire_node("/pre/Down", down, &[x]).expect("down")[0];
        let two = model.add_const("two", tensor1(&[2f32])).expect("two");
        let first = model
            .wire_node("/layers.0/Mul", mul(), &[down, two])
            .expect("first")[0];
        let second = model
            .wire_node("/layers.1/Add", add(), &[first, down])
            .expect("second")[0];
        let shape = model.outlet_fact(second).expect("fact").shape.clone();
        let third = model
            .wire_node(
                "/layers.2/To",
                MultiBroadcastTo {
                    shape: shape.clone(),
                },
                &[second],
            )
            .expect("third")[0];
        let whole = Slice::new(0, 0, shape[0].clone());
        let last = model
            .wire_node("/layers.3/Slice", whole, &[third])
            .expect("last");
        model.select_output_outlets(&last).expect("outputs");
        model
    }

    #[test]
    fn layers_sized_by_an_expression_get_a_symbol_of_their_own() {
        let (whole, pieces) = whole_and_pieces(subsampled());
        assert_eq!(pieces.len(), 5);
        // Not the last layer: its slice holds `(T+3)/4`.
        assert_eq!(pieces.own_symbols(), 3);
        let mut models = pieces.models();
        let input = |m: &TypedModel| m.input_fact(0).expect("fact").shape[0].to_string();
        assert_eq!(input(models.next().expect("pre")), "T");
        assert_eq!(input(models.next().expect("layers.0")), "L");
        assert_eq!(input(models.next().expect("layers.1")), "L");
        assert_eq!(input(models.next().expect("layers.2")), "L");
        assert_eq!(input(models.next().expect("layers.3")), "(T+3)/4");
        let mut state = pieces.spawn().expect("state");
        // Lengths that round up and down, on one state, as a worker reuses it.
        for length in [5usize, 13, 2, 8, 5] {
            let x: Vec<f32> = (0..length).map(|i| i as f32 * 0.5 - 1.0).collect();
            let input = || tvec![tensor1(&x).into_tvalue()];
            let expected = whole.run(input()).expect("whole run");
            let got = state.run(input(), |s, i| s.run(i)).expect("pieces run");
            assert_eq!(expected, got, "length {length}");
            assert_eq!(got[0].len(), length.div_ceil(4));
        }
    }

    #[test]
    fn an_expression_is_replaced_where_it_occurs_whole() {
        let scope = SymbolScope::default();
        let parse = |s: &str| scope.parse_tdim(s).expect("dim");
        let (from, to) = (parse("(T+3)/4"), parse("L"));
        for (dim, want) in [
            ("(T+3)/4", "L"),
            ("5000+(T+3)/4", "5000+L"),
            ("2*((T+3)/4)", "2*L"),
            ("(T+3)/4*(T+3)/4", "L*L"),
            // tract writes ((T+3)/4+1)/2 so: not whole, left as it is.
            ("((T+3)/4+1)/2", "(T+7)/8"),
            ("T", "T"),
            ("(T+1)/2", "(T+1)/2"),
        ] {
            let got = replaced(&parse(dim), &from, &to).expect("replaced");
            assert_eq!(
                got.to_string(),
                parse(want).simplify().to_string(),
                "in {dim}"
            );
        }
        assert!(replaced(&parse("min(T,(T+3)/4)"), &from, &to).is_err());
    }

    #[test]
    fn a_graph_without_layers_stays_whole() {
        assert_eq!(pieces_of(layered(["a", "b", "c", "d"])), 1);
    }

    #[test]
    fn no_cut_where_a_layer_is_not_over() {
        // layers.0 goes on after layers.1 starts: only layers.0 may start a piece.
        let names = [
            "/pre/Mul",
            "/layers.0/Add",
            "/layers.1/Mul",
            "/layers.0/late/Add",
        ];
        assert_eq!(pieces_of(layered(names)), 2);
        let model = layered(["/layers.10/a", "/layers.1x/b", "/layers./c", "/layers.2"]);
        let order = model.eval_order().expect("order");
        let work: Vec<usize> = order
            .into_iter()
            .filter(|&n| !model.node(n).op_is::<Const>() && model.node(n).name != "x")
            .collect();
        assert!(layer_starts(&model, &work).is_empty());
    }
}
