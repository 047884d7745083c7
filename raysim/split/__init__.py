"""Split learning inside one actor: the protocol of a split step (:mod:`~raysim.split.protocol`), exactly as the
device and the server would run it, and what an honest-but-curious server learns about the labels from what
crosses the cut (:mod:`~raysim.split.leakage`). The per-device setting is the ``split`` method
(:mod:`raysim.methods.split`)."""
