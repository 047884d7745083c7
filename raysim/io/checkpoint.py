"""Checkpoints: a run's whole state after a round, in one file that loads without pickle.

One safetensors file holds every tensor (the global state, the server
optimizer's moments, the policy's network, optimizer and critic memory) and,
in its metadata, everything else as JSON (virtual time, totals, the
accountant's history, the adaptive clip norm, the time to target, ...). It is
written under a hidden name and renamed over the previous one, so a kill
leaves the old checkpoint or the new one. Loading reads tensors and JSON
only: nothing in the file can run code.

Each stateful part of a run hands over a :class:`State` (``checkpoint()``)
and takes one back (``restore(state)``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raysim.errors import ConfigError
from raysim.io.results import atomic_write

FILE = "checkpoint.safetensors"
VERSION = 1


@dataclass
class State:
    """One part's state: tensors by name, and JSON-able values."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def save(path: Path, parts: dict[str, State]) -> None:
    """Write ``parts`` to ``path`` atomically."""
    tensors = {f"{part}/{name}": t.detach().cpu().contiguous().clone()
               for part, state in parts.items() for name, t in state.tensors.items()}
    meta = {"version": VERSION, "parts": {part: state.meta for part, state in parts.items()},
            "tensors": {part: list(state.tensors) for part, state in parts.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"raysim": json.dumps(meta)}))


def load(path: Path) -> dict[str, State]:
    """The parts ``save`` wrote; a file that is not a raysim checkpoint is a ConfigError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["raysim"])
            parts = {part: State(tensors={name: f.get_tensor(f"{part}/{name}") for name in names},
                                 meta=meta["parts"][part]) for part, names in meta["tensors"].items()}
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as err:  # safetensors raises its own errors as these
        raise ConfigError(f"not a raysim checkpoint: {err}", file=str(path)) from None
    except Exception as err:  # a header safetensors cannot parse
        raise ConfigError(f"not a raysim checkpoint: {type(err).__name__}: {err}", file=str(path)) from None
    if meta.get("version") != VERSION:
        raise ConfigError(f"checkpoint version {meta.get('version')} (this raysim reads {VERSION})", file=str(path))
    return parts


def optimizer_state_dict(sd: dict) -> State:
    """A torch optimizer's ``state_dict()`` as tensors (per parameter and key) and JSON (its param groups)."""
    tensors = {f"{i}.{key}": value for i, values in sd["state"].items() for key, value in values.items()}
    return State(tensors=tensors, meta={"param_groups": sd["param_groups"]})


def optimizer_dict(state: State) -> dict:
    """The ``state_dict()`` :func:`optimizer_state_dict` packed, for ``optimizer.load_state_dict``."""
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state.tensors.items():
        i, key = name.split(".", 1)
        per_param.setdefault(int(i), {})[key] = tensor
    return {"state": per_param, "param_groups": state.meta["param_groups"]}


def sub(state: State, prefix: str, *, sep: str = "/") -> State:
    """The tensors of ``state`` under ``prefix`` + ``sep`` (prefix removed) and its meta's ``prefix`` entry."""
    cut = len(prefix) + len(sep)
    return State(tensors={k[cut:]: v for k, v in state.tensors.items() if k.startswith(prefix + sep)},
                 meta=state.meta.get(prefix, {}))


def nest(parts: dict[str, State]) -> State:
    """Several states as one: tensors under ``name/``, meta under ``name``."""
    return State(tensors={f"{name}/{k}": v for name, s in parts.items() for k, v in s.tensors.items()},
                 meta={name: s.meta for name, s in parts.items()})
