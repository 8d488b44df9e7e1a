#!/usr/bin/env python3
"""Turns the fio JSON of scripts/run.sh (the mode comparison) into results.csv, results.md and
plot.png (gnuplot). File names carry the run: TARGET-WORKLOAD-qdN-rK.json, where
TARGET is a completion mode (MODE_uring: with transport=uring), "raw" (the backing file itself), "passthrough"
(libfuse's passthrough_ll) or "floor" (reads of a hole on deferfs: the FUSE
round trip alone), and K the repetition. Repeated runs are reported by their
median, with the spread (largest distance from the median, in percent).
Beside each JSON, run.sh may leave RUN.cpu: the file server's CPU seconds
during the run (shown as CPU µs per IO), and RUN.steal: the percent of the
machine's CPU time its host stole during the run; notes it leaves as TARGET-note.txt
go under the tables. Where the run measured what they need, a last table
checks issue 5's benchmark goals.

  bench_report.py --brief RUN.json          one progress line for one run
  bench_report.py --out DIR RUN.json...     the whole report into DIR
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys

COMPLETION = ["inline", "workqueue", "defer", "auto", "sync"]
# Targets in table order; MODE_uring is MODE mounted with transport=uring.
MODES = ["raw", "passthrough", "floor"] + COMPLETION + [m + "_uring" for m in COMPLETION]
WORKLOADS = ["randwrite-alloc", "randwrite-overwrite", "randread", "randwrite-dsync"]
NAME = re.compile(r"(?P<target>[a-z_]+)-(?P<job>[a-z-]+)-qd(?P<qd>\d+)(-r(?P<rep>\d+))?\.json$")


def measure(path):
    """IOPS, mean/p50/p99 completion latency (µs) of the one job in a fio JSON."""
    with open(path) as f:
        job = json.load(f)["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
    clat = side["clat_ns"]
    pct = clat.get("percentile", {})
    r = {
        "iops": side["iops"],
        "mean_us": clat["mean"] / 1000.0,
        # Submission to completion: what an application waits (the QD1 goal).
        "lat_mean_us": side.get("lat_ns", clat)["mean"] / 1000.0,
        "p50_us": pct.get("50.000000", 0) / 1000.0,
        "p99_us": pct.get("99.000000", 0) / 1000.0,
    }
    # run.sh leaves the file server's CPU seconds during the run beside the JSON.
    cpu = path[: -len(".json")] + ".cpu"
    if os.path.exists(cpu) and side["total_ios"]:
        with open(cpu) as f:
            r["cpu_us"] = float(f.read()) * 1e6 / side["total_ios"]
    steal = path[: -len(".json")] + ".steal"
    if os.path.exists(steal):
        with open(steal) as f:
            text = f.read().strip()
        if text:
            r["steal_pct"] = float(text)
    return r


def fmt_iops(v):
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def median(xs):
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def load(paths):
    """{(job, target, qd): [measure of each repetition]}."""
    reps = collections.defaultdict(list)
    for p in paths:
        m = NAME.search(os.path.basename(p))
        if m:
            r = measure(p)
            r["rep"] = int(m["rep"] or 1)
            reps[(m["job"], m["target"], int(m["qd"]))].append(r)
    for rs in reps.values():
        rs.sort(key=lambda r: r["rep"])
    return reps


def summarize(reps):
    """Per point: the median of each figure, and the IOPS spread in percent."""
    runs = {}
    for key, rs in reps.items():
        keys = set.intersection(*(set(x) for x in rs)) - {"rep"}
        r = {k: median([x[k] for x in rs]) for k in keys}
        r["n"] = len(rs)
        r["spread"] = max(abs(x["iops"] / r["iops"] - 1) for x in rs) * 100 if r["iops"] else 0.0
        runs[key] = r
    return runs


def notes(paths):
    dirs = {os.path.dirname(os.path.abspath(p)) for p in paths}
    out = []
    for d in sorted(dirs):
        for name in sorted(os.listdir(d)):
            if name.endswith("-note.txt"):
                with open(os.path.join(d, name)) as f:
                    out.append(f"- {name[:-len('-note.txt')]}: {f.read().strip()}")
    return out


# Above this much stolen CPU time, a run measured the host's other tenants
# as much as deferfs.
STEAL_NOTED = 5.0


def steal_markdown(reps):
    """Per repetition, how much CPU time the host stole during its runs."""
    per_rep = collections.defaultdict(list)
    for (job, target, qd), rs in reps.items():
        for r in rs:
            if "steal_pct" in r:
                per_rep[r["rep"]].append((r["steal_pct"], f"{target} {job} QD{qd}"))
    if not per_rep:
        return ""
    lines = ["### Host steal\n",
             "The percent of this machine's CPU time its host gave to others while the runs waited for it "
             "(/proc/stat). Where it is high, the host set the pace, and figures of that repetition "
             "(and comparisons that pair them) say less about deferfs.\n",
             "| repetition | median | max | runs above " + f"{STEAL_NOTED:.0f} %" + " |", "|---|---|---|---|"]
    for rep in sorted(per_rep):
        vals = sorted(per_rep[rep], reverse=True)
        top, where = vals[0]
        above = sum(1 for v, _ in vals if v > STEAL_NOTED)
        lines.append(f"| {rep} | {median([v for v, _ in vals]):.1f} % | {top:.1f} % ({where}) | "
                     f"{above} of {len(vals)} |")
    return "\n".join(lines) + "\n"


def markdown(runs):
    lines = []
    repeated = any(r["n"] > 1 for r in runs.values())
    for job in WORKLOADS:
        # randwrite-alloc on the raw file is a plain overwrite: show that figure.
        raw_job = "randwrite-overwrite" if job == "randwrite-alloc" else job
        targets = [t for t in MODES if any(k[0] == (raw_job if t == "raw" else job) and k[1] == t for k in runs)]
        qds = sorted({k[2] for k in runs if k[0] == job})
        if not qds:
            continue
        if targets == ["raw"] and any(k[1] != "raw" for k in runs):
            continue  # measured only as the raw reference of randwrite-alloc
        get = lambda t, qd: runs.get((raw_job if t == "raw" else job, t, qd))
        lines.append(f"### {job}\n")
        head = ["QD"] + [f"{t} IOPS" for t in targets]
        if "defer" in targets and "workqueue" in targets:
            head.append("defer vs workqueue")
        head.append("p50 / p99 µs (" + ", ".join(t for t in targets) + ")")
        servers = [t for t in targets if any("cpu_us" in r for k, r in runs.items() if k[1] == t and k[0] == job)]
        if servers:
            head.append("server CPU µs per IO (" + ", ".join(servers) + ")")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for qd in qds:
            row = [str(qd)]
            for t in targets:
                r = get(t, qd)
                cell = fmt_iops(r["iops"]) if r else "–"
                if r and repeated:
                    cell += f" ±{r['spread']:.0f}%"
                row.append(cell)
            if "defer vs workqueue" in head:
                d, w = get("defer", qd), get("workqueue", qd)
                row.append(f"{(d['iops'] / w['iops'] - 1) * 100:+.1f} %" if d and w and w["iops"] else "–")
            lat = []
            for t in targets:
                r = get(t, qd)
                lat.append(f"{r['p50_us']:.0f}/{r['p99_us']:.0f}" if r else "–")
            row.append(", ".join(lat))
            if servers:
                cpu = [get(t, qd) for t in servers]
                row.append(", ".join(f"{r['cpu_us']:.0f}" if r and "cpu_us" in r else "–" for r in cpu))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


# Issue 5's benchmark goals: (what, figures, bar, unit). A ratio or a
# difference is taken within each repetition (raw and the modes of one
# sitting) and the goal judged by the median of those: a ratio of two medians
# could pair one sitting's fast raw file with another's slow mode.
FAST = ["defer", "auto", "defer_uring", "auto_uring"]
FAR_AHEAD = 1.5  # "far ahead of passthrough_ll", taken as 1.5x its IOPS


def by_rep(reps, key):
    return {r["rep"]: r for r in reps.get(key, [])}


def paired(reps, a, b, fig, op):
    ra, rb = by_rep(reps, a), by_rep(reps, b)
    return [op(ra[k][fig], rb[k][fig]) for k in sorted(ra.keys() & rb.keys()) if rb[k][fig]]


def goals(reps):
    """[(goal, per-repetition values, bar, unit)] for the goals this run measured.

    The QD1 goal compares fio's total latency (submission to completion)."""
    ratio = lambda a, b: paired(reps, a, b, "iops", lambda x, y: x / y)
    out = []
    for qd in (8, 16):
        w = ("randwrite-alloc", "workqueue", qd)
        d = ("randwrite-alloc", "defer", qd)
        out.append((f"allocating writes QD{qd}: `defer` ≥ 1.35× `workqueue`", ratio(d, w), 1.35, "×"))
        out.append((f"allocating writes QD{qd}: `auto` ≥ `defer`", ratio(("randwrite-alloc", "auto", qd), d), 1.0, "×"))
    for m in FAST:
        out.append((f"random reads QD32: `{m}` ≥ 0.8× raw",
                    ratio(("randread", m, 32), ("randread", "raw", 32)), 0.8, "×"))
        out.append((f"random reads QD1: `{m}`'s mean latency within 20 µs of raw",
                    paired(reps, ("randread", m, 1), ("randread", "raw", 1), "lat_mean_us", lambda x, y: x - y),
                    20.0, "µs"))
        out.append((f"random overwrites QD16: `{m}` ≥ 0.8× raw",
                    ratio(("randwrite-overwrite", m, 16), ("randwrite-overwrite", "raw", 16)), 0.8, "×"))
        out.append((f"random reads QD32: `{m}` ≥ {FAR_AHEAD}× `passthrough_ll`",
                    ratio(("randread", m, 32), ("randread", "passthrough", 32)), FAR_AHEAD, "×"))
    return [g for g in out if g[1]]


def goals_markdown(reps):
    rows = goals(reps)
    if not rows:
        return ""
    repetitions = max(r["rep"] for rs in reps.values() for r in rs)
    lines = ["### The goals of issue 5\n",
             "Each figure within one repetition (raw and the modes of one sitting); the verdict takes their median.\n",
             "| goal | per repetition | median | |", "|---|---|---|---|"]
    for what, vals, bar, unit in rows:
        fmt = (lambda v: f"{v:.2f}×") if unit == "×" else (lambda v: f"{v:+.0f} µs")
        med = median(vals)
        # Ratios must reach the bar; a latency difference must stay within it.
        met = med >= bar if unit == "×" else med <= bar
        # A repetition that lacks one side of the pair is left out: say so.
        partial = f" ({len(vals)} of {repetitions} repetitions)" if len(vals) < repetitions else ""
        lines.append(f"| {what} | {', '.join(fmt(v) for v in vals)}{partial} | {fmt(med)} | {'met' if met else 'not met'} |")
    return "\n".join(lines) + "\n"


def plot(runs, out):
    series = collections.defaultdict(list)
    for (job, target, qd), r in sorted(runs.items(), key=lambda kv: kv[0][2]):
        series[(job, target)].append((qd, r["iops"], r["p99_us"]))
    datdir = os.path.join(out, "plot-data")
    os.makedirs(datdir, exist_ok=True)
    for (job, target), pts in series.items():
        with open(os.path.join(datdir, f"{job}-{target}.dat"), "w") as f:
            for qd, iops, p99 in pts:
                f.write(f"{qd} {iops:.1f} {p99:.1f}\n")
    script = [
        "set terminal pngcairo size 1400,1800 font ',10'",
        f"set output '{os.path.join(out, 'plot.png')}'",
        f"set multiplot layout {len(WORKLOADS)},2 title 'deferfs: IOPS and p99 latency by queue depth'",
        "set logscale x 2", "set key left top", "set grid",
    ]
    for job in WORKLOADS:
        for col, label in ((2, "IOPS"), (3, "p99 latency (µs)")):
            plots = []
            for t in MODES:
                src = "randwrite-overwrite" if (t == "raw" and job == "randwrite-alloc") else job
                path = os.path.join(datdir, f"{src}-{t}.dat")
                if os.path.exists(path):
                    # One colour and point type per target in every panel.
                    plots.append(f"'{path}' using 1:{col} with linespoints lt {MODES.index(t) + 1} title '{t}'")
            if not plots:
                continue
            script += [f"set title '{job}: {label}'", "set xlabel 'queue depth'", f"set ylabel '{label}'",
                       "plot " + ", ".join(plots)]
    script.append("unset multiplot")
    try:
        subprocess.run(["gnuplot"], input="\n".join(script), text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"bench_report: no plot ({e})", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brief", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    if a.brief:
        r = measure(a.files[0])
        cpu = f"  server {r['cpu_us']:5.1f} µs CPU/IO" if "cpu_us" in r else ""
        steal = f"  host steal {r['steal_pct']:.0f}%" if r.get("steal_pct", 0) > STEAL_NOTED else ""
        print(f"{fmt_iops(r['iops']):>7} IOPS  p50 {r['p50_us']:6.0f} µs  p99 {r['p99_us']:6.0f} µs{cpu}{steal}")
        return
    reps = load(a.files)
    runs = summarize(reps)
    with open(os.path.join(a.out, "results.csv"), "w") as f:
        f.write("workload,target,qd,rep,iops,mean_us,p50_us,p99_us,server_cpu_us_per_io,host_steal_pct\n")
        for (job, target, qd), rs in sorted(reps.items()):
            for r in rs:
                cpu = f"{r['cpu_us']:.1f}" if "cpu_us" in r else ""
                steal = f"{r['steal_pct']:.1f}" if "steal_pct" in r else ""
                f.write(f"{job},{target},{qd},{r['rep']},{r['iops']:.1f},{r['mean_us']:.1f},{r['p50_us']:.1f},"
                        f"{r['p99_us']:.1f},{cpu},{steal}\n")
    md = markdown(runs)
    extra = notes(a.files)
    if extra:
        md += "\nNotes:\n\n" + "\n".join(extra) + "\n"
    for section in (goals_markdown(reps), steal_markdown(reps)):
        if section:
            md += "\n" + section
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    plot(runs, a.out)


if __name__ == "__main__":
    main()
