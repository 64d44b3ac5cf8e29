#!/usr/bin/env bash
# The JavaScript client's test dependencies (clients/js): Debian's chromium for the demo
# page's headless test, and `npm ci` (playwright-core, pinned in package-lock.json; it drives
# the system's chromium and downloads no browser). Node 20 or later with npm is a
# prerequisite of the CI image, like cargo: Debian 12's own nodejs (18) has no WebSocket, so
# it is not installed from here. CI runs as root on Debian: chromium is installed there when
# missing. Elsewhere, say what the tests will do without it (tests/tests/js_client.rs skips,
# or fails under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing ${missing[*]} (for the JS client's tests)"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    else
        echo "== ${missing[*]} missing and cannot be installed here (not root):" \
            "the JS client's tests skip, or fail under CI=true"
    fi
fi

if command -v npm >/dev/null 2>&1; then
    echo "== npm ci (clients/js)"
    # playwright-core alone: no browser download, no install scripts needed.
    (cd clients/js && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --ignore-scripts)
else
    echo "== node/npm missing (Node 20 or later): the JS client's tests skip, or fail under CI=true"
fi
