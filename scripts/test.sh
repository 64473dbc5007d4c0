#!/usr/bin/env bash
# Run the test suite (creates .venv on first use; installs Debian's chromium for the web UI test).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  echo "genlab: installing Debian's chromium for the browser test (once)" >&2
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get install -y -q chromium >/dev/null 2>&1 \
    || { $sudo_cmd apt-get update -q >/dev/null 2>&1 && $sudo_cmd apt-get install -y -q chromium >/dev/null; }
fi
exec python -m pytest "$@"
