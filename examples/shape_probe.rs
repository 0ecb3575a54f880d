//! Measures the "concrete vs symbolic time axis" lever of docs/perf.md: loads an
//! encoder with a symbolic `T` (what gigastt ships) and with `T` fixed to the
//! input length, at 1 and 2 threads, and prints median run time, load time and
//! the time per op type.
//!
//!     cargo run --release --example shape_probe -- models/gigaam-v3-full-random/gen/v3_e2e_rnnt_encoder.onnx 999
//!
//! Env: PROBE_ASSERT="T>=2" (symbol assertion), PROBE_TUNE=1 (gigastt's graph
//! rewrites, as the server loads it; PROBE_EXACT=1 only those that keep tract's
//! bits, i.e. without the softmax), PROBE_NODES=1 (time per node, with the
//! kernel tract picked), PROBE_TOP=N (lines per run), PROBE_SYMBOLIC_ONLY=1,
//! PROBE_GROUP=1 (time per op and node name, layer numbers dropped),
//! PROBE_DUMP=SUBSTRING (print the optimised nodes whose name has it;
//! PROBE_DUMP_DECLUTTERED the same before optimisation),
//! PROBE_CLEAN=1 (clear the AVX upper state before each node, as gigastt
//! does), PROBE_INSTALL=1 (runs start on one of the pool's threads, as gigastt does),
//! PROBE_SMART=1 (general-path matmuls run single-threaded, per node),
//! PROBE_LEAN=1 (weights stay in the file until tract reads them, as gigastt
//! loads), PROBE_PASSES=1 (time tract's optimiser pass by pass). Each load prints its stages with time and resident memory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Instant;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::InferenceFact;

/// The allocator the gigastt binary uses (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn load(
    path: &str,
    frames: Option<usize>,
    threads: usize,
) -> TractResult<(
    std::sync::Arc<TypedRunnableModel>,
    Option<tract_linalg::multithread::Executor>,
)> {
    let onnx = tract_onnx::onnx()
        .with_ignore_output_shapes(true)
        .with_ignore_value_info(true);
    let tune = std::env::var("PROBE_TUNE").is_ok();
    let mut stages = Stages::default();
    let (mut proto, dir) = if std::env::var("PROBE_LEAN").is_ok() {
        let lean = gigastt::speech::lean::read(
            std::path::Path::new(path),
            gigastt::speech::lean::EXTERNAL_MIN_BYTES,
        )?;
        eprintln!("lean: {} initializers left in the file", lean.external);
        (
            onnx.proto_model_for_read(&mut lean.bytes.as_slice())?,
            lean.dir,
        )
    } else {
        let dir = std::path::Path::new(path)
            .parent()
            .unwrap_or(std::path::Path::new("."));
        (onnx.proto_model_for_path(path)?, dir.to_path_buf())
    };
    stages.mark("proto");
    let mut done = gigastt::speech::tune::Rewrites::default();
    if tune {
        done.zero_points = gigastt::speech::tune::drop_zero_weight_zero_points(&mut proto);
    }
    let mut model = onnx.parse(&proto, dir.to_str())?.model;
    drop(proto);
    stages.mark("parse");
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
    let mut model = model.into_typed()?;
    stages.mark("typed");
    model.declutter()?;
    stages.mark("declutter");
    if let Ok(pattern) = std::env::var("PROBE_DUMP_DECLUTTERED") {
        dump(&model, &pattern);
    }
    if tune {
        gigastt::speech::tune::rewrite_decluttered(&mut model, &mut done)?;
        stages.mark("rewrite_decluttered");
    }
    // PROBE_EXACT=1: only the rewrites that keep tract's bits.
    let exactness = if std::env::var("PROBE_EXACT").is_ok() {
        gigastt::speech::tune::Exactness::Bits
    } else {
        gigastt::speech::tune::Exactness::Close
    };
    if std::env::var("PROBE_PASSES").is_ok() {
        optimize_timing_passes(&mut model)?;
    } else if tune {
        gigastt::speech::tune::optimize(&mut model, &mut done, exactness)?;
    } else {
        model.optimize()?;
    }
    stages.mark("optimize");
    if tune {
        gigastt::speech::tune::rewrite_optimized(
            &mut model,
            &mut done,
            executor.clone(),
            exactness,
        )?;
        stages.mark("rewrite_optimized");
        eprintln!("rewrites {done:?}");
        eprintln!(
            "kernels: {}",
            gigastt::speech::tune::kernel_summary([&model])
        );
    }
    if let Ok(pattern) = std::env::var("PROBE_DUMP") {
        dump(&model, &pattern);
    }
    let plan = model.into_runnable_with_options(&RunOptions {
        executor: executor.clone(),
        ..Default::default()
    })?;
    stages.mark("runnable");
    eprintln!("load stages: {}", stages.report());
    Ok((plan, executor))
}

/// tract's `optimize`, pass by pass, printing each pass's time and the node
/// count (three rounds of the codegen passes; `optimize` stops when a round
/// changes nothing).
fn optimize_timing_passes(model: &mut TypedModel) -> TractResult<()> {
    use tract_onnx::tract_core::optim::Optimizer;
    let optimizer = Optimizer::codegen();
    let mut session = optimizer.session();
    model.compact()?;
    for round in 0..3 {
        for pass in &optimizer.passes {
            let mut pass = pass.clone();
            let t = Instant::now();
            session.run_one_pass_outer(round, pass.as_mut(), model)?;
            model.compact()?;
            eprintln!(
                "  pass {round} {pass:?}: {} ms, {} nodes",
                t.elapsed().as_millis(),
                model.nodes().len()
            );
        }
    }
    Ok(())
}

/// Wall time per load stage, with the process's peak RSS after each.
struct Stages {
    last: Instant,
    done: Vec<String>,
}

impl Default for Stages {
    fn default() -> Self {
        Stages {
            last: Instant::now(),
            done: Vec::new(),
        }
    }
}

impl Stages {
    fn mark(&mut self, name: &str) {
        let ms = self.last.elapsed().as_millis();
        self.done
            .push(format!("{name} {ms} ms (rss {} MB)", rss_mb()));
        self.last = Instant::now();
    }

    fn report(&self) -> String {
        self.done.join(", ")
    }
}

/// Resident set size of this process now and at its peak so far (Linux
/// `VmRSS`, `VmHWM`), "?" elsewhere.
fn rss_mb() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or("?".to_string(), |kb| (kb / 1024).to_string())
    };
    format!("{}, peak {}", field("VmRSS:"), field("VmHWM:"))
}

/// Minor page faults of this process so far (Linux), 0 elsewhere.
fn minor_faults() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Field 10 (minflt), counted after the parenthesised command name.
            let rest = &s[s.rfind(')')? + 2..];
            rest.split(' ').nth(7)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Prints the nodes whose name contains `pattern`, with their input facts.
fn dump(model: &TypedModel, pattern: &str) {
    for node in model.nodes() {
        if node.name.contains(pattern) {
            let inputs: Vec<String> = node
                .inputs
                .iter()
                .map(|i| format!("{}/{}: {:?}", i.node, i.slot, model.outlet_fact(*i)))
                .collect();
            eprintln!(
                "#{} {} {} [{}]\n    <- {}\n    -> {:?}",
                node.id,
                node.op().name(),
                node.name,
                node.op().info().unwrap_or_default().join("; "),
                inputs.join("\n       "),
                node.outputs.iter().map(|o| &o.fact).collect::<Vec<_>>()
            );
        }
    }
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
            let (plan, executor) = load(&path, concrete.then_some(frames), threads)?;
            // PROBE_INSTALL=1: run the whole plan on one of the pool's own
            // threads, so the caller is not a third thread beside the pool's two.
            let pool = match (&executor, std::env::var("PROBE_INSTALL").is_ok()) {
                (Some(tract_linalg::multithread::Executor::MultiThread(p)), true) => {
                    Some(p.clone())
                }
                _ => None,
            };
            let in_pool = |f: &mut (dyn FnMut() -> TractResult<f64> + Send)| -> TractResult<f64> {
                match &pool {
                    Some(p) => p.install(f),
                    None => f(),
                }
            };
            let load_ms = started.elapsed().as_millis();
            let mut state = plan.spawn()?;
            state.run(inputs())?;
            let faults_before = minor_faults();
            let mut times: Vec<f64> = (0..5)
                .map(|_| {
                    in_pool(&mut || {
                        let t = Instant::now();
                        if std::env::var("PROBE_CLEAN").is_ok() {
                            gigastt::speech::tune::run_clean(&mut state, inputs())
                                .map(|_| t.elapsed().as_secs_f64())
                        } else {
                            state.run(inputs()).map(|_| t.elapsed().as_secs_f64())
                        }
                    })
                })
                .collect::<TractResult<_>>()?;
            times.sort_by(f64::total_cmp);
            let faults = (minor_faults() - faults_before) / 5;
            let mut per_op: HashMap<String, (f64, usize)> = HashMap::new();
            in_pool(&mut || {
                state.run_plan_with_eval(inputs(), |ctx, op_state, node, node_inputs| {
                    if std::env::var("PROBE_CLEAN").is_ok() {
                        gigastt::speech::tune::clear_avx_upper();
                    }
                    let t = Instant::now();
                    let batched = node
                        .op_as::<tract_onnx::tract_core::ops::matmul::optimized::OptMatMul>()
                        .is_some_and(|op| !op.trivial_path);
                    let out = if batched && std::env::var("PROBE_SMART").is_ok() {
                        tract_linalg::multithread::multithread_tract_scope(
                            tract_linalg::multithread::Executor::SingleThread,
                            || tract_onnx::tract_core::plan::eval(ctx, op_state, node, node_inputs),
                        )
                    } else {
                        tract_onnx::tract_core::plan::eval(ctx, op_state, node, node_inputs)
                    };
                    let key = if std::env::var("PROBE_GROUP").is_ok() {
                        // Per op and node name with the layer index dropped: one
                        // line per kind of node across the encoder's layers.
                        let mut name = String::new();
                        let mut digits = false;
                        for c in node.name.chars() {
                            if c.is_ascii_digit() {
                                if !digits {
                                    name.push('#');
                                }
                                digits = true;
                            } else {
                                digits = false;
                                name.push(c);
                            }
                        }
                        format!("{} {name}", node.op().name())
                    } else if std::env::var("PROBE_NODES").is_ok() {
                        format!(
                            "{} [{}] {}",
                            node.op().name(),
                            node.op().info().unwrap_or_default().join("; "),
                            node.name
                        )
                    } else if let Some(op) =
                        node.op_as::<tract_onnx::tract_core::ops::matmul::optimized::OptMatMul>()
                    {
                        let kernels: Vec<String> =
                            op.mmm.iter().map(|m| m.name().to_string()).collect();
                        format!("OptMatMul {}", kernels.join("|"))
                    } else if batched {
                        format!("batched {}", node.op().name())
                    } else {
                        node.op().name().to_string()
                    };
                    let entry = per_op.entry(key).or_default();
                    entry.0 += t.elapsed().as_secs_f64();
                    entry.1 += 1;
                    out
                })?;
                Ok(0.0)
            })?;
            let mut ops: Vec<_> = per_op.into_iter().collect();
            ops.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
            let top: Vec<String> = ops
                .iter()
                .take(
                    std::env::var("PROBE_TOP")
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(6),
                )
                .map(|(name, (secs, n))| format!("{name} {:.0} ms/{n}", secs * 1000.0))
                .collect();
            println!(
                "T {} threads {threads}: median {:.3} s, {faults} page faults/run, load {load_ms} ms; {}",
                if concrete { "concrete" } else { "symbolic" },
                times[2],
                top.join("\n  ")
            );
        }
    }
    Ok(())
}
