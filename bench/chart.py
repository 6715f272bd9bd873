#!/usr/bin/env python3
"""Draw bench/results.png from bench/results.json (written by bench/run.py in the same run).

    python bench/chart.py [--input bench/results.json] [--output bench/results.png]

Two panels by concurrency: throughput (req/s) and p99 latency (ms), both on log scales, for
ours, ours-prod, the reference and bare (medians, as in the tables of bench/results.md).
Needs matplotlib (`pip install -e '.[bench]'`, which `make bench` does); Agg backend, no
display needed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

BENCH = Path(__file__).resolve().parent
STYLE = {  # name: (colour, marker)
    "ours": ("tab:blue", "o"),
    "ours-prod": ("tab:purple", "D"),
    "reference": ("tab:red", "s"),
    "bare": ("tab:gray", "^"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, default=BENCH / "results.json")
    p.add_argument("--output", type=Path, default=BENCH / "results.png")
    args = p.parse_args()
    res = json.loads(args.input.read_text())
    levels = res["settings"]["levels"]
    fig, (rps_ax, p99_ax) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    drawn = 0
    for t in res["targets"]:
        if t["name"] not in STYLE:
            continue
        points = sorted(
            (x["concurrency"], x["rps"], x["p99"])
            for x in t["results"]
            if x["concurrency"] in levels
        )
        if not points:
            continue
        colour, marker = STYLE[t["name"]]
        cs, rps, p99 = zip(*points, strict=True)
        for ax, ys in ((rps_ax, rps), (p99_ax, p99)):
            ax.plot(cs, ys, color=colour, marker=marker, label=t["name"])
        drawn += 1
    if not drawn:
        print(f"chart: no results for {', '.join(STYLE)} in {args.input}", file=sys.stderr)
        return 1

    def label(v: float, _: int) -> str:
        return f"{v:,.0f}" if v >= 1 else f"{v:g}"

    def label_2_5(v: float, pos: int) -> str:  # minor ticks: 2 and 5 of each decade only
        return label(v, pos) if round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""

    for ax, title, unit in (
        (rps_ax, "Throughput (median req/s, higher is better)", "req/s"),
        (p99_ax, "p99 latency (median of runs, lower is better)", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(label))
        ax.yaxis.set_minor_formatter(FuncFormatter(label_2_5))
        ax.set_xlabel("concurrency (wrk connections)")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    p99_ax.axhline(5, color="tab:green", linestyle="--", linewidth=1, label="target p99 5 ms")
    rps_ax.legend(fontsize=9)
    p99_ax.legend(fontsize=9)
    m = res["machine"]
    fig.suptitle(
        f"POST /asap echo, one uvicorn worker each; {res['date']}, {m['nproc']} CPUs "
        f"({m['CPU']}), {res['settings']['runs']} × {res['settings']['duration']}s runs",
        fontsize=10,
    )
    fig.savefig(args.output, dpi=110)
    print(f"chart: wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
