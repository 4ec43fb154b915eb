"""Sliding-window models (Gemma 3) are refused with a clear error, on the real registry model."""

from __future__ import annotations

import pytest

from pccpu.errors import UnsupportedModelError
from pccpu.models import fetch_model
from pccpu.service import PromptCache


def test_gemma3_is_refused_with_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = fetch_model("gemma3-270m")  # 253 MB, fetched once per machine
    with pytest.raises(UnsupportedModelError, match="sliding-window") as caught:
        PromptCache(str(path), n_ctx=512, store_dir=tmp_path, persist=False)
    assert "smollm2" in str(caught.value)
