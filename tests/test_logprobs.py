"""Log-probabilities of generated tokens (``pccpu/generation/logprobs.py``, ``top_logprobs`` on every answer,
``logprobs`` / ``top_logprobs`` on the server's chat completions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from greedy import assert_greedy_close

from pccpu.errors import ConfigError, OptionError
from pccpu.generation.logprobs import MAX_TOP_LOGPROBS, TokenLogprob, check_top_logprobs, token_logprob
from pccpu.service import GenerationOptions, PromptCache


def piece(token: int) -> bytes:
    return f"<{token}>".encode()


def test_token_logprob_is_a_log_softmax_with_the_best_first() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, 1000).astype(np.float32)
    logits[[7, 9]] = logits.max() + 1  # a tie for the best: the lower id comes first
    lp = token_logprob(logits, 123, top=5, piece=piece)
    reference = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    assert lp.token == 123 and lp.piece == b"<123>" and lp.logprob == pytest.approx(reference[123], abs=1e-9)
    assert [t.token for t in lp.top[:2]] == [7, 9]
    assert [t.token for t in lp.top] == [int(i) for i in np.argsort(-reference, kind="stable")[:5]]
    assert [t.logprob for t in lp.top] == pytest.approx(sorted(reference, reverse=True)[:5], abs=1e-9)
    everything = token_logprob(logits, 0, top=logits.size, piece=piece)
    assert np.exp([t.logprob for t in everything.top]).sum() == pytest.approx(1.0, abs=1e-9)
    assert token_logprob(logits, 0, top=0, piece=piece).top == ()


def test_huge_logits_do_not_overflow() -> None:
    lp = token_logprob(np.array([1e30, 0.0, -1e30], dtype=np.float32), 1, top=2, piece=piece)
    assert lp.top[0].logprob == 0.0 and lp.logprob == pytest.approx(-1e30) and np.isfinite(lp.top[1].logprob)


@pytest.mark.parametrize("bad", [-1, MAX_TOP_LOGPROBS + 1, 2.0, True, "3"])
def test_bad_top_logprobs_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="top_logprobs must be an integer from 0 to 20"):
        check_top_logprobs(bad)
    with pytest.raises(OptionError, match="top_logprobs"):
        GenerationOptions(top_logprobs=bad)  # type: ignore[arg-type]


def test_greedy_close_fails_answers_that_part_without_a_near_tie() -> None:
    """The comparison the batching tests rely on can fail: a different token where the model was sure."""
    def step(token: int, logprob: float, runner_up: int, runner_logprob: float) -> TokenLogprob:
        return TokenLogprob(token, piece(token), logprob, (TokenLogprob(token, piece(token), logprob),
                                                          TokenLogprob(runner_up, piece(runner_up), runner_logprob)))

    sure = [step(1, -0.01, 2, -5.0), step(3, -0.7, 4, -0.75)]
    assert_greedy_close(sure, [step(1, -0.02, 2, -5.0), step(4, -0.7, 3, -0.72)])  # parted at a near-tie
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_greedy_close(sure, [step(2, -0.01, 1, -5.0), step(3, -0.7, 4, -0.75)])
    with pytest.raises(AssertionError, match="log-probability"):
        assert_greedy_close(sure, [step(1, -1.5, 2, -5.0), step(3, -0.7, 4, -0.75)])
    with pytest.raises(AssertionError, match="no near-tie"):
        assert_greedy_close(sure, [])  # ended where the model was sure to go on
    assert_greedy_close(sure, sure[:1])  # ... but ending at a near-tie (-0.7 against -0.75) is allowed


def test_real_model_answers_carry_their_logprobs(default_model_path: Path, tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    with PromptCache(str(default_model_path), n_ctx=1024, n_threads=2, store_dir=tmp_path) as pc:
        result = pc.chat(messages, max_tokens=8, top_logprobs=3, keep_logits=True, session=pc.session()).result()
        again = pc.chat(messages, max_tokens=8, top_logprobs=3, session=pc.session()).result()
        plain = pc.chat(messages, max_tokens=8, session=pc.session()).result()
    assert plain.logprobs is None and plain.text == result.text and plain.to_dict()["logprobs"] is None
    as_json = json.loads(json.dumps(result.to_dict()))["logprobs"]  # Result.to_dict stays JSON-ready
    assert [e["token"] for e in as_json] == [lp.token for lp in result.logprobs or ()]
    assert "".join(e["piece"] for e in as_json) == result.text and len(as_json[0]["top"]) == 3
    assert result.logprobs is not None and len(result.logprobs) == result.generated_tokens == 8
    assert b"".join(lp.piece for lp in result.logprobs).decode() == result.text
    for lp in result.logprobs:  # greedy: the chosen token is the most likely one
        assert len(lp.top) == 3 and lp.top[0].token == lp.token and lp.top[0].logprob == lp.logprob
        assert lp.logprob <= 0 and lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
    first = result.first_logits.astype(np.float64)
    log_total = first.max() + np.log(np.exp(first - first.max()).sum())
    assert result.logprobs[0].logprob == pytest.approx(first[result.logprobs[0].token] - log_total, abs=1e-6)
    # the same prompt from the store, exact reuse: the same cells and logits, so the same log-probabilities
    assert again.cached_tokens > 0 and again.logprobs == result.logprobs
