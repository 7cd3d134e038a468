"""A full disk while an adapter or a dataset version is written: the write fails cleanly, nothing partial is
ever visible (no version folder, no temporary one left behind), and the next write succeeds once there is
space again. The disk is a real 2 MiB tmpfs filled up with a filler file (mounting one needs root)."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.core.config import Settings
from services.core.keys import Keys
from tests.support.redis_server import RedisServer
from tests.support.stream_data import two_answer_prompts

SIZE = 2 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Fill the disk up to leave_bytes of free space with one filler file."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free - leave_bytes))
    return filler


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_adapter_publish_on_a_full_disk_leaves_nothing_and_the_next_one_works(
    small_disk: Path, tiny_model_dir: Path
) -> None:
    from services.adapters.manifest import REQUIRED_FILES, base_model_fingerprint, base_model_id, validate_adapter
    from services.adapters.publish import publish_adapter
    from tests.support.adapter_corpus import save_lora

    with tempfile.TemporaryDirectory() as scratch:
        source = save_lora(tiny_model_dir, Path(scratch) / "lora")
        size = sum(f.stat().st_size for f in source.iterdir())
        # what tmpfs allocates for the two files a publish copies (whole pages), and not a page more
        pages = sum(-(-(source / name).stat().st_size // 4096) * 4096 for name in REQUIRED_FILES)
        assert size < SIZE // 2, size
        adapters = small_disk / "adapters"
        adapters.mkdir()

        def publish(version: str, run_id: str):
            return publish_adapter(
                source, adapters, version,
                base_model=base_model_id(str(tiny_model_dir)),
                base_model_sha256=base_model_fingerprint(str(tiny_model_dir)),
                dataset_version="ds-000001", run_id=run_id, parent=None, metrics={}, versions={},
            )  # fmt: skip

        results = {}
        # no room for the weights; then room for the weights but not for the manifest written last
        for version, leave in (("feedloop-v1", size // 2), ("feedloop-v2", pages)):
            filler = fill(small_disk, leave)
            with pytest.raises(OSError) as failure:
                publish(version, f"run-{version}")
            assert failure.value.errno == errno.ENOSPC
            results[version] = visible(adapters)
            filler.unlink()
        assert results == {"feedloop-v1": [], "feedloop-v2": []}  # not even a temporary or abandoned folder

        manifest = publish("feedloop-v3", "run-3")  # space is back: the next run publishes
        assert visible(adapters) == ["feedloop-v3"]
        validate_adapter(
            adapters / "feedloop-v3",
            base_model_id(str(tiny_model_dir)),
            16,
            served_base_sha256=base_model_fingerprint(str(tiny_model_dir)),
            expected_version=manifest.version,
        )


def test_dataset_snapshot_on_a_full_disk_leaves_nothing_and_the_next_one_works(
    small_disk: Path, redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    from workers.pairing import datasets
    from workers.pairing.consumer import FeedbackConsumer

    server = redis_server()
    client = server.client()
    keys = Keys("faults-disk")
    settings = Settings(
        redis_url=server.url,
        redis_prefix=keys.prefix,
        engine={"model": str(tmp_path / "no-model")},
        pairs={"strategies": ["same_prompt"], "data_dir": small_disk / "datasets", "user_cap_fraction": 1.0},
    )
    expected = two_answer_prompts(client, keys, 0, 300)
    FeedbackConsumer(client, keys, settings, name="disk").consume(30, until_drained=True)
    data_dir = small_disk / "datasets"

    filler = fill(small_disk, 16 * 1024)  # the pairs' JSONL needs far more than 16 KiB
    with pytest.raises(OSError) as failure:
        datasets.snapshot(client, keys, settings)
    assert failure.value.errno == errno.ENOSPC
    assert visible(data_dir) == []  # no version folder, no temporary one
    assert datasets.list_versions(client, keys) == []  # and no record of one in Redis
    filler.unlink()

    manifest = datasets.snapshot(client, keys, settings)  # space is back
    assert visible(data_dir) == [manifest["version"]]
    assert manifest["counts"]["kept"] == len(expected)
    assert datasets.list_versions(client, keys) == [manifest["version"]]
