"""Helpers shared by the chart tests: running the real Helm 3 binary and picking rendered objects."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "feedloop"
VALUES_DIR = Path(__file__).resolve().parent / "values"
RELEASE = "rel"
NAMESPACE = "feedloop"
VALUE_SETS = ["cpu-dev.yaml", "gpu-prod.yaml", "everything.yaml"]


class HelmError(Exception):
    """`helm` exited non-zero; the message is its output (lint reports its findings on stdout)."""


def find_helm() -> str | None:
    venv_helm = REPO_ROOT / ".venv" / "bin" / "helm"
    if venv_helm.exists():
        return str(venv_helm)
    return shutil.which("helm")


def run_helm(helm: str, args: Iterable[str]) -> str:
    result = subprocess.run(
        [helm, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HELM_NAMESPACE": NAMESPACE},
    )
    if result.returncode != 0:
        raise HelmError(f"{result.stdout}\n{result.stderr}".strip())
    return result.stdout


def template(
    helm: str, *value_files: Path | str, set_values: Iterable[str] = (), chart: Path = CHART_DIR
) -> list[dict]:
    """`helm template` of the chart: the rendered objects, `helm test` hooks included."""
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE]
    for values_file in value_files:
        args += ["-f", str(values_file)]
    for assignment in set_values:
        args += ["--set", assignment]
    return [doc for doc in yaml.safe_load_all(run_helm(helm, args)) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def component_of(obj: dict) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def one(objects: list[dict], kind: str, component: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and component_of(o) == component]
    assert len(matches) == 1, f"expected one {kind} of component {component}, got {len(matches)}"
    return matches[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"] if "template" in workload["spec"] else workload["spec"]


def main_container(workload: dict) -> dict:
    return pod_spec(workload)["containers"][0]


def env_map(container: dict) -> dict[str, dict]:
    """name -> the env entry (with `value` or `valueFrom`)."""
    return {entry["name"]: entry for entry in container.get("env", [])}
