//! Reads the large weights of a lean model ([`super::lean`]) from the file
//! straight into tensors, on every core, while tract parses and types the
//! graph.
//!
//! Given the weights as external data, tract reads each one on the parsing
//! thread: the file is mapped, the weight copied into a `Vec`, then copied
//! again into an aligned tensor, and both copies land in fresh memory the
//! kernel must zero first. Here those initializers are taken out of the
//! protobuf before tract sees it, so that tract parses them as unresolved
//! inputs (sources), which [`declare`] gives their type and shape. Meanwhile
//! one reader per core reads each weight once, into the tensor it will live
//! in. Typing a graph does not need the weights' values (a test holds the
//! typed graph to tract's own, node for node), so it runs beside the reading;
//! then [`install`] turns the typed sources into the constants tract would
//! have made, before anything is optimised.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use tract_onnx::pb::GraphProto;
use tract_onnx::pb::tensor_proto::{DataLocation, DataType};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::bail;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::source::TypedSource;
use tract_onnx::tract_hir::internal::InferenceFact;

/// A weight left in the model file: where it is and what tensor it makes.
#[derive(Debug, Clone)]
pub struct Weight {
    /// The initializer's name, by which the graph's nodes refer to it.
    pub name: String,
    pub datum_type: DatumType,
    pub shape: Vec<usize>,
    /// Byte offset of its raw little-endian data in the file.
    pub offset: u64,
}

impl Weight {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.datum_type.size_of()
    }
}

/// Takes out of `graph` every initializer stored as external data in the
/// model file itself (`location` equal to `file_name`, as [`super::lean`]
/// writes them), of a plain numeric type. Others stay for tract to read.
pub fn take_from_file(graph: &mut GraphProto, file_name: &str) -> Result<Vec<Weight>, String> {
    let mut taken = Vec::new();
    let mut kept = Vec::with_capacity(graph.initializer.len());
    for tensor in std::mem::take(&mut graph.initializer) {
        let external = tensor.data_location == Some(DataLocation::External as i32);
        let entry = |key: &str| {
            tensor
                .external_data
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.as_str())
        };
        let datum_type = DataType::try_from(tensor.data_type)
            .ok()
            .and_then(|dt| DatumType::try_from(dt).ok())
            .filter(|dt| PLAIN.contains(dt));
        let (true, Some(datum_type), Some(location)) = (external, datum_type, entry("location"))
        else {
            kept.push(tensor);
            continue;
        };
        if location != file_name {
            kept.push(tensor);
            continue;
        }
        let number = |key: &str| -> Result<u64, String> {
            entry(key)
                .ok_or_else(|| format!("weight {:?} has no {key}", tensor.name))?
                .parse()
                .map_err(|e| format!("weight {:?}: bad {key}: {e}", tensor.name))
        };
        let shape = tensor
            .dims
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| format!("weight {:?} has a negative dimension", tensor.name))?;
        let weight = Weight {
            name: tensor.name.clone(),
            datum_type,
            shape,
            offset: number("offset")?,
        };
        let length = number("length")?;
        if length != weight.bytes() as u64 {
            return Err(format!(
                "weight {:?} has {length} bytes for a {:?} {:?} tensor",
                weight.name, weight.datum_type, weight.shape
            ));
        }
        taken.push(weight);
    }
    graph.initializer = kept;
    Ok(taken)
}

/// Types read as their raw bytes (what tract's `create_tensor` takes raw).
const PLAIN: [DatumType; 11] = [
    DatumType::U8,
    DatumType::U16,
    DatumType::U32,
    DatumType::U64,
    DatumType::I8,
    DatumType::I16,
    DatumType::I32,
    DatumType::I64,
    DatumType::F16,
    DatumType::F32,
    DatumType::F64,
];

/// Runs `work` on this thread while one reader per core reads `weights` from
/// `path`; this thread joins the readers when `work` is done. The tensors
/// come back in the order of `weights`.
pub fn read_beside<T>(
    path: &Path,
    weights: &[Weight],
    work: impl FnOnce() -> T,
) -> (T, io::Result<Vec<Tensor>>) {
    let end = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) => return (work(), Err(e)),
    };
    if let Some(w) = weights.iter().find(|w| {
        w.offset
            .checked_add(w.bytes() as u64)
            .is_none_or(|e| e > end)
    }) {
        let why = format!("weight {:?} runs past the end of the file", w.name);
        return (work(), Err(io::Error::new(io::ErrorKind::InvalidData, why)));
    }
    // Largest first, so that no reader is left with a big one at the end.
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(weights[i].bytes()));
    let next = AtomicUsize::new(0);
    let read_some = || -> io::Result<Vec<(usize, Tensor)>> {
        let mut file = File::open(path)?;
        let mut done = Vec::new();
        while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
            done.push((i, read_one(&mut file, &weights[i])?));
        }
        Ok(done)
    };
    // One core is this thread's, which reads too once `work` is done.
    let helpers = std::thread::available_parallelism()
        .map(|n| n.get() - 1)
        .unwrap_or(0)
        .clamp(1, weights.len().max(1));
    let (out, parts) = std::thread::scope(|scope| {
        let readers: Vec<_> = (0..helpers).map(|_| scope.spawn(read_some)).collect();
        let out = work();
        // The readers' share left when `work` ends is read here as well.
        let mut parts = vec![read_some()];
        for reader in readers {
            parts.push(
                reader
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p)),
            );
        }
        (out, parts)
    });
    // Each index was taken by exactly one reader; back in `weights`' order.
    let tensors = parts
        .into_iter()
        .collect::<io::Result<Vec<_>>>()
        .map(|parts| {
            let mut done: Vec<(usize, Tensor)> = parts.into_iter().flatten().collect();
            done.sort_unstable_by_key(|(i, _)| *i);
            done.into_iter().map(|(_, t)| t).collect()
        });
    (out, tensors)
}

fn read_one(file: &mut File, weight: &Weight) -> io::Result<Tensor> {
    let mut tensor = Tensor::zero_dt(weight.datum_type, &weight.shape)
        .map_err(|e| io::Error::other(format!("weight {:?}: {e}", weight.name)))?;
    file.seek(SeekFrom::Start(weight.offset))?;
    // The file holds little-endian bytes, as tensors do in memory here.
    file.read_exact(tensor.as_bytes_mut())?;
    Ok(tensor)
}

/// Gives the sources tract made for the taken weights (it parsed them as
/// unresolved inputs) the type and shape of their tensors, so that the graph
/// can be typed before they are read.
pub fn declare(
    model: &mut InferenceModel,
    outlets_by_name: &HashMap<String, OutletId>,
    weights: &[Weight],
) -> TractResult<()> {
    for weight in weights {
        let Some(&outlet) = outlets_by_name.get(&weight.name) else {
            // No node reads it: tract would have kept an unused constant.
            continue;
        };
        let node = model.node(outlet.node);
        if !node.op_is::<tract_onnx::tract_hir::ops::source::Source>() {
            bail!(
                "weight {:?} was parsed as {}, not as an input",
                weight.name,
                node.op.name()
            );
        }
        let fact = InferenceFact::dt_shape(weight.datum_type, &weight.shape);
        model.set_outlet_fact(outlet, fact)?;
    }
    Ok(())
}

/// Turns the typed graph's sources for `weights` (see [`declare`]) into the
/// constants holding `tensors`, as tract makes of an initializer.
pub fn install(
    model: &mut TypedModel,
    weights: &[Weight],
    tensors: Vec<Tensor>,
) -> TractResult<()> {
    let sources: HashMap<String, usize> = model
        .inputs
        .iter()
        .map(|input| (model.nodes[input.node].name.clone(), input.node))
        .collect();
    for (weight, tensor) in weights.iter().zip(tensors) {
        let Some(&id) = sources.get(&weight.name) else {
            // No node reads it (see `declare`).
            continue;
        };
        if !model.nodes[id].op_is::<TypedSource>() {
            bail!(
                "weight {:?} is not a source of the typed graph",
                weight.name
            );
        }
        let value = tensor.into_arc_tensor();
        let fact = TypedFact::try_from(value.clone())?;
        let declared = &model.nodes[id].outputs[0].fact;
        if declared.datum_type != fact.datum_type || declared.shape != fact.shape {
            bail!("weight {:?} was typed as {declared:?}", weight.name);
        }
        let node = &mut model.nodes[id];
        node.op = Box::new(Const::new(value)?);
        node.outputs[0].fact = fact;
        model.inputs.retain(|input| input.node != id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speech::lean;

    use crate::speech::tiny_model_file as tiny;

    fn konst(model: &TypedModel, node: usize) -> &Arc<Tensor> {
        let node = model.node(node);
        node.op_as::<Const>().expect("a constant").val()
    }

    fn input_names(model: &TypedModel) -> Vec<String> {
        let inputs = model.input_outlets().expect("inputs");
        inputs
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect()
    }

    /// Types the tiny encoder, `T` frames, as the engine does.
    fn typed(model: InferenceModel) -> TypedModel {
        let names = ("audio_signal", "length");
        let path = Path::new("tiny");
        let (typed, _) = crate::speech::model::type_encoder(model, names, path).expect("types");
        typed
    }

    /// The lean model and its proto, weights still in it.
    fn lean_proto(path: &Path) -> (tract_onnx::pb::ModelProto, lean::LeanModel) {
        let lean = lean::read(path, 1024).expect("lean read");
        let proto = tract_onnx::onnx()
            .proto_model_for_read(&mut lean.bytes.as_slice())
            .expect("decodes");
        (proto, lean)
    }

    /// The lean proto with its weights taken out, and the weights.
    fn taken(path: &Path) -> (tract_onnx::pb::ModelProto, lean::LeanModel, Vec<Weight>) {
        let (mut proto, lean) = lean_proto(path);
        let graph = proto.graph.as_mut().expect("graph");
        let weights = take_from_file(graph, &lean.location).expect("taken");
        (proto, lean, weights)
    }

    /// Each weight read beside the parse and typing is the constant tract
    /// makes of the same initializer, under the same name, and the typed
    /// graph is tract's once they are installed.
    #[test]
    fn weights_read_beside_the_typing_are_tracts_constants() {
        for file in ["v3_e2e_rnnt_encoder.onnx", "v3_e2e_rnnt_encoder_int8.onnx"] {
            let path = tiny(file);
            let onnx = tract_onnx::onnx();
            let whole = onnx.proto_model_for_path(&path).expect("decodes");
            let dir = path.parent().and_then(Path::to_str);
            let theirs = typed(onnx.parse(&whole, dir).expect("tract parses").model);
            let (proto, lean, weights) = taken(&path);
            assert_eq!(weights.len(), lean.external, "{file}");
            assert!(weights.len() > 10, "{file}");
            let graph = proto.graph.as_ref().expect("graph");
            assert!(graph.initializer.iter().all(|t| t.external_data.is_empty()));
            let file_path = lean.dir.join(&lean.location);
            let (ours, tensors) = read_beside(&file_path, &weights, || {
                let mut parsed = onnx.parse(&proto, lean.dir.to_str()).expect("parses");
                assert_eq!(parsed.unresolved_inputs.len(), weights.len(), "{file}");
                declare(&mut parsed.model, &parsed.outlets_by_name, &weights).expect("declared");
                typed(parsed.model)
            });
            let mut ours = ours;
            install(&mut ours, &weights, tensors.expect("reads")).expect("installs");
            // The same graph, node for node. tract names a constant made from
            // an initializer after it with `.0` added; its sources keep the name.
            assert_eq!(ours.nodes.len(), theirs.nodes.len(), "{file}");
            for (o, t) in ours.nodes.iter().zip(&theirs.nodes) {
                assert_eq!(o.op.name(), t.op.name(), "{file}: {}", o.name);
                assert_eq!(o.inputs, t.inputs, "{file}: {}", o.name);
            }
            for w in &weights {
                let node = ours.node_by_name(&w.name).expect("a node for the weight");
                let value = konst(&ours, node.id);
                assert_eq!(value, konst(&theirs, node.id), "{file}: {}", w.name);
                assert_eq!(theirs.node(node.id).name, format!("{}.0", w.name));
                let fact = ours.outlet_fact(OutletId::new(node.id, 0)).expect("fact");
                assert_eq!(fact.konst.as_ref(), Some(value), "{file}: {}", w.name);
            }
            assert_eq!(input_names(&ours), input_names(&theirs), "{file}");
        }
    }

    /// A weight's declared shape must be the one it is read with.
    #[test]
    fn a_weight_typed_otherwise_is_not_installed() {
        let path = tiny("v3_e2e_rnnt_encoder.onnx");
        let (proto, lean, weights) = taken(&path);
        let file_path = lean.dir.join(&lean.location);
        let onnx = tract_onnx::onnx();
        let (ours, tensors) = read_beside(&file_path, &weights, || {
            let mut parsed = onnx.parse(&proto, lean.dir.to_str()).expect("parses");
            declare(&mut parsed.model, &parsed.outlets_by_name, &weights).expect("declared");
            typed(parsed.model)
        });
        let mut tensors = tensors.expect("reads");
        let flat = tensors[0].len();
        tensors[0] = tensors[0].clone().into_shape(&[flat]).expect("reshaped");
        let error = install(&mut ours.clone(), &weights, tensors).expect_err("a wrong shape");
        assert!(format!("{error}").contains("was typed as"), "{error}");
    }

    #[test]
    fn a_weight_that_does_not_fit_is_an_error() {
        let path = tiny("v3_e2e_rnnt_encoder.onnx");
        let (_, lean, mut weights) = taken(&path);
        let file_path = lean.dir.join(&lean.location);
        let end = std::fs::metadata(&file_path).expect("size").len();
        // Past the end of the file: an error, and the work still runs.
        weights[0].offset = end - 4;
        let (ran, tensors) = read_beside(&file_path, &weights, || 7);
        assert_eq!(ran, 7);
        let error = tensors.expect_err("past the end");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        // A length that is not the shape's: refused before anything is read.
        let (mut proto, _) = lean_proto(&path);
        let graph = proto.graph.as_mut().expect("graph");
        let tensor = graph
            .initializer
            .iter_mut()
            .find(|t| !t.external_data.is_empty())
            .expect("a weight in the file");
        let length = tensor
            .external_data
            .iter_mut()
            .find(|e| e.key == "length")
            .expect("length");
        length.value = (length.value.parse::<u64>().expect("n") - 1).to_string();
        let error = take_from_file(graph, &lean.location).expect_err("a wrong length");
        assert!(error.contains("bytes for a"), "{error}");
    }

    #[test]
    fn weights_in_another_file_stay_for_tract() {
        let (mut proto, lean) = lean_proto(&tiny("v3_e2e_rnnt_encoder.onnx"));
        let graph = proto.graph.as_mut().expect("graph");
        let before = graph.initializer.len();
        let taken = take_from_file(graph, "another.onnx").expect("nothing to check");
        assert!(taken.is_empty());
        assert_eq!(graph.initializer.len(), before);
        assert!(lean.external > 0);
    }
}
