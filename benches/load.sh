#!/usr/bin/env bash
# Load benchmark of tokenbroker, on loopback, in one run, against the same upstream:
#   1. direct to the upstream (the limit),
#   2. through tokenbroker (`tokenbroker run --config <generated>`, tokens from `tokenbroker emulate`),
#   3. through nginx configured to do the same job with a static Authorization header.
# Reports closed-loop requests/s (wrk), open-loop p50/p99 latency at about half of tokenbroker's
# maximum rate (oha -q R --latency-correction), tokenbroker's RSS (idle, after load, with 10,000
# idle keep-alive connections, while streaming 1 GiB) and the token-fetch amplification check
# (10,000 concurrent requests from 100 cold callers -> emulator creates and exchanges).
#
# Usage: benches/load.sh            (from anywhere; needs root or sudo for apt-get the first time)
# Knobs (environment): DURATION=10s CONNS=64 ROUNDS=3 PROXY_CPU=0 LOAD_CPU=1 BASE_PORT=18080
#   IDLE_CONNS=10000 AMP_REQUESTS=10000 AMP_SLOW_MS=1500 BIG_MIB=1024 OHA_VERSION=1.16.0
#   SKIP=idle,stream,amplify (any of them)
#   PERF=1: after the measured runs, count each proxy's syscalls per request and record a CPU
#     profile (perf; Debian package linux-perf) into target/bench-load/
#
# Pinning (2 cores): the proxy under test (tokenbroker or nginx, one worker each) runs on
# PROXY_CPU; the load generator, the upstream nginx and the emulator share LOAD_CPU. So the direct
# leg measures what one core of load generator + upstream can do, and the proxied legs get one
# whole core for the proxy. With more cores, give each its own (see BENCHMARKS.md).
#
# Everything it needs it installs (apt-get: nginx wrk curl python3; cargo install oha; cargo build
# --release), idempotently. It starts every process itself and stops them on exit. It never prints
# a key or a token: keys, the client secret and the static token live in a private temp folder that
# is removed on exit. (oha only takes headers on its command line, so the throwaway caller key of
# this run is visible in the local process list while oha runs.)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DURATION="${DURATION:-10s}"
CONNS="${CONNS:-64}"
ROUNDS="${ROUNDS:-3}"
PROXY_CPU="${PROXY_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"
BASE_PORT="${BASE_PORT:-18080}"
IDLE_CONNS="${IDLE_CONNS:-10000}"
AMP_REQUESTS="${AMP_REQUESTS:-10000}"
AMP_CALLERS=100
AMP_SLOW_MS="${AMP_SLOW_MS:-1500}"
BIG_MIB="${BIG_MIB:-1024}"
OHA_VERSION="${OHA_VERSION:-1.16.0}"
SKIP="${SKIP:-}"

UPSTREAM_PORT=$((BASE_PORT + 1))
NGINX_PROXY_PORT=$((BASE_PORT + 2))
TB_PORT=$((BASE_PORT + 3))
TB_ADMIN_PORT=$((BASE_PORT + 4))
EMU_PORT=$((BASE_PORT + 5))
ECHO_PORT=$((BASE_PORT + 6))
AMP_PORT=$((BASE_PORT + 7))

TB="$ROOT/target/release/tokenbroker"
EXAMPLES="$ROOT/target/release/examples"
RESULTS_DIR="$ROOT/target/bench-load"

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'load.sh: %s\n' "$*" >&2; exit 1; }
skipped() { [[ ",$SKIP," == *",$1,"* ]]; }

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
  log "cargo build --release (tokenbroker, examples idle_conns and amplify)"
  (cd "$ROOT" && cargo build --release --bin tokenbroker --example idle_conns --example amplify)
  "$TB" --help 2>/dev/null | grep -q 'emulate' \
    || die "this tokenbroker has no 'run'/'emulate' commands yet (CLI not merged)"
}

# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------
WORK=""
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [[ -n "$WORK" && -d "$WORK" ]] && rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CPU COMMAND...: runs COMMAND pinned to CPU in the background, output to
# WORK/NAME.log; its pid is left in LAST_PID.
LAST_PID=""
start() {
  local name="$1" cpu="$2"
  shift 2
  taskset -c "$cpu" "$@" >"$WORK/$name.log" 2>&1 &
  LAST_PID="$!"
  PIDS+=("$LAST_PID")
}
stop_last() {
  kill "$LAST_PID" 2>/dev/null || true
  wait "$LAST_PID" 2>/dev/null || true
}

wait_port() {
  local port="$1" i
  for i in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  die "nothing listens on port $port (see logs in $WORK)"
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
rss_kb() { sum_tree "$1" status '/^VmRSS/{print $2}'; }
per_conn() { awk -v b="$1" -v a="$2" -v n="$IDLE_CONNS" 'BEGIN{printf "%.2f", (a - b) / n}'; }
mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }

# ---------------------------------------------------------------------------------------------
# Configuration files
# ---------------------------------------------------------------------------------------------
random_token() { head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '='; }

write_files() {
  umask 077
  mkdir -p "$WORK/www" "$WORK/tmp" "$WORK/up" "$WORK/px"
  printf 'hello from the upstream\n' >"$WORK/www/index.html"
  truncate -s "${BIG_MIB}M" "$WORK/www/big.bin"
  chmod 755 "$WORK" "$WORK/www" "$WORK/tmp"
  chmod 644 "$WORK/www/index.html" "$WORK/www/big.bin"

  random_token >"$WORK/client-secret"
  random_token >"$WORK/bench-key"
  : >"$WORK/amp-keys"
  local i
  for i in $(seq 1 "$AMP_CALLERS"); do random_token >>"$WORK/amp-keys"; done

  local common_nginx="
worker_processes 1;
daemon off;
worker_rlimit_nofile $NOFILE;
events { worker_connections $((NOFILE - 100)); }
"
  local temp_paths="
  client_body_temp_path $WORK/tmp/body;
  proxy_temp_path $WORK/tmp/proxy;
  fastcgi_temp_path $WORK/tmp/fastcgi;
  uwsgi_temp_path $WORK/tmp/uwsgi;
  scgi_temp_path $WORK/tmp/scgi;
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
"
  # The upstream: a small static body (and the 1 GiB file) from nginx, keep-alive.
  cat >"$WORK/up/nginx.conf" <<EOF
$common_nginx
pid $WORK/up/nginx.pid;
http {
$temp_paths
  sendfile on;
  tcp_nopush on;
  open_file_cache max=16 inactive=300s;
  open_file_cache_valid 300s;
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:$UPSTREAM_PORT backlog=4096;
    root $WORK/www;
  }
}
EOF
  # nginx doing tokenbroker's job: drop the caller's credentials, inject a static token, add the
  # X-Forwarded-* and X-Request-Id headers, keep-alive to the upstream.
  cat >"$WORK/px/nginx.conf" <<EOF
$common_nginx
pid $WORK/px/nginx.pid;
http {
$temp_paths
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
  tb_config "$WORK/tokenbroker.toml" "$TB_PORT" "127.0.0.1:$TB_ADMIN_PORT" true \
    "http://127.0.0.1:$UPSTREAM_PORT" "$(printf '[[caller]]\nname = "bench"\nkey_hashes = ["%s"]\n' "$hash")" '"bench"'
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
cpu_ticks() { sum_tree "$1" stat '{print $14 + $15}'; }

# wrk_leg URL [PID]: closed loop (the caller key header on every leg, so all send the same
# request). Prints "req/s CPU-us-per-request core-busy-%" (the last two for the proxy PID, "-"
# without one).
wrk_leg() {
  local out before=0 after=0 t0 t1
  [[ -n "${2:-}" ]] && before="$(cpu_ticks "$2")"
  t0="$(date +%s.%N)"
  out="$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" -s "$WORK/key.lua" "$1")"
  t1="$(date +%s.%N)"
  [[ -n "${2:-}" ]] && after="$(cpu_ticks "$2")"
  printf '%s\n' "$out" >>"$WORK/wrk.log"
  if grep -q 'Non-2xx' <<<"$out"; then die "wrk saw non-2xx answers from $1: $(grep Non-2xx <<<"$out")"; fi
  local rps requests
  rps="$(awk '/^Requests\/sec/{print $2}' <<<"$out")"
  requests="$(awk '/requests in/{print $1}' <<<"$out")"
  if [[ -n "${2:-}" ]]; then
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

# oha_latency NAME URL RATE: open loop at RATE req/s with latency correction; prints "p50_us p99_us rps".
oha_latency() {
  taskset -c "$LOAD_CPU" oha -z "$DURATION" -c "$CONNS" -q "$3" --latency-correction --no-tui \
    --output-format json -H "Proxy-Authorization: Bearer $(cat "$WORK/bench-key")" "$2" \
    >"$WORK/oha-$1.json"
  python3 - "$WORK/oha-$1.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
codes = d.get("statusCodeDistribution", {})
bad = {k: v for k, v in codes.items() if k != "200"}
# Requests still in flight when -z ends are reported as aborted by the deadline: not failures.
errors = {k: v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k.lower()}
if bad or errors:
    sys.exit(f"oha saw non-200 answers or errors: {bad} {errors}")
p = d["latencyPercentiles"]
print(f'{p["p50"] * 1e6:.0f} {p["p99"] * 1e6:.0f} {d["summary"]["requestsPerSec"]:.0f}')
EOF
}

# lat_line NAME "P50S" "P99S": one line of the latency table.
lat_line() {
  local p50s p99s
  read -ra p50s <<<"$2"
  read -ra p99s <<<"$3"
  printf '  %-12s p50 %6s  p99 %6s   rounds: %s\n' "$1" "$(median "${p50s[@]}")" "$(median "${p99s[@]}")" \
    "$(paste -d/ <(printf '%s\n' "${p50s[@]}") <(printf '%s\n' "${p99s[@]}") | tr '\n' ' ')"
}

main() {
  install_tools
  local hard
  hard="$(ulimit -Hn)"
  NOFILE=$((hard > 65536 ? 65536 : hard))
  ulimit -n "$NOFILE"
  ((NOFILE > IDLE_CONNS + 500)) || die "ulimit -n is $NOFILE: too low for $IDLE_CONNS connections"

  WORK="$(mktemp -d /tmp/tokenbroker-load.XXXXXX)"
  mkdir -p "$RESULTS_DIR"
  write_files
  cat >"$WORK/key.lua" <<EOF
local f = assert(io.open("$WORK/bench-key"))
wrk.headers["Proxy-Authorization"] = "Bearer " .. f:read("*l")
f:close()
EOF

  log "starting upstream nginx and the emulator on CPU $LOAD_CPU, tokenbroker and nginx on CPU $PROXY_CPU"
  local px tb
  start upstream "$LOAD_CPU" nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" -e "$WORK/up/error.log"
  # The client secret is a throwaway made for this run (the emulator only takes it as an argument).
  start emulator "$LOAD_CPU" "$TB" emulate --listen "127.0.0.1:$EMU_PORT" \
    --client "bench-admin:$(cat "$WORK/client-secret")" --echo-upstream "127.0.0.1:$ECHO_PORT"
  wait_port "$UPSTREAM_PORT"
  wait_port "$EMU_PORT"
  start tokenbroker "$PROXY_CPU" "$TB" run --config "$WORK/tokenbroker.toml"
  tb="$LAST_PID"
  start nginx-proxy "$PROXY_CPU" nginx -p "$WORK/px" -c "$WORK/px/nginx.conf" -e "$WORK/px/error.log"
  px="$LAST_PID"
  wait_port "$TB_PORT"
  wait_port "$NGINX_PROXY_PORT"
  local i
  for i in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$TB_ADMIN_PORT/readyz" >/dev/null && break
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:$TB_ADMIN_PORT/readyz" >/dev/null || die "tokenbroker not ready"
  local rss_start
  rss_start="$(rss_kb "$tb")"

  local direct="http://127.0.0.1:$UPSTREAM_PORT/" via_tb="http://127.0.0.1:$TB_PORT/"
  local via_nginx="http://127.0.0.1:$NGINX_PROXY_PORT/"
  # One request each to check the path works end to end and open the keep-alive pools.
  for u in "$direct" "$via_tb" "$via_nginx"; do
    curl -fsS -o /dev/null -H @<(printf 'Proxy-Authorization: Bearer %s\n' "$(cat "$WORK/bench-key")") "$u" \
      || die "no 200 from $u (see $WORK/*.log)"
  done
  sleep 1
  local rss_idle
  rss_idle="$(rss_kb "$tb")"

  LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg)"
  if awk -v l="${LOADAVG%% *}" 'BEGIN{exit !(l > 0.5)}'; then
    echo "warning: load average $LOADAVG: other work on this machine will disturb the figures" >&2
  fi
  log "closed loop: wrk -t1 -c$CONNS -d$DURATION, $ROUNDS rounds, legs interleaved"
  local r line d_all=() t_all=() n_all=() t_cpu=() n_cpu=() t_busy=() n_busy=()
  for r in $(seq 1 "$ROUNDS"); do
    read -r rps _ _ <<<"$(wrk_leg "$direct")"
    d_all+=("$rps")
    read -r rps cpu busy <<<"$(wrk_leg "$via_tb" "$tb")"
    t_all+=("$rps") t_cpu+=("$cpu") t_busy+=("$busy")
    read -r rps cpu busy <<<"$(wrk_leg "$via_nginx" "$px")"
    n_all+=("$rps") n_cpu+=("$cpu") n_busy+=("$busy")
    echo "round $r: direct ${d_all[-1]}  tokenbroker ${t_all[-1]} (${t_cpu[-1]} us CPU/req, core ${t_busy[-1]}% busy)  nginx ${n_all[-1]} (${n_cpu[-1]} us CPU/req, core ${n_busy[-1]}% busy) req/s" >&2
  done
  local d_rps t_rps n_rps
  d_rps="$(median "${d_all[@]}")"
  t_rps="$(median "${t_all[@]}")"
  n_rps="$(median "${n_all[@]}")"
  local rss_after_load
  rss_after_load="$(rss_kb "$tb")"
  if [[ -n "${PERF:-}" ]]; then
    log "profiles (PERF=1)"
    profile_proxy tokenbroker "$via_tb" "$tb"
    profile_proxy nginx "$via_nginx" "$px"
  fi

  local rate
  rate="$(awk -v r="$t_rps" 'BEGIN{printf "%d", r / 2}')"
  log "open loop at $rate req/s: oha -z $DURATION -c $CONNS -q $rate --latency-correction, $ROUNDS rounds"
  local dp50=() dp99=() tp50=() tp99=() np50=() np99=() p50 p99 achieved
  for r in $(seq 1 "$ROUNDS"); do
    read -r p50 p99 achieved <<<"$(oha_latency "direct-$r" "$direct" "$rate")"
    dp50+=("$p50") dp99+=("$p99")
    read -r p50 p99 achieved <<<"$(oha_latency "tokenbroker-$r" "$via_tb" "$rate")"
    tp50+=("$p50") tp99+=("$p99")
    read -r p50 p99 achieved <<<"$(oha_latency "nginx-$r" "$via_nginx" "$rate")"
    np50+=("$p50") np99+=("$p99")
    echo "round $r: p50/p99 us: direct ${dp50[-1]}/${dp99[-1]}  tokenbroker ${tp50[-1]}/${tp99[-1]}  nginx ${np50[-1]}/${np99[-1]}" >&2
  done

  local stream_before="-" stream_peak="-" stream_after="-" stream_speed="-"
  if ! skipped stream; then
    log "streaming ${BIG_MIB} MiB through tokenbroker (curl -o /dev/null)"
    stream_before="$(rss_kb "$tb")"
    taskset -c "$LOAD_CPU" curl -fsS -o /dev/null -w '%{speed_download}\n' \
      -H @<(printf 'Proxy-Authorization: Bearer %s\n' "$(cat "$WORK/bench-key")") \
      "${via_tb}big.bin" >"$WORK/stream.out" &
    local curl_pid=$! peak="$stream_before" now
    while kill -0 "$curl_pid" 2>/dev/null; do
      now="$(rss_kb "$tb")"
      ((now > peak)) && peak="$now"
      sleep 0.05
    done
    wait "$curl_pid" || die "streaming through tokenbroker failed"
    stream_peak="$peak"
    stream_after="$(rss_kb "$tb")"
    stream_speed="$(awk '{printf "%.0f", $1 / 1048576}' "$WORK/stream.out")"
  fi

  local idle_tb="-" idle_nginx="-" idle_tb_est="-" idle_note="" idle_tb_per="-" idle_nginx_per="-"
  if ! skipped idle; then
    log "$IDLE_CONNS idle keep-alive connections (examples/idle_conns)"
    local target pid name before
    for name in tokenbroker nginx; do
      if [[ $name == tokenbroker ]]; then target="$TB_PORT" pid="$tb"; else target="$NGINX_PROXY_PORT" pid="$px"; fi
      before="$(rss_kb "$pid")"
      start "idle-$name" "$LOAD_CPU" "$EXAMPLES/idle_conns" --addr "127.0.0.1:$target" \
        --conns "$IDLE_CONNS" --key-file "$WORK/bench-key" --hold-secs 120
      for i in $(seq 1 1200); do
        grep -q '^ready' "$WORK/idle-$name.log" 2>/dev/null && break
        sleep 0.1
      done
      grep -q '^ready' "$WORK/idle-$name.log" || die "idle_conns did not get ready (see $WORK/idle-$name.log)"
      sleep 2
      local after est
      after="$(rss_kb "$pid")"
      est="$(ss -Htn state established "( sport = :$target )" | wc -l)"
      echo "$name: $(cat "$WORK/idle-$name.log" | head -1), $est established; RSS $(mib "$before") -> $(mib "$after") MiB" >&2
      if [[ $name == tokenbroker ]]; then
        idle_tb="$after" idle_tb_est="$est" idle_tb_per="$(per_conn "$before" "$after")"
      else
        idle_nginx="$after" idle_nginx_per="$(per_conn "$before" "$after")"
      fi
      idle_note+="$name: $(mib "$before") MiB before; "
      stop_last
      sleep 1
    done
  fi

  local amp_out="(skipped)"
  if ! skipped amplify; then
    log "amplification: $AMP_REQUESTS concurrent requests from $AMP_CALLERS cold callers"
    start tokenbroker-amplify "$PROXY_CPU" "$TB" run --config "$WORK/amplify.toml"
    wait_port "$AMP_PORT"
    amp_out="$(taskset -c "$LOAD_CPU" "$EXAMPLES/amplify" --proxy "127.0.0.1:$AMP_PORT" \
      --emulator "http://127.0.0.1:$EMU_PORT" --keys "$WORK/amp-keys" \
      --requests "$AMP_REQUESTS" --slow-ms "$AMP_SLOW_MS" 2>&1)" || true
  fi
  local rss_end
  rss_end="$(rss_kb "$tb")"

  # -------------------------------------------------------------------------------------------
  local summary="$RESULTS_DIR/summary-$(date -u +%Y%m%dT%H%M%SZ).txt"
  {
    echo "tokenbroker load benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ local changes)')"
    echo "machine: $(nproc) CPUs, $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo), $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo); load average before: $LOADAVG"
    echo "pinning: proxy under test on CPU $PROXY_CPU; wrk/oha, upstream nginx and emulator on CPU $LOAD_CPU"
    echo
    echo "closed loop (wrk -t1 -c$CONNS -d$DURATION, median of $ROUNDS interleaved rounds), req/s:"
    printf '  %-12s %10s   rounds: %s\n' direct "$d_rps" "${d_all[*]}"
    printf '  %-12s %10s   rounds: %s\n' tokenbroker "$t_rps" "${t_all[*]}"
    printf '  %-12s %10s   rounds: %s\n' nginx "$n_rps" "${n_all[*]}"
    awk -v t="$t_rps" -v n="$n_rps" -v d="$d_rps" 'BEGIN{printf "  tokenbroker/nginx = %.2f   tokenbroker/direct = %.2f   nginx/direct = %.2f\n", t/n, t/d, n/d}'
    echo "  proxy CPU per request (us), by round: tokenbroker ${t_cpu[*]}; nginx ${n_cpu[*]}"
    echo "  proxy core busy (%), by round:        tokenbroker ${t_busy[*]}; nginx ${n_busy[*]}"
    echo "  (a proxy whose core is not ~100% busy was held back by the load generator + upstream core)"
    echo
    echo "open loop at $rate req/s (oha -z $DURATION -c $CONNS -q $rate --latency-correction), microseconds,"
    echo "median of $ROUNDS interleaved rounds (each round's p50/p99 after the colon):"
    lat_line direct "${dp50[*]}" "${dp99[*]}"
    lat_line tokenbroker "${tp50[*]}" "${tp99[*]}"
    lat_line nginx "${np50[*]}" "${np99[*]}"
    local d50 d99 t50 t99 n50 n99
    d50="$(median "${dp50[@]}")" d99="$(median "${dp99[@]}")"
    t50="$(median "${tp50[@]}")" t99="$(median "${tp99[@]}")"
    n50="$(median "${np50[@]}")" n99="$(median "${np99[@]}")"
    echo "  added by tokenbroker: p50 +$((t50 - d50)) us, p99 +$((t99 - d99)) us; by nginx: p50 +$((n50 - d50)) us, p99 +$((n99 - d99)) us"
    echo
    echo "tokenbroker RSS (MiB): at start $(mib "$rss_start"), idle after first request $(mib "$rss_idle"), after the load runs $(mib "$rss_after_load"), at the end $(mib "$rss_end")"
    if [[ $idle_tb != "-" ]]; then
      echo "  with $IDLE_CONNS idle keep-alive connections: $(mib "$idle_tb") MiB ($idle_tb_est established); nginx proxy: $(mib "$idle_nginx") MiB ($idle_note)"
      echo "  per idle connection: tokenbroker $idle_tb_per KiB, nginx $idle_nginx_per KiB"
    fi
    if [[ $stream_peak != "-" ]]; then
      echo "  streaming $BIG_MIB MiB: before $(mib "$stream_before"), peak $(mib "$stream_peak"), after $(mib "$stream_after") (curl saw $stream_speed MiB/s)"
    fi
    echo
    echo "amplification ($AMP_REQUESTS requests, $AMP_CALLERS cold callers, identity calls slowed by ${AMP_SLOW_MS} ms):"
    printf '%s\n' "$amp_out" | sed 's/^/  /'
  } | tee "$summary"
  echo "(saved in $summary)" >&2
}

LOADAVG=""
CLK_TCK="$(getconf CLK_TCK)"
main "$@"
