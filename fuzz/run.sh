#!/usr/bin/env bash
# Bounded fuzzing, as CI runs it (.ci/run) and by hand:
#
#   fuzz/run.sh [TARGET...]          # every target when none is named, 60 s each
#   FUZZ_SECONDS=600 fuzz/run.sh     # the full run: every target for 10 minutes
#   FUZZ_SECONDS=600 fuzz/run.sh v1_request
#
# CI gives each target FUZZ_SECONDS=20 (4 targets, two at a time: 40 s of
# fuzzing) to keep the whole of .ci/run under 10 minutes on 2 cores; it
# catches regressions on the committed seeds and their near neighbours.
# Run the full one (60 s or more per target) before a release and after
# changing a parser, a decoder limit or the stream reassembly.
#
# Installs cargo-fuzz (pinned) into ~/.cache/imgsvc if missing, builds the
# targets on stable Rust (--sanitizer none: stable rustc has no sanitizers;
# libFuzzer's coverage instrumentation works, and the build keeps debug
# assertions and overflow checks), then runs each target for FUZZ_SECONDS
# (default 60) from its committed seeds (fuzz/corpus/TARGET), two at a time.
# New inputs go to fuzz/target/corpus/TARGET, never into the seeds. Exits 1
# if any target crashed; the input is then in fuzz/artifacts/TARGET/ and the
# log's tail is printed. Each target's final libFuzzer stats are printed.
set -euo pipefail
cd "$(dirname "$0")"

CARGO_FUZZ_VERSION=0.13.2
seconds=${FUZZ_SECONDS:-60}
parallel=${FUZZ_PARALLEL:-2}
tools="${XDG_CACHE_HOME:-$HOME/.cache}/imgsvc/cargo-fuzz-$CARGO_FUZZ_VERSION"
if ! "$tools/bin/cargo-fuzz" --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION into $tools"
    cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION" --root "$tools"
fi
export PATH="$tools/bin:$PATH"

# cargo fuzz has no --locked: check the committed lock file is current first.
cargo metadata --locked --format-version 1 >/dev/null

if [ "$#" -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
started=$SECONDS
cargo fuzz build --sanitizer none
echo "fuzz: built ${#targets[@]} targets in $((SECONDS - started)) s"

mkdir -p target/logs
run_one() {
    local t=$1 log=target/logs/$1.log
    mkdir -p "target/corpus/$t"
    if cargo fuzz run --sanitizer none "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
        -print_final_stats=1 >"$log" 2>&1; then
        echo "fuzz: $t ok: $(grep -E '^stat::number_of_executed_units' "$log" | tr -d ' '), $(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$log")"
    else
        echo "fuzz: $t FAILED (crash input under fuzz/artifacts/$t/); end of $log:"
        tail -n 40 "$log"
        touch "target/logs/$t.failed"
    fi
}

rm -f target/logs/*.failed
for t in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n || true; done
    run_one "$t" &
done
wait
echo "fuzz: ${#targets[@]} targets, ${seconds} s each, total $((SECONDS - started)) s"
if compgen -G "target/logs/*.failed" >/dev/null; then exit 1; fi
