#!/usr/bin/env bash
# Serve demo: start the service from configs/serve/local.yaml with `serve run` (its own local Ray), wait for
# /healthz, send one street view to POST /geolocate with curl, print the answer, stop the service.
#
#   ./scripts/serve_demo.sh [IMAGE]
#
# Environment (all optional):
#   SERVE_CONFIG   Ray Serve config (default configs/serve/local.yaml)
#   SERVE_MODEL    a VLM package to serve instead of the config's args.model (e.g. one made with
#                  georeasoner.vlm.model.write_untrained_package)
#   SERVE_PORT     HTTP port on 127.0.0.1 (default: the config's, 8000)
#   SERVE_TIMEOUT  seconds to wait for /healthz (default 300)
#   GEOREASONER_SERVE_TOKEN  when set, the service requires it as a bearer token (and curl sends it)
source "$(dirname "$0")/_env.sh"
set -m  # background jobs in their own process group, so SIGINT reaches `serve run` and it shuts Serve down

CONFIG="${SERVE_CONFIG:-configs/serve/local.yaml}"
TIMEOUT="${SERVE_TIMEOUT:-300}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/georeasoner-serve-demo.XXXXXX")"
LOG="$WORK/serve.log"
SERVE_PID=""

cleanup() {
  if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
    echo "[serve-demo] stopping the service (pid $SERVE_PID)"
    kill -INT "$SERVE_PID" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 1; done
    if kill -0 "$SERVE_PID" 2>/dev/null; then kill -TERM "$SERVE_PID" 2>/dev/null || true; sleep 2; fi
    wait "$SERVE_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# The config with the demo's overrides (validated by Ray Serve's schema and the app's args on the way).
OVERRIDES=()
[ -n "${SERVE_MODEL:-}" ] && OVERRIDES+=("args.model=$SERVE_MODEL")
[ -n "${SERVE_PORT:-}" ] && OVERRIDES+=("http_options.port=$SERVE_PORT")
PORT="$(python - "$CONFIG" "$WORK/serve.yaml" "${OVERRIDES[@]}" <<'EOF'
import contextlib, sys, yaml
from georeasoner.core.config import ConfigError
from georeasoner.serve.settings import load_serve_config, parse_settings, resolve_models
try:
    data = load_serve_config(sys.argv[1], sys.argv[3:])
    with contextlib.redirect_stdout(sys.stderr):  # a fallback warning is for the reader, not for $PORT
        resolve_models(parse_settings(data["applications"][0].get("args")))  # missing packages: one line, now
except ConfigError as exc:
    sys.exit(str(exc))
open(sys.argv[2], "w").write(yaml.safe_dump(data, sort_keys=False))
print(data.get("http_options", {}).get("port", 8000))
EOF
)"
URL="http://127.0.0.1:$PORT"

IMAGE="${1:-}"
if [ -z "$IMAGE" ]; then
  IMAGE="$(find outputs/local/world/images -name '*.jpg' 2>/dev/null | sort | head -n 1 || true)"
fi
if [ -z "$IMAGE" ]; then  # no world yet: a small synthetic street view
  IMAGE="$WORK/street.jpg"
  python -c "
import numpy as np; from PIL import Image
a = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8); a[:100] = (90, 140, 210)
Image.fromarray(a).save('$IMAGE', quality=90)"
fi

echo "[serve-demo] serve run $CONFIG ${OVERRIDES[*]:-} (log: $LOG)"
serve run --address local "$WORK/serve.yaml" >"$LOG" 2>&1 &
SERVE_PID=$!

AUTH=()
[ -n "${GEOREASONER_SERVE_TOKEN:-}" ] && AUTH=(-H "Authorization: Bearer $GEOREASONER_SERVE_TOKEN")
start=$SECONDS
until curl -sf "$URL/healthz" >/dev/null 2>&1; do
  if ! kill -0 "$SERVE_PID" 2>/dev/null; then
    echo "[serve-demo] the service exited before it was healthy; last log lines:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  if grep -q "DEPLOY_FAILED\|build_serve_application\|ConfigError" "$LOG"; then
    echo "[serve-demo] the application failed to deploy; log lines:" >&2
    grep -h "Error\|error" "$LOG" | tail -n 5 >&2
    exit 1
  fi
  if (( SECONDS - start > TIMEOUT )); then
    echo "[serve-demo] no healthy service on $URL within ${TIMEOUT}s; last log lines:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  sleep 2
done
echo "[serve-demo] healthy after $((SECONDS - start))s: $(curl -s "$URL/healthz")"

echo "[serve-demo] POST $URL/geolocate  <- $IMAGE"
ANSWER="$(curl -sS "${AUTH[@]}" -H "Content-Type: image/jpeg" --data-binary @"$IMAGE" -w '\n%{http_code}' \
  "$URL/geolocate")"
CODE="${ANSWER##*$'\n'}"
BODY="${ANSWER%$'\n'*}"
echo "$BODY" | python -m json.tool
if [ "$CODE" != "200" ]; then
  echo "[serve-demo] HTTP $CODE" >&2
  exit 1
fi
