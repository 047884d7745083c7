"""raysim: emulate heterogeneous edge devices in private federated fine-tuning of LMs.

The Python API (:mod:`raysim.api`) is imported on first use, so that ``import raysim`` loads neither torch nor
Ray: ``raysim.run(experiment, *overrides)``, ``raysim.load_run(run_dir)``, ``raysim.load_study(study_dir)``.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["RunResults", "StudyResults", "load_run", "load_study", "run"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("raysim.api"), name)
    raise AttributeError(f"module 'raysim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
