"""The benchmark's summary (JSON) and its printed table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TARGETS = {"throughput_ratio_min": 2.0, "resume_ms_max": 1000.0, "parked_rss_mb_max": 200.0}


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda r: r["throughput_wf_s"])


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    runs = report["runs"]
    mesh = _best(runs["mesh"])
    baselines = {side: _best(r) for side, r in runs.items() if side != "mesh"}
    side, baseline = max(baselines.items(), key=lambda kv: kv[1]["throughput_wf_s"])
    ratio = mesh["throughput_wf_s"] / baseline["throughput_wf_s"]
    default_resume = next((r for r in report["resume"] if r["ack_wait_s"] == 2.0), None)
    fastest_resume = min(report["resume"], key=lambda r: r["kill_to_first_progress_ms"])
    memory = report["memory"]
    return {
        "throughput": {
            "mesh_wf_s": mesh["throughput_wf_s"],
            "mesh_concurrency": mesh["concurrency"],
            "mesh_p50_ms": mesh["p50_ms"],
            "mesh_p99_ms": mesh["p99_ms"],
            "baseline": side,
            "baseline_wf_s": baseline["throughput_wf_s"],
            "baseline_concurrency": baseline["concurrency"],
            "baseline_p50_ms": baseline["p50_ms"],
            "baseline_p99_ms": baseline["p99_ms"],
            "ratio": ratio,
            "note": "best of the concurrency sweep on each side; the baseline is the faster "
            "of LangGraph's sync (thread pool) and async savers",
        },
        "resume": {
            "default_ack_wait": default_resume,
            "fastest": fastest_resume,
        },
        "memory": memory,
        "targets": {
            **TARGETS,
            "throughput_ratio_met": ratio >= TARGETS["throughput_ratio_min"],
            "resume_met_default_serving_to_progress": (
                default_resume is not None
                and default_resume["serving_to_first_progress_ms"] < TARGETS["resume_ms_max"]
            ),
            "resume_met_default_kill_to_progress": (
                default_resume is not None
                and default_resume["kill_to_first_progress_ms"] < TARGETS["resume_ms_max"]
            ),
            "parked_rss_met": memory["rss_parked_mb"] < TARGETS["parked_rss_mb_max"],
        },
        "runs": runs,
        "resume_runs": report["resume"],
        "environment": report["environment"],
    }


def write(report: dict[str, Any], path: Path) -> dict[str, Any]:
    summary = summarize(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return summary


def _cpu(run: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in run["cpu_ms_per_wf"].items())


def render(summary: dict[str, Any]) -> str:
    lines = ["workflow benchmark: supervisor -> worker -> supervisor -> synthesizer", ""]
    lines.append(
        f"{'side':<16}{'conc':>5}{'wf/s':>9}{'p50 ms':>9}{'p99 ms':>9}  cpu ms/wf by process"
    )
    for side, runs in summary["runs"].items():
        for run in runs:
            lines.append(
                f"{side:<16}{run['concurrency']:>5}{run['throughput_wf_s']:>9.1f}"
                f"{run['p50_ms']:>9.1f}{run['p99_ms']:>9.1f}  {_cpu(run)}"
            )
    t = summary["throughput"]
    lines += [
        "",
        f"best mesh {t['mesh_wf_s']:.1f} wf/s (c={t['mesh_concurrency']}) vs {t['baseline']} "
        f"{t['baseline_wf_s']:.1f} wf/s (c={t['baseline_concurrency']}): "
        f"ratio {t['ratio']:.2f} (target >= {TARGETS['throughput_ratio_min']:g})",
        "",
        f"{'resume after kill -9':<22}{'ack_wait':>9}{'kill->serve':>12}{'serve->1st':>11}"
        f"{'kill->1st':>10}{'serve->all':>11}",
    ]
    for r in summary["resume_runs"]:
        lines.append(
            f"{r['workflows_in_flight']:>4} wf in flight{'':<5}{r['ack_wait_s']:>9g}"
            f"{r['kill_to_serving_ms']:>12.0f}{r['serving_to_first_progress_ms']:>11.0f}"
            f"{r['kill_to_first_progress_ms']:>10.0f}{r['serving_to_all_progressed_ms']:>11.0f}"
        )
    m = summary["memory"]
    lines += [
        "",
        f"parked on approval: {m['parked_workflows']} workflows; coordinator RSS idle "
        f"{m['rss_idle_mb']:.1f} MB, parked {m['rss_parked_mb']:.1f} MB (peak "
        f"{m['rss_peak_while_parking_mb']:.1f}), fresh replica "
        f"{m['rss_fresh_replica_with_parked_mb']:.1f} MB; parked at "
        f"{m['park_rate_wf_s']:.0f} wf/s; approve -> done "
        f"{m['approve_to_completed_ms']:.0f} ms",
        "",
        "targets: " + ", ".join(f"{k}={v}" for k, v in summary["targets"].items()),
        "environment: " + json.dumps(summary["environment"]),
    ]
    return "\n".join(lines)
