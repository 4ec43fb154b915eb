"""The ``pccpu-disk`` system: a fresh process answers from the disk tier of a store another process wrote.

``python -m pccpu.bench.disk_worker JOB.json`` opens a ``PromptCache`` with the job's settings on the job's store,
adds the schema without loading anything (``encode=False``), touches the model weights with one decode (so page
faults of the memory-mapped model count as model load, not as TTFT), then asks the prompt ``asks`` times, emptying
the RAM tier before each ask so every answer reads its modules from disk. It prints one JSON line: the model load
time, each answer's sample, and the process's peak RSS.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    started = time.perf_counter()
    from pccpu.bench.machine import peak_rss_bytes
    from pccpu.bench.systems import RunSettings, result_sample
    from pccpu.service import PromptCache

    job = json.loads(Path(argv[0]).read_text())
    settings = RunSettings(**job["settings"])
    samples = []
    # a fresh process has no previous answer to reuse: every ask restores its modules from the disk tier
    with PromptCache(settings.model_path, reuse_previous=False, **settings.prompt_cache_kwargs()) as pc:
        pc.add_schema(job["schema"], encode=False)
        pc.warm_up()
        load_ms = (time.perf_counter() - started) * 1000
        for _ in range(int(job["asks"])):
            pc.clear_store(ram=True, disk=False)
            sample = result_sample(pc.ask(job["prompt"], max_tokens=1).result())
            if sample["sources"] != ["disk"]:
                logger.warning("disk-tier run served modules from %s", sample["sources"])
            samples.append(sample)
    sys.stdout.write(json.dumps({"load_ms": load_ms, "samples": samples, "peak_rss_bytes": peak_rss_bytes()}) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
