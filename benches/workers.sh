#!/usr/bin/env bash
# Runtime per core against one multi-thread runtime, with the proxy on several CPUs
# (benches/load.sh pins the proxy to one CPU). One tokenbroker binary, two proxies that differ
# only in `[limits] workers`:
#   - "w1": workers = 1, one tokio runtime for everything (the multi-thread, work-stealing runtime
#     when more than one CPU is usable: what every build before the worker threads did);
#   - "wN": workers = N, N worker threads, each a current_thread runtime with its own
#     SO_REUSEPORT socket.
# Both run at once, pinned to PROXY_CPUS; only one is loaded at a time. Every round runs the two
# legs in turn (w1 first in odd rounds, wN first in even ones), each a closed loop of wrk
# (-t1 -c CONNS -d DURATION, pinned to LOAD_CPUS, as the upstream nginx and the emulator are).
# Reports per leg and round: requests/s; the proxy's CPU microseconds per request (utime + stime
# of all its threads, from /proc/<pid>/stat); its context switches per request (voluntary +
# involuntary, summed over /proc/<pid>/task/*/status); and how its CPU time was split between
# its threads (the busiest ones, by name: tb-worker-N are the workers).
#
# Usage: benches/workers.sh [BINARY]   (default target/release/tokenbroker; needs nginx, wrk)
# Knobs: PROXY_CPUS=0-1 LOAD_CPUS=0-1 WORKERS=2 ROUNDS=3 DURATION=10s CONNS=64 BASE_PORT=19080
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=benches/upstream.sh
source "$ROOT/benches/upstream.sh"
TB="${1:-$ROOT/target/release/tokenbroker}"
PROXY_CPUS="${PROXY_CPUS:-0-1}"
LOAD_CPUS="${LOAD_CPUS:-0-1}"
WORKERS="${WORKERS:-2}"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10s}"
CONNS="${CONNS:-64}"
BASE_PORT="${BASE_PORT:-19080}"
UP_PORT=$((BASE_PORT + 1))
EMU_PORT=$((BASE_PORT + 2))
CLK_TCK="$(getconf CLK_TCK)"

die() { echo "workers.sh: $*" >&2; exit 1; }
[[ -x $TB ]] || die "no binary at $TB (cargo build --release --bin tokenbroker)"
for tool in nginx wrk taskset; do command -v "$tool" >/dev/null || die "$tool is not installed"; done

WORK="$(mktemp -d /tmp/tokenbroker-workers.XXXXXX)"
trap stop_all EXIT
umask 077
bench_work "$WORK" "$UP_PORT" 4196
hash="$(printf '%s' "$(cat "$WORK/bench-key")" | "$TB" hash-key)"
legs=(w1 "w$WORKERS")
declare -A PORT ADMIN PID
for i in 0 1; do
  leg="${legs[i]}"
  PORT[$leg]=$((BASE_PORT + 10 + 2 * i))
  ADMIN[$leg]=$((BASE_PORT + 11 + 2 * i))
  tb_bench_config "${PORT[$leg]}" "${ADMIN[$leg]}" "$EMU_PORT" "$UP_PORT" "$hash" \
    "workers = ${leg#w}" >"$WORK/$leg.toml"
done
cat >"$WORK/key.lua" <<LUA
local f = assert(io.open("$WORK/bench-key"))
wrk.headers["Proxy-Authorization"] = "Bearer " .. f:read("*l")
f:close()
LUA

start upstream "$LOAD_CPUS" nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" -e "$WORK/up/error.log"
start emulator "$LOAD_CPUS" "$TB" emulate --listen "127.0.0.1:$EMU_PORT" \
  --client "bench-admin:$(cat "$WORK/client-secret")"
sleep 0.5
for leg in "${legs[@]}"; do
  start "$leg" "$PROXY_CPUS" "$TB" run --config "$WORK/$leg.toml"
  PID[$leg]="$LAST_PID"
done
for leg in "${legs[@]}"; do
  wait_ok "http://127.0.0.1:${ADMIN[$leg]}/readyz" 10
  # one request each: the path works end to end, and the pools are open
  curl -fsS -o /dev/null -H @<(printf 'Proxy-Authorization: Bearer %s\n' "$(cat "$WORK/bench-key")") \
    "http://127.0.0.1:${PORT[$leg]}/" || die "leg $leg: no 200"
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/{s += $2} END{print s}'; }
# thread_ticks PID: "tid name ticks" per thread
thread_ticks() {
  local t
  for t in /proc/"$1"/task/*; do
    [[ -r $t/stat ]] || continue
    printf '%s %s %s\n' "${t##*/}" "$(tr ' ' '_' <"$t/comm")" \
      "$(sed 's/.*) //' "$t/stat" | awk '{print $12 + $13}')"
  done
}

leg_run() { # leg_run LEG ROUND
  local leg="$1" pid="${PID[$1]}" t0 t1 c0 c1 s0 s1 out rps n split
  thread_ticks "$pid" >"$WORK/threads-before"
  c0="$(ticks "$pid")" s0="$(switches "$pid")" t0="$(date +%s.%N)"
  out="$(taskset -c "$LOAD_CPUS" wrk -t1 -c"$CONNS" -d"$DURATION" -s "$WORK/key.lua" \
    "http://127.0.0.1:${PORT[$leg]}/")" || die "wrk failed on $leg"
  t1="$(date +%s.%N)" c1="$(ticks "$pid")" s1="$(switches "$pid")"
  thread_ticks "$pid" >"$WORK/threads-after"
  if grep -qE 'Non-2xx|Socket errors' <<<"$out"; then die "$leg: $(grep -E 'Non-2xx|Socket errors' <<<"$out")"; fi
  rps="$(awk '/^Requests\/sec/{print $2}' <<<"$out")"
  n="$(awk '/requests in/{print $1}' <<<"$out")"
  # the threads that took at least 2 % of the leg's CPU time, busiest first: "name share%"
  split="$(join <(sort "$WORK/threads-before") <(sort "$WORK/threads-after") \
    | awk -v total=$((c1 - c0)) '{d = $5 - $3; if (total > 0 && d / total >= 0.02) printf "%s %.0f%%\n", $2, 100 * d / total}' \
    | sort -k2 -t' ' -rn | paste -sd, -)"
  awk -v leg="$leg" -v round="$2" -v r="$rps" -v n="$n" -v c=$((c1 - c0)) -v s=$((s1 - s0)) \
    -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" -v threads="$split" \
    'BEGIN{printf "%-4s round %d: %9.0f req/s  %5.1f us CPU/req  %4.0f%% of one CPU  %5.2f ctx switches/req  [%s]\n",
      leg, round, r, c / hz * 1e6 / n, 100 * c / hz / (t1 - t0), s / n, threads}'
}

echo "binary: $("$TB" --version)"
echo "proxies on CPUs $PROXY_CPUS; wrk -t1 -c$CONNS -d$DURATION, upstream nginx and emulator on CPUs $LOAD_CPUS"
# warm-up, not reported
for leg in "${legs[@]}"; do
  taskset -c "$LOAD_CPUS" wrk -t1 -c"$CONNS" -d3s -s "$WORK/key.lua" "http://127.0.0.1:${PORT[$leg]}/" >/dev/null
done
for round in $(seq 1 "$ROUNDS"); do
  order=("${legs[@]}")
  ((round % 2 == 0)) && order=("${legs[1]}" "${legs[0]}")
  for leg in "${order[@]}"; do
    leg_run "$leg" "$round"
    kill -0 "${PID[$leg]}" 2>/dev/null || die "$leg has exited"
  done
done
