"""Offsite-tuning (Xiao, Lin, Han 2023; ScaleOT, Yao et al. 2024): the model owner ships devices a lossy
emulator of its model, devices tune adapters on it, and the adapters are plugged back into the full model.

:mod:`~raysim.offsite.layout` says which blocks an emulator keeps from its spec alone;
:mod:`~raysim.offsite.emulator` is a built emulator and the modules that stand in for blocks (dropped blocks,
harmonizers, low-rank projections); :mod:`~raysim.offsite.build` is the owner's side: emulators distilled,
scored and compressed on the public split before round 1, cached. The per-device method is
:mod:`raysim.methods.emulator`.
"""
