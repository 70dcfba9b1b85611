#!/bin/bash
# Each read endpoint of the HTTP API alone, on an idle daemon (no backups running): wrk
# -t1 -c50 -d8s per endpoint, and the daemon's CPU time (utime+stime from /proc) per request,
# a figure the machine's other load hardly moves; the daemon's RSS after each endpoint.
#
#   bash benches/api_endpoints.sh BIN WORK PORT
#
# WORK: a work directory left by `benches/api_load.py --dir WORK` (its vault, job history and
# disks are copied to WORK-endpoints-PORT; the copy's configuration has no schedule override,
# so no backup runs). Needs wrk, curl and bc.
set -euo pipefail
BIN=$(readlink -f "$1"); SRC=$(readlink -f "$2"); PORT=$3
W="$SRC-endpoints-$PORT"
rm -rf "$W"; mkdir -p "$W"; cp -a "$SRC/vault" "$SRC/state" "$W/"
sed -e "s/127.0.0.1:[0-9]*/127.0.0.1:$PORT/" -e '/schedule_override_seconds/d' \
    -e "s#path = \"#path = \"$SRC/#" "$SRC/bulwark.toml" > "$W/bulwark.toml"
TOKEN=$("$BIN" token create --scope read --name endpoints --config "$W/bulwark.toml" | tail -1)
cd "$W"
BULWARK_LOG=warn "$BIN" serve --config "$W/bulwark.toml" 2> "$W/serve.log" &
PID=$!
trap 'kill $PID' EXIT
for _ in $(seq 150); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/healthz" && break; sleep 0.2; done
printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$TOKEN" > "$W/auth.lua"
VM=$(awk -F'"' '/^name = /{print $2; exit}' "$W/bulwark.toml")
rss() { awk '/VmRSS/{printf "%.1f MiB", $2/1024}' /proc/$PID/status; }
echo "uptime: $(uptime)"
echo "daemon RSS at start: $(rss)"
printf "%-26s %9s %9s %9s %11s %11s\n" endpoint req/s p50 p99 "CPU ms/req" "RSS after"
for e in /healthz /api/v1/vms "/api/v1/vms/$VM" "/api/v1/vms/$VM/points" "/api/v1/jobs?limit=50" \
         /api/v1/storage /api/v1/policies /api/v1/leases /metrics; do
  t0=$(awk '{print $14+$15}' /proc/$PID/stat)
  out=$(wrk -t1 -c50 -d8s --latency -s "$W/auth.lua" "http://127.0.0.1:$PORT$e")
  t1=$(awk '{print $14+$15}' /proc/$PID/stat)
  n=$(echo "$out" | awk '/requests in/{print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
  p50=$(echo "$out" | awk '$1=="50%"{print $2}'); p99=$(echo "$out" | awk '$1=="99%"{print $2}')
  bad=$(echo "$out" | grep -E "Non-2xx|Socket errors" || true)
  ticks=$(getconf CLK_TCK)
  printf "%-26s %9s %9s %9s %11.2f %11s %s\n" "$e" "$rps" "$p50" "$p99" \
    "$(echo "($t1-$t0)*1000/$ticks/$n" | bc -l)" "$(rss)" "$bad"
done
