#!/usr/bin/env bash
# Two gateway binaries, A (before) and B (after), alternated run by run in
# one invocation with the same bench binary: `raw` (pipelined GETs, the
# gateway's answers batched per flush) and `notify` (notifications into the
# embedded hub). Written for issue 13 (one CoAP message per TLS record), to
# see what the extra records cost peers that read properly.
#
#   perf/record-ab.sh --a BIN --b BIN [--pairs 3] [--duration 10s] [--requests 1000000] [--out DIR]
#
# raw sends --requests GETs (16 outstanding on each of 4 connections): with
# the default 100,000 the gateway's CPU time is ~0.2 s, too close to the
# 10 ms clock tick for a ratio.
#
# Each pair runs A then B, or B then A (the order alternates pair by
# pair). Every run records the machine's CPU steal (`machine.steal_cpu_s`).
# The summary takes the median over pairs of each figure and the ratio B/A.
set -euo pipefail
cd "$(dirname "$0")/.."

a="" b="" pairs=3 duration=10s requests=1000000 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --a) a=$2; shift 2 ;;
    --b) b=$2; shift 2 ;;
    --pairs) pairs=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "record-ab.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$a" ] && [ -x "$b" ] || { echo "record-ab.sh: --a and --b must name gateway binaries" >&2; exit 2; }
out=${out:-perf/results/record-ab-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out"
cargo build --release -q --locked -p bench
bench=target/release/coap-gateway-bench

run() { # side scenario pair
  local side=$1 scenario=$2 pair=$3 bin
  bin=$a; [ "$side" = b ] && bin=$b
  local name="$out/$scenario-$side-$pair"
  case "$scenario" in
    raw) "$bench" raw --spawn --gateway-bin "$bin" --targets gateway --idle 0 \
           --handshakes 500 --requests "$requests" \
           --no-progress --out "$name.json" > "$name.log" 2>&1 ;;
    notify) "$bench" notify --spawn --gateway-bin "$bin" --devices 1000 --duration "$duration" \
           --no-progress --out "$name.json" > "$name.log" 2>&1 ;;
  esac || { echo "$scenario ($side, pair $pair) failed; see $name.log" >&2; tail -5 "$name.log" >&2; exit 1; }
  echo "$scenario $side pair $pair done" >&2
}

for pair in $(seq 1 "$pairs"); do
  order="a b"; [ $((pair % 2)) -eq 0 ] && order="b a"
  for scenario in raw notify; do
    for side in $order; do run "$side" "$scenario" "$pair"; done
  done
done

OUT=$out PAIRS=$pairs python3 - <<'PY'
import json, os, statistics
out, pairs = os.environ["OUT"], int(os.environ["PAIRS"])
def load(s, side, p):
    return json.load(open(os.path.join(out, f"{s}-{side}-{p}.json")))
def figures(s, r):
    steal = r["machine"]["steal_cpu_s"]
    if s == "raw":
        sbs = r["side_by_side"]
        return {"requests_per_cpu_s": sbs["requests_per_cpu_s"]["gateway"],
                "p50_us": r["latency_us"]["p50"], "p99_us": r["latency_us"]["p99"],
                "handshakes_per_cpu_s": sbs["handshakes_per_cpu_s"]["gateway"],
                "bad_answers": r["bad_answers"], "steal_cpu_s": steal}
    return {"notifications_per_cpu_s": r["notifications_per_cpu_s"],
            "p50_us": r["latency_us"]["p50"], "p99_us": r["latency_us"]["p99"],
            "lost": r["lost"], "duplicated": r["duplicated"], "steal_cpu_s": steal}
summary = {}
for s in ("raw", "notify"):
    runs = {side: [figures(s, load(s, side, p)) for p in range(1, pairs + 1)] for side in ("a", "b")}
    med = {side: {k: statistics.median(x[k] for x in runs[side]) for k in runs[side][0]} for side in runs}
    ratio = {k: round(med["b"][k] / med["a"][k], 4) for k in med["a"]
             if med["a"][k] and not k.startswith(("steal", "lost", "dup", "bad"))}
    summary[s] = {"runs": runs, "median": med, "ratio_b_over_a": ratio}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
for s, v in summary.items():
    print(f"{s}: median A {v['median']['a']}")
    print(f"{s}: median B {v['median']['b']}")
    print(f"{s}: B/A {v['ratio_b_over_a']}")
PY
