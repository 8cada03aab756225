"""The compose file is validated, not run: there is no Docker engine in CI.

The compose spec schema checks the syntax; the structural tests check the
promises the file makes to the images (tests/deploy/test_images.py checks the
Dockerfile and its locks) and to operators, and compose_local runs its services
as local processes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_local import LocalProcess, compose_services_as_local_processes, interpolate

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
COLLECTOR = REPO / "docker" / "otel-collector.yaml"

LLMSUITE_COMMANDS = {"llmsuite-tokenizer", "llmsuite-inference", "llmsuite-gateway"}


def tool(name: str) -> str:
    """A linter installed beside this interpreter (the dev extra), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (make setup installs it from requirements-dev.txt)")
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: dict[str, Any], variables: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment as the container would see it, with compose defaults."""
    env = service.get("environment") or {}
    return {k: interpolate(str(v), variables or {}) for k, v in env.items() if v is not None}


def is_llmsuite(service: dict[str, Any]) -> bool:
    return bool(service.get("command")) and service["command"][0] in LLMSUITE_COMMANDS


def listen_port(service: dict[str, Any]) -> int:
    return int(env_of(service)["LLMSUITE_LISTEN"].rsplit(":", 1)[1])


# --- linters -------------------------------------------------------------------

def test_compose_file_matches_the_compose_spec() -> None:
    result = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose structure -------------------------------------------------------------

def test_every_service_declares_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        if check.get("disable"):
            # Only third-party images without a probe tool may opt out, explicitly.
            assert "build" not in service and not is_llmsuite(service), f"{name} must not disable its healthcheck"


def test_llmsuite_services_probe_grpc_health_on_their_own_port(services: dict[str, dict[str, Any]]) -> None:
    ours = {name: s for name, s in services.items() if is_llmsuite(s)}
    assert set(ours) == {"tokenizer", "inference", "inference-gpu", "gateway"}
    for name, service in ours.items():
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "llmsuite", "health"], f"{name}: {test}"
        assert test[test.index("--address") + 1] == f"localhost:{listen_port(service)}", name


def test_gateway_waits_for_healthy_upstreams_it_is_pointed_at(services: dict[str, dict[str, Any]]) -> None:
    gateway = services["gateway"]
    deps = gateway["depends_on"]
    for upstream in ("tokenizer", "inference"):
        assert deps[upstream]["condition"] == "service_healthy"
        assert deps[upstream].get("required", True) is True
    assert deps["inference-gpu"] == {"condition": "service_healthy", "required": False}
    env = env_of(gateway)
    assert env["LLMSUITE_TOKENIZER"] == f"tokenizer:{listen_port(services['tokenizer'])}"
    assert env["LLMSUITE_INFERENCE"] == f"inference:{listen_port(services['inference'])}"
    gpu = env_of(gateway, {"LLMSUITE_INFERENCE": "inference-gpu:50052"})["LLMSUITE_INFERENCE"]
    assert gpu == f"inference-gpu:{listen_port(services['inference-gpu'])}"


def test_only_the_gateway_is_published(services: dict[str, dict[str, Any]]) -> None:
    published = {name for name, s in services.items() if is_llmsuite(s) and s.get("ports")}
    assert published == {"gateway"}
    assert services["gateway"]["ports"] == [f"50050:{listen_port(services['gateway'])}"]


def test_each_service_builds_and_runs_its_own_image(services: dict[str, dict[str, Any]]) -> None:
    """One Dockerfile target per service (tests/deploy/test_images.py checks what each installs)."""
    version = tomllib.loads((REPO / "services" / "suite" / "pyproject.toml").read_text())["project"]["version"]
    for name, service in services.items():
        if not is_llmsuite(service):
            continue
        target = service["build"]["target"]
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert service["image"] == f"llmsuite-{target}:{version}", name
        assert service["command"] == [f"llmsuite-{target.removesuffix('-gpu')}"], name
        assert target == name, f"{name} must build the {name} target"


def test_gpu_inference_exists_only_under_the_gpu_profile(services: dict[str, dict[str, Any]]) -> None:
    gpu = services["inference-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["target"] == "inference-gpu"
    assert env_of(gpu)["LLMSUITE_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name, service in services.items():
        if name == "inference-gpu":
            continue
        assert "gpu" not in (service.get("profiles") or []), name
        assert "deploy" not in service, f"{name} reserves devices"
        assert env_of(service).get("LLMSUITE_DEVICE", "cpu") == "cpu", name
        if "build" in service:
            assert service["build"]["target"] != "inference-gpu", name


def test_default_profile_is_the_cpu_cluster(services: dict[str, dict[str, Any]]) -> None:
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert default == {"tokenizer", "inference", "gateway", "openai"}


def test_no_service_downloads_a_model(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if not is_llmsuite(service):
            continue
        env = env_of(service)
        # Models are served from /models, which the image build fills ...
        model = env.get("LLMSUITE_MODEL")
        if model is not None:
            for spec in model.split(","):
                assert re.fullmatch(r"[\w.-]+=/models/[\w.-]+", spec), f"{name}: {spec}"
        # ... and nothing replaces that directory or fetches from outside.
        for volume in service.get("volumes") or []:
            target = volume.split(":")[1] if isinstance(volume, str) else volume["target"]
            assert not target.startswith("/models"), f"{name} mounts over the built-in models"
        for word in [*(service.get("command") or []), *env.values()]:
            if word != env.get("LLMSUITE_OTEL_ENDPOINT"):
                assert "://" not in word and "huggingface" not in word, f"{name}: {word}"
        assert not any(k.startswith("HF_") for k in env), f"{name} configures hub access"


# --- shared rate limits -------------------------------------------------------------

def test_redis_for_shared_rate_limits_is_an_opt_in_profile_the_gateway_can_use(
        services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    redis = services["redis"]
    assert redis["profiles"] == ["shared-limits"], "one gateway's in-memory limits need no Redis"
    name, _, tag = redis["image"].partition(":")
    assert name == "redis" and tag.split(".")[0] == "7" and tag.endswith("-alpine"), redis["image"]
    flags = dict(zip(redis["command"][1::2], redis["command"][2::2], strict=True))
    assert redis["command"][0] == "redis-server" and flags["--save"] == "" and flags["--appendonly"] == "no"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis, "the rate-limit store is for the gateways, not the host"
    gateway = services["gateway"]
    assert gateway["depends_on"]["redis"] == {"condition": "service_healthy", "required": False}
    # Value-less: unset by default (limits in the gateway), else taken from the shell or .env.
    assert gateway["environment"]["LLMSUITE_RATE_LIMIT_STORAGE"] is None
    url = f"redis://redis:{redis['expose'][0]}/0"
    procs = compose_services_as_local_processes(COMPOSE, PORTS, local_models(tmp_path),
                                                variables={"LLMSUITE_RATE_LIMIT_STORAGE": url})
    assert next(p for p in procs if p.name == "gateway").env["LLMSUITE_RATE_LIMIT_STORAGE"] == url
    from llmsuite.gateway.__main__ import build_parser
    from llmsuite.runtime.settings import env_name

    flags_of_gateway = {env_name(o) for a in build_parser()._actions for o in a.option_strings if o.startswith("--")}
    passed_through = [k for k, v in (gateway["environment"] or {}).items() if k.startswith("LLMSUITE_")]
    assert set(passed_through) <= flags_of_gateway, "every LLMSUITE_* variable is a gateway flag"


# --- observability -------------------------------------------------------------------

def test_tracing_is_off_by_default_and_points_at_the_collector(services: dict[str, dict[str, Any]]) -> None:
    collector = services["otel-collector"]
    jaeger = services["jaeger"]
    assert collector["profiles"] == ["observability"] == jaeger["profiles"]
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:")
    config = yaml.safe_load(COLLECTOR.read_text())
    grpc_port = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1]
    for name, service in services.items():
        if is_llmsuite(service):
            env = env_of(service)
            assert env["LLMSUITE_OTEL_EXPORTER"] == "none", name
            assert env["LLMSUITE_OTEL_ENDPOINT"] == f"http://otel-collector:{grpc_port}", name
            assert env_of(service, {"LLMSUITE_OTEL_EXPORTER": "otlp"})["LLMSUITE_OTEL_EXPORTER"] == "otlp"
            assert "otel-collector" not in (service.get("depends_on") or {}), f"{name} must not need the collector"


def test_collector_config_is_mounted_and_wired_to_jaeger(services: dict[str, dict[str, Any]]) -> None:
    collector = services["otel-collector"]
    source, target = collector["volumes"][0].split(":")[:2]
    assert (REPO / source).resolve() == COLLECTOR.resolve()
    assert collector["command"] == [f"--config={target}"]
    config = yaml.safe_load(COLLECTOR.read_text())
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"pipeline uses undefined {kind[:-1]} {component}"
    for ext in config["service"].get("extensions", []):
        assert ext in config["extensions"]
    exporters = [config["exporters"][e] for e in config["service"]["pipelines"]["traces"]["exporters"]]
    assert any(e.get("endpoint", "").split(":")[0] == "jaeger" for e in exporters)
    assert any("4317" in arg for arg in services["jaeger"]["command"]), "jaeger must accept OTLP gRPC on 4317"


# --- compose_local ---------------------------------------------------------------------

PORTS = {50050: 41000, 50051: 41001, 50052: 41002, 8000: 41003}


def local_models(root: Path) -> dict[str, Path]:
    return {"tiny": root / "tiny", "tiny-embed": root / "tiny-embed"}


def test_local_processes_mirror_compose(tmp_path: Path) -> None:
    procs = compose_services_as_local_processes(COMPOSE, PORTS, local_models(tmp_path))
    by_name = {p.name: p for p in procs}
    assert [p.name for p in procs][-2:] == ["gateway", "openai"], "upstreams start first"
    assert set(by_name) == {"tokenizer", "inference", "gateway", "openai"}
    assert by_name["tokenizer"] == LocalProcess("tokenizer", ["llmsuite-tokenizer"], {
        "LLMSUITE_LISTEN": "127.0.0.1:41001",
        "LLMSUITE_MODEL": f"tiny={tmp_path / 'tiny'},tiny-embed={tmp_path / 'tiny-embed'}",
        "LLMSUITE_OTEL_EXPORTER": "none",
        "LLMSUITE_OTEL_ENDPOINT": "http://otel-collector:4317",
    })
    assert by_name["inference"].env["LLMSUITE_DEVICE"] == "cpu"
    gateway = by_name["gateway"].env
    assert gateway["LLMSUITE_LISTEN"] == "127.0.0.1:41000"
    assert gateway["LLMSUITE_TOKENIZER"] == "127.0.0.1:41001"
    assert gateway["LLMSUITE_INFERENCE"] == "127.0.0.1:41002"
    assert "LLMSUITE_API_KEYS" not in gateway
    assert by_name["openai"].env == {"LLMSUITE_LISTEN": "127.0.0.1:41003", "LLMSUITE_GATEWAY": "127.0.0.1:41000"}


def test_local_processes_take_variables_like_compose(tmp_path: Path) -> None:
    procs = compose_services_as_local_processes(
        COMPOSE, PORTS, local_models(tmp_path),
        variables={"LLMSUITE_OTEL_EXPORTER": "console", "LLMSUITE_API_KEYS": "k1,k2"})
    gateway = next(p for p in procs if p.name == "gateway").env
    assert gateway["LLMSUITE_OTEL_EXPORTER"] == "console"
    assert gateway["LLMSUITE_API_KEYS"] == "k1,k2"


def test_local_processes_need_every_port_mapped(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="50052"):
        compose_services_as_local_processes(COMPOSE, {50050: 1, 50051: 2}, local_models(tmp_path))


def test_translation_rules(tmp_path: Path) -> None:
    compose_file = tmp_path / "compose.yml"
    compose_file.write_text(yaml.safe_dump({"services": {
        "web": {
            "entrypoint": "serve --verbose",
            "command": ["--upstream", "db:5432", "--cost", "$$5", "--model", "/models/tiny/model.onnx"],
            "environment": ["LISTEN=0.0.0.0:80", "PASSED_THROUGH", "EXTERNAL=metrics:9090"],
            "depends_on": ["db", "gpu-only"],
        },
        "db": {"command": "db-server --port 5432", "environment": {"MODE": "${MODE:-fast}"}},
        "gpu-only": {"profiles": ["gpu"], "command": ["x"]},
    }}))
    procs = compose_services_as_local_processes(compose_file, {80: 8080, 5432: 15432}, {"tiny": "/data/m"},
                                                variables={"PASSED_THROUGH": "yes"})
    assert procs == [
        LocalProcess("db", ["db-server", "--port", "5432"], {"MODE": "fast"}),
        LocalProcess("web", ["serve", "--verbose", "--upstream", "127.0.0.1:15432", "--cost", "$5",
                             "--model", "/data/m/model.onnx"],
                     {"LISTEN": "127.0.0.1:8080", "PASSED_THROUGH": "yes", "EXTERNAL": "metrics:9090"}),
    ]


def test_translation_refuses_unknown_container_model_paths(tmp_path: Path) -> None:
    compose_file = tmp_path / "compose.yml"
    compose_file.write_text(yaml.safe_dump({"services": {"a": {"command": [
        "run", "--model", "big=/models/big", "--model", "tiny=/models/tiny-2"]}}}))
    with pytest.raises(ValueError, match="/models/big"):
        compose_services_as_local_processes(compose_file, {}, {"tiny": tmp_path})
    compose_file.write_text(yaml.safe_dump({"services": {"a": {"command": ["run", "--model", "tiny=/models/tiny-2"]}}}))
    with pytest.raises(ValueError, match="/models/tiny-2"):  # a longer name is another model, not a prefix match
        compose_services_as_local_processes(compose_file, {}, {"tiny": tmp_path})


@pytest.mark.parametrize(("text", "variables", "expected"), [
    ("${A:-d}", {}, "d"),
    ("${A:-d}", {"A": ""}, "d"),
    ("${A-d}", {"A": ""}, ""),
    ("${A:-d}", {"A": "x"}, "x"),
    ("${A:+alt}", {"A": "x"}, "alt"),
    ("${A:+alt}", {}, ""),
    ("$A/${B}", {"A": "1", "B": "2"}, "1/2"),
    ("$${A}", {"A": "1"}, "${A}"),
    ("${A}", {}, ""),
])
def test_interpolation(text: str, variables: dict[str, str], expected: str) -> None:
    assert interpolate(text, variables) == expected


def test_interpolation_required_variable() -> None:
    with pytest.raises(ValueError, match="set A"):
        interpolate("${A:?set A}", {})
