#!/usr/bin/env bash
# The NATS hub next to the embedded hub (issue 6, performance): the same
# `notify` and `command` runs against a gateway on each back end, one after
# the other in one invocation, and the ratios NATS / embedded.
#
#   perf/hub-compare.sh [--devices 1000] [--duration 10s] [--requests 5000] [--out DIR]
#
# Each run spawns its own gateway (release build); the NATS runs also get a
# nats-server -js of their own on loopback (Debian's nats-server). Goal:
# the NATS hub costs the data plane no more than 20 % of the embedded
# figure, i.e. notifications per gateway CPU-second with NATS >= 0.80 of
# the embedded hub's.
set -euo pipefail
cd "$(dirname "$0")/.."

devices=1000 duration=10s requests=5000 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) devices=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "hub-compare.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
out=${out:-perf/results/hub-compare-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out"
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || {
  echo "hub-compare.sh needs nats-server (Debian: apt-get install nats-server)" >&2; exit 2; }

cargo build --release -q -p bench -p coap-gateway
bench=target/release/coap-gateway-bench
for hub in embedded nats; do
  "$bench" notify --spawn --hub "$hub" --devices "$devices" --duration "$duration" \
    --no-progress --out "$out/notify-$hub.json" > "$out/notify-$hub.log" 2>&1 \
    || { echo "notify --hub $hub failed; see $out/notify-$hub.log" >&2; tail -5 "$out/notify-$hub.log" >&2; exit 1; }
  "$bench" command --spawn --hub "$hub" --devices "$devices" --requests "$requests" \
    --no-progress --out "$out/command-$hub.json" > "$out/command-$hub.log" 2>&1 \
    || { echo "command --hub $hub failed; see $out/command-$hub.log" >&2; tail -5 "$out/command-$hub.log" >&2; exit 1; }
done

OUT=$out python3 - <<'PY'
import json, os
out = os.environ["OUT"]
r = {f"{s}-{h}": json.load(open(os.path.join(out, f"{s}-{h}.json")))
     for s in ("notify", "command") for h in ("embedded", "nats")}
def per_cpu(x):
    return x.get("notifications_per_cpu_s") or (x.get("gateway") or {}).get("notifications_per_cpu_s")
ne, nn = per_cpu(r["notify-embedded"]), per_cpu(r["notify-nats"])
ce, cn = r["command-embedded"]["latency_us"], r["command-nats"]["latency_us"]
summary = {
    "notify": {"embedded_per_cpu_s": ne, "nats_per_cpu_s": nn,
               "ratio_nats_to_embedded": round(nn / ne, 3) if ne and nn else None,
               "lost": {h: r[f"notify-{h}"].get("lost") for h in ("embedded", "nats")},
               "duplicated": {h: r[f"notify-{h}"].get("duplicated") for h in ("embedded", "nats")}},
    "command": {"embedded_us": {k: ce[k] for k in ("p50", "p99", "p999")},
                "nats_us": {k: cn[k] for k in ("p50", "p99", "p999")},
                "exactly_once": {h: r[f"command-{h}"]["exactly_once"]["exactly_once"] for h in ("embedded", "nats")}},
    "goal": {"ratio_min": 0.8},
}
summary["goal"]["met"] = (summary["notify"]["ratio_nats_to_embedded"] or 0) >= 0.8
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
