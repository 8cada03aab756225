"""Which directories a Reload may load from.

Reload takes a path from the caller, so without a bound it reads anywhere the process
can, and its errors ("does not exist" versus "has no tokenizer.json") probe the
filesystem. Paths are resolved (symlinks and `..` included) and must fall inside a
configured root; every path outside gets the same answer, whether or not it exists.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable

from llmsuite.runtime.errors import InvalidArgument, PermissionDenied

# Longer than any path the kernel accepts (PATH_MAX), so never a real directory.
MAX_DIRECTORY_CHARS = 4096


def _resolved(path: str | os.PathLike[str]) -> pathlib.Path:
    # Non-strict: a missing tail or an unreadable component resolves as far as it can,
    # so resolution itself never tells existing paths from missing ones.
    return pathlib.Path(os.path.realpath(path))


class ReloadRoots:
    """The directories (and everything below them) Reload may read."""

    def __init__(self, roots: Iterable[str | os.PathLike[str]] = ()) -> None:
        self._roots: list[pathlib.Path] = []
        for root in roots:
            self.add(root)

    def add(self, root: str | os.PathLike[str]) -> None:
        resolved = _resolved(root)
        if resolved not in self._roots:
            self._roots.append(resolved)

    @property
    def roots(self) -> tuple[pathlib.Path, ...]:
        return tuple(self._roots)

    def check(self, directory: str) -> pathlib.Path:
        """The resolved `directory` if it lies inside a root; PermissionDenied otherwise."""
        if len(directory) > MAX_DIRECTORY_CHARS or "\0" in directory:
            raise InvalidArgument.for_field(
                "directory", f"must be a path of at most {MAX_DIRECTORY_CHARS} characters without NUL",
                limit=str(MAX_DIRECTORY_CHARS))
        try:
            resolved = _resolved(directory)
        except (OSError, ValueError):
            resolved = None
        if resolved is not None and any(resolved == root or resolved.is_relative_to(root) for root in self._roots):
            return resolved
        raise PermissionDenied(
            message="directory: reloading is limited to the configured reload roots (--reload-root)",
            reason="DIRECTORY_NOT_ALLOWED",
            metadata={"field": "directory"},
        )
