"""Starting JAX's distributed runtime for runs over several processes or hosts.

One process per host (or per accelerator) runs the same script; each calls
:func:`init_from_args` (or :func:`init_distributed`) before anything else
touches JAX, then builds a mesh over every process's devices
(:func:`jaxseq.training.make_mesh`) and trains with ``fit(mesh=...)``.

The settings come from flags or from the environment::

    --coordinator HOST:PORT   JAXSEQ_COORDINATOR    process 0's address, reachable by all
    --num-processes N         JAXSEQ_NUM_PROCESSES  how many processes take part
    --process-id I            JAXSEQ_PROCESS_ID     this process, 0 .. N-1
    --distributed             JAXSEQ_DISTRIBUTED=1  let JAX detect them (SLURM, Open MPI,
                                                    TPU pods, ...)
    --heartbeat-timeout S     JAXSEQ_HEARTBEAT_TIMEOUT  seconds of silence after which a
                                                    process counts as lost (JAX: 100)

With none of them the run is a plain single process. On CPU the processes
exchange gradients with the gloo collectives (set here), so N processes on one
machine, talking over localhost, train exactly as N hosts would::

    JAXSEQ_COORDINATOR=127.0.0.1:8476 JAXSEQ_NUM_PROCESSES=2 JAXSEQ_PROCESS_ID=0 python train.py &
    JAXSEQ_COORDINATOR=127.0.0.1:8476 JAXSEQ_NUM_PROCESSES=2 JAXSEQ_PROCESS_ID=1 python train.py

When a process is lost, the others do not hang. While :func:`jaxseq.fit` runs,
every process bumps a count in the runtime's key-value store twice a second and
watches the next process's count; a process that finds another gone prints which
one, at which step and the last complete checkpoint, and exits with status 75
(``PROCESS_LOST_EXIT_STATUS``):

- killed (its connections close): the others' next collective fails; they confirm
  whose count has stopped and exit about two seconds after the death;
- frozen or cut off (connections open): its watcher exits once its count has not
  moved for a third of ``--heartbeat-timeout`` (at least two seconds); the rest follow as
  their collectives fail, or at JAX's own heartbeat timeout (status 134);
- process 0 itself (which holds the runtime's service): JAX's runtime ends the
  others at once (status 134), saying that the leader task died.

Restarting every process with the same command and ``--resume`` continues from the
last checkpoint they all completed. A SIGTERM to any process (a preemption notice)
stops all of them at one step, checkpointed (see :class:`jaxseq.training.Preempted`).
"""

from __future__ import annotations

import os
import re

import jax

__all__ = [
    "add_distributed_args",
    "init_distributed",
    "init_from_args",
]

ENV_COORDINATOR = "JAXSEQ_COORDINATOR"
ENV_NUM_PROCESSES = "JAXSEQ_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSEQ_PROCESS_ID"
ENV_DISTRIBUTED = "JAXSEQ_DISTRIBUTED"
ENV_HEARTBEAT = "JAXSEQ_HEARTBEAT_TIMEOUT"


def _use_gloo_on_cpu() -> None:
    """CPU computations across processes need a collectives implementation: gloo."""
    try:
        current = jax.config.jax_cpu_collectives_implementation  # type: ignore[attr-defined]
    except AttributeError:  # a JAX without the option
        return
    if current in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _int_or_none(name: str, value, lo: int = 0):
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected an int, got {value!r}") from None
    if v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
    return v


_JAX_HEARTBEAT_S = 100  # jax.distributed.initialize's default
_heartbeat_s = _JAX_HEARTBEAT_S


def heartbeat_timeout_s() -> float:
    """The heartbeat timeout the runtime was started with (by :func:`init_distributed`)."""
    return float(_heartbeat_s)


def init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs,
) -> None:
    """Starts JAX's distributed runtime (``jax.distributed.initialize``) for multi-process runs.

    Args:
      coordinator_address: ``"host:port"`` of process 0 (None: detected on managed
        clusters, as ``jax.distributed.initialize()`` does).
      num_processes: N, the number of processes (None: detected).
      process_id: this process's index in ``[0, N)`` (None: detected).
      **kwargs: passed on (``local_device_ids``, ``initialization_timeout``, ...).

    Call it once per process, before anything else touches JAX; on CPU it
    selects the gloo collectives first::

        js.training.init_distributed("10.0.0.1:8476", num_processes=4, process_id=rank)
        mesh = js.training.make_mesh()  # spans every process's devices

    >>> import jaxseq as js
    >>> callable(js.training.init_distributed)  # (one process here: not started)
    True
    """
    if coordinator_address is not None:
        if not isinstance(coordinator_address, str) or not re.fullmatch(
            r"\S+:\d{1,5}", coordinator_address
        ):
            raise ValueError(
                f"coordinator_address: expected 'host:port' (e.g. '10.0.0.1:8476'), got "
                f"{coordinator_address!r}"
            )
    num_processes = _int_or_none("num_processes", num_processes, 1)
    process_id = _int_or_none("process_id", process_id, 0)
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(
            f"process_id: expected a value in [0, num_processes={num_processes}), got {process_id}"
        )
    _use_gloo_on_cpu()
    global _heartbeat_s
    _heartbeat_s = kwargs.get("heartbeat_timeout_seconds", _JAX_HEARTBEAT_S)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kwargs,
    )


def add_distributed_args(parser):
    """Adds the multi-process settings to an ``argparse`` parser; returns the parser.

    ``--coordinator HOST:PORT``, ``--num-processes N``, ``--process-id I`` (defaults:
    the environment variables ``JAXSEQ_COORDINATOR``, ``JAXSEQ_NUM_PROCESSES``,
    ``JAXSEQ_PROCESS_ID``) and ``--distributed`` (``JAXSEQ_DISTRIBUTED=1``: let
    JAX detect them on a managed cluster). Pass the parsed arguments to
    :func:`init_from_args`.

    >>> import argparse, jaxseq as js
    >>> p = js.training.add_distributed_args(argparse.ArgumentParser())
    >>> args = p.parse_args(["--coordinator", "127.0.0.1:8476", "--num-processes", "2",
    ...                      "--process-id", "1"])
    >>> args.coordinator, args.num_processes, args.process_id
    ('127.0.0.1:8476', 2, 1)
    """
    g = parser.add_argument_group(
        "distributed", "several processes or hosts (also from JAXSEQ_* environment variables)"
    )
    env = os.environ
    g.add_argument(
        "--coordinator",
        default=env.get(ENV_COORDINATOR) or None,
        metavar="HOST:PORT",
        help=f"address of process 0, reachable by every process (${ENV_COORDINATOR})",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        default=_int_or_none(ENV_NUM_PROCESSES, env.get(ENV_NUM_PROCESSES), 1),
        metavar="N",
        help=f"number of processes (${ENV_NUM_PROCESSES})",
    )
    g.add_argument(
        "--process-id",
        type=int,
        default=_int_or_none(ENV_PROCESS_ID, env.get(ENV_PROCESS_ID), 0),
        metavar="I",
        help=f"this process's index, 0 .. N-1 (${ENV_PROCESS_ID})",
    )
    g.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=_int_or_none(ENV_HEARTBEAT, env.get(ENV_HEARTBEAT), 1),
        metavar="S",
        help="seconds without a heartbeat after which a process counts as lost and every "
        f"other one stops (JAX's default: 100) (${ENV_HEARTBEAT})",
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        default=env.get(ENV_DISTRIBUTED, "").lower() in ("1", "true", "yes", "auto"),
        help="start the distributed runtime with the settings detected on a managed cluster "
        f"(SLURM, Open MPI, TPU pods, ...) (${ENV_DISTRIBUTED}=1)",
    )
    return parser


def init_from_args(args, **kwargs) -> bool:
    """Starts the distributed runtime as the parsed arguments of :func:`add_distributed_args` say.

    Explicit settings (``--coordinator``, ``--num-processes``, ``--process-id``, all
    three) start it with them; ``--distributed`` alone lets JAX detect them; none of
    them leaves a single process. ``kwargs`` go to ``jax.distributed.initialize``
    (e.g. ``initialization_timeout=60``). Returns whether the runtime was started.

    >>> import argparse, jaxseq as js
    >>> args = js.training.add_distributed_args(argparse.ArgumentParser()).parse_args([])
    >>> js.training.init_from_args(args)  # no settings: one process
    False
    """
    heartbeat = getattr(args, "heartbeat_timeout", None)
    if heartbeat is not None:
        kwargs.setdefault("heartbeat_timeout_seconds", heartbeat)
    coordinator = getattr(args, "coordinator", None)
    num = getattr(args, "num_processes", None)
    pid = getattr(args, "process_id", None)
    auto = bool(getattr(args, "distributed", False))
    given = {
        "--coordinator": coordinator,
        "--num-processes": num,
        "--process-id": pid,
    }
    if all(v is None for v in given.values()):
        if not auto:
            return False
        init_distributed(**kwargs)
        return True
    missing = [k for k, v in given.items() if v is None]
    if missing:
        have = ", ".join(f"{k} {v}" for k, v in given.items() if v is not None)
        raise ValueError(
            f"{missing[0][2:].replace('-', '_')}: a multi-process run needs --coordinator, "
            f"--num-processes and --process-id (or their JAXSEQ_* variables); got {have}, "
            f"missing {' and '.join(missing)} (or pass none of them and --distributed for "
            f"the cluster's auto-detection)"
        )
    init_distributed(coordinator, num, pid, **kwargs)
    return True
