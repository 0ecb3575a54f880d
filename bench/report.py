#!/usr/bin/env python3
"""`make bench`, the table: merges the JSON of examples/bench.rs, bench/ort_bench.py and
bench/asr_bench.py runs.

    report.py RUNS_DIR OUT.md

RUNS_DIR holds one folder per round (r1, r2, ...), each with ours_<precision>_t<threads>.json,
ort_<...>.json and asr_<...>.json (onnx-asr, when it ran). A ratio between two runtimes is taken
within each round, where the two ran a minute apart at most, and the table gives the median of
those per-round ratios, then each round's; a time is the median of the rounds' medians. It prints
one markdown table with a row per duration x threads x precision, the same against onnx-asr, then
lines for load time, peak RSS, RSS by recognizer count and output agreement. The same text goes
to OUT.md for the README to quote. Standard library only, so any python3 runs it.
"""
import glob
import json
import os
import platform
import statistics
import sys


def load_runs(runs_dir):
    """{(kind, precision, threads): {round: run}}; a folder without rounds is round 1."""
    runs = {}
    folders = [(int(os.path.basename(d)[1:]), d) for d in glob.glob(os.path.join(runs_dir, "r*"))
               if os.path.basename(d)[1:].isdigit()] or [(1, runs_dir)]
    for rnd, folder in folders:
        for path in glob.glob(os.path.join(folder, "*.json")):
            kind = os.path.basename(path).split("_", 1)[0]
            r = json.load(open(path))
            runs.setdefault((kind, r["precision"], r["threads"]), {})[rnd] = r
    return runs


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def merge(objs):
    """One run from several rounds' runs: numbers -> median, lists of numbers -> all of them,
    `durations` merged per duration, anything else -> the first round's."""
    out = {}
    for key in dict.fromkeys(k for o in objs for k in o):
        vals = [o[key] for o in objs if o.get(key) is not None]
        if not vals:
            out[key] = None
        elif key == "durations":
            by_secs = {}
            for v in vals:
                for d in v:
                    by_secs.setdefault(d["duration_secs"], []).append(d)
            out[key] = [merge(ds) for _, ds in sorted(by_secs.items())]
        elif all(is_number(v) for v in vals):
            out[key] = statistics.median(vals)
        elif all(isinstance(v, list) and v and all(is_number(x) for x in v) for v in vals):
            out[key] = [x for v in vals for x in v]
        else:
            out[key] = vals[0]
    return out


def per_round(runs, a, b, secs, field_a, field_b):
    """a's field over b's, round by round, for the rounds both ran."""
    ra, rb = runs.get(a, {}), runs.get(b, {})
    out = []
    for rnd in sorted(set(ra) & set(rb)):
        da, db = by_duration(ra[rnd]).get(secs), by_duration(rb[rnd]).get(secs)
        q = ratio(da and da.get(field_a), db and db.get(field_b))
        if q is not None:
            out.append(q)
    return out


def ratio_cells(ratios):
    """The median of the per-round ratios, and the rounds' own."""
    if not ratios:
        return "—", "—"
    return format(statistics.median(ratios), ".2f"), " / ".join(format(q, ".2f") for q in ratios)


def by_duration(run):
    return {d["duration_secs"]: d for d in run["durations"]} if run else {}


def fmt(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def header(w, *cells):
    """A markdown table's header row and rule."""
    w("| " + " | ".join(cells) + " |")
    w("|" + "---|" * len(cells))


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(rounds, runs_dir):
    runs = {key: merge([r for _, r in sorted(by_round.items())]) for key, by_round in rounds.items()}
    ours_keys = sorted({(p, t) for (k, p, t) in runs if k == "ours"})
    precisions = sorted({p for p, _ in ours_keys}, key=lambda p: (p != "fp32", p))
    threads = sorted({t for _, t in ours_keys})
    durations = sorted({d for (p, t) in ours_keys for d in by_duration(runs[("ours", p, t)])})
    round_count = max(len(by_round) for by_round in rounds.values())
    reps = runs[("ours",) + ours_keys[0]]["reps"]
    ort_name = next((r["runtime"] for (k, _, _), r in runs.items() if k == "ort"), "onnxruntime")
    asr_name = next((r["runtime"] for (k, _, _), r in runs.items() if k == "asr"), None)
    out = []
    w = out.append
    w("# gigastt bench: whole pipeline vs onnxruntime encoder (full-size random GigaAM v3)\n")
    w(f"Machine: {cpu_model()}, {os.cpu_count()} cores. {round_count} round(s); in each, every runtime "
      f"runs {reps:g} times after one warm-up, in its own process, the order turning round by round. "
      f"Times are the median of the rounds' medians; a ratio is the median of the per-round ratios "
      f"(each round's after it). Ours: gigastt `Recognizer::transcribe` "
      f"(features + VAD when > 25 s + encoder + greedy RNN-T decode) and `Recognizer::encode` on the same "
      f"features; {ort_name}: the same encoder file on the same features, intra_op threads = threads, "
      f"inter_op 1, ORT_ENABLE_ALL. Audio over 25 s runs as the engine's VAD pieces, encoder times summed.\n")
    header(w, "audio", "threads", "precision", "ours whole (s)", "ours encoder (s)", "ort encoder (s)",
           "ours whole / ort enc", "by round", "ours enc / ort enc", "RTF ours whole")
    for d in durations:
        for t in threads:
            for p in precisions:
                od = by_duration(runs.get(("ours", p, t))).get(d)
                rd = by_duration(runs.get(("ort", p, t))).get(d)
                if od is None:
                    continue
                ort_s = rd["encoder_median_s"] if rd else None
                pieces = f" ({od['piece_count']:g} pieces)" if od["piece_count"] > 1 else ""
                whole, whole_rounds = ratio_cells(
                    per_round(rounds, ("ours", p, t), ("ort", p, t), d, "whole_median_s", "encoder_median_s"))
                enc, _ = ratio_cells(
                    per_round(rounds, ("ours", p, t), ("ort", p, t), d, "encoder_median_s", "encoder_median_s"))
                w(f"| {d:g} s{pieces} | {t} | {p} | {fmt(od['whole_median_s'])} | {fmt(od['encoder_median_s'])} "
                  f"| {fmt(ort_s)} | {whole} | {whole_rounds} | {enc} | {fmt(od['rtf'], '.3f')} |")
    w("")
    reduced = [p for p in precisions if p != "fp32"]
    if reduced and any(k == "ort" and p == "fp32" for (k, p, _) in runs):
        w("Reduced precision against onnxruntime's *fp32* encoder (the speed goal: whole pipeline "
          "at most 0.75x of it):\n")
        header(w, "audio", "threads", "precision", "ours whole (s)", "ort fp32 encoder (s)",
               "ours whole / ort fp32 enc", "by round")
        for d in durations:
            for t in threads:
                fp = by_duration(runs.get(("ort", "fp32", t))).get(d)
                for p in reduced:
                    od = by_duration(runs.get(("ours", p, t))).get(d)
                    if od is None or fp is None:
                        continue
                    q, q_rounds = ratio_cells(
                        per_round(rounds, ("ours", p, t), ("ort", "fp32", t), d, "whole_median_s", "encoder_median_s"))
                    w(f"| {d:g} s | {t} | {p} | {fmt(od['whole_median_s'])} | {fmt(fp['encoder_median_s'])} "
                      f"| {q} | {q_rounds} |")
        w("")
    if asr_name:
        w(f"End to end against {asr_name}: GigaAM's own ONNX pipeline (numpy log-mel, the encoder, a "
          "Python greedy RNN-T loop; its Silero VAD over 25 s, pieces of at most 20 s in batches of 8), "
          "same threads; its int8 is the int8 encoder with the decoder and joint quantized alike. "
          "The reduced-precision goal includes being faster than its int8:\n")
        header(w, "audio", "threads", "precision", "ours whole (s)", "onnx-asr whole (s)", "ours / onnx-asr",
               "by round", "RTF onnx-asr")
        for d in durations:
            for t in threads:
                for p in precisions:
                    od = by_duration(runs.get(("ours", p, t))).get(d)
                    ad = by_duration(runs.get(("asr", p, t))).get(d)
                    if od is None or ad is None:
                        continue
                    q, q_rounds = ratio_cells(
                        per_round(rounds, ("ours", p, t), ("asr", p, t), d, "whole_median_s", "whole_median_s"))
                    w(f"| {d:g} s | {t} | {p} | {fmt(od['whole_median_s'])} | {fmt(ad['whole_median_s'])} "
                      f"| {q} | {q_rounds} | {fmt(ad['whole_median_s'] / d, '.3f')} |")
        w("")
    for label, field in [("Load (ms)", "load_ms"),
                         ("Peak RSS after load (MiB)", "peak_rss_after_load_mib"),
                         ("Peak RSS after runs (MiB)", "peak_rss_after_runs_mib")]:
        parts = []
        for p in precisions:
            for t in threads:
                o, r, a = (runs.get((k, p, t)) for k in ("ours", "ort", "asr"))
                part = f"{p} t{t} ours {fmt(o and o.get(field), '.0f')} / ort {fmt(r and r.get(field), '.0f')}"
                if a and a.get(field) is not None:
                    part += f" / onnx-asr {fmt(a[field], '.0f')}"
                parts.append(part)
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
    rounds = load_runs(runs_dir)
    if not any(k == "ours" for k, _, _ in rounds):
        sys.exit(f"no ours_*.json in {runs_dir}")
    text = report(rounds, runs_dir)
    with open(out_md, "w") as f:
        f.write(text)
    print(text, end="")
    print(f"(written to {out_md})")


if __name__ == "__main__":
    main()
