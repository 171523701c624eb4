#!/usr/bin/env bash
# Copies of 128 bytes or more per request of a proxy, by size and the function that made
# them: what moves of futures and request parts cost, which instruction counts only show
# as one `memcpy` line. Needs gcc, curl, wrk and binutils (addr2line).
#
#   benches/memcpy.sh PORT PATH -- COMMAND...
#   e.g. benches/memcpy.sh 19086 /1k.bin -- target/release/ifmatch --config cg.toml
#
# COMMAND must listen on 127.0.0.1:PORT in front of a backend that serves PATH. One
# connection, 3 s (DURATION). Prints copies and bytes per request, then a line per copy
# site made on (nearly) every request: how many a request, the size, the function.
set -euo pipefail
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
[[ $# -ge 4 && $3 == "--" ]] || { sed -n '2,11p' "$0"; exit 2; }
port=$1 path=$2; shift 3
bin=$(realpath "$(command -v "$1")")
url="http://127.0.0.1:$port$path"
out=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$out"' EXIT
gcc -O2 -shared -fPIC -o "$out/hist.so" "$(dirname "$0")/memcpy-hist.c" -ldl

RUST_LOG=${RUST_LOG:-warn} MEMCPY_HIST_OUT="$out/hist" LD_PRELOAD="$out/hist.so" "$@" \
    >"$out/log" 2>&1 &
pid=$!
await_answer "$url" "$out/log"
base=$(awk -v bin="$bin" '$6 == bin { print $1; exit }' "/proc/$pid/maps" | cut -d- -f1)
kill -USR2 "$pid"
n=$(timeout 60 wrk -t1 -c1 -d"${DURATION:-3s}" "$url" | awk '/requests in/ {print $1}')
kill -USR2 "$pid"
sleep 0.5
awk -v n="$n" '{ c += $1; b += $1 * $2 } END {
    printf "requests %d  copies of 128 bytes or more per request: %.1f, %.0f bytes\n", n, c / n, b / n }' \
    "$out/hist"
awk -v n="$n" '$1 / n >= 0.9' "$out/hist" | while read -r calls size at; do
    fn=$(addr2line -f -C -e "$bin" "$(printf '0x%x' $((16#$at - 16#$base)))" | head -1)
    printf '%s %s %s\n' "$(awk -v c="$calls" -v n="$n" 'BEGIN { printf "%.0f", c / n }')" "$size" "${fn:0:110}"
done | awk '{ k = $2 " " substr($0, index($0, $3)); a[k] += $1 } END { for (k in a) print a[k], k }' |
    sort -k2,2nr -k1,1nr
