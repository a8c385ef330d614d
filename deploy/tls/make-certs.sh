#!/bin/sh
# Makes the certificates for berthd's tcp:// listener with mutual TLS (deploy/README.md):
#   DIR/ca.pem, DIR/ca-key.pem                  a CA that signs both sides (keep ca-key.pem private)
#   DIR/server/{ca.pem,cert.pem,key.pem}        for berthd: --tlscacert, --tlscert, --tlskey
#   DIR/client/{ca.pem,cert.pem,key.pem}        for clients: buildctl --tlsdir DIR/client, buildx
#                                               --driver-opt cacert=…,cert=…,key=…
# Usage: make-certs.sh DIR [NAME...]   NAMEs (DNS names or IPv4 addresses) go into the server
# certificate's subjectAltName; default: localhost 127.0.0.1. Needs the openssl CLI.
set -eu
[ $# -ge 1 ] || { echo "usage: $0 DIR [NAME...]" >&2; exit 2; }
dir=$1
shift
[ $# -gt 0 ] || set -- localhost 127.0.0.1
san=""
for name in "$@"; do
    case $name in
    *[!0-9.]*) san="$san,DNS:$name" ;;
    *) san="$san,IP:$name" ;;
    esac
done
san=${san#,}
days=${DAYS:-365}
mkdir -p "$dir/server" "$dir/client"
cd "$dir"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca-key.pem
openssl req -x509 -new -key ca-key.pem -sha256 -days "$days" -subj "/CN=berth CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.pem

# sign SUBJECT KEY OUT EXTENSIONS...
sign() {
    subject=$1 keyfile=$2 out=$3
    shift 3
    ext=$(mktemp)
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" "$@" >"$ext"
    openssl req -new -key "$keyfile" -subj "$subject" |
        openssl x509 -req -CA ca.pem -CAkey ca-key.pem -CAcreateserial -sha256 -days "$days" \
            -extfile "$ext" -out "$out" 2>/dev/null
    rm -f "$ext"
}

key server/key.pem
sign "/CN=berthd" server/key.pem server/cert.pem "extendedKeyUsage=serverAuth" "subjectAltName=$san"
key client/key.pem
sign "/CN=berth client" client/key.pem client/cert.pem "extendedKeyUsage=clientAuth"
cp ca.pem server/ca.pem
cp ca.pem client/ca.pem
rm -f ca.srl
chmod 600 ca-key.pem server/key.pem client/key.pem
echo "certificates in $dir: server/ for berthd, client/ for clients (server names: $*)"
