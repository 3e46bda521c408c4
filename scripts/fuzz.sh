#!/usr/bin/env bash
# Run every fuzz target in fuzz/ for a bounded time: scripts/fuzz.sh [SECONDS] (per target,
# default 60). Fails on any crash, timeout or out-of-memory, printing the input's path and
# the command that reproduces it.
#
# Needs neither nightly nor cargo-fuzz: libfuzzer-sys only needs the coverage
# instrumentation, which stable rustc does with the flags below (cargo-fuzz's, without
# AddressSanitizer: the gateway has no unsafe code). Builds fuzz/ in release mode with debug
# assertions and overflow checks, for the host triple, so build scripts and proc macros stay
# uninstrumented. The build lands in $CARGO_TARGET_DIR (default fuzz/target).
#
# Environment:
#   LMQ_FUZZ_CORPUS  corpus root, one directory per target, kept between runs
#                    (default ~/.cache/lmq-fuzz); the seeds in fuzz/seeds/<target> are read too
#   LMQ_FUZZ_JOBS    targets run at once (default: number of CPUs)
#   LMQ_FUZZ_TARGETS targets to run (default: every fuzz/fuzz_targets/*.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SECS=${1:-60}
[[ $SECS =~ ^[0-9]+$ && $SECS -gt 0 ]] || {
  echo "usage: $0 [SECONDS per target]" >&2
  exit 2
}
CORPUS=${LMQ_FUZZ_CORPUS:-$HOME/.cache/lmq-fuzz}
JOBS=${LMQ_FUZZ_JOBS:-$(nproc)}
if [ -n "${LMQ_FUZZ_TARGETS:-}" ]; then
  read -ra TARGETS <<<"$LMQ_FUZZ_TARGETS"
else
  TARGETS=()
  for f in fuzz/fuzz_targets/*.rs; do TARGETS+=("$(basename "$f" .rs)"); done
fi

HOST=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/fuzz/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
BIN_DIR=$TARGET_DIR/$HOST/release

echo "building fuzz targets (${TARGETS[*]}) for $HOST"
(cd fuzz && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --locked --target "$HOST" --bins)

LOGS=$(mktemp -d -t lmq-fuzz.XXXXXX)
trap 'rm -rf "$LOGS"' EXIT

# run TARGET: fuzz it for SECS seconds; libFuzzer's exit status goes to $LOGS/TARGET.rc.
run() {
  local t=$1 rc=0
  mkdir -p "$CORPUS/$t" "$CORPUS/artifacts/$t"
  # -rss_limit_mb: far above any target's need, below the machine's; -timeout: one input
  # taking this long is a hang (the async targets end stalled exchanges at once).
  "$BIN_DIR/$t" "$CORPUS/$t" "fuzz/seeds/$t" \
    -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$CORPUS/artifacts/$t/" >"$LOGS/$t.log" 2>&1 || rc=$?
  echo "$rc" >"$LOGS/$t.rc"
}

for t in "${TARGETS[@]}"; do
  [ -f "fuzz/fuzz_targets/$t.rs" ] || {
    echo "no fuzz target $t" >&2
    exit 2
  }
  while (($(jobs -rp | wc -l) >= JOBS)); do wait -n || true; done
  echo "fuzzing $t for ${SECS}s (corpus $CORPUS/$t)"
  run "$t" &
done
wait

failed=0
for t in "${TARGETS[@]}"; do
  rc=$(cat "$LOGS/$t.rc")
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOGS/$t.log" | tail -1)
  corpus=$(find "$CORPUS/$t" -type f | wc -l)
  if [ "$rc" = 0 ]; then
    printf '%-8s ok: %s runs, corpus %s inputs\n' "$t" "${execs:-?}" "$corpus"
    continue
  fi
  failed=1
  cp "$LOGS/$t.log" "$CORPUS/artifacts/$t/last-failed-run.log"
  echo "=== $t FAILED (exit $rc); end of its log ($CORPUS/artifacts/$t/last-failed-run.log):"
  tail -n 40 "$LOGS/$t.log"
  input=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$LOGS/$t.log" | tail -1)
  if [ -n "$input" ]; then
    echo "input: $input"
    echo "reproduce: $BIN_DIR/$t $input"
  fi
done
exit $failed
