"""Several processes on one prune: the ``torch.distributed`` collectives (issue 13).

A launcher (``torchrun``, ``accelerate launch``) starts N copies of ``obs-compress prune``
and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_from_environment` joins them into one process group (NCCL on GPUs, gloo on the
CPU) with a timeout, so no rank waits forever on a dead or stuck peer. Then, per block:

* calibration: rank ``r`` forwards only its contiguous share of the ``n_samples`` sequences
  (:meth:`ProcessGroup.local_samples`, ``torch.tensor_split``), so its activations
  ``(n_samples / N, seq_len, hidden)`` are 1/N of a single process's;
* curvature: each Hessian accumulator's raw sum ``sum x x^T: (d_in, d_in)`` (fp32) and its
  token count are summed over the ranks (``all_reduce``) before any solve, so every rank
  holds the same ``H = 2 X^T X / n`` as one process over all samples, up to the order of
  the fp32 additions;
* solve: the units of one block (the layers one ``prune_weight`` call solves together) are
  spread over the ranks by :func:`assign_by_cost` (longest first onto the least loaded rank),
  each rank solves its own, then every pruned weight is broadcast from the rank that solved
  it (and its :class:`~obs_compress.report.LayerStats` with it), so every rank re-forwards
  its samples through the same pruned block.

Only rank 0 writes (the writer, manifest and report: :mod:`obs_compress.stream`). Every
collective goes through :meth:`ProcessGroup._collective`, which turns a peer's death (gloo:
connection closed) or a timeout into a :class:`~obs_compress.errors.DistributedError` naming
this rank, the step and the timeout. The math stays in ``math/``: this module only moves
tensors.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .errors import DistributedError, InvalidArgument
from .math.hessian import HessianAccumulator

logger = logging.getLogger(__name__)

# A rank with little work waits at the broadcast while another solves the block's largest
# layer; on a 400B model that can take many minutes, so the default is generous.
DEFAULT_TIMEOUT_S = 1800.0
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def world_size_from_environment() -> int:
    """``WORLD_SIZE`` as a launcher set it; 1 when no launcher started this process."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        raise InvalidArgument(f"WORLD_SIZE={value!r} is not an integer") from None
    if size < 1:
        raise InvalidArgument(f"WORLD_SIZE={value!r} must be >= 1")
    return size


def assign_by_cost(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank that solves each unit: longest processing time first, each unit onto the
    rank with the least cost so far (ties: the lower unit index, then the lower rank).

    A pure function of ``costs``, so every rank computes the same assignment."""
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += costs[index]
    return owners


def solve_cost(rows: int, d_in: int, method: str) -> float:
    """A unit's relative cost: ``d_in^3`` for the inverse plus ``rows * d_in^2`` for the OBS
    updates (and the measured loss); a magnitude or OBD mask is ``rows * d_in`` plus the
    measured loss's ``rows * d_in^2`` when a Hessian is there."""
    if method == "magnitude":
        return float(rows * d_in)
    if method == "obd":
        return float(rows * d_in * d_in)
    return float(d_in ** 3 + 2 * rows * d_in * d_in)


@dataclass
class ProcessGroup:
    """This process's place in a run of ``world_size`` processes."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    timeout_s: float
    device: torch.device | None  # where this rank computes (cuda:LOCAL_RANK under NCCL)

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the output folder; the others never touch it."""
        return self.rank == 0

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except DistributedError:
            raise
        except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses of their own
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                f"another rank died or did not answer within the {self.timeout_s:g} s "
                "process-group timeout; the run stops and commits no output folder") from exc

    def local_samples(self, input_ids: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of ``input_ids: (n_samples, seq_len)``."""
        if input_ids.shape[0] < self.world_size:
            raise InvalidArgument(f"{input_ids.shape[0]} calibration samples cannot be split "
                                  f"over {self.world_size} processes: give at least one per "
                                  "process (calibration.n_samples)")
        return torch.tensor_split(input_ids, self.world_size)[self.rank]

    def check_same(self, what: str, value: Any) -> None:
        """Refuse a run whose ranks disagree on ``value`` (JSON-able), naming the ranks."""
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str)
                                .encode()).hexdigest()
        gathered: list[Any] = [None] * self.world_size
        with self._collective(f"comparing the {what}"):
            torch.distributed.all_gather_object(gathered, digest)
        differ = [rank for rank, other in enumerate(gathered) if other != gathered[0]]
        if differ:
            raise DistributedError(f"rank {self.rank}: ranks {differ} have another {what} than "
                                   "rank 0; every process must run the same command on the "
                                   "same files")

    def all_reduce_accumulators_(self, accumulators: Sequence[Any], where: str) -> None:
        """In place: each accumulator's sum and token count summed over the ranks."""
        for accumulator in accumulators:
            if not isinstance(accumulator, HessianAccumulator):
                raise InvalidArgument(f"{where}: {type(accumulator).__name__} cannot be summed "
                                      "over processes (it keeps H^-1, not H): use inverse: "
                                      "cholesky with several processes")
            count = torch.tensor([accumulator.n_tokens], dtype=torch.int64,
                                 device=accumulator.sum_outer.device)
            with self._collective(f"summing the Hessian of {accumulator.name} ({where})"):
                torch.distributed.all_reduce(accumulator.sum_outer)
                torch.distributed.all_reduce(count)
            accumulator.n_tokens = int(count.item())

    def share_solved_(self, units: Sequence[Sequence[Any]], owners: Sequence[int],
                      stats: list[Any], where: str) -> None:
        """In place: every unit's pruned weights broadcast from its owner into each rank's
        parameters, and ``stats[i]`` (the owner's list of LayerStats) filled on every rank.

        ``units[i]``: the layer plans solved together; ``owners[i]``: the rank that did."""
        for index, (plans, owner) in enumerate(zip(units, owners)):
            for plan in plans:
                weight = plan.layer.module.weight
                with self._collective(f"broadcasting {plan.layer.name} from rank {owner} "
                                      f"({where})"):
                    torch.distributed.broadcast(weight.data, src=owner)
            box = [stats[index]]
            with self._collective(f"broadcasting the statistics of rank {owner} ({where})"):
                torch.distributed.broadcast_object_list(box, src=owner, device=self._object_device)
            stats[index] = box[0]

    @property
    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None

    def barrier(self, what: str) -> None:
        with self._collective(f"waiting for {what}"):
            if self.backend == "nccl":
                torch.distributed.barrier(device_ids=[self.local_rank])
            else:
                torch.distributed.barrier()

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_from_environment(device: torch.device | None, *,
                          timeout_s: float = DEFAULT_TIMEOUT_S) -> ProcessGroup | None:
    """Join the launcher's process group, or None when ``WORLD_SIZE`` is 1 or unset.

    ``device``: the run's compute device; ``cuda`` becomes ``cuda:LOCAL_RANK`` and the backend
    NCCL, anything else gloo. Refuses a half-set launcher environment by naming what lacks."""
    world_size = world_size_from_environment()
    if world_size == 1:
        return None
    missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
    if missing:
        raise InvalidArgument(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start "
                              "several processes with torchrun or accelerate launch")
    if not timeout_s > 0:
        raise InvalidArgument(f"the process-group timeout must be > 0 s, got {timeout_s}")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device is not None and device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    group = ProcessGroup(rank=rank, world_size=world_size, local_rank=local_rank,
                         backend=backend, timeout_s=timeout_s, device=device)
    with group._collective("joining the process group"):
        torch.distributed.init_process_group(
            backend=backend, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": device} if backend == "nccl" else {}))
    logger.info("rank %d of %d (%s, %s, timeout %g s)", rank, world_size, backend,
                device if device is not None else "cpu", timeout_s)
    return group


__all__ = ["DEFAULT_TIMEOUT_S", "ProcessGroup", "assign_by_cost", "init_from_environment",
           "solve_cost", "world_size_from_environment"]
