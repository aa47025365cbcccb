#!/bin/bash
# Runs the fuzz targets with the bounds docs/testing.md records, one after the other, and
# prints executions, time, corpus size and findings per target.
#
#   fuzz/run.sh [PEER_DATA]            every target with the recorded number of runs
#   TARGETS="cpuset:100000" fuzz/run.sh  chosen targets and runs (target:runs, space-separated)
#
# Needs `cargo install cargo-fuzz` and a nightly toolchain. The seed corpus is built from
# PEER_DATA (default ../shared/peer-data beside the project) into fuzz/corpus/ (git-ignored)
# when that is absent; findings go to fuzz/artifacts/<target>/ (git-ignored).
set -u
cd "$(dirname "$0")"
peer=${1:-../../shared/peer-data}
: "${TARGETS:=cpuset:4000000 procstat:3000000 vmconfig:2000000 profile:1000000 ledger:1000000 qmp:400000}"

# The largest input each target is given: the bound the parser itself enforces, or 1 MiB.
max_len() {
    case $1 in
        cpuset) echo 70000 ;;     # 2 bytes of nbits + MAX_LIST_BYTES (64 KiB) and some
        procstat) echo 4200 ;;    # MAX_STAT_BYTES (4096) and some
        profile) echo 1048577 ;;  # MAX_PROFILE_BYTES (1 MiB) + 1
        *) echo 1048576 ;;
    esac
}
# qmp: LeakSanitizer is off; its peer thread lives for the whole process, and glibc's
# record of a thread-local destructor (32 bytes, freed at thread exit) was reported once as a
# leak. A leak is not among the checks (crash, panic, allocation over 1 GiB, RSS over 1 GiB).
extra() { [ "$1" = qmp ] && echo -detect_leaks=0; }

[ -d corpus ] || python3 seed-corpus.py "$peer" corpus || exit 1
cargo +nightly fuzz build -O -a || exit 1
status=0
printf '%-9s %12s %7s %12s %11s %s\n' target executions seconds files_before files_after findings
for spec in $TARGETS; do
    t=${spec%%:*} runs=${spec#*:}
    mkdir -p "artifacts/$t" "corpus/$t"
    before=$(ls "corpus/$t" | wc -l)
    start=$(date +%s)
    cargo +nightly fuzz run -O -a "$t" "corpus/$t" -- -runs="$runs" -rss_limit_mb=1024 \
        -malloc_limit_mb=1024 -max_len="$(max_len "$t")" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" $(extra "$t") > "artifacts/$t.log" 2>&1 || status=1
    secs=$(( $(date +%s) - start ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "artifacts/$t.log")
    printf '%-9s %12s %7s %12s %11s %s\n' "$t" "${execs:-?}" "$secs" "$before" \
        "$(ls "corpus/$t" | wc -l)" "$(ls "artifacts/$t" | wc -l) (log: fuzz/artifacts/$t.log)"
done
# The ledger and qmp targets make a fixture dir per process, named by its pid (they exit
# through libFuzzer's exit(), so they cannot remove it themselves): remove those whose process
# is gone, never one of a run still going.
for d in /dev/shm/pvetune-fuzz-ledger-* "${TMPDIR:-/tmp}"/pvetune-fuzz-ledger-* \
    "${TMPDIR:-/tmp}"/pvetune-fuzz-qmp-*; do
    [ -d "$d" ] && ! kill -0 "${d##*-}" 2>/dev/null && rm -rf "$d"
done
exit $status
