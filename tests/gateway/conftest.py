"""Fixtures for gateway tests: the real tokenizer service, a scripted inference
service (see scripted_inference.py) and the real gateway, all on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from scripted_inference import ScriptedInference
from support import ServerThread

from llmsuite.runtime.tokenizer_hash import tokenizer_content_hash
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import TokenizerApp


@pytest.fixture(scope="session")
def tokenizer_server(tiny_tokenizer_dir: Path) -> Iterator[ServerThread]:
    with ServerThread(TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits())) as srv:
        yield srv


@pytest.fixture
def scripted(tiny_tokenizer_dir: Path) -> Iterator[tuple[ScriptedInference, ServerThread]]:
    app = ScriptedInference(tokenizer_content_hash(tiny_tokenizer_dir))
    with ServerThread(app) as srv:
        yield app, srv


