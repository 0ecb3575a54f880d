#!/usr/bin/env python3
"""`make bench`, onnx-asr's side: GigaAM's own ONNX pipeline end to end on the same audio.

    asr_bench.py --model DIR --work DIR --audio WAV --precision fp32|int8 --threads N
                 [--durations 4,10,60] [--reps 5] --json OUT

onnx-asr (istupakov's package, whose ONNX export the real gigastt model files are) runs the whole
recognition as its users run it: its numpy log-mel front-end, the encoder, its greedy RNN-T loop.
Audio over 25 s goes through its Silero VAD (`with_vad`, its defaults: pieces of at most 20 s,
encoded in batches of 8), as gigastt cuts such audio with its own VAD. Every onnxruntime session
gets intra_op_num_threads = N, inter_op_num_threads = 1 and ORT_ENABLE_ALL, as bench/ort_bench.py.

onnx-asr reads a model folder by file names. --work gets one built from --model: links to the
config, vocab and fp32 graphs, to the int8 encoder, and (onnx-asr's int8 wants all three graphs in
int8) the decoder and joint quantized here the way make_model.py quantizes the encoder. Silero's
`silero_vad.onnx` comes from the silero-vad wheel (installed without its torch dependency).
Each figure is the median of --reps runs after one warm-up, as bench.rs measures.
"""
import argparse
import os
import sysconfig
import time
import wave

import numpy as np
import onnx_asr
import onnxruntime as ort

from runner import peak_rss_mib, session_options, timed_median, write_result

SAMPLE_RATE = 16000
# gigastt's engine cuts audio longer than this with its VAD (speech::pieces); onnx-asr does the same
# here so that both run what each would run on that audio.
VAD_ABOVE_SECS = 25
GRAPHS = ["v3_e2e_rnnt_encoder", "v3_e2e_rnnt_decoder", "v3_e2e_rnnt_joint"]


def link(src, dst):
    if not os.path.lexists(dst):
        os.symlink(os.path.abspath(src), dst)


def model_folder(model, work):
    """onnx-asr's folder layout over the bench model, int8 decoder and joint made once."""
    folder = os.path.join(work, "model")
    os.makedirs(folder, exist_ok=True)
    for name in ["config.json", "v3_e2e_rnnt_vocab.txt", "v3_e2e_rnnt_encoder_int8.onnx"]:
        link(os.path.join(model, name), os.path.join(folder, name))
    for g in GRAPHS:
        link(os.path.join(model, g + ".onnx"), os.path.join(folder, g + ".onnx"))
    for g in GRAPHS[1:]:
        dst = os.path.join(folder, g + "_int8.onnx")
        if not os.path.exists(dst):
            import logging

            from onnxruntime.quantization import QuantType, quantize_dynamic

            logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process first
            quantize_dynamic(os.path.join(model, g + ".onnx"), dst + ".tmp",
                             weight_type=QuantType.QInt8, per_channel=True)
            os.replace(dst + ".tmp", dst)
    return folder


def vad_folder(work):
    folder = os.path.join(work, "silero")
    os.makedirs(folder, exist_ok=True)
    src = os.path.join(sysconfig.get_paths()["purelib"], "silero_vad", "data", "silero_vad.onnx")
    if not os.path.exists(src):
        raise SystemExit(f"no {src}: pip install --no-deps silero-vad")
    link(src, os.path.join(folder, "silero_vad.onnx"))
    return folder


def read_wav(path):
    with wave.open(path) as w:
        if w.getframerate() != SAMPLE_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise SystemExit(f"{path}: want 16 kHz mono s16le")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--audio", required=True)
    ap.add_argument("--precision", choices=["fp32", "int8"], required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--durations", default="4,10,60")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()

    opts = session_options(a.threads)
    quantization = "int8" if a.precision == "int8" else None
    folder = model_folder(a.model, a.work)
    t = time.perf_counter()
    asr = onnx_asr.load_model("gigaam-v3-e2e-rnnt", folder, quantization=quantization,
                              sess_options=opts, providers=["CPUExecutionProvider"])
    vad = onnx_asr.load_vad("silero", vad_folder(a.work), sess_options=opts,
                            providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t) * 1e3
    label = f"{a.precision}_t{a.threads}"
    print(f"{label}: onnx-asr {onnx_asr.__version__} loaded in {load_ms:.0f} ms", flush=True)

    audio = read_wav(a.audio)
    durations = []
    for secs in [float(d) for d in a.durations.split(",")]:
        clip = audio[: int(secs * SAMPLE_RATE)]
        if len(clip) < secs * SAMPLE_RATE:
            raise SystemExit(f"{a.audio} is shorter than {secs:g} s")
        if secs > VAD_ABOVE_SECS:
            run = lambda: [s.text for s in asr.with_vad(vad).recognize(clip)]  # noqa: E731
        else:
            run = lambda: [asr.recognize(clip)]  # noqa: E731
        median, runs, texts = timed_median(a.reps, run)
        print(f"  {label} {secs:g} s whole ({len(texts)} pieces): {median:.3f} s", flush=True)
        durations.append({
            "duration_secs": secs,
            "piece_count": len(texts),
            "whole_median_s": median,
            "whole_runs_s": runs,
            "words": sum(len(x.split()) for x in texts),
        })

    result = {
        "runtime": f"onnx-asr {onnx_asr.__version__} (onnxruntime {ort.__version__})",
        "precision": a.precision,
        "threads": a.threads,
        "reps": a.reps,
        "load_ms": load_ms,
        "peak_rss_after_runs_mib": peak_rss_mib(),
        "durations": durations,
    }
    write_result(result, a.json)


if __name__ == "__main__":
    main()
