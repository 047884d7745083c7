"""Start or join the Ray that a raysim run uses, and reserve its device actors.

No address (or ``"local"``) starts a private single-machine Ray: every daemon
listens on 127.0.0.1 only, no dashboard unless asked, and nothing found on the
machine (a running Ray, an address recorded under /tmp/ray) is ever attached.
It authenticates with a token of its own, held in its processes' environment
and never written to ``~/.ray/auth_token`` (a token file there would turn
token authentication on for the next ``ray start --head`` on this machine).
``"auto"``, ``host:port`` or ``RAY_ADDRESS`` join an existing cluster; an
address that does not answer fails within ``connect_timeout_s`` with a
:class:`ConfigError` instead of Ray's own retry loop (minutes).

:func:`reserve` places a run's device actors as one placement group: on a
cluster the pending group is the demand the autoscaler adds nodes for; a
request that cannot be placed fails in bounded time, in one line naming
``ray.num_actors``, ``ray.cpus_per_actor`` and ``ray.gpus_per_actor``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import ray
import ray._private.ray_constants as ray_constants
from ray._private.services import canonicalize_bootstrap_address
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raysim.errors import ConfigError

FIELD = "ray.address"
LOOPBACK = "127.0.0.1"
# Ray's single-machine mode: node address = loopback, so daemons bind to it.
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Logger of Ray's notice that it turned token auth on (it stays on; we keep it quiet).
_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
# How long a placement may take when ray.placement_timeout_s is not set: a private local Ray cannot
# grow (what is busy frees up within seconds or never); a cluster's autoscaler may need minutes to boot nodes.
LOCAL_PLACEMENT_TIMEOUT_S = 30.0
CLUSTER_PLACEMENT_TIMEOUT_S = 600.0

# A custom resource on the one node of a private local Ray that raysim started: nothing can join that Ray or add
# nodes to it. Every process that uses the Ray (the driver, a study's run tasks) reads it there, not from state of
# its own.
PRIVATE_LOCAL = "raysim_private_local"


@dataclass
class Connection:
    """The Ray :func:`connect` set up: its one-line description, and how to leave the process as it was."""

    description: str
    started: bool  # connect() started or joined it; False: it reused a Ray this process already had
    saved_auth: dict[str, str | None] = field(default_factory=dict)  # the auth variables before a local start

    def shutdown(self) -> None:
        """Stop the Ray that :func:`connect` started or joined; a reused one is left running."""
        if self.started:
            ray.shutdown()
            self.started = False
            _restore_auth(self.saved_auth)


def private_local() -> bool:
    """Whether the Ray this process uses is a private local one (:data:`PRIVATE_LOCAL`)."""
    return ray.cluster_resources().get(PRIVATE_LOCAL, 0.0) > 0


def resolve_address(*, address: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The Ray address to use: ``address``, else ``RAY_ADDRESS``; None means a private local Ray."""
    chosen = (address or environ.get("RAY_ADDRESS") or "").strip()
    return None if chosen in ("", "local") else chosen


def connect(
    *,
    address: str | None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool = False,
    connect_timeout_s: float = 30.0,
) -> Connection:
    """Initialise Ray for a run; ``.description`` says which in one line, ``.shutdown()`` stops it.

    ``num_cpus``/``num_gpus``/``include_dashboard`` size a local Ray only; a
    cluster brings its own. A Ray already initialised in this process is reused.
    """
    if ray.is_initialized():
        return Connection(f"Ray already running in this process ({_resources()})", started=False)
    target = resolve_address(address=address)
    if target is None:
        saved_auth = _private_token()
        description = _start_local(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard)
        return Connection(description, started=True, saved_auth=saved_auth)
    return Connection(_join(target=target, timeout_s=connect_timeout_s), started=True)


def placement_timeout_s(timeout_s: float | None) -> float:
    """``ray.placement_timeout_s``, or its default for the Ray this process uses."""
    if timeout_s is not None:
        return timeout_s
    return LOCAL_PLACEMENT_TIMEOUT_S if private_local() else CLUSTER_PLACEMENT_TIMEOUT_S


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """Schedule on the node this process runs on (the driver's): for whatever reads or writes its files."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def _fits(have: float, per: float) -> int:
    return int(math.floor(have / per + 1e-9))  # 1 // 0.1 is 9.0 in floating point


def actors_that_fit(*, cpus_per_actor: float, gpus_per_actor: float) -> int:
    """Device actors of this size the Ray holds now (all its nodes' resources, busy or not)."""
    total = ray.cluster_resources()
    n = _fits(total.get("CPU", 0.0), cpus_per_actor)
    if gpus_per_actor > 0:
        n = min(n, _fits(total.get("GPU", 0.0), gpus_per_actor))
    if n < 1 and private_local():
        raise ConfigError(f"this local Ray has {_have()}: not enough for one device actor of "
                          f"{_size(cpus_per_actor, gpus_per_actor)}", field="ray.cpus_per_actor")
    if n < 1:
        raise ConfigError(f"the cluster holds no device actor of {_size(cpus_per_actor, gpus_per_actor)} "
                          f"now ({_have()}); set ray.num_actors to have the autoscaler add nodes for them",
                          field="ray.num_actors")
    return n


def reserve(*, num_actors: int, cpus_per_actor: float, gpus_per_actor: float,
            timeout_s: float | None) -> PlacementGroup:
    """A placement group of one bundle per device actor, placed within the timeout or a ConfigError.

    Bundles are packed onto as few nodes as hold them (``PACK``, a preference, not a rule).
    """
    bundle = {"CPU": float(cpus_per_actor)} | ({"GPU": float(gpus_per_actor)} if gpus_per_actor > 0 else {})
    amount = f"{num_actors * cpus_per_actor:g} CPUs" + (f" and {num_actors * gpus_per_actor:g} GPUs"
                                                         if gpus_per_actor > 0 else "")
    need = f"ray.num_actors={num_actors} x {_size(cpus_per_actor, gpus_per_actor)} need {amount}"
    total = ray.cluster_resources()
    too_big = (num_actors * cpus_per_actor > total.get("CPU", 0.0) + 1e-9
               or num_actors * gpus_per_actor > total.get("GPU", 0.0) + 1e-9)
    if too_big and private_local():  # nothing can join a private local Ray
        raise ConfigError(f"{need}; this local Ray has {_have()}", field="ray.num_actors")
    timeout = placement_timeout_s(timeout_s)
    group = placement_group([bundle] * num_actors, strategy="PACK")
    ready = group.ready()
    done, _ = ray.wait([ready], timeout=min(2.0, timeout))
    if not done:
        print(f"raysim: waiting up to {timeout:g} s for the cluster to place {num_actors} device actors "
              f"({amount}; it has {_have()})", file=sys.stderr)
        done, _ = ray.wait([ready], timeout=max(0.0, timeout - 2.0))
    if not done:
        remove_placement_group(group)
        raise ConfigError(f"{need}, which could not be placed within {timeout:g} s (ray.placement_timeout_s); "
                          f"the cluster has {_have()}", field="ray.num_actors")
    return group


def _size(cpus: float, gpus: float) -> str:
    return f"ray.cpus_per_actor={cpus:g}" + (f", ray.gpus_per_actor={gpus:g}" if gpus > 0 else "")


def _have() -> str:
    total, free = ray.cluster_resources(), ray.available_resources()
    text = f"{total.get('CPU', 0.0):g} CPUs ({free.get('CPU', 0.0):g} free)"
    return text + f", {total.get('GPU', 0.0):g} GPUs ({free.get('GPU', 0.0):g} free)"


@contextlib.contextmanager
def _keep_sigterm():
    """Keep this process's SIGTERM handler through ``ray.init``, which replaces it twice: with its own
    ``sys.exit`` and then with the core worker's crash handler, which prints a native stack and aborts
    (exit 134). ``raysim run`` turns SIGTERM into a clean stop: the state saved, one line, exit 130."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _start_local(*, num_cpus: int | None, num_gpus: int | None, include_dashboard: bool) -> str:
    with _single_machine_mode(), _token_notice_silenced(), _keep_sigterm():
        context = ray.init(
            address="local",  # never attach to a Ray found on the machine
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources={PRIVATE_LOCAL: 1.0},
            include_dashboard=include_dashboard,
            dashboard_host=LOOPBACK,
            _node_ip_address=LOOPBACK,
            # Ray nices its workers (15) so that they never starve a shared node's daemons;
            # here the device actors are the work, at the driver's priority.
            _system_config={"worker_niceness": 0},
            log_to_driver=False,  # worker output stays in the session's log files
            logging_level=logging.WARNING,
        )
    dashboard = f", dashboard at http://{context.dashboard_url}" if include_dashboard and context.dashboard_url else ""
    return f"local Ray ({_resources()}, loopback only{dashboard})"


def _join(*, target: str, timeout_s: float) -> str:
    scheme, _, rest = target.rpartition("://")
    if scheme and scheme != "ray":
        raise ConfigError(f"unsupported address {target!r}: use host:port, auto, local or ray://host:port", field=FIELD)
    if not scheme:
        try:  # where Ray itself would connect ("auto": RAY_ADDRESS, the recorded cluster, a running GCS)
            rest = canonicalize_bootstrap_address(target)
        except (ConnectionError, ValueError) as err:
            raise ConfigError(f"no Ray cluster found for {target!r}: {err}", field=FIELD) from err
    _probe(address=rest, given=target, timeout_s=timeout_s)
    # One GCS handshake (~40 s at most) instead of Ray's 20 if the port is not a GCS.
    with _env(RAY_gcs_server_port_wait_time_s="1"), _keep_sigterm():
        try:
            ray.init(address=target, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as err:
            hint = "is it a Ray GCS port? A cluster with token auth needs RAY_AUTH_MODE=token and its token"
            raise ConfigError(f"no Ray cluster at {target}: {err} ({hint})", field=FIELD) from err
    return f"{'Ray client' if scheme else 'cluster'} at {rest} ({_resources()})"


def _probe(*, address: str, given: str, timeout_s: float) -> None:
    """Fail fast unless something accepts TCP connections at ``address`` (host:port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"invalid address {given!r}: expected host:port", field=FIELD)
    where = given if given == address else f"{given} ({address})"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"no Ray cluster answers at {where}: {err}", field=FIELD) from err


def _resources() -> str:
    total = ray.cluster_resources()
    cpus, gpus = int(total.get("CPU", 0)), int(total.get("GPU", 0))
    return f"{cpus} CPU{'s' * (cpus != 1)}" + (f", {gpus} GPU{'s' * (gpus != 1)}" if gpus else "")


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _single_machine_mode() -> Iterator[None]:
    """Make Ray keep 127.0.0.1 as the node address so that every daemon binds to loopback.

    Otherwise Ray rewrites a loopback ``_node_ip_address`` to the host's network
    address and its daemons listen on all interfaces. Ray reads the switch once,
    at import: the constant covers this process, the variable its children.
    """
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _env(**{_SINGLE_MACHINE_ENV: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _private_token() -> dict[str, str | None]:
    """Token authentication with a fresh token in the environment (inherited by Ray's daemons), no file; what
    the variables were before."""
    from ray._raylet import Config

    saved = {key: os.environ.get(key) for key in _AUTH_ENV}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    Config.initialize("")  # Ray caches its config at import: make this process see token mode too
    return saved


def _restore_auth(saved: dict[str, str | None]) -> None:
    from ray._raylet import Config

    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    Config.initialize("")


@contextlib.contextmanager
def _token_notice_silenced() -> Iterator[None]:
    log = logging.getLogger(_TOKEN_NOTICE_LOGGER)
    saved = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(saved)
