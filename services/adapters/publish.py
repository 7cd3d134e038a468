"""Publish a trained adapter into the shared adapters folder, atomically.

Readers (every API replica) must never see a half-written adapter. The PEFT files are copied into a
temporary folder beside the target (same filesystem, so the rename is atomic), fsynced, renamed to
``<adapters_dir>/<version>/``, and only then is manifest.json written (temp file, fsync, rename). A
folder without manifest.json is therefore an interrupted publish: validation rejects it, and the next
publish of that version clears it away.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from services.adapters.manifest import (
    CONFIG_NAME,
    MANIFEST_NAME,
    REQUIRED_FILES,
    Manifest,
)
from services.core.durable import fsync_path, sha256_file, write_bytes_durably


class AdapterExists(Exception):
    """The version folder already holds a different run's adapter; versions are immutable."""


def _clear_abandoned(target: Path) -> None:
    """Move an interrupted publish (no manifest) out of the way, then delete it."""
    trash = target.with_name(f".{target.name}.abandoned-{uuid.uuid4().hex[:8]}")
    os.rename(target, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_manifest(adapter_dir: Path) -> Manifest:
    return Manifest.model_validate_json((Path(adapter_dir) / MANIFEST_NAME).read_bytes())


def publish_adapter(
    source_dir: Path | str,
    adapters_dir: Path | str,
    version: str,
    *,
    base_model: str,
    base_model_sha256: str | None,
    dataset_version: str,
    run_id: str,
    parent: str | None,
    metrics: dict[str, Any],
    versions: dict[str, str | None],
) -> Manifest:
    """Copy the PEFT files of source_dir to <adapters_dir>/<version>/ and write its manifest last.

    Idempotent per run: publishing the same run_id again returns the existing manifest (a re-delivered
    task). Raises AdapterExists if the version belongs to another run.
    """
    source_dir, adapters_dir = Path(source_dir), Path(adapters_dir)
    if not version or "/" in version or version.startswith("."):
        raise ValueError(f"invalid adapter version name {version!r}")
    adapters_dir.mkdir(parents=True, exist_ok=True)
    target = adapters_dir / version
    if target.exists():
        if (target / MANIFEST_NAME).is_file():
            existing = read_manifest(target)
            if existing.run_id == run_id:
                return existing
            raise AdapterExists(f"{target} already holds run {existing.run_id}, not {run_id}")
        _clear_abandoned(target)

    config = json.loads((source_dir / CONFIG_NAME).read_text())
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.staging-", dir=adapters_dir))
    try:
        for name in REQUIRED_FILES:
            shutil.copyfile(source_dir / name, staging / name)
            fsync_path(staging / name)
        files = {name: sha256_file(staging / name) for name in REQUIRED_FILES}
        fsync_path(staging)
        try:
            os.rename(staging, target)
        except OSError as error:  # another publisher won the race for this version
            raise AdapterExists(f"{target} appeared while publishing run {run_id}") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(adapters_dir)

    manifest = Manifest(
        version=version,
        base_model=base_model,
        base_model_sha256=base_model_sha256,
        rank=int(config["r"]),
        alpha=int(config["lora_alpha"]),
        target_modules=sorted(config["target_modules"]),
        files=files,
        dataset_version=dataset_version,
        run_id=run_id,
        parent=parent,
        metrics=metrics,
        versions=versions,
        created_at=time.time(),
    )
    try:
        write_bytes_durably(target / MANIFEST_NAME, manifest.model_dump_json(indent=2).encode())
    except BaseException:  # e.g. the disk filled up: leave no half-published version behind
        _clear_abandoned(target)
        raise
    return manifest
