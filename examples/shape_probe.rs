//! Measures the "concrete vs symbolic time axis" lever of docs/perf.md: loads an
//! encoder with a symbolic `T` (what gigastt ships) and with `T` fixed to the
//! input length, at 1 and 2 threads, and prints median run time, load time and
//! the time per op type.
//!
//!     cargo run --release --example shape_probe -- models/gigaam-v3-full-random/gen/v3_e2e_rnnt_encoder.onnx 999
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Instant;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::InferenceFact;

fn load(
    path: &str,
    frames: Option<usize>,
    threads: usize,
) -> TractResult<std::sync::Arc<TypedRunnableModel>> {
    let onnx = tract_onnx::onnx()
        .with_ignore_output_shapes(true)
        .with_ignore_value_info(true);
    let mut model = onnx.model_for_path(path)?;
    let t: TDim = match frames {
        Some(n) => n.into(),
        None => {
            if let Ok(assertion) = std::env::var("PROBE_ASSERT") {
                model.symbols.add_assertion(assertion)?;
            }
            model.symbols.sym("T").into()
        }
    };
    model.set_input_fact(0, f32::fact([1.to_dim(), 64.to_dim(), t]).into())?;
    model.set_input_fact(1, i64::fact([1]).into())?;
    for ix in 0..model.output_outlets()?.len() {
        model.set_output_fact(ix, InferenceFact::default())?;
    }
    let executor = (threads > 1).then(|| tract_linalg::multithread::Executor::multithread(threads));
    model
        .into_optimized()?
        .into_runnable_with_options(&RunOptions {
            executor,
            ..Default::default()
        })
}

fn main() -> TractResult<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .expect("usage: shape_probe ENCODER.onnx [FRAMES]");
    let frames: usize = args
        .next()
        .map_or(999, |f| f.parse().expect("FRAMES is a number"));
    let input = Tensor::from_shape(&[1, 64, frames], &vec![0.1f32; 64 * frames])?;
    let length = Tensor::from_shape(&[1], &[frames as i64])?;
    let inputs = || tvec![input.clone().into_tvalue(), length.clone().into_tvalue()];
    let modes: Vec<bool> = if std::env::var("PROBE_SYMBOLIC_ONLY").is_ok() {
        vec![false]
    } else {
        vec![false, true]
    };
    for concrete in modes {
        for threads in [1, 2] {
            let started = Instant::now();
            let plan = load(&path, concrete.then_some(frames), threads)?;
            let load_ms = started.elapsed().as_millis();
            let mut state = plan.spawn()?;
            state.run(inputs())?;
            let mut times: Vec<f64> = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    state.run(inputs()).map(|_| t.elapsed().as_secs_f64())
                })
                .collect::<TractResult<_>>()?;
            times.sort_by(f64::total_cmp);
            let mut per_op: HashMap<String, (f64, usize)> = HashMap::new();
            state.run_plan_with_eval(inputs(), |ctx, op_state, node, node_inputs| {
                let t = Instant::now();
                let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, node_inputs);
                let entry = per_op.entry(node.op().name().to_string()).or_default();
                entry.0 += t.elapsed().as_secs_f64();
                entry.1 += 1;
                out
            })?;
            let mut ops: Vec<_> = per_op.into_iter().collect();
            ops.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
            let top: Vec<String> = ops
                .iter()
                .take(6)
                .map(|(name, (secs, n))| format!("{name} {:.0} ms/{n}", secs * 1000.0))
                .collect();
            println!(
                "T {} threads {threads}: median {:.3} s, load {load_ms} ms; {}",
                if concrete { "concrete" } else { "symbolic" },
                times[2],
                top.join(", ")
            );
        }
    }
    Ok(())
}
