"""The device mesh and the helpers that move arrays across devices and processes.

One mesh axis, `data`, over all devices of all processes: the batch is split over it,
parameters and statistics are replicated. Every helper here works the same with one
process and with many (`jax.distributed`), where an array may span other processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis `data` over `devices` (default: every device of every process)."""
  return jax.sharding.Mesh(np.array(devices or jax.devices()), (DATA_AXIS,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The whole value on every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over the `data` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def per_device_map(fn: Callable, mesh: jax.sharding.Mesh, *, in_specs, out_specs) -> Callable:
  """`fn` run on each device's shard of the batch (`jax.shard_map` over `data`).

  Inside `fn`, reduce with `mean_over_devices` so that the gradient taken outside is that
  of the mean of the per-device losses, as with PyTorch DDP.
  """
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def mean_over_devices(tree):
  """pmean over `data` of every leaf (inside `per_device_map` only)."""
  return jax.tree.map(lambda v: jax.lax.pmean(v, DATA_AXIS), tree)


def to_host(tree):
  """numpy copies of a tree of replicated arrays, also when they span other processes.

  `jax.device_get` refuses arrays with devices of other processes; a replicated array
  holds the whole value on each of this process's devices.
  """

  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      if not a.sharding.is_fully_replicated:
        raise ValueError(f"to_host needs a replicated array; got sharding {a.sharding}.")
      return np.asarray(a.addressable_data(0))
    return np.asarray(a)

  return jax.tree.map(one, tree)


def global_to_host(a) -> np.ndarray:
  """The whole of a batch-sharded array on this host (gathered when it spans processes)."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
  return np.asarray(jax.device_get(a))


def exists_on_all_processes(path: str) -> bool:
  """Whether `path` is a directory, as process 0 sees it (the same answer everywhere).

  Orbax saves are collective, so every process must take the same branch; a process that
  looked after process 0 had started writing could otherwise skip the save and leave
  process 0 waiting in it.
  """
  exists = os.path.isdir(path)
  if jax.process_count() > 1:
    exists = bool(multihost_utils.broadcast_one_to_all(np.asarray(exists)))
  return exists


def check_same_on_all_processes(settings: dict) -> None:
  """Raises ValueError on every process when some process was started with other
  `settings` (a JSON-able dict: the config, the workdir) than process 0.

  A process with another config would reach other collectives and hang the job; the
  message names the differing keys (on the differing process) and the processes (on all).
  """
  if jax.process_count() == 1:
    return
  mine = json.dumps(settings, sort_keys=True, default=str).encode()
  size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(mine), np.int32)))
  buffer = np.zeros(size, np.uint8)
  buffer[: min(size, len(mine))] = np.frombuffer(mine[:size], np.uint8)
  first = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8))
  differs = first != mine
  flags_ = np.asarray(multihost_utils.process_allgather(np.asarray(differs, np.int32)))
  if not flags_.any():
    return
  others = [i for i, f in enumerate(flags_.reshape(-1)) if f]
  detail = ""
  if differs:
    a = traverse_util.flatten_dict(json.loads(first), sep=".")
    b = traverse_util.flatten_dict(json.loads(mine), sep=".")
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    detail = f" (this is process {jax.process_index()}; differing: {', '.join(keys)})"
  raise ValueError(
    f"process(es) {others} were started with another config or workdir than process 0"
    f"{detail}: start every process with the same command."
  )


def peer_lost_message(error: Exception, workdir: str) -> str:
  """The one error line of a multi-process run whose collective failed (a peer died)."""
  first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
  resume = f"step {max(steps)}" if steps else "the start (no checkpoint yet)"
  return (
    f"error: process {jax.process_index()} of {jax.process_count()} lost its peers "
    f"({first}); another process stopped or was killed. Restart all processes with the same "
    f"command: the run resumes from {resume}."
  )
