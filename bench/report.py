"""From raw rows (``results.jsonl``) to the summary (``results.json``), the markdown tables (``results.md``) and the
charts.

The bound of a row: the time to decode only its uncached tokens against the cached context (the median
``decode_ms`` of the warm pccpu RAM runs of the same row, which decode exactly those tokens after the context is in
the KV cache), plus the time to copy the cached KV bytes (cached tokens x the theoretical KV bytes per token) at the
measured memory bandwidth, or the measured disk read bandwidth for rows served from disk. Full prefill / bound is
the most any cache could gain on that row: the speedup ceiling (``ceiling.py`` explains it from per-token costs).
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from pccpu.bench.runner import RESULTS_FILE, load_records, row_key
from pccpu.bench.systems import SYSTEMS

logger = logging.getLogger(__name__)

DISK_SYSTEMS = ("llama-disk", "pccpu-disk")


def bound_ms(decode_ms: float, kv_bytes: float, bandwidth_bytes_per_s: float | None) -> float | None:
    """Decode time of the uncached tokens plus the copy time of the cached KV bytes at ``bandwidth``."""
    if not bandwidth_bytes_per_s or bandwidth_bytes_per_s <= 0:
        return None
    return decode_ms + kv_bytes / bandwidth_bytes_per_s * 1000.0


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _median_timing(samples: list[dict[str, Any]], *names: str) -> float | None:
    values = [sum(s.get("timings", {}).get(n, 0.0) for n in names) for s in samples if s.get("timings")]
    return statistics.median(values) if values else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows with medians, speedups and bounds; per (model, workload, size) metrics; the last machine record."""
    latest: dict[str, dict[str, Any]] = {}
    metas = [r for r in records if r.get("kind") == "meta"]
    for r in records:
        if r.get("kind") == "row":
            latest[row_key(r["model"], r["workload"], r["size"], r["system"])] = r
    groups: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    for r in latest.values():
        groups.setdefault((r["model"], r["workload"], r["size"]), {})[r["system"]] = r
    rows_out: list[dict[str, Any]] = []
    groups_out: list[dict[str, Any]] = []
    for (model, workload, size), systems in sorted(groups.items()):
        any_row = next(iter(systems.values()))
        full = systems.get("full")
        full_stats = _stats([s["ttft_ms"] for s in full["samples"]]) if full else None
        ram = systems.get("pccpu-ram")
        decode = _median_timing(ram["samples"], "decode_ms") if ram else None
        kv_bytes = any_row["cached_tokens"] * any_row["kv_bytes_per_token_theory"]
        for system in SYSTEMS:
            r = systems.get(system)
            if r is None:
                continue
            st = _stats([s["ttft_ms"] for s in r["samples"]])
            bandwidth = r.get("disk_bandwidth_bytes_per_s") if system in DISK_SYSTEMS else \
                r.get("memory_bandwidth_bytes_per_s")
            bound = bound_ms(decode, kv_bytes, bandwidth) if decode is not None and system != "full" else None
            rows_out.append({
                "model": model, "workload": workload, "size": size, "system": system,
                "cached_tokens": r["cached_tokens"], "decoded_tokens": r.get("decoded_tokens"), "ttft_ms": st,
                "speedup": full_stats["median"] / st["median"] if full_stats and st else None,
                "bound_ms": bound, "ratio_to_bound": st["median"] / bound if st and bound else None,
                # the speedup a cache that only copies the KV and decodes the uncached tokens would have
                "bound_speedup": full_stats["median"] / bound if full_stats and bound else None,
            })
        groups_out.append(_group_metrics(model, workload, size, systems, full_stats, kv_bytes))
    quality = {(r["model"], r["size"]): r for r in records if r.get("kind") == "quality"}  # the latest per key
    return {"machine": metas[-1]["machine"] if metas else {}, "config": metas[-1]["config"] if metas else {},
            "quality": [quality[k] for k in sorted(quality)],
            "memory_bandwidth_bytes_per_s": metas[-1].get("memory_bandwidth_bytes_per_s") if metas else None,
            "rows": rows_out, "groups": groups_out}


def _group_metrics(model: str, workload: str, size: int, systems: dict[str, dict[str, Any]],
                   full_stats: dict[str, float] | None, kv_bytes: float) -> dict[str, Any]:
    any_row = next(iter(systems.values()))
    out: dict[str, Any] = {"model": model, "model_file": any_row["model_file"],
                           "model_sha256": any_row["model_sha256"], "workload": workload, "size": size,
                           "cached_tokens": any_row["cached_tokens"], "prompt_tokens": any_row["prompt_tokens"],
                           "kv_bytes_per_token_theory": any_row["kv_bytes_per_token_theory"],
                           "theoretical_kv_bytes": kv_bytes, "peak_rss_bytes": any_row.get("peak_rss_bytes"),
                           "disk_bandwidth_bytes_per_s": any_row.get("disk_bandwidth_bytes_per_s"),
                           "memory_bandwidth_bytes_per_s": any_row.get("memory_bandwidth_bytes_per_s")}
    full = systems.get("full")
    if full:
        decode = _median_timing(full["samples"], "decode_ms")
        out["prefill_tokens_per_s"] = any_row["prompt_tokens"] / decode * 1000 if decode else None
    ram = systems.get("pccpu-ram")
    if ram and ram["samples"]:
        samples = ram["samples"]
        out["encode_tokens_per_s"] = ram.get("encode_tokens_per_s")
        state_bytes = statistics.median(s["state_bytes"] for s in samples)
        out["stored_bytes_per_cached_token"] = state_bytes / any_row["cached_tokens"] if any_row["cached_tokens"] \
            else None
        restore = _median_timing(samples, "restore_ms")
        out["restore_ram_bytes_per_s"] = state_bytes / restore * 1000 if restore else None
        out["overhead_ms"] = _median_timing(samples, "parse_ms", "lookup_ms", "restore_ms", "copy_ms")
        out["first_token_kl"] = ram.get("first_token_kl")
        out["decode_ms"] = _median_timing(samples, "decode_ms")
        if full and full["samples"]:
            reference = full["samples"][0]["first_token"]
            out["top1_agreement"] = sum(s["first_token"] == reference for s in samples) / len(samples)
    disk = systems.get("pccpu-disk")
    if disk and disk["samples"]:
        state_bytes = statistics.median(s["state_bytes"] for s in disk["samples"])
        read = _median_timing(disk["samples"], "lookup_ms", "restore_ms")
        out["restore_disk_bytes_per_s"] = state_bytes / read * 1000 if read else None
        out["disk_process_load_ms"] = disk.get("load_ms")
        out["disk_process_peak_rss_bytes"] = disk.get("peak_rss_bytes")
        out["disk_overhead_ms"] = _median_timing(disk["samples"], "parse_ms", "lookup_ms", "restore_ms", "copy_ms")
    for name in ("llama-ram", "llama-disk"):
        if name in systems:
            out["llama_reused_tokens"] = systems[name].get("reused_tokens")
    return out


# -- rendering ---------------------------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x" if value < 100 else f"{value:.0f}x"


def _gbps(value: float | None) -> str:
    return "-" if not value else f"{value / 1e9:.1f}"


def render_markdown(summary: dict[str, Any]) -> str:
    """The results tables in markdown: TTFT per row, then the per-row metrics, then the machine."""
    lines = ["| workload | model | cached tokens | system | TTFT ms median [min-max] | speedup vs full prefill "
             "| TTFT / bound | full prefill / bound |", "|---|---|---:|---|---|---:|---:|---:|"]
    for r in summary["rows"]:
        st = r["ttft_ms"]
        ttft = f"{_ms(st['median'])} [{_ms(st['min'])}-{_ms(st['max'])}]" + (" (n=1)" if st["n"] == 1 else "") \
            if st else "-"
        lines.append(f"| {r['workload']} | {r['model']} | {r['cached_tokens']} | {r['system']} | {ttft} "
                     f"| {_x(r['speedup'])} | {_x(r['ratio_to_bound'])} | {_x(r['bound_speedup'])} |")
    lines += ["", "| workload | model | cached tokens | encode tok/s | prefill tok/s | stored B/token (theory) "
              "| restore GB/s RAM / disk | overhead ms | decode ms | disk process load ms | peak RSS MB "
              "| top-1 agree | first-token KL |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g in summary["groups"]:
        stored = g.get("stored_bytes_per_cached_token")
        rss = g.get("peak_rss_bytes")
        agree = g.get("top1_agreement")
        lines.append(
            f"| {g['workload']} | {g['model']} | {g['cached_tokens']} | {_num(g.get('encode_tokens_per_s'))} "
            f"| {_num(g.get('prefill_tokens_per_s'))} | {_num(stored)} ({_num(g['kv_bytes_per_token_theory'])}) "
            f"| {_gbps(g.get('restore_ram_bytes_per_s'))} / {_gbps(g.get('restore_disk_bytes_per_s'))} "
            f"| {_ms(g.get('overhead_ms'))} | {_ms(g.get('decode_ms'))} | {_ms(g.get('disk_process_load_ms'))} "
            f"| {_num(rss / 2**20 if rss else None)} | {'-' if agree is None else f'{agree:.0%}'} "
            f"| {_kl(g.get('first_token_kl'))} |")
    quality = summary.get("quality") or []
    if quality:
        lines += ["", "Retrieval accuracy (facts planted in the picked documents of a modular prompt, greedy answers):",
                  "", "| model | cached tokens | questions | full prefill correct | pccpu correct | top-1 agree "
                  "| first-token KL median | same greedy answer |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for q in quality:
            lines.append(f"| {q['model']} | {q['answers'][0]['cached_tokens']} | {q['questions']} "
                         f"| {q['full_accuracy']:.0%} | {q['cached_accuracy']:.0%} | {q['top1_agreement']:.0%} "
                         f"| {_kl(q['kl_median'])} | {q['greedy_equal']:.0%} |")
    m = summary.get("machine") or {}
    if m:
        lines += ["", f"Machine: {m.get('cpu')}, {m.get('threads_used')} threads used "
                      f"({m.get('cores_allowed')} cores allowed, {m.get('physical_cores')} physical), "
                      f"{(m.get('memory_bytes') or 0) / 2**30:.0f} GiB RAM, {m.get('platform')}; llama-cpp-python "
                      f"{m.get('llama_cpp_python')}; memory copy bandwidth "
                      f"{_gbps(summary.get('memory_bandwidth_bytes_per_s'))} GB/s.",
                  f"llama.cpp: `{m.get('llama_system_info')}`"]
        files = sorted({(g["model"], g["model_file"], g["model_sha256"]) for g in summary["groups"]})
        lines += [f"Model {name}: {file} (sha256 {sha})" for name, file, sha in files]
    return "\n".join(lines) + "\n"


def _kl(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def write_reports(out: Path, charts: bool = True) -> dict[str, Any]:
    """Write results.json, results.md (and the charts) from ``out/results.jsonl``; the summary."""
    summary = summarize(load_records(out / RESULTS_FILE))
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(render_markdown(summary))
    if charts:
        from pccpu.bench.charts import write_charts

        summary["charts"] = [str(p) for p in write_charts(summary, out)]
    return summary
