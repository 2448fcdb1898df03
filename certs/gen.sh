#!/usr/bin/env bash
# Generates the development certificates under certs/ with the openssl CLI only (no network).
# Idempotent: files that already exist are kept; `--force` regenerates everything.
# DEV ONLY: the private keys are committed to the repository and must never protect anything real.
set -euo pipefail
cd "$(dirname "$0")"

DAYS=3650
if [[ "${1:-}" == "--force" ]]; then
  rm -f ./*.pem ./*.key ./*.srl
fi

key() { # key FILE: an EC P-256 key in PKCS#8 PEM
  [[ -f "$1" ]] || openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

ca() { # ca NAME CN
  key "$1.key"
  [[ -f "$1.pem" ]] || openssl req -x509 -new -key "$1.key" -days "$DAYS" -sha256 \
    -subj "/O=tokenbroker dev/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$1.pem"
}

leaf() { # leaf NAME ISSUER CN EXTENSIONS
  local name=$1 issuer=$2 cn=$3 ext=$4
  key "$name.key"
  if [[ ! -f "$name.pem" ]]; then
    local tmp
    tmp=$(mktemp -d)
    openssl req -new -key "$name.key" -subj "/O=tokenbroker dev/CN=$cn" -out "$tmp/csr.pem"
    printf '%s\n' "$ext" >"$tmp/ext.cnf"
    openssl x509 -req -in "$tmp/csr.pem" -CA "$issuer.pem" -CAkey "$issuer.key" \
      -set_serial "0x$(openssl rand -hex 16)" -days "$DAYS" -sha256 \
      -extfile "$tmp/ext.cnf" -out "$name.pem" 2>/dev/null
    rm -rf "$tmp"
  fi
}

CLIENT_EXT='basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectAltName=URI:spiffe://tokenbroker.dev/demo,DNS:demo.client.local'

ca ca "tokenbroker dev CA"
leaf server ca localhost 'basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1'
leaf client ca demo "$CLIENT_EXT"

ca other-ca "tokenbroker dev other CA"
leaf untrusted-client other-ca demo "$CLIENT_EXT"

chmod 600 ./*.key
echo "certs ready in $(pwd)"
