"""Fuzz target for the PML parser and the prompt path: parse_schema, build_layout, parse_prompt, resolve_prompt on
mutated shipped documents, with a fake tokenizer (no model). Anything but a PccpuError is a finding.

    python fuzz/fuzz_pml.py --seconds 30          # atheris (coverage-guided) when importable, else random mutations
    python fuzz/fuzz_pml.py --seconds 30 --plain  # the random-mutation loop even when atheris is there

atheris (``pip install atheris``; wheels exist for CPython 3.8-3.11 on Linux x86-64) takes its usual arguments
after ``--``, for example ``-- -max_total_time=60 corpus/``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # pml_fakes

from pml_fakes import BracketRoles, WordTokenizer  # noqa: E402

from pccpu.errors import PccpuError  # noqa: E402
from pccpu.pml import build_layout, parse_prompt, parse_schema, resolve_prompt  # noqa: E402

SCHEMA_DIR = ROOT / "schemas"
# A lone surrogate ("\udcff") is left out: it makes expat's str->UTF-8 step raise UnicodeEncodeError (a known
# finding, tests/test_fuzz.py::test_lone_surrogate_is_a_pml_error); kept out so the fuzzer can find anything else.
FRAGMENTS = (
    "<", ">", "&", "</", "/>", "<module name='x'>", "</module>", "<union>", "</union>", "<union scaffold='x'>",
    "<parameter name='p' length='3'/>", "<user>", "</user>", "<system/>", "<assistant>", "<![CDATA[", "]]>",
    "<!--", "-->", "<?x ?>", "&lt;", "&amp;", "&#0;", "&#x110000;", "&lol;", "<!DOCTYPE x>",
    "<!ENTITY a 'b'>", "\x00", "\ufdd0", "\ufdd1", '"', "'", "=", " src='../../etc/passwd'",
    " cache='maybe'", " len='0'", " length='-1'", " name='1bad'", "\n", "é", "\U0001f600",
)


def seeds() -> list[tuple[str, str]]:
    """(schema text, prompt text) pairs from schemas/ (each prompt with its schema)."""
    out = []
    for prompt_path in sorted(SCHEMA_DIR.glob("*prompt*.xml")):
        prompt = prompt_path.read_text()
        name = parse_prompt(prompt).schema
        out.append(((SCHEMA_DIR / f"{name}.xml").read_text(), prompt))
    return out


def mutate(text: str, rng: random.Random) -> str:
    """1 to 4 mutations: byte flips, truncation, deletion, duplication, insertion of markup fragments."""
    data = text
    for _ in range(rng.randint(1, 4)):
        how = rng.randrange(6)
        i = rng.randint(0, len(data))
        if how == 0 and data:  # flip bits of one character's UTF-8 bytes (may become invalid: decoded leniently)
            j = min(i, len(data) - 1)
            raw = bytearray(data[j].encode("utf-8", "surrogatepass"))
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            data = data[:j] + raw.decode("utf-8", "replace") + data[j + 1 :]
        elif how == 1:
            data = data[:i]
        elif how == 2:
            data = data[:i] + data[rng.randint(i, min(len(data), i + 40)) :]
        elif how == 3:
            j = rng.randint(i, min(len(data), i + 60))
            data = data[:j] + data[i:j] + data[j:]
        else:
            data = data[:i] + rng.choice(FRAGMENTS) + data[i:]
    return data


def check(schema_text: str, prompt_text: str) -> None:
    """Run the whole text path; only PccpuError may come out."""
    tok, roles = WordTokenizer(), BracketRoles()
    try:
        layout = build_layout(parse_schema(schema_text, source="fuzz.xml", allowed_roots=[SCHEMA_DIR]), tok, roles,
                              bos_tokens=(1,), n_ctx=1 << 16)
    except PccpuError:
        layout = None
    try:
        prompt = parse_prompt(prompt_text)
        if layout is not None:
            resolve_prompt(layout, prompt, tok, roles, n_ctx=1 << 16)
    except PccpuError:
        pass


def one_input(data: bytes, pairs: list[tuple[str, str]]) -> None:
    """atheris entry: the first bytes pick a seed pair and which side gets the fuzzer's text."""
    if len(data) < 2:
        return
    schema, prompt = pairs[data[0] % len(pairs)]
    text = data[2:].decode("utf-8", "replace")
    if data[1] & 1:
        check(text, prompt)
    else:
        check(schema, text)


def plain_loop(seconds: float, seed: int) -> int:
    """Random mutations until the time is up; the number of cases run. Raises on a finding."""
    pairs = seeds()
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    cases = 0
    while time.monotonic() < deadline:
        schema, prompt = rng.choice(pairs)
        if rng.random() < 0.5:
            schema = mutate(schema, rng)
        else:
            prompt = mutate(prompt, rng)
        try:
            check(schema, prompt)
        except Exception:
            print(f"finding after {cases} cases; input:\n--- schema\n{schema!r}\n--- prompt\n{prompt!r}",
                  file=sys.stderr)
            raise
        cases += 1
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="random mutations even if atheris is importable")
    args, rest = parser.parse_known_args(argv)
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        atheris = None
    if atheris is None or args.plain:
        cases = plain_loop(args.seconds, args.seed)
        print(f"{cases} cases in {args.seconds:.0f} s, no finding")
        return 0
    pairs = seeds()
    atheris.instrument_all()  # coverage feedback for everything imported (pccpu.pml included)
    fuzz_args = [sys.argv[0], f"-max_total_time={int(args.seconds)}", *[a for a in rest if a != "--"]]
    atheris.Setup(fuzz_args, lambda data: one_input(data, pairs))
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
