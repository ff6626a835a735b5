"""Memory per GPU (or per CPU process) of each preset, for the README's scaling table.

1. Computed from parameter counts (models built on the meta device, no memory used): fp32
   weights (4 bytes per parameter), gradients (4), AdamW's two moments (8), and DDP's gradient
   buckets (4: DDP copies every gradient into flat buckets for its all-reduces) for the trained
   models of each stage; frozen models (PPO's reference policy and reward model) hold weights
   only. Activations are not included: they depend on the micro-batch and sequence length,
   which DDP does not change per rank.
2. Measured on CPU for `tiny`: the growth of this process's resident memory through one AdamW step,
   without and with DDP (a 1-process gloo group), against the computed bytes.
3. PPO on one GPU with LoRA (--lora_rank 8: two networks instead of four, adapters and the value
   head trained), frozen weights in bf16 (--dtype bfloat16) and activation checkpointing
   (--grad_checkpoint true), computed for every preset: weights, adapters with their gradients and
   AdamW moments, and an ESTIMATE of the largest activations for a stated rollout batch and length:
   the KV cache of generation, the saved block inputs plus one block's activations under
   checkpointing, and the logits of a micro-batch's response tokens (bf16 and their float32
   log-softmax). An estimate until someone runs it on a GPU.

    python bench/bench_memory.py
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from lib.config import MODEL_PRESETS  # noqa: E402
from lib.training import make_adamw  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

GB = 1024 ** 3


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_step_growth(model, ddp):
    """Bytes the process grows by through one forward/backward/AdamW step
    (gradients, optimizer state, buckets)."""
    before = rss()
    net = DDP(model) if ddp else model
    optimizer = make_adamw(model.parameters(), 1e-4, 0.0, (0.9, 0.95), torch.device("cpu"))
    idx = torch.randint(0, 50257, (1, 8))
    net(idx).float().mean().backward()  # a tiny batch: activations are negligible next to the state
    optimizer.step()
    return rss() - before


def main():
    for name, shape in MODEL_PRESETS.items():
        with torch.device("meta"):
            # (the critic and the reward model add n_embd + 1)
            n = sum(p.numel() for p in GPT(GPTConfig(**shape)).parameters())
        trained, ddp = 16 * n, 4 * n  # weights + gradients + AdamW moments; DDP's buckets
        frozen = 2 * 4 * n  # PPO: policy and critic trained, ref_policy and reward model frozen
        print(json.dumps({"preset": name, "params_M": round(n / 1e6, 1),
                          "sft_or_reward_GB": round(trained / GB, 2),
                          "sft_or_reward_ddp_GB": round((trained + ddp) / GB, 2),
                          "ppo_GB": round((2 * trained + frozen) / GB, 2),
                          "ppo_ddp_GB": round((2 * (trained + ddp) + frozen) / GB, 2)}))
    print("PPO with LoRA rank 8 + bf16 frozen weights + activation checkpointing, one GPU "
          f"(rollout batch {ROLLOUT}, micro-batch {MICRO}, {PROMPT} + {RESPONSE} tokens):")
    for name, shape in MODEL_PRESETS.items():
        print(json.dumps(ppo_lora_estimate(shape) | {"preset": name}))
    # each in a fresh process: memory freed by one would be reused by the other
    for ddp in (False, True):
        mode = "ddp" if ddp else "plain"
        subprocess.run([sys.executable, __file__, "--measure", mode], check=True)


ROLLOUT, MICRO, PROMPT, RESPONSE, RANK = 32, 4, 512, 128, 8  # the stated shapes of the estimate


def ppo_lora_estimate(shape, vocab=50257):
    """Bytes of PPO on one GPU with LoRA + bf16 frozen weights + activation
    checkpointing (see the docstring)."""
    L, C, T = shape["n_layer"], shape["n_embd"], PROMPT + RESPONSE
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT(GPTConfig(**shape)).parameters())
    # c_attn (C -> 3C), attn c_proj, c_fc, mlp c_proj
    adapters = L * RANK * (4 * C + 2 * C + 5 * C + 5 * C)
    # two networks (policy = ref + adapters, critic = reward model + adapters), bf16
    frozen = 2 * 2 * n
    # fp32 weights, gradients, two AdamW moments; + the value head
    trained = 16 * 2 * (adapters + C + 1)
    kv_cache = ROLLOUT * L * 2 * T * C * 2  # generate: keys and values of every layer, bf16
    # block inputs + one block recomputed (~16 C per token)
    saved = MICRO * T * C * 2 * L + MICRO * T * C * 2 * 16
    # bf16 logits and the float32 log-softmax of the response tokens
    logits = MICRO * RESPONSE * vocab * (2 + 4)
    gb = lambda b: round(b / GB, 2)
    return {"weights_bf16_GB": gb(frozen), "adapters_trained_GB": gb(trained),
            "kv_cache_GB": gb(kv_cache), "activations_GB": gb(saved + logits),
            "total_GB": gb(frozen + trained + max(kv_cache, saved + logits)),
            "full_ppo_fp32_GB": gb(2 * 16 * n + 2 * 4 * n)}


def measure(ddp):
    torch.set_num_threads(1)
    if ddp:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL_PRESETS["tiny"]))
    n = sum(p.numel() for p in model.parameters())
    growth = one_step_growth(model, ddp)
    print(json.dumps({"measured": "tiny, one step", "ddp": ddp, "params_M": round(n / 1e6, 2),
                      "growth_MB": round(growth / 2 ** 20, 1),
                      "computed_MB": round((12 + 4 * ddp) * n / 2 ** 20, 1)}), flush=True)
    if ddp:
        dist.destroy_process_group()

if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure(sys.argv[2] == "ddp")
    else:
        main()
