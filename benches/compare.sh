#!/usr/bin/env bash
# Side by side: imgsvc vs the C++ gRPC + OpenCV peer vs the original Python
# design, all over mutual TLS, all driven by the peers' own grpcio load
# generator (run_scenarios.sh: scenarios A, B, C, N), back to back in one run,
# then one table of ratios.
#
#   benches/compare.sh [--peers DIR] [--duration S] [--scenarios A,B,C,N]
#                      [--skip-python] [--wait-quiet S]
#
# DIR defaults to ../shared/peers beside the repository. The peers are used
# read-only; their setup (venv, C++ build) goes under
# ${IMGSVC_PEERS_HOME:-$HOME/.cache/imgsvc-peers}. Loopback only.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="$ROOT/../shared/peers"
DURATION=20
SCENARIOS=A,B,C,N
PYTHON_PEER=1
WAIT_QUIET=120
while [ $# -gt 0 ]; do
  case "$1" in
    --peers) PEERS="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --scenarios) SCENARIOS="$2"; shift 2 ;;
    --skip-python) PYTHON_PEER=0; shift ;;
    --wait-quiet) WAIT_QUIET="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
PEERS="$(cd "$PEERS" && pwd)"
PEERS_HOME="$(realpath -m "${IMGSVC_PEERS_HOME:-$HOME/.cache/imgsvc-peers}")"

echo "== building imgsvc (release)"
(cd "$ROOT" && cargo build --release --locked --bins)
echo "== peers setup (idempotent)"
"$PEERS/setup.sh" >/dev/null

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$ROOT/target/release/gen-certs" --out "$WORK/pki" --tenant bench >/dev/null
cat > "$WORK/imgsvc.toml" <<TOML
# TLS paths come from the runner's placeholders, through IMGSVC_TLS__*.
[server]
host = "127.0.0.1"
[tls]
cert = "unused"
key = "unused"
client_ca = "unused"
[tenants.bench]
[log]
level = "warn"
TOML
OUT="$PEERS_HOME/results/compare-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
mkdir -p "$(dirname "$OUT")"
COMMON=(--ca "$WORK/pki/ca.pem" --cert "$WORK/pki/client-bench.pem" --key "$WORK/pki/client-bench-key.pem"
        --server-cert "$WORK/pki/server.pem" --server-key "$WORK/pki/server-key.pem" --server-name localhost
        --duration "$DURATION" --scenarios "$SCENARIOS" --out "$OUT" --wait-quiet "$WAIT_QUIET")

status=0
echo "== imgsvc"
printf -v IMGSVC_CMD 'IMGSVC_TLS__CERT={cert} IMGSVC_TLS__KEY={key} IMGSVC_TLS__CLIENT_CA={ca} %q --config %q --port {port}' \
  "$ROOT/target/release/imgsvc-server" "$WORK/imgsvc.toml"
bash "$PEERS/run_scenarios.sh" --label imgsvc --server-cmd "$IMGSVC_CMD" "${COMMON[@]}" || status=1
echo "== C++ gRPC + OpenCV"
bash "$PEERS/run_cpp_peer.sh" "${COMMON[@]}" || status=1
if [ "$PYTHON_PEER" = 1 ]; then
  echo "== Python design"
  bash "$PEERS/run_python_peer.sh" "${COMMON[@]}" || status=1
fi

echo "== results: $OUT"
"$PEERS_HOME/venv/bin/python" - "$OUT" <<'PY'
import json, sys, platform, os
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {(r["label"], r["scenario"]): r for r in rows}
labels = ["imgsvc", "cpp-opencv", "python-seed"]
cpu = "unknown"
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except Exception:
    pass
print(f"machine: {cpu}, {os.cpu_count()} cores")
print("| scenario | server | req/s | p50 ms | p99 ms | server CPU ms/req | errors | other CPU % |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for sc in sorted({r["scenario"] for r in rows}):
    for lb in labels:
        r = by.get((lb, sc))
        if r:
            print(f"| {sc} {r['scenario_desc']} | {lb} | {r['rps']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_cpu_ms_per_req']:.3f} | {sum(r['errors'].values())} | {r.get('other_cpu_pct', 0):.0f} |")
print()
print("| scenario | imgsvc / C++ req/s | C++ / imgsvc server CPU per req | imgsvc / Python req/s | p99 imgsvc vs C++ |")
print("| --- | --- | --- | --- | --- |")
for sc in sorted({r["scenario"] for r in rows}):
    me, cpp, py = by.get(("imgsvc", sc)), by.get(("cpp-opencv", sc)), by.get(("python-seed", sc))
    if not me:
        continue
    f = lambda a, b: f"{a/b:.2f}x" if a and b else "-"
    print(f"| {sc} | {f(me['rps'], cpp and cpp['rps'])} | {f(cpp and cpp['server_cpu_ms_per_req'], me['server_cpu_ms_per_req'])} | "
          f"{f(me['rps'], py and py['rps'])} | {me['p99_ms']:.1f} vs {cpp['p99_ms'] if cpp else float('nan'):.1f} ms |")
PY
exit $status
