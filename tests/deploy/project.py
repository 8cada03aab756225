"""What the deploy tests read from the repository: the Dockerfile's stages, the
distributions' pyproject.toml files and the services' own argument parsers.

The deploy files (Dockerfile, locks, compose, Kubernetes manifests) are checked
against these, so a renamed flag, a moved port or a new dependency fails a test
instead of a rollout.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
REQUIREMENTS = REPO / "docker" / "requirements"
KUBERNETES = REPO / "deploy" / "kubernetes"

# Python and platform the images run (docker/Dockerfile's base, `make lock`'s target).
IMAGE_MARKERS = {
    "python_version": "3.11", "python_full_version": "3.11.13", "sys_platform": "linux",
    "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
    "implementation_name": "cpython", "platform_python_implementation": "CPython",
}


@dataclass(frozen=True)
class Stage:
    base: str
    name: str
    instructions: tuple[str, ...]


@cache
def dockerfile_stages() -> tuple[Stage, ...]:
    """Stages in file order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[tuple[str, str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            stages.append((m[1], m[2] or "", []))
        elif stages:
            stages[-1][2].append(re.sub(r"\s+", " ", line))
    return tuple(Stage(base, name, tuple(body)) for base, name, body in stages)


def stage(name: str) -> Stage:
    return next(s for s in dockerfile_stages() if s.name == name)


def lineage(name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    names = {s.name for s in dockerfile_stages()}
    chain = [stage(name)]
    while chain[-1].base in names:
        chain.append(stage(chain[-1].base))
    return chain


def instructions(name: str) -> list[str]:
    """Everything that applies to an image built with --target name, in build order."""
    return [i for s in reversed(lineage(name)) for i in s.instructions]


@cache
def distributions() -> dict[str, Path]:
    """Distribution name -> its folder, for every pyproject.toml in the tree."""
    found: dict[str, Path] = {}
    for pyproject in REPO.glob("*/**/pyproject.toml"):
        if {"node_modules", ".venv", "build"} & set(pyproject.parts):  # build/: make bench's tool venvs
            continue
        found[tomllib.loads(pyproject.read_text())["project"]["name"]] = pyproject.parent
    return found


def project(name: str) -> dict[str, Any]:
    return tomllib.loads((distributions()[name] / "pyproject.toml").read_text())["project"]


def console_scripts(names: set[str]) -> dict[str, str]:
    """Console script -> the distribution (of `names`) that declares it."""
    return {script: name for name in names for script in project(name).get("scripts", {})}


def version() -> str:
    return str(project("llmsuite")["version"])


def service_parser(service: str) -> Any:
    """The argument parser `llmsuite-<service>` builds (its real flags)."""
    import importlib

    scripts = {script: ref for dist in distributions() for script, ref in project(dist).get("scripts", {}).items()}
    module = importlib.import_module(scripts[f"llmsuite-{service}"].partition(":")[0])
    return module.build_parser()


def long_flags(parser: Any) -> dict[str, Any]:
    """`--flag` -> argparse action, for every option the parser accepts."""
    return {o: action for action in parser._actions for o in action.option_strings if o.startswith("--")}
