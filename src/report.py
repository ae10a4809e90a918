"""Plots of a run from OUT/stats.jsonl: losses, D outputs, FID and speed (matplotlib when installed)."""
from __future__ import annotations

import json
import os

from src.atomic import atomic_path
from src.console import log

PLOTS_NAME = "plots.png"


def read_stats(path: str) -> list[dict]:
    """The status records of stats.jsonl (event lines and unreadable lines, e.g. a half-written last one, skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "event" not in record and "kimg" in record:
                records.append(record)
    return records


def _report_series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    # (kimg, value) of the records that have the key with a number
    pairs = [(r["kimg"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# The four panels of plots.png: (title, [(stats key, label)]). ADA's p (--ada-target) shares the D outputs' panel:
# it answers them (it rises while D(x) runs positive on the training images).
REPORT_PANELS = [("losses", [("g_loss", "G loss"), ("d_loss", "D loss")]),
                 ("D outputs (logits), ADA's p", [("d_real", "D(x)"), ("d_fake", "D(G(z))"), ("ada_p", "ADA p")]),
                 ("FID of G_ema", [("fid", "FID")]),
                 ("speed", [("images_per_s", "images/s")])]


def plotted_series(records: list[dict]) -> list[tuple[str, list]]:
    """For each panel of REPORT_PANELS, (title, [(key, label, kimg, values)]) of the series the records hold."""
    panels = []
    for title, series in REPORT_PANELS:
        drawn = [(key, label, *_report_series(records, key)) for key, label in series]
        panels.append((title, [line for line in drawn if line[3]]))
    return panels


def write_plots(out_dir: str) -> list[str]:
    """OUT/plots.png (G/D losses, D(x), D(G(z)) and ADA's p, FID, images/s against kimg); returns the files written.

    Returns [] with a one-line note when matplotlib is missing or there is nothing to plot.
    """
    stats_path = os.path.join(out_dir, "stats.jsonl")
    if not os.path.isfile(stats_path):
        log("report", f"no {stats_path}: nothing to plot")
        return []
    records = read_stats(stats_path)
    if not records:
        log("report", f"{stats_path} has no status records: nothing to plot")
        return []
    try:
        # A Figure with its own Agg canvas, not pyplot: pyplot would switch the backend of the whole process,
        # and in a notebook every later cell would lose its inline plots.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log("report", "matplotlib is not installed: plots skipped (stats.jsonl has the numbers)")
        return []

    fig = Figure(figsize=(11, 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    for ax, (title, series) in zip(axes.flat, plotted_series(records)):
        for key, label, kimg, values in series:
            ax.plot(kimg, values, marker="o" if key == "fid" else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("kimg")
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path = os.path.join(out_dir, PLOTS_NAME)
    with atomic_path(path) as tmp_path:
        fig.savefig(tmp_path, format="png", dpi=90)
    log("report", f"wrote {path}")
    return [path]


if __name__ == "__main__":
    import sys
    write_plots(sys.argv[1] if len(sys.argv) > 1 else "out")
