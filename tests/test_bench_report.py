"""The benchmark report says when its figures come from runs that disagree (bench/report.py)
and reads the CPU time a virtual machine lost to other guests (bench/common.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import report  # noqa: E402


def target(name: str, c: int, runs: list[float], steal: list[float]) -> dict[str, Any]:
    median = sorted(runs)[len(runs) // 2]
    level = {
        "concurrency": c,
        "rps": median,
        "p50": 1.0,
        "p99": 3.0,
        "cpu_us": 100.0,
        "cpu_pct": 100.0,
        "redis_cpu_us": None,
        "requests": 1000,
        "errors": 0,
        "error_detail": {"non2xx": 0, "rpc_errors": 0, "socket": 0},
        "runs_rps": runs,
        "runs_steal_pct": steal,
    }
    return {"name": name, "results": [level]}


def results(ours: list[float], bare: list[float]) -> dict[str, Any]:
    return {
        "targets": [
            target("ours", 16, ours, [1.0, 2.0, 3.0]),
            target("bare", 16, bare, [0.0, 12.5, 4.0]),
        ],
        "memory": None,
    }


def test_a_goal_judged_on_unsteady_runs_says_which_and_how_far_apart() -> None:
    res = results(ours=[5000, 9000, 10000], bare=[17500, 18000, 18500])
    share = report.goals(res)[0]
    assert share["measured"] == "50% (9,000 vs 18,000 req/s); unsteady runs (spread: ours 56%)"
    assert share["met"] is True  # the verdict stands; the figure is marked
    table = "\n".join(report.steadiness(res))
    assert "| ours | 16 | 5,000-10,000 | **56%** | 1, 2, 3 |" in table
    assert "| bare | 16 | 17,500-18,500 | 6% | 0, 12.5, 4 |" in table
    assert report.steal_summary(res) == "median 2.5%, highest 12.5% of a run"


def test_steady_runs_leave_the_figures_unmarked() -> None:
    # ours spreads 25.4%, shown as 25%: not above the 25% mark
    res = results(ours=[8300, 9500, 10710], bare=[18000, 18500, 19000])
    assert [r["measured"] for r in report.goals(res)[:3]] == [
        "51% (9,500 vs 18,500 req/s)",
        "not measured",
        "3.00 ms",
    ]
    assert "**" not in "\n".join(report.steadiness(res)[:4])


def test_steal_is_read_from_the_cpu_line_of_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 800 10 1 4 30 7 0\ncpu0 50 2 25 400 5 0 2 15 3 0\n")
    assert common.machine_cpu(str(stat)) == (30, 1000)
    assert common.machine_cpu(str(tmp_path / "missing")) == (0, 0)
    steal, total = common.machine_cpu()  # this machine's (Linux)
    assert 0 <= steal <= total and total > 0


def test_a_figure_that_would_round_to_its_target_shows_a_decimal() -> None:
    """49.8% of bare is not met and must not read as "50%"; 30.4% production cost likewise."""
    res = results(ours=[9960, 9960, 9960], bare=[20000, 20000, 20000])
    res["targets"].append(target("ours-prod", 16, [6930, 6930, 6930], [0.0, 0.0, 0.0]))
    res["settings"] = {"feature_levels": [16]}
    rows = report.goals(res)
    assert (rows[0]["measured"], rows[0]["met"]) == ("49.8% (9,960 vs 20,000 req/s)", False)
    assert (rows[-1]["measured"], rows[-1]["met"]) == (
        "30.4% (ours-prod 6,930 vs ours 9,960 req/s)",
        False,
    )
    assert "Production settings cost 30.4% of the plain echo throughput" in "\n".join(
        report.feature_cost(res)
    )
    res = results(ours=[12000, 12000, 12000], bare=[20000, 20000, 20000])
    assert report.goals(res)[0]["measured"] == "60% (12,000 vs 20,000 req/s)"
