#!/usr/bin/env bash
# Pools several processes of one build, measured side by side by the shared harness, into
# one set of ratios to nginx: the figures behind BENCHMARKS.md's "The ninth session" and the
# README's pooled rows. One process can keep an edge over another of the same binary for
# many rounds (BENCHMARKS.md, the 89th-91st runs), so a target is judged from two or more
# processes of a build, pooled, and the gap between them is the noise floor.
#
#   benches/pooled.sh RAW_CSV NAME...
#   e.g. benches/pooled.sh /tmp/run92/*-get-raw.csv ifmatch ifmatch-aa
#
# RAW_CSV is run.sh's `*-raw.csv`; each NAME a candidate in it (one process each), measured
# with nginx in the same rounds. For each body size it prints, over every (round, process)
# pair: the count, the median and quartiles (sorted list's n/4-th and 3n/4-th) of req/s and
# p99 as ratios to nginx in that round, how many are at or over 1.0 (req/s) and at or under
# it (p99), and each process's own medians.
set -euo pipefail
[[ $# -ge 2 && -f $1 ]] || { sed -n '2,15p' "$0"; exit 2; }
csv=$1; shift
names=" $* "

# size process rps_ratio p99_ratio, one line per (round, size, process)
ratios=$(awk -F, -v names="$names" '
    NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    {
        key = $col["round"] SUBSEP $col["size"]
        if ($col["target"] == "nginx") { rps[key] = $col["rps"]; p99[key] = $col["p99_ms"] }
        else if (index(names, " " $col["target"] " ")) {
            n++; k[n] = key; size[n] = $col["size"]; who[n] = $col["target"]
            r[n] = $col["rps"]; p[n] = $col["p99_ms"]
        }
    }
    END {
        for (i = 1; i <= n; i++) {
            if (!(k[i] in rps)) { print "no nginx row for round and size of " who[i] > "/dev/stderr"; exit 1 }
            printf "%s %s %.4f %.4f\n", size[i], who[i], r[i] / rps[k[i]], p[i] / p99[k[i]]
        }
    }' "$csv")
[[ -n $ratios ]] || { echo "none of$names found in $csv"; exit 1; }

# stats FIELD: of the numbers on stdin, "median (quartiles lo-hi, min-max)"
stats() {
    sort -g | awk '{ v[NR - 1] = $1 } END {
        n = NR; m = (n % 2) ? v[(n - 1) / 2] : (v[n / 2 - 1] + v[n / 2]) / 2
        printf "%.2f (quartiles %.2f-%.2f, min-max %.2f-%.2f)", m, v[int(n / 4)], v[int(3 * n / 4)], v[0], v[n - 1]
    }'
}

for size in $(awk '!seen[$1]++ {print $1}' <<<"$ratios"); do
    rows=$(awk -v s="$size" '$1 == s' <<<"$ratios")
    count=$(wc -l <<<"$rows")
    over=$(awk '$3 >= 1 {n++} END {print n + 0}' <<<"$rows")
    under=$(awk '$4 <= 1 {n++} END {print n + 0}' <<<"$rows")
    echo "$size, $count measurements pooled:"
    echo "  req/s x nginx  $(awk '{print $3}' <<<"$rows" | stats)  at or over 1.0: $over of $count"
    echo "  p99 x nginx    $(awk '{print $4}' <<<"$rows" | stats)  at or under 1.0: $under of $count"
    for name in "$@"; do
        own=$(awk -v n="$name" '$2 == n' <<<"$rows")
        [[ -n $own ]] || continue
        echo "  $name: req/s $(awk '{print $3}' <<<"$own" | stats | cut -d' ' -f1), p99 $(awk '{print $4}' <<<"$own" | stats | cut -d' ' -f1)"
    done
done
