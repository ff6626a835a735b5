"""
What every training loop shares: device and precision (the few GPU paths, each of which also runs
on CPU; frozen weights stored in bf16), the random state saved for exact resumption, AdamW with
decay on matrices only, the learning-rate schedule, the divergence check, and swapping weights in
for a while (the policy's EMA). Plumbing: a reader of the algorithm may skip this file.
"""
import contextlib
import math
import os
import sys

import torch
import torch.distributed as dist


def setup_device(device="auto", seed=1337):
    torch.manual_seed(seed)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: --device {device}, but PyTorch sees no CUDA GPU here "
                 f"(torch.cuda.is_available() is False; a CPU-only build of torch, or no driver): "
                 f"use --device cpu, or auto")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        sys.exit(f"error: --device {device}, but PyTorch sees {torch.cuda.device_count()} "
                 f"CUDA GPU(s) here")
    if device.startswith("cuda") and dist.is_initialized():
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun: each rank its own GPU
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(device)


def rng_state():
    """The global random state (CPU, and every CUDA device), saved in checkpoints so that a resumed
    run draws the same dropout masks as an uninterrupted one."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast_dtype(device, dtype="auto"):
    """The precision of the forward passes: bf16 for "bfloat16" on any device and for "auto" on
    CUDA; else float32. The CPU runs the same bf16 code path as a GPU when asked for, so the tests
    cover it; float32 stays the CPU's default, since most CPUs have no fast bf16 matrix units."""
    bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def autocast(device, dtype="auto"):
    """Mixed precision for the forward passes: bf16 autocast (see autocast_dtype), else a no-op
    context."""
    if autocast_dtype(device, dtype) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def store_frozen_in(model, dtype):
    """Store the frozen weights of `model` (requires_grad False: a reference policy, a reward model,
    the base under LoRA adapters) in `dtype`: bf16 halves their memory, and forward passes under
    bf16 autocast read them in bf16 anyway. Trained weights stay float32 for the optimizer. A no-op
    for None."""
    for p in [] if model is None else model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def maybe_compile(model, enabled):
    """torch.compile (inductor) when asked for: Triton kernels on CUDA, C++ on the CPU (it needs a C
    compiler, e.g. gcc). The first steps pay the compilation, tens of seconds."""
    return torch.compile(model) if enabled else model


def make_adamw(params, lr, weight_decay, betas, device, eps=1e-8):
    """AdamW with weight decay on matrices (embeddings, Linear weights) only, never on biases and
    LayerNorm gains. fused=True: one kernel for all parameters, ~5x faster than the default loop on
    CPU as well."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(step, lr, min_lr, warmup_steps, total_steps):
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr, then cosine decay to
    min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (lr - min_lr)


def check_finite(x, step, what="loss"):
    """Stop the run if `x` (a number or a tensor) holds NaN or inf: training diverged at `step`.
    Every stage calls it on each step's loss before the optimizer step, so non-finite gradients are
    never applied, and save_checkpoint calls it on the weights, so a checkpoint with NaN weights is
    never written."""
    finite = math.isfinite(x) if isinstance(x, (int, float)) else bool(torch.isfinite(x).all())
    if not finite:
        raise FloatingPointError(
            f"{what} is NaN or inf at step {step}: training diverged. Likely cause: a learning "
            f"rate too high for this model (lower --lr) or unclipped gradients (--grad_clip 1.0). "
            f"Nothing was saved from this step on; the last checkpoint written before it is "
            f"unchanged.")


@contextlib.contextmanager
def weights_swapped(model, weights):
    """`model` with `weights` ({name: tensor}, e.g. the EMA) in place of those parameters inside the
    block."""
    params = dict(model.named_parameters())
    own = {k: params[k].detach().clone() for k in weights}
    with torch.no_grad():
        for k, w in weights.items():
            params[k].copy_(w)
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, w in own.items():
                params[k].copy_(w)
