"""Retrieval accuracy next to speed: a fact planted in a document, asked about, answered by full prefill and from the
cache, so a speedup is never reported without the quality it costs.

The schema is the modular workload's (three documents of ``size / 2`` tokens, real text); each document carries one
planted sentence, "The access code for the <gate> gate is <code>.", at a different depth (a quarter, a half, three
quarters in). The prompt picks documents 1 and 2, not 0 (a layout a prefix cache cannot reuse), and asks for the
code of each picked document's gate. An answer is correct when its greedy continuation contains the code. Both
answers also give their first-token logits, so the first-token KL and top-1 agreement against full prefill come
with them at no extra cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from pccpu.bench.corpus import Detokenize, Tokenize, documents
from pccpu.bench.systems import first_token_kl

GATES = (("north", "4817"), ("east", "2390"), ("south", "7152"))
DEPTHS = (0.25, 0.5, 0.75)
PICKED = (1, 2)
SYSTEM_TEXT = "You answer questions about the documents below. Quote them where you can."


@dataclass(frozen=True)
class RetrievalTask:
    schema_name: str
    schema: str
    questions: tuple[tuple[str, str], ...]  # (prompt PML, expected code)


def fact(index: int) -> str:
    gate, code = GATES[index]
    return f"The access code for the {gate} gate is {code}."


def plant(document: str, sentence: str, depth: float) -> str:
    """Insert ``sentence`` at the first sentence end after ``depth`` of the document (or at that word)."""
    at = int(len(document) * depth)
    end = document.find(". ", at)
    cut = end + 2 if end != -1 else document.find(" ", at) + 1
    return f"{document[:cut]}{sentence} {document[cut:]}"


def build_retrieval(size: int, corpus: str, tokenize: Tokenize, detokenize: Detokenize) -> RetrievalTask:
    """The task with ``size`` cached document tokens in the picked documents (each planted sentence adds ~15)."""
    name = f"bench-retrieval-{size}"
    docs = documents(corpus, len(GATES), size // 2, tokenize, detokenize, first=5)
    body = " ".join(f'<module name="doc{i}">{escape(plant(d, fact(i), DEPTHS[i]))}</module>'
                    for i, d in enumerate(docs))
    schema = f'<schema name="{name}"><system>{escape(SYSTEM_TEXT)} {body}</system></schema>'
    refs = "".join(f"<doc{i}/>" for i in PICKED)
    questions = tuple(
        (f'<prompt schema="{name}">{refs}<user>What is the access code for the {GATES[i][0]} gate? Reply with the '
         f"code only.</user></prompt>", GATES[i][1])
        for i in PICKED
    )
    return RetrievalTask(name, schema, questions)


def run_retrieval(pc: Any, task: RetrievalTask, max_tokens: int = 12) -> dict[str, Any]:
    """Ask every question by full prefill and from the cache (``pc``: a PromptCache); the scores."""
    pc.add_schema(task.schema)
    answers = []
    for prompt, code in task.questions:
        full = pc.ask(prompt, cache=False, max_tokens=max_tokens, keep_logits=True)
        cached = pc.ask(prompt, max_tokens=max_tokens, keep_logits=True)
        top1 = int(np.argmax(full.first_logits)) == int(np.argmax(cached.first_logits))
        answers.append({"code": code, "full": full.text, "cached": cached.text,
                        "full_correct": code in full.text, "cached_correct": code in cached.text,
                        "first_token_kl": first_token_kl(full.first_logits, cached.first_logits), "top1_agree": top1,
                        "greedy_equal": full.text == cached.text, "cached_tokens": cached.cached_tokens})
    n = len(answers)
    return {"questions": n, "answers": answers,
            "full_accuracy": sum(a["full_correct"] for a in answers) / n,
            "cached_accuracy": sum(a["cached_correct"] for a in answers) / n,
            "top1_agreement": sum(a["top1_agree"] for a in answers) / n,
            "kl_median": float(np.median([a["first_token_kl"] for a in answers])),
            "greedy_equal": sum(a["greedy_equal"] for a in answers) / n}
