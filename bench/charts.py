"""PNG charts of a summary: TTFT against cached tokens per system (log scale), and speedup against cached tokens.
One panel per (model, workload). Needs matplotlib (the ``bench`` extra); without it, charts are skipped with a log
message."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def write_charts(summary: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'pccpu[bench]'): no charts written")
        return []
    rows = [r for r in summary["rows"] if r["ttft_ms"]]
    panels = sorted({(r["model"], r["workload"]) for r in rows})
    if not panels:
        return []
    written = []
    for name, value, ylabel in (("ttft.png", "ttft", "TTFT (ms, log)"),
                                ("speedup.png", "speedup", "speedup vs full prefill (x, log)")):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
        for ax, (model, workload) in zip(axes[0], panels, strict=False):
            systems = sorted({r["system"] for r in rows if (r["model"], r["workload"]) == (model, workload)})
            for system in systems:
                if value == "speedup" and system == "full":
                    continue
                points = sorted((r["cached_tokens"], r["ttft_ms"]["median"] if value == "ttft" else r["speedup"])
                                for r in rows if (r["model"], r["workload"], r["system"]) == (model, workload, system))
                points = [p for p in points if p[1]]
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{model} / {workload}", fontsize=9)
            ax.set_xlabel("cached tokens")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
