"""Per-device methods and the method space policies choose from."""

from raysim.methods.space import default_config, method_space

__all__ = ["default_config", "method_space"]
