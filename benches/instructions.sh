#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind (callgrind), for one or more tokenbroker
# builds: a figure that does not move with the host's noise, for comparing builds when CPU time
# per request (benches/load.sh) varies more between rounds than between the builds. It counts
# what the code does, not what it costs: cache misses, syscalls' kernel time and waiting are not
# in it, so a change that moves instructions little but memory much needs load.sh too.
#
# Per build, in turn: `<build> run` under callgrind (its own listener, the same upstream nginx and
# emulator), WARM requests to warm the token and the pools, the counters zeroed, then REQUESTS
# requests (oha -n, CONNS connections, keep-alive), the counters dumped. Prints instructions per
# request (all of the process's threads, user space only, as callgrind counts).
#
# Usage: benches/instructions.sh NAME=BINARY [NAME=BINARY ...]
#   (default: tokenbroker=target/release/tokenbroker; needs nginx, oha, valgrind)
# Knobs: REQUESTS=3000 WARM=300 CONNS=4 BASE_PORT=19180; KEEP=1 keeps each build's callgrind dump
#   as target/callgrind-NAME.out (callgrind_annotate --inclusive=no target/callgrind-NAME.out).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=benches/upstream.sh
source "$ROOT/benches/upstream.sh"
REQUESTS="${REQUESTS:-3000}"
WARM="${WARM:-300}"
CONNS="${CONNS:-4}"
BASE_PORT="${BASE_PORT:-19180}"
UP_PORT=$((BASE_PORT + 1))
EMU_PORT=$((BASE_PORT + 2))
TB_PORT=$((BASE_PORT + 3))
ADMIN_PORT=$((BASE_PORT + 4))

die() { echo "instructions.sh: $*" >&2; exit 1; }
for tool in nginx oha valgrind callgrind_control curl; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
BUILDS=("$@")
((${#BUILDS[@]})) || BUILDS=("tokenbroker=$ROOT/target/release/tokenbroker")
for spec in "${BUILDS[@]}"; do
  [[ $spec == *=* && -x ${spec#*=} ]] || die "'$spec' is not NAME=BINARY with an executable"
done
FIRST="${BUILDS[0]#*=}"

WORK="$(mktemp -d /tmp/tokenbroker-instructions.XXXXXX)"
trap stop_all EXIT
umask 077
bench_work "$WORK" "$UP_PORT" 1024
hash="$(printf '%s' "$(cat "$WORK/bench-key")" | "$FIRST" hash-key)"
tb_bench_config "$TB_PORT" "$ADMIN_PORT" "$EMU_PORT" "$UP_PORT" "$hash" >"$WORK/tb.toml"

start upstream "" nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" -e "$WORK/up/error.log"
start emulator "" "$FIRST" emulate --listen "127.0.0.1:$EMU_PORT" \
  --client "bench-admin:$(cat "$WORK/client-secret")"
wait_ok "http://127.0.0.1:$UP_PORT/" 10

key_header="Proxy-Authorization: Bearer $(cat "$WORK/bench-key")"
echo "instructions per request: $REQUESTS requests over $CONNS keep-alive connections (oha), after $WARM to warm up; callgrind, all threads"
for spec in "${BUILDS[@]}"; do
  name="${spec%%=*}" bin="${spec#*=}"
  out="$WORK/callgrind-$name.out"
  start "tb-$name" "" valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$bin" run --config "$WORK/tb.toml"
  pid="$LAST_PID"
  wait_ok "http://127.0.0.1:$ADMIN_PORT/readyz" 120
  oha -n "$WARM" -c "$CONNS" --no-tui -H "$key_header" "http://127.0.0.1:$TB_PORT/" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  oha -n "$REQUESTS" -c "$CONNS" --no-tui --output-format json -H "$key_header" \
    "http://127.0.0.1:$TB_PORT/" >"$WORK/oha-$name.json"
  ok="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["statusCodeDistribution"].get("200", 0))' "$WORK/oha-$name.json")"
  [[ $ok == "$REQUESTS" ]] || die "$name: $ok of $REQUESTS requests answered 200"
  callgrind_control -d "$pid" >/dev/null 2>&1
  # The dump after the zeroing: its "totals:" line (instructions read, Ir).
  total="$(cat "$out".* 2>/dev/null | awk '/^totals:/{s += $2} END{print s + 0}')"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  awk -v n="$name" -v t="$total" -v r="$REQUESTS" 'BEGIN{printf "  %-14s %9.0f instructions per request (%d in all)\n", n, t / r, t}'
  if [[ -n ${KEEP:-} ]]; then cp "$out".* "$ROOT/target/callgrind-$name.out"; fi
  rm -f "$out" "$out".*
done
