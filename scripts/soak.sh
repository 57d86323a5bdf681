#!/usr/bin/env bash
# Soak test of cutover (issue 17 item 3): all three protocols at a steady rate through the
# real binary against real Dovecot and SMTP sinks, with reloads, kicks, holds, backend
# stops and a Redis restart; at the end it checks memory and descriptors, lost or doubled
# messages, unanswered logins, the login counter and the log, and prints a summary table.
#
#   scripts/soak.sh [DURATION] [--out FILE] [--keep] [--imap-rate N] [--pop3-rate N]
#                   [--smtp-rate N] [--idle N] [--log-level LEVEL]
#
# DURATION: 60s, 10m, 1h, 1m30s (default 30m). CI runs `scripts/soak.sh 60s` (about 75 s
# in all). The summary goes to target/soak-summary.txt (or --out), the metric samples to
# target/soak-summary-samples.csv. Needs root and the packages scripts/test.sh installs;
# builds target/debug/cutover only if it is missing (CUTOVER_BIN overrides the binary).
# Addresses: 127.0.0.160-165 (see tests/e2e/soak.py). Exits non-zero if a check fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

duration=30m
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
    duration="$1"
    shift
fi
if ! [[ "$duration" =~ ^([0-9]+(\.[0-9]+)?(ms|s|m|h)?)+$ ]]; then
    echo "usage: scripts/soak.sh [DURATION e.g. 60s, 10m, 1h] [--out FILE] [--keep]" >&2
    exit 2
fi

export CUTOVER_BIN="${CUTOVER_BIN:-target/debug/cutover}"
case "$CUTOVER_BIN" in
    /*) bin="$CUTOVER_BIN" ;;
    *) bin="$PWD/$CUTOVER_BIN" ;;
esac
if [ ! -x "$bin" ]; then
    echo "=== $bin missing: cargo build --locked --bins"
    cargo build --locked --bins
fi

exec /usr/bin/python3 tests/e2e/soak.py --duration "$duration" "$@"
