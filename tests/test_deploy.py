"""deploy/ checked offline: Kubernetes manifests against the Kubernetes schemas, the systemd unit with
``systemd-analyze verify``, the compose file parsed; and every place they name something the gateway serves or
reads (probe paths, ports, the command, config and pid files, writable directories, filter modules) cross-checked
against the gateway's own config handling. No image is built: the Dockerfile's compile step is replayed here."""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from wasm_gateway.config import GatewayConfig, load_config

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
CONTAINER = DEPLOY / "container"
SYSTEMD = DEPLOY / "systemd"
GRAFANA = ROOT / "grafana"
# Oldest Kubernetes still commonly run, and the newest the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", "latest")
FILTERS_IN_IMAGE = Path("/opt/wasm-gateway/filters")
BUNDLED = sorted(p.stem for p in (ROOT / "wasm_gateway" / "filters").glob("*.wasm"))


# -- Kubernetes ---------------------------------------------------------------------------------------------------


def render_kustomization() -> list[dict[str, Any]]:
    """What ``kubectl kustomize deploy/kubernetes`` makes of the parts this kustomization uses: its resources,
    its generated ConfigMaps, its image overrides and labels."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / resource).read_text()) if d]
    for generator in kustomization.get("configMapGenerator", []):
        data = {Path(f).name: (K8S / f).read_text() for f in generator["files"]}
        docs.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}
        )
    images = {
        i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in kustomization.get("images", [])
    }
    for doc in docs:
        for container in pod_spec(doc).get("containers", []) if doc["kind"] == "Deployment" else []:
            container["image"] = images.get(container["image"], container["image"])
        for pairs in kustomization.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(pairs["pairs"])
    return docs


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return render_kustomization()


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def versions() -> list[str]:
    from kubernetes_validate.utils import latest_version

    return [latest_version() if v == "latest" else v for v in K8S_VERSIONS]


def test_kubernetes_manifests_validate_against_the_schemas(manifests: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    kinds = sorted(d["kind"] for d in manifests)
    expected = ["ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    assert kinds == sorted([*expected, "Service", "Service", "ServiceMonitor"])
    for doc in manifests:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in kubernetes-validate; checked structurally below
        for version in versions():
            kubernetes_validate.validate(doc, version, strict=True)

    # The validator really looks (offline, from its bundled schemas): a misspelt probe field fails.
    broken = copy.deepcopy(find(manifests, "Deployment", "wasm-gateway"))
    pod_spec(broken)["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, versions()[0], strict=True)


def test_kustomize_builds_the_same_objects(manifests: list[dict[str, Any]]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomization is rendered by render_kustomization() only")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in manifests
    )
    deployment = find(built, "Deployment", "wasm-gateway")
    assert deployment == find(manifests, "Deployment", "wasm-gateway")
    assert (
        find(built, "ConfigMap", "wasm-gateway-config")["data"]
        == find(manifests, "ConfigMap", "wasm-gateway-config")["data"]
    )


def gateway_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(find(manifests, "Deployment", "wasm-gateway"))["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def k8s_config(
    manifests: list[dict[str, Any]], tmp_path: Path, precompiled: Path
) -> tuple[GatewayConfig, Path]:
    """The gateway config the pod reads: the ConfigMap data at its mount path, with the pod's environment."""
    deployment = find(manifests, "Deployment", "wasm-gateway")
    container = gateway_container(manifests)
    command = container["command"]
    assert command[:2] == ["wasm-gateway", "serve"]
    config_path = Path(command[command.index("--config") + 1])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    mount = next(m for m in mounts.values() if Path(m["mountPath"]) == config_path.parent)
    config_map = find(manifests, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    assert config_path.name in config_map["data"]
    text = config_map["data"][config_path.name]
    check_filters_are_precompiled_in_image(text)
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    return load_deploy_config(text, tmp_path, precompiled, env), config_path


def load_deploy_config(text: str, tmp_path: Path, precompiled: Path, env: dict[str, str]) -> GatewayConfig:
    """A shipped config as the gateway loads it, the image's filter directory replayed in ``precompiled``."""
    local = tmp_path / "gateway.toml"
    local.write_text(text.replace(str(FILTERS_IN_IMAGE), str(precompiled)))
    return load_config(local, env={**os.environ, **env})


def test_kubernetes_names_what_the_gateway_serves_and_reads(
    manifests: list[dict[str, Any]], tmp_path: Path, precompiled: Path
) -> None:
    config, config_path = k8s_config(manifests, tmp_path, precompiled)
    deployment = find(manifests, "Deployment", "wasm-gateway")
    spec = pod_spec(deployment)
    container = gateway_container(manifests)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == config.server.port and config.server.host == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": config.server.ready_path, "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": config.server.health_path, "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == config.server.health_path
    # The command is the console script the package installs.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert container["command"][0] in scripts
    # Rolling updates that never lose capacity; drain fits in the grace period.
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate" and rolling["maxUnavailable"] == 0
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    timeouts = config.server.timeouts
    assert timeouts.drain_delay > 0
    assert (
        spec["terminationGracePeriodSeconds"]
        > float(pre_stop[1]) + timeouts.drain_delay + timeouts.graceful_shutdown
    )
    # Read-only root: everything the gateway writes lives on a mounted volume.
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert spec["securityContext"]["runAsNonRoot"]
    writable = [Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")]
    env = {e["name"]: e["value"] for e in container["env"]}
    for path in (config.cache_dir, Path(env["TMPDIR"])):
        assert path is not None and any(path == w or w in path.parents for w in writable), path
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    # Hot reload by watching the mounted ConfigMap file.
    assert config.server.watch_config and Path(config.source).name == config_path.name
    # Service -> pods, HPA/PDB -> the Deployment, ServiceMonitor -> Service.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = find(manifests, "Service", "wasm-gateway")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert (
        find(manifests, "PodDisruptionBudget", "wasm-gateway")["spec"]["selector"]["matchLabels"].items()
        <= labels.items()
    )
    target = find(manifests, "HorizontalPodAutoscaler", "wasm-gateway")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "wasm-gateway")
    monitor = find(manifests, "ServiceMonitor", "wasm-gateway")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports and endpoint["path"] == config.metrics.path
    assert config.metrics.enabled and config.metrics.port is None  # scraped on the http port
    # Replicas share limits through the Redis the kustomization ships.
    assert config.state.backend == "redis"
    redis_service = find(manifests, "Service", "wasm-gateway-redis")
    m = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", config.state.redis_url)
    assert m and m.group(1) == redis_service["metadata"]["name"]
    assert int(m.group(2)) in {p["port"] for p in redis_service["spec"]["ports"]}
    redis = find(manifests, "Deployment", "wasm-gateway-redis")
    assert (
        redis_service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    )


# -- container ----------------------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (CONTAINER / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def container_config(tmp_path: Path, precompiled: Path) -> GatewayConfig:
    compose = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    env = compose["services"]["gateway"]["environment"]
    text = (CONTAINER / "config" / "gateway.toml").read_text()
    check_filters_are_precompiled_in_image(text)
    return load_deploy_config(text, tmp_path, precompiled, env)


def check_filters_are_precompiled_in_image(config_text: str) -> None:
    filters = tomllib.loads(config_text)["filters"]
    assert filters
    for name, f in filters.items():
        module = Path(f["module"])
        assert module.parent == FILTERS_IN_IMAGE, f"{name}: {module} is not a filter precompiled in the image"
        assert module.suffix == ".cwasm" and module.stem in BUNDLED, module


def test_dockerfile_is_multi_stage_non_root_and_matches_the_config(tmp_path: Path, precompiled: Path) -> None:
    steps = dockerfile()
    assert sum(word == "FROM" for word, _ in steps) >= 2
    final = final_stage()
    config = container_config(tmp_path, precompiled)
    user = [rest for word, rest in final if word == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert [rest for word, rest in final if word == "EXPOSE"] == [str(config.server.port)]
    healthcheck = next(rest for word, rest in final if word == "HEALTHCHECK")
    assert f"http://127.0.0.1:{config.server.port}{config.server.health_path}" in healthcheck
    entrypoint = yaml.safe_load(next(rest for word, rest in final if word == "ENTRYPOINT"))
    cmd = yaml.safe_load(next(rest for word, rest in final if word == "CMD"))
    assert entrypoint == ["wasm-gateway"] and cmd[:1] == ["serve"]
    image_config = Path(cmd[cmd.index("--config") + 1])
    copies = [rest.split() for word, rest in steps if word == "COPY" and not rest.startswith("--from")]
    assert ["deploy/container/config/gateway.toml", str(image_config)] in copies
    for source, *_ in copies:
        assert (ROOT / source).exists(), source
    ignored = (CONTAINER / "Dockerfile.dockerignore").read_text().split()
    for source, *_ in copies:  # the build context keeps what COPY needs
        assert any(
            source == p[1:].rstrip("/") or source.startswith(p[1:]) for p in ignored if p.startswith("!")
        ), source
    # The compile step covers the bundled filters and writes where configs look for them.
    compile_step = next(rest for word, rest in steps if word == "RUN" and "wasm-gateway compile" in rest)
    assert str(FILTERS_IN_IMAGE) in compile_step and "wasm_gateway.filters" in compile_step
    assert any(word == "RUN" and "wasm-gateway check --config" in rest for word, rest in steps)
    assert config.server.pid_file is not None and config.server.pid_file.parent == Path("/tmp")


def precompile_like_the_dockerfile(out: Path) -> None:
    for name in BUNDLED:
        module = ROOT / "wasm_gateway" / "filters" / f"{name}.wasm"
        result = subprocess.run(
            [sys.executable, "-m", "wasm_gateway", "compile", str(module), "-o", str(out / f"{name}.cwasm")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def precompiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("filters")
    precompile_like_the_dockerfile(out)
    return out


@pytest.mark.parametrize(
    "config_file", [CONTAINER / "config" / "gateway.toml", K8S / "gateway.toml", SYSTEMD / "gateway.toml"]
)
def test_deploy_configs_load_with_their_filters(config_file: Path, precompiled: Path, tmp_path: Path) -> None:
    """`wasm-gateway check` on each shipped config, with the image's filter directory replayed locally."""
    local = tmp_path / "gateway.toml"
    local.write_text(config_file.read_text().replace(str(FILTERS_IN_IMAGE), str(precompiled)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WASM_GATEWAY_ORIGIN": "127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, "-m", "wasm_gateway", "check", "--config", str(local)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_compose_stack_references_the_same_images_ports_and_files(
    manifests: list[dict[str, Any]], tmp_path: Path, precompiled: Path
) -> None:
    compose = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"gateway", "origin", "redis", "prometheus", "grafana"}
    gateway = services["gateway"]
    config = container_config(tmp_path, precompiled)
    # One image: the one the Dockerfile builds, the origin runs, and Kubernetes deploys.
    assert services["origin"]["image"] == gateway["image"] == gateway_container(manifests)["image"]
    build = gateway["build"]
    assert (CONTAINER / build["context"] / build["dockerfile"]).resolve() == (
        CONTAINER / "Dockerfile"
    ).resolve()
    assert f"{config.server.port}:{config.server.port}" in gateway["ports"]
    # Config directory mounted where the image's command reads it.
    cmd = yaml.safe_load(next(rest for word, rest in final_stage() if word == "CMD"))
    image_config = Path(cmd[cmd.index("--config") + 1])
    mounts = {Path(v.split(":")[1]): v.split(":")[0] for v in gateway["volumes"]}
    assert (CONTAINER / mounts[image_config.parent] / image_config.name).is_file()
    assert config.server.watch_config
    assert config.cache_dir in mounts  # writable named volume on a read-only container
    assert gateway["read_only"] and any(t.startswith("/tmp") for t in gateway["tmpfs"])
    grace = float(gateway["stop_grace_period"].rstrip("s"))
    assert grace > config.server.timeouts.drain_delay + config.server.timeouts.graceful_shutdown
    # Origin and Redis as the config names them.
    origin_cmd = services["origin"]["command"]
    origin_port = origin_cmd[origin_cmd.index("--port") + 1]
    assert config.upstreams["origin"].targets[0].authority == f"origin:{origin_port}"
    assert re.fullmatch(r"redis://redis:6379/\d+", config.state.redis_url)
    # Prometheus scrapes the gateway's metrics path with the job name the alert rules use.
    prometheus = yaml.safe_load((CONTAINER / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["job_name"] == "wasm-gateway" and job["metrics_path"] == config.metrics.path
    assert job["static_configs"][0]["targets"] == [f"gateway:{config.server.port}"]
    mounted = {}
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source, target = volume.split(":")[:2]
            mounted[target] = CONTAINER / source
    for rules in prometheus["rule_files"]:
        assert rules in mounted
    datasource = yaml.safe_load((CONTAINER / "grafana-datasource.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    missing = [str(p.resolve().relative_to(ROOT)) for p in mounted.values() if not p.resolve().exists()]
    in_grafana = [p for p in missing if p.startswith("grafana/")]
    assert [p for p in missing if p not in in_grafana] == []
    if not GRAFANA.is_dir():
        pytest.skip(f"grafana/ is not in this checkout; the stack mounts {in_grafana} from it")
    assert in_grafana == []
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "wasm-gateway.yml").read_text())
    dashboards_at = Path(provider["providers"][0]["options"]["path"])
    assert dashboards_at in {Path(t) for t in mounted}


# -- systemd ------------------------------------------------------------------------------------------------------


def unit() -> dict[str, list[str]]:
    """Directive -> values (a directive may repeat) of deploy/systemd/wasm-gateway.service."""
    values: dict[str, list[str]] = {}
    for line in (SYSTEMD / "wasm-gateway.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@pytest.fixture
def stub_install(tmp_path: Path) -> Iterator[Path]:
    """The unit with its executable path pointed at a stub (verify checks that ExecStart= exists)."""
    stub = tmp_path / "wasm-gateway"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    text = (
        (SYSTEMD / "wasm-gateway.service")
        .read_text()
        .replace("/opt/wasm-gateway/bin/wasm-gateway", str(stub))
    )
    path = tmp_path / "wasm-gateway.service"
    path.write_text(text)
    yield path


def test_systemd_unit_passes_systemd_analyze_verify(stub_install: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        [analyze, "verify", str(stub_install)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys too: any warning counts.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    bad = stub_install.with_name("bad.service")
    bad.write_text(stub_install.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    result = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in result.stdout + result.stderr  # the verify step does look


def test_systemd_unit_env_file_and_config_agree() -> None:
    u = unit()
    assert u["Restart"] == ["always"] and u["ProtectSystem"] == ["strict"] and u["NoNewPrivileges"] == ["yes"]
    assert u["User"] and u["User"] != ["root"] and int(u["LimitNOFILE"][0]) >= 65536
    assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    env_file = Path(u["EnvironmentFile"][0].lstrip("-"))
    assert env_file.name == "wasm-gateway.env"
    env = dict(
        line.split("=", 1)
        for line in (SYSTEMD / "wasm-gateway.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    exec_start = shlex.split(u["ExecStart"][0])
    assert exec_start[1] == "serve"
    assert exec_start[exec_start.index("--config") + 1] == "${WASM_GATEWAY_CONFIG}"
    config_path = Path(env["WASM_GATEWAY_CONFIG"])
    assert config_path.name == "gateway.toml" and config_path.parent == env_file.parent
    config = load_config(SYSTEMD / "gateway.toml")
    pid_file = Path(exec_start[exec_start.index("--pid-file") + 1])
    assert config.server.pid_file == pid_file  # `wasm-gateway reload -c` finds the same pid
    # ProtectSystem=strict: the gateway writes only under the directories the unit grants.
    writable = [Path("/var/cache") / d for d in u["CacheDirectory"]]
    writable += [Path("/var/lib") / d for d in u["StateDirectory"]]
    writable += [Path("/run") / d for d in u["RuntimeDirectory"]]
    environment = dict(e.split("=", 1) for e in u["Environment"])
    for path in (
        config.cache_dir,
        config.state.directory,
        pid_file,
        Path(environment["PROMETHEUS_MULTIPROC_DIR"]),
    ):
        assert path is not None and any(w in path.parents for w in writable), path
    timeouts = config.server.timeouts
    assert float(u["TimeoutStopSec"][0]) > timeouts.drain_delay + timeouts.graceful_shutdown
    assert u["KillSignal"] == ["SIGTERM"]
