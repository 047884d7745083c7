"""Where the shipped device profiles, policies and experiments are, whatever the install.

A wheel carries them inside the package (``raysim/_shipped/<kind>/``, read with :mod:`importlib.resources`);
a checkout (an editable install, or none) has them at its top level. Either way the folder is found from this
file, never from the working directory, whose ``device_profiles/`` and ``policies/`` are the user's and are
looked up first by the modules that resolve names.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from raysim.errors import ConfigError

KINDS = ("device_profiles", "policies", "experiments")
CHECKOUT = Path(__file__).resolve().parents[2]


def folder(kind: str) -> Path:
    """The shipped ``kind`` folder (one of :data:`KINDS`)."""
    packaged = Path(str(resources.files("raysim._shipped") / kind))  # a real folder: raysim is never zipped
    return packaged if packaged.is_dir() else CHECKOUT / kind


def experiment(name_or_path: str | Path) -> Path:
    """An experiment file: a path that exists, else a shipped experiment by name (``quickstart``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = folder("experiments") / f"{path.stem if path.suffix in ('.yaml', '.yml') else path.name}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in folder("experiments").glob("*.yaml")))
    raise ConfigError(f"no such file, and no shipped experiment of that name (shipped: {known})",
                      file=str(name_or_path))
