"""
Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290): the policy learns from
the comparisons themselves, with no reward model and no reinforcement learning. The objective
InstructGPT's PPO maximises, E[r(x, y)] - beta KL(pi || pi_ref) (InstructGPT eq. 2 without
PPO-ptx), has the optimum

    pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),

so r(x, y) = beta log pi*(y|x) / pi_ref(y|x) + beta log Z(x). Put into the Bradley-Terry model
of the comparisons (InstructGPT eq. 1, what reward.py fits), Z cancels, and the comparisons'
likelihood becomes a loss on the policy itself, DPO eq. (7):

    L_DPO = -E_(x, y_w, y_l) [ log sigmoid( beta log pi(y_w|x) / pi_ref(y_w|x)
                                            - beta log pi(y_l|x) / pi_ref(y_l|x) ) ]

pi_ref is the SFT model (frozen) and the policy starts from it; every ranked pair of every
ranking is one example (the pairs reward.py's eq. 1 sees). beta log pi / pi_ref is DPO's implicit
reward: its accuracy on the validation pairs is logged like the reward model's.
tests/test_optimum.py checks that the loss's minimum, with preferences drawn from r, is the same
pi* that PPO reaches.

Each step: 1. eq. (7) on a batch of pairs, in micro-batches (accumulate_gradients; the
reference's log-probabilities were computed once, before training: it never changes), 2. an AdamW
step, 3. validation, progress, plot and the checkpoint (a plain GPT, like sft.py's and ppo.py's,
that every other script loads).

With --lora_rank the policy is the SFT network plus adapters and the reference is the same network
with the adapters off (no copy); the checkpoint holds the adapters, and every other script loads it
merged.

    python dpo.py --config tiny                      # after sft.py --config tiny, on HH-RLHF (CPU)
    python dpo.py --config small --beta 0.1          # GPT-2 124M from out/sft/ckpt.pt, on a GPU
    python dpo.py --config xl --lora_rank 8 --grad_checkpoint true --grad_accum 4   # less memory
    torchrun --standalone --nproc_per_node 8 dpo.py --config small   # 8 GPUs, the same global batch
"""

import copy
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib.checkpoints import load_model, lora_base, save_checkpoint
from lib.config import MODEL_PRESETS, print_config, require, run
from lib.data import data_paths, index_batches, read_rankings
from lib.ddp import accumulate_gradients, all_gather_cat, init_distributed, shard, wrap_ddp
from lib.responses import policy_logprobs
from lib.tokens import EOS, encode_prompt, encode_response, get_tokenizer, pad_left, pad_right
from lib.tracking import MetricsLog, plot_metrics, replot_due
from lib.training import (
    autocast,
    autocast_dtype,
    lr_at,
    make_adamw,
    maybe_compile,
    setup_device,
    store_frozen_in,
)
from model import add_lora, share_weights


@dataclass
class Config:
    # io
    out_dir: str = "out/dpo"  # ckpt.pt (the policy, best val loss), metrics.jsonl, dpo.png
    data_dir: str = "data/hh_rlhf"  # file names below are relative to it (absolute paths also work)
    # comma-separated; rows {prompt, chosen, rejected} or {prompt, ranked}
    train_files: str = "comparisons_train.jsonl"
    val_files: str = "comparisons_val.jsonl"  # comma-separated, same formats
    init_from: str = "out/sft/ckpt.pt"  # the SFT model: the policy's start and the frozen pi_ref
    preset: str = ""  # name of the --config preset, recorded for the run
    log_to: str = ""  # also log metrics to wandb, tensorboard or both (wandb,tensorboard)
    # dpo
    beta: float = 0.1  # DPO eq. (7): the KL coefficient it solves for (Rafailov et al.: 0.1)
    max_prompt_tokens: int = 256  # a longer prompt keeps its end
    max_response_tokens: int = 128  # a longer response is cut (and then carries no EOS)
    # optim
    epochs: int = 1  # passes over the training pairs (Rafailov et al.: 1 epoch on HH)
    max_steps: int = 0  # stop after this many steps (0 = the epochs decide)
    batch_size: int = 16  # pairs per step, all ranks together
    grad_accum: int = 1  # micro-batches of batch_size / grad_accum pairs per step (memory knob)
    lr: float = 1e-6  # Rafailov et al.: 1e-6, with a warmup
    min_lr_frac: float = 1.0  # cosine decay to lr * min_lr_frac (1 = constant after warmup)
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    eval_interval: int = 20  # steps between validations (log, plot, the best checkpoint)
    # memory (docs/scaling.md): LoRA adapters, activation checkpointing; frozen weights in --dtype
    lora_rank: int = 0  # LoRA (Hu et al. 2021): rank-r adapters on each block's projections; 0 off
    lora_alpha: float = 16.0  # LoRA: the adapters' update B A is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # LoRA: dropout on the adapters' input
    grad_checkpoint: bool = False  # recompute each block's activations in backward: less memory
    # system
    strict: bool = False  # refuse an input file with a malformed line (default: skip it, naming it)
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # autocast: auto = bfloat16 on CUDA, float32 on CPU; or bfloat16, float32
    compile: bool = False  # torch.compile the policy's training passes (inductor)
    seed: int = 1337

    RANGES = {"beta": "> 0", "max_steps": ">= 0"}
    PATHS = {"out_dir": "out_dir", "data_dir": "dir", "train_files": "data_file",
             "val_files": "data_file", "init_from": "model"}  # checked where the flags are parsed


# DEVIATION (from Rafailov et al.): AdamW instead of RMSprop.
# The model's shape comes from --init_from (the SFT checkpoint); a preset sets the budgets and the
# optimizer.
CONFIGS = {
    "tiny": dict(max_prompt_tokens=128, max_response_tokens=64, batch_size=8, lr=1e-4,
                 max_steps=200),
    **{name: dict(batch_size=32, lr=1e-6 if name in ("small", "medium") else 5e-7)
       for name in MODEL_PRESETS if name != "tiny"},
}


# ----------------------------------------------------------------------------------------------
# The math

def dpo_loss(logps_chosen, logps_rejected, ref_logps_chosen, ref_logps_rejected, beta,
             weights=None):
    """DPO eq. (7) on a batch of pairs:
    -log sigmoid(beta log pi(y_w)/pi_ref(y_w) - beta log pi(y_l)/pi_ref(y_l)).

    Each argument (P,) is a sequence log-probability log pi(y|x). Returns (loss, chosen_rewards,
    rejected_rewards): the mean loss (weighted by `weights` (P,), e.g. a labeler's probability of
    preferring the chosen response, if given) and the implicit rewards beta log pi/pi_ref of each
    side (P,).
    """
    chosen_rewards = beta * (logps_chosen - ref_logps_chosen)  # (P,)
    rejected_rewards = beta * (logps_rejected - ref_logps_rejected)  # (P,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)  # (P,)
    weights = torch.ones_like(losses) if weights is None else weights
    loss = (losses * weights).sum() / weights.sum()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def sequence_logprobs(policy, ids, attention_mask, response_mask):
    """log pi(y|x): the sum of the response tokens' log-probabilities (its EOS included) -> (B,).

    The batch is in lib/responses.py's layout, prompts left-padded to P columns and then the
    responses, so the output layer runs on the R response positions only: ids, attention_mask
    (B, P + R), response_mask (B, R)."""
    n_query = ids.size(1) - response_mask.size(1)
    return (policy_logprobs(policy, ids, attention_mask, n_query) * response_mask).sum(1)  # (B,)


# ----------------------------------------------------------------------------------------------
# Data: rankings -> pairs of token sequences -> batches

def tokenize_pairs(rankings, enc, cfg):
    """Every ranked pair (y_w above y_l) of every ranking -> [(prompt, chosen, rejected tokens)],
    and how many pairs were ties (identical after the token budgets: no preference to learn)."""
    pairs, ties = [], 0
    for prompt, responses in rankings:
        p = encode_prompt(enc, prompt, cfg.max_prompt_tokens) or [EOS]  # empty: GPT-2's start
        seqs = [encode_response(enc, r, cfg.max_response_tokens) for r in responses]
        for w in range(len(seqs)):
            for lose in range(w + 1, len(seqs)):
                if seqs[w] == seqs[lose]:
                    ties += 1
                else:
                    pairs.append((p, seqs[w], seqs[lose]))
    return pairs, ties


def collate(pairs):
    """Pairs -> one batch: the chosen sequences, then the rejected ones (see batch_sequences).
    ids, attention_mask (2P, prompt columns + response columns), response_mask (2P, R)."""
    prompts = [p for p, _, _ in pairs] * 2
    return batch_sequences(prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs])


def batch_sequences(prompts, responses):
    """Each prompt left-padded and its response right-padded after it: ids, attention_mask
    (B, P + R), response_mask (B, R)."""
    queries, query_mask = pad_left(prompts)  # (B, P)
    responses, response_mask = pad_right(responses)  # (B, R)
    ids = torch.cat([queries, responses], 1)  # (B, P + R)
    return ids, torch.cat([query_mask, response_mask], 1), response_mask


def pair_logprobs(model, pairs, device, ctx, batch_size):
    """log pi(y_w|x) and log pi(y_l|x) (P,) each, of a list of pairs, in batches of batch_size
    sequences.

    Each distinct (x, y) is scored once: a K-way ranking gives up to C(K, 2) pairs of only K
    sequences (on the lab's rankings, about 15x fewer forward passes than scoring both sides of
    every pair)."""
    row = {}  # (prompt, response) -> its index in the scored sequences
    for p, c, r in pairs:
        for y in (c, r):
            row.setdefault((tuple(p), tuple(y)), len(row))
    seqs = list(row)
    logps = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        batch = batch_sequences([list(p) for p, _ in chunk], [list(y) for _, y in chunk])
        ids, attention_mask, response_mask = (t.to(device) for t in batch)
        with ctx:
            logps.append(sequence_logprobs(model, ids, attention_mask, response_mask).float())
    logps = torch.cat(logps)  # (distinct sequences,)
    chosen = [row[tuple(p), tuple(c)] for p, c, _ in pairs]
    rejected = [row[tuple(p), tuple(r)] for p, _, r in pairs]
    return logps[chosen], logps[rejected]  # (P,), (P,)


@torch.no_grad()
def all_pair_logprobs(model, pairs, device, ctx, batch_size):
    """pair_logprobs of every pair; under DDP each rank scores its share and gets all of them."""
    chosen, rejected = pair_logprobs(model, shard(pairs), device, ctx, batch_size)
    return all_gather_cat([chosen]), all_gather_cat([rejected])  # (P,), (P,)


@torch.no_grad()
def evaluate(policy, pairs, ref_chosen, ref_rejected, cfg, device, ctx, batch_size):
    """Validation: eq. (7)'s loss, the implicit reward's pairwise accuracy and margin."""
    policy.eval()
    chosen, rejected = all_pair_logprobs(policy, pairs, device, ctx, batch_size)
    loss, r_w, r_l = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta)
    policy.train()
    return {"val/loss": loss.item(), "val/acc": (r_w > r_l).float().mean().item(),
            "val/margin": (r_w - r_l).mean().item()}


# ----------------------------------------------------------------------------------------------
# Training

def build_policy(cfg, device):
    """The policy and the frozen reference pi_ref, both the SFT model at the start.

    With LoRA the policy is the reference's network plus adapters (share_weights: no copy), so
    pi_ref is the policy with its adapters off, and the frozen weights are stored in bf16 when the
    forward passes run in it."""
    ref_policy, _ = load_model(cfg.init_from, "gpt", dropout=0.0, device=device)
    ref_policy.eval().requires_grad_(False)
    if cfg.lora_rank:
        policy = add_lora(share_weights(ref_policy), rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                          dropout=cfg.lora_dropout)
        store_frozen_in(policy, autocast_dtype(device, cfg.dtype))  # the shared, frozen base
    else:
        policy = copy.deepcopy(ref_policy).requires_grad_(True)
    policy.transformer.grad_checkpoint = cfg.grad_checkpoint
    require(cfg.max_prompt_tokens + cfg.max_response_tokens <= policy.config.block_size,
            f"max_prompt_tokens + max_response_tokens exceeds the block_size "
            f"{policy.config.block_size}")
    return policy, ref_policy


def train(cfg):
    # DDP (torchrun): batch_size is GLOBAL: each step's pairs are split over the ranks, which run
    # their share in micro-batches of batch_size / grad_accum pairs; only rank 0 prints, logs and
    # writes files.
    rank, world_size = init_distributed(cfg.device)
    t_start = time.time()
    require(cfg.batch_size % cfg.grad_accum == 0, "batch_size must be a multiple of grad_accum")
    require(cfg.batch_size >= world_size, f"{world_size} processes need at least as many pairs per "
            f"step (batch_size {cfg.batch_size}); use fewer processes")
    require(not cfg.lora_rank or cfg.init_from != "scratch",
            "LoRA adapts a pretrained model: --lora_rank needs --init_from a checkpoint")
    micro_batch_size = cfg.batch_size // cfg.grad_accum  # pairs per forward pass
    os.makedirs(cfg.out_dir, exist_ok=True)
    print_config(cfg, cfg.out_dir)
    device = setup_device(cfg.device, cfg.seed)
    ctx = autocast(device, cfg.dtype)

    # models: the policy starts as the SFT model; the reference is frozen (with LoRA: adapters off)
    policy, ref_policy = build_policy(cfg, device)
    model = wrap_ddp(maybe_compile(policy, cfg.compile), device)  # DDP: gradients averaged
    if world_size > 1:
        torch.manual_seed(cfg.seed + rank)  # DDP: the same weights, each rank its own dropout

    # data: every ranked pair, tokenized once; the reference's log-probabilities of each pair are
    # computed once here (pi_ref never changes), each rank scoring its share
    enc = get_tokenizer(policy.config.vocab)  # GPT-2's, or the world's the model has rows for
    train_rankings = read_rankings(data_paths(cfg.data_dir, cfg.train_files), cfg.strict)
    val_rankings = read_rankings(data_paths(cfg.data_dir, cfg.val_files), cfg.strict)
    train_pairs, train_ties = tokenize_pairs(train_rankings, enc, cfg)
    val_pairs, _ = tokenize_pairs(val_rankings, enc, cfg)
    require(train_pairs and val_pairs, "need training and validation pairs (all were ties?)")
    require(len(val_pairs) >= world_size, f"{world_size} processes need at least as many "
            f"validation pairs ({len(val_pairs)}); use fewer processes")
    steps = cfg.max_steps or math.ceil(cfg.epochs * len(train_pairs) / cfg.batch_size)
    print(f"{len(train_pairs)} training pairs ({train_ties} ties dropped), {len(val_pairs)} "
          f"validation pairs; {steps} steps of {cfg.batch_size} pairs in {cfg.grad_accum} "
          f"micro-batches")
    eval_batch = 2 * micro_batch_size  # sequences per forward pass: a micro-batch's both sides
    ref_train = all_pair_logprobs(ref_policy, train_pairs, device, ctx, eval_batch)
    ref_val = all_pair_logprobs(ref_policy, val_pairs, device, ctx, eval_batch)
    del ref_policy
    params = [p for p in policy.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = make_adamw(params, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    log = MetricsLog(cfg.out_dir, steps, log_to=cfg.log_to, run_config=cfg)
    ckpt_path, png_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "dpo.png")
    base = lora_base(cfg.init_from) if cfg.lora_rank else None  # a LoRA checkpoint: adapters on it
    best = evaluate(policy, val_pairs, *ref_val, cfg, device, ctx, eval_batch)
    log.log(0, best)
    save_checkpoint(ckpt_path, policy, cfg, base=base, step=0, val_metrics=best)  # SFT until beaten

    def pairs_loss(mb, share):
        """Eq. (7) on the pairs `mb` (indices into train_pairs), times their share of the step."""
        batch = collate([train_pairs[i] for i in mb])
        ids, attention_mask, response_mask = (t.to(device) for t in batch)
        with ctx:
            logps = sequence_logprobs(model, ids, attention_mask, response_mask).float()  # (2b,)
        loss, r_w, r_l = dpo_loss(logps[:len(mb)], logps[len(mb):], ref_train[0][mb],
                                  ref_train[1][mb], cfg.beta)
        stats = {"acc": (r_w > r_l).float().mean(), "margin": (r_w - r_l).mean()}
        return share["pairs"] * loss, {"pairs": stats}

    batches = index_batches(len(train_pairs), cfg.batch_size, cfg.seed)
    last_plot = float("-inf")  # when dpo.png was last drawn
    for step in range(1, steps + 1):
        lr = lr_at(step - 1, cfg.lr, cfg.lr * cfg.min_lr_frac, cfg.warmup_steps, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 1. DPO eq. (7) on a batch of pairs: this rank's share, in micro-batches
        idx = shard(next(batches))  # DDP: this rank's share
        micro = [idx[i:i + micro_batch_size] for i in range(0, len(idx), micro_batch_size)]
        counts = [{"pairs": len(mb)} for mb in micro]
        stats = accumulate_gradients(pairs_loss, micro, counts, modules=[model], step=step,
                                     what="the DPO loss")
        # 2. AdamW step
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # 3. validation, progress, plot, the best checkpoint
        metrics = {"loss": stats["loss"], "acc": stats["acc"], "margin": stats["margin"], "lr": lr}
        if step % cfg.eval_interval == 0 or step == steps:
            metrics.update(evaluate(policy, val_pairs, *ref_val, cfg, device, ctx, eval_batch))
            if metrics["val/loss"] < best["val/loss"]:
                best = {k: metrics[k] for k in best}
                save_checkpoint(ckpt_path, policy, cfg, base=base, step=step, val_metrics=best)
            if replot_due(last_plot, final=step == steps):
                last_plot = time.time()
                plot_metrics(log.path, png_path,
                             {"DPO loss (eq. 7)": ["loss", "val/loss"],
                              "implicit reward accuracy": ["acc", "val/acc"],
                              "implicit reward margin": ["margin", "val/margin"]},
                             title=f"dpo.py ({cfg.preset or 'custom'}, beta {cfg.beta})")
        log.log(step, metrics, keys=["loss", "acc", "val/loss", "val/acc", "lr"])
    print(f"best val loss {best['val/loss']:.4f} (accuracy {best['val/acc']:.3f}) | saved "
          f"{ckpt_path} | {time.time() - t_start:.0f}s")
    return {**best, "steps": steps, "ckpt_path": ckpt_path, "metrics_path": log.path,
            "png_path": png_path, "time_s": time.time() - t_start}


if __name__ == "__main__":
    run(train, Config, CONFIGS)
