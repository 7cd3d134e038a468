"""Fixtures for the chart tests: the real Helm 3 binary and a renderer around `helm template`."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from chartlib import CHART_DIR, REPO_ROOT, find_helm, template


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of a Helm 3 binary; installs the pinned one with scripts/install-helm.sh when none is found."""
    found = find_helm()
    if found is None:
        subprocess.run([str(REPO_ROOT / "scripts" / "install-helm.sh")], check=True, timeout=300)
        found = find_helm()
    assert found, "no helm binary: run scripts/install-helm.sh"
    version = subprocess.run([found, "version", "--template", "{{.Version}}"], capture_output=True, text=True)
    assert version.stdout.startswith("v3."), f"{found} is not Helm 3: {version.stdout or version.stderr}"
    return found


@pytest.fixture(scope="session")
def render(helm: str) -> Callable[..., list[dict]]:
    """render(*value_files, set_values=(), chart=CHART_DIR) -> rendered objects."""

    def _render(*value_files, set_values=(), chart: Path = CHART_DIR) -> list[dict]:
        return template(helm, *value_files, set_values=set_values, chart=chart)

    return _render


@pytest.fixture
def chart_copy(tmp_path: Path) -> Path:
    """A copy of the chart that a test may add files to (alerts, dashboards) without touching the repo."""
    target = tmp_path / "feedloop"
    shutil.copytree(CHART_DIR, target)
    return target
