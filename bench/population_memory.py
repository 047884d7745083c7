"""Resident memory of the driver and the device actors vs population size.

Runs the W2 workload (3 rounds, cohort 500) with a population of 10^3 and of
10^6 devices, each in a fresh process, sampling the peak RSS of the driver and
of every DeviceWorker actor process while it runs. Devices are drawn lazily
from (seed, id), so memory should not grow with the population: the last line
prints ``ratio=<peak RSS at 10^6 / peak RSS at 10^3>``, the larger of driver
and actors; target ~1.0.

    python bench/population_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, threading, time
import psutil
sys.path.insert(0, {bench!r})
from common import W2, raysim_rounds
from dataclasses import replace

peak = {{"actors": 0}}
stop = threading.Event()

def sample():
    while not stop.is_set():
        for p in psutil.process_iter(["cmdline", "memory_info"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "DeviceWorker" in cmd and p.info["memory_info"]:
                peak["actors"] = max(peak["actors"], p.info["memory_info"].rss)
        time.sleep(0.2)  # polling interval of the sampler, not emulated time

t = threading.Thread(target=sample, daemon=True)
t.start()
raysim_rounds(replace(W2, rounds=3), population={population})
stop.set()
driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"driver": driver, "actors": peak["actors"]}}))
"""


def measure(population: int) -> dict[str, int]:
    from common import BENCH_DIR

    code = CHILD.format(bench=str(BENCH_DIR), population=population)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    small, large = measure(1_000), measure(1_000_000)
    mib = 2**20
    for what in ("driver", "actors"):
        print(f"{what}: {small[what] / mib:.0f} MiB at 10^3 devices, {large[what] / mib:.0f} MiB at 10^6 "
              f"({large[what] / small[what]:.3f}x)")
    print(f"ratio={max(large[w] / small[w] for w in ('driver', 'actors')):.3f}")
