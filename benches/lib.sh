# Shared by the profiling scripts in benches/: source it.

# Waits up to 20 s for URL to answer; if it does not, prints LOG (the command's output)
# and exits.
await_answer() {
    local url=$1 log=$2
    for _ in $(seq 100); do
        curl -s -o /dev/null "$url" && break
        sleep 0.2
    done
    curl -sf -o /dev/null "$url" || { echo "no answer from $url"; cat "$log"; exit 1; }
}
