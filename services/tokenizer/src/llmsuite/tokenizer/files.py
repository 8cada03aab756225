"""Reads a Hugging Face tokenizer directory and fingerprints it.

The fingerprint (`content_hash`) is what the gateway compares between the tokenizer
service and the inference service, so it follows the one definition in
`llmsuite.runtime.tokenizer_hash`. Files are read once and the caller parses the same bytes
that were hashed, so a file replaced mid-load can never yield a hash that describes
other contents.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Any

from llmsuite.runtime.errors import FailedPrecondition
from llmsuite.runtime.tokenizer_hash import TOKENIZER_FILES, content_hash_of, tokenizer_content_hash

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# Newer transformers versions save the chat template beside the config instead of in it.
# Like the template inside the config, it is part of the fingerprint.
CHAT_TEMPLATE_JINJA = "chat_template.jinja"


@dataclass(frozen=True)
class TokenizerFiles:
    """The raw contents of one tokenizer directory, as read at one moment."""

    directory: pathlib.Path
    tokenizer_json: str
    config: dict[str, Any]
    special_tokens_map: dict[str, Any]
    chat_template_file: str | None
    content_hash: str
    # The bytes `content_hash` covers, by file name in hash order: what
    # GetTokenizerFiles hands out, so a client can check them against the hash.
    hashed_files: tuple[tuple[str, bytes], ...] = ()


def _is_directory(directory: pathlib.Path) -> bool:
    try:
        return directory.is_dir()
    except OSError:  # a name too long, no permission on a parent: not usable either way
        return False


def _read_present(directory: pathlib.Path) -> dict[str, bytes]:
    if not _is_directory(directory):
        raise FailedPrecondition(
            message=f"tokenizer directory {str(directory)!r} does not exist or is not a directory",
            reason="TOKENIZER_FILES_MISSING",
            metadata={"directory": str(directory)},
        )
    contents: dict[str, bytes] = {}
    for name in TOKENIZER_FILES:
        try:
            contents[name] = (directory / name).read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise FailedPrecondition(
                message=f"cannot read {name} in {str(directory)!r}: {exc.strerror}",
                reason="TOKENIZER_FILES_MISSING",
                metadata={"directory": str(directory), "file": name},
            ) from exc
    if TOKENIZER_JSON not in contents:
        raise FailedPrecondition(
            message=f"{str(directory)!r} has no {TOKENIZER_JSON}; only fast (tokenizers) tokenizers are supported",
            reason="TOKENIZER_FILES_MISSING",
            metadata={"directory": str(directory), "file": TOKENIZER_JSON},
        )
    return contents


def _decode_text(directory: pathlib.Path, name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FailedPrecondition(
            message=f"{name} in {str(directory)!r} is not valid UTF-8",
            reason="TOKENIZER_INVALID",
            metadata={"directory": str(directory), "file": name},
        ) from exc


def _parse_json_object(directory: pathlib.Path, name: str, data: bytes | None) -> dict[str, Any]:
    if data is None:
        return {}
    try:
        parsed = json.loads(_decode_text(directory, name, data))
    except json.JSONDecodeError as exc:
        raise FailedPrecondition(
            message=f"{name} in {str(directory)!r} is not valid JSON: {exc}",
            reason="TOKENIZER_INVALID",
            metadata={"directory": str(directory), "file": name},
        ) from exc
    if not isinstance(parsed, dict):
        raise FailedPrecondition(
            message=f"{name} in {str(directory)!r} must hold a JSON object",
            reason="TOKENIZER_INVALID",
            metadata={"directory": str(directory), "file": name},
        )
    return parsed


def read_tokenizer_files(directory: pathlib.Path) -> TokenizerFiles:
    """Reads and fingerprints `directory`; FailedPrecondition if files are missing or malformed."""
    contents = _read_present(directory)
    chat_template_bytes = contents.get(CHAT_TEMPLATE_JINJA)
    return TokenizerFiles(
        directory=directory,
        tokenizer_json=_decode_text(directory, TOKENIZER_JSON, contents[TOKENIZER_JSON]),
        config=_parse_json_object(directory, TOKENIZER_CONFIG, contents.get(TOKENIZER_CONFIG)),
        special_tokens_map=_parse_json_object(directory, SPECIAL_TOKENS_MAP, contents.get(SPECIAL_TOKENS_MAP)),
        chat_template_file=(
            None
            if chat_template_bytes is None
            else _decode_text(directory, CHAT_TEMPLATE_JINJA, chat_template_bytes)
        ),
        content_hash=content_hash_of(contents),
        hashed_files=tuple((name, contents[name]) for name in TOKENIZER_FILES if name in contents),
    )


def content_hash(directory: pathlib.Path) -> str:
    """`sha256:<hex>` over the tokenizer files in `directory`, as the inference service computes it."""
    return tokenizer_content_hash(directory)
