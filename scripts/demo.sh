#!/usr/bin/env bash
# Run the main job on the embedded default: the pipeline on configs/pipeline/local.yaml
# (creates .venv and installs on first use). Run it again and up-to-date stages are skipped.
# Then start the Ray Serve app on 127.0.0.1, send one image with curl, print the answer, stop it
# (set DEMO_SERVE=0 to leave that out).
source "$(dirname "$0")/_env.sh"
OUT="$ROOT/outputs/local"
# the terminal shows the project's own lines; everything (Ray's lines too) goes to outputs/local/demo.log
python jobs/pipeline.py --config configs/pipeline/local.yaml "$@" 2>&1 | python scripts/demo_log.py "$OUT/demo.log"
python scripts/demo_summary.py "$OUT"
if [ "${DEMO_SERVE:-1}" != "0" ]; then
  echo
  echo "== serving: configs/serve/local.yaml =="
  IMAGE="$(python - <<'PY'
from georeasoner.core import storage
rows = storage.read_parquet("outputs/local/world/manifest.parquet", columns=["image_uri", "split"]).to_pylist()
print(next(r["image_uri"] for r in rows if r["split"] == "test"))
PY
)"
  ./scripts/serve_demo.sh "$IMAGE"
fi
echo
echo "demo output: $OUT"
