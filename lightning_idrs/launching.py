"""Starting a certify job on one or many processes (Lightning Fabric), and keeping its ranks in step.

* :func:`launch`: a launched Fabric for the options; refuses what would hang or run a job per process
  (several nodes without torchrun / SLURM, a topology other than the one the launcher started).
* :func:`agree`: every rank must hold the same checkpoint digest, data fingerprint and settings
  before the first point, else all of them stop with one line naming what differs.
* :func:`collective`: a collective whose peer died becomes one line saying the run stopped and how
  to resume it (instead of gloo's / NCCL's traceback).
* :func:`fault_point`: a testing hook (:data:`FAULT_VARIABLE`) that stops the job hard at an exact point.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from contextlib import contextmanager

from lightning_idrs.arguments import UsageError, one_line

__all__ = ["FAULT_VARIABLE", "PeerLostError", "agree", "collective", "fault_point", "launch", "is_rank_zero",
           "started_processes", "terminate_as_interrupt"]


_RANK = None  # this process's global rank once launched (the process group may be gone when it is asked)

#: A testing hook, unset in normal use: ``kill-after-chunks=N`` makes the process SIGKILL itself, and
#: ``term-after-chunks=N`` send SIGTERM to its process group (as a scheduler stops a job), right after the
#: round that completes this run's N-th chunk (rank 0: once its rows are appended and fsync'ed; other ranks:
#: once they are gathered); ``@rankR`` limits it to global rank R. Tests stop a run at an exact point with it.
FAULT_VARIABLE = "LIGHTNING_IDRS_FAULT"
_FAULT = None  # (signal, chunks, rank or None) of FAULT_VARIABLE, read once by launch()


class PeerLostError(RuntimeError):
    """Another process of the job died (killed, out of memory, a lost node): exit code 1."""


def started_processes():
    """(launcher, number of processes, processes per node) when torchrun or SLURM started this process,
    else (None, 1, 1)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return "torchrun", int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", 0) or 0)
    if SLURMEnvironment.detect():
        per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        return "SLURM", int(os.environ["SLURM_NTASKS"]), int(per_node) if per_node.isdigit() else 0
    return None, 1, 1


def _check_topology(devices: int, num_nodes: int) -> None:
    """The processes a launcher started must be the ones the options describe, node by node."""
    processes = devices * num_nodes
    launcher, started, per_node = started_processes()
    if launcher is None:
        if num_nodes > 1:  # nobody starts the other nodes' processes: it would wait for them forever
            raise UsageError(f"--certify.num_nodes {num_nodes} needs the processes of the other nodes, which only "
                             "torchrun or SLURM (srun) start; launch the command with one of them, or use "
                             "--certify.num_nodes 1")
        return
    if started != processes:  # else every process would run a job of its own
        raise UsageError(f"{launcher} started {started} processes but --certify.devices x --certify.num_nodes = "
                         f"{devices} x {num_nodes} = {processes}; make them match")
    if per_node and per_node != devices:
        raise UsageError(f"{launcher} started {per_node} process(es) per node but --certify.devices is {devices} "
                         f"(and --certify.num_nodes {num_nodes}); set --certify.devices {per_node} "
                         f"--certify.num_nodes {started // per_node}")


def _read_fault():
    value = os.environ.get(FAULT_VARIABLE, "")
    if not value:
        return None
    match = re.fullmatch(r"(kill|term)-after-chunks=([1-9][0-9]*)(?:@rank([0-9]+))?", value)
    if match is None:
        raise UsageError(f"{FAULT_VARIABLE}={value} is not a fault of the testing hook: kill-after-chunks=N or "
                         "term-after-chunks=N, optionally with @rankR (e.g. kill-after-chunks=2@rank1); or unset it")
    action, chunks, rank = match.groups()
    return {"kill": signal.SIGKILL, "term": signal.SIGTERM}[action], int(chunks), None if rank is None else int(rank)


def fault_point(chunks_done: int) -> None:
    """Stop as :data:`FAULT_VARIABLE` asks once this run's ``chunks_done`` chunks are written."""
    if _FAULT is None or chunks_done < _FAULT[1] or _FAULT[2] not in (None, _RANK):
        return
    if _FAULT[0] == signal.SIGKILL:
        os.kill(os.getpid(), signal.SIGKILL)
    else:  # certify's SIGTERM handler raises KeyboardInterrupt at once, in this very call
        os.killpg(os.getpgrp(), signal.SIGTERM)


def launch(opts):
    """A Lightning Fabric for ``opts`` (a CertifyOptions), launched: with several devices it starts the
    other processes (torchrun and SLURM start them instead); every process then runs the rest of the job."""
    import torch
    from lightning_fabric import Fabric

    global _RANK, _FAULT
    _FAULT = _read_fault()  # before any process starts: a malformed value is one error line

    accelerator = {"cuda": "gpu"}.get(opts.device, opts.device) if opts.device else opts.accelerator
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise UsageError(f"--certify.{'device cuda' if opts.device else 'accelerator gpu'}: no CUDA GPU is "
                         "available (use cpu or auto)")
    if opts.precision == "16-mixed" and (accelerator == "cpu" or not torch.cuda.is_available()):
        raise UsageError("--certify.precision 16-mixed needs a CUDA GPU (on CPU Lightning runs bf16 instead); "
                         "use bf16-mixed or 32-true on CPU")
    _check_topology(opts.devices, opts.num_nodes)
    launcher = started_processes()[0]
    strategy = opts.strategy or ("ddp" if opts.devices * opts.num_nodes > 1 else "auto")
    try:
        fabric = Fabric(accelerator=accelerator, devices=opts.devices, num_nodes=opts.num_nodes, strategy=strategy,
                        precision=opts.precision)
    except Exception as error:  # Lightning reports impossible combinations with several exception types
        raise UsageError(f"cannot run on {opts.devices} device(s) x {opts.num_nodes} node(s) with strategy "
                         f"{strategy!r} and precision {opts.precision}: {one_line(error)}") from None
    if fabric.device.type == "cpu" and opts.devices > 1:  # processes share the cores instead of fighting for them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.devices))
    try:  # checks the options against torchrun's / SLURM's processes, then starts or joins them
        fabric.launch()
    except (ValueError, RuntimeError, IndexError) as error:  # e.g. tasks per node, or a taken MASTER_PORT
        raise UsageError(f"cannot start {opts.devices} process(es) x {opts.num_nodes} node(s) here: {one_line(error)}"
                         + (f" (--certify.devices must match the tasks per node {launcher} started)" if launcher
                            else "")) from None
    _RANK = fabric.global_rank
    return fabric


@contextmanager
def collective(what: str):
    """Run collectives; a peer that died (a closed connection, a timeout) becomes :class:`PeerLostError`."""
    try:
        yield
    except PeerLostError:
        raise
    except RuntimeError as error:  # torch.distributed.DistError and gloo's / NCCL's RuntimeErrors
        reason = re.sub(r"\[[^\]]*\]\s*", "", one_line(error)).split(". ")[0][:80]  # gloo: "[file:line] text"
        raise PeerLostError(f"{what}: another process of the job stopped ({reason})") from None


def agree(fabric, identity: dict) -> None:
    """Stop every rank, before the first point, unless all ranks hold the same ``identity`` (checkpoint
    digest, data fingerprint, settings): else one model's rows would be mixed with another's."""
    if fabric.world_size == 1:
        return
    with collective("comparing the ranks' settings"):
        everyone = _gather(identity)
    differ = sorted({key for other in everyone for key in set(identity) | set(other)
                     if other.get(key) != everyone[0].get(key)})
    if differ:
        ranks = [rank for rank, other in enumerate(everyone) if other != everyone[0]]
        raise UsageError(f"the processes of the job do not agree on {', '.join(differ[:6])} (rank(s) {ranks[:8]} "
                         "differ from rank 0): start every node on the same checkpoint, data and options")


def _gather(obj) -> list:
    import torch.distributed as dist

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def terminate_as_interrupt():
    """Treat SIGTERM (a scheduler's stop, ``kill``) like Ctrl-C: the job stops and can be resumed.
    Returns the previous handler (``signal.signal`` restores it)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        return None


def is_rank_zero() -> bool:
    """Whether this process speaks for the job (rank 0, or not distributed)."""
    if _RANK is not None:
        return _RANK == 0
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch else None
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) == 0
