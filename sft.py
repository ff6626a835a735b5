"""
Stage 1 of InstructGPT (Ouyang et al. 2022, arXiv:2203.02155, section 3.5 "Supervised
fine-tuning"): fine-tune a language model on demonstrations, (prompt, response) pairs of the
desired behaviour.

Objective: the ordinary next-token loss, but on the response only. Each example is
prompt + response + EOS; the loss is the mean negative log-likelihood of the response tokens and
of the EOS that ends them (so the model learns to stop), averaged over all such tokens of a batch.
Prompt tokens and padding carry no loss: the model conditions on the prompt, it is not asked to
write it.

Each optimizer step, numbered as in train(): 1. the step's demonstrations, 2. the loss on their
response tokens in micro-batches (accumulate_gradients), 3. an AdamW step; 4. every eval_interval
steps the validation loss, the best checkpoint, greedy samples and the state --resume continues
from.

The best checkpoint by validation loss, out_dir/ckpt.pt, is the starting point of reward.py (the
reward model's trunk) and ppo.py (the policy, its frozen reference, and the critic's trunk).

    python data/hh_rlhf/prepare.py              # once: writes data/hh_rlhf/sft_{train,val}.jsonl
    python sft.py --config tiny                 # from scratch, 4x256: ~4 minutes on 2 busy CPUs
    python sft.py --config small                # GPT-2 124M on one GPU
    python sft.py --config small --lr 1e-5 --max_steps 500 --out_dir out/sft_lr1e-5
    python sft.py --config small --resume true  # continue an interrupted run from out/sft/last.pt
    python sft.py --help                        # every option with its default
    torchrun --standalone --nproc_per_node 8 sft.py --config small   # 8 GPUs, the same global batch
"""

import os
import sys
import time
from dataclasses import dataclass

import torch

from lib import ddp
from lib.checkpoints import check_resumable, load_model, lora_base, lora_settings, save_checkpoint
from lib.config import GPT2_NAMES, MODEL_PRESETS, print_config, require, run
from lib.data import index_batches, read_jsonl
from lib.ddp import all_reduce_sum, init_distributed, shard, wrap_ddp
from lib.responses import decode_responses, sample_responses
from lib.tokens import (
    EOS,
    encode_prompt,
    encode_response,
    get_tokenizer,
    load_vocab,
    pad_left,
    pad_right,
)
from lib.tracking import MetricsLog, plot_metrics, replot_due
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
from model import add_lora, chunked_token_logprobs


@dataclass
class Config:
    # io
    out_dir: str = "out/sft"  # ckpt.pt (best val loss), last.pt, metrics.jsonl, sft.png
    resume: bool = False  # continue from out_dir/last.pt (weights, optimizer, data order, RNG)
    data_dir: str = "data/hh_rlhf"  # sft_train.jsonl, sft_val.jsonl ({"prompt", "response"} rows)
    train_file: str = "sft_train.jsonl"  # in data_dir; prompt "" = plain text (loss on every token)
    val_file: str = "sft_val.jsonl"  # in data_dir
    preset: str = ""  # name of the --config preset, recorded by parse_config
    eval_interval: int = 100  # optimizer steps between evaluations (val loss, samples, best ckpt)
    eval_examples: int = 512  # validation demonstrations for the val loss (the first N)
    num_eval_samples: int = 2  # validation prompts answered greedily at each evaluation
    max_new_tokens: int = 48  # length limit of those sample responses
    log_to: str = ""  # also log to wandb or tensorboard (both: wandb,tensorboard); off by default
    # data
    max_prompt_tokens: int = 384  # prompt budget; a longer prompt keeps its end (the latest turns)
    max_response_tokens: int = 128  # with its EOS; a longer response is cut, without EOS
    # model
    init_from: str = "gpt2"  # "scratch", a GPT-2 name, a HF folder, or a .pt checkpoint
    n_layer: int = 12  # model shape, used when init_from == "scratch"
    n_head: int = 12  # (same)
    n_embd: int = 768  # (same)
    block_size: int = 1024  # (same) maximum sequence length
    vocab: str = ""  # (same) a world's vocab.json: rows for its tokens only; "" = all
    dropout: float = 0.2  # InstructGPT 3.5: residual dropout 0.2 (also attention and embeddings)
    # optim
    max_steps: int = 2000  # optimizer steps (epochs = steps * batch_size * grad_accum / #demos)
    batch_size: int = 8  # demonstrations per micro-batch (per forward pass, on each rank)
    grad_accum: int = 4  # micro-batches per step, all ranks together (paper C.1: batch 32)
    lr: float = 2e-5  # peak learning rate (paper C.1: 9.65e-6 for 1.3B and 6B, 5.03e-6 for 175B)
    min_lr: float = 2e-6  # end of the cosine decay (paper C.1: 10% of the peak)
    warmup_steps: int = 50  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices only
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    # memory (docs/scaling.md): LoRA, activation checkpointing; frozen copies follow --dtype
    lora_rank: int = 0  # LoRA (Hu et al. 2021): rank-r adapters on the blocks' projections; 0 = off
    lora_alpha: float = 16.0  # LoRA: the adapters' update B A is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # LoRA: dropout on the adapters' input
    grad_checkpoint: bool = False  # recompute activations in the backward: less memory, ~1/3 slower
    # system
    strict: bool = False  # refuse an input file with a malformed line (default: skip it, say where)
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # autocast: auto = bfloat16 on CUDA, float32 on CPU; or bfloat16, float32
    compile: bool = False  # torch.compile the transformer (inductor: CUDA, or CPU with a compiler)
    seed: int = 1337

    PATHS = {"out_dir": "out_dir", "data_dir": "dir", "train_file": "data_file",
             "val_file": "data_file", "init_from": "model", "vocab": "file"}  # checked when parsed


# The model part comes from lib/config.py's MODEL_PRESETS; `tiny` trains from scratch, the others
# start from GPT-2.
CONFIGS = {
    # A few minutes on 2 CPU cores: the val loss falls from ~10.8 (uniform over 50257 tokens).
    "tiny": {**MODEL_PRESETS["tiny"], "init_from": GPT2_NAMES["tiny"], "dropout": 0.0,
             "max_prompt_tokens": 128, "max_response_tokens": 64, "batch_size": 8,
             "grad_accum": 1, "max_steps": 200, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 20,
             "eval_interval": 50, "eval_examples": 64},
    # One GPU: batch 32 through gradient accumulation, ~1.5 epochs of helpful-base (43.8k demos).
    "small": {**MODEL_PRESETS["small"], "init_from": GPT2_NAMES["small"], "batch_size": 8,
              "grad_accum": 4, "max_steps": 2000, "lr": 2e-5, "min_lr": 2e-6},
    "medium": {**MODEL_PRESETS["medium"], "init_from": GPT2_NAMES["medium"], "batch_size": 4,
               "grad_accum": 8, "max_steps": 2000, "lr": 1e-5, "min_lr": 1e-6},
    "large": {**MODEL_PRESETS["large"], "init_from": GPT2_NAMES["large"], "batch_size": 4,
              "grad_accum": 8, "max_steps": 2000, "lr": 1e-5, "min_lr": 1e-6},
    "xl": {**MODEL_PRESETS["xl"], "init_from": GPT2_NAMES["xl"], "batch_size": 2,
           "grad_accum": 16, "max_steps": 2000, "lr": 1e-5, "min_lr": 1e-6},
}


# ----------------------------------------------------------------------------------------------
# The math

def sft_loss(logprobs, loss_mask):
    """Mean negative log-likelihood of the target tokens over the positions where loss_mask is 1.

    logprobs (...) of the targets (model.token_logprobs of the logits, or chunked_token_logprobs of
    the hidden states), loss_mask (...) -> scalar. The mean is over all counted tokens of the batch
    (sum of NLL / number of tokens), not a mean of per-sequence means: every response token weighs
    the same, as in ordinary language-model training.
    """
    mask = loss_mask.float()  # (...)
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)


def batch_loss(trunk, model, x, y, loss_mask):
    """sft_loss of a right-padded batch, running the output layer only where loss_mask is 1.

    Equal to sft_loss(token_logprobs(model(x), y), loss_mask): the other positions are masked
    anyway, and the 50k-wide output layer is most of a small model's compute (3x faster for `tiny`
    on CPU). Right padding needs no attention mask: causal attention never looks ahead, so real
    tokens never see the padding after them. The (N, V) logits are never held whole either: they
    are reduced to the targets' logprobs a chunk of rows at a time (model.chunked_token_logprobs),
    the same numbers as from the whole logits.
    """
    h = trunk(x)  # (B, T, C)
    keep = loss_mask.bool()  # (B, T)
    targets = model.transformer.rows(y[keep])  # (N,) output rows (GPT-2 ids unless a world's vocab)
    # (N,), N = response tokens in the batch
    logprobs = chunked_token_logprobs(h[keep], model.lm_head.weight, targets)
    return sft_loss(logprobs, loss_mask[keep])


def accumulate_gradients(trunk, model, micro, ctx, step="?"):
    """Backpropagate the SFT loss of one optimizer step made of micro-batches [(x, y, loss_mask)];
    return it. The loss is the mean over all the step's response tokens, on every rank, exactly as
    if the micro-batches were one batch (lib/ddp.py's accumulate_gradients weights each
    micro-batch's mean by its share of them)."""
    def loss_fn(mb, share):
        with ctx:
            loss = batch_loss(trunk, model, *mb)  # mean over the micro-batch's response tokens
        return share["tokens"] * loss, {"tokens": {}}
    counts = [{"tokens": int(loss_mask.sum())} for _, _, loss_mask in micro]
    return ddp.accumulate_gradients(loss_fn, micro, counts, (trunk,), step)["loss"]


# ----------------------------------------------------------------------------------------------
# Data: demonstrations tokenized once, batched with a loss mask

def encode_demo(enc, prompt, response, max_prompt_tokens, max_response_tokens):
    """One demonstration -> (tokens, n_prompt, prompt_cut, response_cut).

    tokens = prompt + response + EOS within the budgets: a long prompt keeps its end, a long
    response is cut and then carries no EOS (it did not end there).
    """
    p = encode_prompt(enc, prompt, max_prompt_tokens + 1)  # one extra token: was it cut?
    r = encode_response(enc, response, max_response_tokens)
    n_prompt = min(len(p), max_prompt_tokens)
    return p[-max_prompt_tokens:] + r, n_prompt, len(p) > max_prompt_tokens, r[-1] != EOS


def collate(examples):
    """[(tokens, n_prompt)] -> x, y, loss_mask, each (B, T-1), right-padded.

    y is x shifted by one (the logits at position t predict token t + 1); loss_mask is 1 where y
    is a response token or its EOS, 0 on the prompt and on padding.
    """
    ids, attention_mask = pad_right([tokens for tokens, _ in examples])  # (B, T)
    x, y = ids[:, :-1], ids[:, 1:]  # (B, T-1)
    target_pos = torch.arange(1, ids.size(1))[None, :]  # (1, T-1): position of y[:, t] in the seq
    n_prompt = torch.tensor([n for _, n in examples])[:, None]  # (B, 1)
    loss_mask = (target_pos >= n_prompt) & attention_mask[:, 1:].bool()  # (B, T-1)
    return x, y, loss_mask.long()


def load_demos(path, enc, cfg, split):
    """Read and tokenize a split once; print its size and how many prompts/responses were cut."""
    nothing_to_learn = lambda r: (None if r["prompt"] or r["response"]
                                  else "empty prompt and response (only EOS)")
    rows = read_jsonl(path, f"SFT {split}", {"prompt": str, "response": str},
                      check=nothing_to_learn, strict=cfg.strict)
    encoded = [encode_demo(enc, r["prompt"], r["response"], max_prompt_tokens=cfg.max_prompt_tokens,
                           max_response_tokens=cfg.max_response_tokens)
               for r in rows]
    n_tokens = sum(len(t) for t, *_ in encoded)
    print(f"{split}: {len(rows)} demonstrations, {n_tokens} tokens, prompts cut to their last "
          f"{cfg.max_prompt_tokens} tokens: {sum(e[2] for e in encoded)}, responses cut to "
          f"{cfg.max_response_tokens} tokens (no EOS): {sum(e[3] for e in encoded)}")
    return [(tokens, n_prompt) for tokens, n_prompt, *_ in encoded]


@torch.no_grad()
def evaluate(trunk, model, demos, batch_size, ctx, device):
    """Validation loss: mean NLL over every response token of `demos` (weighted as in training)."""
    total, count = 0.0, 0
    for i in range(0, len(demos), batch_size):
        x, y, loss_mask = (t.to(device) for t in collate(demos[i:i + batch_size]))
        n = int(loss_mask.sum())
        with ctx:
            total += batch_loss(trunk, model, x, y, loss_mask).item() * n
        count += n
    # DDP: every rank evaluated its share of `demos`
    total, count = all_reduce_sum([total, float(count)])
    return total / max(count, 1)


@torch.no_grad()
def greedy_responses(model, enc, prompts, max_new_tokens, ctx, device):
    """Decode the model's greedy (temperature 0) response to each token list in `prompts`."""
    if not prompts:
        return []
    ids, attention_mask = pad_left(prompts)  # (B, T)
    with ctx:
        batch = sample_responses(model, ids.to(device), attention_mask.to(device), max_new_tokens,
                                 temperature=0)
    return decode_responses(enc, batch)


# ----------------------------------------------------------------------------------------------

def train(cfg):
    # DDP (torchrun): the config's batch is GLOBAL. Each optimizer step's batch_size * grad_accum
    # demonstrations are split over the ranks, which run their share in micro-batches of up to
    # batch_size (N ranks: fewer micro-steps each, the same update); only rank 0 prints, logs and
    # writes files.
    rank, world_size = init_distributed(cfg.device)
    print_config(cfg, cfg.out_dir)
    require(min(cfg.max_steps, cfg.batch_size, cfg.grad_accum, cfg.max_prompt_tokens,
                cfg.max_response_tokens) >= 1,
            "max_steps, batch_size, grad_accum, max_prompt_tokens and max_response_tokens must all "
            "be >= 1")
    require(cfg.batch_size * cfg.grad_accum >= world_size, f"batch_size * grad_accum = "
            f"{cfg.batch_size * cfg.grad_accum} demonstrations per step cannot be shared by "
            f"{world_size} processes; raise grad_accum or use fewer processes")
    device = setup_device(cfg.device, cfg.seed)
    ctx = autocast(device, cfg.dtype)

    # model; a resumed run takes weights, optimizer, step, data position and random state from
    # last.pt
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    last_path = os.path.join(cfg.out_dir, "last.pt")
    if cfg.resume and not os.path.isfile(last_path):
        sys.exit(f"error: --resume true but {last_path} does not exist: nothing to resume "
                 f"(drop --resume to start)")
    model_cfg = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                     block_size=cfg.block_size)
    if cfg.vocab:  # a world's vocabulary: rows for its tokens only
        require(cfg.init_from == "scratch" or cfg.resume, "--vocab shapes a new model: use it with "
                "--init_from scratch (a checkpoint carries its own vocabulary)")
        vocab = load_vocab(cfg.vocab)
        model_cfg.update(vocab=vocab, vocab_size=len(vocab))
    model, ckpt = load_model(last_path if cfg.resume else cfg.init_from, "gpt", model_cfg,
                             cfg.dropout, device, adapters=cfg.resume)
    resume_ckpt = ckpt if cfg.resume else None  # (an init_from checkpoint is only weights)
    # LoRA: adapters on the frozen model are all that trains (and is checkpointed); the frozen
    # weights are stored in bf16 when the forward passes run in it
    require(not cfg.lora_rank or cfg.init_from != "scratch", "LoRA adapts a pretrained model: "
            "--lora_rank needs --init_from a checkpoint or GPT-2 name, not scratch (train scratch "
            "models without it)")
    if cfg.lora_rank and not lora_settings(model):
        model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    base = lora_base(cfg.init_from) if cfg.lora_rank else None
    store_frozen_in(model, autocast_dtype(device, cfg.dtype))
    model.transformer.grad_checkpoint = cfg.grad_checkpoint
    block_size = model.config.block_size
    require(cfg.max_prompt_tokens + cfg.max_response_tokens <= block_size,
            f"max_prompt_tokens {cfg.max_prompt_tokens} + max_response_tokens "
            f"{cfg.max_response_tokens} > block_size {block_size}: a full demonstration would not "
            f"fit in the model's context; lower the token budgets")
    require(cfg.max_prompt_tokens + cfg.max_new_tokens <= block_size,
            f"max_prompt_tokens + max_new_tokens ({cfg.max_new_tokens}) > block_size {block_size}: "
            f"lower max_new_tokens")
    print(f"model: {model.num_params() / 1e6:.1f}M parameters from {cfg.init_from}, "
          f"block_size {block_size}")
    # a compiled view; `model` keeps the plain weights
    trunk = maybe_compile(model.transformer, cfg.compile)
    trunk = wrap_ddp(trunk, device)  # DDP: the trunk holds every weight (lm_head is tied to wte)
    if world_size > 1:
        # DDP: the same initial weights everywhere, but each rank its own dropout
        torch.manual_seed(cfg.seed + rank)

    # data: tokenized once, here, with the model's vocabulary (GPT-2's, or a world's from cfg.vocab)
    enc = get_tokenizer(model.config.vocab)
    train_demos = load_demos(os.path.join(cfg.data_dir, cfg.train_file), enc, cfg, "train")
    val_demos = load_demos(os.path.join(cfg.data_dir, cfg.val_file), enc, cfg, "val")
    val_demos = val_demos[:cfg.eval_examples]
    sample_prompts = [tokens[:n_prompt] for tokens, n_prompt in val_demos[:cfg.num_eval_samples]
                      if n_prompt > 0]
    demos_per_step = cfg.batch_size * cfg.grad_accum
    print(f"{demos_per_step} demonstrations per step x {cfg.max_steps} steps = "
          f"{cfg.max_steps * demos_per_step / len(train_demos):.2f} epochs of {len(train_demos)}")
    # DEVIATION: InstructGPT trains SFT for 16 epochs and notes the val loss overfits after 1 epoch
    # while the RM score keeps improving; we train ~1-2 epochs because we select by val loss
    # (below).

    # optimizer: weight decay on matrices (embeddings and Linear weights), not on biases or
    # LayerNorm gains
    optimizer = make_adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           betas=(cfg.beta1, cfg.beta2), device=device)
    start, data_position, best_val, best_step = 0, 0, float("inf"), 0
    if resume_ckpt:
        keys = ("optimizer", "step", "data_position", "best_val_loss", "best_step", "rng_state")
        check_resumable(resume_ckpt, last_path, keys, "sft.py", cfg.lora_rank)
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        start, data_position = resume_ckpt["step"], resume_ckpt["data_position"]
        best_val, best_step = resume_ckpt["best_val_loss"], resume_ckpt["best_step"]
        set_rng_state(resume_ckpt["rng_state"])  # the dropout masks of an uninterrupted run
        if rank > 0:  # DDP: last.pt holds rank 0's random state; the others draw fresh masks
            torch.manual_seed(cfg.seed + rank + 1_000_003 * start)
        require(start < cfg.max_steps,
                f"{last_path} is at step {start} of max_steps {cfg.max_steps}: nothing left to do")
        print(f"resumed from {last_path} at step {start} "
              f"(best val loss {best_val:.4f} at step {best_step})")

    log = MetricsLog(cfg.out_dir, cfg.max_steps, resume_step=start if resume_ckpt else None,
                     log_to=cfg.log_to, run_config=cfg)
    png_path = os.path.join(cfg.out_dir, "sft.png")
    batches = index_batches(len(train_demos), cfg.batch_size, cfg.seed, start=data_position)
    metrics, t_start, last_plot = {}, time.time(), float("-inf")  # last_plot: sft.png last drawn

    # `step` = optimizer updates done so far; step 0 evaluates the init
    for step in range(start + 1 if resume_ckpt else 0, cfg.max_steps + 1):
        if step > 0:
            # 1. the step's demonstrations (batch_size * grad_accum, the next of the shuffled
            # stream)
            t0 = time.time()
            lr = lr_at(step - 1, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
            # DEVIATION: InstructGPT (C.1) uses no warmup; a short one keeps a from-scratch `tiny`
            # stable.
            for group in optimizer.param_groups:
                group["lr"] = lr
            # DDP: this rank's share
            step_idx = shard([i for _ in range(cfg.grad_accum) for i in next(batches)])
            micro = [[t.to(device)
                      for t in collate([train_demos[i] for i in step_idx[j:j + cfg.batch_size]])]
                     for j in range(0, len(step_idx), cfg.batch_size)]
            data_position += demos_per_step
            # 2. the loss on their response tokens, backpropagated micro-batch by micro-batch
            loss = accumulate_gradients(trunk, model, micro, ctx, step)
            # 3. AdamW step
            check_finite(loss, step)
            max_norm = cfg.grad_clip or float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.time() - t0
            # positions on all ranks, padding too
            tokens = all_reduce_sum(float(sum(x.numel() for x, _, _ in micro)))
            metrics = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                       "tok_per_s": tokens / dt, "ms_per_step": 1000 * dt}

        # 4. every eval_interval steps: validation loss, the best checkpoint, greedy samples, the
        # --resume state
        evaluating = step % cfg.eval_interval == 0 or step == cfg.max_steps
        if evaluating:
            model.eval()
            metrics["val_loss"] = evaluate(trunk, model, shard(val_demos), cfg.batch_size, ctx,
                                           device)
            check_finite(metrics["val_loss"], step, "the validation loss")
        log.log(step, metrics,
                keys=["loss", "val_loss", "lr", "grad_norm", "tok_per_s", "ms_per_step"])
        if evaluating:
            # DEVIATION: InstructGPT selects the final SFT model by reward-model score on validation
            # prompts; we select by validation loss, because the reward model is trained after (and
            # from) this one.
            if metrics["val_loss"] < best_val:
                best_val, best_step = metrics["val_loss"], step
                save_checkpoint(ckpt_path, model, cfg, base=base, step=step, val_loss=best_val,
                                best_val_loss=best_val)
            responses = greedy_responses(model, enc, sample_prompts, cfg.max_new_tokens, ctx,
                                         device)
            for prompt, response in zip(sample_prompts, responses):
                print(f"---- prompt (end): ...{enc.decode(prompt)[-200:]!r}\n"
                      f"---- greedy response: {response!r}")
            if replot_due(last_plot, final=step == cfg.max_steps):
                last_plot = time.time()
                panels = {"loss (response tokens)": ["loss", "val_loss"], "learning rate": ["lr"]}
                plot_metrics(log.path, png_path, panels,
                             title=f"sft.py --config {cfg.preset}" if cfg.preset else "sft.py")
            # the latest state, for --resume: written at each evaluation (and so at the end), after
            # ckpt.pt
            save_checkpoint(last_path, model, cfg, base=base, step=step,
                            val_loss=metrics["val_loss"], best_val_loss=best_val,
                            best_step=best_step, optimizer=optimizer.state_dict(),
                            data_position=data_position, rng_state=rng_state())
            model.train()

    val_loss, loss = metrics["val_loss"], metrics.get("loss", float("nan"))
    wall = time.time() - t_start
    print(f"done: {cfg.max_steps} steps in {wall:.0f}s, train loss {loss:.4f}, "
          f"val loss {val_loss:.4f} (best {best_val:.4f} at step {best_step} -> {ckpt_path})")
    return {"steps": cfg.max_steps, "train_loss": loss, "val_loss": val_loss,
            "best_val_loss": best_val, "best_step": best_step,
            "tok_per_s": metrics.get("tok_per_s", 0.0), "time_s": wall, "ckpt_path": ckpt_path,
            "last_path": last_path, "metrics_path": log.path, "plot_path": png_path}


if __name__ == "__main__":
    run(train, Config, CONFIGS)
