"""raysim: emulate heterogeneous edge devices in private federated fine-tuning of LMs."""

__version__ = "0.1.0"
