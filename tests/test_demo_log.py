"""The demo's terminal log keeps the project's lines and leaves Ray's and libraries' lines to the log file."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

LINES = [
    "== 10/14 finetune_base ==",
    "\x1b[36m(RayTrainWorker pid=25204)\x1b[0m finetune: step 100/300 loss 0.3255 lr 0.00239 71.9 samples/s",
    "\x1b[36m(RayTrainWorker pid=25204)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=None)",
    "\x1b[36m(pid=gcs_server)\x1b[0m [2026-12-03 09:42:43,064 E 30881 30881] (gcs_server) gcs_actor_scheduler.cc:538: "
    "Failed to kill actor 7239, return status: Invalid: KillActor RPC failed",
    "\x1b[36m(PlacementGroupCleaner pid=2)\x1b[0m Failed to query Ray Train Controller actor state. Stack trace:",
    "2026-12-01 19:01:47,951\tINFO streaming_executor.py:215 -- Starting execution of Dataset dataset_0357",
    "[2026-12-01 19:01:47,980 E 21762 21762] core_worker.cc:2465: Actor with class name: 'MapWorker'",
    "/x/.venv/lib/python3.11/site-packages/transformers/modeling_utils.py:3312: FutureWarning: deprecated",
    "  warnings.warn(",
    "\x1b[36m(MapWorker(MapBatches(ModelStage)) pid=5533)\x1b[0m   warnings.warn(",
    "Loading weights:  50%|█████     | 1/2 [00:00<00:00, 3.1it/s]",
    "geolocate: 250/307 images (81%) 9.9/s eta 6s",
    "  country accuracy                  0.272            0.147",
    "Traceback (most recent call last):",
]


def test_terminal_shows_the_projects_lines_and_the_file_keeps_all(tmp_path):
    log = tmp_path / "demo.log"
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_log.py"), str(log)], input="\n".join(LINES) + "\n",
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:-1] == ["== 10/14 finetune_base ==", "finetune: step 100/300 loss 0.3255 lr 0.00239 71.9 samples/s",
                        "geolocate: 250/307 images (81%) 9.9/s eta 6s", "  country accuracy                  0.272            0.147",
                        "Traceback (most recent call last):"]
    assert str(log) in out[-1] and log.read_text().splitlines() == LINES
