"""Comparing two greedy answers to the same prompt computed in different ways (batched and alone, say) where
llama.cpp may round differently in the last bits: the answers must agree token for token, with log-probabilities
within ``LOGPROB_TOLERANCE``, up to the first place where the model hesitated between two tokens (their
log-probabilities within ``TIE_TOLERANCE`` of each other); there each may have picked the other's runner-up, and
what follows is not compared. Answers computed wrongly (wrong cells, positions or sequences) differ long before a
near-tie, or with log-probabilities far apart: this fails them. (vLLM's ``check_logprobs_close`` is the model.)

The answers must have been asked with ``top_logprobs`` >= 2.
"""

from __future__ import annotations

from collections.abc import Sequence

from pccpu.generation.logprobs import TokenLogprob

# measured on SmolLM2-135M (Q4) on an AMD EPYC (AVX2) VM, six chats of 32 tokens batched against alone: the same
# token's log-probability drifted by up to 0.17 nats before the answers parted, and they parted where the two best
# tokens were 0.03-0.22 nats apart (a wrong cell or position moves them by whole nats within a few tokens)
LOGPROB_TOLERANCE = 0.3  # nats: the same token's log-probability in both answers
TIE_TOLERANCE = 0.5  # nats: how close the two best tokens were where the answers part


def assert_greedy_close(expected: Sequence[TokenLogprob] | None, actual: Sequence[TokenLogprob] | None,
                        label: str = "") -> None:
    assert expected is not None and actual is not None, "ask both answers with top_logprobs"
    for i, (want, got) in enumerate(zip(expected, actual, strict=False)):
        where = f"{label} token {i}"
        if want.token != got.token:
            assert {got.token, want.token} <= {t.token for t in want.top} & {t.token for t in got.top}, (
                f"{where}: {got.piece!r} instead of {want.piece!r}, and not a runner-up")
            runner_up = next(t.logprob for t in want.top if t.token == got.token)
            assert want.logprob - runner_up < TIE_TOLERANCE, (
                f"{where}: {got.piece!r} instead of {want.piece!r}, which was {want.logprob - runner_up:.3f} "
                "nats more likely: not a near-tie")
            return
        assert abs(want.logprob - got.logprob) < LOGPROB_TOLERANCE, (
            f"{where} {want.piece!r}: log-probability {got.logprob:.4f} against {want.logprob:.4f}")
    if len(expected) != len(actual):  # one ended (end of generation, not reported) where the other went on
        longer = expected if len(expected) > len(actual) else actual
        went_on = longer[min(len(expected), len(actual))]
        runner_up = max((t.logprob for t in went_on.top if t.token != went_on.token), default=float("-inf"))
        assert went_on.logprob - runner_up < TIE_TOLERANCE, (
            f"{label} {len(actual)} tokens against {len(expected)}, and {went_on.piece!r} was no near-tie")


def assert_answers_close(expected: Sequence[object], actual: Sequence[object]) -> None:
    """``assert_greedy_close`` for lists of Results (their ``logprobs``), pairwise."""
    assert len(expected) == len(actual)
    for n, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert_greedy_close(getattr(want, "logprobs", None), getattr(got, "logprobs", None), f"answer {n}:")
