"""Retrieval accuracy next to speed: facts planted in documents, asked about, answered by full prefill and from the
cache, so a speedup is never reported without the quality it costs.

The modular workload (``workloads.py``: three documents of ``size / 2`` tokens of real text, the prompt picks
documents 1 and 2, a layout a prefix cache cannot reuse) carries one planted sentence per document, "The access code
for the <gate> gate is <code>.", at a different depth (a quarter, a half, three quarters in). The questions ask for
the code of each picked document's gate; an answer is correct when its greedy continuation contains the code. Both
answers also give their first-token logits, so the first-token KL and top-1 agreement against full prefill come
with them at no extra cost.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pccpu.bench.systems import first_token_kl

GATES = (("north", "4817"), ("east", "2390"), ("south", "7152"))
DEPTHS = (0.25, 0.5, 0.75)


def fact(index: int) -> str:
    gate, code = GATES[index]
    return f"The access code for the {gate} gate is {code}."


def plant(document: str, sentence: str, depth: float) -> str:
    """Insert ``sentence`` at the first sentence end after ``depth`` of the document (or at that word)."""
    at = int(len(document) * depth)
    end = document.find(". ", at)
    cut = end + 2 if end != -1 else document.find(" ", at) + 1
    return f"{document[:cut]}{sentence} {document[cut:]}"


def plant_facts(docs: list[str]) -> list[str]:
    """Document i gets fact i at depth i (at most three documents)."""
    return [plant(d, fact(i), DEPTHS[i]) for i, d in enumerate(docs)]


def questions(picked: list[int]) -> list[tuple[str, str]]:
    """(question text, expected code) for the picked documents' facts."""
    return [(f"What is the access code for the {GATES[i][0]} gate? Reply with the code only.", GATES[i][1])
            for i in picked]


def run_retrieval(pc: Any, prompts: list[tuple[str, str]], max_tokens: int = 24) -> dict[str, Any]:
    """Ask every (prompt PML, expected code) by full prefill and from the cache (``pc``: a PromptCache with the
    schema added); the scores. Greedy: small models restate the question first, so the code comes late."""
    answers = []
    for prompt, code in prompts:
        full = pc.ask(prompt, cache=False, max_tokens=max_tokens, keep_logits=True).result()
        cached = pc.ask(prompt, max_tokens=max_tokens, keep_logits=True).result()
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
