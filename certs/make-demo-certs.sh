#!/usr/bin/env bash
# Make a demo CA and two leaf certificates (proxy, backend) with openssl.
#
#   certs/make-demo-certs.sh [OUTDIR]      (default: the directory of this script)
#
# Writes OUTDIR/{ca,proxy,backend}.pem and OUTDIR/{ca,proxy,backend}-key.pem.
# All keys are ECDSA P-256 in PKCS#8 PEM ("BEGIN PRIVATE KEY"); certificates are
# X.509 v3, valid 20 years. DEMO ONLY: the private keys are public.
set -euo pipefail

out="${1:-$(cd "$(dirname "$0")" && pwd)}"
mkdir -p "$out"
days=7300
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

key() { # key FILE: ECDSA P-256, PKCS#8 PEM
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
        -pkeyopt ec_param_enc:named_curve -out "$1" 2>/dev/null
    chmod 600 "$1"
}

# --- CA ---------------------------------------------------------------------
key "$out/ca-key.pem"
cat >"$work/ca.ext" <<'EXT'
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EXT
openssl req -new -key "$out/ca-key.pem" -subj "/O=cutover demo/CN=cutover demo CA" \
    -out "$work/ca.csr"
openssl x509 -req -in "$work/ca.csr" -signkey "$out/ca-key.pem" -days "$days" \
    -sha256 -set_serial "0x$(openssl rand -hex 16)" -extfile "$work/ca.ext" \
    -out "$out/ca.pem" 2>/dev/null

# --- leaves -----------------------------------------------------------------
leaf() { # leaf NAME CN SAN
    local name="$1" cn="$2" san="$3"
    key "$out/$name-key.pem"
    cat >"$work/$name.ext" <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $san
EXT
    openssl req -new -key "$out/$name-key.pem" -subj "/O=cutover demo/CN=$cn" \
        -out "$work/$name.csr"
    openssl x509 -req -in "$work/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca-key.pem" \
        -days "$days" -sha256 -set_serial "0x$(openssl rand -hex 16)" \
        -extfile "$work/$name.ext" -out "$out/$name.pem" 2>/dev/null
    openssl verify -CAfile "$out/ca.pem" "$out/$name.pem" >/dev/null
}

leaf proxy   "cutover demo proxy"   "DNS:localhost, IP:127.0.0.1, IP:127.0.0.2, IP:::1"
leaf backend "cutover demo backend" "IP:127.0.0.10, IP:127.0.0.11, IP:127.0.0.12, DNS:localhost"

chmod 644 "$out"/ca.pem "$out"/proxy.pem "$out"/backend.pem
echo "demo certificates written to $out" >&2
