#!/usr/bin/env bash
# Load benchmark of tokenbroker, on loopback, in one run, against the same upstream:
#   1. direct to the upstream (the limit),
#   2. through each tokenbroker build under test (`<build> run --config <generated>`, tokens from
#      `tokenbroker emulate`; one build by default, several with TB_BUILDS),
#   3. through nginx configured to do the same job with a static Authorization header.
# Every measured round runs the legs interleaved: direct, each build in order, nginx.
# Reports, per leg and round:
#   - closed loop (wrk): requests/s, proxy CPU microseconds per request, how busy the proxy's core was;
#   - open loop at 1/4 and at 1/2 of the FIRST build's closed-loop median rate (the same rates on
#     every leg; oha -q R --latency-correction, so latency counts from the intended send time):
#     p50, p99, p99.9 and the exact number of requests over 5 ms, computed from oha's per-request
#     records (--db-url, an SQLite file of every request);
#   - per build and for nginx: RSS before / with IDLE_CONNS idle keep-alive connections (KiB per
#     connection) / one minute after those connections closed;
#   - per build: RSS while streaming BIG_MIB MiB through it, and MiB/s;
#   - token-fetch amplification (first build only: 10,000 concurrent requests from 100 cold
#     callers -> emulator creates and exchanges);
# and ends with a `targets:` block, one line per target and build, each ending in `met` or `missed`.
#
# Usage: benches/load.sh            (from anywhere; needs root or sudo for apt-get the first time)
#   TB_BUILDS="new=target/release/tokenbroker base=/path/to/old/tokenbroker" benches/load.sh
# Knobs (environment): DURATION=10s CONNS=64 ROUNDS=3 PROXY_CPU=0 LOAD_CPU=1 BASE_PORT=18080
#   IDLE_CONNS=10000 IDLE_AFTER_SECS=60 IDLE_SETTLE_SECS=10 AMP_REQUESTS=10000 AMP_SLOW_MS=1500 BIG_MIB=1024
#   OHA_VERSION=1.16.0 SKIP=idle,stream,amplify (any of them)
#   BUSY_PROXY_CPU=1: the open loop also runs the last build and nginx with the proxy's CPU kept
#     from going idle (legs "<name>+busy", "nginx+busy": a SCHED_IDLE spinner beside the proxy),
#     which tells latency added by a virtual CPU waking from idle from latency the proxy adds
#   TB_BUILDS="name=path ...": the tokenbroker binaries to compare (names: letters, digits, . _ -;
#     not "direct" or "nginx"). Unset: one build "tokenbroker" = target/release/tokenbroker, built
#     by the script. Set: the script does not build tokenbroker; the first build also runs the
#     emulator, hashes the caller key and runs the amplification check.
#   BUILD_EXAMPLES=0: do not run `cargo build --release --example idle_conns --example amplify`
#     (the binaries must already be in target/release/examples).
#   KEEP_LOGS=1: copy the processes' logs (not the keys) and oha's record of every open-loop
#     request (oha-<load>-<leg>-<round>.sqlite: start, end, latency of each; no headers) to
#     target/bench-load/logs-<time>/ on exit (benches/stalls.py reads them).
#   FLOOR=1: one more leg, "floor": examples/h1_floor, the least a tokio HTTP/1 proxy can do for
#     this request without hyper (nginx's job here and nothing else; see the example's docs), run
#     like nginx. It shows how much of a build's CPU per request is the HTTP library's.
#   PERF=1: after the measured runs, count each proxy's syscalls per request and record a CPU
#     profile (perf; Debian package linux-perf) into target/bench-load/
#
# Ports: BASE_PORT+1 upstream, +2 nginx proxy, +3/+4 first build (listener/admin), +5 emulator,
# +6 echo upstream, +7 amplification proxy, +8 floor, +10/+11, +12/+13, ... the other builds.
#
# Pinning (2 cores): the proxies under test (each build and nginx, one worker each, only one of
# them loaded at a time) run on PROXY_CPU; the load generator, the upstream nginx and the emulator
# share LOAD_CPU. So the direct leg measures what one core of load generator + upstream can do, and
# the proxied legs get one whole core for the proxy. With more cores, give each its own (see
# BENCHMARKS.md). Pinned to one CPU, a build with worker threads runs one runtime (one usable
# CPU); benches/workers.sh compares `[limits] workers` settings on several CPUs.
#
# Everything it needs it installs (apt-get: nginx wrk curl python3; cargo install oha; cargo build
# --release), idempotently. It starts every process itself and stops them on exit; a failure in any
# leg (a non-200 answer, a socket error, a proxy that exited) stops the run with a message. It never
# prints a key or a token: keys, the client secret and the static token live in a private temp
# folder that is removed on exit. (oha only takes headers on its command line, so the throwaway
# caller key of this run is visible in the local process list while oha runs.)
set -euo pipefail
# Any other command that fails stops the run too, saying which (the command's text, not its
# expanded arguments).
set -E
trap 'printf "load.sh: stopped: line %s failed: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=benches/upstream.sh
source "$ROOT/benches/upstream.sh"
DURATION="${DURATION:-10s}"
CONNS="${CONNS:-64}"
ROUNDS="${ROUNDS:-3}"
PROXY_CPU="${PROXY_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"
BASE_PORT="${BASE_PORT:-18080}"
IDLE_CONNS="${IDLE_CONNS:-10000}"
IDLE_AFTER_SECS="${IDLE_AFTER_SECS:-60}"
IDLE_SETTLE_SECS="${IDLE_SETTLE_SECS:-10}"
AMP_REQUESTS="${AMP_REQUESTS:-10000}"
AMP_CALLERS=100
AMP_SLOW_MS="${AMP_SLOW_MS:-1500}"
BIG_MIB="${BIG_MIB:-1024}"
OHA_VERSION="${OHA_VERSION:-1.16.0}"
SKIP="${SKIP:-}"
TB_BUILDS="${TB_BUILDS:-}"
BUILD_EXAMPLES="${BUILD_EXAMPLES:-1}"
KEEP_LOGS="${KEEP_LOGS:-}"
FLOOR="${FLOOR:-}"
# Latency threshold of the "requests over 5 ms" count, in microseconds (strictly greater).
SLOW_US=5000

UPSTREAM_PORT=$((BASE_PORT + 1))
NGINX_PROXY_PORT=$((BASE_PORT + 2))
EMU_PORT=$((BASE_PORT + 5))
ECHO_PORT=$((BASE_PORT + 6))
AMP_PORT=$((BASE_PORT + 7))
FLOOR_PORT=$((BASE_PORT + 8))

EXAMPLES="$ROOT/target/release/examples"
RESULTS_DIR="$ROOT/target/bench-load"

# The builds under test: names, binaries, listener and admin ports (parse_builds fills them).
B_NAMES=()
B_PATHS=()
B_PORTS=()
B_ADMIN=()
B_PIDS=()
TB="" # the first build: runs the emulator, hashes the keys, the amplification check

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'load.sh: %s\n' "$*" >&2; exit 1; }
skipped() { [[ ",$SKIP," == *",$1,"* ]]; }

parse_builds() {
  local spec name path i=0
  if [[ -z $TB_BUILDS ]]; then
    TB_BUILDS="tokenbroker=$ROOT/target/release/tokenbroker"
    DEFAULT_BUILD=1
  fi
  for spec in $TB_BUILDS; do
    [[ $spec == *=* ]] || die "TB_BUILDS: '$spec' is not name=path"
    name="${spec%%=*}" path="${spec#*=}"
    [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || die "TB_BUILDS: build name '$name' (letters, digits, . _ - only)"
    [[ $name != direct && $name != nginx && $name != floor ]] || die "TB_BUILDS: '$name' is the name of another leg"
    local other
    for other in "${B_NAMES[@]}"; do [[ $other != "$name" ]] || die "TB_BUILDS: '$name' twice"; done
    [[ $path == /* ]] || path="$PWD/$path"
    B_NAMES+=("$name") B_PATHS+=("$path")
    if ((i == 0)); then
      B_PORTS+=($((BASE_PORT + 3))) B_ADMIN+=($((BASE_PORT + 4)))
    else
      B_PORTS+=($((BASE_PORT + 8 + 2 * i))) B_ADMIN+=($((BASE_PORT + 9 + 2 * i)))
    fi
    i=$((i + 1))
  done
  ((${#B_NAMES[@]})) || die "TB_BUILDS is empty"
  TB="${B_PATHS[0]}"
}
DEFAULT_BUILD=""

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

install_tools() {
  local missing=()
  command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
  command -v wrk >/dev/null || missing+=(wrk)
  command -v curl >/dev/null || missing+=(curl)
  command -v python3 >/dev/null || missing+=(python3)
  command -v taskset >/dev/null || missing+=(util-linux)
  if [[ -n "${PERF:-}" ]]; then command -v perf >/dev/null || missing+=(linux-perf); fi
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # The Debian package may start a system nginx on port 80; this script does not use it.
  export PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"
  if ! oha --version 2>/dev/null | grep -q "$OHA_VERSION"; then
    log "cargo install oha $OHA_VERSION"
    cargo install oha --locked --version "$OHA_VERSION"
  fi
  python3 -c 'import sqlite3' 2>/dev/null || die "python3 has no sqlite3 module (needed to read oha's records)"
  local examples=(--example idle_conns --example amplify)
  [[ -n $FLOOR ]] && examples+=(--example h1_floor)
  if [[ -n $DEFAULT_BUILD ]]; then
    log "cargo build --release (tokenbroker, examples ${examples[*]})"
    (cd "$ROOT" && cargo build --release --bin tokenbroker "${examples[@]}")
  elif [[ $BUILD_EXAMPLES != 0 ]]; then
    log "cargo build --release (examples ${examples[*]}; the builds under test are not rebuilt)"
    (cd "$ROOT" && cargo build --release "${examples[@]}")
  fi
  [[ -x $EXAMPLES/idle_conns && -x $EXAMPLES/amplify ]] || die "no $EXAMPLES/idle_conns or amplify"
  [[ -z $FLOOR || -x $EXAMPLES/h1_floor ]] || die "no $EXAMPLES/h1_floor"
  local i
  for i in "${!B_NAMES[@]}"; do
    [[ -x ${B_PATHS[i]} ]] || die "build ${B_NAMES[i]}: ${B_PATHS[i]} is not an executable file"
    "${B_PATHS[i]}" --help 2>/dev/null | grep -q 'emulate' \
      || die "build ${B_NAMES[i]} (${B_PATHS[i]}) has no 'run'/'emulate' commands (CLI not merged)"
  done
}

# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------
WORK=""
cleanup() {
  stop_processes
  if [[ -n "$WORK" && -d "$WORK" ]]; then
    if [[ -n $KEEP_LOGS ]]; then
      local keep
      keep="$RESULTS_DIR/logs-$(date -u +%Y%m%dT%H%M%SZ)"
      mkdir -p "$keep"
      cp "$WORK"/*.log "$keep"/ 2>/dev/null || true
      cp "$WORK"/up/error.log "$keep"/upstream-error.log 2>/dev/null || true
      cp "$WORK"/px/error.log "$keep"/nginx-proxy-error.log 2>/dev/null || true
      cp "$WORK"/oha-*.sqlite "$keep"/ 2>/dev/null || true
      echo "(logs kept in $keep)" >&2
    fi
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# (start NAME CPU COMMAND...: benches/upstream.sh.)
LAST_PID=""
# The floor leg (FLOOR=1): examples/h1_floor on the proxies' CPU, its static token on stdin.
start_floor() {
  random_token >"$WORK/floor-token"
  taskset -c "$PROXY_CPU" "$EXAMPLES/h1_floor" "127.0.0.1:$FLOOR_PORT" "127.0.0.1:$UPSTREAM_PORT" \
    <"$WORK/floor-token" >"$WORK/floor.log" 2>&1 &
  FLOOR_PID="$!"
  PIDS+=("$FLOOR_PID")
}
stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

wait_port() {
  local port="$1" i
  for i in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  die "nothing listens on port $port (KEEP_LOGS=1 keeps the processes' logs)"
}

# alive NAME PID: stops the run if the process has exited.
alive() { kill -0 "$2" 2>/dev/null || die "$1 (pid $2) has exited (KEEP_LOGS=1 keeps its log)"; }
check_all_alive() {
  local i
  alive "upstream nginx" "$UP_PID"
  alive emulator "$EMU_PID"
  alive "nginx proxy" "$PX_PID"
  for i in "${!B_NAMES[@]}"; do alive "build ${B_NAMES[i]}" "${B_PIDS[i]}"; done
  [[ -z $FLOOR ]] || alive "floor (examples/h1_floor)" "$FLOOR_PID"
}

# sum_tree PID FILE AWK: the sum, over a process and its children (nginx: master + worker), of
# what the awk program prints from /proc/<pid>/FILE.
sum_tree() {
  local pid="$1" total=0 p
  for p in "$pid" $(pgrep -P "$pid" || true); do
    total=$((total + $(awk "$3" "/proc/$p/$2" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
# RSS in KiB of a process and its children.
# shellcheck disable=SC2016 # an awk program
rss_kb() { sum_tree "$1" status '/^VmRSS/{print $2}'; }
per_conn() { awk -v b="$1" -v a="$2" -v n="$IDLE_CONNS" 'BEGIN{printf "%.2f", (a - b) / n}'; }
mib() { [[ $1 == - ]] && { echo -; return; }; awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }
# ---------------------------------------------------------------------------------------------
# Configuration files
# ---------------------------------------------------------------------------------------------

write_files() {
  umask 077
  # The upstream: a small static body (and the 1 GiB file) from nginx, keep-alive; the client
  # secret and the caller key.
  bench_work "$WORK" "$UPSTREAM_PORT" "$NOFILE"
  mkdir -p "$WORK/px"
  truncate -s "${BIG_MIB}M" "$WORK/www/big.bin"
  chmod 644 "$WORK/www/big.bin"
  : >"$WORK/amp-keys"
  local i
  for i in $(seq 1 "$AMP_CALLERS"); do random_token >>"$WORK/amp-keys"; done

  # nginx doing tokenbroker's job: drop the caller's credentials, inject a static token, add the
  # X-Forwarded-* and X-Request-Id headers, keep-alive to the upstream.
  cat >"$WORK/px/nginx.conf" <<EOF
$(nginx_main "$NOFILE")
pid $WORK/px/nginx.pid;
http {
$(nginx_http_common "$WORK")
  upstream backend {
    server 127.0.0.1:$UPSTREAM_PORT;
    keepalive 256;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$NGINX_PROXY_PORT backlog=4096;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Proxy-Authorization "";
      proxy_set_header Authorization "Bearer $(random_token)";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
      proxy_set_header X-Request-Id \$request_id;
    }
  }
}
EOF

  local hash
  hash="$("$TB" hash-key <"$WORK/bench-key")"
  # One config per build: its own listener and admin port, the same caller key, upstream and
  # emulator.
  local b
  for b in "${!B_NAMES[@]}"; do
    tb_config "$WORK/tb-${B_NAMES[b]}.toml" "${B_PORTS[b]}" "127.0.0.1:${B_ADMIN[b]}" true \
      "http://127.0.0.1:$UPSTREAM_PORT" "$(printf '[[caller]]\nname = "bench"\nkey_hashes = ["%s"]\n' "$hash")" '"bench"'
  done
  local callers="" allow="" n=0 key
  while read -r key; do
    n=$((n + 1))
    hash="$(printf '%s' "$key" | "$TB" hash-key)"
    callers+="$(printf '[[caller]]\nname = "amp-%03d"\nkey_hashes = ["%s"]\n\n' "$n" "$hash")"$'\n'
    allow+="\"amp-$(printf '%03d' "$n")\", "
  done <"$WORK/amp-keys"
  tb_config "$WORK/amplify.toml" "$AMP_PORT" "" false \
    "http://127.0.0.1:$ECHO_PORT" "$callers" "${allow%, }"
}

# tb_config FILE PORT ADMIN_ADDR WARM_UP UPSTREAM CALLERS ALLOW
tb_config() {
  local admin=""
  [[ -n "$3" ]] && admin="$(printf '[admin]\naddress = "%s"\n' "$3")"
  cat >"$1" <<EOF
# Generated by benches/load.sh.
[[listener]]
name = "bench"
address = "127.0.0.1:$2"

$admin

[identity]
base_url = "http://127.0.0.1:$EMU_PORT"
tenant = "CUSTOMER"
client_id = "bench-admin"
client_secret = { file = "client-secret" }

[tokens]
warm_up = $4
display_name_prefix = "tb-bench"
$(if [[ $4 == false ]]; then
  # The amplification run holds every identity call for AMP_SLOW_MS and the broker makes 16 at
  # a time, so the last of 100 cold callers gets its token after about 100 x 2 x 1.5 s / 16 =
  # 19 s: requests wait for it rather than getting 503 at the default 5 s budget.
  echo 'max_wait = "120s"'
fi)

$6

[[route]]
name = "upstream"
path_prefix = "/"
upstream = "$5"
allow = [$7]

[limits]
max_connections = $((NOFILE - 200))
idle_timeout = "300s"

[logging]
# No per-request log line, as nginx runs with access_log off.
level = "warn"
EOF
}


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
# CPU time (clock ticks, user + system) used so far by a process and its children.
# shellcheck disable=SC2016 # an awk program
cpu_ticks() { sum_tree "$1" stat '{print $14 + $15}'; }

# wrk_leg NAME URL [PID]: closed loop (the caller key header on every leg, so all send the same
# request). Prints "req/s CPU-us-per-request core-busy-%" (the last two for the proxy PID, "-"
# without one). Fails on any non-2xx answer or socket error.
wrk_leg() {
  local out before=0 after=0 t0 t1
  [[ -n "${3:-}" ]] && before="$(cpu_ticks "$3")"
  t0="$(date +%s.%N)"
  out="$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" -s "$WORK/key.lua" "$2")" \
    || die "wrk failed on leg $1 ($2)"
  t1="$(date +%s.%N)"
  [[ -n "${3:-}" ]] && after="$(cpu_ticks "$3")"
  printf '# leg %s\n%s\n' "$1" "$out" >>"$WORK/wrk.log"
  if grep -q 'Non-2xx' <<<"$out"; then die "leg $1: wrk saw non-2xx answers from $2: $(grep Non-2xx <<<"$out")"; fi
  if grep -q 'Socket errors' <<<"$out"; then die "leg $1: wrk saw socket errors on $2: $(grep 'Socket errors' <<<"$out")"; fi
  local rps requests
  rps="$(awk '/^Requests\/sec/{print $2}' <<<"$out")"
  requests="$(awk '/requests in/{print $1}' <<<"$out")"
  [[ -n $rps && ${requests:-0} -gt 0 ]] || die "leg $1: wrk made no requests on $2"
  if [[ -n "${3:-}" ]]; then
    awk -v r="$rps" -v n="$requests" -v c=$((after - before)) -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" \
      'BEGIN{printf "%s %.1f %.0f\n", r, c / hz * 1e6 / n, 100 * c / hz / (t1 - t0)}'
  else
    echo "$rps - -"
  fi
}

# profile_proxy NAME URL PID (PERF=1, after the measured runs, whose figures it does not touch):
# syscalls per request (perf stat on the syscall tracepoints) and a CPU profile (perf record),
# each during a closed-loop wrk run, into target/bench-load/.
profile_proxy() {
  local name="$1" url="$2" pids
  # shellcheck disable=SC2046 # the children's pids, one word each
  pids="$(echo "$3" $(pgrep -P "$3" || true) | tr ' ' ',')"
  local events="raw_syscalls:sys_enter"
  local sc
  for sc in read readv recvfrom recvmsg write writev sendto sendmsg sendfile64 epoll_wait epoll_pwait \
    epoll_ctl futex sched_yield clock_gettime; do
    [[ -d /sys/kernel/tracing/events/syscalls/sys_enter_$sc ]] && events+=",syscalls:sys_enter_$sc"
  done
  perf stat -e "$events" -p "$pids" -o "$RESULTS_DIR/syscalls-$name.txt" -- \
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d5s -s "$WORK/key.lua" "$url" >"$WORK/profile-wrk-$name.txt"
  local requests
  requests="$(awk '/requests in/{print $1}' "$WORK/profile-wrk-$name.txt")"
  {
    echo "# $requests requests; per request:"
    awk -v n="$requests" '/sys_enter/{gsub(",", "", $1); printf "#   %-40s %6.2f\n", $2, $1 / n}' "$RESULTS_DIR/syscalls-$name.txt"
  } | tee -a "$RESULTS_DIR/syscalls-$name.txt" >&2
  perf record -q -F 999 --call-graph dwarf,16384 -p "$pids" -o "$RESULTS_DIR/perf-$name.data" -- \
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d4s -s "$WORK/key.lua" "$url" >/dev/null 2>&1
  echo "profile: perf report -i $RESULTS_DIR/perf-$name.data --no-children" >&2
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }

# oha_latency TAG URL RATE: open loop at RATE req/s with latency correction (latency counted from
# each request's intended send time). The figures come from oha's record of every request
# (--db-url, SQLite): prints "p50_us p99_us p99.9_us max_us count_over_5ms requests". Fails on any
# non-200 answer or error (requests still in flight when -z ends are aborted by the deadline:
# not failures, and not in the record).
oha_latency() {
  local db="$WORK/oha-$1.sqlite"
  rm -f "$db"
  taskset -c "$LOAD_CPU" oha -z "$DURATION" -c "$CONNS" -q "$3" --latency-correction --no-tui \
    --output-format json --db-url "$db" \
    -H "Proxy-Authorization: Bearer $(cat "$WORK/bench-key")" "$2" \
    >"$WORK/oha-$1.json" 2>"$WORK/oha-$1.err" \
    || die "oha failed on $1 ($2): $(tail -n 3 "$WORK/oha-$1.err")"
  python3 - "$WORK/oha-$1.json" "$db" "$SLOW_US" "$1" <<'PY'
import json, math, sqlite3, sys
d = json.load(open(sys.argv[1]))
slow_s = int(sys.argv[3]) / 1e6
tag = sys.argv[4]
codes = d.get("statusCodeDistribution", {})
bad = {k: v for k, v in codes.items() if k != "200"}
errors = {k: v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k.lower()}
if bad or errors:
    sys.exit(f"load.sh: {tag}: oha saw non-200 answers or errors: {bad} {errors}")
db = sqlite3.connect(sys.argv[2])
rows = db.execute("SELECT duration, status, start_latency_correction FROM oha").fetchall()
if not rows:
    sys.exit(f"load.sh: {tag}: oha recorded no request")
if any(r[1] != 200 for r in rows):
    sys.exit(f"load.sh: {tag}: oha recorded non-200 answers")
if any(r[2] is None for r in rows):
    sys.exit(f"load.sh: {tag}: oha recorded requests without latency correction")
if len(rows) != codes.get("200", 0):
    sys.exit(f"load.sh: {tag}: oha's record has {len(rows)} requests, its summary {codes.get('200', 0)}")
lat = sorted(r[0] for r in rows)
n = len(lat)
def pct(q):  # nearest rank
    return lat[max(0, math.ceil(q / 100 * n) - 1)] * 1e6
over = sum(1 for x in lat if x > slow_s)
print(f"{pct(50):.0f} {pct(99):.0f} {pct(99.9):.0f} {lat[-1] * 1e6:.0f} {over} {n}")
PY
}

# duration_secs 10s|2m|1h|10: DURATION in seconds (for the estimate).
duration_secs() {
  local v="$1"
  case "$v" in
    *ms) echo 1 ;;
    *s) echo "${v%s}" ;;
    *m) echo $((${v%m} * 60)) ;;
    *h) echo $((${v%h} * 3600)) ;;
    *) echo "$v" ;;
  esac
}

estimate() {
  local d legs b=${#B_NAMES[@]} total
  d="$(duration_secs "$DURATION")"
  legs=$((b + 2))
  total=$((ROUNDS * legs * (d + 1) + 2 * ROUNDS * legs * (d + 1) + 15))
  skipped idle || total=$((total + (b + 1) * (IDLE_CONNS / 1000 + 5) + IDLE_AFTER_SECS))
  skipped stream || total=$((total + b * (BIG_MIB / 300 + 2)))
  skipped amplify || total=$((total + 15))
  if [[ ${BUSY_PROXY_CPU:-0} == 1 ]]; then total=$((total + 4 * ROUNDS * (d + 1))); fi
  [[ -n "${PERF:-}" ]] && total=$((total + (b + 1) * 12))
  echo "$total"
}

# leg_url LEG / leg_pid LEG: the URL of a leg and the pid of its proxy ("" for direct).
leg_url() {
  local i
  case "${1%+busy}" in
    direct) echo "http://127.0.0.1:$UPSTREAM_PORT/" ;;
    nginx) echo "http://127.0.0.1:$NGINX_PROXY_PORT/" ;;
    floor) echo "http://127.0.0.1:$FLOOR_PORT/" ;;
    *) for i in "${!B_NAMES[@]}"; do [[ ${B_NAMES[i]} != "${1%+busy}" ]] || echo "http://127.0.0.1:${B_PORTS[i]}/"; done ;;
  esac
}
leg_pid() {
  local i
  case "${1%+busy}" in
    direct) echo "" ;;
    nginx) echo "$PX_PID" ;;
    floor) echo "$FLOOR_PID" ;;
    *) for i in "${!B_NAMES[@]}"; do [[ ${B_NAMES[i]} != "${1%+busy}" ]] || echo "${B_PIDS[i]}"; done ;;
  esac
}

# Results, keyed "leg/round" (closed loop) and "load/leg/round" (open loop, load = quarter|half).
declare -A RPS=() CPU=() BUSY=() P50=() P99=() P999=() PMAX=() OVER=() NREQ=()
# by_round ARRAY KEY_PREFIX: the values of rounds 1..ROUNDS, space separated.
by_round() {
  local -n arr="$1"
  local r out=()
  for r in $(seq 1 "$ROUNDS"); do out+=("${arr[$2/$r]}"); done
  echo "${out[*]}"
}
# med ARRAY KEY_PREFIX: the median over the rounds.
med() {
  local vals
  read -ra vals <<<"$(by_round "$1" "$2")"
  median "${vals[@]}"
}

declare -A RSS_START=() RSS_IDLE=() RSS_LOAD=() RSS_END=()
declare -A I_BEFORE=() I_WITH=() I_EST=() I_PER=() I_CLOSED=() I_AFTER=() I_AFTER_EST=() I_WAITED=()
declare -A S_BEFORE=() S_PEAK=() S_AFTER=() S_SPEED=()
UP_PID="" EMU_PID="" PX_PID="" FLOOR_PID=""
LEGS=()
OPEN_LEGS=()
BUSY_PID=""
# busy_cpu_on / busy_cpu_off (BUSY_PROXY_CPU=1): a spinning shell at SCHED_IDLE on PROXY_CPU,
# which yields to the proxy at once but keeps the (virtual) CPU from ever going idle, so that a
# wake-up never waits for an idle vCPU to be scheduled again by the host.
busy_cpu_on() {
  taskset -c "$PROXY_CPU" chrt -i 0 sh -c 'while :; do :; done' &
  BUSY_PID="$!"
  PIDS+=("$BUSY_PID")
}
busy_cpu_off() {
  [[ -n $BUSY_PID ]] && stop_pid "$BUSY_PID"
  BUSY_PID=""
}
RATE_quarter="" RATE_half=""

# idle_leg NAME PORT PID: RSS before and with IDLE_CONNS idle keep-alive connections, then closes
# them (kills idle_conns) and notes when.
idle_leg() {
  local name="$1" port="$2" pid="$3" i
  I_BEFORE[$name]="$(rss_kb "$pid")"
  start "idle-$name" "$LOAD_CPU" "$EXAMPLES/idle_conns" --addr "127.0.0.1:$port" \
    --conns "$IDLE_CONNS" --key-file "$WORK/bench-key" --hold-secs 300
  local idle_pid="$LAST_PID"
  for i in $(seq 1 1200); do
    grep -q '^ready' "$WORK/idle-$name.log" 2>/dev/null && break
    kill -0 "$idle_pid" 2>/dev/null || break
    sleep 0.1
  done
  grep -q '^ready' "$WORK/idle-$name.log" \
    || die "idle_conns to $name did not get ready: $(tail -n 2 "$WORK/idle-$name.log")"
  # Idle for IDLE_SETTLE_SECS before the reading: tokenbroker parks an HTTP/1 connection (frees
  # hyper's buffers) after 1 to 2 s without I/O, and jemalloc returns the freed pages over the
  # next 5 s (its dirty_decay_ms); nginx frees its buffers at once.
  sleep "$IDLE_SETTLE_SECS"
  alive "$name" "$pid"
  I_WITH[$name]="$(rss_kb "$pid")"
  I_EST[$name]="$(ss -Htn state established "( sport = :$port )" | wc -l)"
  I_PER[$name]="$(per_conn "${I_BEFORE[$name]}" "${I_WITH[$name]}")"
  echo "$name: $(head -1 "$WORK/idle-$name.log"), ${I_EST[$name]} established; RSS $(mib "${I_BEFORE[$name]}") -> $(mib "${I_WITH[$name]}") MiB (${I_PER[$name]} KiB per connection)" >&2
  stop_pid "$idle_pid"
  I_CLOSED[$name]="$(date +%s.%N)"
}

# idle_after NAME PORT PID: waits until IDLE_AFTER_SECS have passed since NAME's connections
# closed, then reads its RSS.
idle_after() {
  local name="$1" port="$2" pid="$3" left
  left="$(awk -v c="${I_CLOSED[$name]}" -v n="$(date +%s.%N)" -v w="$IDLE_AFTER_SECS" 'BEGIN{l = c + w - n; printf "%.2f", (l > 0 ? l : 0)}')"
  sleep "$left"
  alive "$name" "$pid"
  I_AFTER[$name]="$(rss_kb "$pid")"
  I_WAITED[$name]="$(awk -v c="${I_CLOSED[$name]}" -v n="$(date +%s.%N)" 'BEGIN{printf "%.1f", n - c}')"
  I_AFTER_EST[$name]="$(ss -Htn state established "( sport = :$port )" | wc -l)"
  echo "$name: ${I_WAITED[$name]} s after its connections closed: RSS $(mib "${I_AFTER[$name]}") MiB (${I_AFTER_EST[$name]} established)" >&2
}

# stream_leg NAME PORT PID: streams BIG_MIB MiB through a build, sampling its RSS every 50 ms.
stream_leg() {
  local name="$1" port="$2" pid="$3"
  S_BEFORE[$name]="$(rss_kb "$pid")"
  taskset -c "$LOAD_CPU" curl -fsS -o /dev/null -w '%{speed_download}\n' \
    -H @<(printf 'Proxy-Authorization: Bearer %s\n' "$(cat "$WORK/bench-key")") \
    "http://127.0.0.1:$port/big.bin" >"$WORK/stream-$name.out" &
  local curl_pid=$! peak="${S_BEFORE[$name]}" now
  while kill -0 "$curl_pid" 2>/dev/null; do
    now="$(rss_kb "$pid")"
    ((now > peak)) && peak="$now"
    sleep 0.05
  done
  wait "$curl_pid" || die "streaming $BIG_MIB MiB through $name failed"
  S_PEAK[$name]="$peak"
  S_AFTER[$name]="$(rss_kb "$pid")"
  S_SPEED[$name]="$(awk '{printf "%.0f", $1 / 1048576}' "$WORK/stream-$name.out")"
  echo "$name: RSS before $(mib "${S_BEFORE[$name]}"), peak $(mib "$peak"), after $(mib "${S_AFTER[$name]}") MiB; ${S_SPEED[$name]} MiB/s" >&2
}

# verdict COND: "met" if the awk condition is true, else "missed".
verdict() { if awk "BEGIN{exit !($1)}"; then echo met; else echo missed; fi; }

main() {
  parse_builds
  LEGS=(direct "${B_NAMES[@]}" nginx)
  [[ -n $FLOOR ]] && LEGS+=(floor)
  OPEN_LEGS=("${LEGS[@]}")
  if [[ ${BUSY_PROXY_CPU:-0} == 1 ]]; then OPEN_LEGS+=("${B_NAMES[-1]}+busy" nginx+busy); fi
  local est
  est="$(estimate)"
  echo "load.sh: legs ${LEGS[*]}; estimated duration about $((est / 60)) min $((est % 60)) s (without installing/building)" >&2
  install_tools
  local hard
  hard="$(ulimit -Hn)"
  NOFILE=$((hard > 65536 ? 65536 : hard))
  ulimit -n "$NOFILE"
  ((NOFILE > IDLE_CONNS + 500)) || die "ulimit -n is $NOFILE: too low for $IDLE_CONNS connections"

  WORK="$(mktemp -d /tmp/tokenbroker-load.XXXXXX)"
  mkdir -p "$RESULTS_DIR"
  write_files
  cat >"$WORK/key.lua" <<LUA
local f = assert(io.open("$WORK/bench-key"))
wrk.headers["Proxy-Authorization"] = "Bearer " .. f:read("*l")
f:close()
LUA

  log "starting upstream nginx and the emulator on CPU $LOAD_CPU, ${B_NAMES[*]} and nginx on CPU $PROXY_CPU"
  start upstream "$LOAD_CPU" nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" -e "$WORK/up/error.log"
  UP_PID="$LAST_PID"
  # The client secret is a throwaway made for this run (the emulator only takes it as an argument).
  start emulator "$LOAD_CPU" "$TB" emulate --listen "127.0.0.1:$EMU_PORT" \
    --client "bench-admin:$(cat "$WORK/client-secret")" --echo-upstream "127.0.0.1:$ECHO_PORT"
  EMU_PID="$LAST_PID"
  wait_port "$UPSTREAM_PORT"
  wait_port "$EMU_PORT"
  local b i
  for b in "${!B_NAMES[@]}"; do
    start "tb-${B_NAMES[b]}" "$PROXY_CPU" "${B_PATHS[b]}" run --config "$WORK/tb-${B_NAMES[b]}.toml"
    B_PIDS+=("$LAST_PID")
  done
  start nginx-proxy "$PROXY_CPU" nginx -p "$WORK/px" -c "$WORK/px/nginx.conf" -e "$WORK/px/error.log"
  PX_PID="$LAST_PID"
  wait_port "$NGINX_PROXY_PORT"
  if [[ -n $FLOOR ]]; then
    start_floor
    wait_port "$FLOOR_PORT"
  fi
  for b in "${!B_NAMES[@]}"; do
    wait_port "${B_PORTS[b]}"
    for i in $(seq 1 100); do
      curl -fs "http://127.0.0.1:${B_ADMIN[b]}/readyz" >/dev/null && break
      sleep 0.1
    done
    curl -fs "http://127.0.0.1:${B_ADMIN[b]}/readyz" >/dev/null || die "build ${B_NAMES[b]} not ready"
    RSS_START[${B_NAMES[b]}]="$(rss_kb "${B_PIDS[b]}")"
  done

  local leg u
  # One request each to check the path works end to end and open the keep-alive pools.
  for leg in "${LEGS[@]}"; do
    u="$(leg_url "$leg")"
    curl -fsS -o /dev/null -H @<(printf 'Proxy-Authorization: Bearer %s\n' "$(cat "$WORK/bench-key")") "$u" \
      || die "leg $leg: no 200 from $u (KEEP_LOGS=1 keeps the processes' logs)"
  done
  sleep 1
  for b in "${!B_NAMES[@]}"; do RSS_IDLE[${B_NAMES[b]}]="$(rss_kb "${B_PIDS[b]}")"; done
  check_all_alive

  LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg)"
  if awk -v l="${LOADAVG%% *}" 'BEGIN{exit !(l > 0.5)}'; then
    echo "warning: load average $LOADAVG: other work on this machine will disturb the figures" >&2
  fi
  log "closed loop: wrk -t1 -c$CONNS -d$DURATION, $ROUNDS rounds, legs interleaved (${LEGS[*]})"
  local r out rps cpu busy line
  for r in $(seq 1 "$ROUNDS"); do
    line="round $r:"
    for leg in "${LEGS[@]}"; do
      out="$(wrk_leg "$leg" "$(leg_url "$leg")" "$(leg_pid "$leg")")" || die "closed loop, round $r, leg $leg failed"
      read -r rps cpu busy <<<"$out"
      # shellcheck disable=SC2034 # read through by_round's nameref
      RPS[$leg/$r]="$rps" CPU[$leg/$r]="$cpu" BUSY[$leg/$r]="$busy"
      check_all_alive
      if [[ $leg == direct ]]; then line+=" direct $rps"; else line+="  $leg $rps ($cpu us CPU/req, core $busy% busy)"; fi
    done
    echo "$line req/s" >&2
  done
  for b in "${!B_NAMES[@]}"; do RSS_LOAD[${B_NAMES[b]}]="$(rss_kb "${B_PIDS[b]}")"; done
  if [[ -n "${PERF:-}" ]]; then
    log "profiles (PERF=1)"
    for leg in "${B_NAMES[@]}" nginx ${FLOOR:+floor}; do profile_proxy "$leg" "$(leg_url "$leg")" "$(leg_pid "$leg")"; done
  fi

  local first_rps load rate p50 p99 p999 pmax over nreq
  first_rps="$(med RPS "${B_NAMES[0]}")"
  RATE_quarter="$(awk -v r="$first_rps" 'BEGIN{printf "%d", r / 4}')"
  RATE_half="$(awk -v r="$first_rps" 'BEGIN{printf "%d", r / 2}')"
  for load in quarter half; do
    if [[ $load == quarter ]]; then rate="$RATE_quarter"; else rate="$RATE_half"; fi
    ((rate > 0)) || die "open loop: rate $rate req/s"
    log "open loop, $load load: $rate req/s ($load of ${B_NAMES[0]}'s $first_rps), oha -z $DURATION -c $CONNS -q $rate --latency-correction, $ROUNDS rounds"
    for r in $(seq 1 "$ROUNDS"); do
      line="round $r, p50/p99/p99.9 us [requests over 5 ms]:"
      for leg in "${OPEN_LEGS[@]}"; do
        if [[ $leg == *+busy ]]; then busy_cpu_on; fi
        out="$(oha_latency "$load-$leg-$r" "$(leg_url "$leg")" "$rate")" || die "open loop ($load load), round $r, leg $leg failed"
        if [[ $leg == *+busy ]]; then busy_cpu_off; fi
        read -r p50 p99 p999 pmax over nreq <<<"$out"
        P50[$load/$leg/$r]="$p50" P99[$load/$leg/$r]="$p99" P999[$load/$leg/$r]="$p999"
        # shellcheck disable=SC2034 # read through by_round's nameref
        PMAX[$load/$leg/$r]="$pmax" OVER[$load/$leg/$r]="$over" NREQ[$load/$leg/$r]="$nreq"
        check_all_alive
        line+="  $leg $p50/$p99/$p999 [$over of $nreq]"
      done
      echo "$line" >&2
    done
  done

  if ! skipped stream; then
    log "streaming ${BIG_MIB} MiB through each build (curl -o /dev/null)"
    for b in "${!B_NAMES[@]}"; do stream_leg "${B_NAMES[b]}" "${B_PORTS[b]}" "${B_PIDS[b]}"; done
  fi

  if ! skipped idle; then
    log "$IDLE_CONNS idle keep-alive connections (examples/idle_conns), each build then nginx; RSS again $IDLE_AFTER_SECS s after each one's connections closed"
    for b in "${!B_NAMES[@]}"; do idle_leg "${B_NAMES[b]}" "${B_PORTS[b]}" "${B_PIDS[b]}"; sleep 1; done
    idle_leg nginx "$NGINX_PROXY_PORT" "$PX_PID"
    for b in "${!B_NAMES[@]}"; do idle_after "${B_NAMES[b]}" "${B_PORTS[b]}" "${B_PIDS[b]}"; done
    idle_after nginx "$NGINX_PROXY_PORT" "$PX_PID"
  fi

  local amp_out="(skipped)"
  if ! skipped amplify; then
    log "amplification (${B_NAMES[0]}): $AMP_REQUESTS concurrent requests from $AMP_CALLERS cold callers"
    start tokenbroker-amplify "$PROXY_CPU" "$TB" run --config "$WORK/amplify.toml"
    wait_port "$AMP_PORT"
    # Exit code 1 is the check's FAIL verdict (reported); anything else is a failure to run it.
    local amp_rc=0
    amp_out="$(taskset -c "$LOAD_CPU" "$EXAMPLES/amplify" --proxy "127.0.0.1:$AMP_PORT" \
      --emulator "http://127.0.0.1:$EMU_PORT" --keys "$WORK/amp-keys" \
      --requests "$AMP_REQUESTS" --slow-ms "$AMP_SLOW_MS" 2>&1)" || amp_rc=$?
    ((amp_rc <= 1)) || die "amplification check could not run (exit $amp_rc): $(tail -n 3 <<<"$amp_out")"
    stop_pid "$LAST_PID"
  fi
  check_all_alive
  for b in "${!B_NAMES[@]}"; do RSS_END[${B_NAMES[b]}]="$(rss_kb "${B_PIDS[b]}")"; done

  summary
}

# lat_line LOAD LEG: one line of an open-loop table: medians, then every round.
lat_line() {
  local load="$1" leg="$2" r rounds=""
  for r in $(seq 1 "$ROUNDS"); do
    rounds+=" ${P50[$load/$leg/$r]}/${P99[$load/$leg/$r]}/${P999[$load/$leg/$r]} [${OVER[$load/$leg/$r]} of ${NREQ[$load/$leg/$r]}]"
  done
  printf '  %-12s p50 %6s  p99 %6s  p99.9 %6s  max %7s  over 5 ms %s   rounds:%s\n' "$leg" \
    "$(med P50 "$load/$leg")" "$(med P99 "$load/$leg")" "$(med P999 "$load/$leg")" \
    "$(med PMAX "$load/$leg")" "$(by_round OVER "$load/$leg" | tr ' ' ',')" "$rounds"
}

summary() {
  local summary name b leg load
  summary="$RESULTS_DIR/summary-$(date -u +%Y%m%dT%H%M%SZ).txt"
  local d_rps n_rps n_cpu
  d_rps="$(med RPS direct)" n_rps="$(med RPS nginx)" n_cpu="$(med CPU nginx)"
  {
    echo "tokenbroker load benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ local changes)')"
    echo "machine: $(nproc) CPUs, $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo), $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo); load average before: $LOADAVG"
    echo "pinning: proxies under test on CPU $PROXY_CPU (one loaded at a time); wrk/oha, upstream nginx and emulator on CPU $LOAD_CPU"
    echo "builds (first = emulator, key hashing, open-loop rates, amplification):"
    for b in "${!B_NAMES[@]}"; do
      printf '  %-12s %s (sha256 %s)\n' "${B_NAMES[b]}" "${B_PATHS[b]}" "$(sha256sum "${B_PATHS[b]}" | cut -c1-12)"
    done
    echo
    echo "closed loop (wrk -t1 -c$CONNS -d$DURATION, $ROUNDS rounds, legs interleaved in each: ${LEGS[*]}), median and rounds:"
    for leg in "${LEGS[@]}"; do
      printf '  %-12s %10s req/s   rounds: %s\n' "$leg" "$(med RPS "$leg")" "$(by_round RPS "$leg")"
      if [[ $leg != direct ]]; then
        printf '  %-12s proxy CPU per request %s us (rounds: %s); core busy %s%% (rounds: %s)\n' "" \
          "$(med CPU "$leg")" "$(by_round CPU "$leg")" "$(med BUSY "$leg")" "$(by_round BUSY "$leg")"
      fi
    done
    for name in "${B_NAMES[@]}"; do
      awk -v b="$name" -v t="$(med RPS "$name")" -v n="$n_rps" -v d="$d_rps" -v c="$(med CPU "$name")" -v nc="$n_cpu" \
        'BEGIN{printf "  %s/nginx = %.2f   %s/direct = %.2f   CPU per request %s/nginx = %.2f\n", b, t/n, b, t/d, b, c/nc}'
    done
    awk -v n="$n_rps" -v d="$d_rps" 'BEGIN{printf "  nginx/direct = %.2f\n", n/d}'
    if [[ -n $FLOOR ]]; then
      for name in "${B_NAMES[@]}" nginx; do
        awk -v b="$name" -v c="$(med CPU "$name")" -v f="$(med CPU floor)" \
          'BEGIN{printf "  CPU per request %s/floor = %.2f (%s us over the floor)\n", b, c/f, c-f}'
      done
    fi
    echo "  (a proxy whose core is not ~100% busy was held back by the load generator + upstream core)"
    for load in quarter half; do
      local rate frac
      if [[ $load == quarter ]]; then rate="$RATE_quarter" frac="1/4"; else rate="$RATE_half" frac="1/2"; fi
      echo
      echo "open loop, $load load: $rate req/s ($frac of ${B_NAMES[0]}'s closed-loop median), oha -z $DURATION -c $CONNS -q $rate --latency-correction;"
      echo "microseconds from each request's intended send time, exact from oha's record of every request (--db-url);"
      echo "median of $ROUNDS interleaved rounds, then each round's p50/p99/p99.9 [requests over 5 ms of requests]:"
      for leg in "${OPEN_LEGS[@]}"; do lat_line "$load" "$leg"; done
      local d50 d99 added=""
      d50="$(med P50 "$load/direct")" d99="$(med P99 "$load/direct")"
      for leg in "${B_NAMES[@]}" nginx ${FLOOR:+floor}; do
        added+="  $leg p50 +$(($(med P50 "$load/$leg") - d50)), p99 +$(($(med P99 "$load/$leg") - d99));"
      done
      echo "  added over direct (medians, us):${added%;}"
    done
    echo
    echo "tokenbroker RSS (MiB), per build:"
    for name in "${B_NAMES[@]}"; do
      printf '  %-12s at start %s, idle after first request %s, after the load runs %s, at the end %s\n' "$name" \
        "$(mib "${RSS_START[$name]}")" "$(mib "${RSS_IDLE[$name]}")" "$(mib "${RSS_LOAD[$name]}")" "$(mib "${RSS_END[$name]}")"
    done
    if ! skipped idle; then
      echo
      echo "$IDLE_CONNS idle keep-alive connections (examples/idle_conns), RSS in MiB: before -> with them (established) = KiB per"
      echo "connection; then RSS after they closed (ratio to before), each leg read once its own $IDLE_AFTER_SECS s since its"
      echo "connections closed had passed (the legs one after the other, each waited for separately):"
      for name in "${B_NAMES[@]}" nginx; do
        printf '  %-12s %s -> %s (%s established) = %s KiB/conn; %s s after close: %s (x%s, %s still established)\n' "$name" \
          "$(mib "${I_BEFORE[$name]}")" "$(mib "${I_WITH[$name]}")" "${I_EST[$name]}" "${I_PER[$name]}" \
          "${I_WAITED[$name]}" "$(mib "${I_AFTER[$name]}")" \
          "$(awk -v a="${I_AFTER[$name]}" -v b="${I_BEFORE[$name]}" 'BEGIN{printf "%.2f", a/b}')" "${I_AFTER_EST[$name]}"
      done
    fi
    if ! skipped stream; then
      echo
      echo "streaming $BIG_MIB MiB (curl -o /dev/null, RSS sampled every 50 ms), MiB:"
      for name in "${B_NAMES[@]}"; do
        printf '  %-12s before %s, peak %s, after %s (peak - before %s); curl saw %s MiB/s\n' "$name" \
          "$(mib "${S_BEFORE[$name]}")" "$(mib "${S_PEAK[$name]}")" "$(mib "${S_AFTER[$name]}")" \
          "$(mib $((S_PEAK[$name] - S_BEFORE[$name])))" "${S_SPEED[$name]}"
      done
    fi
    echo
    echo "amplification (${B_NAMES[0]}; $AMP_REQUESTS requests, $AMP_CALLERS cold callers, identity calls slowed by ${AMP_SLOW_MS} ms):"
    printf '%s\n' "$amp_out" | sed 's/^/  /'
    echo
    echo "targets:"
    for name in "${B_NAMES[@]}"; do targets "$name"; done
  } | tee "$summary"
  echo "(saved in $summary)" >&2
}

# targets BUILD: one line per target, each ending in met or missed.
# slow_within LEG OTHER: each round's count of quarter-load requests over 5 ms of LEG against
# OTHER's, and whether LEG's was at most OTHER's in every round (met/missed).
slow_within() {
  local r line="" ok=1 a b
  for r in $(seq 1 "$ROUNDS"); do
    a="${OVER[quarter/$1/$r]}" b="${OVER[quarter/$2/$r]}"
    if ((a <= b)); then line+=" $a<=$b"; else line+=" $a>$b"; ok=0; fi
  done
  echo "$line: $(verdict "$ok")"
}

targets() {
  local name="$1" c nc ratio
  c="$(med CPU "$name")" nc="$(med CPU nginx)"
  ratio="$(awk -v c="$c" -v n="$nc" 'BEGIN{printf "%.2f", c/n}')"
  echo "  $name: proxy CPU per request <= nginx's (medians): $c vs $nc us, ratio $ratio: $(verdict "$c <= $nc")"
  echo "  $name: proxy CPU per request <= 0.8 x nginx's: $c vs $(awk -v n="$nc" 'BEGIN{printf "%.1f", 0.8*n}') us, ratio $ratio: $(verdict "$c <= 0.8 * $nc")"
  local d99 b99 n99
  d99="$(med P99 half/direct)" b99="$(med P99 "half/$name")" n99="$(med P99 half/nginx)"
  echo "  $name: added p99 at half load <= nginx's (medians, minus direct's $d99 us): +$((b99 - d99)) vs +$((n99 - d99)) us: $(verdict "$b99 - $d99 <= $n99 - $d99")"
  echo "  $name: at a quarter load no request over 5 ms that direct does not show (per round, $name <= direct):$(slow_within "$name" direct)"
  echo "  $name: at a quarter load no more requests over 5 ms than nginx (per round, $name <= nginx):$(slow_within "$name" nginx)"
  local rps nrps
  rps="$(med RPS "$name")" nrps="$(med RPS nginx)"
  echo "  $name: throughput on one core >= nginx's (closed loop, medians): $rps vs $nrps req/s: $(verdict "$rps >= $nrps")"
  if skipped idle; then
    echo "  $name: <= 4 KiB per idle keep-alive connection: not measured (SKIP=idle): missed"
    echo "  $name: RSS a minute after the $IDLE_CONNS connections close <= 1.25 x idle: not measured (SKIP=idle): missed"
  else
    echo "  $name: <= 4 KiB per idle keep-alive connection: ${I_PER[$name]} KiB: $(verdict "${I_PER[$name]} <= 4")"
    local a="${I_AFTER[$name]}" bf="${I_BEFORE[$name]}" short=""
    ((IDLE_AFTER_SECS >= 60)) || short=" (not a minute: IDLE_AFTER_SECS=$IDLE_AFTER_SECS)"
    echo "  $name: RSS ${I_WAITED[$name]} s after the $IDLE_CONNS connections close <= 1.25 x idle (RSS before they opened): $(mib "$a") vs $(mib "$bf") MiB, x$(awk -v a="$a" -v b="$bf" 'BEGIN{printf "%.2f", a/b}')$short: $(verdict "$a <= 1.25 * $bf && ${I_WAITED[$name]} >= 60")"
  fi
  if skipped stream; then
    echo "  $name: 1 GiB streamed with flat memory (peak - before <= 16 MiB): not measured (SKIP=stream): missed"
  else
    local grow=$((S_PEAK[$name] - S_BEFORE[$name])) what="1 GiB"
    ((BIG_MIB == 1024)) || what="$BIG_MIB MiB (not 1 GiB: BIG_MIB=$BIG_MIB)"
    echo "  $name: $what streamed with flat memory (peak - before <= 16 MiB): +$(mib "$grow") MiB: $(verdict "$grow <= 16384 && $BIG_MIB >= 1024")"
  fi
}

LOADAVG=""
NOFILE=""
CLK_TCK="$(getconf CLK_TCK)"
main "$@"
