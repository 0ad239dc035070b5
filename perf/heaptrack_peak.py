#!/usr/bin/env python3
"""Heap at its peak, by the deepest frame of interest of each allocation.

Input: heaptrack's peak flamegraph (folded stacks, root first):

    heaptrack -o /tmp/ht target/release/coap-gateway-bench idle --transport memory \
        --devices 3000 --shards 1 --duration 1s
    heaptrack_print -f /tmp/ht.zst --print-peaks 0 --print-allocators 0 \
        --print-temporary 0 --print-leaks 0 --flamegraph-cost-type peak -F /tmp/peak.folded
    perf/heaptrack_peak.py /tmp/peak.folded 3000

Each stack's bytes go to its deepest frame from the gateway, rustls, the
shards crate or the bench (allocator and std frames skipped), so that
"who holds the memory of an idle device" reads off per device.
"""

import collections
import re
import sys

INTERESTING = re.compile(r"(coap_gateway|rustls|shards|bench|inmem)")


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: heaptrack_peak.py PEAK.folded DEVICES")
    path, devices = sys.argv[1], int(sys.argv[2])
    total = 0
    by_frame: collections.Counter = collections.Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            pick = "(other)"
            for frame in reversed(stack.split(";")):
                if INTERESTING.search(frame):
                    # Mangled names: keep the readable path, drop the hash.
                    pick = re.sub(r"::h[0-9a-f]{16}", "", frame)[:120]
                    break
            by_frame[pick] += n
    print(f"heap at peak: {total} bytes, {total / devices:.0f} per device")
    for frame, n in by_frame.most_common(30):
        print(f"{n / devices:8.0f} B/device  {frame}")


if __name__ == "__main__":
    main()
