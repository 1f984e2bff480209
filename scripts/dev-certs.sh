#!/usr/bin/env bash
# Development TLS for NATS: a CA, a server certificate signed by it, a client
# certificate signed by it, and the NATS password, in one folder. The compose stack's
# one-shot service `nats-certs` runs it into the nats-tls volume before NATS starts; on
# the host it writes docker/certs/ (git-ignored) for tools that talk to NATS directly.
#
#   scripts/dev-certs.sh [--renew] [folder]        default folder: docker/certs
#
#   ca.crt                  the CA that NATS clients trust (RADFLOW_NATS_TLS_CA)
#   server.crt, server.key  NATS's certificate: DNS nats, localhost, IP 127.0.0.1 and
#                           the names of RADFLOW_NATS_CERT_NAMES (comma-separated,
#                           e.g. "nats.example.internal,IP:10.0.0.5")
#   client.crt, client.key  a client certificate (clientAuth), for trying mutual TLS
#   nats-password           the password of NATS user radflow: RADFLOW_NATS_PASSWORD if
#                           set, else the one already there, else 32 random hex digits
#   nats-auth.conf          the same password as a nats-server variable (NATS_PASSWORD)
#                           for the server configuration's `include`
#
# Files that exist are kept while the server certificate is valid for 30 more days
# and names the same hosts; then (or with --renew) a new CA and new certificates are
# made together. The CA's key is thrown away once they are signed, so nothing here can
# sign anything later: renewing means a new CA, which clients pick up on restart. For
# development only: production certificates come from the site's CA or cert-manager
# (docs/kubernetes.md).
set -euo pipefail

renew=0
if [[ ${1:-} == --renew ]]; then
  renew=1
  shift
fi
dir=${1:-$(dirname "$0")/../docker/certs}
days=${RADFLOW_DEV_CERT_DAYS:-365}
openssl=$(command -v openssl) || { echo "dev-certs: openssl is needed" >&2; exit 1; }

names="DNS:nats,DNS:localhost,IP:127.0.0.1"
IFS=, read -r -a extra <<<"${RADFLOW_NATS_CERT_NAMES:-}"
for name in "${extra[@]}"; do
  name=${name// /}
  [[ -n $name ]] || continue
  [[ $name == *:* ]] || name=DNS:$name
  names+=",$name"
done

mkdir -p "$dir"
umask 077

# The password first: it may change without new certificates.
password=${RADFLOW_NATS_PASSWORD:-}
if [[ -z $password && -s $dir/nats-password ]]; then
  password=$(<"$dir/nats-password")
fi
[[ -n $password ]] || password=$("$openssl" rand -hex 16)
if [[ $password =~ [\"\\[:space:][:cntrl:]] ]]; then
  echo "dev-certs: the NATS password may not hold quotes, backslashes, spaces or control characters" >&2
  exit 1
fi
printf '%s\n' "$password" >"$dir/nats-password.tmp"
printf '# Made by scripts/dev-certs.sh: the password of NATS user radflow.\nNATS_PASSWORD: "%s"\n' \
  "$password" >"$dir/nats-auth.conf.tmp"
mv "$dir/nats-password.tmp" "$dir/nats-password"
mv "$dir/nats-auth.conf.tmp" "$dir/nats-auth.conf"

current() {
  local f
  for f in ca.crt server.crt server.key client.crt client.key; do
    [[ -s $dir/$f ]] || return 1
  done
  "$openssl" x509 -in "$dir/server.crt" -noout -checkend $((30 * 24 * 3600)) >/dev/null || return 1
  [[ $(cat "$dir/server.names" 2>/dev/null) == "$names" ]] || return 1
  "$openssl" verify -CAfile "$dir/ca.crt" "$dir/server.crt" "$dir/client.crt" >/dev/null 2>&1
}

if ((!renew)) && current; then
  echo "dev-certs: $dir holds valid certificates (server until $("$openssl" x509 -in "$dir/server.crt" -noout -enddate | cut -d= -f2)); --renew makes new ones"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$openssl" req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days "$days" \
  -subj "/CN=radflow development CA $(date -u +%Y%m%dT%H%M%SZ)" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n' "$names" >server.ext
printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n' >client.ext
for who in server client; do
  "$openssl" req -newkey rsa:2048 -nodes -keyout "$who.key" -out "$who.csr" \
    -subj "/CN=radflow development $who" 2>/dev/null
  "$openssl" x509 -req -in "$who.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$who.crt" \
    -days "$days" -extfile "$who.ext" 2>/dev/null
done
"$openssl" verify -CAfile ca.crt server.crt client.crt >/dev/null
printf '%s' "$names" >server.names
chmod 0644 ca.crt server.crt client.crt server.names
chmod 0600 server.key client.key
for f in ca.crt server.crt server.key client.crt client.key server.names; do
  cp -p "$f" "$dir/$f.tmp"
  mv "$dir/$f.tmp" "$dir/$f"
done
echo "dev-certs: new CA and certificates in $dir (server: ${names//,/, }; valid $days days)"
