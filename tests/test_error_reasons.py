"""Every `ErrorInfo.reason` the services can raise is documented in docs/errors.md.

Clients switch on reasons, so an undocumented one is an API nobody can find.
The services' source is parsed (not imported) and every reason literal is
collected, however it reaches an error:

- `reason="X"` as a keyword of any call (`InvalidArgument(..., reason="X")`,
  `InvalidArgument.for_field(..., reason="X")`, a local helper's `reason=`);
- `"X"` passed positionally where the callee's parameter is `reason`: an
  `LlmsuiteError` subclass (fields `message, reason, ...`) or any function or
  method in the tree with a `reason` parameter (`bad("top_p", "...", "X")`);
- a `reason` parameter's default (`reason: str = "INVALID_FIELD"`).

A reason is documented when it appears, in backticks, in the first column of
the "Stable reasons" table.

The parsing runs in a fresh interpreter: CPython 3.11 before 3.11.8 can leave
the compiler's recursion counter wrong after a RecursionError elsewhere in the
process (the fuzz tests provoke them), and `ast.parse` then fails with
"AST constructor recursion depth mismatch" (python/cpython#106905).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from support import REPO

SOURCE_ROOTS = sorted((REPO / "services").glob("*/src/llmsuite"))
ERRORS_DOC = REPO / "docs" / "errors.md"
REASON = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$|^[A-Z]{4,}$")
ERROR_BASE = "LlmsuiteError"


def _source_files() -> list[Path]:
    return [p for root in SOURCE_ROOTS for p in sorted(root.rglob("*.py")) if not p.name.endswith(("_pb2.py",
                                                                                                  "_pb2_grpc.py"))]


def _callee_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _reason_literal(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and REASON.match(node.value):
        return node.value
    return None


def _reason_positions(trees: dict[Path, ast.Module]) -> dict[str, int]:
    """Callee name -> the positional index its `reason` argument takes at call sites."""
    positions: dict[str, int] = {}
    error_classes = {ERROR_BASE}
    changed = True
    while changed:  # subclasses of subclasses, in any file order
        changed = False
        for tree in trees.values():
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name not in error_classes and any(
                        isinstance(b, ast.Name) and b.id in error_classes for b in node.bases):
                    error_classes.add(node.name)
                    changed = True
    for name in error_classes:
        positions[name] = 1  # dataclass fields: message, reason, ...
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                params = [a.arg for a in node.args.posonlyargs + node.args.args]
                if params and params[0] in ("self", "cls"):
                    params = params[1:]
                if "reason" in params:
                    positions.setdefault(node.name, params.index("reason"))
    return positions


def raised_reasons() -> dict[str, list[str]]:
    """Reason -> the places (`path:line`) that raise it."""
    trees = {path: ast.parse(path.read_text(), filename=str(path)) for path in _source_files()}
    positions = _reason_positions(trees)
    found: dict[str, list[str]] = defaultdict(list)
    for path, tree in trees.items():
        where = str(path.relative_to(REPO))
        for node in ast.walk(tree):
            literals: list[ast.AST] = []
            if isinstance(node, ast.Call):
                literals += [kw.value for kw in node.keywords if kw.arg == "reason"]
                index = positions.get(_callee_name(node) or "")
                if index is not None and index < len(node.args):
                    literals.append(node.args[index])
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                positional = args.posonlyargs + args.args
                defaults = dict(zip([a.arg for a in positional[len(positional) - len(args.defaults):]],
                                    args.defaults, strict=True))
                defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d})
                if "reason" in defaults:
                    literals.append(defaults["reason"])
            for literal in literals:
                reason = _reason_literal(literal)
                if reason is not None:
                    found[reason].append(f"{where}:{literal.lineno}")
    return found


def raised_reasons_in_a_fresh_interpreter() -> dict[str, list[str]]:
    found: dict[str, list[str]] = json.loads(subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, check=True, timeout=120).stdout)
    return found


def documented_reasons() -> set[str]:
    """The backticked names in the first column of docs/errors.md's "Stable reasons" table."""
    text = ERRORS_DOC.read_text()
    section = text.split("## Stable reasons", 1)[1].split("\n## ", 1)[0]
    reasons: set[str] = set()
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            first_cell = line.split("|")[1]
            reasons.update(re.findall(r"`([A-Z0-9_]+)`", first_cell))
    return reasons


def test_the_scan_finds_reasons_however_they_are_passed() -> None:
    # One of each way a reason reaches an error, so a scanner that misses a way fails here.
    found = raised_reasons_in_a_fresh_interpreter()
    assert "MALFORMED_REQUEST" in found  # keyword to a constructor
    assert "INVALID_FIELD" in found  # a parameter's default (InvalidArgument.for_field)
    assert "EMPTY_PROMPT" in found  # keyword to for_field
    assert len(found) >= 40, sorted(found)


def test_every_raised_reason_is_in_the_stable_reasons_table() -> None:
    found = raised_reasons_in_a_fresh_interpreter()
    documented = documented_reasons()
    missing = {reason: places for reason, places in found.items() if reason not in documented}
    report = "\n".join(f"  {reason}: raised at {', '.join(places)}" for reason, places in sorted(missing.items()))
    assert not missing, (f"{len(missing)} reason(s) raised in services/*/src but missing from the first column of "
                         f"the 'Stable reasons' table in docs/errors.md (add a row: reason, code, meaning):\n{report}")


if __name__ == "__main__":  # what the tests run, in a fresh interpreter
    print(json.dumps(raised_reasons()))
