#!/usr/bin/env bash
# Bounded fuzz run of every cutover fuzz target, for CI and for a quick local check.
#
#   fuzz/run.sh [seconds-per-target]     (default 8: about a minute of fuzzing in total)
#
# Installs cargo-fuzz if it is missing, builds every target (libFuzzer + AddressSanitizer,
# release with debug assertions) with the stable toolchain (RUSTC_BOOTSTRAP=1 unlocks the
# -Z flags cargo-fuzz passes), replays the seed corpus and fuzz/regressions/<target>/, then
# fuzzes each target for the given time. The committed corpus is never written to: new
# inputs go to a scratch directory. Exits non-zero if any target crashes, leaks, times out
# or runs out of memory; the reproducer is kept under fuzz/artifacts/<target>/.
# FUZZ_TARGETS="a b" runs only those targets. Targets run one at a time: the machine has
# 2 cores, and other jobs of the same CI run may be compiling.
set -euo pipefail

secs="${1:-8}"
case "$secs" in
'' | *[!0-9]*)
    echo "usage: $0 [seconds-per-target]" >&2
    exit 2
    ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")"
export RUSTC_BOOTSTRAP=1
CARGO_FUZZ_VERSION=0.13.2

all_targets="imap_server imap_backend pop3_server pop3_backend smtp_server smtp_server_alphabet smtp_backend config proxy_header oauth_message boundary"
targets="${FUZZ_TARGETS:-$all_targets}"

started=$(date +%s)
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

echo "== building fuzz targets"
build_started=$(date +%s)
cargo fuzz build -O
echo "== build took $(($(date +%s) - build_started)) s"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

dict_for() {
    case "$1" in
    imap_*) echo dict/imap.dict ;;
    pop3_*) echo dict/pop3.dict ;;
    smtp_*) echo dict/smtp.dict ;;
    config) echo dict/yaml.dict ;;
    proxy_*) echo dict/proxy.dict ;;
    oauth_*) echo dict/oauth.dict ;;
    boundary) echo dict/boundary.dict ;;
    esac
}

passed=0
failed=0
failures=""
for t in $targets; do
    mkdir -p "$scratch/$t" "artifacts/$t"
    dirs=("$scratch/$t" "corpus/$t")
    if [ -d "regressions/$t" ]; then
        dirs+=("regressions/$t")
    fi
    log="$scratch/$t.log"
    echo "== $t: ${secs}s"
    # -timeout: one input may take 10 s at most; -rss_limit_mb: 2 GiB. The outer timeout
    # only guards against a hung fuzzer.
    if timeout --kill-after=30 $((secs * 3 + 120)) \
        cargo fuzz run -O "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
        -dict="$(dict_for "$t")" -artifact_prefix="artifacts/$t/" \
        -print_final_stats=1 >"$log" 2>&1; then
        passed=$((passed + 1))
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
        echo "   ok: ${execs:-?} executions, ${cov:-cov: ?}"
    else
        failed=$((failed + 1))
        failures="$failures $t"
        echo "   FAILED: $t (log follows; reproducer in fuzz/artifacts/$t/)"
        grep -v '^ *[0-9]*: \|^ *at ' "$log" | tail -60
    fi
done

echo "== fuzz run took $(($(date +%s) - started)) s in total"
if [ "$failed" -ne 0 ]; then
    echo "fuzz targets that failed:$failures"
    echo "reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O <target> artifacts/<target>/<file>"
fi
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
