"""One `feedloop serve` of the packaged SmolLM2 (tests/conftest.py's smollm2_dir) per module that asks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from services.models.catalog import SMOLLM2_135M_INSTRUCT
from tests.conftest import (
    ADMIN_TOKEN,
    ARTIFACTS,
    FEEDBACK_SECRET,
    TEST_REDIS_URL,
    delete_prefix,
    free_port,
    start_feedloop,
)


@dataclass
class ModelServer:
    base_url: str
    data_dir: Path

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def smollm2_server(
    smollm2_dir: Path, redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelServer]:
    """`feedloop serve` with FEEDLOOP_ENGINE__MODEL empty: the default model, found in its data dir."""
    data_dir = tmp_path_factory.mktemp("smollm2-data")
    (data_dir / "models").mkdir()
    (data_dir / "models" / SMOLLM2_135M_INSTRUCT.name).symlink_to(smollm2_dir)  # as if imported on a first start
    prefix = f"fltest-m-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        "FEEDLOOP_REDIS_URL": TEST_REDIS_URL,
        "FEEDLOOP_REDIS_PREFIX": prefix,
        "FEEDLOOP_DATA_DIR": str(data_dir),
        "FEEDLOOP_ENGINE__MODEL": "",
        "FEEDLOOP_API__PORT": str(port),
        "FEEDLOOP_API__ADMIN_TOKEN": ADMIN_TOKEN,
        "FEEDLOOP_FEEDBACK__SECRET": FEEDBACK_SECRET,
        "FEEDLOOP_TRAINING__ADAPTERS_DIR": str(data_dir / "adapters"),
        "FEEDLOOP_PAIRS__DATA_DIR": str(data_dir / "datasets"),
    }
    server = start_feedloop(["serve"], env, port, ARTIFACTS / "logs" / "smollm2-api.log", timeout=420)
    try:
        yield ModelServer(server.base_url, data_dir)
    finally:
        server.stop()
        delete_prefix(redis_client, prefix)
