"""Distributions and import boundaries: each process imports only what it runs.

Every entry point is imported in a fresh interpreter and its `sys.modules` is
checked against what that process must never load, so a stray import (the
gateway reaching into the inference package, the SDK into the server runtime)
fails here rather than in a user's slim container.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from support import REPO

DISTRIBUTIONS = {
    "clients/python": "llmsuite-client",
    "services/runtime": "llmsuite-runtime",
    "services/tokenizer": "llmsuite-tokenizer",
    "services/inference": "llmsuite-inference",
    "services/gateway": "llmsuite-gateway",
    "services/builder": "llmsuite-builder",
    "services/suite": "llmsuite",
}

# (grpc_reflection and grpc_health are left out: `import grpc` itself imports them when installed.)
HEAVY = ("onnxruntime", "numpy", "onnx", "tokenizers", "jinja2")

# entry module -> top-level modules (or llmsuite subpackages) it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "llmsuite.client.cli": (*HEAVY, "llmsuite.runtime", "opentelemetry", "prometheus_client"),
    "llmsuite.client": (*HEAVY, "llmsuite.runtime", "opentelemetry", "prometheus_client"),
    "llmsuite.client.bench": (*HEAVY, "llmsuite.runtime", "opentelemetry", "prometheus_client"),
    # tokenizers is allowed: the gateway detokenizes streamed ids in process with the tokenizer
    # service's own files (see docs/design.md, Streams); it still runs no model and no templates.
    "llmsuite.gateway.__main__": ("onnxruntime", "numpy", "onnx", "jinja2", "llmsuite.builder",
                                  "llmsuite.inference.engine", "llmsuite.inference.service",
                                  "llmsuite.tokenizer.engine", "llmsuite.tokenizer.service",
                                  "starlette", "uvicorn", "pydantic", "llguidance"),
    # The HTTP API talks to the gateway over gRPC only: none of the gateway's internals.
    "llmsuite.gateway.openai.__main__": (*HEAVY, "llmsuite.builder", "llmsuite.inference", "llmsuite.tokenizer",
                                         "llmsuite.gateway.service", "llmsuite.gateway.app",
                                         "llmsuite.gateway.upstreams"),
    "llmsuite.tokenizer.__main__": ("onnxruntime", "numpy", "onnx", "llmsuite.builder", "llmsuite.inference.engine",
                                    "llmsuite.gateway.service"),
    # onnx is allowed: the engine builds its KV-reshaping graphs with it.
    # llguidance is allowed (constrained decoding), transformers never: llguidance reads
    # tokenizer.json with its own Rust tokenizers.
    "llmsuite.inference.__main__": ("tokenizers", "jinja2", "transformers", "llmsuite.builder",
                                    "llmsuite.tokenizer.engine", "llmsuite.gateway.service"),
    "llmsuite.cluster": (*HEAVY, "llmsuite.runtime", "opentelemetry"),
}


def _pyproject(folder: str) -> dict:
    return tomllib.loads((REPO / folder / "pyproject.toml").read_text())


def test_every_distribution_is_listed_and_shares_one_version():
    found = {str(p.parent.relative_to(REPO)) for p in REPO.glob("*/**/pyproject.toml")
             if not {"node_modules", ".venv", "build"} & set(p.parts)}  # build/: make bench's tool venvs
    assert found == set(DISTRIBUTIONS), "a new distribution must be added to DISTRIBUTIONS and the Makefile"
    makefile = (REPO / "Makefile").read_text()
    versions = set()
    for folder, name in DISTRIBUTIONS.items():
        project = _pyproject(folder)["project"]
        assert project["name"] == name
        assert folder in makefile, f"make setup does not install {folder}"
        versions.add(project["version"])
    assert len(versions) == 1, f"llmsuite distributions release in lockstep, found {versions}"
    (version,) = versions
    for folder in DISTRIBUTIONS:
        project = _pyproject(folder)["project"]
        pins = [*project["dependencies"], *(d for extra in project.get("optional-dependencies", {}).values()
                                            for d in extra)]
        for pin in pins:
            if pin.startswith("llmsuite"):
                assert pin.endswith(f"=={version}"), f"{folder}: {pin} must pin the shared version {version}"


def test_source_tree_is_the_import_path():
    """src/llmsuite/... in every distribution: a plain checkout shows where each module lives."""
    for folder in DISTRIBUTIONS:
        src = REPO / folder / "src"
        assert (src / "llmsuite").is_dir(), f"{folder} has no src/llmsuite"
        assert not (src / "llmsuite" / "__init__.py").exists(), "llmsuite is a namespace package"
        stray = [p for p in (REPO / folder).glob("*.py")]
        assert not stray, f"{folder}: modules outside src/: {stray}"


def test_client_distribution_needs_only_grpc_and_protobuf():
    requirements = _pyproject("clients/python")["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in requirements}
    # grpcio-health-checking is the standard health stub (`llmsuite health`), a few KB of protos.
    assert names == {"grpcio", "grpcio-status", "grpcio-health-checking", "protobuf"}


def test_gateway_distribution_does_not_depend_on_onnxruntime_or_numpy():
    project = _pyproject("services/gateway")["project"]
    text = json.dumps(project)
    assert "onnx" not in text and "numpy" not in text


@pytest.mark.parametrize("entry", sorted(FORBIDDEN))
def test_entry_point_imports_only_what_its_process_runs(entry: str):
    probe = (
        "import importlib, json, sys\n"
        f"importlib.import_module({entry!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=Path("/"))
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    leaked = sorted({bad for bad in FORBIDDEN[entry] for mod in loaded if mod == bad or mod.startswith(bad + ".")})
    assert not leaked, f"{entry} imports {leaked}"


# make bench and make bench-http install these into virtualenvs of their own (bench/requirements/):
# onnxruntime-genai brings its own onnxruntime build, guidellm a torch.
BENCHMARK_ONLY = ("onnxruntime-genai", "onnxruntime_genai", "guidellm", "aiperf")


def test_benchmark_only_packages_stay_out_of_every_distribution():
    importing = re.compile(r"^\s*(?:import|from)\s+(onnxruntime_genai|guidellm|aiperf)\b", re.MULTILINE)
    for folder in DISTRIBUTIONS:
        project = _pyproject(folder)["project"]
        pins = [*project["dependencies"], *(d for extra in project.get("optional-dependencies", {}).values()
                                            for d in extra)]
        assert not [p for p in pins if p.lower().startswith(BENCHMARK_ONLY)], f"{folder} depends on a bench tool"
        for source in (REPO / folder).rglob("*.py"):
            assert not importing.search(source.read_text()), f"{source.relative_to(REPO)} imports a bench tool"
    for requirement in ("requirements-dev.txt",):
        lines = (REPO / requirement).read_text().lower().splitlines()
        assert not [line for line in lines if line.strip().startswith(BENCHMARK_ONLY)]
