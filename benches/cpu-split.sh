#!/usr/bin/env bash
# User and kernel CPU time per request of each proxy, pinned as `run.sh --pin` pins them:
# wrk and the backend (127.0.0.1:19081) on CPU 0, every proxy on CPU 1. The figures behind
# BENCHMARKS.md's "User and kernel time per request". Needs wrk, taskset and ss.
#
#   benches/cpu-split.sh ROUNDS PATH NAME=PORT...
#   e.g. benches/cpu-split.sh 5 /1k.bin ifmatch=19080 nginx=19082
#
# Each round runs `wrk -t1 -c4 -d5s` against each proxy in turn and reads the utime and
# stime of the process listening on its port from /proc before and after (clock ticks of
# 10 ms: about 1% of a 5 s run). Where a master and its worker both hold the socket (nginx),
# the worker is measured. Affinities are left as set.
set -euo pipefail
[[ $# -ge 3 ]] || { sed -n '2,11p' "$0"; exit 2; }
rounds=$1 path=$2; shift 2

listener() { # the pids listening on port $1, one per line
    ss -H -ltnp "sport = :$1" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u
}
worker() { # of the pids listening on port $1, the one that is no other's parent
    local pids p
    pids=$(listener "$1")
    for p in $pids; do
        grep -qx "$p" < <(for q in $pids; do ps -o ppid= -p "$q" | tr -d ' '; done) || echo "$p"
    done
}
ticks() { # utime and stime of pid $1
    awk '{print $14, $15}' "/proc/$1/stat"
}

for pid in $(listener 19081); do taskset -a -p -c 0 "$pid" >/dev/null; done
declare -A PID
for t in "$@"; do
    port=${t#*=}
    pids=$(worker "$port")
    [[ $(wc -w <<<"$pids") == 1 ]] || { echo "port $port: want one worker, got: ${pids:-none}"; exit 1; }
    PID[$t]=$pids
    taskset -a -p -c 1 "$pids" >/dev/null
done

printf '%-12s %5s %9s %9s %9s %9s %8s\n' proxy round 'req/s' 'user µs' 'sys µs' 'total µs' p99
for r in $(seq "$rounds"); do
    for t in "$@"; do
        name=${t%%=*} port=${t#*=} pid=${PID[$t]}
        read -r u0 s0 < <(ticks "$pid")
        out=$(taskset -c 0 wrk -t1 -c4 -d5s --latency "http://127.0.0.1:$port$path")
        read -r u1 s1 < <(ticks "$pid")
        n=$(awk '/requests in/ {print $1}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
        awk -v name="$name" -v r="$r" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v p99="$p99" \
            -v hz="$(getconf CLK_TCK)" 'BEGIN {
                us = 1e6 / hz / n
                printf "%-12s %5d %9.0f %9.1f %9.1f %9.1f %8s\n", name, r, n / 5, u * us, s * us, (u + s) * us, p99
            }'
    done
done
