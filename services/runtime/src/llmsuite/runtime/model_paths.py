"""Where the tokenizer of a `--model NAME=PATH` lives, one rule for the tokenizer and inference services.

PATH is a model directory (an Optimum export, an ONNX Runtime GenAI folder) or one ONNX
file inside a repository laid out as transformers.js-style repositories are
(`REPO/onnx/model_q4.onnx`, with `config.json` and the tokenizer in `REPO`). Both services
must read the same tokenizer files for the content-hash pairing check to mean anything, so
both resolve PATH here.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_JSON = "tokenizer.json"


def model_home(path: Path) -> Path:
    """The directory a model path names: PATH itself, or the directory holding the file PATH."""
    path = Path(path)
    return path.parent if path.suffix == ".onnx" or path.is_file() else path


def tokenizer_directory(path: Path) -> Path:
    """The directory whose tokenizer files belong to the model at `path`.

    The model's own directory when it holds tokenizer.json, else its parent when that does
    (`REPO/onnx/model.onnx` -> `REPO`), else the model's own directory (whatever is missing
    there is reported by the service that reads it).
    """
    home = model_home(path)
    if (home / TOKENIZER_JSON).is_file():
        return home
    if (home.parent / TOKENIZER_JSON).is_file():
        return home.parent
    return home
