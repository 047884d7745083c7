"""Differential privacy: the mechanism a run's config assembles, its plan, and its accounting.

:mod:`~raysim.privacy.mechanisms` is the seam: ``privacy.mechanism`` names a registered mechanism (default
``dp_fedavg`` when ``privacy.clip_norm`` is set) that owns its plan (:mod:`~raysim.privacy.plan`: noise for a
target epsilon, adaptive clipping), its one-line description, its ``summary.json`` section and the update
processors it installs: central DP-FedAvg's clipping and noise on the support only
(:mod:`~raysim.privacy.central`). Local DP-SGD trains each device with Opacus (:mod:`~raysim.privacy.local`);
:mod:`~raysim.privacy.accounting` wraps Opacus's accountants (RDP, PRV).
"""
