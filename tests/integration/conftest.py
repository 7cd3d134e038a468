"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.config import EngineSettings, Settings
from services.engine.engine import Engine


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: Path) -> Iterator[Engine]:
    """The real vLLM engine in this process, on the tiny model (~25 s to start on 2 cores)."""
    settings = Settings(engine=EngineSettings(model=str(tiny_model_dir), max_num_seqs=8, max_model_len=256))
    eng = Engine(settings)
    eng.start()
    yield eng
    eng.shutdown()
