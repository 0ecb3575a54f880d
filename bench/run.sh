#!/usr/bin/env bash
# `make bench`: gigastt's whole pipeline against onnxruntime's encoder, same model, same inputs.
#
# Sets up .venv-bench (onnx, numpy, onnxruntime) and regenerates the full-size random GigaAM v3 model
# in models/gigaam-v3-full-random/gen/ when they are missing. Then, for each precision x thread count,
# it runs examples/bench.rs and bench/ort_bench.py, each in its own process so that every peak RSS is
# one run's own. bench/report.py prints the table and writes target/bench/results.md.
#
# Env overrides: BENCH_REPS (5), BENCH_THREADS ("1 2"), BENCH_PRECISIONS ("fp32 int8"),
# BENCH_DURATIONS (4,10,60), BENCH_AUDIO (tests/fixtures/extra/long_70s.wav), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."

reps=${BENCH_REPS:-5}
threads=${BENCH_THREADS:-1 2}
precisions=${BENCH_PRECISIONS:-fp32 int8}
durations=${BENCH_DURATIONS:-4,10,60}
audio=${BENCH_AUDIO:-tests/fixtures/extra/long_70s.wav}
model=models/gigaam-v3-full-random/gen
venv=.venv-bench
out=target/bench
# Versions that produced the model README's numbers; onnxruntime < 1.32 cannot run the int8 encoder.
pip_pins=(onnx==1.23.2 numpy==2.4.6 onnxruntime==1.32.0)

if [ ! -x "$venv/bin/python" ]; then
    echo "bench: creating $venv (${pip_pins[*]})"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install --quiet "${pip_pins[@]}"
fi
py() { env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$venv/bin/python" "$@"; }

for f in v3_e2e_rnnt_encoder.onnx v3_e2e_rnnt_decoder.onnx v3_e2e_rnnt_joint.onnx \
    v3_e2e_rnnt_encoder_int8.onnx v3_e2e_rnnt_vocab.txt; do
    if [ ! -f "$model/$f" ]; then
        echo "bench: generating the full-size random model in $model (~1.1 GB, ~2 GB RAM)"
        py models/gigaam-v3-full-random/make_model.py "$model" --int8 \
            --only v3_e2e_rnnt_encoder.onnx v3_e2e_rnnt_decoder.onnx v3_e2e_rnnt_joint.onnx
        break
    fi
done

cargo build --release --example bench
bench=target/release/examples/bench

rm -rf "$out/runs" "$out/inputs"
mkdir -p "$out/runs" "$out/inputs"
cat /proc/loadavg >"$out/runs/loadavg_start.txt" 2>/dev/null || true
first_threads=$(echo "${threads//,/ }" | awk '{print $1}')
started=$SECONDS
for p in ${precisions//,/ }; do
    for t in ${threads//,/ }; do
        # RSS by recognizer count once per precision: it does not depend on the thread count.
        recognizers=()
        [ "$t" = "$first_threads" ] && recognizers=(--recognizers 1,2,4)
        "$bench" --model "$model" --audio "$audio" --precision "$p" --threads "$t" --reps "$reps" \
            --durations "$durations" "${recognizers[@]}" --inputs "$out/inputs" \
            --json "$out/runs/ours_${p}_t${t}.json"
        encoder=$model/v3_e2e_rnnt_encoder.onnx
        [ "$p" = int8 ] && encoder=$model/v3_e2e_rnnt_encoder_int8.onnx
        py bench/ort_bench.py --encoder "$encoder" --ours "$out/runs/ours_${p}_t${t}.json" \
            --inputs "$out/inputs" --threads "$t" --reps "$reps" --json "$out/runs/ort_${p}_t${t}.json"
    done
done
echo "bench: measured in $((SECONDS - started)) s"
py bench/report.py "$out/runs" "$out/results.md"
