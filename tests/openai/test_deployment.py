"""Where the OpenAI-compatible API runs: its command ships with the suite (so
in the image compose uses), and compose publishes it on 8000 in front of the
gateway. The files are checked offline, as the rest of the compose file is."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def test_the_command_ships_with_the_gateway_behind_the_http_extra():
    gateway = tomllib.loads((REPO / "services/gateway/pyproject.toml").read_text())["project"]
    assert gateway["scripts"]["llmsuite-openai"] == "llmsuite.gateway.openai.__main__:main"
    assert {d.split(">")[0] for d in gateway["optional-dependencies"]["http"]} >= {"starlette", "uvicorn"}
    assert "starlette" not in str(gateway["dependencies"]), "a gRPC-only install stays without the HTTP stack"
    suite = tomllib.loads((REPO / "services/suite/pyproject.toml").read_text())["project"]
    gateways = [Requirement(d) for d in suite["dependencies"] if d.startswith("llmsuite-gateway")]
    assert [(str(r.specifier), "http" in r.extras) for r in gateways] == [("==0.1.0", True)]  # make run


def test_the_image_compose_runs_it_from_installs_the_http_extra():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert services["openai"]["build"]["target"] == "gateway"
    requirements = (REPO / "docker/requirements/gateway.in").read_text().splitlines()
    (gateway,) = [line for line in requirements if line.startswith("./services/gateway[")]
    assert "http" in gateway.removeprefix("./services/gateway[").rstrip("]").split(",")
    lock = (REPO / "docker/requirements/gateway.txt").read_text()
    assert all(f"\n{package}==" in lock for package in ("starlette", "uvicorn", "pydantic", "sse-starlette"))


def test_compose_runs_it_beside_the_gateway_on_port_8000():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    api, gateway = services["openai"], services["gateway"]
    assert api["command"] == ["llmsuite-openai"] and not api.get("profiles")
    assert api["image"] == gateway["image"] and api["build"] == gateway["build"]
    assert api["environment"]["LLMSUITE_LISTEN"] == "0.0.0.0:8000" and api["ports"] == ["8000:8000"]
    gateway_port = gateway["environment"]["LLMSUITE_LISTEN"].rsplit(":", 1)[1]
    assert api["environment"]["LLMSUITE_GATEWAY"] == f"gateway:{gateway_port}"
    assert api["depends_on"] == {"gateway": {"condition": "service_healthy"}}
    assert "http://localhost:8000/health" in " ".join(api["healthcheck"]["test"])


def test_every_flag_has_an_env_variable():
    done = subprocess.run([sys.executable, "-m", "llmsuite.gateway.openai", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    flags = {word.strip("[],") for word in done.stdout.split() if word.startswith("--") and word != "--help"}
    for flag in flags:
        assert f"LLMSUITE_{flag[2:].replace('-', '_').upper()}" in done.stdout, flag


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("### The OpenAI-compatible HTTP API")
    return text[start:text.index("\n## ", start)]


def readme_curl_commands() -> list[str]:
    commands, current = [], ""
    for line in readme_section().splitlines():
        if current or line.startswith("curl "):
            current += line.rstrip("\\").strip() + " "
            if not line.endswith("\\"):
                commands.append(current.strip())
                current = ""
    return commands


def test_the_readme_examples_work_against_a_running_api(cluster):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    commands = readme_curl_commands()
    assert len(commands) >= 3
    (example,) = re.findall(r"```python\n(.*?)```", readme_section(), re.DOTALL)
    # The README's examples run without a key, as `make run` starts the gateway.
    with cluster.another_gateway(keys=False) as gw, cluster.openai_in_front_of(gw.address) as base:
        for command in commands:
            argv = shlex.split(command.replace("http://localhost:8000", base))
            done = subprocess.run([curl, "--fail-with-body", "-sS", *argv[1:]], capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
            assert '"tiny"' in done.stdout or "data: [DONE]" in done.stdout, done.stdout
        done = subprocess.run([sys.executable, "-c", example.replace("http://localhost:8000", base)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert re.search(r"completion_tokens=\d+", done.stdout), done.stdout
