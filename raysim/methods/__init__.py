"""Per-device methods (:mod:`raysim.methods.base`: one class each, registered by name) and the method space
policies choose from.

``REGISTERED`` names the modules that declare the methods; each registers its
method on import, in this order: the order of the method space's product, of a
config's work key and of the device columns. They import neither torch nor Ray
(the config schema is built from them); what a method does to the model is in
its mechanics module (``lora``, ``width``, ``layers``, ``embeddings``, ``quantize``;
emulators: :mod:`raysim.offsite`).
"""

import importlib

from raysim.methods.base import METHODS, Method, device_config_class

REGISTERED = ("rank", "pruning", "dropout", "layers", "embedding_updates", "bits", "adapter", "split",
              "emulator")
for _module in REGISTERED:
    importlib.import_module(f"{__name__}.{_module}")

DeviceConfig = device_config_class()

from raysim.methods.space import default_config, full_config, method_space  # noqa: E402  (needs DeviceConfig)

__all__ = ["METHODS", "DeviceConfig", "Method", "default_config", "full_config", "method_space"]
