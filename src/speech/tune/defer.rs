//! The large weights kept out of tract's declutter as values, so that its axis
//! changes reshape them instead of copying them.
//!
//! tract's declutter moves axis changes through the graph (its `ChangeAxes`
//! pass), and where one reaches a constant, `Const::change_axes` first clones
//! the tensor (the op and its output fact share it, so the clone is a copy),
//! even for a change that only adds, removes or splits an axis and so moves no
//! byte. Its constant folding turns an `AddAxis` after a weight into another
//! copy the same way. In GigaAM's encoder each weight went through one to
//! three of those copies: fp32 copied 706 MiB that way for its 844 MiB of
//! weights, int8 about 380 MiB for 214 MiB (docs/perf.md, the twenty-third
//! round), every copy in fresh memory while the original was still held.
//!
//! [`defer`] swaps each large constant for a [`Deferred`] op that holds the
//! tensor but gives tract a fact without its value, and takes each axis change
//! tract pushes into it by noting it and changing its fact's shape. [`install`]
//! puts the constants back once the declutter is done, each change applied to
//! the tensor by tract's own `AxisOp::change_tensor`: in place where the op
//! holds the tensor alone (adding, removing or splitting an axis moves no
//! byte), on a copy otherwise, as tract would have. What the declutter would
//! have done with a weight's value (fold a split or a reshape of it) waits for
//! the optimiser, where [`fold_reshapes`] does the reshapes in place; after it
//! the plan is tract's, op for op, each constant the same value (tested).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::konst::Const;

/// Constants of at least this many bytes are deferred: the weights (those
/// read from the file, `lean::EXTERNAL_MIN_BYTES`), and none of the shapes,
/// indices, scalars and biases whose values tract's declutter reads.
pub const DEFER_MIN_BYTES: usize = 16 * 1024;

/// What [`install`] did, for the startup log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// Weights put back as constants.
    pub weights: usize,
    /// Axis changes applied to them.
    pub changes: usize,
    /// Of the weights, those shared with another holder (another piece reads
    /// them, or a change moved an axis), whose changes made a copy.
    pub copies: usize,
}

/// A weight held back from tract's declutter: its value, the axis changes
/// the declutter pushed into it, and the fact they give it.
#[derive(Debug, Clone)]
pub struct Deferred {
    value: Arc<Tensor>,
    changes: Vec<AxisOp>,
    /// The value's type and shape after the changes, with no value.
    fact: TypedFact,
}

impl Deferred {
    fn new(value: Arc<Tensor>) -> Deferred {
        let fact = TypedFact::dt_shape(value.datum_type(), value.shape());
        Deferred {
            value,
            changes: vec![],
            fact,
        }
    }

    /// The value with the changes applied: in place when `value` is the only
    /// holder of the tensor, else on a copy (none without changes). True when
    /// no byte was copied.
    fn apply(value: Arc<Tensor>, changes: &[AxisOp]) -> TractResult<(Arc<Tensor>, bool)> {
        if changes.is_empty() {
            return Ok((value, true));
        }
        let (mut tensor, mut in_place) = match Arc::try_unwrap(value) {
            Ok(tensor) => (tensor, true),
            Err(shared) => ((*shared).clone(), false),
        };
        for change in changes {
            // Moving an axis makes a new tensor (`Tensor::moved_axis`).
            in_place &= !matches!(change.canonical().as_ref(), AxisOp::Move(..));
            change.change_tensor(&mut tensor, false)?;
        }
        Ok((tensor.into_arc_tensor(), in_place))
    }
}

// Two deferred weights are the same op when they hold the same tensor with the
// same changes: comparing the tensors' values would read both (tract compares
// ops while it optimises).
impl PartialEq for Deferred {
    fn eq(&self, other: &Deferred) -> bool {
        Arc::ptr_eq(&self.value, &other.value)
            && self.changes == other.changes
            && self.fact == other.fact
    }
}

impl Eq for Deferred {}

impl Op for Deferred {
    fn name(&self) -> StaticName {
        "DeferredWeight".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?} {:?}, changes {:?}",
            self.value.datum_type(),
            self.value.shape(),
            self.changes
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Deferred {
    // Never folded: folding would copy the weight, which is what this op is for.
    not_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        // Only a plan built without `install` runs this: correct, not fast.
        let (value, _) = Deferred::apply(self.value.clone(), &self.changes)?;
        Ok(tvec!(value.into_tvalue()))
    }
}

impl TypedOp for Deferred {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.fact.clone()))
    }

    fn change_axes(
        &self,
        model: &TypedModel,
        node: &TypedNode,
        io: InOut,
        change: &AxisOp,
    ) -> TractResult<Option<AxisChangeConsequence>> {
        ensure!(io == InOut::Out(0), "a deferred weight has no input");
        let mut fact = self.fact.clone();
        // A change the shape cannot take blocks the search, as at a source.
        if change.change_shape(&mut fact.shape, false).is_err() {
            return Ok(None);
        }
        let mut changes = self.changes.clone();
        changes.push(change.clone());
        let op = Deferred {
            value: self.value.clone(),
            changes,
            fact,
        };
        Ok(Some(AxisChangeConsequence::new(
            model,
            node,
            Some(Box::new(op)),
            change,
        )))
    }

    as_op!();
}

/// tract's declutter of `model` with its weights deferred through it
/// ([`defer`], then [`install`]), recorded in `done`.
pub fn declutter(model: &mut TypedModel, done: &mut super::Rewrites) -> TractResult<()> {
    done.deferred += defer(model, DEFER_MIN_BYTES)?;
    model.declutter()?;
    let installed = install(model)?;
    done.deferred_changes += installed.changes;
    done.deferred_copies += installed.copies;
    Ok(())
}

/// Replaces each constant of `model` of a plain numeric tensor of at least
/// `min_bytes` ([`DEFER_MIN_BYTES`] in the engine) and no exotic fact by a
/// [`Deferred`] op holding it. Returns how many it replaced.
pub fn defer(model: &mut TypedModel, min_bytes: usize) -> TractResult<usize> {
    let mut done = 0;
    for node in &mut model.nodes {
        let Some(konst) = node.op_as::<Const>() else {
            continue;
        };
        let value = konst.val();
        let large = value.len() * value.datum_type().size_of() >= min_bytes;
        if !large
            || konst.exotic_fact().is_some()
            || !value.is_plain()
            || !value.datum_type().is_number()
        {
            continue;
        }
        let op = Deferred::new(value.clone());
        node.outputs[0].fact = op.fact.clone();
        node.op = Box::new(op);
        done += 1;
    }
    Ok(done)
}

/// Turns each [`Deferred`] op of `model` back into the constant it holds,
/// with the axis changes noted in it applied, and the facts of what reads it
/// given its value again.
pub fn install(model: &mut TypedModel) -> TractResult<Installed> {
    let mut done = Installed::default();
    let ids: Vec<usize> = super::node_ids(model, |n| n.op_is::<Deferred>());
    if ids.is_empty() {
        return Ok(done);
    }
    for id in ids {
        let node = &mut model.nodes[id];
        // Take the op out of the graph, so that it holds the tensor alone.
        let Deferred { value, changes, .. } = super::take_op::<Deferred>(node)?;
        let (value, in_place) = Deferred::apply(value, &changes)?;
        let fact = TypedFact::try_from(value.clone())?;
        ensure!(
            fact.datum_type == node.outputs[0].fact.datum_type
                && fact.shape == node.outputs[0].fact.shape,
            "weight {} came back as {fact:?}, typed as {:?}",
            node.name,
            node.outputs[0].fact
        );
        node.op = Box::new(Const::new(value)?);
        node.outputs[0].fact = fact;
        done.weights += 1;
        done.changes += changes.len();
        done.copies += usize::from(!in_place);
    }
    // What reads a weight now sees its value in its input facts.
    model.refresh_output_facts()?;
    Ok(done)
}

/// Folds each op that only reshapes (`AddAxis`, `RmAxis`, a `Reshape`,
/// `Identity`, a row-major `IntoShape`) of a constant read by nothing else into
/// that constant, in the constant's own bytes. tract's constant folding would
/// evaluate it on a copy (its input is shared with the constant's fact), and
/// its optimiser makes such ops of the weights as it lowers the matmuls: 158
/// MiB of copies in the fp32 encoder. Run at the head of each optimiser round,
/// before tract's folding. Returns how many it folded.
pub fn fold_reshapes(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        let Some(shape) = reshape_of(node) else {
            continue;
        };
        let &[input] = node.inputs.as_slice() else {
            continue;
        };
        if model.nodes[input.node].outputs[0].successors.len() != 1 {
            continue;
        }
        let Some(mut tensor) = super::take_lone_constant(model, input.node)? else {
            continue;
        };
        tensor.set_shape(&shape)?;
        super::replace_with_constant(model, id, tensor.into_arc_tensor(), "reshape in place")?;
        done += 1;
    }
    Ok(done)
}

/// The shape `node` gives its one input, when it only reshapes it: the same
/// bytes in the same order.
fn reshape_of(node: &TypedNode) -> Option<TVec<usize>> {
    use tract_onnx::tract_core::ops::change_axes::IntoShape;
    use tract_onnx::tract_core::ops::identity::Identity;
    let shape = node.outputs.first()?.fact.shape.as_concrete()?;
    let reshapes = if let Some(op) = node.op_as::<AxisOp>() {
        !matches!(op.canonical().as_ref(), AxisOp::Move(..))
    } else if let Some(op) = node.op_as::<IntoShape>() {
        // Row-major strides: the bytes are not moved.
        let mut stride = 1isize;
        let mut natural = vec![0isize; op.dims.len()];
        for (ax, &d) in op.dims.iter().enumerate().rev() {
            natural[ax] = stride;
            stride *= d as isize;
        }
        op.strides.as_slice() == natural.as_slice()
    } else {
        node.op_is::<Identity>()
    };
    (reshapes && node.outputs.len() == 1).then(|| shape.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The tiny encoder typed as the engine types it (its zero weight zero
    /// points dropped), and whether its features come before the length.
    fn typed_tiny(file: &str) -> (TypedModel, bool) {
        let path = crate::speech::tiny_model_file(file);
        let onnx = tract_onnx::onnx();
        let mut proto = onnx.proto_model_for_path(&path).expect("decodes");
        super::super::drop_zero_weight_zero_points(&mut proto);
        let dir = path.parent().and_then(Path::to_str);
        let model = onnx.parse(&proto, dir).expect("parses").model;
        let names = ("audio_signal", "length");
        crate::speech::model::type_encoder(model, names, &path).expect("types")
    }

    fn bytes_at(value: &Tensor) -> *const u8 {
        value.try_as_plain_ram().expect("plain").as_bytes().as_ptr()
    }

    /// The tiny encoder's output on a fixed input, run by `model`'s plan.
    fn run(model: &TypedModel, signal_first: bool) -> Vec<f32> {
        let frames = 37;
        let features: Vec<f32> = (0..64 * frames)
            .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.1)
            .collect();
        let features = Tensor::from_shape(&[1, 64, frames], &features).expect("features");
        let length = tensor1(&[frames as i64]);
        let inputs = if signal_first {
            [features, length]
        } else {
            [length, features]
        };
        super::super::tests::run_f32_on(model, &inputs, 1)
    }

    /// Deferred through tract's declutter, the weights come back as what
    /// tract makes of them: after tract's optimiser, the same plan, op for
    /// op, each constant the same value, and the same output bits. Every
    /// change tract made to them only reshaped them, so none was copied.
    /// (Before the optimiser the graphs differ in what tract folded into a
    /// weight while it knew its value: a split, or a reshape it then names
    /// after itself.)
    #[test]
    fn the_same_plan_with_no_weight_copied() {
        for file in ["v3_e2e_rnnt_encoder.onnx", "v3_e2e_rnnt_encoder_int8.onnx"] {
            let (mut theirs, signal_first) = typed_tiny(file);
            theirs.declutter().expect("tract declutters");
            theirs.optimize().expect("tract optimises");
            let (mut ours, _) = typed_tiny(file);
            // Below the engine's size, so that the tiny weights tract
            // changes are deferred too (the int8 ones are 4 to 20 KiB).
            let deferred = defer(&mut ours, 4 * 1024).expect("defers");
            assert!(deferred >= 10, "{file}: {deferred} weights deferred");
            ours.declutter().expect("declutters");
            assert!(ours.nodes.iter().any(|n| n.op_is::<Deferred>()), "{file}");
            let installed = install(&mut ours).expect("installs");
            assert_eq!(installed.weights, deferred, "{file}");
            assert!(installed.changes > 0, "{file}: {installed:?}");
            assert_eq!(installed.copies, 0, "{file}: {installed:?}");
            assert!(!ours.nodes.iter().any(|n| n.op_is::<Deferred>()), "{file}");
            ours.optimize().expect("optimises");
            assert_eq!(ours.nodes.len(), theirs.nodes.len(), "{file}");
            for (o, t) in ours.nodes.iter().zip(&theirs.nodes) {
                assert_eq!(o.op.name(), t.op.name(), "{file}: {}", o.name);
                assert_eq!(o.inputs, t.inputs, "{file}: {}", o.name);
                let (of, tf) = (&o.outputs[0].fact, &t.outputs[0].fact);
                assert_eq!(of.datum_type, tf.datum_type, "{file}: {}", o.name);
                assert_eq!(of.shape, tf.shape, "{file}: {}", o.name);
                // Packed constants (no plain bytes to compare) are held to
                // tract's by the output below.
                if let (Some(a), Some(b)) = (o.op_as::<Const>(), t.op_as::<Const>())
                    && a.val().is_plain()
                {
                    assert_eq!(a.val(), b.val(), "{file}: {}", o.name);
                }
            }
            let bits = |xs: Vec<f32>| xs.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            assert!(
                bits(run(&ours, signal_first)) == bits(run(&theirs, signal_first)),
                "{file}"
            );
        }
    }

    /// Adding, removing and splitting axes reshape the tensor in its own
    /// bytes; a move, or a tensor another holder shares, is applied to a
    /// copy, the other holder's left as it was; the values are tract's.
    #[test]
    fn changes_are_applied_in_place_unless_an_axis_moves_or_the_weight_is_shared() {
        let values: Vec<f32> = (0..64 * 96).map(|v| v as f32).collect();
        let weight = || Tensor::from_shape(&[64, 96], &values).expect("a tensor");
        let split = AxisOp::Reshape(0, tvec![64.to_dim()], tvec![8.to_dim(), 8.to_dim()]);
        let reshapes = [AxisOp::Add(0), AxisOp::Rm(0), split.clone(), AxisOp::Add(3)];
        let tracts = |changes: &[AxisOp]| {
            let mut t = weight();
            for c in changes {
                c.change_tensor(&mut t, false).expect("tract changes it");
            }
            t
        };

        let alone = Arc::new(weight());
        let at = bytes_at(&alone);
        let (value, in_place) = Deferred::apply(alone, &reshapes).expect("applies");
        assert!(in_place);
        assert_eq!(bytes_at(&value), at, "the same bytes");
        assert_eq!(value.shape(), &[8, 8, 96, 1]);
        assert_eq!(*value, tracts(&reshapes));

        let moved = [split.clone(), AxisOp::Move(2, 0)];
        let (value, in_place) = Deferred::apply(Arc::new(weight()), &moved).expect("applies");
        assert!(!in_place);
        assert_eq!(value.shape(), &[96, 8, 8]);
        assert_eq!(*value, tracts(&moved));

        let shared = Arc::new(weight());
        let other = shared.clone();
        let (value, in_place) = Deferred::apply(shared, &reshapes).expect("applies");
        assert!(!in_place);
        assert_ne!(bytes_at(&value), bytes_at(&other));
        assert_eq!(*other, weight(), "the other holder's tensor is as it was");
        assert_eq!(*value, tracts(&reshapes));

        // No change: the tensor stays shared, copied by nobody.
        let shared = Arc::new(weight());
        let (value, in_place) = Deferred::apply(shared.clone(), &[]).expect("applies");
        assert!(in_place && Arc::ptr_eq(&value, &shared));
    }

    /// A reshape of a constant nothing else reads becomes that constant, in
    /// its own bytes, round after round down a chain of them; a move, or a
    /// constant another node reads, is left to tract.
    #[test]
    fn reshapes_of_a_lone_constant_fold_into_its_bytes() {
        let values: Vec<f32> = (0..64 * 96).map(|v| v as f32).collect();
        let weight = Tensor::from_shape(&[64, 96], &values).expect("a tensor");
        let mut model = TypedModel::default();
        let lone = model.add_const("lone", weight.clone()).expect("added");
        let at = bytes_at(model.node(lone.node).op_as::<Const>().expect("const").val());
        let added = model
            .wire_node("add", AxisOp::Add(0), &[lone])
            .expect("wired")[0];
        let split = AxisOp::Reshape(1, tvec![64.to_dim()], tvec![8.to_dim(), 8.to_dim()]);
        let split = model.wire_node("split", split, &[added]).expect("wired")[0];
        // Another value: tract's `add_const` would hand back `lone` for an equal one.
        let other = Tensor::from_shape(&[96, 64], &values).expect("a tensor");
        let shared = model.add_const("shared", other).expect("added");
        let moved = model
            .wire_node("move", AxisOp::Move(0, 1), &[shared])
            .expect("wired")[0];
        let added_too = model
            .wire_node("add too", AxisOp::Add(0), &[shared])
            .expect("wired")[0];
        model
            .select_output_outlets(&[split, moved, added_too])
            .expect("outputs");
        assert_eq!(fold_reshapes(&mut model).expect("folds"), 2);
        model = model.into_compact().expect("compacts");
        let outputs = model.output_outlets().expect("outputs").to_vec();
        let folded = model
            .node(outputs[0].node)
            .op_as::<Const>()
            .expect("a constant");
        assert_eq!(folded.val().shape(), &[1, 8, 8, 96]);
        assert_eq!(bytes_at(folded.val()), at, "the same bytes");
        let fact = model.outlet_fact(outputs[0]).expect("fact");
        assert_eq!(fact.konst.as_ref(), Some(folded.val()));
        assert!(model.node(outputs[1].node).op_is::<AxisOp>());
        assert!(model.node(outputs[2].node).op_is::<AxisOp>());
        let expected = weight.into_shape(&[1, 8, 8, 96]).expect("reshaped");
        assert_eq!(**folded.val(), expected);
    }

    /// Only large plain numeric constants are deferred; a plan run without
    /// [`install`] still computes the weight's value with its changes.
    #[test]
    fn small_constants_stay_and_a_deferred_weight_evaluates_to_its_value() {
        let mut model = TypedModel::default();
        let big = Tensor::zero::<f32>(&[64, 64]).expect("zeros");
        let small = Tensor::zero::<f32>(&[64]).expect("zeros");
        let big = model.add_const("big", big).expect("added");
        let small = model.add_const("small", small).expect("added");
        assert_eq!(defer(&mut model, DEFER_MIN_BYTES).expect("defers"), 1);
        assert!(model.node(big.node).op_is::<Deferred>());
        assert!(model.node(small.node).op_is::<Const>());
        assert!(model.outlet_fact(big).expect("fact").konst.is_none());
        let node = model.node(big.node);
        let consequence = node
            .op
            .change_axes(&model, node, InOut::Out(0), &AxisOp::Add(0))
            .expect("takes it")
            .expect("a change");
        let op = consequence.substitute_op.expect("a new op");
        let out = op
            .as_op()
            .eval(&EvalContext::out_of_plan(), tvec![])
            .expect("evaluates");
        assert_eq!(out[0].shape(), &[1, 64, 64]);
        assert_eq!(
            op.output_facts(&[]).expect("facts")[0].shape,
            [1, 64, 64].into()
        );
    }
}
