"""bench/ holds scripts, not a package: load its modules by path."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest
from support import REPO


def load_bench_module(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def reference() -> ModuleType:
    return load_bench_module("reference")


@pytest.fixture(scope="session")
def performance_doc() -> ModuleType:
    return load_bench_module("performance_doc")


@pytest.fixture(scope="session")
def bench_run() -> ModuleType:
    """bench/run.py, after the sibling modules it imports by name."""
    for sibling in ("reference", "performance_doc", "embed_reference"):
        load_bench_module(sibling)
    return load_bench_module("run")


@pytest.fixture(scope="session")
def http_bench() -> ModuleType:
    return load_bench_module("http_bench")


@pytest.fixture(scope="session")
def ecosystem(bench_run: ModuleType) -> ModuleType:
    return load_bench_module("ecosystem")
