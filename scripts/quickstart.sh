#!/usr/bin/env bash
# The guided tour on bundled data (creates .venv on first use).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python examples/quickstart.py "$@"
