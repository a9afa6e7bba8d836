#!/usr/bin/env bash
# Run the test suite (creates .venv and installs on first use). Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
exec python -m pytest --durations=20 "$@"
