#!/usr/bin/env bash
# Soak test (issue 5 item 6): one gateway held under a churning fleet for a
# given time; reports the gateway's RSS drift, lost and duplicated messages
# and errors. Loopback only; bounded by --duration (plus one cycle).
#
#   perf/soak.sh [--duration 10m] [--devices 1000] [--cycle 60s] [--out DIR] [--memory]
#
# Each cycle is one `coap-gateway-bench` run against the same gateway, in
# turn `notify` (the fleet connects, signs up and in, syncs its twin and
# pushes notifications for the cycle) and `command` (a fleet answers HTTP
# PUTs for the cycle). Every run connects its whole fleet at its start and
# disconnects it at its end: the churn is the whole fleet, every cycle.
# After each cycle the script deletes the cycle's devices through the HTTP
# API (as a user removing devices would), so the gateway's memory should
# come back to the same level every cycle: RSS read after each cycle's
# clean-up is what the drift is computed from. The first cycle is the
# warm-up (allocator pools, connection slabs); drift is last − first.
#
# Output: one JSON report per cycle and soak.json (summary) in --out
# (default perf/results/soak-DATE), and a summary table on stdout. Exit
# status 1 when a message was lost or duplicated, a run had errors or the
# gateway died; 0 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=10m devices=1000 cycle=60s out="" memory=""
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=$2; shift 2 ;;
    --devices) devices=$2; shift 2 ;;
    --cycle) cycle=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --memory) memory=--memory; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "soak.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
to_s() { # 90s, 10m, 2h, or plain seconds
  local v=$1
  case "$v" in
    *h) echo $(( ${v%h} * 3600 )) ;; *m) echo $(( ${v%m} * 60 )) ;;
    *s) echo "${v%s}" ;; *) echo "$v" ;;
  esac
}
duration_s=$(to_s "$duration")
cycle_s=$(to_s "$cycle")
[ "$duration_s" -ge 1 ] && [ "$cycle_s" -ge 5 ] && [ "$devices" -ge 10 ] || {
  echo "soak.sh: need --duration >= 1s, --cycle >= 5s, --devices >= 10" >&2; exit 2; }
out=${out:-perf/results/soak-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)

cargo build --release -q -p bench -p coap-gateway
gw=target/release/coap-gateway
bench=target/release/coap-gateway-bench

work=$(mktemp -d)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
coap_port=$(port) api_port=$(port)
cfg=$work/gateway.toml
cat > "$cfg" <<EOF
[coap]
address = "127.0.0.1:$coap_port"
[api]
address = "127.0.0.1:$api_port"
[hub]
data_dir = "$work/data"
[log]
level = "warn"
EOF
"$gw" --config "$cfg" serve $memory 2> "$out/gateway.stderr" &
gw_pid=$!
cleanup() { kill "$gw_pid" 2>/dev/null || true; wait "$gw_pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$api_port/readyz" >/dev/null 2>&1 && break
  kill -0 "$gw_pid" 2>/dev/null || { echo "the gateway exited at start-up:" >&2; cat "$out/gateway.stderr" >&2; exit 1; }
  sleep 0.1
done
curl -sf "http://127.0.0.1:$api_port/readyz" >/dev/null || { echo "the gateway is not ready after 10 s" >&2; exit 1; }

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$gw_pid/status"; }

# Deletes every device of the bench's owners through the API; prints how
# many it deleted.
delete_devices() {
  local total=0 owner token
  for owner in bench bench-sampled; do
    token=$("$gw" --config "$cfg" token user --owner "$owner")
    total=$(( total + $(API="http://127.0.0.1:$api_port" TOKEN="$token" python3 - <<'PY'
import json, os, urllib.request
api, token = os.environ["API"], os.environ["TOKEN"]
def call(method, path):
    req = urllib.request.Request(api + path, method=method, headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()
ids = [d.get("id") or d.get("deviceId") for d in json.loads(call("GET", "/api/v1/devices"))]
for i in ids:
    call("DELETE", "/api/v1/devices/" + i)
print(len(ids))
PY
) ))
  done
  echo "$total"
}

common=(--gateway "127.0.0.1:$coap_port" --ca-dir "$work/data/pki" --gateway-config "$cfg"
        --gateway-pid "$gw_pid" --no-progress --no-plot)
rss_start=$(rss_kib)
echo "soak: gateway pid $gw_pid, $devices devices, cycles of ${cycle_s}s for ${duration_s}s; reports in $out"
started=$(date +%s)
i=0
status=0
: > "$out/cycles.tsv"
while [ $(( $(date +%s) - started )) -lt "$duration_s" ]; do
  i=$((i + 1))
  if [ $((i % 2)) -eq 1 ]; then
    scenario=notify
    args=(notify --devices "$devices" --duration "${cycle_s}s")
  else
    scenario=command
    # Sequential PUTs: about 100 per second of cycle, over a tenth of the
    # fleet (each command waits for its device's answer).
    args=(command --devices $(( devices / 10 )) --requests $(( cycle_s * 100 )))
  fi
  report=$out/cycle-$i-$scenario.json
  if ! "$bench" "${args[@]}" "${common[@]}" --out "$report" > "$out/cycle-$i-$scenario.log" 2>&1; then
    echo "cycle $i ($scenario): the bench failed; see $out/cycle-$i-$scenario.log" >&2
    tail -5 "$out/cycle-$i-$scenario.log" >&2
    status=1
  fi
  if ! kill -0 "$gw_pid" 2>/dev/null; then
    echo "cycle $i: the gateway died; its stderr:" >&2
    tail -20 "$out/gateway.stderr" >&2
    status=1
    break
  fi
  deleted=$(delete_devices)
  sleep 1
  printf '%s\t%s\t%s\t%s\t%s\n' "$i" "$scenario" "$report" "$(rss_kib)" "$deleted" >> "$out/cycles.tsv"
  tail -1 "$out/cycles.tsv" | awk -F'\t' '{ printf "cycle %s %-7s RSS %.1f MiB, %s devices deleted\n", $1, $2, $4/1024, $5 }'
done

RSS_START=$rss_start OUT=$out DURATION=$duration_s DEVICES=$devices CYCLE=$cycle_s STATUS=$status python3 - <<'PY'
import json, os, sys
out = os.environ["OUT"]
def errors(e):
    if isinstance(e, bool): return 0
    if isinstance(e, (int, float)): return int(e)
    if isinstance(e, dict):
        if isinstance(e.get("total"), int): return e["total"]
        return sum(errors(v) for k, v in e.items() if k != "samples")
    return 0
rows, lost, dup, errs, missing = [], 0, 0, 0, 0
for line in open(os.path.join(out, "cycles.tsv")):
    i, scenario, path, rss_kib, deleted = line.rstrip("\n").split("\t")
    try:
        r = json.load(open(path))
    except (OSError, ValueError):
        missing += 1
        r = {}
    l, d, e = r.get("lost"), r.get("duplicated"), errors(r.get("errors"))
    if l is None or d is None:
        missing += 1
    lost += l or 0; dup += d or 0; errs += e
    rows.append({"cycle": int(i), "scenario": scenario, "report": os.path.basename(path),
                 "rss_bytes": int(rss_kib) * 1024, "devices_deleted": int(deleted),
                 "throughput_per_s": r.get("throughput_per_s"), "p99_us": (r.get("latency_us") or {}).get("p99"),
                 "lost": l, "duplicated": d, "errors": e})
rss = [r["rss_bytes"] for r in rows]
drift = rss[-1] - rss[0] if len(rss) >= 2 else None
summary = {
    "scenario": "soak", "devices": int(os.environ["DEVICES"]), "duration_s": int(os.environ["DURATION"]),
    "cycle_s": int(os.environ["CYCLE"]), "cycles": len(rows),
    "gateway": {"rss_start_bytes": int(os.environ["RSS_START"]) * 1024,
                "rss_after_first_cycle_bytes": rss[0] if rss else None,
                "rss_after_last_cycle_bytes": rss[-1] if rss else None,
                "rss_drift_bytes": drift},
    "lost": lost, "duplicated": dup, "errors": errs, "unreadable_reports": missing,
    "per_cycle": rows,
}
json.dump(summary, open(os.path.join(out, "soak.json"), "w"), indent=2)
print(f"soak: {len(rows)} cycles; lost {lost}, duplicated {dup}, errors {errs}, unreadable reports {missing}")
if rss:
    print(f"  gateway RSS after cycle 1 {rss[0]/2**20:.1f} MiB, after cycle {len(rss)} {rss[-1]/2**20:.1f} MiB, "
          f"drift {drift/2**20 if drift is not None else 0:+.1f} MiB (min {min(rss)/2**20:.1f}, max {max(rss)/2**20:.1f})")
print(f"  summary: {os.path.join(out, 'soak.json')}")
bad = lost or dup or errs or missing or os.environ["STATUS"] != "0" or not rows
sys.exit(1 if bad else 0)
PY
