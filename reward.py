"""
Stage 2 of InstructGPT (Ouyang et al. 2022, arXiv:2203.02155, section 3.5 and appendix C.2):
train a reward model (RM) on human rankings of responses.

The RM is the SFT model with its unembedding replaced by a scalar head (model.ScalarGPT). It reads
prompt + response + EOS and its score r(x, y) is the head's output at that final EOS token. For a
prompt x with K ranked responses, all C(K, 2) pairs (y_w preferred to y_l) form ONE batch element:

    loss(theta) = -1/C(K,2) * E_{(x, y_w, y_l) ~ D} [ log sigmoid(r(x, y_w) - r(x, y_l)) ]  (eq. 1)

so the K responses of a prompt are scored in one forward pass, each distinct response once
(lib/responses.py's score_sequences, the read-out ppo.py and the evaluations share) and the
correlated pairs of one ranking count as one example (the paper found that shuffling them as
separate examples overfits in one epoch).
Since eq. (1) only sees differences of scores, after training the head's bias is set so that the
labeler demonstrations score 0 on average ("we normalize the reward model using a bias so that the
labeler demonstrations achieve a mean score of 0 before doing RL"); ppo.py uses that checkpoint as
is.

Each optimizer step, numbered as in train(): 1. eq. (1) on a batch of rankings
(accumulate_gradients), 2. an AdamW step, 3. validation (loss, pairwise accuracy), progress and the
--resume state; after the last step, 4. the normalisation (normalise).

Data: JSON lines, either {"prompt", "chosen", "rejected"} (HH-RLHF, K = 2, written by
data/hh_rlhf/prepare.py) or {"prompt", "ranked": [best, ..., worst]} (K-way), mixed freely. Pairs of
identical responses (ties) are dropped and counted.

References: InstructGPT eq. (1) and C.2 (one epoch, lr 9e-6 cosine to 10%, batch 64 prompts);
Stiennon et al. 2020 (arXiv:2009.01325) section 3.4 and OpenAI's summarize-from-feedback reward
model.

    python reward.py --config tiny                     # after sft.py --config tiny (~4 min, CPU)
    python reward.py --config tiny --init_from scratch  # without an SFT model
    python reward.py --config small                    # GPT-2 124M from out/sft/ckpt.pt, on a GPU
    python reward.py --config small --resume true      # continue from out/reward/last.pt
    torchrun --standalone --nproc_per_node 8 reward.py --config small   # 8 GPUs, same global batch
"""

import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib import ddp
from lib.checkpoints import check_resumable, load_model, lora_base, lora_settings, save_checkpoint
from lib.config import MODEL_PRESETS, print_config, require, run
from lib.data import data_paths, ranking_problem, read_jsonl, read_rankings
from lib.ddp import (
    all_gather_cat,
    get_rank,
    get_world_size,
    init_distributed,
    shard,
    wrap_ddp,
)
from lib.responses import rm_tokens, score_sequences, score_token_lists
from lib.tokens import get_tokenizer, pad_right
from lib.tracking import MetricsLog, plot_metrics
from lib.training import (
    autocast,
    autocast_dtype,
    check_finite,
    lr_at,
    make_adamw,
    maybe_compile,
    rng_state,
    set_rng_state,
    setup_device,
    store_frozen_in,
)
from model import add_lora


@dataclass
class Config:
    # io
    out_dir: str = "out/reward"  # ckpt.pt, last.pt (unnormalised), metrics.jsonl, reward.png
    resume: bool = False  # continue from out_dir/last.pt (weights, optimizer, step, random state)
    data_dir: str = "data/hh_rlhf"  # file names below are relative to it (absolute paths also work)
    train_files: str = "comparisons_train.jsonl"  # comma-separated; chosen/rejected or ranked rows
    val_files: str = "comparisons_val.jsonl"  # comma-separated, same formats
    demo_file: str = "sft_val.jsonl"  # for the bias: {prompt, response} rows, or comparisons' best
    init_from: str = "out/sft/ckpt.pt"  # SFT ckpt (paper: SFT or GPT-3 6B), GPT-2 name or "scratch"
    preset: str = ""  # name of the --config preset, recorded for the run
    eval_interval: int = 25  # steps between validation passes (also run at step 0 and at the end)
    log_interval: int = 1  # steps between progress lines
    log_to: str = ""  # also log to wandb or tensorboard (both: wandb,tensorboard); off by default
    # model (shape used only with init_from=scratch)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 512
    dropout: float = 0.0  # off: the reward model should score the same text the same way
    # DEVIATION: the paper's GPT-3 RM reads up to 2048 tokens; we cut prompts and responses to fit
    # GPT-2's 1024 positions (and a CPU budget for tiny). Cut pairs still end with EOS, where the
    # score is read.
    max_prompt_tokens: int = 192  # a longer prompt keeps its end
    max_response_tokens: int = 96  # a longer response is cut; EOS is appended after it anyway
    # optim
    epochs: int = 1  # paper: 1 ("multiple epochs quickly overfit")
    max_steps: int = 0  # stop after this many steps if > 0 (quick runs)
    batch_size: int = 8  # prompts per step, all ranks, each with its C(K,2) pairs (paper: 64)
    grad_accum: int = 1  # micro-batches of batch_size / grad_accum prompts (a memory knob)
    lr: float = 1e-4  # peak learning rate (paper: 9e-6 for the 6B RM)
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac (paper: 10%)
    warmup_steps: int = 10  # linear warmup (DEVIATION: C.2 has none; it guards the fresh head)
    weight_decay: float = 0.0  # AdamW, on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    # memory (docs/scaling.md): LoRA, activation checkpointing; frozen copies follow --dtype
    lora_rank: int = 0  # LoRA (Hu et al. 2021): rank-r adapters on the blocks' projections; 0 = off
    lora_alpha: float = 16.0  # LoRA: the adapters' update B A is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # LoRA: dropout on the adapters' input
    grad_checkpoint: bool = False  # recompute activations in the backward: less memory, ~1/3 slower
    # system
    strict: bool = False  # refuse an input file with a malformed line (default: skip it, say where)
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # autocast: auto = bfloat16 on CUDA, float32 on CPU; or bfloat16, float32
    compile: bool = False  # torch.compile the model
    seed: int = 1337

    RANGES = {"max_steps": ">= 0"}  # 0 = no limit (lib/config.py's FIELD_RANGES asks >= 1)
    PATHS = {"out_dir": "out_dir", "data_dir": "dir", "train_files": "data_file",
             "val_files": "data_file", "demo_file": "data_file",
             "init_from": "model"}  # checked where the flags are parsed


# DEVIATION: paper trains one 6B RM for all policy sizes on 33k prompts with K = 4..9 rankings; we
# train an RM of the policy's own size (from its SFT checkpoint) on HH-RLHF pairs (K = 2), with a
# learning rate scaled up for smaller models.
_LONG = dict(max_prompt_tokens=640, max_response_tokens=256)
CONFIGS = {
    "tiny": dict(MODEL_PRESETS["tiny"], lr=1e-4, batch_size=8, grad_accum=1),
    "small": dict(MODEL_PRESETS["small"], lr=1e-5, batch_size=32, grad_accum=4, **_LONG),
    "medium": dict(MODEL_PRESETS["medium"], lr=1e-5, batch_size=32, grad_accum=8, **_LONG),
    "large": dict(MODEL_PRESETS["large"], lr=9e-6, batch_size=64, grad_accum=32, **_LONG),
    "xl": dict(MODEL_PRESETS["xl"], lr=9e-6, batch_size=64, grad_accum=64, **_LONG),
}


# ----------------------------------------------------------------------------------------------
# The math

def preference_loss(r_chosen, r_rejected, prompt_index=None):
    """InstructGPT eq. (1): -1/C(K,2) sum_pairs log sigmoid(r_w - r_l) per prompt, averaged over
    prompts.

    r_chosen, r_rejected (P,) are the scores of the preferred and the other response of each pair;
    prompt_index (P,) says which prompt (ranking) a pair comes from. Every pair of a prompt is
    weighted 1/(its number of pairs), C(K,2) without ties, so each ranking counts once whatever its
    K. Without prompt_index every pair is its own prompt (K = 2): the mean binary cross-entropy.
    """
    losses = -F.logsigmoid(r_chosen - r_rejected)  # (P,)
    if prompt_index is None:
        return losses.mean()
    _, which, n_pairs = torch.unique(prompt_index, return_inverse=True, return_counts=True)
    return (losses / n_pairs[which]).sum() / len(n_pairs)


# ----------------------------------------------------------------------------------------------
# Data: rankings -> token sequences -> batches

def tokenize_rankings(rankings, enc, cfg):
    """Tokenize once: [{"seqs": the ranking's distinct token lists, "pairs": [(w, l), ...] indices
    into them}] and counts of what was dropped.

    Pair (w, l) means sequence w is ranked above l. A response that occurs more than once in a
    ranking (a sampler repeating itself) is one sequence, scored once, and each of its pairs points
    to it: eq. (1) is the same sum over the same pairs, for fewer forward passes (about 45% fewer on
    the lab's rankings). A pair of identical responses is a tie and dropped; so is a pair that
    becomes identical once cut to max_response_tokens (it carries no preference).
    """
    examples = []
    counts = {"rankings": len(rankings), "pairs": 0, "ties": 0, "ties_after_cut": 0}
    for prompt, responses in rankings:
        seqs, row = [], []  # distinct token lists; row[i]: responses[i]'s index in seqs
        for r in responses:
            tokens = rm_tokens(enc, prompt, r, cfg.max_prompt_tokens, cfg.max_response_tokens)
            if tokens not in seqs:
                seqs.append(tokens)
            row.append(seqs.index(tokens))
        pairs = []
        for w in range(len(responses)):
            for l in range(w + 1, len(responses)):
                if responses[w] == responses[l]:
                    counts["ties"] += 1
                elif row[w] == row[l]:
                    counts["ties_after_cut"] += 1
                else:
                    pairs.append((row[w], row[l]))
        if pairs:
            examples.append({"seqs": seqs, "pairs": pairs})
            counts["pairs"] += len(pairs)
    counts["prompts"] = len(examples)
    return examples, counts


def collate(examples):
    """Rankings -> one right-padded batch of all their distinct responses and the pair indices into
    it: ids, attention_mask (N, T); winner, loser, prompt_index (P,)."""
    seqs, winner, loser, prompt_index = [], [], [], []
    for p, ex in enumerate(examples):
        for w, l in ex["pairs"]:
            winner.append(len(seqs) + w)
            loser.append(len(seqs) + l)
            prompt_index.append(p)
        seqs += ex["seqs"]
    ids, attention_mask = pad_right(seqs)
    return (ids, attention_mask,
            torch.tensor(winner), torch.tensor(loser), torch.tensor(prompt_index))


def read_demonstrations(path, strict=False):
    """(prompt, response) pairs from {prompt, response} rows, or the best response of comparison
    rows."""
    check = lambda row: None if isinstance(row.get("response"), str) else ranking_problem(row)
    demos = []
    for row in read_jsonl(path, "demonstrations", {"prompt": str}, check=check, strict=strict):
        best = (row["response"] if "response" in row
                else row["ranked"][0] if "ranked" in row else row["chosen"])
        demos.append((row["prompt"], best))
    return demos


@torch.no_grad()
def evaluate(reward_model, examples, device, batch_size, ctx):
    """Validation metrics over all pairs: eq. (1) loss, accuracy (pairs ranked correctly), scores.
    Under torchrun each rank scores its share of `examples` and the scores are gathered: every rank
    reports the metrics of the whole set."""
    reward_model.eval()
    r_w, r_l, index = [], [], []
    n = get_world_size()
    # this rank's share
    lo, hi = get_rank() * len(examples) // n, (get_rank() + 1) * len(examples) // n
    for i in range(lo, hi, batch_size):
        batch = collate(examples[i:min(i + batch_size, hi)])
        ids, attention_mask, winner, loser, prompt_index = batch
        with ctx:
            scores = score_sequences(reward_model, ids.to(device), attention_mask.to(device))
            scores = scores.cpu()  # (N,)
        r_w.append(scores[winner])
        r_l.append(scores[loser])
        index.append(prompt_index + i)
    # all ranks' pairs
    r_w, r_l, index = all_gather_cat(r_w), all_gather_cat(r_l), all_gather_cat(index)
    return {"val/loss": preference_loss(r_w, r_l, index).item(),
            "val/acc": (r_w > r_l).float().mean().item(),
            "val/margin": (r_w - r_l).mean().item(),
            "val/chosen_mean": r_w.mean().item(),
            "val/chosen_std": r_w.std().item() if len(r_w) > 1 else 0.0,
            "val/rejected_mean": r_l.mean().item(),
            "val/rejected_std": r_l.std().item() if len(r_l) > 1 else 0.0}


# ----------------------------------------------------------------------------------------------
# One optimizer step's gradient, and the normalisation at the end

def accumulate_gradients(model, prompts, micro_batch_size, ctx, device, step="?"):
    """Backpropagate eq. (1) over this rank's share `prompts` of a step's rankings, in
    micro-batches of `micro_batch_size` prompts; return the step's (loss, accuracy) on all ranks.
    Eq. (1) is a mean over the step's prompts, the accuracy one over its pairs: lib/ddp.py's
    accumulate_gradients weights each micro-batch's means by its share of them, so the gradient is
    that of the whole step however it is split."""
    micro = [[t.to(device) for t in collate(prompts[m:m + micro_batch_size])]
             for m in range(0, len(prompts), micro_batch_size)]

    def loss_fn(mb, share):
        ids, attention_mask, winner, loser, prompt_index = mb
        with ctx:
            scores = score_sequences(model, ids, attention_mask)  # (N,) every response of a prompt
        loss = preference_loss(scores[winner], scores[loser], prompt_index)
        acc = (scores[winner] > scores[loser]).float().mean()
        return share["prompts"] * loss, {"pairs": {"acc": acc}}
    counts = [{"prompts": len(prompts[m:m + micro_batch_size]), "pairs": len(mb[2])}
              for m, mb in zip(range(0, len(prompts), micro_batch_size), micro)]
    stats = ddp.accumulate_gradients(loss_fn, micro, counts, (model,), step)
    return stats["loss"], stats["acc"]


@torch.no_grad()
def normalise(reward_model, demos, batch_size, ctx):
    """Shift the head's bias so the demonstrations (token lists; under torchrun this rank's share)
    score 0 on average ("we normalize the reward model using a bias so that the labeler
    demonstrations achieve a mean score of 0 before doing RL", InstructGPT end of 3.5). Eq. (1) sees
    only differences, so nothing else changes. Returns the shift."""
    reward_model.eval()
    scores = score_token_lists(reward_model, demos, batch_size, ctx)
    demo_mean = all_gather_cat([scores]).mean().item()
    reward_model.score_head.bias -= demo_mean
    print(f"normalised: demonstrations scored {demo_mean:+.4f} on average; "
          f"head bias shifted by {-demo_mean:+.4f}")
    return -demo_mean


# ----------------------------------------------------------------------------------------------
# Training

def train(cfg):
    # DDP (torchrun): the config's batch_size is GLOBAL: each step's prompts are split over the
    # ranks, which run their share in micro-batches of batch_size / grad_accum; only rank 0 prints,
    # logs and writes files.
    _, world_size = init_distributed(cfg.device)
    t_start = time.time()
    if not cfg.resume and cfg.init_from.endswith(".pt") and not os.path.isfile(cfg.init_from):
        sys.exit(f"error: SFT checkpoint {cfg.init_from} not found. Run sft.py first "
                 f"(python sft.py --config {cfg.preset or 'tiny'}), or pass --init_from scratch "
                 f"or a GPT-2 name.")
    require(cfg.batch_size % cfg.grad_accum == 0, "batch_size must be a multiple of grad_accum")
    micro_batch_size = cfg.batch_size // cfg.grad_accum  # prompts per forward pass
    os.makedirs(cfg.out_dir, exist_ok=True)
    print_config(cfg, cfg.out_dir)
    device = setup_device(cfg.device, cfg.seed)
    ctx = autocast(device, cfg.dtype)

    # model: the SFT trunk with a fresh scalar head (InstructGPT 3.5); a resumed run continues from
    # last.pt
    last_path = os.path.join(cfg.out_dir, "last.pt")
    if cfg.resume and not os.path.isfile(last_path):
        sys.exit(f"error: --resume true but {last_path} does not exist: nothing to resume "
                 f"(drop --resume to start)")
    model_cfg = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                     block_size=cfg.block_size)
    reward_model, ckpt = load_model(last_path if cfg.resume else cfg.init_from, kind="scalar",
                                    model_cfg=model_cfg, dropout=cfg.dropout, device=device,
                                    transplant=True, adapters=cfg.resume)
    resume_ckpt = ckpt if cfg.resume else None  # (an init_from checkpoint is only weights)
    # LoRA: adapters on the frozen trunk and the score head are all that trains (and is
    # checkpointed)
    require(not cfg.lora_rank or cfg.init_from != "scratch", "LoRA adapts a pretrained model: "
            "--lora_rank needs --init_from a checkpoint or GPT-2 name, not scratch")
    if cfg.lora_rank and not lora_settings(reward_model):
        reward_model = add_lora(reward_model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        reward_model.score_head.requires_grad_(True)
    base = lora_base(cfg.init_from, "scalar", transplant=True) if cfg.lora_rank else None
    store_frozen_in(reward_model, autocast_dtype(device, cfg.dtype))
    reward_model.transformer.grad_checkpoint = cfg.grad_checkpoint
    longest = cfg.max_prompt_tokens + cfg.max_response_tokens + 1
    require(longest <= reward_model.config.block_size, f"max_prompt_tokens + max_response_tokens "
            f"+ 1 = {longest} exceeds block_size {reward_model.config.block_size}")
    n_params = sum(p.numel() for p in reward_model.parameters())
    print(f"reward model: {n_params / 1e6:.1f}M parameters from {cfg.init_from}")
    # DDP: gradients averaged over ranks
    model = wrap_ddp(maybe_compile(reward_model, cfg.compile), device)

    # data, tokenized once, in the model's vocabulary (GPT-2's, or a world's)
    enc = get_tokenizer(reward_model.config.vocab)
    train_rankings = read_rankings(data_paths(cfg.data_dir, cfg.train_files), cfg.strict)
    val_rankings = read_rankings(data_paths(cfg.data_dir, cfg.val_files), cfg.strict)
    train_set, train_counts = tokenize_rankings(train_rankings, enc, cfg)
    val_set, val_counts = tokenize_rankings(val_rankings, enc, cfg)
    demo_pairs = read_demonstrations(os.path.join(cfg.data_dir, cfg.demo_file), cfg.strict)
    demos = [rm_tokens(enc, p, r, cfg.max_prompt_tokens, cfg.max_response_tokens)
             for p, r in demo_pairs]
    print(f"train: {train_counts}\nval: {val_counts}\ndemonstrations: {len(demos)}")
    require(train_set and val_set and demos,
            "need training pairs, validation pairs and demonstrations")
    require(min(cfg.batch_size, len(val_set), len(demos)) >= world_size,
            f"{world_size} processes need at least as many prompts per batch ({cfg.batch_size}), "
            f"validation prompts ({len(val_set)}) and demonstrations ({len(demos)}); "
            f"use fewer processes")
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    if 0 < len(train_set) % cfg.batch_size < world_size:
        # DDP: a last partial batch too small to give every rank a prompt is dropped
        steps_per_epoch -= 1
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
    print(f"{total_steps} steps of {cfg.batch_size} prompts in {cfg.grad_accum} micro-batches")

    # optimizer: weight decay on matrices only (never on the head's bias, which eq. (1) cannot see)
    params = [p for p in reward_model.parameters() if p.requires_grad]
    optimizer = make_adamw(params, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    start = 0
    if resume_ckpt:
        check_resumable(resume_ckpt, last_path, ("optimizer", "step", "rng_state"), "reward.py",
                        cfg.lora_rank)
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        start = resume_ckpt["step"]
        set_rng_state(resume_ckpt["rng_state"])  # the dropout masks of an uninterrupted run
        require(start < total_steps,
                f"{last_path} is at step {start} of {total_steps}: nothing left to do")
        print(f"resumed from {last_path} at step {start} of {total_steps}")

    log = MetricsLog(cfg.out_dir, total_steps, resume_step=start if resume_ckpt else None,
                     log_to=cfg.log_to, run_config=cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    if not resume_ckpt:
        log.log(0, evaluate(model, val_set, device, micro_batch_size, ctx),
                keys=["val/loss", "val/acc"])
    step, window = start, []  # window: (loss, accuracy) of the steps since the last validation
    for epoch in range(cfg.epochs):
        # drawn in every epoch, even a skipped one
        order = torch.randperm(len(train_set), generator=gen).tolist()
        for b in range(steps_per_epoch):
            if step >= total_steps:
                break
            if epoch * steps_per_epoch + b < start:
                continue  # trained before the run was resumed
            t0 = time.time()
            model.train()
            # C.2: cosine to 10%
            lr = lr_at(step, cfg.lr, cfg.lr * cfg.min_lr_frac, cfg.warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = [train_set[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
            # 1. eq. (1) on the step's rankings: every response of a prompt scored in one forward,
            # all its pairs
            loss_sum, acc = accumulate_gradients(model, shard(batch), micro_batch_size, ctx, device,
                                                 step + 1)
            # 2. AdamW step
            check_finite(loss_sum, step + 1)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            metrics = {"train/loss": loss_sum, "train/acc": acc, "lr": lr,
                       "grad_norm": grad_norm.item(), "epoch": epoch + (b + 1) / steps_per_epoch,
                       "ms_per_step": 1000 * (time.time() - t0)}
            window.append((loss_sum, acc))
            # 3. validation, progress line, the state --resume continues from
            if step % cfg.eval_interval == 0 or step == total_steps:
                # a batch holds only batch_size rankings: average the train metrics over the window
                metrics["train/loss_avg"] = sum(w[0] for w in window) / len(window)
                metrics["train/acc_avg"] = sum(w[1] for w in window) / len(window)
                metrics.update(evaluate(model, val_set, device, micro_batch_size, ctx))
                window = []
            if step % cfg.log_interval == 0 or "val/acc" in metrics:
                log.log(step, metrics,
                        keys=["train/loss", "train/acc", "val/loss", "val/acc", "ms_per_step"])
            # after each validation (window empty): the state --resume continues from
            if "val/acc" in metrics:
                save_checkpoint(last_path, reward_model, cfg, base=base, step=step,
                                optimizer=optimizer.state_dict(), rng_state=rng_state())

    # 4. normalise: the demonstrations score 0 on average (InstructGPT end of 3.5)
    reward_shift = normalise(reward_model, shard(demos), micro_batch_size, ctx)
    # the same accuracy, shifted scores
    final = evaluate(reward_model, val_set, device, micro_batch_size, ctx)
    ckpt_path = save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), reward_model, cfg,
                                base=base, reward_shift=reward_shift, val_metrics=final)
    png_path = plot_metrics(log.path, os.path.join(cfg.out_dir, "reward.png"),
                            {"loss (eq. 1)": ["train/loss_avg", "val/loss"],
                             "pairwise accuracy": ["train/acc_avg", "val/acc"],
                             "val scores": ["val/chosen_mean", "val/rejected_mean", "val/margin"]},
                            title=f"reward model ({cfg.preset or 'custom'}, init {cfg.init_from})")
    print(f"val accuracy {final['val/acc']:.3f} (chance 0.5) | val loss {final['val/loss']:.4f} "
          f"| saved {ckpt_path} and {png_path} | {time.time() - t_start:.0f}s")
    return {**final, "reward_shift": reward_shift, "steps": step, "train_counts": train_counts,
            "val_counts": val_counts, "ckpt_path": ckpt_path, "metrics_path": log.path,
            "png_path": png_path, "time_s": time.time() - t_start}


if __name__ == "__main__":
    run(train, Config, CONFIGS)
