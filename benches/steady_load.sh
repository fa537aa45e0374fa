#!/usr/bin/env bash
# Resident memory of imgsvc-server over a long steady load with nobody
# scraping /metrics (issue 24: it grew by about 20 bytes a call, for good,
# until a scrape drained the metrics recorder).
#
#   benches/steady_load.sh [--server BIN] [--duration S] [--every S] [--label L]
#                          [--concurrency N] [--size WxH] [--api legacy|v1] [--skip-build]
#
# Starts one server (BIN, default target/release/imgsvc-server; the admin
# listener is on but nothing scrapes it), then runs `imgsvc-client bench`
# (--op none: rotations by 0°, transport, admission, metrics; default 16x16
# gray at concurrency 16) for --duration seconds (default 300), reading the
# server's VmRSS every --every seconds (default 10), and 15 s after the load
# ends. Prints one line per sample (seconds, calls so far, RSS KiB) and a
# summary; writes them to benches/results/steady_load_<UTC date>_<L>.txt.
# Loopback only; every step has a time bound.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REL="$ROOT/target/release"
SERVER="$REL/imgsvc-server"
DURATION=300
EVERY=10
LABEL=run
CONCURRENCY=16
SIZE=16x16
API=legacy
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --server) SERVER="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --every) EVERY="$2"; shift 2 ;;
    --label) LABEL="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --size) SIZE="$2"; shift 2 ;;
    --api) API="$2"; shift 2 ;;
    --skip-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
W="${SIZE%x*}"
H="${SIZE#*x}"

WORK="$(mktemp -d)"
SERVER_PID=
LOAD_PID=
cleanup() {
  if [ -n "$LOAD_PID" ]; then kill "$LOAD_PID" 2>/dev/null || true; fi
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
if [ "$BUILD" = 1 ]; then
  (cd "$ROOT" && cargo build --release --locked --bin imgsvc-server --bin imgsvc-client --bin gen-certs)
fi

ADMIN="$(free_port)"
{
  bench_pki "$REL/gen-certs" "$WORK"
  cat <<TOML
[admin]
listen = "127.0.0.1:$ADMIN"
[tenants.bench]
max_concurrent_requests = 64
[log]
level = "warn"
TOML
} >"$WORK/imgsvc.toml"

PORT="$(free_port)"
"$SERVER" --config "$WORK/imgsvc.toml" --port "$PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
wait_port "$PORT" "$SERVER_PID" || { cat "$WORK/server.log" >&2; exit 1; }

rss() { awk '$1 == "VmRSS:" {print $2}' "/proc/$SERVER_PID/status"; }
OUT="$ROOT/benches/results/steady_load_$(date -u +%Y-%m-%d_%H%M)_$LABEL.txt"
mkdir -p "$ROOT/benches/results"
{
  echo "# benches/steady_load.sh --duration $DURATION --every $EVERY --concurrency $CONCURRENCY --size $SIZE --api $API --label $LABEL"
  echo "# server: $SERVER (tree at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')); $(nproc) cores; $(uname -r); load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# nobody scrapes /metrics during the run"
  echo "# seconds rss_kib"
} | tee "$OUT"

START="$(date +%s)"
timeout $((DURATION + 60)) "$REL/imgsvc-client" bench --host 127.0.0.1 --port "$PORT" --server-name localhost \
  --ca "$WORK/pki/ca.pem" --cert "$WORK/pki/client-bench.pem" --key "$WORK/pki/client-bench-key.pem" \
  --api "$API" --op none --width "$W" --height "$H" --format gray8 --concurrency "$CONCURRENCY" --duration "$DURATION" --json \
  >"$WORK/report.json" &
LOAD_PID=$!
FIRST="$(rss)"
echo "0 $FIRST" | tee -a "$OUT"
while kill -0 "$LOAD_PID" 2>/dev/null; do
  sleep "$EVERY"
  if kill -0 "$LOAD_PID" 2>/dev/null; then echo "$(( $(date +%s) - START )) $(rss)" | tee -a "$OUT"; fi
done
wait "$LOAD_PID" || [ $? = 1 ]
LOAD_PID=
END="$(rss)"
sleep 15
AFTER="$(rss)"
{
  echo "# load ended: rss $END KiB; 15 s later: $AFTER KiB"
  echo "# client report: $(cat "$WORK/report.json")"
  python3 - "$WORK/report.json" "$FIRST" "$END" "$AFTER" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
first, end, after = (int(x) for x in sys.argv[2:5])
print(f"# summary: {r['ok']} calls in {r['elapsed_s']:.0f} s ({r['requests_per_s']:.0f}/s), errors {r['errors'] or 'none'}; "
      f"RSS {first} KiB at the start, {end} KiB at the end ({(end - first) / 1024:+.1f} MiB), "
      f"{after} KiB 15 s later ({(after - first) / 1024:+.1f} MiB kept; {(after - first) * 1024 / max(r['ok'], 1):.1f} bytes a call)")
PY
} | tee -a "$OUT"
echo "saved $OUT"
