"""Fidelity of cached answers against full prefill, per context mode, on modular layouts.

For random prompts over example schemas (a union member chosen, modules skipped, parameters filled), compare the
cached answer with the full-prefill answer of the same tokens: top-1 agreement and KL divergence of the first
token's distribution, and greedy continuation agreement (exact match, and the share of tokens equal before the first
difference). ``python -m pccpu.bench.fidelity --prompts 20`` prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pccpu.pml import NestedModule, ParameterSlot, SchemaLayout, UnionLayout
from pccpu.service import ModuleArgs, PromptCache, build_prompt_xml

logger = logging.getLogger(__name__)

SCHEMAS = {
    "persona": "Introduce yourself in three sentences.",
    "travel": "Write the itinerary, one short paragraph per day.",
    "codebase": "Which file defines the drawing surface, and what does it do?",
    "demo": "What code restores the factory settings, and how often is the mister filter cleaned?",
}
WORDS = ["two days", "a week", "Lisbon", "Chicago", "Oslo", "100 euros", "ten days", "Nairobi", "5 dollars"]


def random_selection(layout: SchemaLayout, rng: random.Random, path: str = "") -> dict[str, Any]:
    """Module refs below ``path``: nested modules kept with p=0.6, one union member (or none, p=0.2)."""
    selection: dict[str, Any] = {}
    for part in layout.modules[path].body:
        if isinstance(part, NestedModule) and rng.random() < 0.6:
            selection[layout.modules[part.path].name] = _ref(layout, part.path, rng)
        elif isinstance(part, UnionLayout) and rng.random() >= 0.2:
            member = rng.choice(part.members)
            selection[layout.modules[member].name] = _ref(layout, member, rng)
    return selection


def _ref(layout: SchemaLayout, path: str, rng: random.Random) -> ModuleArgs:
    args = {i.name: rng.choice(WORDS) for i in layout.modules[path].items if isinstance(i, ParameterSlot)}
    return ModuleArgs(args, random_selection(layout, rng, path))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = np.exp(p_logits.astype(np.float64) - p_logits.max())
    q = np.exp(q_logits.astype(np.float64) - q_logits.max())
    p /= p.sum()
    q /= q.sum()
    return float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))


def measure(mode: str, n_prompts: int, max_tokens: int, seed: int, model: str | None, store: Path) -> list[dict]:
    rows: list[dict] = []
    rng = random.Random(seed)
    with PromptCache(model, n_ctx=4096, mode=mode, store_dir=store, persist=False) as pc:
        files = resources.files("pccpu.schemas")
        layouts = {name: pc.add_schema(str(files / f"{name}.xml")) for name in SCHEMAS}
        for i in range(n_prompts):
            name = list(SCHEMAS)[i % len(SCHEMAS)]
            prompt = build_prompt_xml(name, random_selection(layouts[name], rng), SCHEMAS[name])
            base = pc.ask(prompt, cache=False, max_tokens=max_tokens, keep_logits=True).result()
            cached = pc.ask(prompt, max_tokens=max_tokens, keep_logits=True).result()
            base_logits, cached_logits = base.first_logits, cached.first_logits
            tb = pc.tokenize(base.text)
            tc = pc.tokenize(cached.text)
            same = next((k for k, (a, b) in enumerate(zip(tb, tc, strict=False)) if a != b), min(len(tb), len(tc)))
            rows.append({
                "mode": mode, "schema": name, "prompt": prompt,
                "top1_agree": int(np.argmax(base_logits) == np.argmax(cached_logits)),
                "kl": kl_divergence(base_logits, cached_logits),
                "exact": int(base.text == cached.text),
                "prefix_share": same / max(1, len(tb)),
                "cached_tokens": cached.cached_tokens, "uncached_tokens": cached.uncached_tokens,
            })
            logger.info("%s %s: top1 %d kl %.4f exact %d", mode, name, rows[-1]["top1_agree"], rows[-1]["kl"],
                        rows[-1]["exact"])
    return rows


def summarize(rows: list[dict]) -> str:
    lines = ["| mode | prompts | top-1 agreement | KL median | KL max | greedy exact | greedy tokens before 1st diff |",
             "|---|---|---|---|---|---|---|"]
    for mode in sorted({r["mode"] for r in rows}):
        rs = [r for r in rows if r["mode"] == mode]
        lines.append(
            f"| {mode} | {len(rs)} | {statistics.mean(r['top1_agree'] for r in rs):.0%} | "
            f"{statistics.median(r['kl'] for r in rs):.4f} | {max(r['kl'] for r in rs):.4f} | "
            f"{statistics.mean(r['exact'] for r in rs):.0%} | {statistics.mean(r['prefix_share'] for r in rs):.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=20, help="random prompts per mode")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = []
    for mode in ("isolated", "sequential"):
        rows += measure(mode, options.prompts, options.max_tokens, options.seed, options.model,
                        options.out / "fidelity-store")
    table = summarize(rows)
    (options.out / "fidelity.json").write_text(json.dumps(rows, indent=1))
    (options.out / "fidelity.md").write_text(table + "\n")
    print(table)
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
