"""The assistant's turn: whether a prompt ends a user turn, and the plan with the turn opened after it."""

from __future__ import annotations

import dataclasses

from pccpu.errors import LayoutOverflowError
from pccpu.pml import PromptPlan, PromptText, UncachedPiece
from pccpu.pml.prompt import PromptItem
from pccpu.roles import Role, RoleTag


def ends_user_turn(items: tuple[PromptItem, ...]) -> bool:
    """True when the prompt's text closes a user turn last (then the assistant's turn is opened for it)."""
    last: RoleTag | None = None
    for item in items:
        if isinstance(item, PromptText):
            for piece in item.pieces:
                if isinstance(piece, RoleTag):
                    last = piece
    return last is not None and last.role is Role.USER and last.kind in ("close", "empty")


def with_generation_prompt(plan: PromptPlan, tokens: tuple[int, ...], n_ctx: int) -> PromptPlan:
    """``plan`` with ``tokens`` (the assistant's turn opening) decoded after it."""
    if not tokens:
        return plan
    end = plan.next_position + len(tokens)
    if end > n_ctx:
        raise LayoutOverflowError(f"the prompt needs {end} positions with the assistant's turn opened, more than "
                                  f"n_ctx={n_ctx}")
    piece = UncachedPiece(tokens, plan.next_position, "trailing", None)
    return dataclasses.replace(plan, pieces=(*plan.pieces, piece), uncached_tokens=plan.uncached_tokens + len(tokens),
                               next_position=end)
