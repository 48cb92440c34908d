#!/usr/bin/env bash
# Set up a bwarea checkout: a virtualenv with bwarea installed (editable).
#   bash scripts/setup.sh          # the library, CLI and server
#   bash scripts/setup.sh --dev    # plus the test tools and Debian's chromium for the browser test
# torch is pinned through constraints.txt to the CPU build this project's machines carry; on your own machine
# with a GPU, install your torch first and drop "-c constraints.txt".
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "setup: could not install chromium; the browser test will be skipped" >&2
    else
      echo "setup: /usr/bin/chromium missing (sudo apt-get install chromium); the browser test will be skipped" >&2
    fi
  fi
else
  .venv/bin/python -m pip install -q -c constraints.txt -e .
fi
