"""values.schema.json and the chart's own guards make Helm refuse values that would deploy broken objects."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from chartlib import CHART_DIR, VALUE_SETS, VALUES_DIR, HelmError, run_helm, template


def write_values(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(text)
    return path


def test_helm_lint_passes_for_every_value_set(helm):
    for values in [None, *VALUE_SETS]:
        args = ["lint", "--strict", str(CHART_DIR)] + (["-f", str(VALUES_DIR / values)] if values else [])
        assert "0 chart(s) failed" in run_helm(helm, args)


def test_the_schema_accepts_the_defaults_and_every_value_set():
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)
    for name in VALUE_SETS:
        jsonschema.validate(yaml.safe_load((VALUES_DIR / name).read_text()), schema)


BAD_VALUES = {
    "replica count as a word": ("api:\n  replicaCount: two\n", "/api/replicaCount"),
    "negative GPUs": ("trainer:\n  gpus: -1\n", "/trainer/gpus"),
    "unknown top-level key": ("apii:\n  replicaCount: 2\n", "apii"),
    "unknown component key": ("beat:\n  replicaCount: 2\n", "replicaCount"),
    "relative model path": ("model:\n  path: models/base\n", "/model/path"),
    "bad service type": ("api:\n  service:\n    type: Ingress\n", "/api/service/type"),
    "redis url scheme": ("redis:\n  external:\n    url: http://redis:6379\n", "/redis/external/url"),
}


@pytest.mark.parametrize("text, where", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_lint_and_template_reject_values_outside_the_schema(helm, tmp_path, text, where):
    values = write_values(tmp_path, text)
    with pytest.raises(HelmError, match="schema") as lint_error:
        run_helm(helm, ["lint", str(CHART_DIR), "-f", str(values)])
    assert where in str(lint_error.value)
    with pytest.raises(HelmError, match="schema") as template_error:
        template(helm, values)
    assert where in str(template_error.value)


@pytest.mark.parametrize(
    "key",
    ["FEEDLOOP_FEEDBACK__SECRET", "FEEDLOOP_API__ADMIN_TOKEN", "REDIS_URL", "FEEDLOOP_PAIRS__TEACHER_TOKEN"],
)
def test_a_secret_in_config_is_refused(helm, tmp_path, key):
    values = write_values(tmp_path, f"config:\n  {key}: hunter2-very-secret\n")
    with pytest.raises(HelmError, match="looks like a secret"):
        template(helm, values)


def test_an_ingress_path_covering_admin_is_refused(helm, tmp_path):
    values = write_values(
        tmp_path,
        "api:\n  ingress:\n    enabled: true\n    paths:\n      - path: /\n        pathType: Prefix\n",
    )
    with pytest.raises(HelmError, match="would route /admin"):
        template(helm, values)
    admin = write_values(
        tmp_path,
        "api:\n  ingress:\n    enabled: true\n    paths:\n      - path: /admin\n        pathType: Exact\n",
    )
    with pytest.raises(HelmError, match="would route /admin"):
        template(helm, admin)


def test_redis_eviction_and_persistence_cannot_be_overridden(helm, tmp_path):
    for line in ("maxmemory-policy allkeys-lru", "appendonly no"):
        values = write_values(tmp_path, f"redis:\n  extraConfig: |\n    {line}\n")
        with pytest.raises(HelmError, match="must not set maxmemory-policy"):
            template(helm, values)


def _redis_maxmemory(objects: list[dict]) -> str | None:
    (config,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-redis")]
    lines = [line.split() for line in config["data"]["redis.conf"].splitlines()]
    return next((words[1] for words in lines if words and words[0] == "maxmemory"), None)


def test_redis_maxmemory_stays_below_the_container_limit(helm, tmp_path):
    # default: 75% of the 4Gi limit, so noeviction refuses writes before the kernel OOM-kills Redis
    assert _redis_maxmemory(template(helm)) == "3072mb"
    limit_2g = write_values(tmp_path, "redis:\n  resources:\n    limits:\n      memory: 2G\n")
    assert _redis_maxmemory(template(helm, limit_2g)) == f"{2_000_000_000 * 3 // 4 // 1048576}mb"
    assert _redis_maxmemory(template(helm, set_values=["redis.maxmemory=1gb"])) == "1gb"
    for too_big in ("4gb", "4096mb", "5G"):  # the limit is 4Gi
        with pytest.raises(HelmError, match=r"must be below redis\.resources\.limits\.memory"):
            template(helm, set_values=[f"redis.maxmemory={too_big}"])
    assert _redis_maxmemory(template(helm, set_values=["redis.resources.limits=null"])) is None


def test_config_values_are_rendered_as_settings_strings(helm, tmp_path):
    values = write_values(
        tmp_path,
        "config:\n  FEEDLOOP_API__MAX_BODY_BYTES: 1000000\n  FEEDLOOP_GATE__MIN_ACCURACY: 0.65\n"
        "  FEEDLOOP_PAIRS__JUDGE: true\n  FEEDLOOP_PAIRS__STRATEGIES: [same_prompt, correction]\n",
    )
    (config,) = [
        o for o in template(helm, values) if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config")
    ]
    data = config["data"]
    assert data["FEEDLOOP_API__MAX_BODY_BYTES"] == "1000000"  # not 1e+06
    assert data["FEEDLOOP_GATE__MIN_ACCURACY"] == "0.65"
    assert data["FEEDLOOP_PAIRS__JUDGE"] == "true"
    assert json.loads(data["FEEDLOOP_PAIRS__STRATEGIES"]) == ["same_prompt", "correction"]


def test_every_value_is_documented_for_helm_docs():
    """Each value has a `# --` comment right above it, or sits inside a documented value (e.g. resources).
    Section keys (a map of documented values, like `api:`) need none."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    ancestors: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        if stripped.startswith("-") or ":" not in stripped:
            continue
        comments = []
        for above in reversed(lines[:index]):
            if not above.strip().startswith("#"):
                break
            comments.append(above.strip())
        documented = any(comment.startswith("# --") for comment in comments)
        inherited = any(doc for _, doc in ancestors)
        is_section = stripped.endswith(":") and not documented
        if not (documented or inherited or is_section):
            undocumented.append(f"line {index + 1}: {stripped}")
        ancestors.append((indent, documented))
    assert not undocumented, f"values without a `# --` comment: {undocumented}"
