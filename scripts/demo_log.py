"""The demo's log for a person: stdin (the pipeline's stdout+stderr) -> every line into a log file, and on the
terminal only the project's own lines: stage headers, progress, figures, summaries, errors.

Left out of the terminal (kept in the file): Ray's own INFO/WARNING lines and progress tables, lines Ray workers
forward that are not the project's (Ray Train's reports, DeepSpeed's build notes, library warnings), and progress
bars of model loading. Worker lines that are the project's keep their text without Ray's ``(Actor pid=…)`` prefix.

    python jobs/pipeline.py ... 2>&1 | python scripts/demo_log.py outputs/local/demo.log
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

JOBS = ("make_world", "ingest", "clue_weights", "teacher_labels", "pretrain_clip", "train_locatability",
        "score_locatability", "curate", "build_sft", "finetune", "geolocate", "baseline_zeroshot", "build_index",
        "evaluate", "pipeline")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# "(Actor pid=123)" and "(pid=gcs_server)", the prefixes Ray puts on the lines of workers and of its own processes
WORKER = re.compile(r"^\((?:(?P<actor>.*?) )?pid=\w+(?:, ip=[\d.]+)?\) (?P<text>.*)$")  # actor names nest parentheses
OURS = re.compile(rf"^(?:{'|'.join(JOBS)})(?: dry run)?: ")
RAY_LOGGER = re.compile(r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(?:INFO|WARNING|DEBUG)\s|\[\d{4}-\d\d-\d\d [^\]]*\] )")
NOISE = (
    re.compile(r"site-packages/.*(?:Warning|warn)"),  # a library's warning line ...
    re.compile(r"^\s+(?:warnings\.warn\(|return func\(\*args)"),  # ... and the source line Python prints under it
    re.compile(r"%\|.*(?:it/s|s/it)\]"),  # progress bars of model loading
    re.compile(r"^\s*\[repeated \d+x across cluster\]"),
)


def keep(line: str) -> str | None:
    """The line as the terminal shows it, or None to leave it in the file only."""
    line = ANSI.sub("", line.rstrip("\n"))
    worker = WORKER.match(line)
    if worker:
        text = re.sub(r"\s*\[repeated \d+x across cluster\]$", "", worker.group("text"))
        return text if OURS.match(text) else None
    if RAY_LOGGER.match(line) or any(p.search(line) for p in NOISE):
        return None
    return line


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "demo.log")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as log:
        for line in sys.stdin:
            log.write(line)
            shown = keep(line)
            if shown is not None:
                print(shown, flush=True)
    print(f"(full log, Ray's lines included: {path}; Ray's own logs: /tmp/ray/session_latest/logs)")


if __name__ == "__main__":
    main()
