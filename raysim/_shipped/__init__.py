"""The shipped device profiles, policies and experiments, as an installed wheel holds them.

In a wheel this package holds ``device_profiles/``, ``policies/`` and ``experiments/`` (``pyproject.toml``
maps the checkout's top-level folders here); in a checkout it is empty and :mod:`raysim.io.shipped` reads the
top-level folders instead.
"""
