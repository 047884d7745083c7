"""Federated datasets: one interface, several sources.

:class:`~raysim.data.base.FederatedDataset` is what the rest of raysim reads data through;
:func:`~raysim.data.build.build_dataset` builds the one ``data.source`` names, once, in the driver: generated
token ids (:mod:`~raysim.data.synthetic`), the shipped corpus (:mod:`~raysim.data.corpus`) or a user's file,
read and split into users (:mod:`~raysim.data.sources`: ``data.partition``), tokenized and packed
(:mod:`~raysim.data.text`, :mod:`~raysim.data.tokenizer`).
"""
