"""Turn docker-compose services into local process specs.

Machines without a Docker engine can still run the cluster exactly as compose
describes it: the same commands and the same environment, with compose's
network replaced by loopback. `compose_services_as_local_processes` does the
translation, so an end-to-end test that starts these processes exercises the
very configuration the containers get.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml

CONTAINER_MODELS = "/models"  # where the images keep their models: /models/NAME

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, ${VAR:+alt},
# ${VAR+alt}, $VAR and the $$ escape: the subset of compose interpolation
# this project's compose file may use.
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
_HOST_PORT = re.compile(r"(?<![\w.-])(?P<host>[A-Za-z0-9][A-Za-z0-9_.-]*):(?P<port>\d+)\b")


class LocalProcess(NamedTuple):
    """One compose service as a local process: argv[0] is the console script."""

    name: str
    argv: list[str]
    env: dict[str, str]


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Apply compose variable interpolation to one string."""

    def substitute(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["bare"]
        op, arg = m["op"] or "", m["arg"] or ""
        value = variables.get(name, "")
        # With a colon, an empty value counts as unset (as in the shell).
        unset = name not in variables or (value == "" and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset else value
        if op in (":?", "?"):
            if unset:
                raise ValueError(f"required variable {name} is missing: {arg}")
            return value
        if op in (":+", "+"):
            return "" if unset else arg
        return value

    return _INTERPOLATION.sub(substitute, value)


def _environment(raw: Any, variables: Mapping[str, str]) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, list):
        pairs = [item.split("=", 1) if "=" in item else [item, None] for item in raw]
    else:
        pairs = list(raw.items())
    env: dict[str, str] = {}
    for key, value in pairs:
        if value is None:
            # Compose passes a value-less variable through from its own
            # environment, and leaves it unset when that has none.
            if key in variables:
                env[key] = variables[key]
            continue
        env[key] = interpolate(str(value), variables)
    return env


def _command(service: Mapping[str, Any], variables: Mapping[str, str]) -> list[str]:
    argv: list[str] = []
    for key in ("entrypoint", "command"):
        part = service.get(key)
        if part is None:
            continue
        words = shlex.split(part) if isinstance(part, str) else [str(w) for w in part]
        argv += [interpolate(w, variables) for w in words]
    if not argv:
        raise ValueError("service has neither entrypoint nor command; nothing to run locally")
    return argv


def _start_order(services: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Services ordered so that each comes after what it depends on."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"dependency cycle through {name}")
        visiting.add(name)
        deps = services[name].get("depends_on") or []
        for dep in deps:
            if dep in services:  # dependencies outside the default profile are not started
                visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in services:
        visit(name)
    return order


def compose_services_as_local_processes(
    compose_path: str | Path,
    port_map: Mapping[int, int],
    model_dirs: Mapping[str, str | Path],
    *,
    variables: Mapping[str, str] | None = None,
) -> list[LocalProcess]:
    """Local process specs for the default-profile services of a compose file.

    `port_map` maps each container port to the local port to use instead;
    every `service:port` and `0.0.0.0:port` in commands and environment values
    becomes `127.0.0.1:<local port>` (references to services outside the
    default profile are left alone: they are not started). Each container model
    directory `/models/NAME` becomes `model_dirs[NAME]`. `variables` stands in for the
    shell environment compose would interpolate from; it defaults to empty so
    the result does not depend on who runs the test. The list is in start
    order: every service comes after the services it depends on.
    """
    spec = yaml.safe_load(Path(compose_path).read_text())
    all_services: dict[str, dict[str, Any]] = spec.get("services") or {}
    services = {name: svc for name, svc in all_services.items() if not svc.get("profiles")}
    variables = dict(variables or {})
    # Longest first, so that /models/tiny-embed is not taken for /models/tiny.
    local_models = sorted(((f"{CONTAINER_MODELS}/{name}", str(Path(d))) for name, d in model_dirs.items()),
                          key=lambda pair: -len(pair[0]))

    def localise(value: str) -> str:
        def to_loopback(m: re.Match[str]) -> str:
            host, port = m["host"], int(m["port"])
            if host in services or host == "0.0.0.0":
                if port not in port_map:
                    raise KeyError(f"no local port given for container port {port} (in {value!r})")
                return f"127.0.0.1:{port_map[port]}"
            return m.group(0)

        value = _HOST_PORT.sub(to_loopback, value)
        for container_dir, local_dir in local_models:
            value = re.sub(rf"(?<![\w/]){re.escape(container_dir)}(?![\w.-])", lambda _, d=local_dir: d, value)
        if re.search(rf"(?<![\w/]){CONTAINER_MODELS}/", value):
            known = ", ".join(container for container, _ in local_models) or "none"
            raise ValueError(f"{value!r} names a container model path with no local directory (known: {known})")
        return value

    processes = []
    for name in _start_order(services):
        service = services[name]
        argv = [localise(word) for word in _command(service, variables)]
        env = {key: localise(val) for key, val in _environment(service.get("environment"), variables).items()}
        processes.append(LocalProcess(name, argv, env))
    return processes
