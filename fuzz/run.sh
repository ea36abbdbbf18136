#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (AddressSanitizer + UndefinedBehaviorSanitizer, and
# LeakSanitizer at exit) in build-fuzz/ and runs each one for SECONDS (default 60), starting
# from its seed corpus in fuzz/corpus/<target>/. Fails on any crash, sanitizer report, leak,
# timeout (a single input taking over 10 s) or out-of-memory (over 2 GiB).
#
#   bash fuzz/run.sh [SECONDS] [TARGET...]
#
# New inputs found go to build-fuzz/corpus/<target>/ (not the repository); a failing input is
# saved as build-fuzz/artifacts/<target>-crash-<sha1> (reproduce: build-fuzz/fuzz/fuzz_<target>
# <that file>). A summary table (executions, corpus size, coverage) ends the output and is also
# written to build-fuzz/summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(idx idx_gz csv safetensors explain model_spec)
build=${CHAINGRAD_FUZZ_BUILD:-build-fuzz}

for tool in clang clang++; do
  command -v "$tool" >/dev/null || { echo "fuzz/run.sh: $tool is missing (bash scripts/deps.sh test)" >&2; exit 1; }
done

CC=clang CXX=clang++ cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCHAINGRAD_BUILD_FUZZ=ON \
  -DCHAINGRAD_SANITIZE=ON -DCHAINGRAD_NATIVE=OFF -DCHAINGRAD_BUILD_TESTS=OFF -DCHAINGRAD_BUILD_BENCH=OFF \
  -DCHAINGRAD_BUILD_EXAMPLES=OFF -DCHAINGRAD_BUILD_CLI=OFF >/dev/null
cmake --build "$build" -j"${CHAINGRAD_FUZZ_JOBS:-2}" --target $(printf 'fuzz_%s ' "${targets[@]}")

mkdir -p "$build/artifacts"
summary="$build/summary.md"
{
  echo "| target | seconds | executions | exec/s | seed inputs | corpus after | coverage (edges) | result |"
  echo "|---|---|---|---|---|---|---|---|"
} >"$summary"
failed=()
for t in "${targets[@]}"; do
  seeds="fuzz/corpus/$t"
  work="$build/corpus/$t"
  mkdir -p "$work"
  log="$build/fuzz_$t.log"
  echo "== fuzz_$t: ${seconds}s from $(ls "$seeds" | wc -l) seeds" >&2
  status=0
  ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0:abort_on_error=0 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$build/fuzz/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="$build/artifacts/$t-" "$work" "$seeds" >"$log" 2>&1 || status=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo "?")
  corpus=$(ls "$work" | wc -l)
  result=ok
  if ((status != 0)); then
    result="FAILED (exit $status)"
    failed+=("$t")
    grep -E 'ERROR|SUMMARY|property failed|Test unit written|==[0-9]+==' "$log" | head -20 >&2 || true
  fi
  echo "| fuzz_$t | $seconds | $execs | $rate | $(ls "$seeds" | wc -l) | $corpus | $cov | $result |" >>"$summary"
done
cat "$summary"
if ((${#failed[@]})); then
  echo "fuzz/run.sh: failed: ${failed[*]} (logs: $build/fuzz_<target>.log, inputs: $build/artifacts/)" >&2
  exit 1
fi
