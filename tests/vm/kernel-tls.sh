#!/usr/bin/env bash
# The kernel-TLS checks that the host kernel cannot run (it has no `tls`
# module): builds the integration-test binary on the host, then, in a VM
# whose kernel has the module (tests/vm/run.sh), runs
#   1. tests/it/kernel_tls.rs, whose tests take their kernel branch there
#      (every cipher suite through the kernel, a client's KeyUpdate);
#   2. the transport-facing modules with every test server on kernel TLS.
# Exits non-zero if either fails. Takes minutes: the VM may be emulated.
#
#   tests/vm/kernel-tls.sh [MODULE_FILTER...]   (default: the list below)
set -euo pipefail
cd "$(dirname "$0")/../.."
modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=(legacy_api:: mtls:: connection_hygiene:: streaming::)
bin=$(tests/vm/it-binary.sh)
export NO_COLOR=1
echo "== kernel_tls:: in the VM" >&2
tests/vm/run.sh --timeout 900 -- "$bin" kernel_tls:: --test-threads 2
echo "== ${modules[*]} in the VM, every server on kernel TLS" >&2
IMGSVC_TLS__KERNEL_TLS=on tests/vm/run.sh --timeout 1800 -- "$bin" "${modules[@]}" --test-threads 2
