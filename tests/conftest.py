from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import SHARED_EXPORTS


@pytest.fixture(scope="session", autouse=True)
def _no_drain_delay_in_child_processes() -> Iterator[None]:
    """Servers started as processes inherit this: a SIGTERM in a test should not wait the
    production drain delay (tests that exercise the delay pass --drain-delay)."""
    previous = os.environ.get("LLMSUITE_DRAIN_DELAY")
    os.environ.setdefault("LLMSUITE_DRAIN_DELAY", "0")
    yield
    if previous is None:
        os.environ.pop("LLMSUITE_DRAIN_DELAY", None)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's default tokenizer, built offline into a temp dir."""
    from llmsuite.builder.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def shared_exports() -> Path:
    if not SHARED_EXPORTS.is_dir():
        pytest.skip(f"{SHARED_EXPORTS} not present (real Optimum exports ship only with the team's checkout)")
    return SHARED_EXPORTS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model exactly as `llmsuite-build-model --preset tiny` writes it."""
    from llmsuite.builder.model import build_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    build_model(out, preset="tiny")
    return out


@pytest.fixture(scope="session")
def tiny_embed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default embedding model exactly as `llmsuite-build-model --kind encoder --preset tiny` writes it."""
    from llmsuite.builder.encoder import build_encoder

    out = tmp_path_factory.mktemp("models") / "tiny-embed"
    build_encoder(out, preset="tiny")
    return out
