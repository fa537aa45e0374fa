# shellcheck shell=bash
# Helpers shared by the benchmark scripts (sourced, not run): the release
# binaries, loopback ports, a server's CPU time, and the bench PKI with the
# common head of the server config.

# release_bin ROOT BUILD: builds the release binaries in CI's profile when
# BUILD is 1; prints their directory (under CARGO_TARGET_DIR if set).
release_bin() {
  if [ "$2" = 1 ]; then (cd "$1" && cargo build --locked --release --features imgsvc/otlp --bins) >&2 || return; fi
  echo "${CARGO_TARGET_DIR:-$1/target}/release"
}

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT [PID]: until something listens on 127.0.0.1:PORT (up to
# 30 s); fails early if PID, the server, has exited.
wait_port() {
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    if [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2; return 1
}

# utime + stime of PID in clock ticks (fields 14 and 15 of /proc/PID/stat;
# the command name, field 2, is in parentheses and may hold spaces).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

# bench_pki GEN_CERTS DIR: a CA, server certificate and client certificate
# for tenant "bench" in DIR/pki; prints the [server] and [tls] tables of a
# loopback server config that uses them (callers append their own tables).
bench_pki() {
  "$1" --out "$2/pki" --tenant bench >/dev/null
  cat <<TOML
[server]
host = "127.0.0.1"
[tls]
cert = "$2/pki/server.pem"
key = "$2/pki/server-key.pem"
client_ca = "$2/pki/ca.pem"
TOML
}
