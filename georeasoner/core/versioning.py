"""The code version written into every output."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import georeasoner


@lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+<hash of the library's sources>``: changes when the code does."""
    root = Path(georeasoner.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return f"{georeasoner.__version__}+{digest.hexdigest()[:10]}"
