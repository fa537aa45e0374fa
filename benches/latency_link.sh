#!/usr/bin/env bash
# One 3840x2160 RGB rotation (25 MB in, 25 MB out) over a 20 ms round-trip,
# 1 Gbit/s link, with several HTTP/2 window settings of the server, against
# the transfer time of the same bytes on that link (50 MB / 125 MB/s = 0.4 s,
# plus 3 round trips: 0.46 s). Goal: within 1.5x.
#
#   benches/latency_link.sh [--delay-ms 10] [--rate-mbit 1000] [--warm 5]
#                           [--variants default,s1c2,s4c8,adaptive,legacy,cpp,...]
#
# The link is benches/delay_proxy.py on loopback: the kernel here has no
# netem (CONFIG_NET_SCH_NETEM is not set), so a network namespace pair could
# rate-limit (tbf) but not delay. Each variant starts its own imgsvc-server,
# then imgsvc-client bench measures one request on a fresh connection
# ("cold": the windows as granted at the start) and --warm requests on one
# connection ("warm" p50: an adaptive window has grown). Also run once
# without the proxy (the server's own time for the request). Loopback only;
# every step is bounded in time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DELAY_MS=10
RATE_MBIT=1000
WARM=5
VARIANTS=default,s1c2,s2c4,s4c4,s4c8,s16c32,adaptive
while [ $# -gt 0 ]; do
  case "$1" in
    --delay-ms) DELAY_MS="$2"; shift 2 ;;
    --rate-mbit) RATE_MBIT="$2"; shift 2 ;;
    --warm) WARM="$2"; shift 2 ;;
    --variants) VARIANTS="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

# Server settings of each variant, as IMGSVC_* environment overrides:
# "default" (the shipped defaults), "adaptive" (hyper's BDP windows), or
# sSCc: fixed windows of S MiB per stream and C MiB per connection;
# "legacy": the defaults through NLImageService (RotateImage, the same
# bytes); "cpp": the C++ gRPC peer (../shared/peers, gRPC C-core defaults),
# through NLImageService too (built by ../shared/peers/cpp/setup.sh).
variant_env() {
  case "$1" in
    default|legacy|cpp) ;;
    adaptive) echo IMGSVC_SERVER__HTTP2_ADAPTIVE_WINDOW=true ;;
    s*c*)
      local s=${1#s}; s=${s%c*}; local c=${1#*c}
      echo IMGSVC_SERVER__HTTP2_ADAPTIVE_WINDOW=false \
        IMGSVC_SERVER__HTTP2_STREAM_WINDOW_BYTES=$((s << 20)) IMGSVC_SERVER__HTTP2_CONNECTION_WINDOW_BYTES=$((c << 20)) ;;
    *) echo "unknown variant: $1" >&2; exit 2 ;;
  esac
}

(cd "$ROOT" && cargo build --release --locked --bin imgsvc-server --bin imgsvc-client --bin gen-certs) >&2
BIN="$ROOT/target/release"
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
{
  bench_pki "$BIN/gen-certs" "$WORK"
  printf '[tenants.bench]\n[log]\nlevel = "warn"\n'
} >"$WORK/imgsvc.toml"
CLIENT=(--ca "$WORK/pki/ca.pem" --cert "$WORK/pki/client-bench.pem" --key "$WORK/pki/client-bench-key.pem"
        --server-name localhost --op rotate --width 3840 --height 2160 --format rgb8 --concurrency 1 --timeout 60 --json)

# bench PORT REQUESTS -> "p50_ms max_ms"
bench() {
  timeout 120 "$BIN/imgsvc-client" bench --host 127.0.0.1 --port "$1" --requests "$2" --api "$API" "${CLIENT[@]}" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["ok"] > 0 and not r["errors"], r; print(round(r["p50_ms"]), round(r["max_ms"]))'
}

TRANSFER_MS=$(python3 -c "print(round((2*3840*2160*3)/($RATE_MBIT*1e6/8)*1000 + 3*2*$DELAY_MS))")
echo "link: ${DELAY_MS} ms each way, ${RATE_MBIT} Mbit/s; transfer time of 2 x 24.9 MB + 3 RTT = ${TRANSFER_MS} ms; goal <= $((TRANSFER_MS * 3 / 2)) ms"
echo
echo "| server windows | no link, warm p50 ms | cold (1st request) ms | warm p50 ms (of $WARM) | warm / transfer time |"
echo "| --- | --- | --- | --- | --- |"
for v in ${VARIANTS//,/ }; do
  port=$(free_port)
  API=v1
  if [ "$v" = cpp ]; then
    API=legacy
    CPP="$(realpath -m "${IMGSVC_PEERS_HOME:-$HOME/.cache/imgsvc-peers}")/cpp-build/nl_image_server"
    [ -x "$CPP" ] || { echo "no $CPP: run ../shared/peers/cpp/setup.sh first" >&2; exit 1; }
    "$CPP" --host 127.0.0.1 --port "$port" --tls-cert "$WORK/pki/server.pem" --tls-key "$WORK/pki/server-key.pem" \
      --client-ca "$WORK/pki/ca.pem" >"$WORK/server-$v.log" 2>&1 &
  else
    [ "$v" = legacy ] && API=legacy
    env $(variant_env "$v") "$BIN/imgsvc-server" --config "$WORK/imgsvc.toml" --port "$port" 2>"$WORK/server-$v.log" &
  fi
  server=$!; PIDS+=("$server")
  wait_port "$port"
  python3 "$ROOT/benches/delay_proxy.py" --target "127.0.0.1:$port" --delay-ms "$DELAY_MS" --rate-mbit "$RATE_MBIT" --lifetime-s 600 >"$WORK/proxy-$v.port" &
  proxy=$!; PIDS+=("$proxy")
  for _ in $(seq 100); do [ -s "$WORK/proxy-$v.port" ] && break; sleep 0.1; done
  pport=$(head -1 "$WORK/proxy-$v.port")
  read -r direct _ < <(bench "$port" 3)
  read -r _ cold < <(bench "$pport" 1)
  read -r warm _ < <(bench "$pport" "$WARM")
  ratio=$(python3 -c "print(f'{$warm/$TRANSFER_MS:.2f}x')")
  echo "| $v | $direct | $cold | $warm | $ratio |"
  kill "$proxy" "$server" 2>/dev/null || true
  wait "$proxy" "$server" 2>/dev/null || true
done
