"""TTFT with CUDA offload: full prefill against pccpu with modules restored from host memory and pccpu with modules
resident in GPU memory, for model shapes written with random weights (``random_gguf.py``), plus fidelity on a real
model.

    python -m pccpu.bench.gpu_bench --tokenizer tok.gguf --workdir /tmp/models --out results-gpu \\
        --shape qwen2.5-1.5b --shape llama3.1-8b --sizes 2048 4096 8192 16384 --fidelity-model smollm2

Per shape, one ``PromptCache`` with every layer and the KV cache on the GPU (flash attention on) and a resident budget
that holds the largest document. Per size (the prefix workload of ``workloads.py``: one document module, then a
16-token question), alternating and after a warm-up:

- ``full``: the same tokens prefilled from scratch (``ask(cache=False)``);
- ``host``: resident runs dropped first, so the module's state is copied from host memory into the GPU KV cache
  (``llama_state_seq_set_data``) and then the question decoded: the paper's "modules in CPU memory";
- ``resident``: the module is already in the KV cache and joins the request by ``seq_cp`` (no copy): the paper's
  "modules in GPU memory".

Every row drops the resident runs of other sizes first: with flash attention the request attends over every cell up
to the highest one in use, so runs of other documents left in the cache would slow it down.

The bound: decoding the uncached tokens against the cached context (the resident row's decode time) plus, for the host
row, copying the state's bytes at the host-to-device bandwidth measured here (pageable memory, as llama.cpp copies
from the caller's buffer).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PAPER = ("Prompt Cache paper, Llama2-7B on an RTX 4090: modules copied from host 2.8-3.1x, modules resident on the "
         "GPU 7.3-11.7x lower TTFT than full prefill (570-782 ms baseline)")


_H2D_PROBE = """
import json, statistics, sys, time
import torch
n = int(sys.argv[1]); out = {}
device = torch.empty(n, dtype=torch.uint8, device="cuda")
for kind in ("pageable", "pinned"):
    host = torch.ones(n, dtype=torch.uint8, pin_memory=kind == "pinned")
    times = []
    for _ in range(6):
        torch.cuda.synchronize(); t = time.perf_counter()
        device.copy_(host); torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out[kind] = n / statistics.median(times[1:])
print(json.dumps(out))
"""


def h2d_bandwidth(n_bytes: int) -> dict[str, float] | None:
    """Host-to-device copy bandwidth in bytes/s (pageable and pinned host memory), measured with PyTorch in a
    subprocess: torch's own CUDA libraries must not be loaded into the process that runs llama.cpp's (that
    crashed llama.cpp's model load)."""
    probe = subprocess.run([sys.executable, "-c", _H2D_PROBE, str(n_bytes)], capture_output=True, text=True)
    if probe.returncode != 0:
        logger.warning("no host-to-device bandwidth (PyTorch with CUDA needed): %s", probe.stderr.strip()[-300:])
        return None
    return json.loads(probe.stdout.strip().splitlines()[-1])


def gpu_name() -> str:
    found = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def measure_shape(model_path: Path, sizes: list[int], runs: int, corpus: str, n_batch: int,
                  gpu_layers: str = "all") -> list[dict[str, Any]]:
    from pccpu.bench.workloads import build_workload
    from pccpu.engine import LlamaModel
    from pccpu.service import PromptCache

    largest = max(sizes)
    rows: list[dict[str, Any]] = []
    with LlamaModel(model_path) as probe:  # its shape sizes the resident budget (mmap: cheap to load twice)
        per_token = probe.info.kv_bytes_per_token(2.0)  # K and V, f16
    budget = int(per_token * (largest + 512))
    n_ctx = -(-(largest + 512) // 256) * 256
    # reuse_previous=False: host and resident answers alternate on the same prompt, each assembled from scratch
    pc = PromptCache(model_path, n_ctx=n_ctx, n_batch=n_batch, n_gpu_layers=gpu_layers, persist=False,
                     reuse_previous=False, resident_budget=budget, ram_budget=8 * budget)
    workloads = [build_workload("prefix", n, corpus, pc.tokenize, pc.detokenize) for n in sizes]
    try:
        info = pc.model_info
        for workload in workloads:
            started = time.perf_counter()
            pc.add_schema(workload.schema)
            encode_s = time.perf_counter() - started
            samples: dict[str, list[dict[str, Any]]] = {"full": [], "host": [], "resident": []}

            def one(kind: str, keep: bool, workload: Any = workload,
                    samples: dict[str, list[dict[str, Any]]] = samples) -> dict[str, Any]:
                if kind != "resident":
                    pc.clear_residents()
                result = pc.ask(workload.prompt, cache=kind != "full", max_tokens=1).result()
                sample = {"ttft_ms": result.ttft_ms, "timings": asdict(result.timings), "token": result.text,
                          "cached_tokens": result.cached_tokens, "uncached_tokens": result.uncached_tokens,
                          "state_bytes": sum(m.state_bytes for m in result.modules)}
                if keep:
                    samples[kind].append(sample)
                return sample

            for kind in ("full", "host", "resident"):  # warm-up
                one(kind, keep=False)
            for _ in range(runs):
                for kind in ("full", "host", "resident"):
                    one(kind, keep=True)
            state_bytes = samples["host"][0]["state_bytes"]
            bandwidth = h2d_bandwidth(max(state_bytes, 1 << 20))
            ttft = {k: _median([s["ttft_ms"] for s in v]) for k, v in samples.items()}
            decode_resident = _median([s["timings"].get("decode_ms", 0.0) for s in samples["resident"]])
            restore_host = _median([s["timings"].get("restore_ms", 0.0) for s in samples["host"]])
            copy_ms = state_bytes / bandwidth["pageable"] * 1000 if bandwidth else float("nan")
            row = {
                "model": model_path.name, "n_layer": info.n_layer, "n_params": info.n_params,
                "size": workload.size, "cached_tokens": samples["host"][0]["cached_tokens"],
                "uncached_tokens": samples["host"][0]["uncached_tokens"], "state_bytes": state_bytes,
                "kv_bytes_per_token": pc.kv_bytes_per_token, "encode_s": encode_s,
                "ttft_ms": ttft,
                "ttft_min_ms": {k: min(s["ttft_ms"] for s in v) for k, v in samples.items()},
                "ttft_max_ms": {k: max(s["ttft_ms"] for s in v) for k, v in samples.items()},
                "speedup": {"host": ttft["full"] / ttft["host"], "resident": ttft["full"] / ttft["resident"]},
                "restore_ms": restore_host,
                "restore_gb_s": state_bytes / restore_host / 1e6 if restore_host else None,
                "h2d_bytes_per_s": bandwidth,
                "bound_ms": {"host": decode_resident + copy_ms, "resident": decode_resident},
                "first_tokens_agree": len({s["token"] for v in samples.values() for s in v}) == 1,
                "resident_stats": asdict(pc.stats().residents),
                "samples": samples,
            }
            row["over_bound"] = {k: ttft[k] / row["bound_ms"][k] for k in ("host", "resident")}
            rows.append(row)
            logger.info("%s %d: full %.1f ms, host %.1f ms (%.1fx), resident %.1f ms (%.1fx)", model_path.name,
                        workload.size, ttft["full"], ttft["host"], row["speedup"]["host"], ttft["resident"],
                        row["speedup"]["resident"])
    finally:
        pc.close()
    return rows


def fidelity(model: str, corpus: str, size: int = 1024, generated: int = 32) -> dict[str, Any]:
    """First-token KL and greedy agreement of the host and resident paths against full prefill, on the GPU."""
    from pccpu.bench.fidelity import kl_divergence as kl
    from pccpu.bench.workloads import build_workload
    from pccpu.service import PromptCache

    out: dict[str, Any] = {"model": model, "size": size}
    for layers in ("all", "none"):
        pc = PromptCache(model, n_ctx=size + 512, n_gpu_layers=layers, persist=False, resident_budget=64 << 20,
                         reuse_previous=False)
        try:
            workload = build_workload("prefix", size, corpus, pc.tokenize, pc.detokenize)
            pc.add_schema(workload.schema)

            def logits(prompt: str, cache: bool = True, pc: PromptCache = pc) -> np.ndarray:
                result = pc.ask(prompt, cache=cache, max_tokens=0, keep_logits=True).result()
                return np.asarray(result.first_logits, dtype=np.float64)

            full = logits(workload.prompt, cache=False)
            pc.clear_residents()
            host = logits(workload.prompt)
            resident = logits(workload.prompt)
            pc.clear_residents()
            texts = {"full": pc.ask(workload.prompt, cache=False, max_tokens=generated).text()}
            pc.clear_residents()
            texts["host"] = pc.ask(workload.prompt, max_tokens=generated).text()
            texts["resident"] = pc.ask(workload.prompt, max_tokens=generated).text()
            out["gpu" if layers == "all" else "cpu"] = {
                "placement": "gpu:all" if layers == "all" else "cpu", "flash_attn": layers == "all",
                "kl": {"host": kl(full, host), "resident": kl(full, resident)},
                "max_abs_logit_diff": {"host": float(np.abs(full - host).max()),
                                       "resident": float(np.abs(full - resident).max())},
                "top1_agree": {"host": int(full.argmax()) == int(host.argmax()),
                               "resident": int(full.argmax()) == int(resident.argmax())},
                "greedy_equal": {k: texts[k] == texts["full"] for k in ("host", "resident")},
            }
        finally:
            pc.close()
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"GPU: {meta['gpu']}; llama.cpp: {meta['llama_system_info']}", "",
             "| model | cached tokens | full prefill | pccpu, host copy | pccpu, resident | speedup host / resident "
             "| bound host / resident | pccpu / bound |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t, b, s, o = r["ttft_ms"], r["bound_ms"], r["speedup"], r["over_bound"]
        lines.append(f"| {r['model']} | {r['cached_tokens']} | {t['full']:.1f} ms | {t['host']:.1f} ms | "
                     f"{t['resident']:.1f} ms | {s['host']:.1f}x / {s['resident']:.1f}x | {b['host']:.1f} / "
                     f"{b['resident']:.1f} ms | {o['host']:.2f}x / {o['resident']:.2f}x |")
    lines += ["", f"Reference: {PAPER}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from pccpu.engine import gpu_offload_supported
    from pccpu.engine._lib import lib

    lib()  # llama.cpp loaded the way pccpu loads it, before anything else imports llama_cpp (see _lib.py)
    from pccpu.bench.corpus import corpus_text
    from pccpu.bench.machine import machine_info
    from pccpu.bench.random_gguf import write_random_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer donor GGUF (random_gguf.py donor)")
    parser.add_argument("--workdir", type=Path, required=True, help="where the random-weight models are written")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", action="append", default=[], help="random_gguf shape name (repeatable)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n-batch", type=int, default=2048)
    parser.add_argument("--dtype", default="f16")
    parser.add_argument("--fidelity-model", default=None, help="a real model (registry name or path) for fidelity")
    parser.add_argument("--gpu-layers", default="all", help="all (default), or none for a dry run on the CPU")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if options.gpu_layers != "none" and not gpu_offload_supported():
        raise SystemExit("this llama-cpp-python build has no GPU backend (see README: the CUDA install)")
    options.out.mkdir(parents=True, exist_ok=True)
    options.workdir.mkdir(parents=True, exist_ok=True)
    corpus = corpus_text()
    meta = machine_info(threads=0)
    meta["gpu"] = gpu_name()
    report: dict[str, Any] = {"meta": meta, "rows": [], "paper": PAPER}
    if options.fidelity_model:
        report["fidelity"] = fidelity(options.fidelity_model, corpus)
        logger.info("fidelity: %s", json.dumps(report["fidelity"]))
    for shape in options.shape:
        started = time.perf_counter()
        path = write_random_model(shape, options.tokenizer, options.workdir / f"random-{shape}-{options.dtype}.gguf",
                                  dtype=options.dtype)
        logger.info("wrote %s in %.1f s", path, time.perf_counter() - started)
        report["rows"] += measure_shape(path, options.sizes, options.runs, corpus, options.n_batch, options.gpu_layers)
        (options.out / "gpu_results.json").write_text(json.dumps(report, indent=1, default=str))
        path.unlink()  # the disk holds one large model at a time
    (options.out / "gpu_results.json").write_text(json.dumps(report, indent=1, default=str))
    table = markdown(report["rows"], meta)
    (options.out / "gpu_results.md").write_text(table)
    print(table)
    if "fidelity" in report:
        print(json.dumps(report["fidelity"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
