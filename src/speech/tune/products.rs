//! The attention's products of two activations on faer's kernels.
//!
//! Each attention layer multiplies queries by keys and the probabilities by
//! the values, 16 heads of 48 features each. tract packs both operands of
//! every head (`OptMatMulPack`, or [`super::batch::BatchPack`]) and runs its
//! 64x3 kernel, whose tiles are mostly overhead at `k` 48: on the Zen 4 of
//! docs/perf.md's twentieth round, 2 ms per product at 10 s and 0.2 ms per
//! packing, where faer multiplies the same head matrices straight from the
//! tensors, strided, in 1.0–1.3 ms.
//!
//! [`replace_batched_products`] takes each optimised f32 matmul of two
//! packed activations with nothing fused after it and runs it as a
//! [`BatchedProduct`]: one faer product per matrix of the batch, the batch
//! split over the pool (each product on one thread, so the bits do not
//! depend on the pool), written in place where each matrix of the output
//! is contiguous, else into a scratch matrix and copied out (faer writes a
//! matrix whose rows lie far apart at two thirds of its rate). It changes
//! bits (faer sums `k` in its own order), so it runs only with
//! [`super::Exactness::Close`].

use tract_onnx::prelude::tract_ndarray::Dimension;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, ProtoFusedSpec};

/// Replaces each f32 matmul of two packed activation tensors in an optimised
/// graph with a [`BatchedProduct`], when tract fused nothing into it but the
/// store and each operand and the output have one of their two matrix axes
/// innermost. Returns how many were replaced.
pub fn replace_batched_products(model: &mut TypedModel) -> TractResult<usize> {
    super::replace_matmuls(model, batched_product)
}

/// One operand of a product: the input tensor tract packed, its matrix axes
/// and which of its axes each output axis of the batch walks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Operand {
    k_axis: usize,
    /// `m` for the left operand, `n` for the right one.
    mn_axis: usize,
    /// `(output axis, input axis)`, as tract's `MapOutputAxisToInput`.
    batch: Vec<(usize, usize)>,
}

impl Operand {
    /// The operand packed by node `packed`'s producer, with tract's map of
    /// output axes to the packed tensor's axes; `None` unless the packing
    /// reads a plain f32 tensor and `k` or `mn` is its innermost axis.
    fn of(
        model: &TypedModel,
        packed: OutletId,
        map: &[(usize, usize)],
    ) -> TractResult<Option<(Operand, OutletId)>> {
        let pack = model.node(packed.node);
        if !matches!(&*pack.op.name(), "OptMatMulPack" | "BatchPack") || pack.inputs.len() != 1 {
            return Ok(None);
        }
        let Some((k_axis, mn_axis)) = super::pack_axes(model, pack)? else {
            return Ok(None);
        };
        let input = pack.inputs[0];
        let fact = model.outlet_fact(input)?;
        let rank = fact.rank();
        if fact.datum_type != f32::datum_type()
            || k_axis == mn_axis
            || k_axis.max(mn_axis) + 1 != rank
        {
            return Ok(None);
        }
        // The packed tensor has the input's axes but `k` and `mn`.
        let kept: Vec<usize> = (0..rank).filter(|&a| a != k_axis && a != mn_axis).collect();
        let mut batch = Vec::with_capacity(map.len());
        for &(out_axis, packed_axis) in map {
            let Some(&axis) = kept.get(packed_axis) else {
                return Ok(None);
            };
            batch.push((out_axis, axis));
        }
        Ok(Some((
            Operand {
                k_axis,
                mn_axis,
                batch,
            },
            input,
        )))
    }

    /// Where the matrix for the output's batch coordinates `coords` starts,
    /// in a tensor of `shape` and `strides` (an axis of one is broadcast).
    fn offset(&self, coords: &[usize], shape: &[usize], strides: &[usize]) -> usize {
        self.batch
            .iter()
            .filter(|&&(_, axis)| shape[axis] != 1)
            .map(|&(out_axis, axis)| coords[out_axis] * strides[axis])
            .sum()
    }

    /// The output dimension this operand gives output axis `out_axis` (1
    /// where it does not walk it).
    fn dim(&self, out_axis: usize, shape: &[usize]) -> usize {
        self.batch
            .iter()
            .find(|&&(o, _)| o == out_axis)
            .map_or(1, |&(_, axis)| shape[axis])
    }
}

/// The [`BatchedProduct`] for node `id` and its two inputs (the tensors the
/// operands were packed from), when it is a product this module runs.
fn batched_product(
    model: &TypedModel,
    id: usize,
) -> TractResult<Option<(BatchedProduct, TVec<OutletId>)>> {
    let node = model.node(id);
    let Some((op, m_axis, n_axis)) = super::f32_matmul(node) else {
        return Ok(None);
    };
    let f32_dt = f32::datum_type();
    let rank = op.c_fact.rank();
    if m_axis.max(n_axis) + 1 != rank {
        return Ok(None);
    }
    let [
        ProtoFusedSpec::AddMatMul {
            geo,
            a: MatMulOperand::Input(a_slot),
            b: MatMulOperand::Input(b_slot),
            ..
        },
        ProtoFusedSpec::Store(specs),
    ] = op.micro_ops.as_slice()
    else {
        return Ok(None);
    };
    let stores_plainly = specs.iter().all(|s| super::same_layout(s, m_axis, n_axis));
    let (Some(&a), Some(&b)) = (node.inputs.get(*a_slot), node.inputs.get(*b_slot)) else {
        return Ok(None);
    };
    if !stores_plainly || a_slot == b_slot {
        return Ok(None);
    }
    let (Some((lhs, a)), Some((rhs, b))) = (
        Operand::of(model, a, &geo.c_to_a_axis_mapping.0)?,
        Operand::of(model, b, &geo.c_to_b_axis_mapping.0)?,
    ) else {
        return Ok(None);
    };
    // Every batch axis walked by an operand is one of the output's.
    let batch_axis = |&(o, _): &(usize, usize)| o < rank && o != m_axis && o != n_axis;
    if !lhs.batch.iter().all(batch_axis) || !rhs.batch.iter().all(batch_axis) {
        return Ok(None);
    }
    let op = BatchedProduct {
        lhs,
        rhs,
        c_fact: f32_dt.fact(op.c_fact.shape.clone()),
        m_axis,
        n_axis,
    };
    Ok(Some((op, tvec![a, b])))
}

/// `c[.., m, n] = sum_k a[.., m, k] b[.., k, n]` for each matrix of a batch,
/// on faer, reading both operands in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchedProduct {
    /// Input 0: its `k` and `m` axes.
    lhs: Operand,
    /// Input 1: its `k` and `n` axes.
    rhs: Operand,
    /// The output tract's matmul declared, and its matrix axes (the inner of
    /// the two is the last).
    c_fact: TypedFact,
    m_axis: usize,
    n_axis: usize,
}

impl Op for BatchedProduct {
    fn name(&self) -> StaticName {
        "BatchedProduct".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "faer f32; a: k axis {}, m axis {}; b: k axis {}, n axis {}; c: m axis {}, n axis {}",
            self.lhs.k_axis,
            self.lhs.mn_axis,
            self.rhs.k_axis,
            self.rhs.mn_axis,
            self.m_axis,
            self.n_axis
        )])
    }

    op_as_typed_op!();
}

/// A tensor's strides in elements, once, as offsets (a plain tensor's are
/// never negative; an error if one were).
fn strides(t: &Tensor) -> TractResult<TVec<usize>> {
    t.strides()
        .iter()
        .map(|&s| usize::try_from(s).map_err(|_| format_err!("negative strides {:?}", t.strides())))
        .collect()
}

/// An operand matrix as faer reads it, `rows x cols` from `rows_axis` and
/// `cols_axis` of a plain tensor, one of them innermost.
fn matrix<'a>(
    data: &'a [f32],
    strides: &[usize],
    (rows_axis, rows): (usize, usize),
    (cols_axis, cols): (usize, usize),
) -> faer::MatRef<'a, f32> {
    if rows_axis > cols_axis {
        faer::MatRef::from_column_major_slice_with_stride(data, rows, cols, strides[cols_axis])
    } else {
        faer::MatRef::from_row_major_slice_with_stride(data, rows, cols, strides[rows_axis])
    }
}

impl EvalOp for BatchedProduct {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, b) = (&inputs[0], &inputs[1]);
        ensure!(
            a.datum_type() == f32::datum_type() && b.datum_type() == f32::datum_type(),
            "BatchedProduct: {:?} by {:?}, expected F32",
            a.datum_type(),
            b.datum_type()
        );
        let (a_shape, b_shape) = (a.shape(), b.shape());
        let (m, k) = (a_shape[self.lhs.mn_axis], a_shape[self.lhs.k_axis]);
        let n = b_shape[self.rhs.mn_axis];
        ensure!(
            b_shape[self.rhs.k_axis] == k,
            "BatchedProduct: {a_shape:?} by {b_shape:?}, k {k} against {}",
            b_shape[self.rhs.k_axis]
        );
        let rank = self.c_fact.rank();
        let mut shape: TVec<usize> = tvec![1; rank];
        let mut batch_axes = Vec::with_capacity(rank);
        for (axis, dim) in shape.iter_mut().enumerate() {
            *dim = if axis == self.m_axis {
                m
            } else if axis == self.n_axis {
                n
            } else {
                let (da, db) = (self.lhs.dim(axis, a_shape), self.rhs.dim(axis, b_shape));
                ensure!(
                    da == db || da == 1 || db == 1,
                    "BatchedProduct: batch axis {axis} of {da} against {db}"
                );
                batch_axes.push(axis);
                da.max(db)
            };
        }
        let mut out = Tensor::zero::<f32>(&shape)?;
        let size = m * n;
        if size == 0 {
            return Ok(tvec!(out.into_tvalue()));
        }
        let (a_strides, b_strides, c_strides) = (strides(a)?, strides(b)?, strides(&out)?);
        let batches: Vec<TVec<usize>> = {
            let mut batch_shape: TVec<usize> = shape.clone();
            batch_shape[self.m_axis] = 1;
            batch_shape[self.n_axis] = 1;
            tract_ndarray::indices(&*batch_shape)
                .into_iter()
                .map(|coords| coords.slice().iter().copied().collect())
                .collect()
        };
        let av = a.try_as_plain_ram()?;
        let av = av.as_slice::<f32>()?;
        let bv = b.try_as_plain_ram()?;
        let bv = bv.as_slice::<f32>()?;
        let n_inner = self.n_axis > self.m_axis;
        let product = |coords: &[usize], dst: &mut [f32]| {
            let lhs = matrix(
                &av[self.lhs.offset(coords, a_shape, &a_strides)..],
                &a_strides,
                (self.lhs.mn_axis, m),
                (self.lhs.k_axis, k),
            );
            let rhs = matrix(
                &bv[self.rhs.offset(coords, b_shape, &b_strides)..],
                &b_strides,
                (self.rhs.k_axis, k),
                (self.rhs.mn_axis, n),
            );
            let dst = if n_inner {
                faer::MatMut::from_row_major_slice_mut(dst, m, n)
            } else {
                faer::MatMut::from_column_major_slice_mut(dst, m, n)
            };
            faer::linalg::matmul::matmul(dst, faer::Accum::Replace, lhs, rhs, 1f32, faer::Par::Seq);
        };
        let work = batches.len() * size * k.max(1);
        let run = |c: &mut [f32]| {
            tract_linalg::multithread::par_chunks_mut(c, size, work, |first, chunk| {
                for (coords, dst) in batches[first..].iter().zip(chunk.chunks_exact_mut(size)) {
                    product(coords, dst);
                }
                Ok(())
            })
        };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let c = view.as_slice_mut::<f32>()?;
            // Each output matrix contiguous, in the batch's order: written in place.
            if batch_axes
                .iter()
                .all(|&axis| axis < self.m_axis.min(self.n_axis))
            {
                run(c)?;
            } else {
                let mut scratch = vec![0f32; batches.len() * size];
                run(&mut scratch)?;
                let (outer_axis, inner) = if n_inner {
                    (self.m_axis, n)
                } else {
                    (self.n_axis, m)
                };
                for (coords, matrix) in batches.iter().zip(scratch.chunks_exact(size)) {
                    let start: usize = batch_axes
                        .iter()
                        .map(|&ax| coords[ax] * c_strides[ax])
                        .sum();
                    for (i, run) in matrix.chunks_exact(inner).enumerate() {
                        let at = start + i * c_strides[outer_axis];
                        c[at..at + inner].copy_from_slice(run);
                    }
                }
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for BatchedProduct {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2, "BatchedProduct: two inputs");
        let mut shape = self.c_fact.shape.clone();
        shape.set(self.m_axis, inputs[0].shape[self.lhs.mn_axis].clone());
        shape.set(self.n_axis, inputs[1].shape[self.rhs.mn_axis].clone());
        Ok(tvec!(f32::datum_type().fact(shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speech::tune::tests::{assert_close_on_any_pool, uniform};
    use tract_onnx::tract_core::ops::einsum::EinSum;
    use tract_onnx::tract_core::ops::matmul::optimized::OptMatMul;

    /// Two chained products over `heads` heads of width `d` and `T` frames
    /// (symbolic, as gigastt loads), optimised by tract: `first` of inputs
    /// `x` and `y`, then `second` of that by `z`.
    fn products(shapes: [&[usize]; 3], first: &str, second: &str) -> TypedModel {
        let mut model = TypedModel::default();
        let t: TDim = model.symbols.sym("T").into();
        // A 0 in a shape stands for `T`.
        let fact = |shape: &[usize]| {
            let dims: TVec<TDim> = shape
                .iter()
                .map(|&d| if d == 0 { t.clone() } else { d.to_dim() })
                .collect();
            f32::fact(dims)
        };
        let x = model.add_source("x", fact(shapes[0])).expect("x");
        let y = model.add_source("y", fact(shapes[1])).expect("y");
        let z = model.add_source("z", fact(shapes[2])).expect("z");
        let einsum = |expr: &str| EinSum::new(expr.parse().expect("expr"), f32::datum_type());
        let scores = model
            .wire_node("first", einsum(first), &[x, y])
            .expect("first")[0];
        let out = model
            .wire_node("second", einsum(second), &[scores, z])
            .expect("second");
        model.select_output_outlets(&out).expect("outputs");
        model.into_optimized().expect("optimised")
    }

    /// Heads outermost, heads between frames and features (GigaAM's layout,
    /// whose second product's output is not batch-major), and an operand
    /// shared by every head: replaced, within a few units in the last place
    /// of tract's (at `k` 37 and 16), the same bits on one and two threads,
    /// for one frame and for a frame count off every block size.
    #[test]
    fn close_to_tract_s_products_on_any_pool() {
        let (h, d) = (4usize, 16usize);
        let cases: [([&[usize]; 3], &str, &str); 3] = [
            (
                [&[h, 0, d], &[h, 0, d], &[h, 0, d]],
                "htd,hsd->hts",
                "hts,hsd->htd",
            ),
            (
                [&[0, h, d], &[0, h, d], &[0, h, d]],
                "thd,shd->hts",
                "hts,shd->thd",
            ),
            ([&[h, 0, d], &[0, d], &[0, d]], "htd,sd->hts", "hts,sd->htd"),
        ];
        for (shapes, first, second) in cases {
            let plain = products(shapes, first, second);
            let mut replaced = plain.clone();
            let done = replace_batched_products(&mut replaced).expect("replace");
            assert_eq!(done, 2, "{first}, {second} in\n{plain}");
            let replaced = replaced.into_compact().expect("compact");
            assert!(
                !replaced.nodes.iter().any(|n| n.op_is::<OptMatMul>()),
                "{replaced}"
            );
            let mut rnd = uniform(29);
            for frames in [1usize, 37] {
                let inputs: Vec<Tensor> = shapes
                    .iter()
                    .map(|shape| {
                        let dims: Vec<usize> = shape
                            .iter()
                            .map(|&s| if s == 0 { frames } else { s })
                            .collect();
                        let data: Vec<f32> = (0..dims.iter().product()).map(|_| rnd()).collect();
                        Tensor::from_shape(&dims, &data).expect("input")
                    })
                    .collect();
                let what = format!("{second}, {frames} frames");
                assert_close_on_any_pool(&plain, &replaced, &inputs, 64.0, &what);
            }
        }
    }
}
