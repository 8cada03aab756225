"""One definition of "which tokenizer is this", shared by the tokenizer and inference services.

Both services report the hash so a client (or the gateway) can check that the ids it got
from one are meant for the model behind the other, and that a chat rendered by the
tokenizer uses the template that belongs with the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

# The order is part of the definition: changing it changes every published hash. The
# chat template counts because it decides the text the model sees: swapping it is a
# different tokenizer for every Chat user. It came last and later, so directories
# without chat_template.jinja (the template, if any, inside tokenizer_config.json, which
# was always covered) keep the hash they had.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
)


def content_hash_of(contents: Mapping[str, bytes]) -> str:
    """Returns "sha256:<hex>" over `contents` (file name -> bytes) as read from one directory.

    Each present file of `TOKENIZER_FILES` contributes its name, a NUL byte, then its bytes,
    in that order; absent files contribute nothing (none at all hashes the empty input).
    Prefixing names keeps two different splits of the same bytes apart.
    """
    digest = hashlib.sha256()
    for file_name in TOKENIZER_FILES:
        data = contents.get(file_name)
        if data is not None:
            digest.update(file_name.encode("utf-8") + b"\0")
            digest.update(data)
    return f"sha256:{digest.hexdigest()}"


def tokenizer_content_hash(directory: Path) -> str:
    """`content_hash_of` the tokenizer files present in `directory`."""
    contents = {}
    for file_name in TOKENIZER_FILES:
        path = Path(directory) / file_name
        if path.is_file():
            contents[file_name] = path.read_bytes()
    return content_hash_of(contents)
