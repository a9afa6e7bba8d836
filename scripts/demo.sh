#!/usr/bin/env bash
# Run the main job on the embedded default (creates .venv and installs on first use).
source "$(dirname "$0")/_env.sh"
OUT="$ROOT/outputs/local"
echo "== 1/1 make_world: drawing the embedded street-view world =="
python jobs/make_world.py --config configs/make_world/local.yaml "$@"
python scripts/world_summary.py "$OUT/world"
echo
echo "demo output: $OUT"
