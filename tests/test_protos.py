"""The protobuf contract: stubs match protos/, buf lint is clean, packages are complete."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from support import BIN, REPO


def test_committed_stubs_match_the_protos():
    done = subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_buf_lint_standard_rules_pass():
    buf = BIN / "buf"
    if not buf.exists():
        pytest.skip("buf not installed (pip install buf-bin)")
    done = subprocess.run([str(buf), "lint"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_python_package_is_listed_for_wheels():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    roots = config["tool"]["setuptools"]["package-dir"]
    found = set()
    for package, directory in roots.items():
        for init in (REPO / directory).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / directory)
            name = ".".join((package, *rel.parts)) if rel.parts else package
            if "node_modules" not in rel.parts:
                found.add(name)
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
