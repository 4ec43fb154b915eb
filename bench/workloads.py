"""The three benchmark workloads, as PML generated in code. Each has a 16-token question that is never cached.

- ``prefix``: one long document module first, then the question (what every prefix cache handles).
- ``modular``: three documents of size/2 tokens; the prompt picks the second and third (not the first), so the cached
  context is ``size`` tokens that do not start the schema (what a prefix cache cannot reuse). Each document carries
  a planted fact, asked about by the retrieval-accuracy questions (``retrieval.py``).
- ``parameterized``: one template module of ``size`` tokens with a parameter in its middle, filled per request.

Each workload also has a *previous* prompt: what a user of a prefix cache (llama-cpp-python's) would have sent just
before, and so what such a cache is warmed with: the same document with another question (prefix), another choice of
documents (modular), another argument (parameterized).
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from pccpu.bench.corpus import Detokenize, Tokenize, documents, exact_tokens_text
from pccpu.bench.retrieval import plant_facts, questions

WORKLOADS = ("prefix", "modular", "parameterized")
QUESTION_TOKENS = 16
PARAMETER_LENGTH = 8
SYSTEM_TEXT = "You answer questions about the documents below. Quote them where you can."
QUESTIONS = (
    "What is the single most important claim the author makes in these documents, and why does he believe it "
    "holds for most people who try it?",
    "Which example in the text best supports its main argument, and what would a skeptical reader say about that "
    "example in reply?",
)
ARGUMENTS = ("Ada Lovelace", "Grace Hopper")


@dataclass(frozen=True)
class Workload:
    name: str
    size: int  # nominal cached tokens (documents' text)
    schema_name: str
    schema: str  # PML
    prompt: str  # PML: the measured request
    previous: str  # PML: the request sent before it (warms prefix caches)
    n_ctx: int  # context size that holds the whole schema and the request
    retrieval: tuple[tuple[str, str], ...] = ()  # (prompt PML, expected answer): planted facts (retrieval.py)

    @property
    def key(self) -> str:
        return f"{self.name}-{self.size}"


def question_text(index: int, tokenize: Tokenize, detokenize: Detokenize) -> str:
    return exact_tokens_text(QUESTIONS[index % len(QUESTIONS)], QUESTION_TOKENS, tokenize, detokenize)


def _round_ctx(tokens: int) -> int:
    return max(512, -(-tokens // 256) * 256)


def _schema(name: str, body: str) -> str:
    return f'<schema name="{name}"><system>{escape(SYSTEM_TEXT)} {body}</system></schema>'


def _prompt(schema: str, refs: str, question: str) -> str:
    return f'<prompt schema="{schema}">{refs}<user>{escape(question)}</user></prompt>'


def build_workload(name: str, size: int, corpus: str, tokenize: Tokenize, detokenize: Detokenize) -> Workload:
    """The workload ``name`` with ``size`` cached document tokens, cut from ``corpus`` with the model's tokenizer."""
    q_now = question_text(0, tokenize, detokenize)
    q_before = question_text(1, tokenize, detokenize)
    schema_name = f"bench-{name}-{size}"
    overhead = 256 + 2 * QUESTION_TOKENS
    if name == "prefix":
        (doc,) = documents(corpus, 1, size, tokenize, detokenize)
        schema = _schema(schema_name, f'<module name="doc">{escape(doc)}</module>')
        prompt = _prompt(schema_name, "<doc/>", q_now)
        previous = _prompt(schema_name, "<doc/>", q_before)
        n_ctx = _round_ctx(size + overhead)
    elif name == "modular":
        half = size // 2
        # each document carries a planted fact (one sentence, ~15 tokens) for the retrieval-accuracy task
        docs = plant_facts(documents(corpus, 3, half, tokenize, detokenize, first=1))
        body = " ".join(f'<module name="doc{i}">{escape(d)}</module>' for i, d in enumerate(docs))
        schema = _schema(schema_name, body)
        prompt = _prompt(schema_name, "<doc1/><doc2/>", q_now)
        previous = _prompt(schema_name, "<doc0/><doc2/>", q_before)
        n_ctx = _round_ctx(3 * half + 3 * 16 + overhead)
        retrieval = tuple((_prompt(schema_name, "<doc1/><doc2/>", q), code) for q, code in questions([1, 2]))
    elif name == "parameterized":
        (doc,) = documents(corpus, 1, size, tokenize, detokenize, first=4)
        words = doc.split(" ")
        head, tail = " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])
        # cut at a word: the halves may tokenize to a token or two more than the whole
        body = (f'<module name="letter">{escape(head)} This letter is addressed to '
                f'<parameter name="reader" length="{PARAMETER_LENGTH}"/>. {escape(tail)}</module>')
        schema = _schema(schema_name, body)
        prompt = _prompt(schema_name, f"<letter reader={quoteattr(ARGUMENTS[0])}/>", q_now)
        previous = _prompt(schema_name, f"<letter reader={quoteattr(ARGUMENTS[1])}/>", q_before)
        n_ctx = _round_ctx(size + PARAMETER_LENGTH + overhead)
    else:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return Workload(name, size, schema_name, schema, prompt, previous, n_ctx,
                    retrieval if name == "modular" else ())
