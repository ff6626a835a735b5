"""
Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290): the policy learns from the comparisons
themselves, with no reward model and no reinforcement learning. The objective InstructGPT's PPO maximises,
E[r(x, y)] - beta KL(pi || pi_ref) (InstructGPT eq. 2 without PPO-ptx), has the optimum

    pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),

so r(x, y) = beta log pi*(y|x) / pi_ref(y|x) + beta log Z(x). Put into the Bradley-Terry model of the comparisons
(InstructGPT eq. 1, what reward.py fits), Z cancels, and the comparisons' likelihood becomes a loss on the policy
itself, DPO eq. (7):

    L_DPO = -E_(x, y_w, y_l) [ log sigmoid( beta log pi(y_w|x) / pi_ref(y_w|x) - beta log pi(y_l|x) / pi_ref(y_l|x) ) ]

pi_ref is the SFT model (frozen) and the policy starts from it; every ranked pair of every ranking is one
example (the pairs reward.py's eq. 1 sees). beta log pi / pi_ref is DPO's implicit reward: its accuracy on the
validation pairs is logged like the reward model's. tests/test_optimum.py checks that the loss's minimum, with
preferences drawn from r, is the same pi* that PPO reaches.

Each step: 1. eq. (7) on a batch of pairs (the reference's log-probabilities were computed once, before
training: it never changes), 2. an AdamW step, 3. validation, progress, plot and the checkpoint (a plain GPT, like
sft.py's and ppo.py's, that every other script loads).

    python dpo.py --config tiny                      # after sft.py --config tiny, on HH-RLHF comparisons (CPU)
    python dpo.py --config small --beta 0.1          # GPT-2 124M from out/sft/ckpt.pt, on a GPU
"""

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib.checkpoints import load_model, save_checkpoint
from lib.config import MODEL_PRESETS, print_config, require, run
from lib.data import data_paths, index_batches, read_rankings
from lib.ddp import init_distributed
from lib.responses import policy_logprobs
from lib.tokens import EOS, encode_prompt, encode_response, get_tokenizer, pad_left, pad_right
from lib.tracking import MetricsLog, plot_metrics
from lib.training import autocast, check_finite, lr_at, make_adamw, setup_device


@dataclass
class Config:
    # io
    out_dir: str = "out/dpo"  # ckpt.pt (the policy, best validation loss), metrics.jsonl, dpo.png, config.json
    data_dir: str = "data/hh_rlhf"  # file names below are relative to it (absolute paths also work)
    train_files: str = "comparisons_train.jsonl"  # comma-separated; rows {prompt, chosen, rejected} or {prompt, ranked}
    val_files: str = "comparisons_val.jsonl"  # comma-separated, same formats
    init_from: str = "out/sft/ckpt.pt"  # the SFT model: the policy's start and the frozen reference pi_ref
    preset: str = ""  # name of the --config preset, recorded for the run
    log_to: str = ""  # also log metrics to wandb or tensorboard (both: wandb,tensorboard); off by default
    # dpo
    beta: float = 0.1  # beta of DPO eq. (7): the KL coefficient of the objective it solves (Rafailov et al.: 0.1)
    max_prompt_tokens: int = 256  # a longer prompt keeps its end
    max_response_tokens: int = 128  # a longer response is cut (and then carries no EOS)
    # optim
    epochs: int = 1  # passes over the training pairs (Rafailov et al.: 1 epoch on HH)
    max_steps: int = 0  # stop after this many steps (0 = the epochs decide)
    batch_size: int = 16  # pairs per step
    lr: float = 1e-6  # Rafailov et al.: 1e-6, with a warmup
    min_lr_frac: float = 1.0  # cosine decay to lr * min_lr_frac (1 = constant after warmup)
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    eval_interval: int = 20  # validate, log, plot and keep the best checkpoint every this many steps
    # system
    strict: bool = False  # refuse an input file with a malformed line (default: skip it, naming file:line)
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # autocast: auto = bfloat16 on CUDA, float32 on CPU; bfloat16 or float32 on any device
    seed: int = 1337

    RANGES = {"beta": "> 0", "max_steps": ">= 0"}
    PATHS = {"out_dir": "out_dir", "data_dir": "dir", "train_files": "data_file", "val_files": "data_file",
             "init_from": "model"}  # checked where the flags are parsed


# DEVIATION (from Rafailov et al.): AdamW instead of RMSprop, and no torchrun support yet (one process).
# The model's shape comes from --init_from (the SFT checkpoint); a preset sets the budgets and the optimizer.
CONFIGS = {
    "tiny": dict(max_prompt_tokens=128, max_response_tokens=64, batch_size=8, lr=1e-4, max_steps=200),
    **{name: dict(batch_size=32, lr=1e-6 if name in ("small", "medium") else 5e-7) for name in MODEL_PRESETS
       if name != "tiny"},
}


# ----------------------------------------------------------------------------------------------
# The math

def dpo_loss(logps_chosen, logps_rejected, ref_logps_chosen, ref_logps_rejected, beta, weights=None):
    """DPO eq. (7) on a batch of pairs: -log sigmoid(beta log pi(y_w)/pi_ref(y_w) - beta log pi(y_l)/pi_ref(y_l)).

    Each argument (P,) is a sequence log-probability log pi(y|x). Returns (loss, chosen_rewards,
    rejected_rewards): the mean loss (weighted by `weights` (P,), e.g. a labeler's probability of preferring the
    chosen response, if given) and the implicit rewards beta log pi/pi_ref of each side (P,)."""
    chosen_rewards = beta * (logps_chosen - ref_logps_chosen)  # (P,)
    rejected_rewards = beta * (logps_rejected - ref_logps_rejected)  # (P,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)  # (P,)
    weights = torch.ones_like(losses) if weights is None else weights
    return (losses * weights).sum() / weights.sum(), chosen_rewards.detach(), rejected_rewards.detach()


def sequence_logprobs(policy, ids, attention_mask, response_mask):
    """log pi(y|x): the sum of the response tokens' log-probabilities (its EOS included) -> (B,). The batch is in
    lib/responses.py's layout, prompts left-padded to P columns and then the responses, so the output layer runs
    on the R response positions only: ids, attention_mask (B, P + R), response_mask (B, R)."""
    n_query = ids.size(1) - response_mask.size(1)
    return (policy_logprobs(policy, ids, attention_mask, n_query) * response_mask).sum(1)  # (B,)


# ----------------------------------------------------------------------------------------------
# Data: rankings -> pairs of token sequences -> batches

def tokenize_pairs(rankings, enc, cfg):
    """Every ranked pair (y_w above y_l) of every ranking -> [(prompt tokens, chosen tokens, rejected tokens)],
    and how many pairs were ties (identical after the token budgets: no preference to learn)."""
    pairs, ties = [], 0
    for prompt, responses in rankings:
        p = encode_prompt(enc, prompt, cfg.max_prompt_tokens) or [EOS]  # (an empty prompt: GPT-2's start token)
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
    return batch_sequences([p for p, _, _ in pairs] * 2, [c for _, c, _ in pairs] + [r for _, _, r in pairs])


def batch_sequences(prompts, responses):
    """Each prompt left-padded and its response right-padded after it: ids, attention_mask (B, P + R),
    response_mask (B, R)."""
    queries, query_mask = pad_left(prompts)  # (B, P)
    responses, response_mask = pad_right(responses)  # (B, R)
    return torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1), response_mask


def pair_logprobs(model, pairs, device, ctx, batch_size):
    """log pi(y_w|x) and log pi(y_l|x) (P,) each, of a list of pairs, in batches of batch_size sequences. Each
    distinct (x, y) is scored once: a K-way ranking gives up to C(K, 2) pairs of only K sequences (on the lab's
    rankings, about 15x fewer forward passes than scoring both sides of every pair)."""
    row = {}  # (prompt, response) -> its index in the scored sequences
    for p, c, r in pairs:
        for y in (c, r):
            row.setdefault((tuple(p), tuple(y)), len(row))
    seqs = list(row)
    logps = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        ids, attention_mask, response_mask = (t.to(device) for t in batch_sequences(
            [list(p) for p, _ in chunk], [list(y) for _, y in chunk]))
        with ctx:
            logps.append(sequence_logprobs(model, ids, attention_mask, response_mask).float())  # (b,)
    logps = torch.cat(logps)  # (distinct sequences,)
    chosen = [row[tuple(p), tuple(c)] for p, c, _ in pairs]
    rejected = [row[tuple(p), tuple(r)] for p, _, r in pairs]
    return logps[chosen], logps[rejected]  # (P,), (P,)


@torch.no_grad()
def evaluate(policy, pairs, ref_chosen, ref_rejected, cfg, device, ctx):
    """Validation: eq. (7)'s loss, the implicit reward's pairwise accuracy and margin."""
    policy.eval()
    chosen, rejected = pair_logprobs(policy, pairs, device, ctx, 2 * cfg.batch_size)
    loss, r_w, r_l = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta)
    policy.train()
    return {"val/loss": loss.item(), "val/acc": (r_w > r_l).float().mean().item(),
            "val/margin": (r_w - r_l).mean().item()}


# ----------------------------------------------------------------------------------------------
# Training

def train(cfg):
    _, world_size = init_distributed(cfg.device)
    require(world_size == 1, "dpo.py runs in one process; torchrun is not supported yet")
    t_start = time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    print_config(cfg, cfg.out_dir)
    device = setup_device(cfg.device, cfg.seed)
    ctx = autocast(device, cfg.dtype)

    # models: the policy starts as the SFT model; the reference is a frozen copy
    policy, _ = load_model(cfg.init_from, "gpt", dropout=0.0, device=device)
    ref_policy, _ = load_model(cfg.init_from, "gpt", dropout=0.0, device=device)
    ref_policy.eval().requires_grad_(False)
    require(cfg.max_prompt_tokens + cfg.max_response_tokens <= policy.config.block_size,
            f"max_prompt_tokens + max_response_tokens exceeds the block_size {policy.config.block_size}")

    # data: every ranked pair, tokenized once; the reference's log-probabilities of each pair are computed once here
    # (pi_ref never changes)
    enc = get_tokenizer(policy.config.vocab)  # GPT-2's, or the world's the model has rows for
    train_pairs, train_ties = tokenize_pairs(read_rankings(data_paths(cfg.data_dir, cfg.train_files), cfg.strict),
                                             enc, cfg)
    val_pairs, _ = tokenize_pairs(read_rankings(data_paths(cfg.data_dir, cfg.val_files), cfg.strict), enc, cfg)
    require(train_pairs and val_pairs, "need training and validation pairs (all were ties?)")
    steps = cfg.max_steps or math.ceil(cfg.epochs * len(train_pairs) / cfg.batch_size)
    print(f"{len(train_pairs)} training pairs ({train_ties} ties dropped), {len(val_pairs)} validation pairs; "
          f"{steps} steps of {cfg.batch_size} pairs")
    with torch.no_grad():
        ref_train = pair_logprobs(ref_policy, train_pairs, device, ctx, 2 * cfg.batch_size)
        ref_val = pair_logprobs(ref_policy, val_pairs, device, ctx, 2 * cfg.batch_size)
    del ref_policy
    optimizer = make_adamw(policy.parameters(), cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    log = MetricsLog(cfg.out_dir, steps, log_to=cfg.log_to, run_config=cfg)
    ckpt_path, png_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "dpo.png")
    best = evaluate(policy, val_pairs, *ref_val, cfg, device, ctx)
    log.log(0, best)
    save_checkpoint(ckpt_path, policy, cfg, step=0, val_metrics=best)  # the SFT model until a step beats it

    batches = index_batches(len(train_pairs), cfg.batch_size, cfg.seed)
    for step in range(1, steps + 1):
        lr = lr_at(step - 1, cfg.lr, cfg.lr * cfg.min_lr_frac, cfg.warmup_steps, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 1. DPO eq. (7) on a batch of pairs
        idx = next(batches)
        ids, attention_mask, response_mask = (t.to(device) for t in collate([train_pairs[i] for i in idx]))
        with ctx:
            logps = sequence_logprobs(policy, ids, attention_mask, response_mask).float()  # (2b,)
        half = len(idx)
        loss, r_w, r_l = dpo_loss(logps[:half], logps[half:], ref_train[0][idx], ref_train[1][idx], cfg.beta)
        check_finite(loss, step, "the DPO loss")
        # 2. AdamW step
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # 3. validation, progress, plot, the best checkpoint
        metrics = {"loss": loss.item(), "acc": (r_w > r_l).float().mean().item(), "margin": (r_w - r_l).mean().item(),
                   "lr": lr}
        if step % cfg.eval_interval == 0 or step == steps:
            metrics.update(evaluate(policy, val_pairs, *ref_val, cfg, device, ctx))
            if metrics["val/loss"] < best["val/loss"]:
                best = {k: metrics[k] for k in best}
                save_checkpoint(ckpt_path, policy, cfg, step=step, val_metrics=best)
            plot_metrics(log.path, png_path, {"DPO loss (eq. 7)": ["loss", "val/loss"],
                                              "implicit reward accuracy": ["acc", "val/acc"],
                                              "implicit reward margin": ["margin", "val/margin"]},
                         title=f"dpo.py ({cfg.preset or 'custom'}, beta {cfg.beta})")
        log.log(step, metrics, keys=["loss", "acc", "val/loss", "val/acc", "lr"])
    print(f"best val loss {best['val/loss']:.4f} (accuracy {best['val/acc']:.3f}) | saved {ckpt_path} | "
          f"{time.time() - t_start:.0f}s")
    return {**best, "steps": steps, "ckpt_path": ckpt_path, "metrics_path": log.path, "png_path": png_path,
            "time_s": time.time() - t_start}


if __name__ == "__main__":
    run(train, Config, CONFIGS)
