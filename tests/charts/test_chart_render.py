"""The Helm chart, rendered by the real Helm 3 engine for the default values and each kept value set:
every object validates against the Kubernetes OpenAPI schemas, and the things feedloop relies on hold."""

from __future__ import annotations

import base64
import functools
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import pytest
from chartlib import (
    NAMESPACE,
    VALUE_SETS,
    VALUES_DIR,
    by_kind,
    component_of,
    env_map,
    main_container,
    one,
    pod_spec,
)

KUBERNETES_VERSION = kubernetes_validate.latest_version()
# Custom resources have no schema in Kubernetes' OpenAPI: their own required fields are checked instead.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
CASES = ["default", *VALUE_SETS]


def values_files(case: str) -> list[Path]:
    return [] if case == "default" else [VALUES_DIR / case]


@pytest.fixture(scope="module", autouse=True)
def cached_kubernetes_schemas() -> Iterator[None]:
    """kubernetes_validate re-reads its multi-megabyte definitions file on every call; read each file once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kv_utils, "schema_contents", functools.lru_cache(maxsize=None)(kv_utils.schema_contents))
        yield


@pytest.fixture(scope="module")
def rendered(render) -> dict[str, list[dict]]:
    return {case: render(*values_files(case)) for case in CASES}


def check_custom_resource(obj: dict) -> None:
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        assert spec["selector"]["matchLabels"], "a ServiceMonitor needs a selector"
        assert spec["endpoints"], "a ServiceMonitor needs endpoints"
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] and endpoint["path"] == "/metrics"
    else:
        assert spec["groups"], "a PrometheusRule needs groups"
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert rule.get("alert") or rule.get("record"), rule
                assert rule["expr"], rule


@pytest.mark.parametrize("case", CASES)
def test_every_object_is_valid_kubernetes(rendered, case):
    objects = rendered[case]
    assert objects
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"].get("namespace"), f"{name} has no namespace"
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            check_custom_resource(obj)
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{case}: {name} is not valid Kubernetes {KUBERNETES_VERSION}: {error.message}")


@pytest.mark.parametrize("case", CASES)
def test_object_names_are_unique_and_dns_safe(rendered, case):
    names = [(o["kind"], o["metadata"]["name"]) for o in rendered[case]]
    assert len(names) == len(set(names))
    assert all(len(name) <= 63 for _, name in names)


@pytest.mark.parametrize("case", CASES)
def test_beat_is_a_singleton(rendered, case):
    beat = one(rendered[case], "Deployment", "beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    assert main_container(beat)["args"] == ["beat"]


@pytest.mark.parametrize("case", ["default", "gpu-prod.yaml"])
def test_trainer_requests_a_gpu_and_runs_one_task(rendered, case):
    trainer = one(rendered[case], "Deployment", "trainer")
    container = main_container(trainer)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"] == ["worker", "--queues", "train", "--concurrency", "1"]
    assert container["image"].endswith("-gpu")


def test_cpu_dev_requests_no_gpu_and_uses_the_cpu_image(rendered):
    objects = rendered["cpu-dev.yaml"]
    for component in ("api", "trainer", "pairs-worker", "beat"):
        container = main_container(one(objects, "Deployment", component))
        assert container["image"] == "localhost/feedloop:0.1.0-cpu", component
        resources = container.get("resources", {})
        assert "nvidia.com/gpu" not in {**resources.get("requests", {}), **resources.get("limits", {})}
        assert not pod_spec(one(objects, "Deployment", component)).get("tolerations"), component


@pytest.mark.parametrize("case", CASES)
def test_api_probes_ports_and_volumes(rendered, case):
    api = one(rendered[case], "Deployment", "api")
    container = main_container(api)
    assert container["args"] == ["serve"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "http"}
    # the model loads before /healthz answers: the startup probe must allow minutes, not seconds
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["shared-data"] == "/data"
    service = one(rendered[case], "Service", "api")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_gpu_prod_api_is_scheduled_on_gpus_and_mounts_the_model(rendered):
    objects = rendered["gpu-prod.yaml"]
    api = one(objects, "Deployment", "api")
    spec = pod_spec(api)
    container = main_container(api)
    assert api["spec"]["replicas"] == 3
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "registry.example.com/ml/feedloop:0.1.0-gpu"
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["affinity"]["podAntiAffinity"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    model_mount = next(m for m in container["volumeMounts"] if m["name"] == "model")
    assert model_mount == {"name": "model", "mountPath": "/models/base", "readOnly": True}
    model_volume = next(v for v in spec["volumes"] if v["name"] == "model")
    assert model_volume["persistentVolumeClaim"]["claimName"] == "llama-3-8b-instruct"
    pdb = one(objects, "PodDisruptionBudget", "api")
    assert pdb["spec"]["minAvailable"] == 2


@pytest.mark.parametrize("case", CASES)
def test_adapter_storage_is_shared_by_api_and_trainer(rendered, case):
    objects = rendered[case]
    claims = {
        component: next(
            v for v in pod_spec(one(objects, "Deployment", component))["volumes"] if v["name"] == "shared-data"
        )
        for component in ("api", "trainer")
    }
    claim_name = claims["api"]["persistentVolumeClaim"]["claimName"]
    assert claims["trainer"]["persistentVolumeClaim"]["claimName"] == claim_name
    pvc = next(o for o in by_kind(objects, "PersistentVolumeClaim") if o["metadata"]["name"] == claim_name)
    expected_modes = ["ReadWriteOnce"] if case == "cpu-dev.yaml" else ["ReadWriteMany"]
    assert pvc["spec"]["accessModes"] == expected_modes
    config = one_configmap(objects, "config")["data"]
    assert config["FEEDLOOP_TRAINING__ADAPTERS_DIR"] == "/data/adapters"
    assert config["FEEDLOOP_ENGINE__MODEL"] == "/models/base"
    assert config["FEEDLOOP_API__HOST"] == "0.0.0.0"


@pytest.mark.parametrize("case", CASES)
def test_workers_expose_metrics_on_9100(rendered, case):
    objects = rendered[case]
    for component, queue in (("pairs-worker", "pairs"), ("trainer", "train")):
        container = main_container(one(objects, "Deployment", component))
        assert container["args"][:3] == ["worker", "--queues", queue]
        assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
        assert env_map(container)["FEEDLOOP_METRICS_PORT"]["value"] == "9100"
        assert container["livenessProbe"]["tcpSocket"] == {"port": "metrics"}
        service = one(objects, "Service", component)
        assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def one_configmap(objects: list[dict], suffix: str) -> dict:
    matches = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith(f"-{suffix}")]
    assert len(matches) == 1
    return matches[0]


def redis_directives(conf: str) -> dict[str, str]:
    """redis.conf as redis reads it: the last occurrence of a directive wins."""
    directives: dict[str, str] = {}
    for line in conf.splitlines():
        words = line.split(maxsplit=1)
        if words and not words[0].startswith("#"):
            directives[words[0]] = words[1] if len(words) > 1 else ""
    return directives


@pytest.mark.parametrize("case", ["default", "cpu-dev.yaml", "everything.yaml"])
def test_builtin_redis_is_durable_and_never_evicts(rendered, case):
    objects = rendered[case]
    conf = one_configmap(objects, "redis")["data"]["redis.conf"]
    directives = redis_directives(conf)
    assert directives["appendonly"] == "yes"
    assert directives["maxmemory-policy"] == "noeviction"
    assert directives["dir"] == "/data"
    redis = one(objects, "StatefulSet", "redis")
    assert redis["spec"]["replicas"] == 1
    container = main_container(redis)
    assert container["args"][:2] == ["redis-server", "/usr/local/etc/redis/redis.conf"]
    claims = redis["spec"].get("volumeClaimTemplates", [])
    if case == "cpu-dev.yaml":
        assert not claims
    else:
        assert [c["metadata"]["name"] for c in claims] == ["data"]
    if case == "everything.yaml":
        assert directives["maxmemory"] == "3gb"


def secret_values(objects: list[dict]) -> dict[str, str]:
    values = {}
    for secret in by_kind(objects, "Secret"):
        for key, encoded in secret.get("data", {}).items():
            values[key] = base64.b64decode(encoded).decode()
    return values


def test_external_redis_replaces_the_builtin_one_and_its_url_is_secret(rendered):
    objects = rendered["gpu-prod.yaml"]
    assert not by_kind(objects, "StatefulSet")
    assert not [o for o in objects if component_of(o) == "redis"]
    secrets = secret_values(objects)
    assert secrets["redis-url"] == "rediss://:prod-redis-password-0123456789@redis.prod.internal:6380/0"
    assert secrets["feedback-secret"] == "prod-feedback-hmac-secret-value-0123456789"
    assert secrets["admin-token"] == "prod-admin-token-value-0123456789"
    for component in ("api", "pairs-worker", "trainer", "beat"):
        redis_env = env_map(main_container(one(objects, "Deployment", component)))["REDIS_URL"]
        assert redis_env["valueFrom"]["secretKeyRef"] == {"name": "rel-feedloop-secrets", "key": "redis-url"}


def test_external_redis_url_from_an_existing_secret(render):
    objects = render(set_values=["redis.external.existingSecret=managed-redis", "redis.external.existingSecretKey=url"])
    assert not by_kind(objects, "StatefulSet")
    assert "redis-url" not in secret_values(objects)
    api = main_container(one(objects, "Deployment", "api"))
    assert env_map(api)["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "managed-redis", "key": "url"}


@pytest.mark.parametrize("case", CASES)
def test_secrets_never_appear_in_a_configmap(rendered, case):
    objects = rendered[case]
    secrets = secret_values(objects)
    assert {"feedback-secret", "admin-token", "redis-url"} <= secrets.keys()
    configmap_text = "\n".join(str(cm.get("data", {})) for cm in by_kind(objects, "ConfigMap"))
    for key, value in secrets.items():
        assert value not in configmap_text, f"secret {key} leaked into a ConfigMap"
    for configmap in by_kind(objects, "ConfigMap"):
        for key in configmap.get("data", {}):
            assert key not in {"FEEDLOOP_FEEDBACK__SECRET", "FEEDLOOP_API__ADMIN_TOKEN", "REDIS_URL"}


@pytest.mark.parametrize("case", CASES)
def test_each_role_gets_only_the_secrets_it_needs(rendered, case):
    objects = rendered[case]
    api_env = env_map(main_container(one(objects, "Deployment", "api")))
    assert api_env["FEEDLOOP_FEEDBACK__SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "feedback-secret"
    assert api_env["FEEDLOOP_API__ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "admin-token"
    for component in ("pairs-worker", "trainer", "beat"):
        names = env_map(main_container(one(objects, "Deployment", component))).keys()
        assert "FEEDLOOP_API__ADMIN_TOKEN" not in names, component
        assert "FEEDLOOP_FEEDBACK__SECRET" not in names, component


def test_generated_secrets_are_random_and_consistent(render):
    first, second = secret_values(render()), secret_values(render())
    for key in ("feedback-secret", "admin-token", "redis-password"):
        assert len(first[key]) == 40 and first[key].isalnum()
        assert first[key] != second[key]
    assert first["redis-url"] == f"redis://:{first['redis-password']}@rel-feedloop-redis.{NAMESPACE}.svc:6379/0"


@pytest.mark.parametrize("case", CASES)
def test_the_helm_test_pod_chats_then_votes(rendered, case):
    pods = [o for o in by_kind(rendered[case], "Pod") if o["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    assert len(pods) == 1
    container = main_container(pods[0])
    assert env_map(container)["FEEDLOOP_URL"]["value"] == "http://rel-feedloop-api:8000"
    script = container["args"][0]
    assert "/v1/chat/completions" in script and "/v1/feedback" in script
    compile(script, "test-chat-and-feedback", "exec")


def test_everything_enables_every_optional_object(rendered):
    objects = rendered["everything.yaml"]
    kinds = {o["kind"] for o in objects}
    assert {
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "NetworkPolicy",
    } <= kinds
    api = one(objects, "Deployment", "api")
    assert "replicas" not in api["spec"], "the HPA owns the replica count"
    hpa = one(objects, "HorizontalPodAutoscaler", "api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == api["metadata"]["name"]
    assert one(objects, "PodDisruptionBudget", "api")["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": api["spec"]["selector"]["matchLabels"]},
    }
    monitors = {component_of(o) for o in by_kind(objects, "ServiceMonitor")}
    assert monitors == {"api", "pairs-worker", "trainer"}
    for monitor in by_kind(objects, "ServiceMonitor"):
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_ingress_keeps_admin_private_unless_asked(rendered, render):
    ingress = one(rendered["everything.yaml"], "Ingress", "api")
    paths = [(p["path"], p["pathType"]) for p in ingress["spec"]["rules"][0]["http"]["paths"]]
    assert paths == [("/v1", "Prefix"), ("/widget", "Prefix"), ("/", "Exact")]
    assert ingress["spec"]["tls"][0]["secretName"] == "feedloop-tls"
    exposed = render(VALUES_DIR / "everything.yaml", set_values=["api.ingress.exposeAdmin=true"])
    exposed_paths = [p["path"] for p in one(exposed, "Ingress", "api")["spec"]["rules"][0]["http"]["paths"]]
    assert "/admin" in exposed_paths


def pods_selected(objects: list[dict], selector: dict) -> set[str | None]:
    selected = set()
    for workload in by_kind(objects, "Deployment") + by_kind(objects, "StatefulSet"):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        if all(labels.get(k) == v for k, v in selector.items()):
            selected.add(component_of(workload))
    return selected


def test_network_policies_keep_redis_private(rendered):
    objects = rendered["everything.yaml"]
    redis_policy = one(objects, "NetworkPolicy", "redis")
    assert redis_policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = redis_policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "no namespace or IP peers: only this release's pods"
    allowed = pods_selected(objects, peer["podSelector"]["matchLabels"])
    assert allowed == {"api", "pairs-worker", "trainer", "beat"}
    assert pods_selected(objects, redis_policy["spec"]["podSelector"]["matchLabels"]) == {"redis"}
    beat_policy = one(objects, "NetworkPolicy", "beat")
    assert "ingress" not in beat_policy["spec"], "beat accepts no connections"
    for component in ("pairs-worker", "trainer"):
        (worker_rule,) = one(objects, "NetworkPolicy", component)["spec"]["ingress"]
        assert worker_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
        assert worker_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "monitoring"
        }
    (api_rule,) = one(objects, "NetworkPolicy", "api")["spec"]["ingress"]
    assert api_rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "rel"}}} in api_rule["from"]


def test_network_policies_off_renders_none(rendered):
    assert not by_kind(rendered["cpu-dev.yaml"], "NetworkPolicy")


def test_settings_change_rolls_the_pods(render):
    before = one(render(), "Deployment", "api")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    after = one(render(set_values=["config.FEEDLOOP_LOG_LEVEL=DEBUG"]), "Deployment", "api")
    assert after["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != before


def test_api_runs_with_auth_a_first_key_and_the_ingress_hop(render):
    objects = render(set_values=("api.ingress.enabled=true",))
    env = env_map(main_container(one(objects, "Deployment", "api")))
    assert env["FEEDLOOP_API__AUTH"]["value"] == "true"
    assert env["FEEDLOOP_API__BOOTSTRAP_APP"]["value"] == "default"
    ref = env["FEEDLOOP_API__BOOTSTRAP_APP_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "app-key" and ref["optional"] is True
    assert env["FEEDLOOP_API__TRUSTED_PROXY_HOPS"]["value"] == "1"
    key = secret_values(objects)["app-key"]
    assert len(key) == 40 and key.isalnum()
    for component in ("pairs-worker", "trainer", "beat"):
        assert "FEEDLOOP_API__BOOTSTRAP_APP_KEY" not in env_map(main_container(one(objects, "Deployment", component)))
    # without the Ingress nothing appends to X-Forwarded-For: the socket address counts
    plain = env_map(main_container(one(render(), "Deployment", "api")))
    assert plain["FEEDLOOP_API__TRUSTED_PROXY_HOPS"]["value"] == "0"
