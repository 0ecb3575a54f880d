#!/usr/bin/env python3
"""`make bench`, onnxruntime's side: the encoder alone on the features our engine ran.

    ort_bench.py --encoder FILE --ours OURS.json --inputs DIR --threads N [--reps 5] --json OUT

OURS.json is what examples/bench.rs wrote for the same precision. It lists, per audio duration, the
pieces the engine fed its encoder; their features [1, 64, T] are raw little-endian f32 files in DIR.
For each duration this times one InferenceSession.run per piece, summed. The session uses
intra_op_num_threads=N, inter_op_num_threads=1 and ORT_ENABLE_ALL, as a tuned deployment would. The
figure reported is the median over --reps runs after one warm-up, the same way bench.rs measures.
It also reports the session creation time, the peak RSS, and how far onnxruntime's encoder output
for the first piece lies from ours. One process per thread count, so the peak RSS is this run's alone.
"""
import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort

from runner import peak_rss_mib, session_options, timed_median, write_result

N_MELS = 64


def output_gap(ours_path, theirs):
    """Largest absolute gap between our encoder output and onnxruntime's, and theirs' largest value."""
    ours = np.fromfile(ours_path, dtype="<f4")
    theirs = np.ascontiguousarray(theirs, dtype=np.float32).reshape(-1)
    if ours.size != theirs.size:
        return {"error": f"sizes differ: ours {ours.size}, onnxruntime {theirs.size}"}
    return {
        "max_abs_diff": float(np.max(np.abs(ours - theirs))),
        "max_abs": float(np.max(np.abs(theirs))),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--ours", required=True, help="examples/bench.rs JSON for the same precision")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    ours = json.load(open(a.ours))

    opts = session_options(a.threads)
    t = time.perf_counter()
    sess = ort.InferenceSession(a.encoder, opts, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t) * 1e3
    peak_after_load = peak_rss_mib()
    names = [i.name for i in sess.get_inputs()]
    label = f"{ours['precision']}_t{a.threads}"
    print(f"{label}: onnxruntime {ort.__version__} session in {load_ms:.0f} ms", flush=True)

    durations = []
    for d in ours["durations"]:
        feeds = []
        for p in d["pieces"]:
            mel = np.fromfile(os.path.join(a.inputs, p["file"]), dtype="<f4").reshape(1, N_MELS, p["frames"])
            feeds.append({names[0]: mel, names[1]: np.array([p["frames"]], dtype=np.int64)})
        if not feeds:
            raise SystemExit(f"no features for {d['duration_secs']} s: run bench.rs with --inputs {a.inputs}")
        median, runs, _ = timed_median(a.reps, lambda: [sess.run(None, f) for f in feeds])
        first = d["pieces"][0]
        gap = None
        if first.get("encoded"):
            gap = output_gap(os.path.join(a.inputs, first["encoded"]["file"]), sess.run(None, feeds[0])[0])
        print(f"  {label} {d['duration_secs']:g} s encoder ({len(feeds)} pieces): {median:.3f} s", flush=True)
        durations.append({
            "duration_secs": d["duration_secs"],
            "piece_count": len(feeds),
            "encoder_median_s": median,
            "encoder_runs_s": runs,
            "output_vs_ours": gap,
        })

    result = {
        "runtime": f"onnxruntime {ort.__version__}",
        "precision": ours["precision"],
        "threads": a.threads,
        "reps": a.reps,
        "encoder_file": a.encoder,
        "load_ms": load_ms,
        "peak_rss_after_load_mib": peak_after_load,
        "peak_rss_after_runs_mib": peak_rss_mib(),
        "durations": durations,
    }
    write_result(result, a.json)


if __name__ == "__main__":
    main()
