"""Public data that resembles the users' (Wu et al. 2024), made on the server from public text only.

``pool`` builds the broad public pool (shipped, disjoint from the users), ``lm`` samples and scores with the
server's small models, ``steps`` generates, filters, transforms and re-filters (``Synth``, each step cached),
``refilter`` rebuilds a finished DP run's models, ``sources`` turns ``pretrain.sources`` into what central
pre-training trains on, and ``command`` is ``raysim synth``.
"""
