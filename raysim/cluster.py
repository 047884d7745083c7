"""Start or join the Ray that a raysim run uses.

No address (or ``"local"``) starts a private single-machine Ray: every daemon
listens on 127.0.0.1 only, no dashboard unless asked, and nothing found on the
machine (a running Ray, an address recorded under /tmp/ray) is ever attached.
``"auto"``, ``host:port`` or ``RAY_ADDRESS`` join an existing cluster; an
address that does not answer fails within ``connect_timeout_s`` with a
:class:`ConfigError` instead of Ray's own retry loop (minutes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping

import ray
import ray._private.ray_constants as ray_constants
from ray._private.services import canonicalize_bootstrap_address

from raysim.errors import ConfigError

FIELD = "ray.address"
LOOPBACK = "127.0.0.1"
# Ray's single-machine mode: node address = loopback, so daemons bind to it.
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Logger of Ray's notice that it turned token auth on (it stays on; we keep it quiet).
_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"

_initialised_here = False


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
) -> str:
    """Initialise Ray for a run and describe it in one line.

    ``num_cpus``/``num_gpus``/``include_dashboard`` size a local Ray only; a
    cluster brings its own. A Ray already initialised in this process is reused.
    """
    global _initialised_here
    if ray.is_initialized():
        return f"Ray already running in this process ({_resources()})"
    target = resolve_address(address=address)
    if target is None:
        description = _start_local(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard)
    else:
        description = _join(target=target, timeout_s=connect_timeout_s)
    _initialised_here = True
    return description


def shutdown() -> None:
    """Stop the Ray that :func:`connect` started or joined; a reused one is left running."""
    global _initialised_here
    if _initialised_here:
        ray.shutdown()
        _initialised_here = False


def _start_local(*, num_cpus: int | None, num_gpus: int | None, include_dashboard: bool) -> str:
    with _single_machine_mode(), _token_notice_silenced():
        context = ray.init(
            address="local",  # never attach to a Ray found on the machine
            num_cpus=num_cpus,
            num_gpus=num_gpus,
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
    with _env(RAY_gcs_server_port_wait_time_s="1"):
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


@contextlib.contextmanager
def _token_notice_silenced() -> Iterator[None]:
    log = logging.getLogger(_TOKEN_NOTICE_LOGGER)
    saved = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(saved)
