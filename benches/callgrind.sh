#!/usr/bin/env bash
# Instructions per request of a proxy under callgrind, besides SHA-256: the repeatable
# figure behind BENCHMARKS.md's "Instruction-count cuts". Needs valgrind and wrk.
#
#   benches/callgrind.sh PORT PATH -- COMMAND...
#   e.g. benches/callgrind.sh 19086 /1k.bin -- target/release/ifmatch --config cg.toml
#
# COMMAND must listen on 127.0.0.1:PORT in front of a backend that serves PATH. With one
# connection (CONNECTIONS=1, the default) each request takes the same path through the
# event loop and the count repeats to a few instructions; large bodies do not repeat.
# valgrind hides SHA-NI, so the software SHA-256 it runs instead is left out of the count.
# WRK_ARGS adds arguments to wrk (e.g. -H 'Cookie: ...' for a larger request head);
# WRK_ARGS="$(cat benches/browser-head.args)" sends the browser-like head of BENCHMARKS.md.
# KEEP=FILE keeps the callgrind profile there, for callgrind_annotate.
# CACHE=1 adds callgrind's cache model (32 KiB L1s, as on this VM's cores) and prints its
# L1 misses per request too: the instructions' count does not show what copies and a large
# working set cost.
set -euo pipefail
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
[[ $# -ge 4 && $3 == "--" ]] || { sed -n '2,17p' "$0"; exit 2; }
port=$1 path=$2; shift 3
url="http://127.0.0.1:$port$path"
out=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$out"' EXIT

cache=()
if [[ -n ${CACHE:-} ]]; then cache=(--cache-sim=yes); fi
RUST_LOG=${RUST_LOG:-warn} valgrind --tool=callgrind "${cache[@]}" --callgrind-out-file="$out/cg" "$@" \
    >"$out/log" 2>&1 &
pid=$!
await_answer "$url" "$out/log"
callgrind_control -z "$pid" >/dev/null 2>&1
# WRK_ARGS is parsed as shell words, so quoted header values keep their spaces.
n=$(eval "timeout 60 wrk -t1 -c\"\${CONNECTIONS:-1}\" -d\"\${DURATION:-10s}\" ${WRK_ARGS:-} \"\$url\"" |
    awk '/requests in/ {print $1}')
callgrind_control -d "$pid" >/dev/null 2>&1
sleep 1
if [[ -n ${KEEP:-} ]]; then cp "$out"/cg.* "$KEEP"; fi
callgrind_annotate --inclusive=no --threshold=100 --auto=no "$out"/cg.* 2>/dev/null |
    sed 's/,//g' | awk -v n="$n" '
    /PROGRAM TOTALS/ {
        gsub(/\([^)]*\)/, ""); split($0, t, " ")
        total = t[1]; if (t[6] ~ /^[0-9]+$/) { i1 = t[4]; d1r = t[5]; d1w = t[6] }
        next
    }
    / \(.*%\)  .*(sha2::sha256::compress256|sha2::sha256::soft)/ { sha += $1 }
    / \(.*%\)  .*__memcpy/ { memcpy += $1 }
    END {
        if (n == 0) { print "no requests"; exit 1 }
        printf "requests %d  instructions/request: %d besides SHA-256 (SHA-256 %d, memcpy %d)\n",
            n, (total - sha) / n, sha / n, memcpy / n
        if (d1r != "")
            printf "L1 misses/request: instructions %d, data reads %d, data writes %d\n",
                i1 / n, d1r / n, d1w / n
    }'
