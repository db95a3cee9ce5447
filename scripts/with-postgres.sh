#!/usr/bin/env bash
# Run a command against a throwaway PostgreSQL cluster: initdb in a temp dir, start it on a free
# loopback port with TLS, export KEYBRAKE_TEST_POSTGRES_URL (plain TCP: sslmode=disable) and
# KEYBRAKE_TEST_POSTGRES_CA (the server certificate's CA), run "$@", then stop and delete it.
# Client-certificate auth: role keybrake_cert may log in only over TLS with a certificate
# (CN=keybrake_cert, same CA; pg_hba `cert`): KEYBRAKE_TEST_POSTGRES_CLIENT_CERT / _CLIENT_KEY
# (PEM, EC key in PKCS#8), _CLIENT_RSA_CERT / _CLIENT_RSA_KEY (RSA key in PKCS#1) and
# KEYBRAKE_TEST_POSTGRES_CERT_URL (that role, verify-full, with the EC pair).
# Installs Debian's postgresql package when the server binaries are missing.
# Usage: scripts/with-postgres.sh cargo test -p keybrake-audit
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi

find_pg_bin() {
  local dir
  for dir in ${KEYBRAKE_PG_BIN:-} /usr/lib/postgresql/*/bin; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}

if ! PG_BIN=$(find_pg_bin); then
  echo "with-postgres: PostgreSQL server binaries not found; installing Debian's postgresql" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends postgresql >&2
  PG_BIN=$(find_pg_bin) || { echo "with-postgres: initdb still missing after apt-get install postgresql" >&2; exit 1; }
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/keybrake-pg.XXXXXX")
DATA="$WORK/data"
LOG="$WORK/postgres.log"

# initdb refuses to run as root: run the server as the Debian `postgres` user in that case.
as_pg() { "$@"; }
if [ "$(id -u)" -eq 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  chown postgres "$WORK"
  chmod 755 "$WORK"
  as_pg() { runuser -u postgres -- "$@"; }
fi

free_port() {
  # Ask the kernel for a free loopback port; python3 or perl, whichever exists.
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
  else
    perl -MIO::Socket::INET -e 'my $s=IO::Socket::INET->new(LocalAddr=>"127.0.0.1",LocalPort=>0,Listen=>1) or die; print $s->sockport, "\n"'
  fi
}

cleanup() {
  local rc=$?
  if [ -f "$DATA/postmaster.pid" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
  if [ "$rc" -ne 0 ] && [ -f "$LOG" ]; then
    echo "with-postgres: exit $rc; last server log lines:" >&2
    tail -n 20 "$LOG" >&2 || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT INT TERM

as_pg "$PG_BIN/initdb" -D "$DATA" -U keybrake --auth=trust --encoding=UTF8 --no-locale >"$WORK/initdb.log" 2>&1 \
  || { cat "$WORK/initdb.log" >&2; exit 1; }

# TLS (ssl=on) with a throwaway CA and a certificate for 127.0.0.1 only (tests check that other
# names are refused). The exported URL says sslmode=disable, so plain-TCP users are unaffected;
# TLS tests add sslmode=require&sslrootcert=$KEYBRAKE_TEST_POSTGRES_CA.
TLS="$WORK/tls"
mkdir -p "$TLS"
command -v openssl >/dev/null || { echo "with-postgres: openssl missing: apt-get install -y openssl" >&2; exit 1; }
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=keybrake test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$TLS/ca.key" -out "$TLS/ca.crt" >"$TLS/openssl.log" 2>&1 \
  && openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$TLS/server.key" -out "$TLS/server.csr" >>"$TLS/openssl.log" 2>&1 \
  && printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' >"$TLS/server.ext" \
  && openssl x509 -req -in "$TLS/server.csr" -CA "$TLS/ca.crt" -CAkey "$TLS/ca.key" -set_serial "0x$(openssl rand -hex 8)" \
    -days 2 -extfile "$TLS/server.ext" -out "$TLS/server.crt" >>"$TLS/openssl.log" 2>&1 \
  || { cat "$TLS/openssl.log" >&2; exit 1; }
# Client certificates for role keybrake_cert (the cert method maps the CN to the role): an EC
# key in PKCS#8 and an RSA key in PKCS#1, the key formats libpq users have.
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' >"$TLS/client.ext"
issue_client_cert() { # name: signs $TLS/name.key into $TLS/name.crt
  openssl req -new -key "$TLS/$1.key" -subj "/CN=keybrake_cert" -out "$TLS/$1.csr" \
    && openssl x509 -req -in "$TLS/$1.csr" -CA "$TLS/ca.crt" -CAkey "$TLS/ca.key" -set_serial "0x$(openssl rand -hex 8)" \
      -days 2 -extfile "$TLS/client.ext" -out "$TLS/$1.crt"
}
{ openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS/client.key" \
    && issue_client_cert client \
    && openssl genrsa -traditional -out "$TLS/client-rsa.key" 2048 \
    && issue_client_cert client-rsa; } >>"$TLS/openssl.log" 2>&1 \
  || { cat "$TLS/openssl.log" >&2; exit 1; }
chmod 600 "$TLS/server.key" "$TLS/client.key" "$TLS/client-rsa.key"
[ "$(id -u)" -eq 0 ] && chown postgres "$TLS/server.key"
# ssl_ca_file lets the server verify client certificates; clients without one still connect.
TLS_OPTS="-c ssl=on -c ssl_cert_file=$TLS/server.crt -c ssl_key_file=$TLS/server.key -c ssl_ca_file=$TLS/ca.crt"
# keybrake_cert: certificate over TLS only, before initdb's trust rules (first match wins).
{ printf 'hostssl all keybrake_cert 127.0.0.1/32 cert\nhostnossl all keybrake_cert 127.0.0.1/32 reject\n'
  cat "$DATA/pg_hba.conf"; } >"$WORK/pg_hba.conf"
cat "$WORK/pg_hba.conf" >"$DATA/pg_hba.conf"

started=0
for _ in 1 2 3 4 5; do
  PORT=$(free_port)
  if as_pg "$PG_BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
      -o "-p $PORT -c listen_addresses=127.0.0.1 -k $WORK $TLS_OPTS ${KEYBRAKE_PG_OPTS:-}" start >/dev/null; then
    started=1
    break
  fi
done
[ "$started" -eq 1 ] || { echo "with-postgres: could not start PostgreSQL" >&2; exit 1; }

export KEYBRAKE_TEST_POSTGRES_URL="postgres://keybrake@127.0.0.1:$PORT/postgres?sslmode=disable"
export KEYBRAKE_TEST_POSTGRES_CA="$TLS/ca.crt"
"$PG_BIN/psql" -q -v ON_ERROR_STOP=1 "$KEYBRAKE_TEST_POSTGRES_URL" -c "CREATE ROLE keybrake_cert LOGIN" >/dev/null
export KEYBRAKE_TEST_POSTGRES_CLIENT_CERT="$TLS/client.crt"
export KEYBRAKE_TEST_POSTGRES_CLIENT_KEY="$TLS/client.key"
export KEYBRAKE_TEST_POSTGRES_CLIENT_RSA_CERT="$TLS/client-rsa.crt"
export KEYBRAKE_TEST_POSTGRES_CLIENT_RSA_KEY="$TLS/client-rsa.key"
export KEYBRAKE_TEST_POSTGRES_CERT_URL="postgres://keybrake_cert@127.0.0.1:$PORT/postgres?sslmode=verify-full&sslrootcert=$TLS/ca.crt&sslcert=$TLS/client.crt&sslkey=$TLS/client.key"
echo "with-postgres: PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') at $KEYBRAKE_TEST_POSTGRES_URL" >&2

set +e
"$@"
status=$?
set -e
exit "$status"
