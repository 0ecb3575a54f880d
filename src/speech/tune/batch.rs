//! The attention's batched packings, their matrices split across the pool.
//!
//! Before each attention product tract packs the operands for its kernel
//! (`OptMatMulPack`): the queries, keys, values and probabilities of the 16
//! heads, one matrix after another on the calling thread (int8, 10 s, on the
//! Intel Xeon of docs/perf.md: 20–21 ms at one thread and at two). [`BatchPack`]
//! packs the same matrices with the same packer, each on whichever thread of
//! the pool is free, so the bytes are tract's.

use tract_linalg::mmm::{MMMInputFormat, MMMInputValue, PackedMatrixStorage};
use tract_linalg::strided_panel::StridedKMajor;
use tract_onnx::prelude::tract_ndarray::Dimension;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::matmul::pack::DynPackedExoticFact;

/// Replaces each batched f32 `OptMatMulPack` of an optimised graph with
/// [`BatchPack`]. Returns how many were replaced.
pub fn replace_batched_packs(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in 0..model.nodes.len() {
        let Some(op) = BatchPack::for_node(model, &model.nodes[id])? else {
            continue;
        };
        let input = model.nodes[id].inputs[0];
        if super::replace_node(model, id, op, &[input])? {
            done += 1;
        }
    }
    Ok(done)
}

/// Packs each matrix of a batch (every axis but `k` and `mn`) with tract's
/// packer for its width: of two packers, the second when `mn` is more than
/// one (tract's `VecVsMat`), else the first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchPack {
    packers: Vec<Box<dyn MMMInputFormat>>,
    k_axis: usize,
    mn_axis: usize,
}

impl BatchPack {
    /// The op for `node`, when it is an `OptMatMulPack` of an f32 input with
    /// more than one matrix, packing for one or two plain formats.
    fn for_node(model: &TypedModel, node: &TypedNode) -> TractResult<Option<BatchPack>> {
        if node.op.name() != "OptMatMulPack" || node.inputs.len() != 1 || node.outputs.len() != 1 {
            return Ok(None);
        }
        let out = &node.outputs[0].fact;
        let Some(exotic) = out
            .exotic_fact()
            .and_then(|e| e.downcast_ref::<DynPackedExoticFact>())
        else {
            return Ok(None);
        };
        let packers = exotic.packers.clone();
        // A strided format shares the input instead of packing it.
        let plain = !packers.is_empty()
            && packers.len() <= 2
            && packers.iter().all(|p| !p.is::<StridedKMajor>());
        let batched = out.shape.iter().any(|d| !d.is_one());
        if !plain || !batched || model.outlet_fact(node.inputs[0])?.datum_type != DatumType::F32 {
            return Ok(None);
        }
        let Some((k_axis, mn_axis)) = super::pack_axes(model, node)? else {
            return Ok(None);
        };
        Ok(Some(BatchPack {
            packers,
            k_axis,
            mn_axis,
        }))
    }
}

impl Op for BatchPack {
    fn name(&self) -> StaticName {
        "BatchPack".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?}. k axis: {}, mn axis: {}",
            self.packers, self.k_axis, self.mn_axis
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for BatchPack {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        ensure!(
            input.datum_type() == DatumType::F32,
            "BatchPack: {:?} input, expected F32",
            input.datum_type()
        );
        let shape = input.shape();
        let wide = self.packers.len() == 2 && shape[self.mn_axis] > 1;
        let packer = &self.packers[usize::from(wide)];
        // The first element of each matrix.
        let mut batch: TVec<usize> = shape.into();
        batch[self.k_axis] = 1;
        batch[self.mn_axis] = 1;
        let starts: Vec<Vec<usize>> = tract_ndarray::indices(&*batch)
            .into_iter()
            .map(|coords| coords.slice().to_vec())
            .collect();
        let mut values: Vec<Option<Box<dyn MMMInputValue>>> = starts.iter().map(|_| None).collect();
        tract_linalg::multithread::par_chunks_mut(&mut values, 1, input.len(), |first, chunk| {
            for (start, value) in starts[first..].iter().zip(chunk.iter_mut()) {
                let view = input.view_offsetting(start)?;
                *value = Some(packer.prepare_one_view(&view, self.k_axis, self.mn_axis)?);
            }
            Ok(())
        })?;
        let values = values
            .into_iter()
            .map(|v| v.context("BatchPack: a matrix left unpacked"))
            .collect::<TractResult<TVec<_>>>()?;
        let out_shape = super::packed_shape(shape, self.k_axis, self.mn_axis);
        Ok(tvec!(
            PackedMatrixStorage::new_batched(&out_shape, values)
                .into_tensor(input.datum_type())
                .into_tvalue()
        ))
    }
}

impl TypedOp for BatchPack {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == DatumType::F32);
        Ok(tvec!(super::packed_fact(
            inputs[0],
            DatumType::F32,
            self.packers.clone(),
            self.k_axis,
            self.mn_axis
        )))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speech::tune::tests::{run_f32_on, uniform};
    use tract_onnx::tract_core::ops::einsum::EinSum;

    /// Attention's two products over `heads` heads of width `d` and `T`
    /// frames (`T` symbolic, as gigastt loads), optimised: scores of
    /// queries by keys, then the scores by the values.
    fn attention(heads: usize, d: usize) -> TypedModel {
        let mut model = TypedModel::default();
        let t: TDim = model.symbols.sym("T").into();
        let qkv = f32::fact(tvec![heads.to_dim(), t.clone(), d.to_dim()]);
        let q = model.add_source("q", qkv.clone()).expect("q");
        let k = model.add_source("k", qkv.clone()).expect("k");
        let v = model.add_source("v", qkv).expect("v");
        let scores = model
            .wire_node(
                "scores",
                EinSum::new("htd,hsd->hts".parse().expect("expr"), f32::datum_type()),
                &[q, k],
            )
            .expect("scores")[0];
        let out = model
            .wire_node(
                "out",
                EinSum::new("hts,hsd->htd".parse().expect("expr"), f32::datum_type()),
                &[scores, v],
            )
            .expect("out");
        model.select_output_outlets(&out).expect("outputs");
        model.into_optimized().expect("optimised")
    }

    /// The packings replaced, on one and two threads, for one frame (where
    /// tract packs for its vector kernel) and many: tract's bits.
    #[test]
    fn packs_the_same_bytes_as_tract_on_any_pool() {
        let (heads, d) = (4usize, 16usize);
        let plain = attention(heads, d);
        let mut replaced = plain.clone();
        let done = replace_batched_packs(&mut replaced).expect("replace");
        assert!(done >= 2, "{done} replaced in\n{plain}");
        let mut rnd = uniform(41);
        for frames in [1usize, 37] {
            let inputs: Vec<Tensor> = (0..3)
                .map(|_| {
                    let data: Vec<f32> = (0..heads * frames * d).map(|_| rnd()).collect();
                    Tensor::from_shape(&[heads, frames, d], &data).expect("input")
                })
                .collect();
            let expected = run_f32_on(&plain, &inputs, 1);
            for threads in [1, 2] {
                let got = run_f32_on(&replaced, &inputs, threads);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&got) == bits(&expected),
                    "{frames} frames, {threads} threads"
                );
            }
        }
    }
}
