"""Per-request overhead of the request path: everything but the restore copies, the decode and the first sample.

    python -m pccpu.bench.overhead [--model smollm2] [--modules 10] [--runs 50]

A schema of ``--modules`` small documents, a prompt that includes them all and asks one short question. Each run
answers it with ``max_tokens=1`` from RAM, assembled from the module store (no session reuse), and
overhead = TTFT - restore_ms - decode_ms (what remains: parsing, planning, store lookups, sequence bookkeeping,
tracing, result building, the first sample). Prints the medians as JSON; one warm-up run is not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from pccpu.service import PromptCache

DOC = ("Note {i}: the committee met on day {i} and agreed on item {i}. The minutes list who attended, what was "
       "decided and what is left for the next meeting, with the dates of the follow-ups.")


def schema(n: int) -> str:
    docs = "\n".join(f'<module name="d{i}">{DOC.format(i=i)}</module>' for i in range(n))
    return f'<schema name="overhead"><system>You answer from the notes.</system><user>\n{docs}\n</schema>'


def prompt(n: int) -> str:
    refs = "".join(f"<d{i}/>" for i in range(n))
    return f'<prompt schema="overhead">{refs}\nWhat was decided?</user></prompt>'


def measure(model: str | None, modules: int, runs: int, threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as store, PromptCache(model, n_ctx=4096, n_threads=threads, store_dir=store,
                                                            reuse_previous=False) as pc:
        pc.add_schema(schema(modules))
        text = prompt(modules)
        pc.warm_up()
        pc.ask(text, max_tokens=1).result()
        samples = [pc.ask(text, max_tokens=1).result() for _ in range(runs)]
        tokens = samples[0].cached_tokens, samples[0].uncached_tokens
    overhead = [r.ttft_ms - r.timings.restore_ms - r.timings.decode_ms for r in samples]
    return {
        "modules": modules, "runs": runs, "cached_tokens": tokens[0], "uncached_tokens": tokens[1],
        "ttft_ms": statistics.median(r.ttft_ms for r in samples),
        "restore_ms": statistics.median(r.timings.restore_ms for r in samples),
        "decode_ms": statistics.median(r.timings.decode_ms for r in samples),
        "overhead_ms": statistics.median(overhead),
        "plan_ms": statistics.median(r.timings.plan_ms for r in samples),
        "lookup_ms": statistics.median(r.timings.lookup_ms for r in samples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="registry name or .gguf path (default: the registry's)")
    parser.add_argument("--modules", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.model, args.modules, args.runs, args.threads), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
