#!/usr/bin/env bash
# The cluster's tests (tests/tests/cluster*.rs) start private redis-server processes
# (pabal_testkit::redis), a three-shard Redis Cluster among them, which redis-cli joins
# (`--cluster create`). CI runs as root on Debian: Debian's redis-server (7.x) is installed
# there when missing, with redis-tools (redis-cli). Elsewhere, say what the tests will do
# without it (they skip, or fail under CI=true).
set -euo pipefail

if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    echo "== redis-server: $(redis-server --version | head -n1)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing redis-server (for the cluster's tests)"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools
    # The packaged service is not needed: every test starts its own server.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now redis-server >/dev/null 2>&1 || true
    fi
else
    echo "== redis-server missing and cannot be installed here (not root):" \
        "the cluster's tests skip, or fail under CI=true"
fi
