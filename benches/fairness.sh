#!/usr/bin/env bash
# Tenant fairness on one imgsvc-server (issue 25), with imgsvc-client bench
# over mutual TLS on 127.0.0.1:
#  1. flood: tenants "dev" and "light" each send 1024x1024 GRAY8 mean
#     filters at concurrency 160 while "limited" sends the same at
#     concurrency 2; prints each run (the refusals of "limited" are the
#     figure), its p99 against its p99 alone on the same server just
#     before, and the server's refusals by tenant and reason. Config as in
#     the issue: three tenants, default limits, a 4 GiB budget.
#  2. CPU shares: tenant "gray" sends 2048x2048 GRAY8 quarter turns, tenant
#     "rgb" 1024x1024 RGB8 mean filters (concurrency 8 each), first with
#     equal weights, then gray:rgb = 3:1; prints each tenant's job CPU time
#     over the run (imgsvc_tenant_cpu_seconds_total) and their ratio.
#
#   benches/fairness.sh [--duration S] [--skip-build]
#
# Writes the raw output to benches/results/fairness_<UTC date>.txt.
# Loopback only; every step has a time bound.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
DURATION=20
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --skip-build) BUILD=0; shift ;;
    *) echo "unknown argument $1" >&2; exit 64 ;;
  esac
done
BIN="$(release_bin "$ROOT" "$BUILD")"
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
OUT="$ROOT/benches/results/fairness_$(date -u +%Y-%m-%d).txt"
"$BIN/gen-certs" --out "$WORK/pki" --tenant dev --tenant light --tenant limited --tenant gray --tenant rgb >/dev/null

# start_server TENANT_TABLES: a fresh server; sets PORT, ADMIN, SERVER_PID.
start_server() {
  PORT=$(free_port); ADMIN=$(free_port)
  cat >"$WORK/imgsvc.toml" <<TOML
[server]
host = "127.0.0.1"
port = $PORT
[tls]
cert = "$WORK/pki/server.pem"
key = "$WORK/pki/server-key.pem"
client_ca = "$WORK/pki/ca.pem"
[admin]
listen = "127.0.0.1:$ADMIN"
[log]
level = "warn"
[tenancy]
memory_budget_bytes = 4294967296
$1
TOML
  "$BIN/imgsvc-server" --config "$WORK/imgsvc.toml" 2>"$WORK/server.log" &
  SERVER_PID=$!
  wait_port "$PORT" "$SERVER_PID"
}
stop_server() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; }
bench() {
  local tenant="$1"; shift
  timeout $((DURATION + 60)) "$BIN/imgsvc-client" bench --host 127.0.0.1 --port "$PORT" --ca "$WORK/pki/ca.pem" \
    --cert "$WORK/pki/client-$tenant.pem" --key "$WORK/pki/client-$tenant-key.pem" --duration "$DURATION" "$@" || true
}
metric() { curl -s "http://127.0.0.1:$ADMIN/metrics" | awk -v n="$1" -v t="tenant=\"$2\"" 'index($0, n"{") == 1 && index($0, t) { print $NF; f=1 } END { if (!f) print 0 }'; }

{
  echo "# benches/fairness.sh --duration $DURATION, $(date -u +%Y-%m-%dT%H:%MZ), $(git -C "$ROOT" rev-parse --short HEAD), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "## 1. flood: dev and light at concurrency 160, limited at 2 (1024x1024 GRAY8 mean)"
  start_server $'[tenants.dev]\n[tenants.light]\n[tenants.limited]'
  echo "### limited alone (its solo latency, same server)"
  bench limited --op mean --width 1024 --height 1024 --format gray8 --concurrency 2 | tee "$WORK/solo.txt"
  bench dev --op mean --width 1024 --height 1024 --format gray8 --concurrency 160 >"$WORK/dev.txt" 2>&1 &
  A=$!
  bench light --op mean --width 1024 --height 1024 --format gray8 --concurrency 160 >"$WORK/light.txt" 2>&1 &
  B=$!
  echo "### limited"; bench limited --op mean --width 1024 --height 1024 --format gray8 --concurrency 2 | tee "$WORK/flooded.txt"
  wait "$A" "$B" || true
  p99() { awk '/^latency:/ { for (i = 1; i <= NF; i++) if ($i == "p99") print $(i + 1) }' "$1"; }
  SOLO=$(p99 "$WORK/solo.txt"); FLOODED=$(p99 "$WORK/flooded.txt")
  echo "### limited p99: alone $SOLO ms, under the flood $FLOODED ms, $(awk -v a="$SOLO" -v b="$FLOODED" 'BEGIN { if (a > 0) printf "%.1fx", b / a; else print "-" }')"
  echo "### dev"; cat "$WORK/dev.txt"
  echo "### light"; cat "$WORK/light.txt"
  echo "### server refusals"; curl -s "http://127.0.0.1:$ADMIN/metrics" | grep '^imgsvc_refusals_total' || echo "(none)"
  stop_server
  for weights in "1 1" "3 1"; do
    set -- $weights
    echo "## 2. CPU shares, weights gray:rgb = $1:$2 (gray: 2048x2048 GRAY8 rotate c8; rgb: 1024x1024 RGB8 mean c8)"
    start_server "[tenants.gray]
weight = $1
[tenants.rgb]
weight = $2"
    bench gray --op rotate --width 2048 --height 2048 --format gray8 --concurrency 8 >"$WORK/gray.txt" 2>&1 &
    A=$!
    bench rgb --op mean --width 1024 --height 1024 --format rgb8 --concurrency 8 >"$WORK/rgb.txt" 2>&1 &
    B=$!
    wait "$A" "$B" || true
    echo "### gray"; cat "$WORK/gray.txt"
    echo "### rgb"; cat "$WORK/rgb.txt"
    G=$(metric imgsvc_tenant_cpu_seconds_total gray); R=$(metric imgsvc_tenant_cpu_seconds_total rgb)
    echo "### job CPU time: gray $G s, rgb $R s, gray/rgb $(awk -v g="$G" -v r="$R" 'BEGIN { if (r > 0) printf "%.2f", g / r; else print "-" }')"
    stop_server
  done
} 2>&1 | tee "$OUT"
echo "written: $OUT"
