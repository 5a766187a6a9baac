"""The Kubernetes manifests in deploy/: they build, validate, and deploy a hardened sidecar.

Every kustomization under deploy/ is rendered with ``kubectl kustomize``. Built-in kinds
are validated offline against the Kubernetes 1.31 schemas (``kubernetes-validate``,
strict: unknown fields fail); custom resources (PodMonitor, PrometheusRule) have no
schema there and get targeted checks instead, plus ``promtool check rules`` for the
rules. The sidecar's command line and settings are loaded with the sidecar's own parser
and :class:`~sidecar.config.Settings`, so a renamed flag or variable fails here.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from procs import ROOT
from tools import require_tool

from sidecar.cli import build_parser
from sidecar.config import ENV_PREFIX, Settings, load_settings, split_host_port

DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.31"
SIDECAR = "llm-energy-sidecar"
INJECT_LABEL = ("llm-energy-sidecar/inject", "true")
CRD_GROUPS = {"monitoring.coreos.com"}  # no schema in kubernetes-validate: checked by hand
CREDENTIALS = {"CARBON_API_TOKEN", "WATTTIME_USER", "WATTTIME_PASSWORD"}
PROXY_PORT = split_host_port(str(Settings.model_fields["listen"].default))[1]
METRICS_PORT = split_host_port(str(Settings.model_fields["metrics_listen"].default))[1]

Doc = dict[str, Any]


def _kustomizations() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def _kind(directory: Path) -> str:
    return str(yaml.safe_load((directory / "kustomization.yaml").read_text()).get("kind", ""))


BUILDABLE = [d for d in _kustomizations() if _kind(d) != "Component"]
COMPONENTS = [d for d in _kustomizations() if _kind(d) == "Component"]
# The deployable examples and variants: every top-level directory of deploy/examples.
EXAMPLES = sorted(p for p in (DEPLOY / "examples").iterdir() if p.is_dir())


def _id(directory: Path) -> str:
    return directory.relative_to(DEPLOY).as_posix()


@functools.cache
def _render_cached(directory: Path, kubectl: str) -> tuple[Doc, ...]:
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {_id(directory)} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def render(directory: Path) -> tuple[Doc, ...]:
    """The rendered manifests of one kustomization (cached: each builds once per session)."""
    return _render_cached(directory, require_tool("kubectl"))


def by_kind(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def the_deployment(docs: tuple[Doc, ...]) -> Doc:
    (deployment,) = by_kind(docs, "Deployment")
    return deployment


def pod_spec(docs: tuple[Doc, ...]) -> Doc:
    spec: Doc = the_deployment(docs)["spec"]["template"]["spec"]
    return spec


def all_containers(spec: Doc) -> Iterator[tuple[str, Doc]]:
    for key in ("initContainers", "containers"):
        for container in spec.get(key, []):
            yield key, container


def sidecar(docs: tuple[Doc, ...]) -> tuple[str, Doc]:
    """The sidecar container and whether it sits in initContainers or containers."""
    found = [(key, c) for key, c in all_containers(pod_spec(docs)) if c["name"] == SIDECAR]
    assert len(found) == 1, f"expected one {SIDECAR} container, found {len(found)}"
    return found[0]


def model_container(docs: tuple[Doc, ...]) -> Doc:
    models: list[Doc] = [
        c for c in pod_spec(docs)["containers"] if not c["name"].startswith("llm-energy")
    ]
    (model,) = models
    return model


def sidecar_environment(docs: tuple[Doc, ...], container: Doc) -> dict[str, Doc]:
    """Every environment variable of ``container``: envFrom ConfigMaps first, env on top."""
    configmaps = {c["metadata"]["name"]: c for c in by_kind(docs, "ConfigMap")}
    out: dict[str, Doc] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"envFrom names ConfigMap {name!r}, which is not rendered"
        for key, value in configmaps[name].get("data", {}).items():
            out[key] = {"name": key, "value": value}
    for var in container.get("env", []):
        out[var["name"]] = var
    return out


DOWNWARD_API = {
    "status.hostIP": "10.0.0.7",
    "metadata.name": "vllm-7d9f8-abcde",
    "metadata.namespace": "llm",
}


def env_value(var: Doc) -> str:
    """A variable's value as the kubelet sets it; downward-API fields and Secrets get stand-ins."""
    if "value" in var:
        return str(var["value"])
    source = var["valueFrom"]
    if "fieldRef" in source:
        return DOWNWARD_API[source["fieldRef"]["fieldPath"]]
    assert "secretKeyRef" in source, var
    return "stand-in-secret"


def port_number(container: Doc, port: int | str) -> int:
    """A probe's port as a number: names resolve among the container's own ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == port]
    return int(number)


# --------------------------------------------------------------------------- build


@pytest.mark.integration
@pytest.mark.parametrize("directory", BUILDABLE, ids=_id)
def test_kustomization_builds(directory: Path) -> None:
    """`kubectl kustomize` builds it and it renders at least one manifest."""
    assert render(directory)


def test_every_component_is_used_by_a_kustomization() -> None:
    """A component cannot be built alone, so each must be reached from a buildable one."""
    used: set[Path] = set()
    for directory in _kustomizations():
        spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
        used.update((directory / c).resolve() for c in spec.get("components", []))
    for component in COMPONENTS:
        assert component.resolve() in used, f"{_id(component)} is not used by any kustomization"


def test_examples_and_variants_are_present() -> None:
    """The examples the docs walk through exist, including a pre-1.29 plain-container one."""
    names = {p.name for p in EXAMPLES}
    assert {"vllm-proxy", "vllm-observer", "dcgm", "vllm-proxy-plain-container"} <= names
    assert (DEPLOY / "variants" / "plain-container").is_dir()
    assert (DEPLOY / "base").is_dir()


# --------------------------------------------------------------------------- schemas


@pytest.mark.integration
@pytest.mark.parametrize("directory", BUILDABLE, ids=_id)
def test_builtin_kinds_validate_against_kubernetes_schemas(directory: Path) -> None:
    """Built-in kinds pass the 1.31 schemas strictly; only known CRD groups lack one."""
    for doc in render(directory):
        group = doc["apiVersion"].rpartition("/")[0]
        if group in CRD_GROUPS:
            continue
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{_id(directory)}: {name} is invalid: {e}")


@pytest.mark.integration
def test_prometheus_rule_groups_pass_promtool(tmp_path: Path) -> None:
    """The PrometheusRule's groups, extracted to a plain rule file, pass `promtool check rules`."""
    promtool = require_tool("promtool")
    rules = [doc for d in BUILDABLE for doc in by_kind(render(d), "PrometheusRule")]
    assert rules, "no PrometheusRule is rendered anywhere under deploy/"
    for i, rule in enumerate(rules):
        path = tmp_path / f"rules-{i}.yml"
        path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
        done = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration
def test_monitoring_reuses_the_rules_and_dashboards() -> None:
    """deploy/monitoring carries rules.yml's groups and the Grafana-labelled dashboards."""
    docs = render(DEPLOY / "monitoring")
    (rule,) = by_kind(docs, "PrometheusRule")
    plain = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    assert rule["spec"]["groups"] == plain["groups"]
    (dashboards,) = by_kind(docs, "ConfigMap")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert any(key.endswith(".json") for key in dashboards["data"])
    for doc in docs:
        assert doc["metadata"]["namespace"] == "monitoring"
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# --------------------------------------------------------------------------- the sidecar


HARDENED = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
}


@pytest.mark.integration
@pytest.mark.parametrize("directory", EXAMPLES, ids=_id)
class TestSidecar:
    """The sidecar as every example and variant deploys it."""

    def test_every_added_container_is_hardened(self, directory: Path) -> None:
        """Our containers: non-root uid, read-only root, no escalation, no capabilities, seccomp."""
        ours = [c for _, c in all_containers(pod_spec(render(directory)))]
        ours = [c for c in ours if c["name"].startswith("llm-energy")]
        assert any(c["name"] == SIDECAR for c in ours)
        for container in ours:
            context = container["securityContext"]
            for key, value in HARDENED.items():
                assert context[key] == value, (container["name"], key)
            assert context["runAsUser"] > 0
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "add" not in context["capabilities"]
            assert context["seccompProfile"]["type"] == "RuntimeDefault"
            assert "privileged" not in context or context["privileged"] is False

    def test_resources_have_requests_and_limits(self, directory: Path) -> None:
        """CPU and memory requests and limits are set; the sidecar requests no GPU."""
        _, container = sidecar(render(directory))
        resources = container["resources"]
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[section]), section
            assert not any("gpu" in key for key in resources[section]), section

    def test_probes_use_the_metrics_port(self, directory: Path) -> None:
        """Startup and liveness probe /healthz, readiness /readyz, all on the metrics port."""
        _, container = sidecar(render(directory))
        expected = {
            "startupProbe": "/healthz",
            "livenessProbe": "/healthz",
            "readinessProbe": "/readyz",
        }
        for probe, path in expected.items():
            get = container[probe]["httpGet"]
            assert get["path"] == path, probe
            assert port_number(container, get["port"]) == METRICS_PORT, probe

    def test_native_sidecar_or_plain_container_with_pre_stop(self, directory: Path) -> None:
        """Native: an init container with restartPolicy Always; plain: a container with preStop."""
        key, container = sidecar(render(directory))
        if "plain-container" in directory.name:
            assert key == "containers"
            assert "restartPolicy" not in container
            assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
        else:
            assert key == "initContainers"
            assert container["restartPolicy"] == "Always"

    def test_termination_grace_outlasts_the_drain(self, directory: Path) -> None:
        """terminationGracePeriodSeconds exceeds the preStop pause plus --grace-period."""
        docs = render(directory)
        _, container = sidecar(docs)
        env = sidecar_environment(docs, container)
        grace_s = float(env[ENV_PREFIX + "GRACE_PERIOD"]["value"])
        pause = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        pause_s = float(pause["command"][1]) if pause else 0.0
        assert pod_spec(docs)["terminationGracePeriodSeconds"] > pause_s + grace_s

    def test_settings_come_from_a_configmap_and_the_token_from_a_secret(
        self, directory: Path
    ) -> None:
        """envFrom a ConfigMap of LLM_ENERGY_* keys; the Electricity Maps token from a Secret."""
        docs = render(directory)
        _, container = sidecar(docs)
        assert [s for s in container["envFrom"] if "configMapRef" in s]
        token = sidecar_environment(docs, container)[ENV_PREFIX + "CARBON_API_TOKEN"]
        assert "secretKeyRef" in token["valueFrom"]

    def test_args_and_env_are_ones_the_sidecar_accepts(
        self, directory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The container's args parse with `run`'s parser and its env loads into Settings."""
        docs = render(directory)
        _, container = sidecar(docs)
        env = sidecar_environment(docs, container)
        names = {f.upper() for f in Settings.model_fields} | CREDENTIALS
        for name in env:
            if name.startswith(ENV_PREFIX):
                assert name.removeprefix(ENV_PREFIX) in names, f"unknown setting {name}"

        # Kubelet-style $(VAR) expansion; Secrets and the downward API get stand-ins.
        values = {name: env_value(var) for name, var in env.items()}
        args = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in container["args"]]
        parsed = build_parser().parse_args(args)
        assert parsed.command == "run"
        flags = {k: v for k, v in vars(parsed).items() if k not in ("handler", "command", "config")}
        config = getattr(parsed, "config", None)
        if config is not None:  # written by the llm-energy-model-gpus init container
            config = tmp_path / "gpus.yaml"
            config.write_text(model_gpus_output(docs, "GPU-1111,GPU-2222", tmp_path))

        for name in list(os.environ):
            if name.startswith(ENV_PREFIX):
                monkeypatch.delenv(name)
        for name, value in values.items():
            if name.startswith(ENV_PREFIX):
                monkeypatch.setenv(name, value)
        settings = load_settings(flags, config)
        if config is not None:
            assert settings.gpus == ("GPU-1111", "GPU-2222")
        assert settings.mode == ("observer" if "observer" in directory.name else "proxy")
        assert settings.metrics_listen.endswith(f":{METRICS_PORT}")

    def test_pod_monitor_and_network_policy_select_the_pod(self, directory: Path) -> None:
        """The PodMonitor scrapes the metrics port by name; the NetworkPolicy guards it."""
        docs = render(directory)
        labels = the_deployment(docs)["spec"]["template"]["metadata"]["labels"]
        _, container = sidecar(docs)
        (monitor,) = by_kind(docs, "PodMonitor")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert port_number(container, endpoint["port"]) == METRICS_PORT
        assert endpoint["path"] == "/metrics"
        (policy,) = by_kind(docs, "NetworkPolicy")
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        guarded = [r for r in policy["spec"]["ingress"] if "from" in r]
        assert [p["port"] for r in guarded for p in r["ports"]] == [METRICS_PORT]

    def test_service_ports_stay_open_under_the_network_policy(self, directory: Path) -> None:
        """Every port a Service targets is allowed from anywhere (the policy isolates the pod)."""
        docs = render(directory)
        (policy,) = by_kind(docs, "NetworkPolicy")
        open_ports = {
            p["port"] for r in policy["spec"]["ingress"] if "from" not in r for p in r["ports"]
        }
        containers = [c for _, c in all_containers(pod_spec(docs))]
        for service in by_kind(docs, "Service"):
            for port in service["spec"]["ports"]:
                target = port["targetPort"]
                if isinstance(target, str):
                    (target,) = [
                        p["containerPort"]
                        for c in containers
                        for p in c.get("ports", [])
                        if p["name"] == target
                    ]
                assert target in open_ports, (service["metadata"]["name"], target)


def model_gpus_output(docs: tuple[Doc, ...], devices: str | None, tmp_path: Path) -> str:
    """Run the llm-energy-model-gpus init container's script; return the file it writes."""
    (init,) = [c for c in pod_spec(docs)["initContainers"] if c["name"] == "llm-energy-model-gpus"]
    (mount,) = init["volumeMounts"]
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    script = init["command"][2].replace(mount["mountPath"], str(out))
    env = {"PATH": "/usr/bin:/bin"}
    if devices is not None:
        env["NVIDIA_VISIBLE_DEVICES"] = devices
    done = subprocess.run(
        [*init["command"][:2], script], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip())
    return (out / "gpus.yaml").read_text()


# --------------------------------------------------------------------------- per example


@pytest.mark.integration
class TestExamples:
    """What distinguishes each example."""

    def test_vllm_proxy_routes_clients_and_probes_through_the_sidecar(self) -> None:
        """vLLM binds loopback; the Service and vLLM's probes use the proxy port."""
        docs = render(DEPLOY / "examples" / "vllm-proxy")
        vllm = model_container(docs)
        assert "--host=127.0.0.1" in vllm["args"]
        assert "ports" not in vllm
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert vllm[probe]["httpGet"] == {"path": "/health", "port": PROXY_PORT}
        (service,) = by_kind(docs, "Service")
        assert [p["targetPort"] for p in service["spec"]["ports"]] == [PROXY_PORT]
        _, container = sidecar(docs)
        env = sidecar_environment(docs, container)
        assert env[ENV_PREFIX + "UPSTREAM"]["value"] == "http://127.0.0.1:8000"
        assert ENV_PREFIX + "OBSERVE" not in env

    def test_vllm_observer_leaves_the_request_path_alone(self) -> None:
        """The Service targets vLLM; the sidecar observes vLLM's /metrics and has no proxy port."""
        docs = render(DEPLOY / "examples" / "vllm-observer")
        vllm = model_container(docs)
        (service,) = by_kind(docs, "Service")
        (port,) = service["spec"]["ports"]
        assert port_number(vllm, port["targetPort"]) == 8000
        _, container = sidecar(docs)
        env = sidecar_environment(docs, container)
        assert env[ENV_PREFIX + "OBSERVE"]["value"] == "http://127.0.0.1:8000/metrics"
        assert ENV_PREFIX + "UPSTREAM" not in env
        assert PROXY_PORT not in [p["containerPort"] for p in container["ports"]]

    def test_dcgm_reads_the_node_exporter_without_gpu_access(self) -> None:
        """--power-source dcgm at $(HOST_IP); host IP and pod identity from the downward API."""
        docs = render(DEPLOY / "examples" / "dcgm")
        _, container = sidecar(docs)
        args = container["args"]
        assert args[args.index("--power-source") + 1] == "dcgm:http://$(HOST_IP):9400/metrics"
        env = sidecar_environment(docs, container)
        assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        assert "NVIDIA_VISIBLE_DEVICES" not in env
        names = [c["name"] for c in pod_spec(docs)["initContainers"]]
        assert "llm-energy-model-gpus" not in names

    @pytest.mark.parametrize(
        "example", ["vllm-proxy", "vllm-observer", "vllm-proxy-plain-container"]
    )
    def test_nvml_variants_see_the_node_and_meter_the_model_gpus(self, example: str) -> None:
        """NVIDIA_VISIBLE_DEVICES=all plus the model's GPUs from an init container that runs first."""
        docs = render(DEPLOY / "examples" / example)
        spec = pod_spec(docs)
        key, container = sidecar(docs)
        env = sidecar_environment(docs, container)
        assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
        names = [c["name"] for c in spec["initContainers"]]
        if key == "initContainers":
            assert names.index("llm-energy-model-gpus") < names.index(SIDECAR)
        init = spec["initContainers"][names.index("llm-energy-model-gpus")]
        gpus = model_container(docs)["resources"]["limits"]["nvidia.com/gpu"]
        assert init["resources"]["limits"]["nvidia.com/gpu"] == gpus
        config = container["args"][container["args"].index("--config") + 1]
        (mount,) = init["volumeMounts"]
        assert Path(config).parent == Path(mount["mountPath"])
        shared = {m["name"] for m in container["volumeMounts"]}
        assert mount["name"] in shared


@pytest.mark.integration
class TestModelGpusScript:
    """The init container that learns the model's GPU UUIDs from the device plugin."""

    # /bin/sh here is dash, as in the python:3.11-slim image the container runs.

    def test_writes_the_device_plugin_uuids_as_settings(self, tmp_path: Path) -> None:
        """The UUIDs in NVIDIA_VISIBLE_DEVICES become a `gpus` setting the sidecar loads."""
        docs = render(DEPLOY / "examples" / "vllm-proxy")
        text = model_gpus_output(docs, "GPU-aaaa-0001,GPU-bbbb-0002", tmp_path)
        assert yaml.safe_load(text) == {"gpus": "GPU-aaaa-0001,GPU-bbbb-0002"}

    @pytest.mark.parametrize(
        "devices", [None, "", "all", "void", "none", "/var/run/nvidia-container-devices"]
    )
    def test_refuses_when_no_gpu_list_reached_it(self, tmp_path: Path, devices: str | None) -> None:
        """No allocation, the whole node, or volume-mount passing: it fails with a hint."""
        docs = render(DEPLOY / "examples" / "vllm-proxy")
        with pytest.raises(RuntimeError, match="dcgm"):
            model_gpus_output(docs, devices, tmp_path)
