#!/usr/bin/env bash
# Run the test suite (creates .venv on first use).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest "$@"
