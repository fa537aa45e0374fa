#!/usr/bin/env bash
# Issue 17's table, measured in one run: server CPU per request of imgsvc
# and of the C++ gRPC + OpenCV peer, both over mutual TLS and both driven by
# the same load generator (`imgsvc-client bench --api legacy`, which speaks
# NLImageService, so it loads either server; it costs the client far less
# than the peers' Python generator, so the rate measures the server), next
# to the floor measured on this machine in the same run (benches/floor.rs:
# AES-256-GCM over every byte, one copy per direction, the kernel as two
# image copies). CPU per request is utime + stime of the server process from
# /proc/PID/stat over the measured run, divided by the calls answered: it
# does not depend on who bounds the rate.
#
#   benches/transport.sh [--peers DIR] [--duration S] [--rounds R] [--scenarios A,B,C,N] [--no-peer] [--bare] [--raw] [--kernel-tls] [--tonic-buffer] [--save FILE]
#
# --bare adds a server to each round: NLImageService on plain tonic with
# the same kernels and nothing else (examples/bare_tonic.rs), and a table,
# imgsvc against it: what imgsvc's own layers cost per call.
# --raw adds the practical floor: the same work over mutual TLS with no
# HTTP/2, gRPC or protobuf (examples/raw_tls.rs, driven by its own load
# mode, one connection per concurrent caller), and a table of what it
# spends against the floor and what imgsvc spends against it.
# --kernel-tls adds imgsvc with tls.kernel_tls = "on" (the kernel seals and
# opens the records; it needs a kernel with the `tls` module: run the
# script inside tests/vm/run.sh on a machine without) and a table of both.
#
# --tonic-buffer adds imgsvc with server.owned_message_buffer = false (the
# unary image methods' requests read by tonic's codec, as before
# 2026-12-07, instead of the admission layer's own buffer) and a table of
# both: what the owned message buffer costs or saves per call.
#
# The servers take turns for R rounds (default 3: imgsvc, the peer, imgsvc,
# the peer, ...), and the table shows each figure's median over the rounds
# with the spread of CPU per request (min-max): on this 2-core VM one run
# of a scenario varies by up to ±15 %, and alternating keeps a slow period
# from landing on one server only.
#
# DIR defaults to ../shared/peers beside the repository (its setup.sh builds
# the C++ peer under ${IMGSVC_PEERS_HOME:-$HOME/.cache/imgsvc-peers}).
# Loopback only. Wants a quiet machine: it says when the load average is
# high. Output: a Markdown table on stdout, the raw JSON under
# benches/results/ when --save is given.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="$ROOT/../shared/peers"
DURATION=10
ROUNDS=3
SCENARIOS=A,B,C,N
PEER=1
BARE=0
RAW=0
KTLS=0
TONIC_BUFFER=0
SAVE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --peers) PEERS="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --scenarios) SCENARIOS="$2"; shift 2 ;;
    --no-peer) PEER=0; shift ;;
    --bare) BARE=1; shift ;;
    --raw) RAW=1; shift ;;
    --kernel-tls) KTLS=1; shift ;;
    --tonic-buffer) TONIC_BUFFER=1; shift ;;
    --save) SAVE="$2"; shift 2 ;;
    -h|--help) sed -n '2,41p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
PEERS_HOME="$(realpath -m "${IMGSVC_PEERS_HOME:-$HOME/.cache/imgsvc-peers}")"
TICK=$(getconf CLK_TCK)
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

echo "== building imgsvc (release) and measuring the floor" >&2
(cd "$ROOT" && cargo build --release --locked --bins)
if [ "$BARE" = 1 ]; then (cd "$ROOT" && cargo build --release --locked --example bare_tonic); fi
if [ "$RAW" = 1 ]; then (cd "$ROOT" && cargo build --release --locked --example raw_tls); fi
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
(cd "$ROOT" && cargo bench --locked --bench floor) >"$WORK/floor.jsonl"
if [ "$PEER" = 1 ]; then
  echo "== C++ peer setup (idempotent)" >&2
  "$PEERS/setup.sh" >/dev/null
fi
load=$(cut -d' ' -f1 /proc/loadavg)
echo "== load average $load on $(nproc) cores (the figures want a quiet machine)" >&2

PKI="$WORK/pki"
{
  bench_pki "$ROOT/target/release/gen-certs" "$WORK"
  printf '[tenants.bench]\n[log]\nlevel = "warn"\n'
} >"$WORK/imgsvc.toml"

# tag: bench arguments (the peers' scenarios A, B, C, N)
scenario_args() {
  case "$1" in
    A) echo "--op rotate --width 64 --height 64 --format gray8 --concurrency 16" ;;
    B) echo "--op mean --width 1024 --height 1024 --format rgb8 --concurrency 4" ;;
    C) echo "--op rotate --width 3840 --height 2160 --format rgb8 --concurrency 2" ;;
    N) echo "--op none --width 1024 --height 1024 --format rgb8 --concurrency 4" ;;
    *) echo "unknown scenario $1" >&2; exit 2 ;;
  esac
}

# The same scenarios for examples/raw_tls: OP WIDTH HEIGHT CHANNELS CONCURRENCY
raw_args() {
  case "$1" in
    A) echo "rotate 64 64 1 16" ;;
    B) echo "mean 1024 1024 3 4" ;;
    C) echo "rotate 3840 2160 3 2" ;;
    N) echo "none 1024 1024 3 4" ;;
  esac
}

# load LABEL TAG PORT SECONDS: one load run, its JSON report on stdout
load() {
  if [ "$1" = raw-tls ]; then
    # shellcheck disable=SC2046
    "$ROOT/target/release/examples/raw_tls" load "$3" "$PKI/ca.pem" "$PKI/client-bench.pem" "$PKI/client-bench-key.pem" $(raw_args "$2") "$4"
  else
    # shellcheck disable=SC2046
    "$ROOT/target/release/imgsvc-client" bench --api legacy --host 127.0.0.1 --port "$3" --server-name localhost \
      --ca "$PKI/ca.pem" --cert "$PKI/client-bench.pem" --key "$PKI/client-bench-key.pem" $(scenario_args "$2") --duration "$4" --json
  fi
}

# measure LABEL PID PORT ROUND: one JSON line per scenario into $WORK/runs.jsonl
measure() {
  local label=$1 pid=$2 port=$3 round=$4 tag
  for tag in ${SCENARIOS//,/ }; do
    load "$label" "$tag" "$port" 2 >/dev/null # warm-up
    local before after
    before=$(cpu_ticks "$pid")
    load "$label" "$tag" "$port" "$DURATION" >"$WORK/run.json"
    after=$(cpu_ticks "$pid")
    python3 - "$label" "$tag" "$before" "$after" "$TICK" "$WORK/run.json" "$round" >>"$WORK/runs.jsonl" <<'PY'
import json, sys
label, tag, before, after, tick, path, rnd = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], int(sys.argv[7])
r = json.load(open(path))
cpu_ms = (after - before) * 1000 / tick
print(json.dumps({"label": label, "scenario": tag, "round": rnd, "ok": r["ok"], "errors": sum(r["errors"].values()),
                  "rps": r["requests_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                  "server_cpu_ms_per_req": cpu_ms / max(r["ok"], 1)}))
PY
    echo "   $label $tag: $(tail -n1 "$WORK/runs.jsonl")" >&2
  done
}

if [ "$PEER" = 1 ]; then
  BIN="$PEERS_HOME/cpp-build/nl_image_server"
  [ -x "$BIN" ] || { echo "no $BIN after $PEERS/setup.sh" >&2; exit 1; }
fi
# serve LABEL DESCRIPTION COMMAND...: starts one server (COMMAND gets the
# port as $PORT through the environment), measures it, stops it.
serve() {
  local label=$1 desc=$2
  shift 2
  PORT=$(free_port)
  PORT=$PORT "$@" &
  PIDS+=($!)
  wait_port "$PORT" "${PIDS[-1]}"
  echo "== $desc, round $round of $ROUNDS" >&2
  measure "$label" "${PIDS[-1]}" "$PORT" "$round"
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
}
# shellcheck disable=SC2016 # $PORT is expanded by the server's shell, in serve
for round in $(seq "$ROUNDS"); do
  serve imgsvc imgsvc sh -c 'exec "$0" --config "$1" --port "$PORT"' "$ROOT/target/release/imgsvc-server" "$WORK/imgsvc.toml"
  if [ "$KTLS" = 1 ]; then
    serve imgsvc-ktls "imgsvc with kernel TLS" env IMGSVC_TLS__KERNEL_TLS=on \
      sh -c 'exec "$0" --config "$1" --port "$PORT"' "$ROOT/target/release/imgsvc-server" "$WORK/imgsvc.toml"
  fi
  if [ "$TONIC_BUFFER" = 1 ]; then
    serve imgsvc-tonic-buffer "imgsvc with tonic's request buffer" env IMGSVC_SERVER__OWNED_MESSAGE_BUFFER=false \
      sh -c 'exec "$0" --config "$1" --port "$PORT"' "$ROOT/target/release/imgsvc-server" "$WORK/imgsvc.toml"
  fi
  if [ "$PEER" = 1 ]; then
    serve cpp-opencv "C++ gRPC + OpenCV peer" sh -c 'exec "$0" --host 127.0.0.1 --port "$PORT" --tls-cert "$1" --tls-key "$2" --client-ca "$3" >/dev/null 2>&1' \
      "$BIN" "$PKI/server.pem" "$PKI/server-key.pem" "$PKI/ca.pem"
  fi
  if [ "$BARE" = 1 ]; then
    serve tonic-bare "bare tonic" sh -c 'exec "$0" "$PORT" "$1" "$2" "$3"' \
      "$ROOT/target/release/examples/bare_tonic" "$PKI/server.pem" "$PKI/server-key.pem" "$PKI/ca.pem"
  fi
  if [ "$RAW" = 1 ]; then
    serve raw-tls "raw TLS (the practical floor)" sh -c 'exec "$0" serve "$PORT" "$1" "$2" "$3"' \
      "$ROOT/target/release/examples/raw_tls" "$PKI/server.pem" "$PKI/server-key.pem" "$PKI/ca.pem"
  fi
done

if [ -n "$SAVE" ]; then
  cat "$WORK/floor.jsonl" "$WORK/runs.jsonl" >"$SAVE"
  echo "== raw figures: $SAVE" >&2
fi
python3 - "$WORK/floor.jsonl" "$WORK/runs.jsonl" "$load" "$ROUNDS" <<'PY'
import json, sys, os
from statistics import median
floor = {r["scenario"]: r for r in map(json.loads, open(sys.argv[1]))}
rounds = {}
for r in map(json.loads, open(sys.argv[2])):
    rounds.setdefault((r["label"], r["scenario"]), []).append(r)
# Each figure: its median over the rounds (errors: the total).
runs = {key: {"rps": median(x["rps"] for x in rs), "p99_ms": median(x["p99_ms"] for x in rs),
              "server_cpu_ms_per_req": median(x["server_cpu_ms_per_req"] for x in rs),
              "cpu_min": min(x["server_cpu_ms_per_req"] for x in rs), "cpu_max": max(x["server_cpu_ms_per_req"] for x in rs),
              "errors": sum(x["errors"] for x in rs)} for key, rs in rounds.items()}
any_floor = next(iter(floor.values()))
print(f"{os.cpu_count()} cores, load average {sys.argv[3]} at the start, medians of {sys.argv[4]} alternating rounds; "
      f"AES-256-GCM {any_floor['aes_gcm_bytes_per_s']/1e9:.2f} GB/s, memcpy {any_floor['memcpy_bytes_per_s']/1e9:.2f} GB/s (one core)")
print()
print("| scenario | imgsvc req/s | imgsvc ms CPU/req (min-max) | C++ peer req/s | C++ peer ms CPU/req (min-max) | floor ms | imgsvc / floor | imgsvc / floor (copies from memory) | C++ / imgsvc CPU | p99 imgsvc vs C++ ms | errors |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
def cpu(r):
    return f"{r['server_cpu_ms_per_req']:.3f} ({r['cpu_min']:.3f}-{r['cpu_max']:.3f})"
for tag in sorted({s for _, s in runs}):
    me, peer, fl = runs.get(("imgsvc", tag)), runs.get(("cpp-opencv", tag)), floor[tag]
    if not me:
        continue
    peer_cpu = cpu(peer) if peer else "-"
    peer_rps = f"{peer['rps']:.1f}" if peer else "-"
    ratio = f"{peer['server_cpu_ms_per_req'] / me['server_cpu_ms_per_req']:.2f}x" if peer else "-"
    p99 = f"{me['p99_ms']:.1f} vs {peer['p99_ms']:.1f}" if peer else f"{me['p99_ms']:.1f}"
    errors = me["errors"] + (peer["errors"] if peer else 0)
    mine = me['server_cpu_ms_per_req']
    print(f"| {tag} {fl['desc']} | {me['rps']:.1f} | {cpu(me)} | {peer_rps} | {peer_cpu} | {fl['floor_ms']:.3f} | "
          f"**{mine / fl['floor_ms']:.2f}x** | {mine / fl['floor_dram_ms']:.2f}x | {ratio} | {p99} | {errors} |")
def versus(label, name):
    """imgsvc against another server of the same round, scenario by scenario."""
    if not any(l == label for l, _ in runs):
        return
    print()
    print(f"| scenario | imgsvc ms CPU/req | {name} ms CPU/req (min-max) | imgsvc / {name} | {name} / floor | req/s imgsvc vs {name} | p99 imgsvc vs {name} ms |")
    print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    for tag in sorted({s for _, s in runs}):
        me, other, fl = runs.get(("imgsvc", tag)), runs.get((label, tag)), floor[tag]
        if not (me and other):
            continue
        print(f"| {tag} {fl['desc']} | {me['server_cpu_ms_per_req']:.3f} | {cpu(other)} | "
              f"{me['server_cpu_ms_per_req'] / other['server_cpu_ms_per_req']:.2f}x | "
              f"{other['server_cpu_ms_per_req'] / fl['floor_ms']:.2f}x | {me['rps']:.1f} vs {other['rps']:.1f} | "
              f"{me['p99_ms']:.1f} vs {other['p99_ms']:.1f} |")
versus("tonic-bare", "bare tonic")
versus("imgsvc-ktls", "kernel TLS")
versus("imgsvc-tonic-buffer", "tonic's buffer")
if any(label == "raw-tls" for label, _ in runs):
    print()
    print("| scenario | raw TLS ms CPU/req (min-max) | raw TLS / floor | imgsvc / raw TLS | bare tonic / raw TLS | C++ peer / raw TLS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    def over(other, raw):
        return f"{other['server_cpu_ms_per_req'] / raw['server_cpu_ms_per_req']:.2f}x" if other else "-"
    for tag in sorted({s for _, s in runs}):
        raw, fl = runs.get(("raw-tls", tag)), floor[tag]
        if not raw:
            continue
        print(f"| {tag} {fl['desc']} | {cpu(raw)} | {raw['server_cpu_ms_per_req'] / fl['floor_ms']:.2f}x | "
              f"{over(runs.get(('imgsvc', tag)), raw)} | {over(runs.get(('tonic-bare', tag)), raw)} | {over(runs.get(('cpp-opencv', tag)), raw)} |")
PY
