"""What bench/ort_bench.py and bench/asr_bench.py share: onnxruntime's session options, the
timing of repeated runs, peak RSS and where the JSON goes."""
import json
import resource
import statistics
import time

import onnxruntime as ort


def session_options(threads):
    """intra_op = threads, inter_op 1, sequential, ORT_ENABLE_ALL: a tuned CPU deployment."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def peak_rss_mib():
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_median(reps, run):
    """One warm-up, then the median of `reps` timed runs, the runs, and what the warm-up returned."""
    first = run()
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), runs, first


def write_result(result, path):
    """The run's JSON to `path`, or to stdout without one."""
    text = json.dumps(result, indent=2)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
