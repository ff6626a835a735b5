"""
Several processes (torchrun + DistributedDataParallel), and token-weighted gradient accumulation.
Without torchrun's environment every helper is a no-op or the identity, so a single-process run
executes exactly what it would without this file. Plumbing: a reader of the algorithm may skip it;
the stages call it in a line.

Rules every stage follows: the same seed and data order on every rank, each rank computes on its
own share; DDP averages the gradients of the trained models in backward; statistics are all-reduced
so all ranks see the same numbers; only rank 0 prints, logs, plots and writes files (its stdout is
the job's).
"""
import contextlib
import gc
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lib.training import check_finite


def init_distributed(device="auto"):
    """Join the process group torchrun describes (RANK, LOCAL_RANK, WORLD_SIZE in the environment):
    NCCL when the ranks compute on GPUs, gloo on CPUs. Returns (rank, world_size); (0, 1) without
    torchrun. A rank other than 0 prints nothing (its stdout goes to /dev/null; errors still reach
    stderr)."""
    if "RANK" in os.environ and not dist.is_initialized():
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")
    return get_rank(), get_world_size()


def close_distributed(finished=True):
    """Leave the process group. The trained models' DDP wrappers hold it and may sit in reference
    cycles: collected now, while the interpreter is whole, not at its shutdown, where gloo's
    teardown can abort the process (a rank ending in SIGABRT after a run that succeeded).
    finished: this rank's run ended normally, so it waits for the others first (a failed rank
    must not wait for ranks that may never arrive)."""
    if dist.is_initialized():
        gc.collect()
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return get_rank() == 0


def rank_tag():
    return f" (rank {get_rank()} of {get_world_size()})" if dist.is_initialized() else ""


def wrap_ddp(module, device):
    """DDP around a trained module: in backward its gradients are averaged over the ranks (bucketed
    all-reduces overlapping the backward pass); at construction rank 0's weights are copied to every
    rank. Only a forward through the wrapper syncs. Without torchrun the module itself."""
    if not dist.is_initialized():
        return module
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def no_sync(*modules, enabled=True):
    """DDP's no_sync() for several modules: forward and backward inside it only accumulate
    gradients on this rank; the next backward outside all-reduces the sum. Gradient accumulation
    uses it on every micro-step but the last: one all-reduce per optimizer step instead of one per
    micro-step."""
    with contextlib.ExitStack() as stack:
        for m in modules:
            if enabled and isinstance(m, DDP):
                stack.enter_context(m.no_sync())
        yield


def shard(items):
    """This rank's contiguous share of a list that is the same on every rank (all of it without
    torchrun)."""
    r, n = get_rank(), get_world_size()
    return items[r * len(items) // n:(r + 1) * len(items) // n]


def all_reduce_sum(x):
    """Sum over the ranks of a tensor, or of a float or list of floats (returned as such)."""
    if not dist.is_initialized():
        return x
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = x.clone() if torch.is_tensor(x) else torch.tensor(x, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t if torch.is_tensor(x) else t.tolist()


def mean_over_ranks(metrics):
    """{name: float} -> the same names averaged over the ranks (every rank must pass the same
    names)."""
    sums = all_reduce_sum(list(metrics.values()))
    return dict(zip(metrics, [v / get_world_size() for v in sums]))


def all_gather_cat(tensors):
    """torch.cat of every rank's list of tensors, in rank order (a rank's list may be empty)."""
    local = torch.cat(tensors) if tensors else None
    if not dist.is_initialized():
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, None if local is None else local.cpu())
    device = tensors[0].device if tensors else "cpu"
    return torch.cat([p for p in parts if p is not None]).to(device)


def global_masked_mean(x, mask=None):
    """Mean of x over the entries where mask is 1, on every rank's x together: sum(x * mask) and
    sum(mask) are all-reduced, so it equals the mean over the concatenated batch. mask None: every
    entry."""
    mask = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    total = all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]))
    return total[0] / total[1].clamp(min=1)


def global_masked_var(x, mask=None):
    """Population variance over the masked entries of every rank's x (two all-reduces: mean, then
    spread)."""
    return global_masked_mean((x - global_masked_mean(x, mask)) ** 2, mask)


# ----------------------------------------------------------------------------------------------
# Gradient accumulation, token-weighted, the same under DDP


def step_total(n_local):
    """The items (tokens, prompts) of an optimizer step on all ranks together, over world_size.

    A stage's loss is the mean over every item of an optimizer step, and a step may run as several
    micro-batches (grad_accum, a memory knob) on several ranks (DDP). A micro-batch's own mean, over
    its n items, must then enter the step weighted by its share of the step's N items, not averaged
    with the other micro-batches' means (that would give the items of a small micro-batch more
    weight):

        total = step_total(n_local)              # n_local: this rank's items in the step
        for j, micro in enumerate(micro_batches):
            # DDP: one all-reduce, after the last micro-batch
            with no_sync(model, enabled=j < len(micro_batches) - 1):
                (loss(micro) * n_micro / total).backward()

    DDP AVERAGES the ranks' gradients (their sum / world_size), hence total = N / world_size: rank r
    contributes world_size * sum_r / N, and the average over ranks is sum / N, the mean over the
    whole global step, the same gradient as one process running all of it. Without torchrun
    total = N = n_local. A step without items divides by 1, not 0."""
    return max(all_reduce_sum(float(n_local)), 1.0) / get_world_size()


def accumulate_gradients(loss_fn, micro_batches, counts, modules, step="?", what="the loss"):
    """Forward and backward of one optimizer step run as micro-batches; returns the step's
    statistics.

    The step's data comes in parts, each with a loss that is a mean over its own items (SFT: the
    response tokens; PPO: the rollouts' response tokens and, for PPO-ptx, the pretraining text's
    tokens). counts[j] = {part: items of micro-batch j}. For each micro-batch,
    loss_fn(mb, share) -> (loss, stats), where share[part] is the micro-batch's part of the step's
    items (step_total above: on all ranks, divided by world_size), and the loss weights each part's
    mean by it. stats = {part: {name: mean over the micro-batch's items}}. The gradient and every
    statistic are then those of the whole step on one process.

    DDP: modules (the trained, DDP-wrapped models) all-reduce once, in the last micro-batch's
    backward. A loss that is NaN or inf stops the run before the optimizer can apply it
    (lib/training.py). Returns {name: the step's mean over all ranks, "loss": the step's loss}
    ("loss" is this function's: a stat of that name would be counted twice)."""
    totals = {part: step_total(sum(c[part] for c in counts)) for part in counts[0]}
    sums = {"loss": 0.0}
    for j, (mb, count) in enumerate(zip(micro_batches, counts)):
        share = {part: n / totals[part] for part, n in count.items()}
        with no_sync(*modules, enabled=j < len(micro_batches) - 1):
            loss, stats = loss_fn(mb, share)
            check_finite(loss, step, what)
            loss.backward()
        sums["loss"] += loss.item()
        for part, values in stats.items():
            for name, value in values.items():
                value = value.item() if torch.is_tensor(value) else value
                sums[name] = sums.get(name, 0.0) + share[part] * value
    return mean_over_ranks(sums)
