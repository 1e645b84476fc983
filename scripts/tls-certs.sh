#!/usr/bin/env bash
# Test TLS credentials for the NBD server and the nbd driver, in QEMU's layout:
#
#   scripts/tls-certs.sh DIR   makes a CA and, signed by it,
#       DIR/server/{ca-cert,server-cert,server-key}.pem   for 127.0.0.1 and localhost
#       DIR/client/{ca-cert,client-cert,client-key}.pem   a client certificate
#     (DIR/ca-key.pem is the CA's key). Point a tls-creds-x509 object's dir at
#     DIR/server (endpoint=server) or DIR/client (endpoint=client).
#
# P-256 keys, valid for ten years; for tests on this host only. Needs openssl.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
command -v openssl >/dev/null || { echo "tls-certs.sh: openssl is missing" >&2; exit 1; }
dir=$1
mkdir -p "$dir/server" "$dir/client"
cd "$dir"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
# sign CSR-KEY SUBJECT OUT EXTENSIONS...
sign() {
    local k=$1 subj=$2 out=$3
    shift 3
    printf '%s\n' "$@" >"$out.ext"
    openssl req -new -key "$k" -subj "$subj" -out "$out.csr"
    openssl x509 -req -in "$out.csr" -CA ca-cert.pem -CAkey ca-key.pem -set_serial "0x$(openssl rand -hex 8)" \
        -days 3650 -extfile "$out.ext" -out "$out" 2>/dev/null
    rm -f "$out.csr" "$out.ext"
}
key ca-key.pem
openssl req -x509 -new -key ca-key.pem -subj "/CN=vubd test CA $(openssl rand -hex 4)" -days 3650 \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -out ca-cert.pem
key server/server-key.pem
sign server/server-key.pem /CN=localhost server/server-cert.pem \
    basicConstraints=critical,CA:FALSE keyUsage=critical,digitalSignature,keyEncipherment \
    extendedKeyUsage=serverAuth subjectAltName=IP:127.0.0.1,DNS:localhost
key client/client-key.pem
sign client/client-key.pem /CN=vubd-test-client client/client-cert.pem \
    basicConstraints=critical,CA:FALSE keyUsage=critical,digitalSignature,keyEncipherment \
    extendedKeyUsage=clientAuth
cp ca-cert.pem server/
cp ca-cert.pem client/
