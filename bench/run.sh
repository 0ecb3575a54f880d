#!/usr/bin/env bash
# `make bench`: gigastt's whole pipeline against onnxruntime's encoder (and onnx-asr end to end),
# same model, same inputs.
#
# Sets up .venv-bench (onnx, numpy, onnxruntime, onnx-asr, silero-vad's graph) and regenerates the
# full-size random GigaAM v3 model in models/gigaam-v3-full-random/gen/ when they are missing. Then it
# measures in rounds: each round runs, for each precision x thread count, examples/bench.rs,
# bench/ort_bench.py and bench/asr_bench.py one after another, each in its own process so that every
# peak RSS is one run's own. The order turns round by round, so that no side always runs first or on
# the same minute's load; ratios are taken within a round (ours and onnxruntime a minute apart at
# most) and the report gives their median over rounds. bench/report.py prints the table and writes
# target/bench/results.md.
#
# Env overrides: BENCH_ROUNDS (3), BENCH_REPS (3 per round), BENCH_THREADS ("1 2"),
# BENCH_PRECISIONS ("fp32 int8"), BENCH_DURATIONS (4,10,60), BENCH_AUDIO
# (tests/fixtures/extra/long_70s.wav), BENCH_ONNX_ASR (1; 0 skips onnx-asr), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
# With RUST_BACKTRACE set, every error tract's optimiser tries and drops captures a
# backtrace, and the load takes several times longer (README): time it as the server
# is meant to run, with backtraces for panics only.
export RUST_LIB_BACKTRACE=0

rounds=${BENCH_ROUNDS:-3}
reps=${BENCH_REPS:-3}
threads=${BENCH_THREADS:-1 2}
precisions=${BENCH_PRECISIONS:-fp32 int8}
durations=${BENCH_DURATIONS:-4,10,60}
audio=${BENCH_AUDIO:-tests/fixtures/extra/long_70s.wav}
model=models/gigaam-v3-full-random/gen
venv=.venv-bench
out=target/bench
# Versions that produced the model README's numbers; onnxruntime < 1.32 cannot run the int8 encoder.
pip_pins=(onnx==1.23.2 numpy==2.4.6 onnxruntime==1.32.0)
# onnx-asr end to end, and silero-vad only for its silero_vad.onnx (its torch dependency is not needed).
asr_pins=(onnx-asr==0.12.0)
vad_pin=silero-vad==6.2.3
with_asr=${BENCH_ONNX_ASR:-1}

if [ ! -x "$venv/bin/python" ]; then
    echo "bench: creating $venv (${pip_pins[*]})"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install --quiet "${pip_pins[@]}"
fi
py() { env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$venv/bin/python" "$@"; }
if [ "$with_asr" = 1 ] && ! py -c "import onnx_asr, sysconfig, os, sys
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['purelib'], 'silero_vad/data/silero_vad.onnx')))" 2>/dev/null; then
    echo "bench: installing ${asr_pins[*]} and $vad_pin (its graph only) into $venv"
    if ! { "$venv/bin/pip" install --quiet "${asr_pins[@]}" && "$venv/bin/pip" install --quiet --no-deps "$vad_pin"; }; then
        echo "bench: could not install onnx-asr (offline?): its columns are left out" >&2
        with_asr=0
    fi
fi

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

ours() { # round precision threads
    local recognizers=()
    # RSS by recognizer count once per precision: it depends on neither the round nor the threads.
    [ "$1" = 1 ] && [ "$3" = "$first_threads" ] && recognizers=(--recognizers 1,2,4)
    "$bench" --model "$model" --audio "$audio" --precision "$2" --threads "$3" --reps "$reps" \
        --durations "$durations" "${recognizers[@]}" --inputs "$out/inputs" \
        --json "$out/runs/r$1/ours_$2_t$3.json"
}
ort() { # round precision threads; the pieces and their features are the first round's
    local encoder=$model/v3_e2e_rnnt_encoder.onnx
    [ "$2" = int8 ] && encoder=$model/v3_e2e_rnnt_encoder_int8.onnx
    py bench/ort_bench.py --encoder "$encoder" --ours "$out/runs/r1/ours_$2_t$3.json" \
        --inputs "$out/inputs" --threads "$3" --reps "$reps" --json "$out/runs/r$1/ort_$2_t$3.json"
}
asr() { # round precision threads
    [ "$with_asr" = 1 ] || return 0
    py bench/asr_bench.py --model "$model" --work "$out/onnx-asr" --audio "$audio" --precision "$2" \
        --threads "$3" --durations "$durations" --reps "$reps" --json "$out/runs/r$1/asr_$2_t$3.json"
}

started=$SECONDS
for r in $(seq 1 "$rounds"); do
    mkdir -p "$out/runs/r$r"
    # Round 1 starts with ours (it writes the features the others read); then the order turns.
    case $(((r - 1) % 3)) in
        0) order="ours ort asr" ;;
        1) order="ort asr ours" ;;
        *) order="asr ours ort" ;;
    esac
    echo "bench: round $r of $rounds ($order)"
    for p in ${precisions//,/ }; do
        for t in ${threads//,/ }; do
            for side in $order; do "$side" "$r" "$p" "$t"; done
        done
    done
done
echo "bench: measured in $((SECONDS - started)) s"
py bench/report.py "$out/runs" "$out/results.md"
