#!/usr/bin/env bash
# imgsvc-server with each allocator, side by side in one run: glibc as tuned
# by src/serving/allocator.rs ("system"), jemalloc (feature `jemalloc`) and
# mimalloc (feature `mimalloc`).
#
#   benches/allocators.sh [--variants system,jemalloc,mimalloc] [--rounds N]
#                         [--duration S] [--burst-requests N] [--after S]
#                         [--budget BYTES] [--skip-build]
#
# A variant may carry allocator options after '@' ('+' between options):
# `jemalloc@oversize_threshold:0+dirty_decay_ms:3000` runs the jemalloc build
# with _RJEM_MALLOC_CONF=oversize_threshold:0,dirty_decay_ms:3000 (added to
# the options compiled in; see src/bin/imgsvc-server.rs);
# `system@MALLOC_ARENA_MAX=2` runs the glibc build with that environment.
#
# Builds the server once per variant (copies of the binary), then, round by
# round, variant after variant (interleaved, so a busy machine hurts them
# alike), starts a fresh server on 127.0.0.1 whose one tenant may hold the
# whole --budget (default 2 GiB, so that the burst's 16 calls of ~75 MB each
# all fit and the burst measures the allocator, not refusals) and measures
# with `imgsvc-client bench --api legacy`:
#  1. memory: RSS idle; a burst of --burst-requests 3840x2160 RGB rotations
#     at concurrency 16; peak RSS (VmHWM); RSS every second for --after
#     seconds (default 15) of idle afterwards;
#  2. CPU: server utime+stime (/proc/PID/stat) per request for the peer
#     scenarios of benches/compare.sh, --duration seconds each (default 10):
#     A 64x64 gray rotate c16, B 1024x1024 RGB mean c4, C 3840x2160 RGB rotate c2.
# Prints a table (median over rounds) and writes the raw lines and the table
# to benches/results/allocators_<UTC date>.txt. Loopback only; every step
# has a time bound.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VARIANTS=system,jemalloc,mimalloc
ROUNDS=2
DURATION=10
BURST=48
AFTER=15
BUDGET=$((2 << 30))
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --variants) VARIANTS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --burst-requests) BURST="$2"; shift 2 ;;
    --after) AFTER="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --skip-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
IFS=, read -r -a VARIANT_LIST <<<"$VARIANTS"

WORK="$(mktemp -d)"
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/bin"
REL="$ROOT/target/release"
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# 1. One binary per variant (same target dir: the dependencies are shared;
# cargo keeps each feature set's build of the crate apart).
for variant in "${VARIANT_LIST[@]}"; do
  v="${variant%%@*}"
  if [ -x "$WORK/bin/imgsvc-server-$v" ]; then continue; fi
  case "$v" in
    system) features=() ;;
    jemalloc|mimalloc) features=(--features "$v") ;;
    *) echo "unknown variant $v (system, jemalloc, mimalloc)" >&2; exit 2 ;;
  esac
  if [ "$BUILD" = 1 ]; then
    echo "== building imgsvc-server ($v)"
    (cd "$ROOT" && cargo build --release --locked --bin imgsvc-server "${features[@]}")
  elif [ ! -x "$ROOT/target/allocators/imgsvc-server-$v" ]; then
    echo "--skip-build: no $ROOT/target/allocators/imgsvc-server-$v from an earlier run" >&2; exit 2
  fi
  if [ "$BUILD" = 1 ]; then
    mkdir -p "$ROOT/target/allocators"
    cp "$REL/imgsvc-server" "$ROOT/target/allocators/imgsvc-server-$v"
  fi
  cp "$ROOT/target/allocators/imgsvc-server-$v" "$WORK/bin/"
done
if [ "$BUILD" = 1 ]; then
  (cd "$ROOT" && cargo build --release --locked --bin imgsvc-client --bin gen-certs)
fi

{
  bench_pki "$REL/gen-certs" "$WORK"
  cat <<TOML
[admin]
enabled = false
[tenancy]
memory_budget_bytes = $BUDGET
[tenants.bench]
max_memory_bytes = $BUDGET
[log]
level = "warn"
TOML
} >"$WORK/imgsvc.toml"

kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }
HZ="$(getconf CLK_TCK)"

start_server() {
  PORT="$(free_port)"
  local base="${1%%@*}" env=()
  if [ "$base" != "$1" ]; then
    local conf="${1#*@}"
    case "$base" in
      jemalloc) env=(_RJEM_MALLOC_CONF="${conf//+/,}") ;;
      system) IFS=+ read -r -a env <<<"$conf" ;;
      *) echo "allocator options are for jemalloc and system only: $1" >&2; exit 2 ;;
    esac
  fi
  env "${env[@]}" "$WORK/bin/imgsvc-server-$base" --config "$WORK/imgsvc.toml" --port "$PORT" >"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  wait_port "$PORT" "$SERVER_PID" && return 0
  echo "imgsvc-server ($1) did not listen on 127.0.0.1:$PORT:" >&2
  cat "$WORK/server.log" >&2
  exit 1
}
stop_server() {
  kill "$SERVER_PID"
  timeout 30 tail --pid="$SERVER_PID" -f /dev/null || kill -9 "$SERVER_PID"
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
# bench OP W H FORMAT CONCURRENCY (--requests N | --duration S): the JSON report.
bench() {
  local op=$1 w=$2 h=$3 fmt=$4 c=$5; shift 5
  # Exit 1 means some requests failed: they are in the report's errors.
  timeout 300 "$REL/imgsvc-client" bench --host 127.0.0.1 --port "$PORT" --server-name localhost \
    --ca "$WORK/pki/ca.pem" --cert "$WORK/pki/client-bench.pem" --key "$WORK/pki/client-bench-key.pem" \
    --api legacy --op "$op" --width "$w" --height "$h" --format "$fmt" --concurrency "$c" "$@" --json || [ $? = 1 ]
}

RAW="$WORK/raw.jsonl"
: >"$RAW"
for round in $(seq "$ROUNDS"); do
  for v in "${VARIANT_LIST[@]}"; do
    echo "== round $round: $v"
    start_server "$v"
    pid=$SERVER_PID
    threads="$(cat /proc/"$pid"/task/*/comm | sort | uniq -c | awk '{printf "%s%s*%s", sep, $2, $1; sep=","}')"
    idle="$(kib "$pid" VmRSS)"
    report="$(bench rotate 3840 2160 rgb8 16 --requests "$BURST")"
    hwm="$(kib "$pid" VmHWM)"
    after=()
    for _ in $(seq "$AFTER"); do sleep 1; after+=("$(kib "$pid" VmRSS)"); done
    printf '{"round":%s,"variant":"%s","kind":"burst","idle_kib":%s,"hwm_kib":%s,"after_kib":[%s],"threads":"%s","report":%s}\n' \
      "$round" "$v" "$idle" "$hwm" "$(IFS=,; echo "${after[*]}")" "$threads" "$report" >>"$RAW"
    for sc in "A rotate 64 64 gray8 16" "B mean 1024 1024 rgb8 4" "C rotate 3840 2160 rgb8 2"; do
      read -r name op w h fmt c <<<"$sc"
      t0="$(cpu_ticks "$pid")"
      report="$(bench "$op" "$w" "$h" "$fmt" "$c" --duration "$DURATION")"
      t1="$(cpu_ticks "$pid")"
      printf '{"round":%s,"variant":"%s","kind":"cpu","scenario":"%s","server_cpu_s":%s,"report":%s}\n' \
        "$round" "$v" "$name" "$(awk -v a="$t0" -v b="$t1" -v hz="$HZ" 'BEGIN{print (b-a)/hz}')" "$report" >>"$RAW"
    done
    rss_end="$(kib "$pid" VmRSS)"
    printf '{"round":%s,"variant":"%s","kind":"end","rss_kib":%s}\n' "$round" "$v" "$rss_end" >>"$RAW"
    stop_server
  done
done

OUT="$ROOT/benches/results/allocators_$(date -u +%Y-%m-%d_%H%M).txt"
mkdir -p "$(dirname "$OUT")"
python3 - "$RAW" "$OUT" "$BURST" "$AFTER" "$DURATION" "$BUDGET" <<'PY'
import json, os, statistics, sys, subprocess
raw, out, burst, after, duration, budget = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
rows = [json.loads(l) for l in open(raw)]
variants = list(dict.fromkeys(r["variant"] for r in rows))
med = lambda xs: statistics.median(xs) if xs else float("nan")
mib = lambda k: k / 1024
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
load = open("/proc/loadavg").read().split()[:3]
rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
lines = [f"machine: {cpu}, {os.cpu_count()} cores; {rustc}; load average at the end {' '.join(load)}",
         f"rounds: {max(r['round'] for r in rows)}, variants interleaved; burst: {burst} x 3840x2160 RGB rotate (legacy), c16; "
         f"tenant share {budget >> 20} MiB; CPU scenarios {duration} s each; medians over rounds (each round's value in brackets)", ""]
lines.append("| allocator | A 64x64 gray rotate c16: CPU ms/req | B 1024x1024 RGB mean c4: CPU ms/req | C 3840x2160 RGB rotate c2: CPU ms/req "
             f"| RSS idle MiB | peak RSS (VmHWM) MiB | RSS {after} s after the burst MiB | burst req/s | errors |")
lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for v in variants:
    cells = [v]
    errors = 0
    for sc in "ABC":
        per = [r["server_cpu_s"] * 1000 / max(r["report"]["ok"], 1) for r in rows if r["variant"] == v and r.get("scenario") == sc]
        errors += sum(sum(r["report"]["errors"].values()) for r in rows if r["variant"] == v and r.get("scenario") == sc)
        cells.append(f"{med(per):.3f} [{', '.join(f'{x:.3f}' for x in per)}]")
    b = [r for r in rows if r["variant"] == v and r["kind"] == "burst"]
    errors += sum(sum(r["report"]["errors"].values()) for r in b)
    for key in (lambda r: r["idle_kib"], lambda r: r["hwm_kib"], lambda r: r["after_kib"][-1]):
        xs = [mib(key(r)) for r in b]
        cells.append(f"{med(xs):.0f} [{', '.join(f'{x:.0f}' for x in xs)}]")
    cells.append(f"{med([r['report']['requests_per_s'] for r in b]):.1f}")
    cells.append(str(errors))
    lines.append("| " + " | ".join(cells) + " |")
lines.append("")
lines.append("RSS after the burst, MiB, second by second (each round):")
for r in rows:
    if r["kind"] == "burst":
        lines.append(f"  {r['variant']:9} round {r['round']}: idle {mib(r['idle_kib']):.0f}, peak {mib(r['hwm_kib']):.0f}, then "
                     + " ".join(f"{mib(k):.0f}" for k in r["after_kib"]) + f"; threads at start: {r['threads']}")
table = "\n".join(lines)
print(table)
with open(out, "w") as f:
    f.write(table + "\n\nraw (one JSON line per measurement):\n")
    f.writelines(open(raw))
print(f"\nwritten: {out}")
PY
