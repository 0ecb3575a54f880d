//! Element-wise `Add`, `Sub` and `Mul` where one operand broadcasts.
//!
//! tract picks its fast binary ops (by-scalar, unicast) only when it can prove
//! the run it loops over is long, and with a symbolic time axis it cannot: the
//! conv module's bias adds `[1, 768, T] + [1, 768, 1]`, its LayerNorm's
//! `[1, 768, T] - [1, 1, T]` and the rotary `[T, 1, 16, 48] * [T, 1, 1, 48]`
//! fall to a generic broadcasting loop at ~4 ns per element (int8, 10 s: 70 ms
//! of 500). [`BroadcastBin`] runs them as rows: each row of the full operand
//! meets either one scalar or one contiguous row of the other, which vectorises
//! and splits across the pool. Every element is the same single IEEE (or
//! wrapping integer) operation as tract's, so the result is bit for bit the same.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;

/// The element-wise operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arith {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
}

/// Replaces tract's generic `Add`/`Sub`/`Mul` nodes on f32 or i32 whose one
/// operand has the output's shape and the other broadcasts into it. Returns how
/// many were replaced.
pub fn replace_broadcast_binops(model: &mut TypedModel) -> TractResult<usize> {
    let targets: Vec<(usize, BroadcastBin)> = model
        .nodes
        .iter()
        .filter_map(|n| BroadcastBin::for_node(model, n).map(|op| (n.id, op)))
        .collect();
    for (id, op) in &targets {
        model.nodes[*id].op = Box::new(op.clone());
    }
    Ok(targets.len())
}

/// `Add`, `Sub` or `Mul` of a full-shape operand and one that broadcasts into
/// it, row by row. Inputs it does not fit at run time (other shapes, strides)
/// go to the tract op it replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastBin {
    arith: Arith,
    /// Which input has the output's shape (0 or 1).
    full: usize,
    datum_type: DatumType,
    original: Box<dyn TypedOp>,
}

impl BroadcastBin {
    fn for_node(model: &TypedModel, node: &TypedNode) -> Option<BroadcastBin> {
        let bin = node.op_as::<TypedBinOp>()?;
        if bin.1.is_some() || node.inputs.len() != 2 {
            return None;
        }
        let arith = match bin.0.name() {
            "Add" => Arith::Add,
            "Sub" => Arith::Sub,
            "Mul" => Arith::Mul,
            _ => return None,
        };
        let out = &node.outputs.first()?.fact;
        let facts: Vec<&TypedFact> = node
            .inputs
            .iter()
            .map(|i| model.outlet_fact(*i).ok())
            .collect::<Option<_>>()?;
        let datum_type = out.datum_type;
        if !matches!(datum_type, DatumType::F32 | DatumType::I32)
            || facts.iter().any(|f| f.datum_type != datum_type)
            || facts.iter().any(|f| f.shape.rank() != out.shape.rank())
        {
            return None;
        }
        let is_full = |f: &TypedFact| f.shape.iter().zip(out.shape.iter()).all(|(d, o)| d == o);
        let broadcasts = |f: &TypedFact| {
            f.shape
                .iter()
                .zip(out.shape.iter())
                .all(|(d, o)| d == o || d.is_one())
        };
        let full = if is_full(facts[0]) && broadcasts(facts[1]) {
            0
        } else if is_full(facts[1]) && broadcasts(facts[0]) {
            1
        } else {
            return None;
        };
        Some(BroadcastBin {
            arith,
            full,
            datum_type,
            original: node.op.clone(),
        })
    }

    /// Which input is the full operand, when this is an f32 `Add`.
    pub(super) fn f32_add_to(&self) -> Option<usize> {
        (self.arith == Arith::Add && self.datum_type == DatumType::F32).then_some(self.full)
    }

    /// Whether the run-time operands fit the row walk.
    fn fits(&self, full: &Tensor, other: &Tensor) -> bool {
        full.datum_type() == self.datum_type
            && other.datum_type() == self.datum_type
            && fit_rows(full, other)
    }

    fn run<T: Datum + Copy>(
        &self,
        out: &mut Tensor,
        other: &Tensor,
        f: impl Fn(T, T) -> T + Sync + Send,
    ) -> TractResult<()> {
        let rows = Rows::new(out.shape(), other.shape());
        let other = other.try_as_plain_ram()?;
        let other = other.as_slice::<T>()?;
        let mut view = out.try_as_plain_ram_mut()?;
        let out = view.as_slice_mut::<T>()?;
        if out.is_empty() {
            return Ok(());
        }
        let total = out.len();
        tract_linalg::multithread::par_chunks_mut(out, rows.len, total, |first_row, chunk| {
            super::wide(Apply {
                rows: &rows,
                first_row,
                chunk,
                other,
                f: &f,
            });
            Ok(())
        })
    }
}

/// Whether `other` broadcasts into `full` (same rank, each axis equal or 1)
/// and both are laid out row-major: what [`Rows`] walks.
pub(super) fn fit_rows(full: &Tensor, other: &Tensor) -> bool {
    full.rank() == other.rank()
        && full
            .shape()
            .iter()
            .zip(other.shape())
            .all(|(f, o)| o == f || *o == 1)
        && row_major(full)
        && row_major(other)
}

/// Whether `t` is laid out row-major, whatever the stride of an axis of
/// length 1 says (a reduction leaves `[250, 1, 1]` on a `[1, 1, 250]` mean).
pub(super) fn row_major(t: &Tensor) -> bool {
    let mut expected = 1isize;
    t.shape()
        .iter()
        .zip(t.strides())
        .rev()
        .all(|(&dim, &stride)| {
            let ok = dim == 1 || stride == expected;
            expected *= dim as isize;
            ok
        })
}

/// `x = f(x, y)` over output rows `first_row..` in `chunk`, `y` from
/// `other`, as [`super::wide`] work.
struct Apply<'a, T, F> {
    rows: &'a Rows,
    first_row: usize,
    chunk: &'a mut [T],
    other: &'a [T],
    f: &'a F,
}

impl<T: Copy, F: Fn(T, T) -> T> super::Wide for Apply<'_, T, F> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let (rows, f) = (self.rows, self.f);
        for (row, xs) in self.chunk.chunks_exact_mut(rows.len).enumerate() {
            match rows.operand(self.other, self.first_row + row) {
                Operand::Scalar(y) => {
                    for x in xs.iter_mut() {
                        *x = f(*x, y);
                    }
                }
                Operand::Row(ys) => {
                    for (x, y) in xs.iter_mut().zip(ys) {
                        *x = f(*x, *y);
                    }
                }
            }
        }
    }
}

/// How the output's rows meet the broadcast operand: rows of `len` elements,
/// each against one scalar (`scalar`) or one contiguous row of `len` of the
/// other operand, starting at `offsets[row]`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Rows {
    pub(super) len: usize,
    pub(super) scalar: bool,
    pub(super) offsets: Vec<usize>,
}

impl Rows {
    /// `full` is the output's shape; `other` has its rank, each axis equal or 1.
    pub(super) fn new(full: &[usize], other: &[usize]) -> Rows {
        let rank = full.len();
        let suffix = |same: &dyn Fn(usize) -> bool| {
            let mut axis = rank;
            while axis > 0 && same(axis - 1) {
                axis -= 1;
            }
            axis
        };
        let equal_from = suffix(&|ax| other[ax] == full[ax]);
        let equal_len: usize = full[equal_from..].iter().product();
        let (split, scalar) = if equal_len > 1 || equal_from == 0 {
            (equal_from, false)
        } else {
            (suffix(&|ax| other[ax] == 1), true)
        };
        let mut strides = vec![0; rank];
        let mut stride = 1;
        for ax in (0..rank).rev() {
            strides[ax] = if other[ax] == 1 { 0 } else { stride };
            stride *= other[ax];
        }
        let n_rows: usize = full[..split].iter().product();
        let offsets = (0..n_rows)
            .map(|row| {
                let mut rest = row;
                let mut at = 0;
                for ax in (0..split).rev() {
                    at += (rest % full[ax]) * strides[ax];
                    rest /= full[ax];
                }
                at
            })
            .collect();
        Rows {
            len: full[split..].iter().product(),
            scalar,
            offsets,
        }
    }

    /// What output row `row` meets in the broadcast operand `other`.
    #[inline(always)]
    pub(super) fn operand<'a, T: Copy>(&self, other: &'a [T], row: usize) -> Operand<'a, T> {
        let at = self.offsets[row];
        if self.scalar {
            Operand::Scalar(other[at])
        } else {
            Operand::Row(&other[at..at + self.len])
        }
    }
}

/// One output row's share of the broadcast operand ([`Rows::operand`]).
pub(super) enum Operand<'a, T> {
    /// One value for the whole row.
    Scalar(T),
    /// One value per element of the row.
    Row(&'a [T]),
}

impl Op for BroadcastBin {
    fn name(&self) -> StaticName {
        format!("Broadcast{:?}", self.arith).into()
    }

    op_as_typed_op!();
}

impl EvalOp for BroadcastBin {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        if !self.fits(&inputs[self.full], &inputs[1 - self.full]) {
            return self.original.eval(ctx, inputs);
        }
        let (a, b) = args_2!(inputs);
        let (full, other) = if self.full == 0 { (a, b) } else { (b, a) };
        let mut out = full.into_tensor();
        // `x` is the full operand's element, `y` the other's; Sub keeps the
        // graph's operand order.
        let flipped = self.full == 1;
        match (self.datum_type, self.arith) {
            (DatumType::F32, Arith::Add) => self.run::<f32>(&mut out, &other, |x, y| x + y)?,
            (DatumType::F32, Arith::Mul) => self.run::<f32>(&mut out, &other, |x, y| x * y)?,
            (DatumType::F32, Arith::Sub) if flipped => {
                self.run::<f32>(&mut out, &other, |x, y| y - x)?
            }
            (DatumType::F32, Arith::Sub) => self.run::<f32>(&mut out, &other, |x, y| x - y)?,
            (DatumType::I32, Arith::Add) => {
                self.run::<i32>(&mut out, &other, |x, y| x.wrapping_add(y))?
            }
            (DatumType::I32, Arith::Mul) => {
                self.run::<i32>(&mut out, &other, |x, y| x.wrapping_mul(y))?
            }
            (DatumType::I32, Arith::Sub) if flipped => {
                self.run::<i32>(&mut out, &other, |x, y| y.wrapping_sub(x))?
            }
            (DatumType::I32, Arith::Sub) => {
                self.run::<i32>(&mut out, &other, |x, y| x.wrapping_sub(y))?
            }
            (dt, _) => bail!("BroadcastBin on {dt:?}"),
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for BroadcastBin {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.original.output_facts(inputs)
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speech::tune::tests::plan_on;

    #[test]
    fn rows_follow_the_broadcast_axis() {
        // Bias per channel: one scalar per row of T.
        let bias = Rows::new(&[1, 3, 4], &[1, 3, 1]);
        assert_eq!(
            (bias.len, bias.scalar, bias.offsets),
            (4, true, vec![0, 1, 2])
        );
        // LayerNorm mean over channels: every row meets the same row of T.
        let mean = Rows::new(&[1, 3, 4], &[1, 1, 4]);
        assert_eq!(
            (mean.len, mean.scalar, mean.offsets),
            (4, false, vec![0, 0, 0])
        );
        // Rotary: [T, 1, H, D] * [T, 1, 1, D], the row changes with T only.
        let rotary = Rows::new(&[2, 1, 3, 5], &[2, 1, 1, 5]);
        assert_eq!(
            (rotary.len, rotary.scalar, rotary.offsets),
            (5, false, vec![0, 0, 0, 5, 5, 5])
        );
        // Same shapes: one row.
        let same = Rows::new(&[2, 3], &[2, 3]);
        assert_eq!((same.len, same.scalar, same.offsets), (6, false, vec![0]));
        // Trailing ones on both sides, then a broadcast axis.
        let ones = Rows::new(&[2, 3, 1], &[2, 1, 1]);
        assert_eq!((ones.len, ones.scalar, ones.offsets), (3, true, vec![0, 1]));
        // A scalar against everything.
        let scalar = Rows::new(&[2, 3], &[1, 1]);
        assert_eq!(
            (scalar.len, scalar.scalar, scalar.offsets),
            (6, true, vec![0])
        );
    }

    /// Every pattern against tract's own op, on a symbolic length (6,000: above
    /// the size the pool splits at): same bits,
    /// Sub in both operand orders, f32 and i32, one and two threads.
    #[test]
    fn same_bits_as_tract_on_every_pattern() {
        use tract_onnx::tract_core::ops::math;
        let shapes: [(&[usize], &[usize]); 5] = [
            (&[1, 6, 0], &[1, 6, 1]),
            (&[1, 6, 0], &[1, 1, 0]),
            (&[0, 1, 3, 5], &[0, 1, 1, 5]),
            (&[1, 6, 1, 0], &[1, 6, 1, 1]),
            (&[6, 0], &[6, 0]),
        ];
        type MakeOp = fn() -> TypedBinOp;
        let ops: [(&str, MakeOp); 3] = [("add", math::add), ("sub", math::sub), ("mul", math::mul)];
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 40) as i32 - (1 << 23)
        };
        for (full, other) in shapes {
            for (name, op) in ops {
                for flip in [false, true] {
                    for dt in [DatumType::F32, DatumType::I32] {
                        let mut model = TypedModel::default();
                        let t = model.symbols.sym("T");
                        let sym = |dims: &[usize]| -> TVec<TDim> {
                            dims.iter()
                                .map(|&d| if d == 0 { t.clone().into() } else { d.into() })
                                .collect()
                        };
                        let a = model.add_source("a", dt.fact(sym(full))).expect("a");
                        let b = model.add_source("b", dt.fact(sym(other))).expect("b");
                        let wires = if flip { [b, a] } else { [a, b] };
                        let out = model.wire_node(name, op(), &wires).expect("wire");
                        model.select_output_outlets(&out).expect("outputs");
                        let concrete = |dims: &[usize]| -> Vec<usize> {
                            dims.iter()
                                .map(|&d| if d == 0 { 6000 } else { d })
                                .collect()
                        };
                        let tensor = |dims: &[usize], next: &mut dyn FnMut() -> i32| {
                            let shape = concrete(dims);
                            let n: usize = shape.iter().product();
                            let ints: Vec<i32> = (0..n).map(|_| next() >> 8).collect();
                            let t = Tensor::from_shape(&shape, &ints).expect("tensor");
                            match dt {
                                DatumType::F32 => {
                                    let floats: Vec<f32> =
                                        ints.iter().map(|&i| i as f32 / 977.0).collect();
                                    Tensor::from_shape(&shape, &floats).expect("tensor")
                                }
                                _ => t,
                            }
                        };
                        let (x, y) = (tensor(full, &mut next), tensor(other, &mut next));
                        let inputs = || tvec![x.clone().into_tvalue(), y.clone().into_tvalue()];
                        let mut tuned = model.clone();
                        assert_eq!(
                            replace_broadcast_binops(&mut tuned).expect("rewrite"),
                            1,
                            "{name} {full:?} {other:?}"
                        );
                        let want = model.into_runnable().expect("plan").run(inputs());
                        for threads in [1, 2] {
                            let got = plan_on(&tuned, threads).run(inputs()).expect("run");
                            let want = want.as_ref().expect("tract ran");
                            assert_eq!(
                                got[0], want[0],
                                "{name} {dt:?} {full:?} {other:?} flip {flip}"
                            );
                        }
                    }
                }
            }
        }
    }
}
