"""Write configs/serve/cluster.yaml into cluster/kuberay/rayservice.yaml as its ``serveConfigV2``, so they never drift.

    python scripts/make_rayservice.py            # rewrite the manifest's serveConfigV2 block from the config
    python scripts/make_rayservice.py --check    # exit 1 (and say so) when the manifest is out of date

The rest of the manifest (the RayCluster part, comments) is kept as written: only the lines of the
``serveConfigV2: |`` block scalar are replaced, by the config file's text, verbatim, indented under the key.
tests/test_cluster.py fails while the two differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "serve" / "cluster.yaml"
MANIFEST = REPO / "cluster" / "kuberay" / "rayservice.yaml"
KEY = "serveConfigV2: |"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def render(manifest: str, config: str) -> str:
    """``manifest`` with the lines of its ``serveConfigV2: |`` block replaced by ``config``."""
    lines = manifest.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == KEY]
    if len(starts) != 1:
        raise ValueError(f"the manifest needs exactly one '{KEY}' line (found {len(starts)})")
    start = starts[0]
    block = " " * (_indent(lines[start]) + 2)
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > _indent(lines[start])):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines before the next key stay outside
        end -= 1
    body = config.rstrip("\n").splitlines()
    if not body or not body[0].strip() or body[0][0] == " ":
        raise ValueError("the serve config must start with an unindented line (a block scalar takes its indentation from it)")
    if any("\t" in line[: _indent(line) + 1] for line in body):
        raise ValueError("the serve config must indent with spaces")
    new = [block + line if line.strip() else "" for line in body]
    return "\n".join(lines[: start + 1] + new + lines[end:]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when the manifest is out of date")
    parser.add_argument("--config", type=Path, default=CONFIG, help=f"Ray Serve config (default {CONFIG.relative_to(REPO)})")
    parser.add_argument("--manifest", type=Path, default=MANIFEST,
                        help=f"RayService manifest (default {MANIFEST.relative_to(REPO)})")
    args = parser.parse_args(argv)
    current = args.manifest.read_text()
    try:
        wanted = render(current, args.config.read_text())
    except ValueError as exc:
        print(f"make_rayservice: {exc}", file=sys.stderr)
        return 2
    if current == wanted:
        print(f"{args.manifest}: serveConfigV2 matches {args.config}")
        return 0
    if args.check:
        print(f"{args.manifest}: serveConfigV2 differs from {args.config}; run python scripts/make_rayservice.py",
              file=sys.stderr)
        return 1
    args.manifest.write_text(wanted)
    print(f"{args.manifest}: serveConfigV2 rewritten from {args.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
