#!/usr/bin/env bash
# Issue 7's benchmark in one command: cutover against the fake backend directly (the
# limit), HAProxy in TCP mode, nginx's mail proxy and Stalwart's migration proxy, same
# workloads, same certificate, same machine, one run. Prints the table and writes
# BENCHMARKS.md.
#
#   bench/compare.sh              # full run (~35 minutes on 2 cores, + ~10 for lookups)
#   bench/compare.sh --quick      # short run (~8 minutes), single repetitions
#   bench/compare.sh --scale-only # only the scale section (~11 minutes; --quick: ~3)
#
# The login rates are measured twice: with every process free to use every CPU, and with
# the running proxy's threads moved to CPU 1 and the fake backend and the load generator
# to CPU 0 (taskset on the running processes, undone afterwards): rows "... proxy pinned
# to CPU 1". "server CPU per login" is user+system time of the server's processes
# (/proc/PID/stat), shown split into user space and kernel time below it. Login storm rows:
# NOOP p99 of 50 logged-in sessions while TLS logins run against the same target, once as
# fast as 200 concurrent loops go (each target's own maximum rate) and once capped at the
# same rate for every target (--storm-rate, default 800 TLS logins/s), with the rate
# achieved beside it.
#
# The scale section ("## Scale", and a plot drawn with gnuplot as SVG): RSS per idle
# logged-in session at 2,000, 8,000 and 16,000 sessions, plain and implicit TLS, each from a
# freshly started proxy (HAProxy and cutover); a size that does not fit the descriptor
# limit (a proxy holds 2 descriptors per session; `ulimit -Hn` is read at run time) is
# reported n/a with the reason, and the largest size that fits is measured instead.
# Logins/s and p99 login latency at 1, 50, 200 and 1,000 concurrent login loops, plain
# and TLS (direct, HAProxy, cutover), 5 s per point, 3 runs interleaved, the median.
#
# Options:
#   --quick        short durations, 1 repetition, 500 idle sessions; scale: 500, 2,000
#                  and 4,000 idle sessions, 2 s per login point, 1 run
#   --pin          pin each proxy to CPU 1 and the load generator + fake backend to CPU 0
#                  from their start, for every row (default: no pinning, every process
#                  may use every CPU, except in the "pinned" login rows, which --pin skips)
#   --out FILE     where to write the report (default: BENCHMARKS.md at the repo root)
#   --no-install   do not apt-get install missing packages
#   --no-build     use the release binaries already built
#   --keep         keep the temporary directory (configs, logs, raw results)
#   --only LIST    comma-separated targets to measure (direct,haproxy,nginx,cutover,
#                  stalwart); the fleet section (bench/fleet.py: three cutovers sharing a
#                  redis-server, control propagation, login rate with state.redis) runs
#                  with cutover
#   --no-fleet     skip the fleet section
#   --no-lookups   skip the route lookups section (bench/lookups.py: a throw-away
#                  PostgreSQL with 10 million users (1 million with --quick), logins with a
#                  warm and a cold lookup cache against a cohort file, cache memory at a
#                  million entries (100,000 with --quick); about 10 minutes, 2 with --quick;
#                  runs with cutover; a run without it keeps the section of an earlier run)
#   --legacy       the fake backend greets and answers like an older server (bare `* OK`
#                  greeting, AUTH=PLAIN without SASL-IR or LITERAL+, a bare login OK)
#   --cutover BIN  measure this cutover binary (e.g. an experimental build) instead of
#                  target/release/cutover
#   --no-stalwart  skip Stalwart's proxy (its column reads n/a)
#   --storm-rate N the capped login storm's rate, TLS logins/s in all, the same for every
#                  target (default 800, below every target's maximum here; 0: no capped row)
#   --no-scale     skip the scale section (a run without it keeps the section and the plot
#                  of an earlier run)
#   --scale-only   only the scale section: no other workload, no fleet, no lookups; the
#                  section is spliced into --out, the rest of the file is left as it is
#   --scale-sessions LIST  idle session counts (default 2000,8000,16000; --quick
#                  500,2000,4000)
#   --scale-loops LIST     concurrent login loops (default 1,50,200,1000)
#   --scale-targets LIST   targets of the scale section (default direct,haproxy,cutover;
#                  direct only has login points: it is not a proxy)
#   --scale-svg FILE       where to draw the plot (default: bench/scale.svg with the default
#                  --out, else next to --out as NAME-scale.svg)
#
# Stalwart's migration proxy (github.com/stalwartlabs/proxy, AGPL-3.0; built and run for
# the comparison only, none of its code is copied here) at a pinned commit: $STALWART_BIN
# if set, else a cached build in ${CUTOVER_BENCH_CACHE:-~/.cache/cutover-bench}/
# stalwart-proxy-COMMIT/proxy, else the source is fetched ($STALWART_SRC if set, a local
# mirror, or GitHub) and built there with cargo once (several minutes; also with
# --no-build). If that fails the run goes on and the report says why the column is n/a.
#
# Needs root for apt-get (nginx, libnginx-mod-mail, haproxy, openssl, postgresql,
# gnuplot-nox). Every address is on 127.0.0.0/8; every load loop is bounded in time and
# count; every process started here is stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=full
PIN=0
OUT="$ROOT/BENCHMARKS.md"
INSTALL=1
BUILD=1
KEEP=0
ONLY="direct,haproxy,nginx,cutover,stalwart"
CUTOVER_BIN=""
FLEET=1
LOOKUPS=1
STYLE=modern
STALWART_WANTED=1
STORM_RATE=800
SCALE=1
MAIN=1
SCALE_SESSIONS=""
SCALE_LOOPS="1,50,200,1000"
SCALE_TARGETS="direct,haproxy,cutover"
SCALE_SVG=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) MODE=quick ;;
        --pin) PIN=1 ;;
        --out) OUT=$(realpath -m "$2"); shift ;;
        --no-install) INSTALL=0 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --only) ONLY="$2"; shift ;;
        --cutover) CUTOVER_BIN=$(realpath "$2"); shift ;;
        --no-fleet) FLEET=0 ;;
        --no-lookups) LOOKUPS=0 ;;
        --legacy) STYLE=legacy ;;
        --no-stalwart) STALWART_WANTED=0 ;;
        --storm-rate) STORM_RATE="$2"; shift ;;
        --no-scale) SCALE=0 ;;
        --scale-only) SCALE=1; MAIN=0; FLEET=0; LOOKUPS=0 ;;
        --scale-sessions) SCALE_SESSIONS="$2"; shift ;;
        --scale-loops) SCALE_LOOPS="$2"; shift ;;
        --scale-targets) SCALE_TARGETS="$2"; shift ;;
        --scale-svg) SCALE_SVG=$(realpath -m "$2"); shift ;;
        -h|--help) sed -n '2,/^set -euo pipefail/{/^#/p}' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$MODE" = quick ]; then
    REPS=1; LOGIN_S=3; UNLOADED_S=2; FETCH_S=2; IDLE_N=500; NOOP_N=3000; FLEET_TRIALS=50
    STORM_S=3
    SCALE_LOGIN_S=2; SCALE_REPS=1; SCALE_SESSIONS=${SCALE_SESSIONS:-500,2000,4000}
else
    REPS=3; LOGIN_S=10; UNLOADED_S=3; FETCH_S=5; IDLE_N=2000; NOOP_N=20000; FLEET_TRIALS=200
    STORM_S=10
    SCALE_LOGIN_S=5; SCALE_REPS=3; SCALE_SESSIONS=${SCALE_SESSIONS:-2000,8000,16000}
fi
for list in "$SCALE_SESSIONS" "$SCALE_LOOPS"; do
    [[ "$list" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || { echo "not a list of counts: $list" >&2; exit 2; }
done
[[ "$STORM_RATE" =~ ^[0-9]+$ ]] || { echo "--storm-rate: not a whole number: $STORM_RATE" >&2; exit 2; }
# --scale-only: only the targets the scale section measures are started.
if [ "$MAIN" = 0 ]; then
    keep=""
    for t in ${ONLY//,/ }; do
        [[ ",$SCALE_TARGETS," == *",$t,"* ]] && keep="$keep${keep:+,}$t"
    done
    ONLY=$keep
fi
if [ -z "$SCALE_SVG" ]; then
    if [ "$OUT" = "$ROOT/BENCHMARKS.md" ]; then
        SCALE_SVG="$ROOT/bench/scale.svg"
    else
        SCALE_SVG="${OUT%.md}-scale.svg"
    fi
fi
CONC=200
STORM_N=50
NPROC=$(nproc)
STARTED=$(date +%s)

log() { printf '\n== %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }

# Enough descriptors for thousands of sessions (both sides of each proxy).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
[ "$NOFILE" -lt 16384 ] && warn "open files limit is $NOFILE; idle sessions may fail"
# HAProxy sizes its descriptor needs from maxconn (2 per connection) and refuses to start
# above the limit.
HAPROXY_MAXCONN=$(( (NOFILE - 100) / 2 ))
[ "$HAPROXY_MAXCONN" -gt 100000 ] && HAPROXY_MAXCONN=100000

# --- packages ----------------------------------------------------------------------------
if [ "$INSTALL" = 1 ]; then
    need=()
    command -v nginx >/dev/null || need+=(nginx)
    [ -e /usr/lib/nginx/modules/ngx_mail_module.so ] || need+=(libnginx-mod-mail)
    command -v haproxy >/dev/null || need+=(haproxy)
    command -v openssl >/dev/null || need+=(openssl)
    command -v taskset >/dev/null || need+=(util-linux)
    command -v pgrep >/dev/null || need+=(procps)
    command -v redis-server >/dev/null || need+=(redis-server)
    [ "$SCALE" = 1 ] && ! command -v gnuplot >/dev/null && need+=(gnuplot-nox)
    if [ "$LOOKUPS" = 1 ] && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
        need+=(postgresql)
    fi
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        apt-get update -qq
        # RUNLEVEL=1: the packages' postinst must not start system nginx/haproxy services.
        DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi
for tool in nginx haproxy openssl taskset pgrep; do
    command -v "$tool" >/dev/null || { echo "missing: $tool (run without --no-install)" >&2; exit 1; }
done
[ -e /usr/lib/nginx/modules/ngx_mail_module.so ] || { echo "missing: libnginx-mod-mail" >&2; exit 1; }

# --- build -------------------------------------------------------------------------------
cd "$ROOT"
if [ "$BUILD" = 1 ]; then
    log "building release binaries"
    [ -n "$CUTOVER_BIN" ] || cargo build --release --bin cutover
    cargo build --release -p cutover-bench
fi
CUTOVER="${CUTOVER_BIN:-$ROOT/target/release/cutover}"
FAKE="$ROOT/target/release/cutover-fake-imap"
LOAD="$ROOT/target/release/cutover-load"
FLOOR_RELAY="$ROOT/target/release/cutover-floor-relay"
for b in "$CUTOVER" "$FAKE" "$LOAD" "$FLOOR_RELAY"; do
    [ -x "$b" ] || { echo "missing binary: $b" >&2; exit 1; }
done

# --- Stalwart's migration proxy ----------------------------------------------------------
# github.com/stalwartlabs/proxy is AGPL-3.0: it is built from its own repository and run
# unmodified for the comparison; nothing of it is copied into this project. One build per
# pinned commit, cached outside the repository. Any failure leaves its column n/a (with
# the reason in the report) and the rest of the run goes on.
STALWART_COMMIT=1ddc5dce99ff392381c8555f237794c292c3279f # v1.0.0
STALWART_URL=https://github.com/stalwartlabs/proxy
STALWART_MIRROR=/work/.mirror/stalwartlabs+proxy/repo
BENCH_CACHE=${CUTOVER_BENCH_CACHE:-$HOME/.cache/cutover-bench}
STALWART=""         # the binary
STALWART_VERSION="" # for "Machine and versions"
STALWART_NA=""      # why its column is n/a

# stalwart_obtain: sets STALWART and STALWART_VERSION, or STALWART_NA and returns 1.
# Called in an `if`: every step is checked explicitly (set -e does not apply there).
stalwart_obtain() {
    local dir="$BENCH_CACHE/stalwart-proxy-$STALWART_COMMIT" from src ver t0 err
    if [ -n "${STALWART_BIN:-}" ]; then
        if [ ! -f "$STALWART_BIN" ] || [ ! -x "$STALWART_BIN" ]; then
            STALWART_NA="STALWART_BIN=$STALWART_BIN is not an executable file"
            return 1
        fi
        STALWART=$(realpath "$STALWART_BIN")
        STALWART_VERSION="$STALWART (\`STALWART_BIN\`; its version is not checked)"
        return 0
    fi
    if [ -x "$dir/proxy" ]; then
        STALWART="$dir/proxy"
        STALWART_VERSION=$(cat "$dir/version" 2>/dev/null || echo "commit $STALWART_COMMIT")
        return 0
    fi
    if [ -n "${STALWART_SRC:-}" ]; then
        from=$STALWART_SRC
    elif [ -d "$STALWART_MIRROR" ]; then
        from=$STALWART_MIRROR
    else
        from=$STALWART_URL
    fi
    for tool in git cargo timeout; do
        command -v "$tool" >/dev/null || { STALWART_NA="\`$tool\` not found"; return 1; }
    done
    if ! mkdir -p "$dir"; then
        STALWART_NA="cannot create $dir"
        return 1
    fi
    src="$dir/src"
    : >"$dir/fetch.log"
    log "Stalwart proxy: source at commit $STALWART_COMMIT from $from (log: $dir/fetch.log)"
    # A fetch by commit first (GitHub and local repositories allow it), else every branch
    # and tag; at most 5 minutes each, never a credential prompt.
    if ! {
        { [ -d "$src/.git" ] || git init -q "$src"; } &&
        { git -C "$src" cat-file -e "$STALWART_COMMIT^{commit}" 2>/dev/null ||
          GIT_TERMINAL_PROMPT=0 timeout 300 git -C "$src" fetch -q "$from" "$STALWART_COMMIT" ||
          GIT_TERMINAL_PROMPT=0 timeout 300 git -C "$src" fetch -q "$from" \
              '+refs/heads/*:refs/remotes/bench/*' '+refs/tags/*:refs/tags/*'; } &&
        git -C "$src" -c advice.detachedHead=false checkout -q --force --detach "$STALWART_COMMIT"
    } >>"$dir/fetch.log" 2>&1; then
        err=$(grep -m1 -iE 'fatal|error' "$dir/fetch.log")
        STALWART_NA="could not get commit $STALWART_COMMIT from $from${err:+ ($err)}"
        return 1
    fi
    ver=$(git -C "$src" show HEAD:Cargo.toml | sed -n 's/^version = "\(.*\)"/\1/p' | head -1)
    log "Stalwart proxy: cargo build --release (once per commit; ~5 min on 2 cores; log: $dir/build.log)"
    t0=$(date +%s)
    if ! (cd "$src" && CARGO_TARGET_DIR="$dir/target" timeout 3600 cargo build --release --locked) \
            >"$dir/build.log" 2>&1; then
        err=$(grep -m1 -E '^error' "$dir/build.log" || tail -1 "$dir/build.log")
        STALWART_NA="\`cargo build --release --locked\` of commit $STALWART_COMMIT failed: $err (log: $dir/build.log)"
        return 1
    fi
    if ! cp "$dir/target/release/proxy" "$dir/proxy.tmp.$$" || ! mv -f "$dir/proxy.tmp.$$" "$dir/proxy"; then
        STALWART_NA="cannot copy the build to $dir/proxy"
        return 1
    fi
    printf 'proxy %s (github.com/stalwartlabs/proxy, commit %s; `cargo build --release --locked`, %s)\n' \
        "${ver:-?}" "${STALWART_COMMIT:0:12}" "$(cd "$src" && rustc --version)" >"$dir/version"
    log "Stalwart proxy: built in $(( $(date +%s) - t0 )) s: $dir/proxy"
    STALWART="$dir/proxy"
    STALWART_VERSION=$(cat "$dir/version")
    return 0
}

if [[ ",$ONLY," != *",stalwart,"* ]]; then
    STALWART_NA="not measured in this run (\`--only $ONLY\`)"
elif [ "$STALWART_WANTED" = 0 ]; then
    STALWART_NA="not measured in this run (\`--no-stalwart\`)"
elif ! stalwart_obtain; then
    warn "Stalwart proxy not available, its column will read n/a: $STALWART_NA"
fi

# --- processes ---------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/cutover-bench.XXXXXX)
PIDS=()
FAILED=1
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [ "$KEEP" = 1 ] || [ "$FAILED" = 1 ]; then
        echo "logs and configs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$PIN" = 1 ] && [ "$NPROC" -ge 2 ]; then
    PROXY_CPU=(taskset -c 1)
    LOAD_CPU=(taskset -c 0)
    CPU_NOTE="pinned with taskset: each proxy on CPU 1 (so one worker each), load generator and fake backend on CPU 0"
else
    PROXY_CPU=()
    LOAD_CPU=()
    CPU_NOTE="no pinning: every process (proxy, load generator, fake backend) may run on all $NPROC CPUs; each proxy runs one worker per CPU (nginx worker_processes auto, HAProxy's default nbthread, cutover's default tokio runtime, Stalwart's \`threads = 0\`)"
fi
# The login rows "proxy pinned to CPU 1": measured unless the whole run is pinned (--pin)
# or there is a single CPU.
if [ "$PIN" = 1 ]; then
    PINNED_ROWS=0
    PINNED_NOTE="Pinned login rows: none separately: with \`--pin\` every row is measured pinned already (see CPU above)."
elif [ "$NPROC" -lt 2 ]; then
    PINNED_ROWS=0
    PINNED_NOTE="Pinned login rows: skipped: this machine has one CPU, there is nothing to pin apart."
    warn "one CPU: the pinned login rows are skipped"
else
    PINNED_ROWS=1
    CPU_NOTE="$CPU_NOTE (except in the login rows marked \"proxy pinned to CPU 1\", see below)"
fi
# The CPUs every process started with (and gets back after a pinned row).
CPU_ALL=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)
[ -n "$CPU_ALL" ] || CPU_ALL="0-$((NPROC - 1))"

# start NAME CMD...: runs CMD in the background, output to $WORK/NAME.log; sets $LASTPID.
start() {
    local name=$1; shift
    "$@" >>"$WORK/$name.log" 2>&1 &
    LASTPID=$!
    PIDS+=("$LASTPID")
}

stop() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local keep=()
    for i in "${PIDS[@]}"; do [ "$i" = "$pid" ] || keep+=("$i"); done
    PIDS=("${keep[@]}")
}

wait_port() {
    local host=$1 port=$2 i
    for i in $(seq 200); do
        if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on $host:$port; see $WORK/*.log" >&2
    return 1
}

# --- certificate -------------------------------------------------------------------------
log "ECDSA P-256 CA and certificate for this run"
C="$WORK/certs"
mkdir -p "$C"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$C/ca-key.pem" 2>/dev/null
openssl req -x509 -new -key "$C/ca-key.pem" -sha256 -days 2 -subj "/CN=cutover bench CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$C/ca.pem" 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$C/key.pem" 2>/dev/null
openssl req -new -key "$C/key.pem" -subj "/CN=bench.test" -out "$C/leaf.csr" 2>/dev/null
cat >"$C/leaf.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:bench.test,IP:127.0.0.2,IP:127.0.0.3,IP:127.0.0.4,IP:127.0.0.5,IP:127.0.0.6
EOF
openssl x509 -req -in "$C/leaf.csr" -CA "$C/ca.pem" -CAkey "$C/ca-key.pem" -CAcreateserial \
    -days 2 -sha256 -extfile "$C/leaf.ext" -out "$C/cert.pem" 2>/dev/null
cat "$C/cert.pem" "$C/key.pem" >"$C/combined.pem"
CA="$C/ca.pem"

# --- addresses and configurations --------------------------------------------------------
BACKEND=127.0.0.2
HAPROXY=127.0.0.3
NGINX=127.0.0.4
CUT=127.0.0.5
STAL=127.0.0.6
FLOOR=127.0.0.7
PLAIN=10143
TLSP=10993
AUTHP=10080

cat >"$WORK/haproxy.cfg" <<EOF
global
    maxconn $HAPROXY_MAXCONN
defaults
    mode tcp
    maxconn $HAPROXY_MAXCONN
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend imap
    bind $HAPROXY:$PLAIN backlog 4096
    bind $HAPROXY:$TLSP backlog 4096 ssl crt $C/combined.pem
    default_backend fake
backend fake
    server fake $BACKEND:$PLAIN
EOF

cat >"$WORK/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
worker_processes auto;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log error;
events { worker_connections 8192; }
http {
    access_log off;
    server {
        listen $NGINX:$AUTHP;
        # auth_http answered by nginx itself: nginx at its best.
        location = /auth {
            add_header Auth-Status OK;
            add_header Auth-Server $BACKEND;
            add_header Auth-Port $PLAIN;
            return 204;
        }
    }
}
mail {
    server_name bench.test;
    auth_http $NGINX:$AUTHP/auth;
    imap_capabilities IMAP4rev1 LITERAL+ IDLE ID;
    imap_auth login plain;
    server {
        listen $NGINX:$PLAIN backlog=4096;
        protocol imap;
    }
    server {
        listen $NGINX:$TLSP ssl backlog=4096;
        protocol imap;
        ssl_certificate $C/cert.pem;
        ssl_certificate_key $C/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
    }
}
EOF

cat >"$WORK/cutover.yaml" <<EOF
hostname: bench.test
tls:
  certificates:
    - { cert: certs/cert.pem, key: certs/key.pem }
listeners:
  - { name: imap,  protocol: imap, listen: "$CUT:$PLAIN", tls: none, allow_plaintext_auth: true }
  - { name: imaps, protocol: imap, listen: "$CUT:$TLSP", tls: implicit }
pools:
  fake:
    health: { interval: 0s }
    imap: { servers: ["$BACKEND:$PLAIN"] }
routes:
  - { pool: fake }
shutdown:
  drain_timeout: 1s
limits:
  # One client address (127.0.0.1) opens every connection here; the peers have no
  # per-address limit configured either.
  max_connections: 100000
  max_connections_per_ip: 100000
metrics:
  listen: "$CUT:19898"
EOF
"$CUTOVER" check --config "$WORK/cutover.yaml" >/dev/null

# Stalwart's proxy: keys from its src/config/mod.rs at the pinned commit. Every account
# goes to the default destination (the mappings file is empty, as the file store needs
# one); the backend leg is plaintext, so credentials may go over it only with
# allow_plaintext_auth; no PROXY header and no ID/XCLIENT (the fake backend, like the
# other peers' backends here, expects neither).
: >"$WORK/stalwart-mappings.tsv"
cat >"$WORK/stalwart.toml" <<EOF
[server]
threads = 0
hostname = "bench.test"
log_level = "warn"
shutdown_grace = "1s"

[tls.certificate.bench]
cert = "$C/cert.pem"
key = "$C/key.pem"
default = true

[routing]
default_destination = "fake"

[mapping]
source = "file"

[mapping.file]
path = "$WORK/stalwart-mappings.tsv"

[destination.fake]
host = "$BACKEND"
proxy_protocol = false
forwarding = "none"
allow_plaintext_auth = true

[destination.fake.protocol.imap]
port = $PLAIN
tls = "plain"

[capabilities.imap]
allow_plain_auth_without_tls = true

# One client address (127.0.0.1) opens every connection; the default is 8192 per listener
# (there is no per-address limit).
[listener.imap]
protocol = "imap"
bind = ["$STAL:$PLAIN"]
tls = "plain"
max_connections = 100000

[listener.imaps]
protocol = "imap"
bind = ["$STAL:$TLSP"]
tls = "implicit"
max_connections = 100000
EOF

# --- start everything --------------------------------------------------------------------
log "starting the fake backend and the proxies"
declare -A PID
FAKE_STYLE=()
[ "$STYLE" = legacy ] && FAKE_STYLE=(--legacy)
start fake "${LOAD_CPU[@]}" "$FAKE" --listen "$BACKEND:$PLAIN" --tls-listen "$BACKEND:$TLSP" \
    --cert "$C/cert.pem" --key "$C/key.pem" --fetch-size 1048576 "${FAKE_STYLE[@]}"
FAKEPID=$LASTPID
wait_port $BACKEND $PLAIN
wait_port $BACKEND $TLSP
# The floor of a relayed round trip (NOOP rows): a blocking two-thread relay.
start floor "${PROXY_CPU[@]}" "$FLOOR_RELAY" --listen "$FLOOR:$PLAIN" --to "$BACKEND:$PLAIN"
PID[floor]=$LASTPID
wait_port $FLOOR $PLAIN

# start_proxy NAME: fails (status 1) if the proxy does not listen on both ports.
start_proxy() {
    case $1 in
        haproxy) start haproxy "${PROXY_CPU[@]}" haproxy -f "$WORK/haproxy.cfg" -db
                 PID[haproxy]=$LASTPID; wait_port $HAPROXY $PLAIN && wait_port $HAPROXY $TLSP ;;
        nginx)   start nginx "${PROXY_CPU[@]}" nginx -c "$WORK/nginx.conf" -p "$WORK" -g 'daemon off;'
                 PID[nginx]=$LASTPID; wait_port $NGINX $PLAIN && wait_port $NGINX $TLSP ;;
        # CUTOVER_LOG=warn: no per-session log line, like nginx's mail module at its
        # default error_log level (the cost of info logging is in BENCHMARKS.md, Findings).
        cutover) start cutover "${PROXY_CPU[@]}" env CUTOVER_LOG=warn "$CUTOVER" run --config "$WORK/cutover.yaml"
                 PID[cutover]=$LASTPID; wait_port $CUT $PLAIN && wait_port $CUT $TLSP ;;
        # RUST_LOG would override the config's log_level (warn: no per-session line either).
        stalwart) start stalwart "${PROXY_CPU[@]}" env -u RUST_LOG "$STALWART" "$WORK/stalwart.toml"
                  PID[stalwart]=$LASTPID; wait_port $STAL $PLAIN && wait_port $STAL $TLSP ;;
    esac
}
# The processes whose RSS counts: nginx's workers (the master holds no session).
rss_pids() {
    case $1 in
        nginx)
            local w i
            for i in $(seq 100); do
                w=$(pgrep -d, -P "${PID[nginx]}" || true)
                [ "$(echo "$w" | tr ',' '\n' | grep -c .)" -ge "$NPROC" ] && break
                sleep 0.05
            done
            echo "$w" ;;
        *) echo "${PID[$1]}" ;;
    esac
}

addr_of() {
    case $1 in
        direct) echo $BACKEND ;; haproxy) echo $HAPROXY ;; nginx) echo $NGINX ;;
        cutover) echo $CUT ;; stalwart) echo $STAL ;; floor) echo $FLOOR ;;
    esac
}

TARGETS=()
for t in direct haproxy nginx cutover stalwart; do
    [ "$t" = stalwart ] && [ -z "$STALWART" ] && continue
    case ",$ONLY," in *",$t,"*) TARGETS+=("$t") ;; esac
done
for t in "${TARGETS[@]}"; do
    if [ "$t" = stalwart ]; then
        # Stalwart's proxy not starting is not fatal: its column reads n/a.
        if ! start_proxy stalwart; then
            why=$(tail -2 "$WORK/stalwart.log" | tr '\n' ' ' | sed 's/ *$//')
            STALWART_NA="it did not listen on $STAL:$PLAIN and $STAL:$TLSP within 10 s with the generated configuration (${why:-nothing in its log})"
            STALWART_VERSION=""
            warn "Stalwart proxy: $STALWART_NA"
            stop "${PID[stalwart]}"
            unset 'PID[stalwart]'
            keep=()
            for k in "${TARGETS[@]}"; do [ "$k" = stalwart ] || keep+=("$k"); done
            TARGETS=("${keep[@]}")
        fi
    elif [ "$t" != direct ]; then
        start_proxy "$t"
    fi
done

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
RAW="$WORK/raw.jsonl"
: >"$RAW"

# json KEY < line: the number after "KEY": (the load generator's JSON is flat).
json() { sed -nE "s/.*\"$1\":(-?[0-9.]+|null).*/\1/p"; }
record() { [ -n "$3" ] && [ "$3" != null ] && printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RESULTS"; return 0; }

# CPU accounting, in clock ticks: system-wide busy/idle from /proc/stat, and user+system
# time of given processes from /proc/PID/stat.
CLK=$(getconf CLK_TCK)
sys_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat; }
proc_ticks() {
    local s=0 p
    for p in "$@"; do
        [ -r "/proc/$p/stat" ] && s=$((s + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12+$13}')))
    done
    echo $s
}
# proc_ticks_split PID...: "USER SYSTEM" ticks of the processes (utime, stime).
proc_ticks_split() {
    local u=0 k=0 p pu pk
    for p in "$@"; do
        [ -r "/proc/$p/stat" ] || continue
        read -r pu pk < <(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12, $13}')
        u=$((u + pu)); k=$((k + pk))
    done
    echo "$u $k"
}
# The processes that do a target's server-side work: the fake backend for "direct", the
# proxy otherwise (nginx: master and workers).
server_pids() {
    case $1 in
        direct) echo "$FAKEPID" ;;
        nginx) echo "${PID[nginx]}" $(pgrep -P "${PID[nginx]}" || true) ;;
        *) echo "${PID[$1]}" ;;
    esac
}
our_pids() {
    local t
    echo "$FAKEPID"
    for t in haproxy nginx cutover stalwart floor; do [ -n "${PID[$t]:-}" ] && server_pids "$t"; done
}

# Other engineers' builds or fuzzers on the same machine skew every figure: before each
# measurement wait until the CPUs are idle apart from our own processes (at most 20 s per
# measurement and QUIET_BUDGET seconds in all; then measure anyway and count it).
QUIET_BUDGET=${QUIET_BUDGET:-300}
WAITED=0
# fake_alive: stops the run if the fake backend has exited (every measurement after that
# would only count errors), with its exit status (128+N: killed by signal N).
fake_alive() {
    local st=0
    kill -0 "$FAKEPID" 2>/dev/null && return 0
    wait "$FAKEPID" 2>/dev/null || st=$?
    echo "the fake backend (pid $FAKEPID) has exited, status $st; see $WORK/fake.log" >&2
    exit 1
}
wait_quiet() {
    local tries=0 b0 i0 b1 i1 o0 o1 busy
    fake_alive
    while :; do
        read -r b0 i0 < <(sys_ticks); o0=$(proc_ticks $(our_pids))
        sleep 0.5
        read -r b1 i1 < <(sys_ticks); o1=$(proc_ticks $(our_pids))
        busy=$(( 100 * ((b1 - b0) - (o1 - o0)) / ((b1 - b0) + (i1 - i0) + 1) ))
        [ "$busy" -le 15 ] && return 0
        if [ $tries -ge 10 ] || [ "$WAITED" -ge "$QUIET_BUDGET" ]; then
            warn "machine busy ($busy% CPU used by other processes); measuring anyway"
            echo busy >>"$WORK/busy.log"
            return 0
        fi
        [ $tries = 0 ] && warn "machine busy ($busy% CPU used by other processes); waiting"
        tries=$((tries + 1))
        WAITED=$((WAITED + 2))
        sleep 1.5
    done
}

# load TARGET MODE ARGS...: runs the load generator against TARGET and prints its JSON
# line, extended with the server-side CPU ticks and the share of CPU other processes
# (not ours, not the load generator) took meanwhile.
load() {
    local target=$1 mode=$2; shift 2
    local out b0 i0 b1 i1 s0 s1 u0 u1 k0 k1 o0 o1 lt other
    read -r b0 i0 < <(sys_ticks); read -r u0 k0 < <(proc_ticks_split $(server_pids "$target")); o0=$(proc_ticks $(our_pids))
    if ! out=$("${LOAD_CPU[@]}" "$LOAD" "$mode" --label "$target" "$@" 2>>"$WORK/load.log"); then
        warn "$mode against $target failed (see $WORK/load.log)"
        tail -3 "$WORK/load.log" >&2
        return 0
    fi
    read -r b1 i1 < <(sys_ticks); read -r u1 k1 < <(proc_ticks_split $(server_pids "$target")); o1=$(proc_ticks $(our_pids))
    s0=$((u0 + k0)); s1=$((u1 + k1))
    lt=$(echo "$out" | json cpu_ticks); lt=${lt:-0}
    other=$(( 100 * ((b1 - b0) - (o1 - o0) - lt) / ((b1 - b0) + (i1 - i0) + 1) ))
    out="${out%\}},\"server_cpu_ticks\":$((s1 - s0)),\"server_user_ticks\":$((u1 - u0)),\"server_sys_ticks\":$((k1 - k0)),\"other_cpu_pct\":$other}"
    echo "$out" >>"$RAW"
    echo "$out"
}
# per_op TICKS COUNT: microseconds of CPU per operation.
per_op() { awk -v t="$1" -v n="$2" -v c="$CLK" 'BEGIN{ if (n > 0 && t != "") printf "%.1f", t * 1e6 / c / n }'; }

# noop_cpu JSON: the server's CPU per NOOP round trip (over every round trip the run
# made, warm-up included: the CPU was spent on those too).
noop_cpu() {
    per_op "$(echo "$1" | json server_cpu_ticks)" "$(echo "$1" | json round_trips)"
}

tls_args() { echo "--tls --ca $CA --addr $(addr_of "$1"):$TLSP"; }
plain_args() { echo "--addr $(addr_of "$1"):$PLAIN"; }

# record_login TARGET PREFIX JSON: the figures of a login run, as PREFIX_rate etc.
record_login() {
    local t=$1 k=$2 out=$3
    record "$t" "${k}_rate" "$(echo "$out" | json rate)"
    record "$t" "${k}_p50_ms" "$(echo "$out" | json p50_ms)"
    record "$t" "${k}_p99_ms" "$(echo "$out" | json p99_ms)"
    record "$t" "${k}_errors" "$(echo "$out" | json errors)"
    record "$t" "${k}_cpu_us" "$(per_op "$(echo "$out" | json server_cpu_ticks)" "$(echo "$out" | json ok)")"
    record "$t" "${k}_cpu_user_us" "$(per_op "$(echo "$out" | json server_user_ticks)" "$(echo "$out" | json ok)")"
    record "$t" "${k}_cpu_sys_us" "$(per_op "$(echo "$out" | json server_sys_ticks)" "$(echo "$out" | json ok)")"
    record _ other_cpu_pct "$(echo "$out" | json other_cpu_pct)"
}

# Pinning of running processes, for the pinned login rows.
# set_affinity CPUS PID...: every thread of each process (taskset -a; tried three times,
# as a thread ending meanwhile makes it fail).
set_affinity() {
    local cpus=$1 p i; shift
    for p in "$@"; do
        for i in 1 2 3; do
            taskset -a -cp "$cpus" "$p" >/dev/null 2>>"$WORK/taskset.log" && continue 2
            sleep 0.1
        done
        return 1
    done
}
# unpinned PID...: true if every thread of each process may run on every CPU (so that
# giving them CPU_ALL back afterwards restores them).
unpinned() {
    local p f
    for p in "$@"; do
        for f in /proc/"$p"/task/*/status; do
            [ "$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "$f" 2>/dev/null)" = "$CPU_ALL" ] || \
                [ ! -e "$f" ] || return 1
        done
    done
}
# pin TARGET: the target's server processes on CPU 1 and the fake backend on CPU 0 (for
# direct the fake backend is the server: CPU 1).
pin() {
    # shellcheck disable=SC2046
    unpinned "$FAKEPID" $(server_pids "$1") || { echo "$1: threads already bound to CPUs" >>"$WORK/taskset.log"; return 1; }
    if [ "$1" = direct ]; then
        set_affinity 1 "$FAKEPID"
    else
        # shellcheck disable=SC2046
        set_affinity 1 $(server_pids "$1") && set_affinity 0 "$FAKEPID"
    fi
}
# shellcheck disable=SC2046
unpin() { set_affinity "$CPU_ALL" "$FAKEPID" $(server_pids "$1"); }

# --- workloads ---------------------------------------------------------------------------
# idle_measure TARGET KIND N: restarts TARGET (so that memory freed by earlier load and kept
# by the allocator does not hide the sessions' cost), warms it up, holds N logged-in
# sessions in IDLE and leaves the load generator's JSON line in IDLE_OUT (empty if the
# load generator failed); status 1 if the proxy did not restart. Not in a subshell: it
# changes PID and PIDS.
IDLE_OUT=""
idle_measure() {
    local t=$1 kind=$2 n=$3
    IDLE_OUT=""
    stop "${PID[$t]}"
    if ! start_proxy "$t"; then
        warn "$t did not restart (see $WORK/$t.log); idle figures not recorded"
        return 1
    fi
    # Warm-up: every worker has served a few sessions before the baseline is read.
    wait_quiet
    # shellcheck disable=SC2046
    load "$t" login $(${kind}_args "$t") --concurrency 10 --duration 0.5 >/dev/null
    sleep 0.5
    # shellcheck disable=SC2046
    IDLE_OUT=$(load "$t" idle $(${kind}_args "$t") --sessions "$n" --concurrency 50 \
        --pid "$(rss_pids "$t")" --settle 2)
}

if [ "$MAIN" = 1 ]; then
    for kind in plain tls; do
        for rep in $(seq "$REPS"); do
            for t in "${TARGETS[@]}"; do
                log "login $kind, $CONC concurrent, ${LOGIN_S}s: $t (run $rep/$REPS)"
                wait_quiet
                # shellcheck disable=SC2046
                out=$(load "$t" login $(${kind}_args "$t") --concurrency $CONC --duration $LOGIN_S)
                echo "$out" >&2
                record_login "$t" "login_${kind}" "$out"
                sleep 1
            done
        done
    done

    # The same login runs with the running processes pinned: the proxy (every thread) on
    # CPU 1, the fake backend on CPU 0, the load generator started on CPU 0; then all CPUs
    # back for the next run and the other workloads.
    if [ "$PINNED_ROWS" = 1 ]; then
        for kind in plain tls; do
            for rep in $(seq "$REPS"); do
                for t in "${TARGETS[@]}"; do
                    log "login $kind, $CONC concurrent, ${LOGIN_S}s, proxy pinned to CPU 1: $t (run $rep/$REPS)"
                    if ! pin "$t"; then
                        warn "could not pin $t (see $WORK/taskset.log); pinned run skipped"
                        unpin "$t" || warn "could not unpin $t (see $WORK/taskset.log)"
                        continue
                    fi
                    wait_quiet
                    LOAD_CPU=(taskset -c 0)
                    # shellcheck disable=SC2046
                    out=$(load "$t" login $(${kind}_args "$t") --concurrency $CONC --duration $LOGIN_S --pinned)
                    LOAD_CPU=()
                    if ! unpin "$t"; then
                        warn "could not unpin $t (see $WORK/taskset.log); the run stops here"
                        exit 1
                    fi
                    echo "$out" >&2
                    record_login "$t" "login_${kind}_pinned" "$out"
                    sleep 1
                done
            done
        done
    fi

    # Latency, throughput and NOOP: like the login rates, REPS runs interleaved across the
    # targets, the median reported (a single run can land on a bad scheduling pattern).
    for kind in plain tls; do
        for rep in $(seq "$REPS"); do
        for t in "${TARGETS[@]}"; do
            log "unloaded login latency, $kind: $t (run $rep/$REPS)"
            wait_quiet
            # shellcheck disable=SC2046
            out=$(load "$t" login $(${kind}_args "$t") --concurrency 1 --duration $UNLOADED_S)
            echo "$out" >&2
            record "$t" "unloaded_${kind}_p50_ms" "$(echo "$out" | json p50_ms)"
        done
        done
    done

    for kind in plain tls; do
        for rep in $(seq "$REPS"); do
        for t in "${TARGETS[@]}"; do
            log "FETCH 1 MiB throughput, $kind: $t (run $rep/$REPS)"
            wait_quiet
            # shellcheck disable=SC2046
            out=$(load "$t" throughput $(${kind}_args "$t") --duration $FETCH_S --pipeline 2)
            echo "$out" >&2
            record "$t" "fetch_${kind}_mbps" "$(echo "$out" | json mbps)"
            record "$t" "fetch_${kind}_cpu_us_per_mb" "$(per_op "$(echo "$out" | json server_cpu_ticks)" "$(echo "$out" | json bytes | awk '{print $1/1e6}')")"
        done
        done
    done

    for rep in $(seq "$REPS"); do
    for t in "${TARGETS[@]}"; do
        log "NOOP round trip: $t (run $rep/$REPS)"
        wait_quiet
        # shellcheck disable=SC2046
        out=$(load "$t" noop $(plain_args "$t") --count $NOOP_N --duration 20)
        echo "$out" >&2
        record "$t" noop_p50_us "$(echo "$out" | json p50_us)"
        record "$t" noop_p99_us "$(echo "$out" | json p99_us)"
        record "$t" noop_cpu_us "$(noop_cpu "$out")"
    done
        # The floor relay, in every repetition next to the others: its figures go in the
        # "direct" column (they describe the machine, not a proxy).
        log "NOOP round trip: the floor relay (run $rep/$REPS)"
        wait_quiet
        # shellcheck disable=SC2046
        out=$(load floor noop $(plain_args floor) --count $NOOP_N --duration 20)
        echo "$out" >&2
        record direct noop_floor_p50_us "$(echo "$out" | json p50_us)"
        record direct noop_floor_p99_us "$(echo "$out" | json p99_us)"
        record direct noop_floor_cpu_us "$(noop_cpu "$out")"
    done

    # Login storm: NOOPs of established plaintext sessions while TLS logins run flat out
    # against the same target (direct: the fake backend's own TLS port).
    for rep in $(seq "$REPS"); do
    for t in "${TARGETS[@]}"; do
        log "NOOP of $STORM_N sessions during a TLS login storm ($CONC concurrent), ${STORM_S}s: $t (run $rep/$REPS)"
        wait_quiet
        # shellcheck disable=SC2046
        out=$(load "$t" storm $(plain_args "$t") --ca "$CA" --tls-addr "$(addr_of "$t"):$TLSP" \
            --sessions $STORM_N --storm-concurrency $CONC --duration $STORM_S)
        echo "$out" >&2
        record "$t" storm_noop_p50_us "$(echo "$out" | json noop_p50_us)"
        record "$t" storm_noop_p99_us "$(echo "$out" | json noop_p99_us)"
        record "$t" storm_rate "$(echo "$out" | json storm_rate)"
        record "$t" storm_errors "$(echo "$out" | json errors)"
        sleep 1
    done
    done

    # The same storm capped at one rate for every target (--storm-rate): the sessions' wait
    # compared at equal work, and with the load generator's own handshakes well below its
    # limit. The concurrency stays an upper bound; the rate achieved is recorded.
    if [ "$STORM_RATE" -gt 0 ]; then
        record _ storm_cap "$STORM_RATE"
        for rep in $(seq "$REPS"); do
        for t in "${TARGETS[@]}"; do
            log "NOOP of $STORM_N sessions during a TLS login storm capped at $STORM_RATE/s (up to $CONC concurrent), ${STORM_S}s: $t (run $rep/$REPS)"
            wait_quiet
            # shellcheck disable=SC2046
            out=$(load "$t" storm $(plain_args "$t") --ca "$CA" --tls-addr "$(addr_of "$t"):$TLSP" \
                --sessions $STORM_N --storm-concurrency $CONC --storm-rate "$STORM_RATE" --duration $STORM_S)
            echo "$out" >&2
            record "$t" storm_capped_noop_p50_us "$(echo "$out" | json noop_p50_us)"
            record "$t" storm_capped_noop_p99_us "$(echo "$out" | json noop_p99_us)"
            record "$t" storm_capped_rate "$(echo "$out" | json storm_rate)"
            record "$t" storm_capped_errors "$(echo "$out" | json errors)"
            sleep 1
        done
        done
    fi

    # Idle memory: each proxy restarted fresh for each measurement (idle_measure).
    for t in "${TARGETS[@]}"; do
        [ "$t" = direct ] && continue
        for kind in plain tls; do
            log "RSS per idle session, $kind, $IDLE_N sessions: $t (fresh process)"
            idle_measure "$t" "$kind" "$IDLE_N" || break
            out=$IDLE_OUT
            echo "$out" >&2
            per=$(echo "$out" | json bytes_per_session)
            if [ "$(echo "$out" | json errors)" != 0 ]; then
                warn "idle $kind against $t: some sessions failed; figure not recorded"
            elif [ -n "$per" ] && [ "$per" != null ]; then
                record "$t" "idle_${kind}_kib" "$(awk -v b="$per" 'BEGIN{printf "%.2f", b/1024}')"
            fi
            sleep 1
        done
    done
fi

# --- scale -------------------------------------------------------------------------------
# RSS per idle session against the number of sessions (each size from a fresh proxy), and
# logins/s and p99 against the number of concurrent login loops; `cutover-load
# scale-report` writes the section and draws the plot from these results.
SCALE_IDLE=()
SCALE_LOGIN=()
for t in "${TARGETS[@]}"; do
    [[ ",$SCALE_TARGETS," == *",$t,"* ]] || continue
    SCALE_LOGIN+=("$t")
    [ "$t" = direct ] || SCALE_IDLE+=("$t")
done
# Descriptors: a proxy holds 2 per session (its client's and its backend's) and some of
# its own (listeners, epoll, logs; SCALE_FD_SPARE are left for them); the load generator
# and the fake backend 1 per session each. A size that does not fit is n/a, and the
# largest size that fits (a multiple of 500) is measured instead.
SCALE_FD_SPARE=500
SCALE_FIT=$(( (NOFILE - SCALE_FD_SPARE) / 2 / 500 * 500 ))
SCALE_N=()
SCALE_NA=()
if [ "$SCALE" = 1 ]; then
    record _ nofile "$NOFILE"
    for n in ${SCALE_SESSIONS//,/ }; do
        if [ $((2 * n + SCALE_FD_SPARE)) -le "$NOFILE" ]; then
            SCALE_N+=("$n")
        else
            SCALE_NA+=("$n")
            record _ scale_idle_na "$n"
            warn "scale: $n idle sessions need ~$((2 * n)) descriptors in one proxy process, the limit here is $NOFILE: n/a"
        fi
    done
    if [ ${#SCALE_NA[@]} -gt 0 ] && [ "$SCALE_FIT" -gt 0 ]; then
        big=0
        for n in "${SCALE_N[@]}"; do [ "$n" -gt "$big" ] && big=$n; done
        [ "$SCALE_FIT" -gt "$big" ] && SCALE_N+=("$SCALE_FIT")
    fi
    if [ ${#SCALE_N[@]} -gt 0 ]; then
        mapfile -t SCALE_N < <(printf '%s\n' "${SCALE_N[@]}" | sort -n -u)
    fi

    for n in "${SCALE_N[@]}"; do
        for kind in plain tls; do
            for t in "${SCALE_IDLE[@]}"; do
                log "scale: RSS per idle session, $kind, $n sessions: $t (fresh process)"
                idle_measure "$t" "$kind" "$n" || continue
                out=$IDLE_OUT
                echo "$out" >&2
                per=$(echo "$out" | json bytes_per_session)
                if [ -n "$per" ] && [ "$per" != null ]; then
                    record "$t" "scale_idle_${kind}_${n}_kib" "$(awk -v b="$per" 'BEGIN{printf "%.2f", b/1024}')"
                    record "$t" "scale_idle_${kind}_${n}_mib" "$(awk -v a="$(echo "$out" | json rss_after_kib)" \
                        -v b="$(echo "$out" | json rss_before_kib)" 'BEGIN{ if (a != "" && b != "") printf "%.2f", (a - b) / 1024 }')"
                    record "$t" "scale_idle_${kind}_${n}_errors" "$(echo "$out" | json errors)"
                fi
                sleep 1
            done
        done
    done

    for kind in plain tls; do
        for rep in $(seq "$SCALE_REPS"); do
            for c in ${SCALE_LOOPS//,/ }; do
                for t in "${SCALE_LOGIN[@]}"; do
                    log "scale: login $kind, $c concurrent, ${SCALE_LOGIN_S}s: $t (run $rep/$SCALE_REPS)"
                    wait_quiet
                    # shellcheck disable=SC2046
                    out=$(load "$t" login $(${kind}_args "$t") --concurrency "$c" --duration "$SCALE_LOGIN_S")
                    echo "$out" >&2
                    record_login "$t" "scale_login_${kind}_${c}" "$out"
                    sleep 0.5
                done
            done
        done
    done
fi

# Fleet: three cutovers sharing a redis-server (bench/fleet.py).
FLEET_MD="$WORK/fleet.md"
if [ "$FLEET" = 1 ] && [[ ",$ONLY," == *",cutover,"* ]]; then
    log "fleet: control propagation ($FLEET_TRIALS trials) and logins with state.redis"
    wait_quiet
    if ! python3 "$ROOT/bench/fleet.py" --cutover "$CUTOVER" --load "$LOAD" \
            --backend "$BACKEND:$PLAIN" --out "$FLEET_MD" --trials "$FLEET_TRIALS" \
            --login-s "$LOGIN_S" >&2 2>>"$WORK/fleet.log"; then
        warn "bench/fleet.py failed (see $WORK/fleet.log)"
        printf '## Fleet\n\nn/a: bench/fleet.py failed in this run.\n' >"$FLEET_MD"
    fi
fi

# Route lookups: a throw-away PostgreSQL, warm and cold lookup caches against a cohort
# file, cache memory (bench/lookups.py).
LOOKUPS_MD="$WORK/lookups.md"
if [ "$LOOKUPS" = 1 ] && [[ ",$ONLY," == *",cutover,"* ]]; then
    log "route lookups: PostgreSQL, warm and cold lookup cache, cache memory (log: $WORK/lookups.log)"
    wait_quiet
    LOOKUPS_ARGS=(--login-s "$LOGIN_S" --reps "$REPS")
    [ "$MODE" = quick ] && LOOKUPS_ARGS+=(--quick)
    if ! python3 "$ROOT/bench/lookups.py" --cutover "$CUTOVER" --load "$LOAD" \
            --backend "$BACKEND:$PLAIN" --backend-pid "$FAKEPID" --out "$LOOKUPS_MD" "${LOOKUPS_ARGS[@]}" \
            >&2 2> >(tee -a "$WORK/lookups.log" >&2); then
        warn "bench/lookups.py failed (see $WORK/lookups.log)"
        printf '## Route lookups (PostgreSQL)\n\nn/a: bench/lookups.py failed in this run.\n' >"$LOOKUPS_MD"
    fi
fi

# --- report ------------------------------------------------------------------------------
ELAPSED=$(( $(date +%s) - STARTED ))
META="$WORK/meta.tsv"
{
    printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf 'mode\t%s\n' "$MODE"
    printf 'elapsed_s\t%s\n' "$ELAPSED"
    printf 'busy_measurements\t%s\n' "$( [ -f "$WORK/busy.log" ] && wc -l <"$WORK/busy.log" || echo 0)"
    printf 'nproc\t%s\n' "$NPROC"
    printf 'cpu\t%s\n' "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    printf 'mem\t%s\n' "$(free -h | awk '/^Mem:/{print $2}')"
    printf 'kernel\t%s\n' "$(uname -sr)"
    printf 'os\t%s\n' "$(. /etc/os-release && echo "$PRETTY_NAME")"
    printf 'cutover\t%s\n' "$("$CUTOVER" --version)"
    printf 'git\t%s\n' "$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
    printf 'rustc\t%s\n' "$(rustc --version)"
    printf 'nginx\t%s\n' "$(nginx -v 2>&1 | sed 's/^nginx version: //')"
    printf 'haproxy\t%s\n' "$(haproxy -v | head -1)"
    printf 'stalwart\t%s\n' "${STALWART_VERSION:-n/a (see Settings)}"
    printf 'openssl\t%s\n' "$(openssl version)"
    printf 'setting\tCPU: %s.\n' "$CPU_NOTE"
    if [ "$STYLE" = legacy ]; then
        printf 'setting\tBackend style: legacy (`--legacy`): the fake backend greets with a bare `* OK ready`, offers `AUTH=PLAIN` without `SASL-IR` or `LITERAL+` in `CAPABILITY`, and answers a login with a bare `OK`, like the older servers a migration starts from.\n'
    else
        printf 'setting\tBackend style: modern (Dovecot-like): capabilities in the greeting (`SASL-IR`, `LITERAL+`) and in the login'"'"'s OK.\n'
    fi
    printf 'setting\tAddresses: fake backend %s, HAProxy %s, nginx %s, cutover %s, Stalwart proxy %s; port %s plaintext, %s implicit TLS. The fake backend (`cutover-fake-imap`, tokio, rustls+ring on its TLS port) accepts any login; every proxy relays to its plaintext port.\n' $BACKEND $HAPROXY $NGINX $CUT $STAL $PLAIN $TLSP
    printf 'setting\tTLS: one ECDSA P-256 certificate (SAN bench.test) signed by a CA made for the run with openssl, used by every server. Client (`cutover-load`, rustls+ring): TLS 1.3 only, resumption disabled (a full handshake per connection), SNI bench.test, verifies against the CA. Servers keep their defaults otherwise (X25519, AES-256-GCM chosen, session tickets sent as each does by default).\n'
    printf 'setting\tLogins: %s concurrent loops of connect, [TLS], greeting, `LOGIN`, tagged OK, `LOGOUT`, wait for the server to close; %s s per run, %s run(s) per target interleaved across targets, the median reported. Latency: from connect to the tagged OK of LOGIN. Unloaded latency: one loop for %s s; it, FETCH and NOOP are also run %s time(s) per target, interleaved, the median reported.\n' $CONC $LOGIN_S $REPS $UNLOADED_S $REPS
    printf 'setting\tFETCH: one logged-in session, `SELECT`, then `FETCH 1 BODY[]` with 2 in flight, each answered with a 1 MiB (1,048,576-byte) literal, for %s s; MB/s counts literal bytes (10^6 bytes per MB).\n' $FETCH_S
    printf 'setting\tIdle memory: each proxy restarted, warmed up with 10 login loops for 0.5 s, VmRSS read (nginx: sum of its worker processes; the others are one process each), then %s sessions logged in and left in `IDLE` (set up 50 at a time), VmRSS read again 2 s later; (after - before) / sessions. KiB = 1024 bytes.\n' $IDLE_N
    printf 'setting\tNOOP: one logged-in session, 500 round trips of warm-up, then %s, one at a time. "server CPU per round trip": user+system time of the server (the fake backend for direct, else the proxy) over the run, warm-up included, per round trip. The floor ("direct" column, rows "through the floor relay"): the same run through `cutover-floor-relay` (%s), a relay with one blocking thread per direction (`recv` then `send`, nothing else: no event loop, no parsing), the least any user-space relay can cost a round trip on this machine; measured in every repetition after the proxies.\n' $NOOP_N $FLOOR
    if [ "$PINNED_ROWS" = 1 ]; then
        printf 'setting\tPinned login rows ("proxy pinned to CPU 1"): the login runs above (plain and implicit TLS, %s concurrent, %s s, %s run(s) per target interleaved, the median reported) once more, after all the unpinned ones, with the CPU affinity of the running processes changed by `taskset -a -cp` for each run: every thread of the proxy'"'"'s processes (nginx: master and workers) on CPU 1, the fake backend on CPU 0, the load generator started under `taskset -c 0` (for direct, the fake backend is the server and goes on CPU 1); afterwards every process gets all CPUs (%s) back for the next run and the other workloads. The proxies keep the workers they started with (one per CPU, now sharing CPU 1), unlike `--pin`, which starts each proxy on CPU 1 (so with one worker). The rows without that suffix are measured with every process free to use all %s CPUs.\n' $CONC $LOGIN_S $REPS "$CPU_ALL" $NPROC
    else
        printf 'setting\t%s\n' "$PINNED_NOTE"
    fi
    printf 'setting\tLogin storm: %s plaintext sessions logged in and warmed up with 50 `NOOP`s each, then for %s s each does one `NOOP` at a time (round trip: send to tagged OK) while %s loops of TLS logins, as in the login rows (connect, TLS 1.3 full handshake, greeting, `LOGIN`, tagged OK, `LOGOUT`), run as fast as they can against the same target'"'"'s implicit-TLS port; p50/p99 over all the NOOPs of the sessions; the storm'"'"'s logins/s is reported with them. The sessions run on a thread of the load generator with a runtime of its own, so their replies do not wait behind the storm'"'"'s handshakes inside the load generator (the CPUs are shared by every process, as in the unpinned rows). Direct: the fake backend'"'"'s plaintext and TLS ports. %s run(s) per target, interleaved, the median reported.\n' $STORM_N $STORM_S $CONC $REPS
    if [ "$STORM_RATE" -gt 0 ]; then
        printf 'setting\tLogin storm at an equal rate ("... at %s TLS logins/s"): the same storm, but its TLS logins start at most %s times a second in all, evenly spaced (each login loop takes the next free start slot; a loop that falls behind does not make up with a burst), still up to %s loops at once; the rate achieved is the row below it. One rate for every target (`--storm-rate`), below each one'"'"'s maximum here, so that the sessions'"'"' NOOPs are compared at equal work for the proxy and with the load generator'"'"'s own handshakes far from taking both CPUs. %s run(s) per target, interleaved, the median reported.\n' "$STORM_RATE" "$STORM_RATE" $CONC $REPS
    fi
    printf 'setting\tServer CPU per login: user and system time (`utime`, `stime` of /proc/PID/stat, in clock ticks of 1/%s s, summed over the server'"'"'s processes) from before to after the run, over the logins that succeeded; the total, then the same split into user space ("of which user space") and kernel ("of which kernel, system time": the system calls, and the TCP work the kernel does on the process'"'"'s behalf, including on loopback the receiving side of what it sends). The kernel counts a tick to whichever mode the process was in when the tick came, so the split is a sample: fine over a run of thousands of logins, not for one.\n' "$CLK"
    printf 'setting\tnginx: mail module (libnginx-mod-mail), `auth_http` to a `location` of the same nginx that returns `Auth-Status: OK`, `Auth-Server`, `Auth-Port` (no external auth service), `worker_processes auto`, `worker_connections 8192`, listen backlog 4096, other settings default (`proxy_buffer`, `ssl_session_tickets`, no TCP_NODELAY: the mail module has no such setting).\n'
    printf 'setting\tHAProxy: `mode tcp`, one frontend with a plaintext bind and an `ssl crt` bind, backlog 4096, maxconn %s, other settings default (16 KiB buffers, no splicing).\n' $HAPROXY_MAXCONN
    if [[ " ${TARGETS[*]} " == *" stalwart "* ]]; then
        if [ -n "${STALWART_BIN:-}" ]; then
            stal_what="the binary given in \`STALWART_BIN\` ($STALWART)"
        else
            stal_what="commit ${STALWART_COMMIT:0:12} (v1.0.0) built from its repository with \`cargo build --release --locked\`"
        fi
        if [ "$STYLE" = legacy ]; then
            stal_legacy=' (it does so whatever the backend advertises: the legacy-style fake backend accepts the initial response although it does not offer SASL-IR)'
        else
            stal_legacy=''
        fi
        printf 'setting\tStalwart proxy: Stalwart'"'"'s migration proxy (github.com/stalwartlabs/proxy, AGPL-3.0; %s, run unmodified; tokio, rustls with aws-lc-rs), `proxy stalwart.toml` with a generated file: `[server] threads = 0` (one tokio worker per CPU), `log_level = "warn"` (no per-session line), `shutdown_grace = "1s"`; one destination `fake` (the fake backend'"'"'s plaintext port, `tls = "plain"`, `allow_plaintext_auth = true`, `proxy_protocol = false`, `forwarding = "none"`) as `routing.default_destination`; `mapping.source = "file"` with an empty mappings file (every account goes to the default destination); a plaintext IMAP listener (`capabilities.imap.allow_plain_auth_without_tls = true`) and an implicit-TLS one with the run'"'"'s certificate, `max_connections = 100000` each (default 8192 per listener; it has no per-address limit); other settings default (TLS 1.2 minimum, `preauth_timeout` 30 s, `bridge_idle` 30 min, one backend connect retry, a circuit breaker after 5 consecutive backend failures). It answers the greeting, `CAPABILITY` and `LOGIN` itself, then connects to the backend, reads its greeting, logs in with `AUTHENTICATE PLAIN` and an initial response%s, relays the backend'"'"'s tagged OK and bridges the session.\n' "$stal_what" "$stal_legacy"
    else
        printf 'setting\tStalwart proxy: n/a: %s.\n' "${STALWART_NA:-not measured in this run}"
    fi
    printf 'setting\tcutover: `cutover run --config` with a generated file: a plaintext listener (`allow_plaintext_auth: true`) and an implicit-TLS one, one pool `fake` with the fake backend, `health: { interval: 0s }`, `limits.max_connections(_per_ip): 100000` (every connection comes from 127.0.0.1; the default of 200 per address would refuse the load), one route, the Prometheus endpoint on, `workers` left at one per CPU (each with its own SO_REUSEPORT socket per listener); `CUTOVER_LOG=warn` (no per-session line, as the nginx mail module writes none at its default error_log level).\n'
    if [ "$SCALE" = 1 ]; then
        # Thousands separators, display names.
        thousands() { sed -e ':a' -e 's/\([0-9]\)\([0-9]\{3\}\)\($\|[^0-9]\)/\1,\2\3/' -e 'ta'; }
        names() {
            local t out=""
            for t in "$@"; do
                case $t in haproxy) t=HAProxy ;; stalwart) t="Stalwart proxy" ;; esac
                out="$out${out:+, }$t"
            done
            echo "${out:-none}"
        }
        sizes=$(printf '%s, ' "${SCALE_N[@]}" | thousands); sizes=${sizes%, }
        printf 'scale_setting\tIdle sessions (%s): each size and kind from a freshly started proxy, configured as for the table above, warmed up with 10 login loops for 0.5 s, VmRSS read, then the sessions logged in and left in `IDLE` (set up 50 at a time), VmRSS read again 2 s later; KiB per session = (after - before) / sessions (1 KiB = 1024 bytes). Sizes asked: %s; measured: %s. Descriptors: %s per process (`ulimit -n`, raised to the hard limit `ulimit -Hn`); a proxy holds 2 per session (its client'"'"'s and its backend'"'"'s) besides its own, the load generator and the fake backend 1 per session each, so a size needs 2 x sessions + %s descriptors in the proxy to be measured.\n' \
            "$(names "${SCALE_IDLE[@]}")" "$(echo "$SCALE_SESSIONS" | sed 's/,/, /g' | thousands)" "${sizes:-none}" "$(echo "$NOFILE" | thousands)" "$SCALE_FD_SPARE"
        printf 'scale_setting\tLogin loops (%s): the login workload of the table (connect, [TLS 1.3 full handshake], greeting, `LOGIN`, tagged OK, `LOGOUT`, the server'"'"'s close) at %s concurrent loops, %s s per point, %s run(s) per point, interleaved across the targets, the median reported; p99 from connect to the tagged OK of `LOGIN`. Direct: the fake backend'"'"'s own ports. With 1 loop the rate is 1 / latency; beyond the knee more loops only queue (p99 grows, the rate does not). Every process shares the %s CPUs (the load generator'"'"'s TLS handshakes included).\n' \
            "$(names "${SCALE_LOGIN[@]}")" "$(echo "$SCALE_LOOPS" | sed 's/,/, /g' | thousands)" "$SCALE_LOGIN_S" "$SCALE_REPS" "$NPROC"
    fi
} >"$META"

# The sections written apart (scale, fleet, route lookups) are spliced in before the
# findings (which the report writer keeps across runs); a section of the earlier file
# that this run did not write (not measured this time, or written by hand, like the soak
# run) is kept where it was.
OLD_MD="$WORK/old.md"
if [ -f "$OUT" ]; then cp "$OUT" "$OLD_MD"; else : >"$OLD_MD"; fi
if [ "$MAIN" = 1 ]; then
    log "report"
    "$LOAD" report --results "$RESULTS" --meta "$META" --out "$OUT"
elif [ ! -s "$OUT" ]; then
    printf '# Benchmarks\n' >"$OUT"
fi
SCALE_MD="$WORK/scale.md"
if [ "$SCALE" = 1 ]; then
    log "scale section and plot ($SCALE_SVG)"
    mkdir -p "$(dirname "$SCALE_SVG")"
    if ! "$LOAD" scale-report --results "$RESULTS" --meta "$META" --out "$SCALE_MD" \
            --svg "$SCALE_SVG" --svg-link "$(realpath -m --relative-to="$(dirname "$OUT")" "$SCALE_SVG")" \
            --script "$WORK/scale.gp" 2>>"$WORK/scale-report.log"; then
        warn "cutover-load scale-report failed (see $WORK/scale-report.log)"
        printf '## Scale\n\nn/a: the scale report failed in this run.\n' >"$SCALE_MD"
    fi
fi
python3 - "$OUT" "$OLD_MD" "$SCALE_MD" "$FLEET_MD" "$LOOKUPS_MD" <<'PY'
import re, sys
out, old_path, generated = sys.argv[1], sys.argv[2], sys.argv[3:]
# The report writer's own sections; everything else between them and the findings is
# spliced here.
REPORT = {"Machine and versions", "Settings", "Results", "Targets"}

def split(text):
    """(sections before the findings as (heading or None, text), the findings to the end)"""
    at = re.search(r"(?m)^## Findings\b", text)
    head, findings = (text[:at.start()], text[at.start():]) if at else (text, "")
    parts = []
    for p in re.split(r"(?m)^(?=## )", head):
        if not p.strip():
            continue
        h = p.split("\n", 1)[0][3:].strip() if p.startswith("## ") else None
        parts.append((h, p.rstrip("\n") + "\n\n"))
    return parts, findings

new_parts, findings = split(open(out).read())
old_parts, _ = split(open(old_path).read())
gen = {}
for g in generated:
    try:
        t = open(g).read().strip()
    except OSError:
        continue
    if t.startswith("## "):
        gen[t.split("\n", 1)[0][3:].strip()] = t + "\n\n"
body = [t for h, t in new_parts if h is None or h in REPORT]
old_extra = [h for h, _ in old_parts if h is not None and h not in REPORT]
old_text = dict(old_parts)
extra = [gen[h] for h in gen if h not in old_extra]
extra += [gen.get(h, old_text[h]) for h in old_extra]
text = "".join(body + extra) + findings
open(out, "w").write(text.rstrip("\n") + "\n")
PY
FAILED=0
echo "raw results: $RESULTS (kept only with --keep)" >&2
