#!/usr/bin/env bash
# Kernel TLS on the wire, in a VM whose kernel has the `tls` module
# (tests/vm/run.sh; installs QEMU and the guest kernel as run.sh does).
# One boot runs:
#   1. tests/vm/kernel_tls_wire.py: imgsvc-server with tls.kernel_tls = "on";
#      for every suite it offers, an OpenSSL client (Python's ssl) through a
#      relay that records the server's bytes: TLS 1.2 explicit nonces unique
#      on each connection (the Finished's included), every answer decrypted
#      and exact, the record layer of each suite;
#   2. tests/it kernel_tls::, whose tests take their kernel branch there: a
#      client's KeyUpdate followed both ways and the server's sending key
#      changed at a lowered limit (tls.kernel_tls_close_after_records), or
#      on a kernel before 6.14 and in TLS 1.2 a graceful close, every call
#      answered.
# Prints the cost of each step; exits non-zero if any check fails.
#
#   tests/vm/kernel-tls-wire.sh [--profile release|ci]
# --profile ci (what .ci/run uses): the binaries of the test build, no
# release build. IMGSVC_VM_KERNEL picks the guest kernel (tests/vm/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=release
case "${1:-}" in
  --profile) profile=${2:?--profile takes release or ci} ;;
  "") ;;
  *) echo "usage: tests/vm/kernel-tls-wire.sh [--profile release|ci]" >&2; exit 2 ;;
esac
t0=$(date +%s.%N)
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)"; }
# The ci profile's binaries come with the test build (it-binary.sh runs it:
# a plain `cargo build` would unify features differently and rebuild).
[ "$profile" = ci ] || cargo build --locked --profile "$profile" --features imgsvc/otlp --bin imgsvc-server --bin gen-certs >&2
bin=$(tests/vm/it-binary.sh)
echo "build: $(since "$t0") s" >&2
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
# Under the target directory: the guest sees the host's file system, not its /tmp.
work=$(mktemp -d "$target/ktls-wire.XXXXXX")
trap 'rm -rf "$work"' EXIT
cat >"$work/run" <<INNER
set -e
echo "guest kernel: \$(uname -r); tcp_available_ulp: \$(cat /proc/sys/net/ipv4/tcp_available_ulp)"
/usr/bin/python3 $PWD/tests/vm/kernel_tls_wire.py $target/$profile/imgsvc-server $target/$profile/gen-certs $work
NO_COLOR=1 $bin kernel_tls:: --test-threads 2
INNER
t1=$(date +%s.%N)
IMGSVC_VM_TRACE=${IMGSVC_VM_TRACE:-1} tests/vm/run.sh --timeout 900 -- bash "$work/run"
echo "VM (install if needed + boot + checks): $(since "$t1") s; total $(since "$t0") s" >&2
