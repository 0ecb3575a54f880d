#!/usr/bin/env python3
"""`make bench`, the table: merges the JSON of examples/bench.rs and bench/ort_bench.py runs.

    report.py RUNS_DIR OUT.md

RUNS_DIR holds ours_<precision>_t<threads>.json and ort_<precision>_t<threads>.json. It prints one
markdown table with a row per duration x threads x precision, then lines for load time, peak RSS,
RSS by recognizer count and output agreement. The same text goes to OUT.md for the README to quote.
Standard library only, so any python3 runs it.
"""
import glob
import json
import os
import platform
import sys


def load_runs(runs_dir):
    runs = {}
    for path in glob.glob(os.path.join(runs_dir, "*.json")):
        kind = os.path.basename(path).split("_", 1)[0]
        r = json.load(open(path))
        runs[(kind, r["precision"], r["threads"])] = r
    return runs


def by_duration(run):
    return {d["duration_secs"]: d for d in run["durations"]} if run else {}


def fmt(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(runs, runs_dir):
    ours_keys = sorted({(p, t) for (k, p, t) in runs if k == "ours"})
    precisions = sorted({p for p, _ in ours_keys}, key=lambda p: (p != "fp32", p))
    threads = sorted({t for _, t in ours_keys})
    durations = sorted({d for (p, t) in ours_keys for d in by_duration(runs[("ours", p, t)])})
    any_ours = runs[("ours",) + ours_keys[0]]
    ort_name = next((r["runtime"] for (k, _, _), r in runs.items() if k == "ort"), "onnxruntime")
    out = []
    w = out.append
    w("# gigastt bench: whole pipeline vs onnxruntime encoder (full-size random GigaAM v3)\n")
    w(f"Machine: {cpu_model()}, {os.cpu_count()} cores. "
      f"Median of {any_ours['reps']} runs after one warm-up. Ours: gigastt `Recognizer::transcribe` "
      f"(features + VAD when > 25 s + encoder + greedy RNN-T decode) and `Recognizer::encode` on the same "
      f"features; {ort_name}: the same encoder file on the same features, intra_op threads = threads, "
      f"inter_op 1, ORT_ENABLE_ALL. Audio over 25 s runs as the engine's VAD pieces, encoder times summed.\n")
    w("| audio | threads | precision | ours whole (s) | ours encoder (s) | ort encoder (s) "
      "| ours whole / ort enc | ours enc / ort enc | RTF ours whole |")
    w("|---|---|---|---|---|---|---|---|---|")
    for d in durations:
        for t in threads:
            for p in precisions:
                od = by_duration(runs.get(("ours", p, t))).get(d)
                rd = by_duration(runs.get(("ort", p, t))).get(d)
                if od is None:
                    continue
                ort_s = rd["encoder_median_s"] if rd else None
                pieces = f" ({od['piece_count']} pieces)" if od["piece_count"] > 1 else ""
                w(f"| {d:g} s{pieces} | {t} | {p} | {fmt(od['whole_median_s'])} | {fmt(od['encoder_median_s'])} "
                  f"| {fmt(ort_s)} | {fmt(ratio(od['whole_median_s'], ort_s), '.2f')} "
                  f"| {fmt(ratio(od['encoder_median_s'], ort_s), '.2f')} | {fmt(od['rtf'], '.3f')} |")
    w("")
    reduced = [p for p in precisions if p != "fp32"]
    if reduced and any(k == "ort" and p == "fp32" for (k, p, _) in runs):
        w("Reduced precision against onnxruntime's *fp32* encoder (the speed goal: whole pipeline "
          "at most 0.75x of it):\n")
        w("| audio | threads | precision | ours whole (s) | ort fp32 encoder (s) | ours whole / ort fp32 enc |")
        w("|---|---|---|---|---|---|")
        for d in durations:
            for t in threads:
                fp = by_duration(runs.get(("ort", "fp32", t))).get(d)
                for p in reduced:
                    od = by_duration(runs.get(("ours", p, t))).get(d)
                    if od is None or fp is None:
                        continue
                    w(f"| {d:g} s | {t} | {p} | {fmt(od['whole_median_s'])} | {fmt(fp['encoder_median_s'])} "
                      f"| {fmt(ratio(od['whole_median_s'], fp['encoder_median_s']), '.2f')} |")
        w("")
    for label, field in [("Load (ms)", "load_ms"),
                         ("Peak RSS after load (MiB)", "peak_rss_after_load_mib"),
                         ("Peak RSS after runs (MiB)", "peak_rss_after_runs_mib")]:
        parts = []
        for p in precisions:
            for t in threads:
                o, r = runs.get(("ours", p, t)), runs.get(("ort", p, t))
                parts.append(f"{p} t{t} ours {fmt(o and o[field], '.0f')} / ort {fmt(r and r[field], '.0f')}")
        w(f"- {label}: " + "; ".join(parts))
    again = []
    for p in precisions:
        for t in threads:
            o = runs.get(("ours", p, t))
            if o and "load_again_ms" in o:
                again.append(f"{p} t{t} {fmt(o['load_again_ms'], '.0f')}")
    if again:
        w("- Load again in the same process, memory already faulted in (ms): " + "; ".join(again))
    for p in precisions:
        for t in threads:
            o = runs.get(("ours", p, t))
            peaks = {d["duration_secs"]: d for d in (o or {}).get("durations", [])
                     if d.get("peak_rss_whole_mib") is not None}
            if peaks:
                each = ", ".join(f"{s:g} s {fmt(d['rss_before_mib'], '.0f')} → {fmt(d['peak_rss_whole_mib'], '.0f')}"
                                 for s, d in sorted(peaks.items()))
                line = f"- Peak RSS while transcribing (MiB, from the RSS before), {p} t{t}: {each}"
                if 10 in peaks and 60 in peaks:
                    grew = peaks[60]["peak_rss_whole_mib"] - peaks[10]["peak_rss_whole_mib"]
                    audio = 60 * 16000 * 4 / 1048576
                    line += f"; 60 s minus 10 s: {grew:+.1f} (goal: at most its f32 audio, {audio:.1f})"
                w(line)
    for p in precisions:
        for t in threads:
            o = runs.get(("ours", p, t))
            rows = o and o.get("recognizer_rss")
            if rows:
                counts = ", ".join(f"{x['recognizers']} → {fmt(x['rss_mib'], '.0f')}" for x in rows)
                w(f"- RSS (MiB) by live recognizers on one engine, {p} t{t}, each run once on "
                  f"{durations[0]:g} s: {counts} (encoder file {fmt(o['encoder_file_mib'], '.0f')} MiB)")
    gaps = []
    for (k, p, t), r in sorted(runs.items()):
        if k != "ort":
            continue
        for d in r["durations"]:
            g = d.get("output_vs_ours") or {}
            if "max_abs_diff" in g:
                gaps.append(f"{p} t{t} {d['duration_secs']:g} s {g['max_abs_diff']:.2g} (max |x| {g['max_abs']:.2g})")
    if gaps:
        w("- Encoder output, ours vs ort, max abs diff on the first piece: " + "; ".join(gaps))
    start = os.path.join(runs_dir, "loadavg_start.txt")
    if os.path.exists(start):
        end = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
        w(f"- Load average at start {' '.join(open(start).read().split()[:3])}, at end {' '.join(end)} "
          "(other processes on the machine add noise)")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    runs_dir, out_md = sys.argv[1], sys.argv[2]
    runs = load_runs(runs_dir)
    if not any(k == "ours" for k, _, _ in runs):
        sys.exit(f"no ours_*.json in {runs_dir}")
    text = report(runs, runs_dir)
    with open(out_md, "w") as f:
        f.write(text)
    print(text, end="")
    print(f"(written to {out_md})")


if __name__ == "__main__":
    main()
