# Sourced by scripts/demo.sh and scripts/test.sh: create .venv when missing, install, set the environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
cd "$ROOT"

if [ ! -x "$VENV/bin/python" ]; then
  PY="${PYTHON:-}"
  if [ -z "$PY" ]; then
    if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
  fi
  echo "[setup] creating $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
fi

# Reinstall only when pyproject.toml changed since the last install.
STAMP="$VENV/.georeasoner-install"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  LOG="$VENV/install.log"
  echo "[setup] installing the project and its dependencies into .venv (first run: a few minutes; log: $LOG)"
  # pip's own chatter (and any index notices of this machine's pip config) goes to the log; a failure shows its end.
  # DeepSpeed compiles its ops on first use instead of at install time.
  if ! { "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel \
         && DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"; } > "$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    echo "[setup] install failed: see $LOG" >&2
    exit 1
  fi
  echo "$WANT" > "$STAMP"
fi

export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1
# No model hub on these machines: everything local is built or shipped offline.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
# DeepSpeed on CPU when there is no GPU; its compiled ops are cached inside the venv.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
export RAY_USAGE_STATS_ENABLED=0
