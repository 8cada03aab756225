"""The protobuf contract: stubs match protos/, buf lint is clean."""

from __future__ import annotations

import subprocess
import sys

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
