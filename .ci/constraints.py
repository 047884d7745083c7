"""Print the installed version of every package raysim[test,tracking] needs, directly or not: constraints.txt.

    python .ci/constraints.py > constraints.txt   (in the environment `make test` built and CI ran)

torch is written without its local label (``+cpu``), so the same line admits the CPU wheel and
the CUDA build of one release (cluster.yaml installs the one each node needs).
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, *, extras: set[str]) -> dict[str, str]:
    """Installed versions of ``root``'s requirements (with ``extras``) and of theirs, recursively."""
    env, found, todo = default_environment(), {}, [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        if canonical(name) in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # a requirement whose marker excludes this platform
            continue
        found[canonical(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in wanted | {""}):
                todo.append((req.name, set(req.extras)))
    del found[canonical(root)]
    return found


# What `make` installs: test (with the cluster extra it names) and tracking (these two). closure() does not
# follow raysim[...] requirements back into raysim, so the extras they name are listed here.
EXTRAS = {"test", "cluster", "tensorboard", "mlflow"}

if __name__ == "__main__":
    versions = closure("raysim", extras=EXTRAS)
    print("# Versions `make test` installed and CI ran (Python "
          f"{sys.version_info.major}.{sys.version_info.minor}); made by: python .ci/constraints.py > constraints.txt")
    for name, version in sorted(versions.items()):
        print(f"{name}=={version.split('+')[0]}")
