"""One definition of "which tokenizer is this", shared by the tokenizer and inference services.

Both services report the hash so a client (or the gateway) can check that the ids it got
from one are meant for the model behind the other.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# The order is part of the definition: changing it changes every published hash.
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_content_hash(directory: Path) -> str:
    """Returns "sha256:<hex>" over the tokenizer files present in `directory`.

    Each present file contributes its name, a NUL byte, then its bytes, in the order of
    `TOKENIZER_FILES`; absent files contribute nothing (a directory with none of them hashes
    the empty input). Prefixing names keeps two different splits of the same bytes apart.
    """
    digest = hashlib.sha256()
    for file_name in TOKENIZER_FILES:
        path = Path(directory) / file_name
        if path.is_file():
            digest.update(file_name.encode("utf-8") + b"\0")
            digest.update(path.read_bytes())
    return f"sha256:{digest.hexdigest()}"
