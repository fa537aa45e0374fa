#!/usr/bin/env bash
# Which signal shows a saturated imgsvc-server first (issue 27: the HPA's
# metric)? One server pinned to --server-cpus (default core 0: a pod with
# one core) with one worker per core, one tenant, and `imgsvc-client bench`
# pinned to --client-cpus (default core 1: it stands for remote clients;
# 1024x1024 GRAY8 mean filters, a few ms each) at offered load stepping
# up: concurrency 1, 2, 3, 4, 6, 8, 12, 16 over up to --connections (4)
# bench processes, for --duration (8) seconds each, one step after the
# other. For each step:
#   calls/s, client p50 and p99 latency,
#   server CPU: utime + stime of the process over the step (/proc/PID/stat)
#     as % of its cores (what a CPU HPA target sees: use / request),
#   client CPU, the same for the bench (near 100 %: the client limits),
#   mean queue wait: delta imgsvc_queue_wait_seconds_sum / delta _count
#     over the step (the HPA's imgsvc_queue_wait_seconds_mean),
#   in flight per worker: imgsvc_in_flight_requests (all tenants and
#     methods) sampled every 0.5 s, mean over the step, / workers; and
#     imgsvc_tenant_calls_open the same way (calls admitted at their
#     headers, including those waiting for memory),
#   memory waits per second (delta imgsvc_memory_waits_total).
# Then the same at concurrency 8 on a server whose memory budget holds the
# connections and about one call (memory-bound: calls wait for memory
# before they queue).
#
#   benches/saturation.sh [--duration S] [--steps "1 2 4"] [--workers N]
#                         [--connections N] [--server-cpus LIST] [--client-cpus LIST]
#                         [--memory-budget BYTES] [--skip-build]
#
# Writes the table to benches/results/saturation_<UTC date>.txt. Loopback
# only; every step has a time bound. Run it on a quiet machine: other
# processes take from the pinned cores (the load average is
# printed).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
DURATION=8
SERVER_CPUS=0
CLIENT_CPUS=1
WORKERS=""
CONNECTIONS=4
STEPS="1 2 3 4 6 8 12 16"
MEMORY_BUDGET=""
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --connections) CONNECTIONS="$2"; shift 2 ;;
    --server-cpus) SERVER_CPUS="$2"; shift 2 ;;
    --client-cpus) CLIENT_CPUS="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --memory-budget) MEMORY_BUDGET="$2"; shift 2 ;;
    --skip-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 64 ;;
  esac
done
BIN="$(release_bin "$ROOT" "$BUILD")"
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() { if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi; rm -rf "$WORK"; }
trap cleanup EXIT
OUT="$ROOT/benches/results/saturation_$(date -u +%Y-%m-%d).txt"
mkdir -p "$ROOT/benches/results"
TICKS=$(getconf CLK_TCK)
# cores in a taskset list such as 0 or 0-1,3
count_cpus() { python3 -c 'import sys; print(sum(int(b) - int(a) + 1 for a, _, b in (r.partition("-") if "-" in r else (r, "", r) for r in sys.argv[1].split(","))))' "$1"; }
CONFIG_HEAD=$(bench_pki "$BIN/gen-certs" "$WORK")
CORES=$(count_cpus "$SERVER_CPUS")
CLIENT_CORES=$(count_cpus "$CLIENT_CPUS")
WORKERS=${WORKERS:-$CORES}
# Each connection is charged its 5 MiB window + 1 MiB frame, a 1 MiB GRAY8
# mean filter about 3 MiB queued or running + 1 MiB sent: this budget
# holds the connections and one or two calls.
MEMORY_BUDGET=${MEMORY_BUDGET:-$(( (CONNECTIONS * 6 + 5) * 1024 * 1024 ))}

# start_server BUDGET: a fresh server with WORKERS workers and tenant
# "bench" allowed the whole budget; sets PORT, ADMIN, SERVER_PID.
start_server() {
  PORT=$(free_port); ADMIN=$(free_port)
  {
    echo "$CONFIG_HEAD"
    cat <<TOML
[admin]
listen = "127.0.0.1:$ADMIN"
[log]
level = "warn"
[tenancy]
memory_budget_bytes = $1
memory_wait_ms = 60000
[tenants.bench]
max_concurrent_requests = 64
max_memory_bytes = $1
TOML
  } >"$WORK/imgsvc.toml"
  IMGSVC_SERVER__WORKER_THREADS="$WORKERS" taskset -c "$SERVER_CPUS" "$BIN/imgsvc-server" --config "$WORK/imgsvc.toml" --port "$PORT" 2>"$WORK/server.log" &
  SERVER_PID=$!
  wait_port "$PORT" "$SERVER_PID" || { cat "$WORK/server.log" >&2; exit 1; }
}
stop_server() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; }

# metric NAME: the sum of every series of NAME on /metrics (0 if none).
metric() {
  curl -s --max-time 5 "http://127.0.0.1:$ADMIN/metrics" |
    awk -v n="$1" '(index($0, n "{") == 1 || index($0, n " ") == 1) { s += $NF } END { printf "%.9f\n", s + 0 }'
}

# step LABEL CONCURRENCY: one bench run; prints a row of the table. The
# calls are spread over min(CONCURRENCY, --connections) bench processes,
# one connection each (a server serves many clients; one connection's
# TLS runs on one I/O thread).
step() {
  local label="$1" c="$2"
  local qs0 qc0 mw0 cpu0 t0 qs1 qc1 mw1 cpu1 t1 load i n k pids=() client=0
  n=$(( c < CONNECTIONS ? c : CONNECTIONS ))
  qs0=$(metric imgsvc_queue_wait_seconds_sum); qc0=$(metric imgsvc_queue_wait_seconds_count)
  mw0=$(metric imgsvc_memory_waits_total); cpu0=$(cpu_ticks "$SERVER_PID"); t0=$(date +%s.%N)
  for i in $(seq 0 $((n - 1))); do
    k=$(( c / n + (i < c % n ? 1 : 0) ))
    timeout $((DURATION + 60)) taskset -c "$CLIENT_CPUS" "$BIN/imgsvc-client" bench --host 127.0.0.1 --port "$PORT" --server-name localhost \
      --ca "$WORK/pki/ca.pem" --cert "$WORK/pki/client-bench.pem" --key "$WORK/pki/client-bench-key.pem" \
      --op mean --width 1024 --height 1024 --format gray8 --concurrency "$k" --duration "$DURATION" --json \
      >"$WORK/report$i.json" 2>"$WORK/bench$i.err" &
    pids+=($!)
  done
  : >"$WORK/inflight"
  # In flight and the clients' CPU: sampled every 0.5 s while the load
  # runs (bounded: each bench has a timeout).
  while kill -0 "${pids[0]}" 2>/dev/null; do
    sleep 0.5
    if kill -0 "${pids[0]}" 2>/dev/null; then
      echo "$(metric imgsvc_in_flight_requests) $(metric imgsvc_tenant_calls_open)" >>"$WORK/inflight"
      local sum=0 child
      for child in $(pgrep -P "$(IFS=,; echo "${pids[*]}")" || true); do
        sum=$(( sum + $(cpu_ticks "$child" 2>/dev/null || echo 0) ))
      done
      [ "$sum" -gt "$client" ] && client=$sum
    fi
  done
  wait "${pids[@]}" || true
  t1=$(date +%s.%N); cpu1=$(cpu_ticks "$SERVER_PID")
  qs1=$(metric imgsvc_queue_wait_seconds_sum); qc1=$(metric imgsvc_queue_wait_seconds_count)
  mw1=$(metric imgsvc_memory_waits_total)
  load=$(cut -d' ' -f1 /proc/loadavg)
  python3 - "$WORK" "$n" "$label" "$c" "$WORKERS" "$CORES" "$TICKS" \
    "$t0" "$t1" "$cpu0" "$cpu1" "$qs0" "$qs1" "$qc0" "$qc1" "$mw0" "$mw1" "$load" "$client" "$CLIENT_CORES" <<'PY'
import json, sys
(work, n, label, c, workers, cores, ticks, t0, t1, cpu0, cpu1,
 qs0, qs1, qc0, qc1, mw0, mw1, load, client, client_cores) = sys.argv[1:]
reports = []
for i in range(int(n)):
    try:
        reports.append(json.load(open(f"{work}/report{i}.json")))
    except (OSError, ValueError):
        pass
ok = sum(r["ok"] for r in reports)
rate = sum(r["requests_per_s"] for r in reports)
# Percentiles of several runs: p50 weighted by calls, p99 the worst run's.
p50 = sum(r["p50_ms"] * r["ok"] for r in reports) / ok if ok else float("nan")
p99 = max((r["p99_ms"] for r in reports if r["ok"]), default=float("nan"))
errors = {}
for r in reports:
    for code, count in r["errors"].items():
        errors[code] = errors.get(code, 0) + count
elapsed = float(t1) - float(t0)
cpu = (float(cpu1) - float(cpu0)) / float(ticks) / elapsed / int(cores) * 100
dc = float(qc1) - float(qc0)
wait_ms = (float(qs1) - float(qs0)) / dc * 1000 if dc > 0 else 0.0
samples = [[float(x) for x in line.split()] for line in open(f"{work}/inflight")]
def mean_per_worker(i):
    return sum(s[i] for s in samples) / len(samples) / int(workers) if samples else float("nan")
per_worker, open_per_worker = mean_per_worker(0), mean_per_worker(1)
# The clients' ticks are read last 0.5 s or less before they end.
run = max((r["elapsed_s"] for r in reports), default=elapsed)
client_cpu = float(client) / float(ticks) / run / int(client_cores) * 100
err = ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "0"
print(f"{label:<8} {int(c):>3} {rate:>8.1f} {p50:>8.1f} "
      f"{p99:>8.1f} {cpu:>7.0f} {client_cpu:>7.0f} {wait_ms:>9.1f} {per_worker:>9.2f} {open_per_worker:>7.2f} "
      f"{(float(mw1) - float(mw0)) / elapsed:>8.1f} {load:>6}  {err}")
PY
}

{
  echo "# benches/saturation.sh --duration $DURATION --connections $CONNECTIONS --workers $WORKERS --steps \"$STEPS\" --memory-budget $MEMORY_BUDGET"
  echo "# $(date -u +%Y-%m-%dT%H:%MZ), tree $(git -C "$ROOT" rev-parse --short HEAD), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# load: imgsvc-client bench --op mean --width 1024 --height 1024 --format gray8 --duration $DURATION, C calls at once spread over min(C, $CONNECTIONS) processes (one connection each)"
  echo "# server on cores $SERVER_CPUS with $WORKERS workers, client on cores $CLIENT_CPUS (taskset)"
  echo "# cpu: server utime+stime as % of its $CORES cores; client_%: the same for the client; wait: mean queue wait (ms);"
  echo "# inflight/w: mean imgsvc_in_flight_requests / $WORKERS workers (calls in their handler); open/w: mean imgsvc_tenant_calls_open / workers"
  echo "# (calls admitted at their headers, answer not yet sent: includes calls waiting for memory);"
  echo "# memwaits/s: rate of imgsvc_memory_waits_total; load1: load average after the step; err: failed calls"
  printf '%-8s %3s %8s %8s %8s %7s %7s %9s %9s %7s %8s %6s  %s\n' step c calls/s p50_ms p99_ms cpu_% client_% wait_ms inflight/w open/w memwait/s load1 err
  start_server $((1024 * 1024 * 1024))
  for c in $STEPS; do step cpu "$c"; done
  stop_server
  start_server "$MEMORY_BUDGET"
  step memory 8
  stop_server
} 2>&1 | tee "$OUT"
echo "written: $OUT"
