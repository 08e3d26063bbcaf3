"""Markdown table and latency-throughput plot of a run_suite.py report.

    python bench/report.py bench/results/results.json   # rewrites results.md and the PNG
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = {"floor": "floor (bare grpc.aio)", "mlserver": "MLServer 1.7.1", "quorum": "Quorum",
         "quorum-native": "Quorum (native engine)", "quorum-mobilenet": "Quorum"}


def _load(r: dict) -> str:
    return f"c={r['concurrency']}" if r["mode"] == "closed" else f"open {r['rate']:g}/s"


def _what(r: dict) -> str:
    name = NAMES.get(r["server"], r["server"])
    if r["server"] == "floor":
        return f"{name}, {'602 KB' if r['group'] == 'mobilenet' else 'digits-sized'} request"
    suffix = {"quorum": " (quorum.v1 Predict)", "tfserving": " (TF Serving Predict)"}.get(r["protocol"], "")
    return f"{name} {r['model']}{suffix}"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}; "
        f"{m['date']}. Client and server share the {m['cores']} cores.",
        f"Command: `{report['command']}` ({report['duration_s']:g} s per run, median of "
        f"{report['rounds']} rounds, suite wall time {report['wall_s']:.0f} s).", "",
        "| configuration | load | req/s | rows/s | p50 ms | p90 ms | p99 ms | max ms | errors "
        "| client CPU | server CPU | server CPU µs/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "failed" in r:
            lines.append(f"| {r['key']} | failed | | | | | | | | | | |")
            continue
        lat = r["latency_ms"]
        scpu = "-" if r["server_cpu_cores"] is None else f"{r['server_cpu_cores']:.2f}"
        sus = "-" if r["server_cpu_us_per_req"] is None else f"{r['server_cpu_us_per_req']:.0f}"
        lines.append(
            f"| {_what(r)} | {_load(r)} | {r['throughput_rps']:.0f} | {r['rows_per_s']:.0f} | "
            f"{lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {lat['max']:.1f} | "
            f"{sum(r['errors'].values())} | {r['client_cpu_cores']:.2f} | {scpu} | {sus} |")
    lines += ["", "In-process ceiling (ONNX Runtime, no RPC; several models run one after the "
              "other per batch):", "", "| models | batch | rows/s | ms per call |", "|---|---|---|---|"]
    for name, rows in report["ceiling"].items():
        for c in rows:
            lines.append(f"| {name} ({len(c['models'])} model{'s' if len(c['models']) > 1 else ''}) "
                         f"| {c['batch']} | {c['rows_per_s']:.1f} | {c['ms_per_call']:.2f} |")
    lines += ["", "| target | want | measured | met |", "|---|---|---|---|"]
    for t in report["ratios"]:
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(f"| {t['target']} | ≥ {t['want']:g} | {t['ratio']:.2f}{note} | "
                     f"{'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, group, title in ((axes[0], "digits", "digits MLP (1 row, 256 B per request)"),
                             (axes[1], "mobilenet", "MobileNetV2 224x224x3 (602 KB per request)")):
        series: dict[str, list[dict]] = {}
        for r in report["results"]:
            if r.get("group") == group and "failed" not in r and r["protocol"] == "v2":
                series.setdefault(_what(r), []).append(r)
        for label, rs in series.items():
            for mode, marker in (("closed", "o-"), ("open", "s--")):
                pts = sorted((r for r in rs if r["mode"] == mode), key=lambda r: r["throughput_rps"])
                if pts:
                    ax.plot([r["rows_per_s"] for r in pts], [r["latency_ms"]["p99"] for r in pts],
                            marker, label=f"{label}, {mode} loop (p99)")
        if group == "mobilenet" and report["ceiling"].get("mobilenets"):
            top = max(c["rows_per_s"] for c in report["ceiling"]["mobilenets"])
            ax.axvline(top, color="grey", linestyle=":", label=f"in-process ceiling {top:.0f} rows/s")
        ax.set_xlabel("throughput (rows/s)")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"p99 latency against throughput, {report['machine']['cores']} cores shared by "
                 f"client and server ({report['machine']['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "results.json")
    report = json.loads(path.read_text())
    (path.parent / "results.md").write_text(markdown(report))
    plot(report, path.parent / "latency_throughput.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
