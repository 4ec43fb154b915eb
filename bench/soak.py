"""Soak: a long stream of mixed prompts on one PromptCache, with the RSS curve and prefix-layout fidelity.

    python bench/soak.py --prompts 300          # the default model, a private store under a temporary folder

The stream mixes the shipped schemas (travel: unions and parameters; persona: unions; demo: one long document;
codebase: src= files) with a small inline schema; hits come from RAM, from disk (the RAM tier is cleared every few
prompts, as after a restart) and misses from schemas added without encoding. A *prefix-layout* prompt includes
every module of a union-free schema in schema order, nothing skipped: in sequential mode its cached answer must be
the full-prefill answer (``ask(cache=False)``), which is checked for each of them. RSS is sampled every
``--rss-every`` prompts. tests/test_robustness.py runs about 50 prompts of this; the report is printed as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

NOTES_SCHEMA = """<schema name="notes">
<system>You are a helpful assistant who summarises notes.</system>
<user>Here are my notes.
<module name="mon">Monday: the bakery on Elm Street opened at six and sold out of rye bread by nine.</module>
<module name="tue">Tuesday: heavy rain flooded the underpass near the station and buses were rerouted.</module>
<module name="wed">Wednesday: the council voted to repaint the old water tower in blue and white.</module>
</schema>"""

QUESTIONS = (
    "Summarise this in one sentence.",
    "What is the most important fact here?",
    "List two details.",
    "Answer briefly: what happens first?",
    "Write a title for this.",
)
DEMO_QUESTIONS = (
    "What code do I enter to restore the factory settings of the H-300?",
    "How long does a soil probe battery last?",
    "Where is the H-300 assembled?",
    "How many custom programs can the controller store?",
)
CITIES = ("Chicago", "Lyon", "Osaka", "Porto", "Bergen")
DESTINATIONS = ("lisbon", "kyoto", "oaxaca")
TRAITS = {
    "temperament": ("default", "calm", "restless", "wry"),
    "sociability": ("default", "outgoing", "reserved"),
    "outlook": ("default", "optimist", "skeptic"),
    "work": ("default", "lighthouse-keeper", "pastry-chef", "cartographer"),
}


@dataclass(frozen=True)
class SoakPrompt:
    label: str
    text: str
    prefix: bool  # every module of a union-free schema, in order: the cached answer must equal full prefill


def schema_sources() -> dict[str, str | Path]:
    """Schema name -> a path (shipped schemas) or PML text (the inline one)."""
    return {
        "travel": SCHEMA_DIR / "travel.xml",
        "persona": SCHEMA_DIR / "persona.xml",
        "demo": SCHEMA_DIR / "demo.xml",
        "codebase": SCHEMA_DIR / "codebase.xml",
        "notes": NOTES_SCHEMA,
    }


def build_prompts(n: int, seed: int = 0) -> list[SoakPrompt]:
    """``n`` prompts, cycling over the schemas so the first few prompts touch all of them."""
    rng = random.Random(seed)
    makers = [_travel, _notes, _persona, _demo, _codebase]
    return [makers[i % len(makers)](rng, i) for i in range(n)]


def _travel(rng: random.Random, i: int) -> SoakPrompt:
    question = rng.choice(QUESTIONS)
    if rng.random() < 0.5:
        inner = f'<domestic city="{rng.choice(CITIES)}"/>'
    else:
        inner = f'<overseas budget="{rng.randint(50, 300)} euros"><{rng.choice(DESTINATIONS)}/></overseas>'
    days = rng.choice(("two days", "a week", "ten days"))
    text = f'<prompt schema="travel"><trip duration="{days}">{inner}</trip><user>{question}</user></prompt>'
    return SoakPrompt(f"travel-{i}", text, prefix=False)


def _notes(rng: random.Random, i: int) -> SoakPrompt:
    question = rng.choice(QUESTIONS)
    if i % 2 == 0:  # all modules in schema order: a prefix layout
        return SoakPrompt(f"notes-prefix-{i}",
                          f'<prompt schema="notes"><mon/><tue/><wed/>\n{question}</user></prompt>', prefix=True)
    picked = rng.sample(["mon", "tue", "wed"], rng.randint(1, 2))
    refs = "".join(f"<{m}/>" for m in ("mon", "tue", "wed") if m in picked)
    return SoakPrompt(f"notes-{i}", f'<prompt schema="notes">{refs}\n{question}</user></prompt>', prefix=False)


def _persona(rng: random.Random, i: int) -> SoakPrompt:
    refs = "".join(f"<{trait}><{rng.choice(values)}/></{trait}>" for trait, values in TRAITS.items()
                   if rng.random() < 0.7)
    return SoakPrompt(f"persona-{i}", f'<prompt schema="persona">{refs}<user>{rng.choice(QUESTIONS)}</user></prompt>',
                      prefix=False)


def _demo(rng: random.Random, i: int) -> SoakPrompt:
    question = rng.choice(DEMO_QUESTIONS)
    return SoakPrompt(f"demo-prefix-{i}", f'<prompt schema="demo"><manual/><user>{question}</user></prompt>',
                      prefix=True)


def _codebase(rng: random.Random, i: int) -> SoakPrompt:
    files = ["shapes.py", "flags.py", "canvas.py", "snippet", "notes"]
    question = rng.choice(QUESTIONS)
    if i % 2 == 0:
        refs, prefix = "".join(f"<{f}/>" for f in files), True
    else:
        picked = rng.sample(files, rng.randint(1, 3))
        refs, prefix = "".join(f"<{f}/>" for f in files if f in picked), False
    return SoakPrompt(f"codebase-{i}", f'<prompt schema="codebase">{refs}<user>{question}</user></prompt>', prefix)


@dataclass
class SoakReport:
    prompts: int = 0
    errors: list[str] = field(default_factory=list)
    prefix_checked: int = 0
    prefix_equal: int = 0
    prefix_mismatches: list[str] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)
    rss_mb: list[tuple[int, float]] = field(default_factory=list)  # (prompts done, RSS in MiB)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "errors": self.errors, "prefix_checked": self.prefix_checked,
                "prefix_equal": self.prefix_equal, "prefix_mismatches": self.prefix_mismatches,
                "sources": self.sources, "rss_mb": self.rss_mb, "seconds": round(self.seconds, 1)}


def add_schemas(pc: Any) -> None:
    """Add every soak schema; the shipped ones without encoding, so their first prompts are misses."""
    for name, source in schema_sources().items():
        pc.add_schema(source, encode=name in ("notes", "persona"))


def run_soak(pc: Any, prompts: list[SoakPrompt], *, max_tokens: int = 8, rss_every: int = 10,
             clear_ram_every: int = 7, log: Any = None) -> SoakReport:
    """Answer every prompt on ``pc`` (a PromptCache in sequential mode with its schemas added)."""
    report = SoakReport()
    process = psutil.Process()
    began = time.perf_counter()
    for index, prompt in enumerate(prompts, start=1):
        try:
            result = pc.ask(prompt.text, max_tokens=max_tokens).result()
            for use in result.modules:
                report.sources[use.source] = report.sources.get(use.source, 0) + 1
            if prompt.prefix:
                baseline = pc.ask(prompt.text, cache=False, max_tokens=max_tokens).result()
                report.prefix_checked += 1
                if baseline.text == result.text:
                    report.prefix_equal += 1
                else:
                    report.prefix_mismatches.append(f"{prompt.label}: {result.text!r} != {baseline.text!r}")
        except Exception as exc:  # recorded, the soak goes on
            report.errors.append(f"{prompt.label}: {type(exc).__name__}: {exc}")
        report.prompts = index
        if clear_ram_every and index % clear_ram_every == 0:
            pc.clear_store(disk=False)  # as after a restart: the next hits come from disk
        if index % rss_every == 0:
            gc.collect()
            rss = process.memory_info().rss / 2**20
            report.rss_mb.append((index, round(rss, 1)))
            if log is not None:
                log(f"{index:5d} prompts  RSS {rss:8.1f} MiB  errors {len(report.errors)}  "
                    f"prefix equal {report.prefix_equal}/{report.prefix_checked}")
    report.seconds = time.perf_counter() - began
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--model", default=None, help="registry name or .gguf path (default: the default model)")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rss-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from pccpu.service import PromptCache

    with tempfile.TemporaryDirectory(prefix="pccpu-soak-") as store, \
            PromptCache(model=args.model, n_ctx=args.n_ctx, n_threads=args.threads, mode="sequential",
                        store_dir=store) as pc:
        add_schemas(pc)
        report = run_soak(pc, build_prompts(args.prompts, args.seed), max_tokens=args.max_tokens,
                          rss_every=args.rss_every, log=lambda line: print(line, flush=True))
    summary = report.as_dict()
    if report.rss_mb:
        first, last = report.rss_mb[0][1], report.rss_mb[-1][1]
        summary["rss_growth_pct"] = round(100 * (last - first) / first, 1)
    print(json.dumps(summary, indent=2))
    return 0 if not report.errors and report.prefix_equal == report.prefix_checked else 1


if __name__ == "__main__":
    sys.exit(main())
