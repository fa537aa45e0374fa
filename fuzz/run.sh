#!/usr/bin/env bash
# Bounded fuzzing, as CI runs it (.ci/run) and by hand:
#
#   fuzz/run.sh [TARGET...]                         # every target when none is named, 60 s each
#   FUZZ_SECONDS=600 fuzz/run.sh                    # the full run: every target for 10 minutes
#   FUZZ_SECONDS=600 fuzz/run.sh v1_request
#   FUZZ_PROFILE=dev FUZZ_SECONDS=10 fuzz/run.sh    # what CI runs
#   FUZZ_BUILD_ONLY=1 fuzz/run.sh                   # build the targets, run none
#                                                   # (CI builds them while its tests run)
#
# Builds the targets with cargo and the coverage instrumentation flags
# cargo-fuzz 0.13 uses (libFuzzer's inline 8-bit counters, PC table,
# comparison tracing, stack depth; `--cfg fuzzing`, debug assertions and
# overflow checks), on stable Rust, with no sanitizer (stable rustc has
# none) and no tool to install first; `cargo fuzz run` works on the same
# targets for anything more (see docs/reliability.md#fuzzing).
#
# FUZZ_PROFILE=release (the default) is optimised like `cargo fuzz build
# -O`, one codegen unit per crate, so a target runs several times faster
# but the first build of every dependency with instrumentation takes about
# 7 minutes on 2 cores; FUZZ_PROFILE=dev (CI) builds in about 2 minutes and
# runs slower, which is enough to replay the committed seeds and explore
# near them. CI gives each target FUZZ_SECONDS=10 (4 targets, two at a
# time); run the full one (600 s per target) before a release and after
# changing a parser, a decoder limit or the stream reassembly.
#
# Each target runs for FUZZ_SECONDS (default 60) from its committed seeds
# (fuzz/corpus/TARGET), two at a time. New inputs go to
# fuzz/target/corpus/TARGET, never into the seeds. Exits 1 if any target
# crashed; the input is then in fuzz/artifacts/TARGET/ and the log's tail is
# printed. Each target's final libFuzzer stats are printed.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-60}
parallel=${FUZZ_PARALLEL:-2}
profile=${FUZZ_PROFILE:-release}
triple=$(rustc -vV | sed -n 's/^host: //p')

flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
flags+=" -Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Cdebug-assertions -Coverflow-checks"
case "$triple" in *-linux-*) flags+=" -Cllvm-args=-sanitizer-coverage-stack-depth" ;; esac
build=(cargo build --locked --bins --target "$triple")
case "$profile" in
    release)
        flags+=" -Ccodegen-units=1"
        build+=(--release --config 'profile.release.debug="line-tables-only"')
        out="target/$triple/release" ;;
    dev)
        # Line tables only: backtraces keep file and line, the build skips
        # full debug info (CI's build time).
        build+=(--config 'profile.dev.debug="line-tables-only"')
        out="target/$triple/debug" ;;
    *) echo "fuzz: FUZZ_PROFILE must be release or dev, not $profile" >&2; exit 2 ;;
esac

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^imgsvc-fuzz$')
fi
started=$SECONDS
# --target: RUSTFLAGS then instrument the targets and their dependencies
# but not build scripts and proc-macros (as cargo-fuzz does).
RUSTFLAGS="$flags" "${build[@]}"
echo "fuzz: built ${#targets[@]} targets ($profile) in $((SECONDS - started)) s"
if [ -n "${FUZZ_BUILD_ONLY:-}" ]; then exit 0; fi

mkdir -p target/logs
run_one() {
    local t=$1 log=target/logs/$1.log
    mkdir -p "target/corpus/$t"
    mkdir -p "artifacts/$t"
    if "$out/$t" -artifact_prefix="artifacts/$t/" "target/corpus/$t" "corpus/$t" \
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
