#!/usr/bin/env bash
# Builds the integration-test binary (CI profile) and prints its path;
# shared by tests/vm/kernel-tls.sh and tests/vm/kernel-tls-wire.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(cargo test --locked --profile ci --features imgsvc/otlp --test it --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "it" and m.get("executable"):
        print(m["executable"])')
[ -x "$bin" ] || { echo "it-binary.sh: no integration-test binary from cargo" >&2; exit 1; }
echo "$bin"
