"""What raysim reads and writes: run directories, checkpoints, paths and the shipped files.

:mod:`~raysim.io.results` owns a run directory (config.yaml, rounds.parquet, devices.parquet, summary.json and
their schemas); :mod:`~raysim.io.checkpoint` saves a run's whole state after a round in one file that loads
without pickle; :mod:`~raysim.io.paths` makes every path of an experiment absolute before anything is scheduled;
:mod:`~raysim.io.shipped` finds the shipped profiles, policies and experiments in a checkout or a wheel;
:mod:`~raysim.io.caches` holds what runs in one process can share.
"""
