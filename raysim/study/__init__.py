"""Studies: many runs on identical conditions, and what is read off them.

:mod:`~raysim.study.compare` runs a comparison study (policies × seeds × populations, ``raysim compare``);
:mod:`~raysim.study.report` turns finished runs into tables and plots (``raysim report``);
:mod:`~raysim.study.train_policy` trains the learned (RL) policy over episodes (``raysim train-policy``).
"""
