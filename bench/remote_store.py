"""The remote tier (Redis) against the local ones, and encode-once-per-fleet on a shared workload.

    python -m pccpu.bench.remote_store [--store-url redis://HOST:PORT/DB] [--sizes 8,32,117] [--runs 5]
                                       [--model smollm2] [--procs 4] [--schemas 4] [--doc-tokens 1000]

Without ``--store-url`` a private ``redis-server`` is started on 127.0.0.1 and a free port (loopback), and stopped
after. Two parts (``--part``):

- ``bandwidth``: synthetic entries of each size (MiB, random bytes). Per tier, the time until the entry's bytes are
  in this process and checked: RAM (a lookup; shown as the memcpy that any restore into the KV cache does), disk
  (read + xxh3, page cache as it is: just written, so cached), remote (GET of manifest and chunks + xxh3 of each
  chunk and of the payload), remote -> local (the same, plus the copy kept on local disk, as a lookup does). Also the
  remote write (chunks + manifest, synchronous, as ``save`` does) and the disk write. Median of ``--runs`` after
  one warm-up, in MB/s (10^6 bytes).
- ``fleet``: ``--procs`` processes, each with its own store folder (a machine each), answer the same ``--schemas``
  schemas (one document of ~``--doc-tokens`` tokens of essay text each), each starting at another schema; started
  together after loading the model. Run once without the remote tier (every process encodes every schema) and once
  with it (fresh server). Reported: tokens and seconds encoded per process and in total, modules fetched from the
  server or waited for, wall time, and whether every process gave the same answers in both runs.

Prints the settings, the machine and a JSON summary. Processes share this machine's cores: with more processes than
cores, encode seconds include waiting for a core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

logger = logging.getLogger(__name__)

SYSTEM = "You answer questions about the document below."
QUESTION = "In one sentence, what is the document about?"


# -- a private server -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def private_redis(directory: Path) -> Iterator[str]:
    """``redis-server`` on 127.0.0.1 and a free port, no persistence; its URL, stopped after the block."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: apt-get install redis-server, or pass --store-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(500):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.01)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


def drop_namespace(url: str, namespace: str) -> int:
    """Delete this benchmark's keys (``pccpu:1:NAMESPACE:*``) and nothing else: the server may be a shared one."""
    import redis

    from pccpu.store.remote_format import RemoteKeys

    client = redis.Redis.from_url(url)
    names = list(client.scan_iter(match=RemoteKeys(namespace).prefix + "*", count=1000))
    for i in range(0, len(names), 1000):
        client.delete(*names[i : i + 1000])
    return len(names)


# -- part 1: bandwidth --------------------------------------------------------------------------------------------
def _median_s(action: Callable[[], object], runs: int, before: Callable[[], object] | None = None) -> float:
    times = []
    for i in range(runs + 1):  # the first is a warm-up
        if before is not None:
            before()
        started = time.perf_counter()
        action()
        if i:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def bandwidth(url: str, sizes_mib: list[int], runs: int, namespace: str) -> list[dict[str, Any]]:
    rows = []
    for size in sizes_mib:
        rows.append(bandwidth_row(url, size, runs, namespace))
        logger.info("bandwidth %d MiB: %s", size, rows[-1])
    return rows


def bandwidth_row(url: str, size_mib: int, runs: int, namespace: str) -> dict[str, Any]:
    from pccpu.store import EntryKey, EntryMeta, ModuleStore, StoredModule
    from pccpu.store.remote import RemoteTier

    fp = {"model": "bench-model", "state": "bench-state"}
    n = size_mib << 20
    payload = np.random.default_rng(size_mib).integers(0, 256, n, dtype=np.uint8)
    meta = EntryMeta(schema="bench", module=f"m{size_mib}", mode="sequential", ranges=((0, 1000),), run_bytes=(n,),
                     model=fp["model"], state=fp["state"])
    key = EntryKey(f"bench{size_mib}", 0)
    fields = meta.to_fields()
    with tempfile.TemporaryDirectory() as folder:
        remote = RemoteTier(url, namespace)

        def store(name: str) -> ModuleStore:
            return ModuleStore(directory=Path(folder) / name, namespace=namespace, ram_budget=4 * n,
                               disk_budget=64 * n, remote=remote)

        writer, reader = store("writer"), store("reader")
        writer.save(StoredModule(key, payload, meta))
        disk = writer.disk
        assert disk is not None
        target = np.empty_like(payload)
        seconds = {
            "remote_write": _median_s(lambda: remote.write(key, fields, payload), runs),
            "disk_write": _median_s(lambda: disk.write(key, fields, payload), runs),
            "remote_read": _median_s(lambda: remote.read(key, fp), runs),
            "remote_to_local": _median_s(lambda: reader.lookup(key, fp), runs, before=reader.clear),
            "disk_read": _median_s(lambda: writer.lookup(key, fp), runs, before=lambda: writer.clear(disk=False)),
            "ram_copy": _median_s(lambda: np.copyto(target, payload), runs),
            "ram_lookup": _median_s(lambda: writer.lookup(key, fp), runs),
        }
        counters = remote.counters
        if counters.corrupt or counters.evicted or remote.breaker.failures or counters.hits < 2 * (runs + 1):
            raise SystemExit(f"the bandwidth run saw remote errors or misses: {counters}, "
                             f"{remote.breaker.failures} failures")
        remote.close()
    mb = n / 1e6
    row: dict[str, Any] = {"size_mib": size_mib, "chunks": -(-n // remote.chunk_bytes),
                           "ram_lookup_ms": round(seconds.pop("ram_lookup") * 1e3, 3)}
    row.update({f"{name}_mb_s": round(mb / s) for name, s in seconds.items()})
    row["ms"] = {name: round(s * 1e3, 1) for name, s in seconds.items()}
    return row


# -- part 2: a fleet of processes -------------------------------------------------------------------------------
def fleet_schemas(count: int, doc_tokens: int) -> list[tuple[str, str]]:
    """(schema PML, prompt PML) pairs: one essay excerpt of about ``doc_tokens`` tokens each."""
    from pccpu.bench.corpus import corpus_text

    text = corpus_text()
    n_chars = doc_tokens * 4  # English prose: about 4 characters per token
    out = []
    for i in range(count):
        start = text.find(" ", (i * len(text)) // (count + 1)) + 1
        doc = text[start : start + n_chars].rsplit(" ", 1)[0]
        name = f"fleet{i}"
        schema = (f'<schema name="{name}"><system>{SYSTEM}</system><user>'
                  f'<module name="doc">{escape(doc)}</module></schema>')
        prompt = f'<prompt schema="{name}"><doc/>\n{QUESTION}</user></prompt>'
        out.append((schema, prompt))
    return out


def worker(job_path: str) -> int:
    """One machine of the fleet: load the model, wait for the go file, answer every schema; one JSON line."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pccpu.service import PromptCache

    job = json.loads(Path(job_path).read_text())
    with PromptCache(job["model"], n_ctx=job["n_ctx"], n_threads=job["threads"], store_dir=job["store"],
                     store_url=job["url"] or None, namespace=job["namespace"]) as pc:
        Path(job["ready"]).touch()
        while not Path(job["go"]).exists():
            time.sleep(0.005)
        started = time.perf_counter()
        answers = {}
        for schema, prompt in job["work"]:
            pc.add_schema(schema)
            answers[prompt] = pc.ask(prompt, max_tokens=8).result().text
        wall = time.perf_counter() - started
        stats = pc.stats()
    print(json.dumps({"wall_s": wall, "encode_tokens": stats.encode.tokens, "encode_s": stats.encode.seconds,
                      "remote_hits": stats.store.remote_hits, "fleet_waits": stats.store.fleet_waits,
                      "remote_errors": stats.store.remote_errors, "answers": answers}))
    return 0


def run_fleet(model: str, url: str, namespace: str, procs: int, work: list[tuple[str, str]], threads: int,
              n_ctx: int, folder: Path) -> list[dict[str, Any]]:
    folder.mkdir(parents=True)
    go = folder / "go"
    children = []
    for i in range(procs):
        job = {"model": model, "url": url, "namespace": namespace, "store": str(folder / f"machine{i}"),
               "threads": threads, "n_ctx": n_ctx,
               "ready": str(folder / f"ready{i}"), "go": str(go),
               "work": work[i % len(work):] + work[: i % len(work)]}  # each machine starts elsewhere
        (folder / f"job{i}.json").write_text(json.dumps(job))
        children.append(subprocess.Popen([sys.executable, "-m", "pccpu.bench.remote_store", "--worker",
                                          str(folder / f"job{i}.json")], stdout=subprocess.PIPE, text=True))
    while not all((folder / f"ready{i}").exists() for i in range(procs)):
        if any(c.poll() not in (None, 0) for c in children):
            raise SystemExit("a fleet worker failed while loading the model")
        time.sleep(0.01)
    go.touch()
    out = []
    for child in children:
        stdout, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"a fleet worker exited with {child.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def fleet(model: str, url: str, procs: int, schemas: int, doc_tokens: int, threads: int,
          namespace: str) -> dict[str, Any]:
    from pccpu.models import resolve_model

    path = str(resolve_model(model))
    work = fleet_schemas(schemas, doc_tokens)
    n_ctx = max(1024, -(-(doc_tokens * 2 + 256) // 256) * 256)
    with tempfile.TemporaryDirectory() as folder:
        local = run_fleet(path, "", namespace, procs, work, threads, n_ctx, Path(folder) / "local")
        drop_namespace(url, namespace)
        shared = run_fleet(path, url, namespace, procs, work, threads, n_ctx, Path(folder) / "remote")

    def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"encode_tokens": sum(r["encode_tokens"] for r in rows),
                "encode_s": round(sum(r["encode_s"] for r in rows), 2),
                "wall_s_max": round(max(r["wall_s"] for r in rows), 2),
                "remote_hits": sum(r["remote_hits"] for r in rows),
                "fleet_waits": sum(r["fleet_waits"] for r in rows),
                "remote_errors": sum(r["remote_errors"] for r in rows),
                "per_process": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                                 if k != "answers"} for r in rows]}

    reference = local[0]["answers"]
    same = all(r["answers"] == reference for r in [*local, *shared])
    without, with_remote = totals(local), totals(shared)
    return {"model": Path(path).name, "processes": procs, "schemas": schemas, "doc_tokens_about": doc_tokens,
            "threads_per_process": threads, "without_remote": without, "with_remote": with_remote,
            "encode_s_saved": round(without["encode_s"] - with_remote["encode_s"], 2),
            "encode_tokens_saved": without["encode_tokens"] - with_remote["encode_tokens"],
            "same_answers": same}


# -- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["--worker"]:
        return worker(args_list[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store-url", default=None, help="a Redis server to measure (default: start a private one)")
    parser.add_argument("--part", choices=["all", "bandwidth", "fleet"], default="all")
    parser.add_argument("--sizes", default="8,32,117", help="entry sizes in MiB, comma-separated")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default="smollm2", help="registry name or .gguf path")
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--schemas", type=int, default=4)
    parser.add_argument("--doc-tokens", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="threads per fleet process")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    args = parser.parse_args(args_list)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pccpu.bench.machine import cpu_model
    from pccpu.store.remote_format import DEFAULT_CHUNK_BYTES

    try:
        import hiredis  # noqa: F401  (the redis client's faster reply parser, when installed)

        parser_name = "hiredis"
    except ImportError:
        parser_name = "python"
    summary: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
                    "python": sys.version.split()[0]},
        "settings": {"sizes_mib": args.sizes, "runs": args.runs, "chunk_bytes": DEFAULT_CHUNK_BYTES,
                     "redis_parser": parser_name, "store_url": args.store_url or "private redis-server, loopback"},
    }
    print(json.dumps(summary, indent=2), flush=True)
    namespace = f"bench-{uuid.uuid4().hex[:12]}"  # this run's keys only, deleted after
    with tempfile.TemporaryDirectory() as folder, \
            (contextlib.nullcontext(args.store_url) if args.store_url else private_redis(Path(folder))) as url:
        try:
            if args.part in ("all", "bandwidth"):
                sizes = [int(s) for s in args.sizes.split(",")]
                summary["bandwidth"] = bandwidth(url, sizes, args.runs, namespace)
                print(json.dumps({"bandwidth": summary["bandwidth"]}, indent=2), flush=True)
                drop_namespace(url, namespace)
            if args.part in ("all", "fleet"):
                summary["fleet"] = fleet(args.model, url, args.procs, args.schemas, args.doc_tokens, args.threads,
                                         namespace)
                print(json.dumps({"fleet": summary["fleet"]}, indent=2), flush=True)
        finally:
            drop_namespace(url, namespace)
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
