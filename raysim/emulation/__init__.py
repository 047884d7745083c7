"""Device emulation: who the devices are, when they are there, and what a round costs each of them.

Profiles (:mod:`~raysim.emulation.profiles`) describe device classes and populations in YAML and draw each
device's compute, memory, bandwidth and availability lazily from (seed, device id). The cohort
(:mod:`~raysim.emulation.cohort`) is sampled at virtual time t from the devices then available; the cost model
(:mod:`~raysim.emulation.costmodel`) gives each device's time, peak memory and bytes for its config, measured on
a reference model and never on the kernels raysim trains with; the clock (:mod:`~raysim.emulation.clock`)
decides who arrives before the deadline and how long the round lasted.
"""
