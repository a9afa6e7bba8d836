#!/usr/bin/env bash
# Run the main job on the embedded default: the pipeline on configs/pipeline/local.yaml
# (creates .venv and installs on first use). Run it again and up-to-date stages are skipped.
source "$(dirname "$0")/_env.sh"
OUT="$ROOT/outputs/local"
python jobs/pipeline.py --config configs/pipeline/local.yaml "$@"
python scripts/demo_summary.py "$OUT"
echo
echo "demo output: $OUT"
