#!/usr/bin/env bash
# The one command that runs every test of cutover on a Debian 12 machine:
#
#   scripts/test.sh [extra pytest args, e.g. -k imap -x]
#
#   1. installs the Debian packages the end-to-end tests need, if missing
#      (and makes sure no system-wide dovecot/prometheus/redis/haproxy/postgresql is
#      left running),
#   2. cargo build --locked --bins, a check that the sans-IO layers (src/proto,
#      src/route.rs, src/config) use no tokio, then cargo test --locked,
#   3. /usr/bin/python3 -m pytest -q tests/e2e with CUTOVER_BIN=target/debug/cutover,
#      then scripts/soak.sh 60s (the soak test for a minute; summary in target/soak-summary.txt),
#   4. fuzz/run.sh: every fuzz target for a few seconds (FUZZ_SECONDS, default 8).
#
# Exits non-zero if any step fails. A build failure stops at once; a failing
# `cargo test` still lets the e2e tests run, and the script fails at the end.
# Idempotent: on a machine that has everything it installs nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(
    dovecot-imapd dovecot-pop3d dovecot-submissiond   # backends (brings dovecot-core)
    python3-aiosmtpd python3-pytest                   # SMTP sinks, test runner
    swaks libnet-ssleay-perl curl openssl             # real clients (swaks needs Net::SSLeay for TLS)
    prometheus                                        # promtool, to lint /metrics
    redis-server haproxy                              # fleet: shared state, front balancer
    postgresql                                        # route lookups: initdb/postgres of our own
)
# Services that these packages may start system-wide; ours run from tests/e2e.
SERVICES=(dovecot prometheus prometheus-node-exporter redis-server haproxy postgresql)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

log() { printf '\n=== %s\n' "$*"; }

service_running() { # service_running NAME
    local svc="$1"
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl is-active --quiet "$svc" 2>/dev/null
    elif [ -x "/etc/init.d/$svc" ]; then
        "/etc/init.d/$svc" status >/dev/null 2>&1
    else
        return 1
    fi
}

stop_system_services() {
    local svc
    for svc in "${SERVICES[@]}"; do
        if service_running "$svc"; then
            log "stopping and disabling the system-wide $svc (the tests run their own)"
            if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
                $SUDO systemctl disable --now "$svc" || true
            else
                $SUDO "/etc/init.d/$svc" stop || true
                $SUDO update-rc.d "$svc" disable >/dev/null 2>&1 || true
            fi
        fi
    done
    # a system dovecot started outside its init script still leaves its pid file
    if [ -s /run/dovecot/master.pid ]; then
        local pid
        pid="$(cat /run/dovecot/master.pid)"
        if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dovecot ]; then
            log "stopping the system dovecot (pid $pid)"
            $SUDO kill "$pid" || true
            for _ in $(seq 1 100); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
        fi
    fi
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
            missing+=("$p")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Debian packages start their services on install; forbid that while we install
    # (policy-rc.d exit 101 = "action forbidden"), unless a policy is already in place.
    local policy=/usr/sbin/policy-rc.d added_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 755 "$policy"
        added_policy=1
    fi
    local rc=0
    $SUDO apt-get update -qq || rc=$?
    if [ "$rc" -eq 0 ]; then
        $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" || rc=$?
    fi
    if [ -n "$added_policy" ]; then $SUDO rm -f "$policy"; fi
    return "$rc"
}

install_packages
stop_system_services
# cargo-deb for scripts/package.sh (tests/e2e/test_package.py skips without it); built once, a few minutes
cargo deb --version 2>/dev/null | grep -qx 'cargo-deb 3.8.0' || cargo install cargo-deb --locked --version 3.8.0 || log "cargo-deb could not be installed"

log "cargo build --locked --bins"
cargo build --locked --bins

failed=()

log "layering: src/proto, src/route.rs and src/config use no tokio (they are sans-IO)"
if grep -rnwE 'tokio|tokio_util|tokio_rustls' src/proto src/route.rs src/config --include='*.rs' \
        | grep -vE '^[^:]+:[0-9]+:\s*//'; then
    echo "the lines above use tokio in a layer that must not"
    failed+=("layering")
fi

log "cargo test --locked"
# --show-output: the load test reports the proxy's memory per idle session.
if ! cargo test --locked --no-fail-fast -- --show-output; then
    failed+=("cargo test")
fi

log "end-to-end tests: /usr/bin/python3 -m pytest -q tests/e2e"
export CUTOVER_BIN="${CUTOVER_BIN:-target/debug/cutover}"
if ! /usr/bin/python3 -m pytest -q tests/e2e "$@"; then
    failed+=("pytest tests/e2e")
fi

log "soak test: scripts/soak.sh 60s (all protocols under reloads, kicks, holds, backend and Redis restarts; about 75 s)"
if ! bash scripts/soak.sh 60s; then
    failed+=("scripts/soak.sh 60s")
fi

log "bounded fuzzing: fuzz/run.sh (about a minute of fuzzing, after the build)"
if ! bash fuzz/run.sh "${FUZZ_SECONDS:-8}"; then
    failed+=("fuzz/run.sh")
fi

if [ "${#failed[@]}" -ne 0 ]; then
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "all tests passed"
