"""Server-side arithmetic: how heterogeneous updates become one new global state.

Device actors return partial sums in float64 with per-coordinate contribution counts;
:mod:`~raysim.aggregation.rules` combines them in a fixed order and averages each coordinate over the devices
that held it; :mod:`~raysim.aggregation.lora` says how LoRA updates of different ranks meet (registered rules:
flexlora, hetlora, ffa); :mod:`~raysim.aggregation.server_opt` applies the
average with a server optimizer (fedavg, fedadam). Central DP's noise is added before this, by the privacy
mechanism (:mod:`raysim.privacy`).
"""
