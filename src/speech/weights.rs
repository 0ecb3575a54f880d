//! Reads the large weights of a lean model ([`super::lean`]) from the file
//! straight into tensors, on every core, while tract parses the graph.
//!
//! Given the weights as external data, tract reads each one on the parsing
//! thread: the file is mapped, the weight copied into a `Vec`, then copied
//! again into an aligned tensor, and both copies land in fresh memory the
//! kernel must zero first. Here those initializers are taken out of the
//! protobuf before tract sees it, so that tract parses them as unresolved
//! inputs (sources), and one reader per core reads each weight once, into the
//! tensor it will live in. The sources are then turned into constants, as
//! tract's own parser would have made them, before the graph is typed.

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
use tract_onnx::tract_hir::internal::InferenceFact;

/// A weight left in the model file: where it is and what tensor it makes.
#[derive(Debug, Clone, PartialEq)]
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
    let mut tensors: Vec<Option<Tensor>> = weights.iter().map(|_| None).collect();
    for part in parts {
        match part {
            Ok(done) => done.into_iter().for_each(|(i, t)| tensors[i] = Some(t)),
            Err(e) => return (out, Err(e)),
        }
    }
    let tensors = tensors.into_iter().collect::<Option<Vec<_>>>();
    let unread = || io::Error::other("a weight was not read");
    (out, tensors.ok_or_else(unread))
}

fn read_one(file: &mut File, weight: &Weight) -> io::Result<Tensor> {
    let mut tensor = Tensor::zero_dt(weight.datum_type, &weight.shape)
        .map_err(|e| io::Error::other(format!("weight {:?}: {e}", weight.name)))?;
    file.seek(SeekFrom::Start(weight.offset))?;
    // The file holds little-endian bytes, as tensors do in memory here.
    file.read_exact(tensor.as_bytes_mut())?;
    Ok(tensor)
}

/// Turns the sources tract made for the taken weights (it parsed them as
/// unresolved inputs) into constants holding `tensors`, with the facts tract
/// gives a constant initializer.
pub fn install(
    model: &mut InferenceModel,
    outlets_by_name: &HashMap<String, OutletId>,
    weights: &[Weight],
    tensors: Vec<Tensor>,
) -> TractResult<()> {
    for (weight, tensor) in weights.iter().zip(tensors) {
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
        let value = tensor.into_arc_tensor();
        let fact: InferenceFact = TypedFact::try_from(value.clone())?.into();
        let node = model.node_mut(outlet.node);
        node.op = Const::new(value)?.into();
        node.outputs[0].fact = fact;
        model.inputs.retain(|input| input.node != outlet.node);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speech::lean;
    use std::path::PathBuf;
    use tract_onnx::tract_hir::infer::Factoid;

    fn tiny(file: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/gigaam-v3-tiny-random")
            .join(file)
    }

    fn konst<'m>(model: &'m InferenceModel, name: &str) -> &'m Arc<Tensor> {
        let node = model.node_by_name(name).expect("a node for the weight");
        node.op_as::<Const>().expect("a constant").val()
    }

    fn input_names(model: &InferenceModel) -> Vec<String> {
        let inputs = model.input_outlets().expect("inputs");
        inputs
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect()
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

    /// Each weight read beside the parse is the constant tract makes of the
    /// same initializer, under the same name, and the graph's inputs are
    /// tract's once the weights are installed.
    #[test]
    fn weights_read_beside_the_parse_are_tracts_constants() {
        for file in ["v3_e2e_rnnt_encoder.onnx", "v3_e2e_rnnt_encoder_int8.onnx"] {
            let path = tiny(file);
            let onnx = tract_onnx::onnx();
            let whole = onnx.proto_model_for_path(&path).expect("decodes");
            let dir = path.parent().and_then(Path::to_str);
            let theirs = onnx.parse(&whole, dir).expect("tract parses").model;
            let (proto, lean, weights) = taken(&path);
            assert_eq!(weights.len(), lean.external, "{file}");
            assert!(weights.len() > 10, "{file}");
            let graph = proto.graph.as_ref().expect("graph");
            assert!(graph.initializer.iter().all(|t| t.external_data.is_empty()));
            let file_path = lean.dir.join(&lean.location);
            let (parsed, tensors) = read_beside(&file_path, &weights, || {
                onnx.parse(&proto, lean.dir.to_str())
            });
            let mut parsed = parsed.expect("parses without the weights");
            assert_eq!(parsed.unresolved_inputs.len(), weights.len(), "{file}");
            let tensors = tensors.expect("reads");
            install(
                &mut parsed.model,
                &parsed.outlets_by_name,
                &weights,
                tensors,
            )
            .expect("installs");
            for w in &weights {
                let ours = konst(&parsed.model, &w.name);
                assert_eq!(ours, konst(&theirs, &w.name), "{file}: {}", w.name);
                let node = parsed.model.node_by_name(&w.name).expect("node").id;
                let fact = parsed.model.outlet_fact(OutletId::new(node, 0));
                let value = fact.expect("fact").value.concretize();
                assert_eq!(value.as_ref(), Some(ours), "{file}: {}", w.name);
            }
            assert_eq!(input_names(&parsed.model), input_names(&theirs), "{file}");
        }
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
