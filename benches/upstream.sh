# Sourced by the benchmark scripts (load.sh, workers.sh, instructions.sh): what they do the same
# way.
#
# random_token: 24 random bytes, base64url without padding (keys and secrets of a run).
# nginx_main NOFILE: the main context every nginx of a benchmark shares (one worker, foreground).
# nginx_http_common WORK: the http-context lines every nginx of a benchmark shares (its temp
#   paths under WORK/tmp, no access log, keep-alive connections that last the whole run).
# upstream_nginx_conf WORK PORT NOFILE: writes WORK/up/nginx.conf, the upstream of every leg:
#   nginx serving WORK/www (a small index.html, and whatever else the script put there) on
#   127.0.0.1:PORT.
# bench_work WORK UP_PORT NOFILE: fills WORK (made by the caller, private) for a run against the
#   upstream: www/index.html, the throwaway client secret (client-secret) and caller key
#   (bench-key), and the upstream nginx's config (upstream_nginx_conf).
# start NAME CPUS COMMAND...: runs COMMAND in the background (pinned with taskset to CPUS unless
#   CPUS is empty), output to WORK/NAME.log, its pid in LAST_PID and in PIDS, which
#   stop_processes stops (stop_all, the scripts' EXIT trap, then removes WORK).
# wait_ok URL SECONDS: waits for URL to answer 200, or stops the run (the script's die).
# tb_bench_config LISTEN_PORT ADMIN_PORT EMU_PORT UP_PORT KEY_HASH [LIMITS_LINE]: prints a
#   tokenbroker config with one listener, the admin listener, the emulator as identity service
#   (client "bench-admin", secret in the file client-secret beside the config), one caller
#   "bench" with KEY_HASH, one route "/" to the upstream, idle_timeout 300 s (and LIMITS_LINE),
#   logging at warn (benches/workers.sh and benches/instructions.sh; load.sh writes its own).

random_token() { head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '='; }

nginx_main() {
  cat <<EOF
worker_processes 1;
daemon off;
worker_rlimit_nofile $1;
events { worker_connections $(($1 - 100)); }
EOF
}

nginx_http_common() {
  cat <<EOF
  client_body_temp_path $1/tmp/body;
  proxy_temp_path $1/tmp/proxy;
  fastcgi_temp_path $1/tmp/fastcgi;
  uwsgi_temp_path $1/tmp/uwsgi;
  scgi_temp_path $1/tmp/scgi;
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
EOF
}

upstream_nginx_conf() {
  local work="$1" port="$2" nofile="$3"
  cat >"$work/up/nginx.conf" <<EOF
$(nginx_main "$nofile")
pid $work/up/nginx.pid;
http {
$(nginx_http_common "$work")
  sendfile on;
  tcp_nopush on;
  open_file_cache max=16 inactive=300s;
  open_file_cache_valid 300s;
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:$port backlog=4096;
    root $work/www;
  }
}
EOF
}

tb_bench_config() {
  cat <<EOF
[[listener]]
name = "bench"
address = "127.0.0.1:$1"

[admin]
address = "127.0.0.1:$2"

[identity]
base_url = "http://127.0.0.1:$3"
client_id = "bench-admin"
client_secret = { file = "client-secret" }

[tokens]
warm_up = true

[[caller]]
name = "bench"
key_hashes = ["$5"]

[[route]]
name = "upstream"
path_prefix = "/"
upstream = "http://127.0.0.1:$4"
allow = ["bench"]

[limits]
idle_timeout = "300s"
${6:-}

[logging]
level = "warn"
EOF
}

bench_work() {
  local work="$1"
  mkdir -p "$work/www" "$work/tmp" "$work/up"
  printf 'hello from the upstream\n' >"$work/www/index.html"
  chmod 755 "$work" "$work/www" "$work/tmp"
  chmod 644 "$work/www/index.html"
  random_token >"$work/client-secret"
  random_token >"$work/bench-key"
  upstream_nginx_conf "$work" "$2" "$3"
}

PIDS=()
start() {
  local name="$1" cpus="$2"
  shift 2
  if [[ -n $cpus ]]; then
    taskset -c "$cpus" "$@" >"$WORK/$name.log" 2>&1 &
  else
    "$@" >"$WORK/$name.log" 2>&1 &
  fi
  LAST_PID="$!"
  PIDS+=("$LAST_PID")
}
stop_processes() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
stop_all() {
  stop_processes
  rm -rf "$WORK"
}
wait_ok() {
  local i
  for i in $(seq 1 $(($2 * 10))); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
  die "$1 never answered 200"
}
