"""The round engine: one run from set-up to its last round, on a pool of Ray actors.

:mod:`~raysim.engine.run` builds a run and loops over rounds; each round samples a cohort, asks the policy for
every device's config, cuts the training into units of work (:mod:`~raysim.engine.work`) and hands them to the
device actors (:mod:`~raysim.engine.pool`, :mod:`~raysim.engine.dispatch`). An actor
(:mod:`~raysim.engine.device`) trains each unit (:mod:`~raysim.engine.training`), passes every update through
the update processors (:mod:`~raysim.engine.processors`) and returns partial sums and records
(:mod:`~raysim.engine.records`); the aggregator actor (:mod:`~raysim.engine.aggregator`) noises and applies the
sum. Callbacks (:mod:`~raysim.engine.callbacks`) watch each round: evaluation, targets, checkpoints, tracking.
"""
