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
