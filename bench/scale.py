"""Scale: the W2 model on a population of 10^6 devices with 500, 5,000 and 20,000 devices per round.

Each cohort size runs in a fresh process (3 rounds, the median of rounds 2-3), sampling the peak RSS of the
driver and of every DeviceWorker actor process while it runs. Prints, per cohort: s/round, s/device, the
driver's peak RSS and each actor's; then, as its last two lines,
``per_device_ratio=<s/device at 20,000 / s/device at 500>`` (target <= 1.0: no per-device cost grows with the
cohort) and ``driver_rss_ratio=<driver peak RSS at 20,000 / at 500>`` (target <= 1.5).

    python bench/scale.py [--cohorts 500,5000,20000] [--rounds 3]
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, threading, time
import psutil
sys.path.insert(0, {bench!r})
from common import W2, median_rounds, raysim_rounds
from dataclasses import replace

peaks = {{}}  # actor pid -> peak RSS
stop = threading.Event()

def sample():
    while not stop.is_set():
        for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
            cmd = " ".join(p.info["cmdline"] or [])
            # Ray names an actor's process after its class (ray::DeviceWorker, ray::DeviceWorker.train, ...)
            if cmd.startswith("ray::DeviceWorker") and p.info["memory_info"]:
                peaks[p.info["pid"]] = max(peaks.get(p.info["pid"], 0), p.info["memory_info"].rss)
        time.sleep(0.2)  # polling interval of the sampler, not emulated time

threading.Thread(target=sample, daemon=True).start()
times = raysim_rounds(replace(W2, rounds={rounds}, cohort={cohort}), population=1_000_000)
stop.set()
driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"s_per_round": median_rounds(times), "driver": driver, "actors": sorted(peaks.values())}}))
"""


def measure(cohort: int, *, rounds: int) -> dict:
    from common import BENCH_DIR

    code = CHILD.format(bench=str(BENCH_DIR), cohort=cohort, rounds=rounds)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"cohort {cohort}: the run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


if __name__ == "__main__":
    cohorts = [int(c) for c in option("--cohorts", "500,5000,20000").split(",")]
    rounds = int(option("--rounds", "3"))
    mib = 2**20
    results = {}
    for cohort in cohorts:
        r = results[cohort] = measure(cohort, rounds=rounds)
        actors = ", ".join(f"{a / mib:.0f}" for a in r["actors"])
        print(f"cohort {cohort:>6,}: {r['s_per_round']:.3f} s/round, {r['s_per_round'] / cohort * 1e3:.3f} ms/device, "
              f"driver peak {r['driver'] / mib:.0f} MiB, actors peak [{actors}] MiB", flush=True)
    small, large = results[cohorts[0]], results[cohorts[-1]]
    per_device = (large["s_per_round"] / cohorts[-1]) / (small["s_per_round"] / cohorts[0])
    print(f"per_device_ratio={per_device:.3f}")
    print(f"driver_rss_ratio={large['driver'] / small['driver']:.3f}")
