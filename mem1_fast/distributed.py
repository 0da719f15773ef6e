"""Scale-out under torchrun: FSDP2 (`fully_shard`) for the policy and the critic, data parallel over ranks.

    torchrun --nproc-per-node 8 -m mem1_fast.train --model DIR ...      # NCCL on GPUs, gloo on CPUs

Every rank rolls out its own episodes with its own engine, on an unsharded copy of the policy that
`rollout.full_state_dict` refreshes after each update; the update runs on the sharded modules. What this module
owns is the part a sharded PPO step adds to a single-process one:

- the LM head: FSDP2 gathers a module's parameters around its forward, so the fused ops must run inside the
  forward of the module that owns the embeddings and LM head (`scoring.PackedLM`): they then see the whole,
  unsharded weight and FSDP2 reduce-scatters the gradient they return (the all-gathered weight: one [V, H]
  all-gather per micro-batch, as FSDP2 does for every layer; a vocabulary-parallel head is not implemented);
- collectives must match: every rank runs the same number of micro-batch passes (`pad_passes`), a rank with fewer
  packed batches repeats its last one with weight 0;
- normalization: losses are divided by the global token (or trajectory) count; FSDP2 averages gradients over the
  ranks, so each rank's loss is scaled by the world size (`Dist.loss_scale`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    mesh: object = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def loss_scale(self) -> float:
        return float(self.world)

    def sum(self, x):
        """Sum of a float or tensor over ranks (the value itself on one process)."""
        if not self.active:
            return x
        t = torch.as_tensor(x, dtype=torch.float64).clone()
        dist.all_reduce(t)
        return t if torch.is_tensor(x) else float(t)

    def max(self, x: int) -> int:
        if not self.active:
            return x
        t = torch.tensor(x, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def gather_objects(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Tear the process group down before the process exits (gloo's threads abort the process otherwise, at
        random)."""
        if self.active and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def init(device: str) -> Dist:
    """The process group torchrun set up (WORLD_SIZE > 1), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    from torch.distributed.device_mesh import init_device_mesh
    cuda = torch.device(device).type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(dist.get_rank(), dist.get_world_size(), init_device_mesh("cuda" if cuda else "cpu", (world,)))


def shard(root: torch.nn.Module, layers, d: Dist, bf16: bool = False) -> torch.nn.Module:
    """fully_shard every decoder layer, then the root (which keeps the embeddings, final norm and LM head, or the
    value head). bf16: parameters gathered in bf16, gradients reduced in fp32."""
    if not d.active:
        return root
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=d.mesh, mp_policy=mp)
    fully_shard(root, mesh=d.mesh, mp_policy=mp)
    return root


def pad_passes(items: list, d: Dist) -> list[tuple[object, float]]:
    """(item, weight) for the micro-batch passes of this rank: its own with weight 1, then its last one again with
    weight 0 until every rank runs as many passes (FSDP2's collectives pair up pass by pass)."""
    n = d.max(len(items))
    if not items:
        raise ValueError("a rank has no packed batch to run")
    return [(x, 1.0) for x in items] + [(items[-1], 0.0)] * (n - len(items))


def set_gradient_sync(module: torch.nn.Module, on: bool) -> None:
    """Skip the reduce-scatter for all but the last micro-batch of an accumulation (a no-op unsharded)."""
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(on)


def optimizer_state(module, opt, d: Dist) -> dict:
    """The optimizer's state to save: as is on one process; under FSDP2 gathered whole (keyed by parameter name,
    on CPU), so that any number of ranks can load it."""
    if not d.active:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module, opt, state: dict, d: Dist) -> None:
    if not d.active:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(module, opt, state, options=StateDictOptions(full_state_dict=True))


def mean_record(rec: dict, d: Dist) -> dict:
    """A metrics record averaged over ranks (numbers; flags are true when true on any rank)."""
    if not d.active:
        return rec
    recs = d.gather_objects(rec)
    out = {}
    for k, v in rec.items():
        if isinstance(v, bool):
            out[k] = any(r[k] for r in recs)
        elif isinstance(v, (int, float)) and k not in ("step",):
            out[k] = sum(r[k] for r in recs) / len(recs)
        else:
            out[k] = v
    return out
