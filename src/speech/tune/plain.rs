//! The fp32 weights handed to faer as they were read from the file.
//!
//! tract's optimiser packs each constant f32 weight into its kernel's panels
//! (its constant folding evaluates the `OptMatMulPack` of the weight), and
//! [`super::gemm`] unpacked those panels again into a plain matrix for faer:
//! two copies of every weight into fresh memory at load, 844 MiB each for
//! the full-size encoder, made while the weight itself was alive.
//! [`keep`] runs at the head of tract's optimiser, before its constant
//! folding, and turns each packing of a constant f32 weight into a constant
//! [`PlainWeights`]: the weight's own tensor, shared, in tract's type for a
//! packed matrix. tract bakes it into its matmul as it would the panels,
//! `gemm` takes it from there (and lays it out in its own blocks, in the
//! same tensor), and [`pack_leftovers`] packs with tract's own
//! packer each one that a matmul tract keeps still holds after the rewrites,
//! so that no plan runs with it: tract's kernels read panels through
//! pointers, and [`PlainWeights`] has none to give (`panel_bytes` is an
//! error).

use std::fmt;
use std::hash::{Hash, Hasher};

use tract_linalg::mmm::{MMMInputFormat, MMMInputValue, PackedExoticFact, PackedMatrixStorage};
use tract_linalg::pack::PackedFormat;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, OptMatMul, ProtoFusedSpec};

/// Replaces each `OptMatMulPack` of a constant f32 weight into tract's plain
/// f32 panels with the constant [`PlainWeights`] of the weight, shared with
/// any other reader. Returns how many it replaced.
pub fn keep(model: &mut TypedModel) -> TractResult<usize> {
    let mut found = vec![];
    for node in &model.nodes {
        let Some((format, k_axis, mn_axis)) =
            super::pack::sole_format::<PackedFormat>(model, node)?
        else {
            continue;
        };
        let Some(weights) = model.node(node.inputs[0].node).op_as::<Const>() else {
            continue;
        };
        if let Some(value) = PlainWeights::new(weights.val().clone(), k_axis, mn_axis, format) {
            found.push((node.id, value));
        }
    }
    for (id, value) in &found {
        let weights = &value.weights;
        let packed = super::packed_value(
            weights.shape(),
            value.k_axis,
            value.mn_axis,
            Box::new(value.clone()),
            f32::datum_type(),
        );
        let why = "keep an f32 weight as read";
        super::replace_with_constant(model, *id, packed.into_arc_tensor(), why)?;
    }
    Ok(found.len())
}

/// Packs, in the format tract chose for it, each [`PlainWeights`] still
/// held by one of tract's matmuls or by a constant: those the rewrites left
/// to tract's kernels. The same panels as tract's constant folding would
/// have made. Returns how many it packed.
pub fn pack_leftovers(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    let mut constants = vec![];
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        if let Some(op) = node.op_as::<OptMatMul>() {
            let mut op = op.clone();
            let mut packed = 0;
            for uop in &mut op.micro_ops {
                if let ProtoFusedSpec::AddMatMul { a, b, .. } = uop {
                    for operand in [a, b] {
                        if let MatMulOperand::Const(value) = operand
                            && let Some(plain) = value.downcast_ref::<PlainWeights>()
                        {
                            *value = plain.packed()?;
                            packed += 1;
                        }
                    }
                }
            }
            if packed > 0 {
                model.nodes[id].op = Box::new(op);
                done += packed;
            }
        } else if let Some(konst) = node.op_as::<Const>()
            && let Ok(storage) = konst.val().try_storage_as::<PackedMatrixStorage>()
            && storage.values().iter().any(|v| v.is::<PlainWeights>())
        {
            let mut values = TVec::new();
            for value in storage.values() {
                values.push(match value.downcast_ref::<PlainWeights>() {
                    Some(plain) => {
                        done += 1;
                        plain.packed()?
                    }
                    None => value.clone(),
                });
            }
            let tensor = PackedMatrixStorage::new_batched(storage.batch_shape(), values)
                .into_tensor(konst.val().datum_type());
            constants.push((id, tensor));
        }
    }
    for (id, tensor) in constants {
        let why = "pack an f32 weight left to tract";
        super::replace_with_constant(model, id, tensor.into_arc_tensor(), why)?;
    }
    Ok(done)
}

/// A constant f32 weight matrix, unpacked: the tensor as read, with the axes
/// of its `k` and of its `mn` (output features), the others of length one.
#[derive(Clone)]
pub struct PlainWeights {
    weights: Arc<Tensor>,
    k_axis: usize,
    mn_axis: usize,
    /// The format tract chose for the weights (what it would have packed).
    fact: PackedExoticFact,
}

impl PlainWeights {
    /// `weights` as a matrix along `k_axis` and `mn_axis`, for `format`:
    /// `None` unless it is f32 and so is `format`'s, with no other axis
    /// longer than one.
    fn new(
        weights: Arc<Tensor>,
        k_axis: usize,
        mn_axis: usize,
        format: &PackedFormat,
    ) -> Option<PlainWeights> {
        let f32_dt = f32::datum_type();
        let shape = weights.shape();
        let one_matrix = (0..shape.len()).all(|ax| ax == k_axis || ax == mn_axis || shape[ax] == 1);
        if weights.datum_type() != f32_dt
            || format.dt != f32_dt
            || format.r == 0
            || k_axis == mn_axis
            || k_axis.max(mn_axis) >= shape.len()
            || !one_matrix
        {
            return None;
        }
        let fact = PackedExoticFact {
            format: Box::new(format.clone()),
            mn: shape[mn_axis].to_dim(),
            k: shape[k_axis],
        };
        Some(PlainWeights {
            weights,
            k_axis,
            mn_axis,
            fact,
        })
    }

    /// The tensor, shared.
    pub fn tensor(&self) -> &Arc<Tensor> {
        &self.weights
    }

    /// Whether the tensor holds the matrix `k`-major (for each `k`, its
    /// weights of every output feature in a row), not feature-major: its
    /// other axes are of length one, so its order of the two is its layout.
    pub fn k_major(&self) -> bool {
        self.k_axis < self.mn_axis
    }

    /// The weight at `k` of output feature `mn`.
    fn at(&self, values: &[f32], k: usize, mn: usize) -> f32 {
        if self.k_major() {
            values[k * self.mn() + mn]
        } else {
            values[mn * self.k() + k]
        }
    }

    /// tract's packing of the weights in the format it chose for them.
    fn packed(&self) -> TractResult<Box<dyn MMMInputValue>> {
        self.fact
            .format
            .prepare_one(&self.weights, self.k_axis, self.mn_axis)
    }

    /// `f` of the weights of output feature `mn`, one for each `k`, into `slice`.
    fn extract<T>(&self, mn: usize, slice: &mut [T], f: impl Fn(f32) -> T) -> TractResult<()> {
        ensure!(slice.len() == self.k() && mn < self.mn());
        let view = self.weights.try_as_plain_ram()?;
        let values = view.as_slice::<f32>()?;
        for (k, out) in slice.iter_mut().enumerate() {
            *out = f(self.at(values, k, mn));
        }
        Ok(())
    }
}

impl MMMInputValue for PlainWeights {
    fn format(&self) -> &dyn MMMInputFormat {
        &*self.fact.format
    }

    fn scratch_panel_buffer_layout(&self) -> Option<std::alloc::Layout> {
        None
    }

    fn panel_bytes(&self, _i: usize, _buffer: Option<*mut u8>) -> TractResult<*const u8> {
        bail!("{self} are for faer: tract's kernels need them packed first")
    }

    fn mn(&self) -> usize {
        self.weights.shape()[self.mn_axis]
    }

    fn k(&self) -> usize {
        self.fact.k
    }

    fn exotic_fact(&self) -> &dyn ExoticFact {
        &self.fact
    }

    fn extract_at_mn_f16(&self, mn: usize, slice: &mut [f16]) -> TractResult<()> {
        self.extract(mn, slice, f16::from_f32)
    }

    fn extract_at_mn_f32(&self, mn: usize, slice: &mut [f32]) -> TractResult<()> {
        self.extract(mn, slice, |w| w)
    }
}

/// Equal weights are the same tensor, or tensors of equal values.
impl PartialEq for PlainWeights {
    fn eq(&self, other: &Self) -> bool {
        self.k_axis == other.k_axis
            && self.mn_axis == other.mn_axis
            && self.fact == other.fact
            && (Arc::ptr_eq(&self.weights, &other.weights) || self.weights == other.weights)
    }
}

impl Eq for PlainWeights {}

/// The shape and format only: hashing every weight would read them all.
impl Hash for PlainWeights {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.weights.shape().hash(state);
        self.k_axis.hash(state);
        self.mn_axis.hash(state);
        self.fact.hash(state);
    }
}

impl fmt::Display for PlainWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "plain f32 weights (k {} x mn {}, {})",
            self.k(),
            self.mn(),
            if self.k_major() {
                "k-major"
            } else {
                "feature-major"
            }
        )
    }
}

impl fmt::Debug for PlainWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speech::tune::tests::{plan_on, run_f32_on, uniform};
    use crate::speech::tune::{Exactness, Rewrites, optimize};
    use tract_onnx::tract_core::ops::einsum::EinSum;

    /// `x` (`[1, T, k]`, `T` symbolic) by constant weights stored as `expr`
    /// says (`kn`: `k`-major, `nk`: feature-major), decluttered.
    fn product(expr: &str, k: usize, m: usize) -> TypedModel {
        let mut model = TypedModel::default();
        let t: TDim = model.symbols.sym("T").into();
        let x = model
            .add_source("x", f32::fact(tvec![1.to_dim(), t, k.to_dim()]))
            .expect("x");
        let mut rnd = uniform(3);
        let values: Vec<f32> = (0..k * m).map(|_| rnd()).collect();
        let shape = if expr.contains(",kn") { [k, m] } else { [m, k] };
        let w = model
            .add_const("w", Tensor::from_shape(&shape, &values).expect("w"))
            .expect("w");
        let y = model
            .wire_node(
                "mm",
                EinSum::new(expr.parse().expect("expr"), f32::datum_type()),
                &[x, w],
            )
            .expect("matmul");
        model.select_output_outlets(&y).expect("outputs");
        model.into_decluttered().expect("decluttered")
    }

    /// A plan of our optimiser's graph, its weights kept but left to tract's
    /// kernels: the run is an error until [`pack_leftovers`] packs them, and
    /// then the same bits as tract's own plan, for either layout.
    #[test]
    fn weights_left_to_tract_are_packed_as_tract_packs_them() {
        let (k, m, frames) = (40usize, 24usize, 9usize);
        let mut rnd = uniform(5);
        let x: Vec<f32> = (0..frames * k).map(|_| rnd()).collect();
        let inputs = [Tensor::from_shape(&[1, frames, k], &x).expect("x")];
        for expr in ["atk,kn->atn", "atk,nk->atn"] {
            let typed = product(expr, k, m);
            let tracts = typed.clone().into_optimized().expect("tract's");
            let mut ours = typed;
            let mut done = Rewrites::default();
            optimize(&mut ours, &mut done, Exactness::Close).expect("optimise");
            assert_eq!(done.plain_weights, 1, "{expr}: {ours}");
            let held = plan_on(&ours, 1).run(tvec![inputs[0].clone().into_tvalue()]);
            let why = format!("{:?}", held.expect_err("a plan of plain weights ran"));
            assert!(why.contains("packed first"), "{expr}: {why}");
            assert_eq!(pack_leftovers(&mut ours).expect("pack"), 1, "{expr}");
            assert_eq!(pack_leftovers(&mut ours).expect("again"), 0, "{expr}");
            let expected = run_f32_on(&tracts, &inputs, 1);
            for threads in [1, 2] {
                let got = run_f32_on(&ours, &inputs, threads);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&expected), "{expr}, {threads} threads");
            }
        }
    }

    /// A feature's weights read from the plain tensor are the ones tract's
    /// packing of it holds, for either layout.
    #[test]
    fn a_feature_s_weights_are_those_tract_packs() {
        let (k, m) = (7usize, 19usize);
        let values: Vec<f32> = (0..k * m).map(|i| i as f32 * 0.5 - 3.0).collect();
        let format = PackedFormat::new(f32::datum_type(), 16, 16);
        for (shape, k_axis, mn_axis) in [([k, m], 0, 1), ([m, k], 1, 0)] {
            let tensor = Arc::new(Tensor::from_shape(&shape, &values).expect("w"));
            let plain = PlainWeights::new(tensor, k_axis, mn_axis, &format).expect("f32");
            assert_eq!((plain.k(), plain.mn()), (k, m));
            let packed = plain.packed().expect("pack");
            for mn in 0..m {
                let (mut ours, mut tracts) = (vec![0f32; k], vec![0f32; k]);
                plain.extract_at_mn_f32(mn, &mut ours).expect("ours");
                packed.extract_at_mn_f32(mn, &mut tracts).expect("tract's");
                assert_eq!(ours, tracts, "{shape:?}, feature {mn}");
            }
            assert!(plain.extract_at_mn_f32(m, &mut vec![0f32; k]).is_err());
        }
    }
}
