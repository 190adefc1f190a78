"""The Kubernetes manifests (deploy/k8s/): valid against the Kubernetes schemas offline, complete in
the kustomization, and wired to what the service really serves and reads (port, probe routes, the
HPA's metric, FLUX_* settings, drain timeout). One real `bentoml serve` answers the probes' routes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jsonpatch
import kubernetes_validate
import pytest
import yaml
from pydantic import AliasChoices

from runners.config import ServerSettings, Settings
from tests.conftest import REPO, bentoml_server

K8S = REPO / "deploy" / "k8s"
# The oldest Kubernetes these manifests claim to work on, and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version() + ".0"]
BENTOML_DEFAULT_CONFIG = (
    Path(__import__("bentoml").__file__).parent / "_internal/configuration/v2/default_configuration.yaml"
)


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def kustomization() -> dict:
    return load("kustomization.yaml")


def applied() -> dict[str, dict]:
    """Every object `kubectl apply -k deploy/k8s` creates, by kind."""
    objects = {}
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert doc["kind"] not in objects, f"two {doc['kind']} objects: the tests below assume one each"
            objects[doc["kind"]] = doc
    return objects


def container() -> dict:
    (server,) = applied()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return server


def pod_env() -> dict[str, str | None]:
    """The container's environment: ConfigMap values, then its own `env` (None for secret refs)."""
    env: dict[str, str | None] = dict(applied()["ConfigMap"]["data"])
    for item in container()["env"]:
        env[item["name"]] = item.get("value")
    return env


def setting_env_names() -> set[str]:
    """Every environment variable runners.config.Settings reads: each group's env_prefix plus field
    name, and each field's validation aliases (FLUX_FUSED_LORAS)."""
    names = set()
    for group in Settings.model_fields.values():
        settings_class = group.annotation
        prefix = settings_class.model_config.get("env_prefix", "")
        for field_name, field in settings_class.model_fields.items():
            names.add(f"{prefix}{field_name}".upper())
            alias = field.validation_alias
            choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
            names.update(choice.upper() for choice in choices if isinstance(choice, str))
    return names


# --- schemas --------------------------------------------------------------------------------


def manifest_files() -> list[str]:
    return sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", manifest_files())
def test_manifest_is_valid_kubernetes(name, version):
    """Strict: an unknown or misspelt field fails, not only a wrong type. The schemas ship inside
    kubernetes-validate, so this needs no network and no cluster."""
    for doc in yaml.safe_load_all((K8S / name).read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_validation_catches_a_misspelt_field():
    """The check above is not vacuous."""
    deployment = applied()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest():
    """Every manifest is applied, except the Secret example (it holds placeholders: the real Secret
    is created by hand) ; other folders (monitoring/, triton/) are applied on their own."""
    resources = kustomization()["resources"]
    assert len(resources) == len(set(resources))
    expected = [name for name in manifest_files() if not name.endswith(".example.yaml")]
    assert sorted(resources) == expected
    assert {
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    } <= set(applied())
    for doc in applied().values():
        assert "namespace" not in doc["metadata"], "manifests stay namespace-agnostic"


def test_kustomization_image_names_the_deployment_image():
    (image,) = kustomization()["images"]
    assert image["name"] == container()["image"]


# --- wiring between the objects -------------------------------------------------------------


def test_objects_select_the_pods():
    objects = applied()
    deployment = objects["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        objects["Service"]["spec"]["selector"],
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_configuration_volume_and_secret_are_wired():
    objects = applied()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    server = container()
    assert [ref["configMapRef"]["name"] for ref in server["envFrom"]] == [objects["ConfigMap"]["metadata"]["name"]]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    assert list(claims.values()) == [objects["PersistentVolumeClaim"]["metadata"]["name"]]
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    (volume,) = claims
    assert pod_env()["FLUX_CACHE_DIR"] == mounts[volume], "the caches live on the volume"

    secret = load("secret.example.yaml")
    refs = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in server["env"] if "valueFrom" in item}
    assert refs["FLUX_API_KEYS"]["name"] == secret["metadata"]["name"]
    assert refs["FLUX_API_KEYS"]["key"] in secret["stringData"]
    assert not refs["FLUX_API_KEYS"].get("optional"), "no Secret must mean no start, not an open API"
    assert refs["HF_TOKEN"]["key"] in secret["stringData"] and refs["HF_TOKEN"]["optional"]
    assert "FLUX_API_KEYS" not in objects["ConfigMap"]["data"]


def test_gpu_request_and_nodes():
    resources = container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 == resources["requests"]["nvidia.com/gpu"]
    assert resources["limits"]["memory"] and resources["requests"]["cpu"]
    pod = applied()["Deployment"]["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_read_only_root_filesystem_has_somewhere_to_write():
    """Everything the server and its libraries write (BentoML's home and sockets, caches, the
    model, outputs) is under a mounted volume."""
    server = container()
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert applied()["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    mounts = [m["mountPath"] for m in server["volumeMounts"]]
    assert "/tmp" in mounts
    env = pod_env()
    for name in (
        "FLUX_CACHE_DIR",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "BENTOML_HOME",
        "HOME",
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
    ):
        assert any(env[name] == m or env[name].startswith(m + "/") for m in mounts), name


def test_hpa_scales_on_the_queue_depth_through_the_adapter_rule():
    (metric,) = applied()["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "flux_queue_depth"
    rules = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    served = {rule["name"]["as"]: rule for rule in rules}
    rule = served[metric["pods"]["metric"]["name"]]
    assert rule["seriesQuery"].startswith("flux_queue_depth{")
    assert re.fullmatch(rule["name"]["matches"], "flux_queue_depth")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_service_monitor_scrapes_the_service_port():
    monitor = load("monitoring/servicemonitor.yaml")
    service = applied()["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


# --- the service's real port, routes and settings -------------------------------------------


def test_port_is_the_services_port():
    """3000: BentoML's default, `make serve`'s PORT, the container's args, port and probes."""
    bentoml_port = yaml.safe_load(BENTOML_DEFAULT_CONFIG.read_text())["services"]["http"]["port"]
    makefile_port = int(re.search(r"^PORT \?= (\d+)$", (REPO / "Makefile").read_text(), re.M).group(1))
    server = container()
    (port,) = server["ports"]
    assert bentoml_port == makefile_port == port["containerPort"] == 3000
    args = server["args"]
    assert args[0] == "serve" and int(args[args.index("--port") + 1]) == port["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["port"] in (port["name"], port["containerPort"]), probe
    service_port = applied()["Service"]["spec"]["ports"][0]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    annotations = applied()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]


def test_probes_use_readiness_and_liveness_routes():
    server = container()
    assert server["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["livenessProbe"]["httpGet"]["path"] == "/livez"
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, "model load and warm-up take many minutes"


def test_env_names_are_real_settings():
    known = setting_env_names()
    assert {
        "FLUX_MODEL",
        "FLUX_API_KEYS",
        "FLUX_DRAIN_TIMEOUT_S",
        "FLUX_FUSED_LORAS",
    } <= known  # the introspection works
    names = set(pod_env())
    # and the commented-out examples in the ConfigMap, which an operator will uncomment
    names |= set(re.findall(r"^\s*#\s*(FLUX_[A-Z0-9_]+):", (K8S / "configmap.yaml").read_text(), re.M))
    unknown = sorted(name for name in names if name.startswith("FLUX_") and name not in known)
    assert not unknown, f"not settings of runners.config: {unknown}"


def test_configmap_values_pass_the_settings_checks(monkeypatch):
    for name in list(os.environ):
        if name.startswith("FLUX_"):
            monkeypatch.delenv(name)
    for name, value in pod_env().items():
        if name.startswith("FLUX_") and value is not None:
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert str(settings.model.cache_dir) == pod_env()["FLUX_CACHE_DIR"]


def test_grace_period_outlasts_the_drain():
    drain = float(pod_env().get("FLUX_DRAIN_TIMEOUT_S") or ServerSettings.model_fields["drain_timeout_s"].default)
    pod = applied()["Deployment"]["spec"]["template"]["spec"]
    pre_stop = container().get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The service as the Deployment configures it (the ConfigMap's settings, an API key), with the
    tiny model and paths under a temporary folder instead of the volume."""
    tmp = tmp_path_factory.mktemp("deploy-serve")
    env = {name: value for name, value in pod_env().items() if name.startswith("FLUX_") and value is not None}
    env.update(
        FLUX_MODEL="tiny",
        FLUX_BACKEND="torch",
        FLUX_API_KEYS="probe-test-key",
        FLUX_CACHE_DIR=str(tmp / "cache" / "flux"),
    )
    with bentoml_server(tmp, **env) as (base, _log):
        yield base


def test_probe_routes_answer_without_a_key(server):
    """The kubelet and Prometheus send no API key: the probe and metrics routes must not need one
    (while the fal routes do)."""
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(server + path, timeout=10).status_code == 200, path
    assert httpx.post(server + "/fal-ai/flux-lora/inpainting", json={}, timeout=10).status_code == 401


def test_metrics_export_what_the_hpa_and_adapter_ask_for(server):
    text = httpx.get(server + "/metrics", timeout=10).text
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    (metric,) = applied()["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] in exported
    rules = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    external = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())["rules"]["external"]
    for rule in rules + external:
        assert rule["seriesQuery"].split("{")[0] in exported


# --- deploy/k8s/fleet: the Component that shares one queue (Redis) and one bucket ---------------

FLEET = K8S / "fleet"


def fleet_component() -> dict:
    component = yaml.safe_load((FLEET / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    return component


def fleet_objects() -> dict[tuple[str, str], dict]:
    """What `kubectl apply -k` of the base plus the fleet Component creates, by (kind, name): the
    Component's resources, and its JSON patches applied with the jsonpatch library (so this needs no
    kustomize binary; test_fleet_renders_the_same_with_kustomize checks the two agree where kubectl is)."""
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in applied().values()}
    component = fleet_component()
    for name in component["resources"]:
        for doc in yaml.safe_load_all((FLEET / name).read_text()):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, key
            objects[key] = doc
    for patch in component["patches"]:
        key = (patch["target"]["kind"], patch["target"]["name"])
        assert key in objects, f"the patch {patch['path']} targets nothing in the base"
        objects[key] = jsonpatch.apply_patch(objects[key], yaml.safe_load((FLEET / patch["path"]).read_text()))
    return objects


def fleet_container() -> dict:
    (server,) = fleet_objects()[("Deployment", "flux-inpaint")]["spec"]["template"]["spec"]["containers"]
    return server


def fleet_env() -> dict[str, str | None]:
    objects = fleet_objects()
    env: dict[str, str | None] = dict(objects[("ConfigMap", "flux-inpaint-config")]["data"])
    for item in fleet_container()["env"]:
        env[item["name"]] = item.get("value")
    return env


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_fleet_objects_are_valid_kubernetes(version):
    """Every object the base plus the Component create, patched ones included, and the Secret example."""
    for doc in fleet_objects().values():
        kubernetes_validate.validate(doc, version, strict=True)
    kubernetes_validate.validate(yaml.safe_load((FLEET / "secret.example.yaml").read_text()), version, strict=True)


def test_fleet_component_lists_every_file():
    component = fleet_component()
    listed = component["resources"] + [patch["path"] for patch in component["patches"]]
    assert len(listed) == len(set(listed))
    on_disk = sorted(
        p.name for p in FLEET.glob("*.yaml") if p.name != "kustomization.yaml" and not p.name.endswith(".example.yaml")
    )
    assert sorted(listed) == on_disk


def test_fleet_env_names_are_real_settings():
    known = setting_env_names()
    names = set(fleet_env())
    for path in FLEET.glob("*.yaml"):  # and the settings the comments tell an operator to add
        names |= set(re.findall(r"\b(FLUX_[A-Z0-9_]+)\b", path.read_text()))
    unknown = sorted(name for name in names if name.startswith("FLUX_") and name not in known)
    assert not unknown, f"not settings of runners.config: {unknown}"
    assert {"FLUX_QUEUE_URL", "FLUX_STORE_URL", "FLUX_STORE_SWEEP"} <= names


def test_fleet_settings_pass_the_settings_checks(monkeypatch):
    """The ConfigMap's values and the Secret example's (the shape an operator fills in) load."""
    for name in list(os.environ):
        if name.startswith("FLUX_"):
            monkeypatch.delenv(name)
    secret = yaml.safe_load((FLEET / "secret.example.yaml").read_text())["stringData"]
    for item in fleet_container()["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef", {})
        if ref.get("name") == secret_name():
            monkeypatch.setenv(item["name"], secret[ref["key"]].replace("REPLACE-WITH-YOUR-BUCKET", "my-bucket"))
    for name, value in fleet_env().items():
        if name.startswith("FLUX_") and value is not None:
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.store.url == "s3://my-bucket/flux/outputs" and settings.store.sweep is False
    assert settings.queue.url.startswith("redis://")


def secret_name() -> str:
    return yaml.safe_load((FLEET / "secret.example.yaml").read_text())["metadata"]["name"]


def test_fleet_secret_and_redis_are_wired():
    objects = fleet_objects()
    secret = yaml.safe_load((FLEET / "secret.example.yaml").read_text())
    refs = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in fleet_container()["env"] if "valueFrom" in item}
    for name in ("FLUX_QUEUE_URL", "FLUX_STORE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert refs[name]["name"] == secret["metadata"]["name"] and refs[name]["key"] in secret["stringData"], name
    assert not refs["FLUX_QUEUE_URL"].get("optional"), "no Secret must mean no start, not a replica on its own"
    assert refs["AWS_ACCESS_KEY_ID"]["optional"], "a workload identity needs no keys"

    redis = objects[("StatefulSet", "flux-inpaint-redis")]
    service = objects[("Service", redis["spec"]["serviceName"])]
    assert service["spec"]["clusterIP"] == "None"  # the governing Service of a StatefulSet is headless
    pod = redis["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert redis["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # The front's Service, PDB and HPA never take the Redis pod for a server, nor the reverse.
    front = objects[("Deployment", "flux-inpaint")]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        objects[("Service", "flux-inpaint")]["spec"]["selector"],
        objects[("PodDisruptionBudget", "flux-inpaint")]["spec"]["selector"]["matchLabels"],
    ):
        assert not selector.items() <= pod["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= front.items()

    # The queue URL of the example points at this Redis: its Service, its port, its password.
    queue_url = urlsplit(secret["stringData"]["queue-url"])
    (redis_container,) = pod["spec"]["containers"]
    (port,) = redis_container["ports"]
    assert queue_url.hostname == service["metadata"]["name"]
    assert queue_url.port == port["containerPort"] == service["spec"]["ports"][0]["port"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert queue_url.password == secret["stringData"]["redis-password"]
    args = redis_container["args"]

    def arg(flag: str) -> str:
        return args[args.index(flag) + 1]

    env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in redis_container["env"]}
    assert arg("--requirepass") == "$(REDIS_PASSWORD)" and env["REDIS_PASSWORD"]["key"] == "redis-password"
    assert int(arg("--port")) == port["containerPort"]
    # AOF on the volume: accepted requests survive a Redis restart; no eviction of a queue's keys.
    # fsync before answering: with everysec a killed Redis lost an answered write (docs/fleet.md)
    assert arg("--appendonly") == "yes" and arg("--appendfsync") == "always"
    assert arg("--maxmemory-policy") == "noeviction"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in redis_container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == arg("--dir")
    assert redis_container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_fleet_service_drops_client_ip_affinity():
    service = fleet_objects()[("Service", "flux-inpaint")]["spec"]
    assert service["sessionAffinity"] == "None" and "sessionAffinityConfig" not in service
    assert applied()["Service"]["spec"]["sessionAffinity"] == "ClientIP"  # the base keeps it


def test_fleet_hpa_scales_on_the_fleet_wide_depth_without_multiplying_it():
    """Every replica reports the fleet's depth: a Pods metric would sum N copies of it. An External
    metric with an AverageValue target is divided by the target alone, whatever the replica count."""
    metrics = fleet_objects()[("HorizontalPodAutoscaler", "flux-inpaint")]["spec"]["metrics"]
    depth = next(m for m in metrics if m["type"] == "External")["external"]
    assert depth["target"]["type"] == "AverageValue" and float(depth["target"]["averageValue"]) > 0
    assert not [m for m in metrics if m["type"] == "Pods" and m["pods"]["metric"]["name"] == "flux_queue_depth"]
    rules = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())["rules"]
    external = {rule["name"]["as"]: rule for rule in rules["external"]}
    rule = external[depth["metric"]["name"]]
    # the series each replica exports with the whole line's depth (runners/front/metrics.py)
    assert rule["seriesQuery"].startswith("flux_fleet_queue_depth{")
    assert re.fullmatch(rule["name"]["matches"], "flux_fleet_queue_depth")
    assert 'name="flux_fleet_queue_depth"' in (REPO / "runners" / "front" / "metrics.py").read_text()
    assert rule["metricsQuery"].startswith("max by"), "one value for the fleet, not a sum of the replicas' copies"
    assert "pod" not in rule["resources"]["overrides"]
    # The per-pod in-flight metric holds busy replicas; the adapter serves it as a Pods metric.
    (in_flight,) = [m["pods"] for m in metrics if m["type"] == "Pods"]
    assert in_flight["metric"]["name"] in {rule["name"]["as"] for rule in rules["custom"]}


def test_fleet_renders_the_same_with_kustomize(tmp_path):
    if not shutil.which("kubectl"):
        pytest.skip("no kubectl here: the offline rendering above is what is checked")
    relative = os.path.relpath(REPO / "deploy", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"resources: [{relative}/k8s]\ncomponents: [{relative}/k8s/fleet]\n")
    rendered = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, check=True)
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered.stdout)}
    expected = fleet_objects()
    (image,) = kustomization()["images"]  # the one thing kustomize adds: the base's image rewrite
    expected[("Deployment", "flux-inpaint")]["spec"]["template"]["spec"]["containers"][0]["image"] = (
        f"{image['newName']}:{image['newTag']}"
    )
    assert by_key == expected


def test_the_managed_redis_overlay_of_the_readme_drops_the_statefulset(tmp_path):
    """deploy/README.md's overlay for a managed Redis, rendered by kustomize: the fleet without its Redis."""
    if not shutil.which("kubectl"):
        pytest.skip("no kubectl here")
    readme = (REPO / "deploy" / "README.md").read_text()
    block = re.search(r"Remove the Component's Redis.*?```yaml\n(.*?)```", readme, re.S).group(1)
    relative = os.path.relpath(REPO / "deploy", tmp_path)
    overlay = f"resources: [{relative}/k8s]\ncomponents: [{relative}/k8s/fleet]\n" + textwrap.dedent(block)
    (tmp_path / "kustomization.yaml").write_text(overlay)
    rendered = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, check=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(rendered.stdout)}
    assert kinds == set(fleet_objects()) - {("StatefulSet", "flux-inpaint-redis"), ("Service", "flux-inpaint-redis")}


def test_fleet_redis_memory_and_the_queue_bounds_agree():
    """The shipped Redis and the fleet's settings fit together: the inputs the queue may hold are at
    most half of Redis's maxmemory (the rest holds retained results and Redis itself), and maxmemory
    leaves a quarter of the container's limit spare for the finishes that may pass it (allow-oom) and
    the AOF rewrite. Past maxmemory a submit gets 503, never a 500 or a lost request
    (tests/test_redis_queue.py's full-Redis test)."""
    from runners.config import QueueSettings

    redis = fleet_objects()[("StatefulSet", "flux-inpaint-redis")]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    units = {"kb": 1024, "mb": 1024**2, "gb": 1024**3}
    maxmemory = args[args.index("--maxmemory") + 1].lower()
    maxmemory_bytes = int(maxmemory[:-2]) * units[maxmemory[-2:]]
    limit = container["resources"]["limits"]["memory"]
    limit_bytes = int(limit[:-2]) * {"Mi": 1024**2, "Gi": 1024**3}[limit[-2:]]
    waiting_bytes = int(fleet_env().get("FLUX_QUEUE_MAX_WAITING_BYTES") or QueueSettings().max_waiting_bytes)
    assert waiting_bytes <= maxmemory_bytes // 2, (waiting_bytes, maxmemory_bytes)
    assert maxmemory_bytes <= 0.75 * limit_bytes + 1, (maxmemory_bytes, limit_bytes)
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
