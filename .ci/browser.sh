#!/usr/bin/env bash
# The browser the report tests drive (tests/test_report_browser.py): Debian's chromium, used by
# Playwright's Python API as a system browser (no `playwright install`, no browser download).
# On CI (CI=true) it is installed when missing; elsewhere this only says what to do.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "chromium: $(command -v chromium)"
    exit 0
fi
if [ "${CI:-}" = "true" ]; then
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
    echo "chromium: $(command -v chromium)"
else
    echo "chromium is not installed: the browser tests of the report will be skipped." >&2
    echo "Install it with: sudo apt-get install -y chromium (Debian/Ubuntu)" >&2
fi
