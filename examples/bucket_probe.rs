//! Probe for docs/perf.md: (1) does padding the encoder input to a longer
//! concrete length (with the true `length`) leave the valid output frames
//! unchanged? (No: the export's first attention layer has no padding mask.)
//! (2) Do two concrete plans pack identical weights (so one copy could be
//! shared)? (Yes.) Also times building a concrete plan from the decluttered model.
//!
//!     cargo run --release --example bucket_probe -- models/gigaam-v3-full-random/gen/v3_e2e_rnnt_encoder.onnx 999 1100
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, OptMatMul, ProtoFusedSpec};
use tract_onnx::tract_hir::internal::InferenceFact;

fn decluttered(path: &str) -> TypedModel {
    let onnx = tract_onnx::onnx()
        .with_ignore_output_shapes(true)
        .with_ignore_value_info(true);
    let mut model = onnx.model_for_path(path).unwrap();
    model.symbols.add_assertion("T >= 2").unwrap();
    let t = model.symbols.sym("T");
    model
        .set_input_fact(0, f32::fact([1.to_dim(), 64.to_dim(), t.to_dim()]).into())
        .unwrap();
    model.set_input_fact(1, i64::fact([1]).into()).unwrap();
    for ix in 0..model.output_outlets().unwrap().len() {
        model.set_output_fact(ix, InferenceFact::default()).unwrap();
    }
    model.into_typed().unwrap().into_decluttered().unwrap()
}

fn concrete(model: &TypedModel, frames: usize) -> TypedModel {
    let t = model.symbols.get("T").unwrap();
    let subs = std::collections::HashMap::from([(t, (frames as i64).to_dim())]);
    let mut m = model.set_symbols(&subs).unwrap();
    m.declutter().unwrap();
    m.into_optimized().unwrap()
}

fn blobs(model: &TypedModel) -> Vec<(String, usize, usize)> {
    let mut out = vec![];
    for node in &model.nodes {
        if let Some(op) = node.op_as::<OptMatMul>() {
            for uop in &op.micro_ops {
                if let ProtoFusedSpec::AddMatMul { a, b, .. } = uop {
                    for operand in [a, b] {
                        if let MatMulOperand::Const(v) = operand {
                            let epi = v.downcast_ref::<tract_linalg::mmm::EagerPackedInput>();
                            if let Some(epi) = epi {
                                out.push((
                                    node.name.clone(),
                                    epi.packed.len(),
                                    epi.packed.as_bytes().as_ptr() as usize,
                                ));
                            } else {
                                out.push((node.name.clone(), 0, 0));
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

fn run(plan: &TypedModel, data: &[f32], frames: usize, len: usize) -> (Vec<usize>, Vec<f32>, i64) {
    let plan = plan.clone().into_runnable().unwrap();
    let input = Tensor::from_shape(&[1, 64, frames], data).unwrap();
    let length = Tensor::from_shape(&[1], &[len as i64]).unwrap();
    let out = plan
        .run(tvec![input.into_tvalue(), length.into_tvalue()])
        .unwrap();
    let l = out[1]
        .cast_to::<i64>()
        .unwrap()
        .try_as_plain_ram()
        .unwrap()
        .as_slice::<i64>()
        .unwrap()[0];
    (
        out[0].shape().to_vec(),
        out[0]
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec(),
        l,
    )
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap();
    let frames: usize = args.next().map_or(401, |f| f.parse().unwrap());
    let padded: usize = args.next().map_or(600, |f| f.parse().unwrap());
    let t = Instant::now();
    let dec = decluttered(&path);
    println!("decluttered in {:?}", t.elapsed());
    let mut seed = 1u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
    };
    let data: Vec<f32> = (0..64 * frames).map(|_| rnd()).collect();
    let t = Instant::now();
    let exact = concrete(&dec, frames);
    println!("concrete {frames} optimized in {:?}", t.elapsed());
    let t = Instant::now();
    let long = concrete(&dec, padded);
    println!("concrete {padded} optimized in {:?}", t.elapsed());
    let (s1, o1, l1) = run(&exact, &data, frames, frames);
    for fill in ["zero", "noise"] {
        let mut pdata = vec![0f32; 64 * padded];
        for c in 0..64 {
            for f in 0..padded {
                pdata[c * padded + f] = if f < frames {
                    data[c * frames + f]
                } else if fill == "zero" {
                    0.0
                } else {
                    rnd() * 3.0
                };
            }
        }
        let (s2, o2, l2) = run(&long, &pdata, padded, frames);
        let (d, n1, n2) = (s1[1], s1[2], s2[2]);
        let mut maxdiff = 0f32;
        for c in 0..d {
            for f in 0..(l1 as usize) {
                maxdiff = maxdiff.max((o1[c * n1 + f] - o2[c * n2 + f]).abs());
            }
        }
        let per: Vec<String> = (0..(l1 as usize))
            .map(|f| {
                (0..d)
                    .map(|c| (o1[c * n1 + f] - o2[c * n2 + f]).abs())
                    .fold(0f32, f32::max)
            })
            .enumerate()
            .filter(|(_, x)| *x > 1e-4)
            .map(|(f, x)| format!("{f}:{x:.2e}"))
            .collect();
        println!("frames differing: {}", per.join(" "));
        println!(
            "fill {fill}: shapes {s1:?} {s2:?} len {l1} {l2} max |diff| over valid frames {maxdiff:e}"
        );
    }
    let b1 = blobs(&exact);
    let b2 = blobs(&long);
    let same_len = b1
        .iter()
        .zip(&b2)
        .filter(|(x, y)| x.0 == y.0 && x.1 == y.1)
        .count();
    let total: usize = b1.iter().map(|b| b.1).sum();
    println!(
        "const operands {} / {}, same name+len {same_len}, bytes {}",
        b1.len(),
        b2.len(),
        total
    );
    for (x, y) in b1
        .iter()
        .zip(&b2)
        .filter(|(x, y)| x.0 != y.0 || x.1 != y.1)
        .take(5)
    {
        println!("  differ: {x:?} {y:?}");
    }
    let consts: usize = exact
        .nodes
        .iter()
        .filter_map(|n| n.op_as::<tract_onnx::tract_core::ops::konst::Const>())
        .map(|c| c.val().len() * c.val().datum_type().size_of())
        .sum();
    println!("Const node bytes {consts}");
}
