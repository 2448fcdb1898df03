#!/usr/bin/env bash
# Lays out the root filesystem of the tokenbroker container image in OUT, from a built binary.
# The one file list of the image: the Dockerfile runs it on the release binary, and the image test
# (tests/image.rs) on the binary cargo built for the tests, so both images have the same layout.
#
#   deploy/image/rootfs.sh BINARY OUT
#
# OUT gets:
#   /usr/local/bin/tokenbroker          the binary, without its debug information (strip
#                                       --strip-debug: function names stay, for backtraces and
#                                       profiles)
#   the shared libraries `ldd` lists    at the paths ldd shows (glibc, libgcc_s, the loader)
#   /etc/ssl/certs/ca-certificates.crt  the CA bundle (system roots for the identity service and
#                                       upstreams; rustls-native-certs reads it)
#   /etc/passwd, /etc/group             the unprivileged user and group tokenbroker (65532)
#   /etc/tokenbroker/                   where the config (and its secrets) are mounted
#   /var/lib/tokenbroker/               the state-file folder, owned by 65532 (a volume in Kubernetes)
#   /tmp/                               mode 1777
# Run as root (files are owned by root, the state folder by 65532).
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 BINARY OUT" >&2
  exit 64
fi
binary=$1
out=$2
uid=65532
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

[[ -x "$binary" ]] || { echo "$0: $binary is not an executable file" >&2; exit 1; }
[[ -f "$ca_bundle" ]] || { echo "$0: no CA bundle at $ca_bundle (install ca-certificates)" >&2; exit 1; }
command -v ldd >/dev/null || { echo "$0: ldd is required" >&2; exit 1; }
command -v strip >/dev/null || { echo "$0: strip is required (binutils)" >&2; exit 1; }

mkdir -p "$out"/usr/local/bin "$out"/etc/ssl/certs "$out"/etc/tokenbroker "$out"/var/lib/tokenbroker "$out"/tmp
install -m 0755 "$binary" "$out"/usr/local/bin/tokenbroker
strip --strip-debug "$out"/usr/local/bin/tokenbroker

# Every library ldd resolves ("name => /path (addr)") and the loader ("/path (addr)").
libs=$(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
[[ -n "$libs" ]] || { echo "$0: ldd found no shared library for $binary" >&2; exit 1; }
for lib in $libs; do
  mkdir -p "$out$(dirname "$lib")"
  cp -L "$lib" "$out$lib"
done

install -m 0644 "$ca_bundle" "$out"/etc/ssl/certs/ca-certificates.crt
printf 'root:x:0:0:root:/root:/sbin/nologin\ntokenbroker:x:%d:%d:tokenbroker:/var/lib/tokenbroker:/sbin/nologin\n' "$uid" "$uid" >"$out"/etc/passwd
printf 'root:x:0:\ntokenbroker:x:%d:\n' "$uid" >"$out"/etc/group
chmod 1777 "$out"/tmp
chown "$uid:$uid" "$out"/var/lib/tokenbroker
chmod 0700 "$out"/var/lib/tokenbroker
