"""
Stage 3 of InstructGPT (Ouyang et al. 2022, arXiv:2203.02155, section 3.5 and appendix C.4):
fine-tune the SFT policy with PPO against the frozen reward model, maximising

    objective(phi) = E_{(x,y) ~ D_pi_RL} [ r_theta(x, y) - beta log(pi_RL(y|x) / pi_SFT(y|x)) ]
                     + gamma E_{x ~ D_pretrain} [ log pi_RL(x) ]                          (eq. 2)

with beta = `kl_coef` and the paper's gamma = `ptx_coef` (`gamma` in this file is GAE's discount).
The KL term is paid token by token: every response token gets reward -beta (log pi_RL - log pi_SFT),
and the reward model's score is added at the last response token (Ziegler et al. 2019). ptx_coef > 0
is "PPO-ptx": a language-modelling loss on pretraining-distribution text mixed into every update.
Four models: `policy` (trained, from the SFT checkpoint), `ref_policy` (a frozen copy of it),
`reward_model` (frozen, normalised by reward.py) and `critic` (the value function, trained,
initialised from the reward model).

One iteration, numbered as in train():
  1. rollout: sample responses to a batch of prompts (KV cache, temperature 1), score them
  2. logprobs of policy and ref_policy, values of the critic: one forward each
  3. KL-shaped reward, eq. (2)                                          compute_rewards
  4. GAE advantages and returns (Schulman et al. 2016), whitened        compute_gae, whiten
  5. PPO epochs over shuffled minibatches, minimising                   ppo_update
        loss = pg_loss + vf_coef * vf_loss + ptx_coef * ptx_loss
     pg_loss: clipped surrogate, PPO eq. (7); vf_loss: clipped value loss; ptx_loss: -log pi_RL(x)
  6. KL coefficient: fixed (paper: 0.02) or adaptive (Ziegler et al. 2019, section 2.2)

What the field ships beside the paper's method, as flags (tests/test_optimum.py derives and checks
the point each one converges to): critic-free advantages (--advantage_estimator rloo, grpo, dr_grpo,
reinforce_pp; rloo/grpo/dr_grpo compare the --samples_per_prompt K responses to each prompt), the KL
in the loss instead of the reward (--kl_penalty loss, as GRPO), Schulman's k1/k2/k3 KL samples
(--kl_estimator), and how the loss averages its tokens (--loss_agg). Whatever the estimator, only
the paper's KL (in the reward, k1) has eq. (2)'s optimum pi_SFT exp(r / beta) / Z as a fixed point.

References: InstructGPT (arXiv:2203.02155) eq. (2) and C.4; PPO, Schulman et al. 2017
(arXiv:1707.06347); GAE, Schulman et al. 2016 (arXiv:1506.02438); Ziegler et al. 2019,
"Fine-Tuning Language Models from Human Preferences" (arXiv:1909.08593) and its code,
openai/lm-human-preferences; RLOO, Ahmadian et al. 2024 (arXiv:2402.14740); GRPO, Shao et al. 2024
(arXiv:2402.03300); Dr. GRPO, Liu et al. 2025 (arXiv:2503.20783); REINFORCE++, Hu et al. 2025
(arXiv:2501.03262); J. Schulman, "Approximating KL Divergence" (2020).

    python ppo.py --config tiny                  # after sft.py and reward.py --config tiny (CPU)
    python ppo.py --config tiny --sft_ckpt scratch --reward_ckpt scratch   # no earlier stage needed
    python ppo.py --config tiny --resume true    # continue from out/ppo/ckpt.pt
    python ppo.py --config small --ptx_coef 27.8 # GPT-2 124M on one GPU, PPO-ptx
    torchrun --standalone --nproc_per_node 8 ppo.py --config small   # 8 x batch_size episodes
    python ppo.py --config tiny --advantage_estimator rloo --samples_per_prompt 4    # no critic
    python ppo.py --config tiny --advantage_estimator grpo --samples_per_prompt 4 \
        --kl_penalty loss --kl_estimator k3 --loss_agg seq_mean_token_mean  # GRPO as published
"""

import copy
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from lib.checkpoints import (
    check_resumable,
    fsync_replace,
    load_adapters,
    load_checkpoint,
    load_model,
    lora_base,
    save_checkpoint,
)
from lib.config import MODEL_PRESETS, print_config, require, run
from lib.data import index_batches, prompt_problem, read_jsonl, spread
from lib.ddp import (
    accumulate_gradients,
    all_gather_cat,
    get_world_size,
    global_masked_mean,
    global_masked_var,
    init_distributed,
    is_main,
    shard,
    wrap_ddp,
)
from lib.responses import last_token_index, policy_logprobs, sample_and_judge, sample_and_score
from lib.tokens import EOS, encode_prompt, get_tokenizer, pad_left, pad_right
from lib.tracking import MetricsLog, plot_metrics, replot_due
from lib.training import (
    autocast,
    autocast_dtype,
    check_finite,
    make_adamw,
    setup_device,
    store_frozen_in,
    weights_swapped,
)
from lib.winrate import win_rate
from model import GPTConfig, ScalarGPT, add_lora, lora_state_dict, share_weights


@dataclass
class Config:
    # io
    out_dir: str = "out/ppo"  # ckpt.pt, metrics.jsonl, ppo.png, config.json
    data_dir: str = "data/hh_rlhf"  # prompts_train/val.jsonl, sft_train.jsonl (ptx text)
    sft_ckpt: str = "out/sft/ckpt.pt"  # policy and ref_policy: SFT ckpt, GPT-2 name or "scratch"
    reward_ckpt: str = "out/reward/ckpt.pt"  # reward model, critic's init (3.5), or "scratch"
    resume: bool = False  # continue from out_dir/ckpt.pt (models, optimizer, kl_coef, iteration)
    keep_checkpoints: bool = False  # also keep each evaluation's checkpoint as ckpt_{iteration}.pt
    preset: str = ""  # name of the --config preset, recorded for the run
    eval_interval: int = 10  # iterations between evaluations on held-out prompts (and at the end)
    eval_prompts: int = 32  # held-out prompts per evaluation, spread over prompts_val.jsonl
    judge_ckpt: str = ""  # an independent judge RM (other comparisons): eval_win_rate vs SFT
    sample_every: int = 10  # iterations between printed samples (prompt, response, score, KL)
    n_samples: int = 2  # samples printed each time
    log_to: str = ""  # also log to wandb or tensorboard (both: wandb,tensorboard); off by default
    # model (shape used only with scratch)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 512
    # rollout
    max_prompt_tokens: int = 192  # a longer prompt keeps its end
    max_new_tokens: int = 64  # response length limit
    temperature: float = 1.0  # of rollouts; logprobs divide the logits by it too (paper: 1)
    missing_eos_penalty: float = 0.0  # subtracted from the score of a response without EOS
    # ppo
    iters: int = 100  # PPO iterations (paper: 256k episodes / 512 = 500)
    batch_size: int = 64  # prompts (episodes) per iteration, on each rank (paper: 512)
    minibatch_size: int = 16  # episodes per optimizer step, on each rank (paper: 64)
    grad_accum: int = 1  # a minibatch runs in this many micro-batches (memory knob, same update)
    noptepochs: int = 4  # passes over the batch (paper: 1 inner epoch; Ziegler et al. 2019: 4)
    lr: float = 1e-5  # Adam learning rate, policy and critic (paper C.4: order 1e-5)
    warmup_iters: int = 10  # linear warmup from lr / 10 (paper: 10 iterations from a tenth)
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-5  # as in lm-human-preferences and cleanrl
    grad_clip: float = 1.0  # max gradient norm, policy and critic clipped separately (0 = off)
    cliprange: float = 0.2  # epsilon of the clipped surrogate, PPO eq. (7) (paper: 0.2)
    cliprange_value: float = 0.2  # values move at most this far from the rollout's values
    vf_coef: float = 0.1  # weight of the value loss (lm-human-preferences: 0.1)
    gamma: float = 1.0  # GAE discount (paper: 1); not eq. (2)'s gamma, which is ptx_coef
    lam: float = 0.95  # GAE lambda (paper: 0.95)
    # the advantage: gae (the paper's, with the critic) or a critic-free estimator of the responses
    # to one prompt (rloo, grpo, dr_grpo: samples_per_prompt >= 2) or of the batch (reinforce_pp)
    advantage_estimator: str = "gae"
    samples_per_prompt: int = 1  # K responses sampled per prompt; batch_size is prompts x K
    loss_agg: str = "token_mean"  # how the policy loss averages its tokens (see aggregate)
    # rlhf
    kl_coef: float = 0.02  # beta, InstructGPT eq. (2) (paper: 0.02)
    kl_penalty: str = "reward"  # where beta KL goes: per-token reward (paper) or the loss (GRPO)
    kl_estimator: str = "k1"  # the per-token KL sample: k1, k2 or k3 (see kl_estimate)
    adaptive_kl: bool = False  # adapt kl_coef towards kl_target (Ziegler et al. 2019, 2.2)
    kl_target: float = 6.0  # adaptive controller's KL per response, nats (lm-human-preferences: 6)
    kl_horizon: int = 10000  # episodes over which the controller acts (Ziegler et al.: 10000)
    ptx_coef: float = 0.0  # the paper's gamma, eq. (2): PPO-ptx loss weight (paper: 27.8; 0 = PPO)
    ptx_batch_size: int = 8  # pretraining sequences per optimizer step (over its micro-batches)
    ptx_max_tokens: int = 256  # pretraining sequences are cut to this many tokens
    ptx_file: str = ""  # PPO-ptx text, rows {"prompt", "response"} ("" = data_dir/sft_train.jsonl)
    # memory (docs/scaling.md): LoRA, activation checkpointing; frozen copies follow --dtype
    lora_rank: int = 0  # LoRA (Hu et al. 2021): rank-r adapters on every block's projections
    lora_alpha: float = 16.0  # LoRA: the adapters' update B A is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # LoRA: dropout on the adapters' input
    grad_checkpoint: bool = False  # recompute activations in the backward: less memory, ~1/3 slower
    ema_decay: float = 0.0  # EMA of the policy's weights, evaluated and saved (paper: 0.992)
    # system
    strict: bool = False  # refuse an input file with a malformed line (default: skip it, say where)
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # autocast: auto = bfloat16 on CUDA, float32 on CPU; or bfloat16, float32
    seed: int = 1337

    # temperature: logprobs divide the logits by it (lib/config.py allows 0)
    RANGES = {"temperature": "> 0", "samples_per_prompt": ">= 1",
              "advantage_estimator": ("gae", "rloo", "grpo", "dr_grpo", "reinforce_pp"),
              "kl_penalty": ("reward", "loss"), "kl_estimator": ("k1", "k2", "k3"),
              "loss_agg": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")}
    PATHS = {"out_dir": "out_dir", "data_dir": "dir", "sft_ckpt": "model", "reward_ckpt": "model",
             "judge_ckpt": "model", "ptx_file": "file"}  # checked where the flags are parsed


# DEVIATION: paper uses batches of 512 episodes, 64 per minibatch, one inner epoch and a 6B critic
# for every policy size; we use smaller batches, 4 epochs (Ziegler et al. 2019) to get more out of
# each expensive rollout, and a critic of the policy's size.
# DEVIATION: paper evaluates and keeps an EMA of the policy weights (decay 0.992); here it is off
# unless --ema_decay 0.992: it averages over ~125 optimizer steps, a third of a `tiny` run.
_GPU = dict(max_prompt_tokens=512, max_new_tokens=128, batch_size=64, minibatch_size=16,
            noptepochs=4, cliprange=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, kl_coef=0.02,
            eval_prompts=64)
# DEVIATION (tiny only): lr 1e-4, prompts cut to 128 tokens, 2 epochs, so a CPU run takes minutes.
CONFIGS = {
    "tiny": dict(MODEL_PRESETS["tiny"], max_prompt_tokens=128, max_new_tokens=48, iters=40,
                 batch_size=16, minibatch_size=8, noptepochs=2, lr=1e-4, warmup_iters=5,
                 eval_interval=10, eval_prompts=32, sample_every=10),
    "small": dict(MODEL_PRESETS["small"], lr=5e-6, iters=500, grad_accum=2, **_GPU),
    "medium": dict(MODEL_PRESETS["medium"], lr=3e-6, iters=500, grad_accum=4, **_GPU),
    "large": dict(MODEL_PRESETS["large"], lr=2e-6, iters=500, grad_accum=8, **_GPU),
    "xl": dict(MODEL_PRESETS["xl"], lr=1.5e-6, iters=500, grad_accum=16, **_GPU),
}


# ----------------------------------------------------------------------------------------------
# The math. Masks are 1/True on response tokens that count; tensors are (B, T) over the response.

def masked_mean(x, mask):
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries (population variance); padding set to 0. Under
    torchrun the mean and variance are those of every rank's batch together, as for one batch."""
    mean = global_masked_mean(x, mask)
    return (x - mean) * torch.rsqrt(global_masked_mean((x - mean) ** 2, mask) + eps) * mask


def kl_estimate(logprobs, ref_logprobs, estimator="k1"):
    """A per-token sample of KL(pi || pi_ref) at the sampled token y_t ~ pi, from x = log pi(y_t) -
    log pi_ref(y_t) (J. Schulman, "Approximating KL Divergence", 2020):
        k1 = x                   unbiased, can be negative (the paper's: log(pi_RL / pi_SFT), eq. 2)
        k2 = x^2 / 2             biased, >= 0
        k3 = exp(-x) - 1 + x     unbiased, >= 0 (GRPO's, Shao et al. 2024, eq. 4)
    Unbiased for the VALUE of the KL; their GRADIENTS in a loss differ (tests/test_optimum.py):
    through the current logprobs with sampling stopped, k1's expected gradient is 0, k2's is that
    of KL(pi || pi_ref) at each state, k3's that of the forward KL(pi_ref || pi).
    (B, T) -> (B, T)."""
    log_ratio = logprobs - ref_logprobs  # (B, T) x
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown kl_estimator {estimator!r} (k1, k2 or k3)")


def compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_estimator="k1"):
    """InstructGPT eq. (2) as a per-token reward: r_t = -beta (log pi_RL(y_t) - log pi_SFT(y_t)),
    plus the reward model's score r_theta(x, y) on the last response token (Ziegler et al. 2019).
    Another kl_estimator pays its sample instead of the log-ratio (k1); kl_coef 0 leaves the score
    alone (--kl_penalty loss). scores (B,), logprobs, ref_logprobs, mask (B, T) -> rewards (B, T),
    kl (B, T): the log-ratio, whose sum over t is a sample of the response's KL (0 on padding)."""
    kl = (logprobs - ref_logprobs) * mask  # (B, T) summed over t: the log-ratio of y, a KL sample
    rewards = -kl_coef * kl_estimate(logprobs, ref_logprobs, kl_estimator) * mask  # (B, T)
    last = last_token_index(mask)  # (B,) the EOS if the response has one
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype)), kl


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016), backwards over the response:
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t) with V = 0 after the last token;
    A_t = sum_l (gamma lam)^l delta_{t+l} (GAE eq. 16); returns_t = A_t + V(s_t).
    Padding gets zero advantage and return 0."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask  # (B, T)
    T = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = (delta + gamma * lam * lastgaelam) * mask[:, t]  # nothing passes padding
        advantages[:, t] = lastgaelam
    return advantages, advantages + values


def group_advantages(returns, samples_per_prompt, estimator):
    """Critic-free advantages of whole responses from the K = samples_per_prompt responses to the
    same prompt (contiguous in `returns`, (B,): each response's return, the score minus beta times
    its KL when the KL is in the reward). With R_i the return of response i of its group:
        rloo     R_i - mean_{j != i} R_j         (Ahmadian et al. 2024, "Back to Basics")
        dr_grpo  R_i - mean_j R_j                (Liu et al. 2025, "Understanding R1-Zero-Like
                                                 Training", Dr. GRPO)
        grpo     (R_i - mean_j R_j) / (std_j R_j + 1e-6), the std unbiased (Bessel), as torch.std
                                                 (Shao et al. 2024, DeepSeekMath, section 4.1.2)
    rloo's baseline leaves out the sample itself, so it is unbiased; dr_grpo's is (K-1)/K times
    rloo's (the same direction); grpo divides by the group's own spread. -> (B,)"""
    K = samples_per_prompt
    groups = returns.view(-1, K)  # (prompts, K)
    if estimator == "rloo":
        return (groups - (groups.sum(1, keepdim=True) - groups) / (K - 1)).view(-1)
    centred = groups - groups.mean(1, keepdim=True)
    if estimator == "dr_grpo":
        return centred.view(-1)
    if estimator == "grpo":
        return (centred / (groups.std(1, keepdim=True) + 1e-6)).view(-1)
    raise ValueError(f"unknown group estimator {estimator!r} (rloo, grpo or dr_grpo)")


def compute_advantages(rewards, values, mask, cfg):
    """Step 4: advantages (B, T) and the critic's returns (B, T) by cfg.advantage_estimator.
    gae           GAE on the critic's values, whitened over the batch (the paper's, C.4)
    reinforce_pp  each token's return-to-go sum_{s >= t} gamma^(s-t) r_s, no critic (GAE with
                  V = 0 and lambda = 1), whitened over the batch's tokens: REINFORCE++ (Hu et al.
                  2025, arXiv:2501.03262: A_t = r(x, y) - beta sum_{i >= t} KL_i, normalised by
                  the global batch's mean and std)
    rloo, grpo, dr_grpo  group_advantages of each response's return sum_t r_t, the same for every
                  one of its tokens (Ahmadian et al. 2024; Shao et al. 2024; Liu et al. 2025)
    The returns are the critic's targets (gae only; None otherwise)."""
    if cfg.advantage_estimator == "gae":
        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)  # (B, T)
        return whiten(advantages, mask), returns
    if cfg.advantage_estimator == "reinforce_pp":
        returns_to_go, _ = compute_gae(rewards, torch.zeros_like(rewards), mask, cfg.gamma, 1.0)
        return whiten(returns_to_go, mask), None
    per_response = group_advantages(rewards.sum(1), cfg.samples_per_prompt,
                                    cfg.advantage_estimator)  # (B,)
    return per_response[:, None] * mask, None  # (B, T)


def aggregate(losses, mask, loss_agg="token_mean"):
    """The policy loss's average of its per-token terms (B, T) -> scalar:
        token_mean           sum over every token / number of tokens: long responses weigh more
                             (this project's default, InstructGPT's code, OpenRLHF, verl, DAPO)
        seq_mean_token_mean  each response's token mean, then their mean: a token of a long
                             response weighs less (GRPO as published, TRL loss_type "grpo")
        seq_mean_token_sum   each response's token sum, then their mean: every token weighs the
                             same whatever its response's length (Dr. GRPO's fix, up to its
                             constant divisor; verl "seq-mean-token-sum")"""
    if loss_agg == "token_mean":
        return masked_mean(losses, mask)
    mask = mask.to(losses.dtype)
    per_response = (losses * mask).sum(1)  # (B,)
    if loss_agg == "seq_mean_token_mean":
        per_response = per_response / mask.sum(1).clamp(min=1)
    elif loss_agg != "seq_mean_token_sum":
        raise ValueError(f"unknown loss_agg {loss_agg!r}")
    return per_response.mean()


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange, loss_agg="token_mean"):
    """PPO eq. (7): -E[min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)], ratio = pi / pi_old (eq. 6),
    averaged over tokens by `aggregate`. Returns (loss, clipfrac, approx_kl); approx_kl =
    E[ratio - 1 - log ratio] (always >= 0)."""
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    losses_clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    # max of negatives: eq. (7)'s min
    loss = aggregate(torch.max(losses, losses_clipped), mask, loss_agg)
    with torch.no_grad():
        clipfrac = masked_mean((losses_clipped > losses).float(), mask)
        approx_kl = masked_mean(ratio - 1 - log_ratio, mask)
    return loss, clipfrac, approx_kl


def ppo_value_loss(values, old_values, returns, mask, cliprange_value):
    """0.5 E[max((V - R)^2, (V_clip - R)^2)], V_clip = V_old + clip(V - V_old, -eps_v, eps_v): the
    value function may not move far from the rollout's values in one batch (OpenAI baselines' PPO2,
    lm-human-preferences; not in the PPO paper). Returns (loss, clipfrac)."""
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    losses = (values - returns) ** 2  # (B, T)
    losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((losses_clipped > losses).float(), mask)
    return loss, clipfrac


def explained_variance(values, returns, mask):
    """1 - Var[returns - values] / Var[returns]: 1 is a perfect critic, 0 no better than a constant
    (over the batches of all ranks)."""
    residual = global_masked_var(returns - values, mask)
    return 1 - residual / global_masked_var(returns, mask).clamp(min=1e-8)


def adaptive_kl_coef(kl_coef, kl, kl_target, horizon, n_steps):
    """Ziegler et al. 2019, 2.2: e = clip(KL / KL_target - 1, -0.2, 0.2),
    beta <- beta (1 + K_beta e), with K_beta = n_steps / horizon (n_steps episodes in this batch, as
    in lm-human-preferences)."""
    error = min(max(kl / kl_target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


@torch.no_grad()
def ema_update(ema, policy, decay):
    """The policy's exponential moving average (InstructGPT, appendix C.4: decay 0.992), after every
    optimizer step: ema <- decay ema + (1 - decay) theta, for each trained parameter (with LoRA, the
    adapters). `policy` may be DDP-wrapped."""
    params = dict(getattr(policy, "module", policy).named_parameters())
    for name, average in ema.items():
        average.mul_(decay).add_(params[name].detach(), alpha=1 - decay)


def lm_loss(policy, ids, attention_mask):
    """PPO-ptx term of eq. (2), -log pi_RL(x): mean next-token NLL over the real tokens of
    right-padded text."""
    logprobs = policy(ids[:, :-1], attention_mask[:, :-1], targets=ids[:, 1:])  # (B, T-1)
    return -masked_mean(logprobs, attention_mask[:, 1:])


# ----------------------------------------------------------------------------------------------
# Steps 1-5 on a batch: rollout and update

def critic_values(critic, ids, attention_mask, n_query):
    """V(s_t) for each response token t, read at position t - 1 (the state before y_t) -> (B, R).
    One call of the model's forward, so a DDP-wrapped critic works the same."""
    return critic(ids, attention_mask)[:, n_query - 1:-1].float()  # (B, R)


@torch.no_grad()
def rollout(models, queries, query_mask, cfg, kl_coef, *, generator=None, iteration="?"):
    """Steps 1-4 of an iteration on a batch of prompts: a batch of experience (lib/responses.py's
    layout plus logprobs, ref_logprobs, values, rewards, kl, advantages, returns, all (B, R)) and
    its statistics. `models`: policy, ref_policy, critic, and reward_model or a reward_fn."""
    t0 = time.time()
    # 1. rollout: sample responses and score them (reward model, or a programmatic reward_fn)
    try:
        batch = sample_and_score(models.policy, queries, query_mask, cfg.max_new_tokens,
                                 cfg.temperature, generator, models.reward_model, models.reward_fn)
    except FloatingPointError:  # NaN/inf logits in generate: the last update broke the policy
        check_finite(float("nan"), iteration, "a logit of the policy while sampling")
    t_generate = time.time() - t0
    batch["scores"] = batch["scores"] - cfg.missing_eos_penalty * (~batch["has_eos"]).float()
    ids, attention_mask, mask = batch["ids"], batch["attention_mask"], batch["response_mask"]
    P = queries.size(1)
    # 2. logprobs and values: one forward each, logits divided by the sampling temperature
    logprobs = policy_logprobs(models.policy, ids, attention_mask, P, cfg.temperature)  # (B, R)
    ref_logprobs = policy_logprobs(models.ref_policy, ids, attention_mask, P, cfg.temperature)
    values = torch.zeros_like(logprobs)  # (B, R) no critic: the estimator needs no values
    if models.critic is not None:
        models.critic.eval()
        values = critic_values(models.critic, ids, attention_mask, P)  # (B, R)
    # 3. KL-shaped reward, InstructGPT eq. (2) (--kl_penalty loss: the score alone, the KL is paid
    # in the loss)
    beta = kl_coef if cfg.kl_penalty == "reward" else 0.0
    rewards, kl = compute_rewards(batch["scores"], logprobs, ref_logprobs, mask, beta,
                                  cfg.kl_estimator)  # (B, R)
    # 4. advantages: GAE on the critic's values, whitened (or a critic-free estimator)
    advantages, returns = compute_advantages(rewards, values, mask, cfg)  # (B, R)
    batch.update(logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, rewards=rewards,
                 kl=kl, advantages=advantages, returns=returns)
    # statistics over the batches of all ranks; the entropy E_y~pi[-log pi(y)] is estimated from
    # the sampled tokens (free; the exact value would cost another pass over the (B, R, V) logits)
    mean = global_masked_mean
    objective = batch["scores"] - kl_coef * kl.sum(1)  # (B,) eq. (2) with the KL's k1 sample
    stats = {"score": mean(batch["scores"]).item(), "reward": mean(objective).item(),
             "kl": mean(kl.sum(1)).item(), "entropy": mean(-logprobs, mask).item(),
             **({"explained_var": explained_variance(values, returns, mask).item()}
                if returns is not None else {}),
             "resp_len": mean(mask.float().sum(1)).item(),
             "eos_frac": mean(batch["has_eos"].float()).item(),
             "t_generate": t_generate, "t_forward": time.time() - t0 - t_generate}
    return batch, stats


def ppo_update(policy, critic, optimizer, batch, cfg, ptx_batches=None, generator=None,
               iteration="?", ema=None):
    """Step 5: `noptepochs` passes over the batch in shuffled minibatches (`generator`), one
    optimizer step each, minimising pg_loss + vf_coef * vf_loss + ptx_coef * ptx_loss (+ kl_coef *
    kl_loss with --kl_penalty loss; no vf_loss without a critic, critic None); `ptx_batches` yields
    each step's pretraining text (PPO-ptx), `ema` follows the weights (--ema_decay). Returns each
    statistic's mean over the steps. A step may run in micro-batches (grad_accum) on several ranks:
    lib/ddp.py's accumulate_gradients makes that the update of one batch on one process."""
    def loss_fn(mb, share):  # one micro-batch; share: its part of the step's items (1 if whole)
        ids, attention_mask, n_query = mb["ids"], mb["attention_mask"], mb["n_query"]
        mask = mb["response_mask"]  # (b, R)
        logprobs = policy_logprobs(policy, ids, attention_mask, n_query, cfg.temperature)  # (b, R)
        pg_loss, pg_clipfrac, approx_kl = ppo_policy_loss(
            logprobs, mb["logprobs"], mb["advantages"], mask, cfg.cliprange, cfg.loss_agg)
        policy_part = {"pg_loss": pg_loss}  # statistics averaged like the loss (--loss_agg)
        token_means = {"pg_clipfrac": pg_clipfrac, "approx_kl": approx_kl}  # over tokens
        vf_loss = kl_loss = 0.0
        if critic is not None:
            values = critic_values(critic, ids, attention_mask, n_query)  # (b, R)
            vf_loss, vf_clipfrac = ppo_value_loss(
                values, mb["values"], mb["returns"], mask, cfg.cliprange_value)
            token_means.update(vf_loss=vf_loss, vf_clipfrac=vf_clipfrac)
        if cfg.kl_penalty == "loss":  # eq. (2)'s KL as a loss, its gradient through logprobs (GRPO)
            kl_loss = aggregate(kl_estimate(logprobs, mb["ref_logprobs"], cfg.kl_estimator), mask,
                                cfg.loss_agg)
            policy_part.update(kl_loss=kl_loss)
        ptx_loss = lm_loss(policy, *mb["ptx"]) if share["ptx"] > 0 else 0.0  # -log pi_RL(x)
        # InstructGPT eq. (2) through PPO's clipped surrogate, eq. (7). Each term is a mean over
        # its own items (the policy's over --loss_agg's, the value loss's over tokens), so each is
        # weighted by the micro-batch's share of those items.
        loss = (share["policy"] * (pg_loss + cfg.kl_coef * kl_loss)
                + share["tokens"] * cfg.vf_coef * vf_loss + share["ptx"] * cfg.ptx_coef * ptx_loss)
        return loss, {"policy": policy_part, "tokens": token_means,
                      "ptx": {"ptx_loss": ptx_loss} if cfg.ptx_coef else {}}

    trained = (policy,) if critic is None else (policy, critic)
    for m in trained:
        m.train()
    per = "token" if cfg.loss_agg == "token_mean" else "response"  # what a step's mean is over
    steps = []
    for _ in range(cfg.noptepochs):
        order = torch.randperm(len(batch["ids"]), generator=generator).to(batch["ids"].device)
        for start in range(0, len(order), cfg.minibatch_size):
            ptx = next(ptx_batches) if cfg.ptx_coef > 0 else None  # PPO-ptx: pretraining text
            micro, counts = micro_batches(batch, order[start:start + cfg.minibatch_size], ptx,
                                          cfg.grad_accum, per)
            steps.append(accumulate_gradients(loss_fn, micro, counts, trained,
                                              step=iteration, what="the PPO loss"))
            if cfg.grad_clip > 0:
                steps[-1]["grad_norm"] = clip_separately(policy, critic, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema:
                ema_update(ema, policy, cfg.ema_decay)
    return {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}


def clip_separately(policy, critic, max_norm):
    """Clip the policy's and the critic's gradients each to max_norm: the critic's large early
    value gradients must not shrink the policy's step. Returns the policy's norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
    if critic is not None:
        torch.nn.utils.clip_grad_norm_(critic.parameters(), max_norm)
    return norm.item()


def minibatch(batch, idx):
    """Rows `idx` of a rollout without the columns that are padding in all of them (they cost
    compute and change nothing: position ids count real tokens only): left of the longest prompt,
    right of the longest response."""
    P = batch["queries"].size(1)
    R = int(batch["response_mask"][idx].sum(1).max())
    first = int(batch["attention_mask"][idx, :P].any(0).long().argmax())  # first real column
    mb = {k: batch[k][idx, :R] for k in ("logprobs", "ref_logprobs", "values", "advantages",
                                         "returns", "response_mask") if batch[k] is not None}
    mb.update(ids=batch["ids"][idx, first:P + R],
              attention_mask=batch["attention_mask"][idx, first:P + R], n_query=P - first)
    return mb


def micro_batches(batch, rows, ptx, pieces, per="token"):
    """An optimizer step's rollout rows and ptx text (or None) split into `pieces` micro-batches,
    each cut to its own columns, and what each counts, the weights of accumulate_gradients:
    {"tokens": its response tokens, "policy": the items the policy loss averages (its tokens, or
    its responses with per="response"), "ptx": predicted tokens of its text}."""
    micro, counts = [], []
    ptx_parts = split_ptx(ptx, pieces) if ptx is not None else [None] * pieces
    for idx, ptx_part in zip(rows.tensor_split(pieces), ptx_parts):
        micro.append(dict(minibatch(batch, idx), ptx=ptx_part))
        tokens = int(micro[-1]["response_mask"].sum())
        counts.append({"tokens": tokens, "policy": tokens if per == "token" else len(idx),
                       "ptx": n_predicted(ptx_part) if ptx_part is not None else 0})
    return micro, counts


def split_ptx(ptx_batch, pieces):
    """A step's ptx batch (ids, mask) -> `pieces` micro-batches, each cut to its longest row."""
    out = []
    for ids, mask in zip(*(t.tensor_split(pieces) for t in ptx_batch)):
        T = int(mask.sum(1).max()) if mask.numel() else 0  # drop columns of padding in every row
        out.append((ids[:, :T], mask[:, :T]))
    return out


def n_predicted(ptx):
    """Tokens of a right-padded text batch that the ptx loss predicts: all but each row's first."""
    return int(ptx[1][:, 1:].sum())


def make_optimizer(policy, critic, cfg, device):
    """One AdamW over both networks (one state to checkpoint). They share no parameters and Adam
    normalises each parameter's step, so with separate gradient clipping vf_coef barely changes the
    critic's updates (it scales the value gradients, which Adam divides out)."""
    params = list(policy.parameters()) + (list(critic.parameters()) if critic is not None else [])
    return make_adamw(params, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device,
                      eps=cfg.adam_eps)


# ----------------------------------------------------------------------------------------------
# Data, evaluation, samples

def load_prompts(path, enc, max_prompt_tokens, strict=False):
    rows = read_jsonl(path, "prompts", {"prompt": str}, check=prompt_problem, strict=strict)
    return [encode_prompt(enc, row["prompt"], max_prompt_tokens) for row in rows]


def prompt_batch(prompts, batch_size, iteration, seed, device, samples_per_prompt=1):
    """The prompts of one iteration: random, without replacement within the batch, a function of the
    iteration number only (so a resumed run sees the same prompts). Under torchrun one draw of
    world_size * batch_size prompts, the same on every rank, of which each rank takes its share.
    With K = samples_per_prompt, batch_size / K prompts each K times in a row: a prompt's group of
    responses is on one rank, so its statistics (group_advantages) need no communication."""
    n = batch_size // samples_per_prompt
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    idx = shard(torch.randperm(len(prompts), generator=g)[:n * get_world_size()].tolist())
    queries, query_mask = pad_left([prompts[i] for i in idx for _ in range(samples_per_prompt)])
    return queries.to(device), query_mask.to(device)


def load_ptx_text(cfg, enc):
    """The PPO-ptx text as token lists (each cut to ptx_max_tokens)."""
    # DEVIATION: the paper's ptx batches come from GPT-3's pretraining mix; we have no such corpus,
    # so by default the "pretraining distribution" is the HH dialogues themselves (prompt + chosen
    # response, sft_train.jsonl); --ptx_file gives another corpus in the same format.
    path = cfg.ptx_file or os.path.join(cfg.data_dir, "sft_train.jsonl")
    prompt_is_text = lambda r: (None if isinstance(r.get("prompt", ""), str)
                                else '"prompt" must be a string if given')
    texts = read_jsonl(path, "pretraining text (ptx)", {"response": str}, check=prompt_is_text,
                       strict=cfg.strict)
    seqs = [(enc.encode_ordinary(r.get("prompt", "") + r["response"]) + [EOS])[:cfg.ptx_max_tokens]
            for r in texts]
    require(any(len(s) > 1 for s in seqs), f"{path} holds no text for the ptx loss")
    return seqs


def ptx_iterator(sequences, batch_size, seed, device, start=0):
    """Random batches of right-padded pretraining-distribution text for PPO-ptx: one endless
    shuffled stream, entered at sequence number `start` (train() passes the iteration's position in
    it, so the ptx batches, like the prompts, are a function of the iteration: exact resume)."""
    for idx in index_batches(len(sequences), batch_size, seed, start=start):
        ids, mask = pad_right([sequences[i] for i in idx])
        yield ids.to(device), mask.to(device)


def as_judge(reward_fn):
    """A programmatic reward_fn(queries, query_mask, responses, response_mask) as a judge of
    lib/responses.py's sample_and_judge."""
    def judge(batch, rows):
        P = batch["queries"].size(1)
        return reward_fn(batch["queries"], batch["attention_mask"][:, :P], batch["responses"],
                         batch["response_mask"])
    return judge


@torch.no_grad()
def evaluate(models, prompts, cfg, judge=None, baseline=None):
    """Held-out prompts, responses SAMPLED at cfg.temperature with fixed seeds (so the KL term, an
    expectation under the policy, is estimated without bias, and evaluations compare like with
    like): eval_score, eval_kl. With an independent `judge` reward model: its mean score
    (eval_judge_score) and the win rate against `baseline`, the judge's scores of the SFT policy's
    responses (eval_win_rate; InstructGPT Figure 1). DDP: each rank judges its share of prompts."""
    judges = {"score": models.reward_model if models.reward_fn is None
              else as_judge(models.reward_fn)}
    if judge is not None:
        judges["judge"] = judge
    out = sample_and_judge(models.policy, prompts, judges, cfg.max_new_tokens,
                           temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size,
                           ref_policy=models.ref_policy)
    missing_eos = 1.0 - torch.tensor(out["has_eos"], dtype=torch.float32)
    scores = torch.tensor(out["score"]) - cfg.missing_eos_penalty * missing_eos
    scores, kls = all_gather_cat([scores]), all_gather_cat([torch.tensor(out["kl"])])
    metrics = {"eval_score": scores.mean().item(), "eval_kl": kls.mean().item()}
    if judge is not None:
        judged = all_gather_cat([torch.tensor(out["judge"])]).tolist()
        metrics["eval_judge_score"] = sum(judged) / len(judged)
        metrics["eval_win_rate"] = win_rate(judged, baseline)["win_rate"]
    return metrics


def print_samples(enc, batch, n):
    for i in range(min(n, batch["ids"].size(0))):
        q = batch["queries"][i][batch["attention_mask"][i, :batch["queries"].size(1)].bool()]
        r = batch["responses"][i][batch["response_mask"][i]]
        score, kl = batch["scores"][i].item(), batch["kl"][i].sum().item()
        print(f"--- score {score:+.3f} | kl {kl:+.3f}\n"
              f"[prompt] ...{enc.decode(q.tolist())[-300:]!r}\n"
              f"[response] {enc.decode(r.tolist())!r}")


PANELS = {"score (reward model)": ["score", "eval_score"],
          "KL(policy || ref), nats per response": ["kl", "eval_kl"],
          "total reward (score - beta KL)": ["reward"], "kl_coef (beta)": ["kl_coef"],
          "policy entropy, nats per token": ["entropy"], "losses": ["pg_loss", "vf_loss"],
          "clip fractions, approx_kl": ["pg_clipfrac", "vf_clipfrac", "approx_kl"],
          "critic explained variance": ["explained_var"],
          "response length, tokens": ["resp_len"]}


# ----------------------------------------------------------------------------------------------
# Setup: the four models, resumed or fresh; data, optimizer, tracking

def build_models(cfg, device, reward_fn=None, resume_ckpt=None):
    """policy and ref_policy from the SFT checkpoint, reward_model and critic from the reward
    model's (InstructGPT 3.5: "we initialize the value function from the RM"). Dropout is off in all
    four: the ratios and the KL must compare the same deterministic function. A resumed run takes
    policy and critic from its checkpoint. "scratch" models are drawn from their own seeds, so a
    resumed run, which loads other checkpoints first, builds the same ones. With a programmatic
    reward_fn there is no reward model; the critic's trunk then comes from --reward_ckpt (a language
    model's trunk, or scratch) and its head is new.

    With LoRA (--lora_rank) the four models are two networks: the policy is ref_policy's network
    plus adapters (ref_policy is the policy with its adapters off, at no extra memory) and the
    critic is the reward model's network plus adapters and its own value head; only adapters and the
    value head train. Frozen weights are stored in bf16 when the forward passes run in bf16."""
    model_cfg = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                     block_size=cfg.block_size)
    ref_policy, _ = load_model(cfg.sft_ckpt, "gpt", model_cfg, dropout=0.0, device=device,
                               seed=cfg.seed)
    ref_policy.eval().requires_grad_(False)
    if cfg.lora_rank:
        policy = add_lora(share_weights(ref_policy), cfg.lora_rank, cfg.lora_alpha,
                          cfg.lora_dropout)
    elif resume_ckpt:
        policy, _ = load_model(os.path.join(cfg.out_dir, "ckpt.pt"), "gpt", dropout=0.0,
                               device=device)
    else:
        policy = copy.deepcopy(ref_policy).requires_grad_(True)
    shape = {k: getattr(policy.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}
    reward_model = None
    if reward_fn is None:
        reward_model, _ = load_model(cfg.reward_ckpt, "scalar", shape, dropout=0.0, device=device,
                                     seed=cfg.seed + 1)
        reward_model.eval().requires_grad_(False)
    critic = (build_critic(cfg, device, reward_model, shape, resume_ckpt)
              if cfg.advantage_estimator == "gae" else None)  # critic-free estimators: none
    if resume_ckpt and cfg.lora_rank:  # the adapters where the run left them
        load_adapters(policy, resume_ckpt["model"], "policy")
    if autocast_dtype(device, cfg.dtype) == torch.bfloat16:  # frozen weights in bf16: half memory
        for m in (ref_policy, reward_model, critic):
            store_frozen_in(m, torch.bfloat16)
    for m in (policy, critic):
        if m is not None:
            m.transformer.grad_checkpoint = cfg.grad_checkpoint
    longest = cfg.max_prompt_tokens + cfg.max_new_tokens + 1  # + the EOS appended for scoring
    for name, m in (("policy", policy), ("reward model", reward_model), ("critic", critic)):
        block_size = m.config.block_size if m is not None else longest
        require(longest <= block_size, f"max_prompt_tokens + max_new_tokens + 1 = {longest} "
                f"exceeds the {name}'s block_size {block_size}")
    return policy, ref_policy, reward_model, critic


def build_critic(cfg, device, reward_model, shape, resume_ckpt=None):
    """The value function: the reward model's copy (InstructGPT 3.5), with LoRA its network plus
    adapters and its own value head; a resumed run's from its checkpoint; with a reward_fn (no
    reward model) a trunk from --reward_ckpt and a new head."""
    if resume_ckpt and not cfg.lora_rank:
        critic = ScalarGPT(GPTConfig(**resume_ckpt["critic_config"])).to(device)
        critic.load_state_dict(resume_ckpt["critic"])
    elif reward_model is not None:
        critic = (share_weights(reward_model) if cfg.lora_rank
                  else copy.deepcopy(reward_model).requires_grad_(True))
    else:
        critic, _ = load_model(cfg.reward_ckpt, "scalar", shape, dropout=0.0, device=device,
                               transplant=True, seed=cfg.seed + 1)
    if cfg.lora_rank:
        critic = add_lora(critic, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        # the value head: its own, trained
        critic.score_head = copy.deepcopy(critic.score_head).requires_grad_(True)
        if resume_ckpt:
            load_adapters(critic, resume_ckpt["critic"], "critic")
    return critic


def load_judge(cfg, device):
    """The independent judge of eval_win_rate (--judge_ckpt), or None."""
    if not cfg.judge_ckpt:
        return None
    judge, _ = load_model(cfg.judge_ckpt, "scalar", dropout=0.0, device=device)
    longest = cfg.max_prompt_tokens + cfg.max_new_tokens + 1
    require(longest <= judge.config.block_size, f"{longest} tokens exceed the judge's block_size")
    return judge.eval().requires_grad_(False)


def save_ppo_checkpoint(path, policy, critic, optimizer, cfg, iteration, kl_coef, ema=None):
    """ckpt.pt: the policy (loadable as a plain GPT by every script; with --ema_decay its EMA), and
    what --resume needs (with an EMA, the trained weights too). With LoRA the policy and critic are
    saved as their adapters (and value head), and load_model rebuilds the policy on --sft_ckpt. With
    --keep_checkpoints also a durable copy ckpt_{iteration}.pt (curves over training)."""
    trained = ({k: p.detach().clone() for k, p in policy.named_parameters() if k in ema}
               if ema else None)
    base = lora_base(cfg.sft_ckpt, seed=cfg.seed) if cfg.lora_rank else None
    with weights_swapped(policy, ema or {}):  # the EMA is the policy every other script sees
        critic_state = {} if critic is None else dict(
            critic=lora_state_dict(critic) if cfg.lora_rank else critic.state_dict(),
            critic_config=dataclasses.asdict(critic.config))  # none without a critic
        save_checkpoint(path, policy, cfg, base=base, optimizer=optimizer.state_dict(),
                        iteration=iteration, kl_coef=kl_coef, trained=trained, **critic_state)
    if cfg.keep_checkpoints and is_main():  # rank 0 alone wrote ckpt.pt
        kept = os.path.join(os.path.dirname(path), f"ckpt_{iteration:04d}.pt")
        shutil.copyfile(path, kept + ".tmp")
        fsync_replace(kept + ".tmp", kept)


def setup(cfg, reward_fn=None):
    """Everything the loop needs, resumed or fresh: models (and their DDP wrappers), optimizer, the
    policy's EMA, prompts and ptx text, the judge and its baseline, the metrics log.

    DDP (torchrun): batch_size and minibatch_size are PER RANK: N ranks each sample batch_size
    episodes from their own prompts and seed, so an iteration has N * batch_size episodes and each
    optimizer step averages N minibatches (like one process with N times the batch); whitening,
    metrics and the KL controller use statistics of all ranks. Only rank 0 prints, writes files."""
    rank, world_size = init_distributed(cfg.device)
    require(cfg.temperature > 0, f"temperature must be > 0 for PPO (got {cfg.temperature}): "
            "rollouts are sampled and every logprob divides the logits by it, so 0 would give NaN "
            "losses; greedy decoding (temperature 0) is for sample.py")
    require(cfg.batch_size % cfg.minibatch_size == 0,
            "batch_size must be a multiple of minibatch_size")
    require(cfg.minibatch_size % cfg.grad_accum == 0,
            "minibatch_size must be a multiple of grad_accum (the micro-batch size)")
    K, grouped = cfg.samples_per_prompt, cfg.advantage_estimator in ("rloo", "grpo", "dr_grpo")
    require(K >= 2 or not grouped, f"--advantage_estimator {cfg.advantage_estimator} compares the "
            "responses to one prompt: it needs --samples_per_prompt 2 or more (got 1)")
    require(cfg.batch_size % K == 0, f"--batch_size {cfg.batch_size} must be a multiple of "
            f"--samples_per_prompt {K} (batch_size is prompts x K, per rank)")
    # Ziegler et al.'s controller adapts the reward's beta; with the KL in the loss (GRPO, verl's
    # kl_loss) the coefficient is fixed
    require(not (cfg.adaptive_kl and cfg.kl_penalty == "loss"), "--adaptive_kl adapts the KL "
            "penalty in the reward (Ziegler et al. 2019); with --kl_penalty loss use a fixed "
            "--kl_coef (as GRPO does)")
    os.makedirs(cfg.out_dir, exist_ok=True)
    print_config(cfg, cfg.out_dir)
    device = setup_device(cfg.device, cfg.seed)
    ctx = autocast(device, cfg.dtype)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    resume_ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    if resume_ckpt:
        saved = resume_ckpt.get("config", {}).get("advantage_estimator", "gae")
        require(saved == cfg.advantage_estimator, f"{ckpt_path} was trained with "
                f"--advantage_estimator {saved}: resume with the same (not "
                f"{cfg.advantage_estimator}), or drop --resume to start afresh")
        critic_keys = ("critic", "critic_config") if cfg.advantage_estimator == "gae" else ()
        check_resumable(resume_ckpt, ckpt_path, (*critic_keys, "optimizer", "kl_coef",
                                                 "iteration"), "ppo.py", cfg.lora_rank)
        require(resume_ckpt["iteration"] < cfg.iters, f"{ckpt_path} is at iteration "
                f"{resume_ckpt['iteration']} of iters {cfg.iters}: nothing left to do")
    policy, ref_policy, reward_model, critic = build_models(cfg, device, reward_fn, resume_ckpt)
    models = SimpleNamespace(policy=policy, ref_policy=ref_policy, critic=critic,
                             reward_model=reward_model, reward_fn=reward_fn)

    # data, tokenized once in the policy's vocabulary; each rank evaluates its share of the prompts
    enc = get_tokenizer(policy.config.vocab)
    prompts = {split: load_prompts(os.path.join(cfg.data_dir, f"prompts_{split}.jsonl"), enc,
                                   cfg.max_prompt_tokens, cfg.strict) for split in ("train", "val")}
    val_prompts = shard(spread(prompts["val"], cfg.eval_prompts))
    require(len(prompts["train"]) >= cfg.batch_size // K * world_size, f"{len(prompts['train'])} "
            f"prompts < batch_size / samples_per_prompt {cfg.batch_size // K} x {world_size} "
            "processes")
    ptx_seqs = load_ptx_text(cfg, enc) if cfg.ptx_coef > 0 else None
    if critic is None:
        print(f"note: --advantage_estimator {cfg.advantage_estimator} needs no critic: none is "
              "built, trained or saved, and --vf_coef, --cliprange_value and --lam are not used")
    if cfg.ptx_file and cfg.ptx_coef == 0:
        print(f"note: --ptx_file {cfg.ptx_file} is not used: PPO-ptx is off (--ptx_coef 0; "
              "the paper's is 27.8)")
    judge, baseline = load_judge(cfg, device), None
    if judge is not None:  # the judge's scores of the SFT policy's held-out responses
        with ctx:
            baseline = sample_and_judge(ref_policy, val_prompts, {"judge": judge},
                                        cfg.max_new_tokens, temperature=cfg.temperature,
                                        seed=cfg.seed, batch_size=cfg.batch_size)["judge"]
        baseline = all_gather_cat([torch.tensor(baseline)]).tolist()

    optimizer = make_optimizer(policy, critic, cfg, device)
    # the policy's EMA (--ema_decay) starts at its weights; a resumed ckpt.pt holds it as its policy
    ema = ({k: p.detach().clone() for k, p in policy.named_parameters() if p.requires_grad}
           if cfg.ema_decay else None)
    kl_coef, start = cfg.kl_coef, 0
    if resume_ckpt:
        with torch.no_grad():  # the trained weights the EMA was saved beside
            params = dict(policy.named_parameters())
            for k, w in (resume_ckpt.get("trained") or {}).items():
                params[k].copy_(w)
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        kl_coef, start = resume_ckpt["kl_coef"], resume_ckpt["iteration"]
        print(f"resumed from {ckpt_path} at iteration {start}, kl_coef {kl_coef:.4g}")
    log = MetricsLog(cfg.out_dir, cfg.iters, resume_step=start if resume_ckpt else None,
                     log_to=cfg.log_to, run_config=cfg)
    trained = sum(p.numel() for m in (policy, critic) if m is not None
                  for p in m.parameters() if p.requires_grad)
    lora = f" with LoRA rank {cfg.lora_rank}" if cfg.lora_rank else ""
    critic_from = f"critic from {cfg.reward_ckpt}" if critic is not None else "no critic"
    print(f"policy {policy.num_params() / 1e6:.1f}M parameters from {cfg.sft_ckpt} "
          f"({trained / 1e6:.2f}M trained{', policy and critic' if critic else ''}){lora}; "
          f"{critic_from}; reward: {'reward_fn' if reward_fn else cfg.reward_ckpt}; "
          f"{cfg.iters} iterations of {cfg.batch_size // K} prompts"
          f"{f' x {K} responses' if K > 1 else ''}, "
          f"advantages by {cfg.advantage_estimator}, KL ({cfg.kl_estimator}) in the "
          f"{cfg.kl_penalty}, {cfg.noptepochs * cfg.batch_size // cfg.minibatch_size} updates each")
    # DDP: the two trained models average their gradients over ranks; the frozen ones stay
    # unwrapped, and so do rollouts and evaluation (no gradients)
    return SimpleNamespace(
        models=models, policy_ddp=wrap_ddp(policy, device),
        critic_ddp=wrap_ddp(critic, device) if critic is not None else None,
        optimizer=optimizer, ema=ema, kl_coef=kl_coef, start=start, enc=enc, device=device,
        ctx=ctx, seed=cfg.seed + 1_000_000 * rank,  # rank 0 keeps cfg.seed; ranks never share one
        train_prompts=prompts["train"], val_prompts=val_prompts, ptx_seqs=ptx_seqs, judge=judge,
        baseline=baseline, log=log, ckpt_path=ckpt_path,
        png_path=os.path.join(cfg.out_dir, "ppo.png"))


# ----------------------------------------------------------------------------------------------
# Training

def train(cfg, reward_fn=None):
    """Run PPO. `reward_fn(queries, query_mask, responses, response_mask) -> scores (B,)` replaces
    the reward model: the hook for programmatic rewards (tests, toy tasks). Returns final metrics
    and paths."""
    t_start = time.time()
    s = setup(cfg, reward_fn)
    m, kl_coef = s.models, s.kl_coef
    updates_per_iter = cfg.noptepochs * cfg.batch_size // cfg.minibatch_size

    def held_out():  # evaluated with the EMA weights, if any: the policy the run hands on
        with weights_swapped(m.policy, s.ema or {}), s.ctx:
            return evaluate(m, s.val_prompts, cfg, s.judge, s.baseline)
    if s.start == 0:  # the SFT policy's own score on the held-out prompts: the plot's baseline
        s.log.log(0, held_out())
    metrics, last_plot = {}, float("-inf")  # last_plot: when ppo.png was last drawn
    for it in range(s.start, cfg.iters):
        t0 = time.time()
        lr = cfg.lr * min(1.0, 0.1 + 0.9 * it / max(cfg.warmup_iters, 1))  # warmup from lr / 10
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        # this iteration's prompts (this rank's) and ptx text: functions of `it` (exact resume)
        queries, query_mask = prompt_batch(s.train_prompts, cfg.batch_size, it, cfg.seed, s.device,
                                           cfg.samples_per_prompt)
        ptx_batches = None if s.ptx_seqs is None else ptx_iterator(
            s.ptx_seqs, cfg.ptx_batch_size, s.seed, s.device,
            start=it * updates_per_iter * cfg.ptx_batch_size)
        with s.ctx:
            # 1.-4. rollout and score, logprobs and values, KL-shaped reward, GAE
            generator = torch.Generator(device=s.device).manual_seed(s.seed + it)
            batch, metrics = rollout(m, queries, query_mask, cfg, kl_coef=kl_coef,
                                     generator=generator, iteration=it + 1)
            # 5. PPO epochs: pg_loss + vf_coef * vf_loss + ptx_coef * ptx_loss
            t1 = time.time()
            metrics.update(ppo_update(s.policy_ddp, s.critic_ddp, s.optimizer, batch, cfg=cfg,
                                      ptx_batches=ptx_batches, iteration=it + 1, ema=s.ema,
                                      generator=torch.Generator().manual_seed(s.seed + it)))
        metrics.update(kl_coef=kl_coef, lr=lr, t_update=time.time() - t1, t_iter=time.time() - t0)
        # 6. KL coefficient: fixed, or adapted to this batch's KL (all ranks' episodes)
        if cfg.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, metrics["kl"], kl_target=cfg.kl_target,
                                       horizon=cfg.kl_horizon,
                                       n_steps=cfg.batch_size * get_world_size())

        step = it + 1
        if step % cfg.sample_every == 0 or step == 1:
            print_samples(s.enc, batch, cfg.n_samples)
        evaluating = step % cfg.eval_interval == 0 or step == cfg.iters
        if evaluating:
            metrics.update(held_out())
        s.log.log(step, metrics, keys=["score", "kl", "kl_coef", "eval_score", "eval_kl",
                                       "eval_win_rate", "pg_loss", "vf_loss", "entropy",
                                       "resp_len", "t_generate", "t_update", "t_iter"])
        if evaluating:
            save_ppo_checkpoint(s.ckpt_path, m.policy, m.critic, s.optimizer, cfg=cfg,
                                iteration=step, kl_coef=kl_coef, ema=s.ema)
        if evaluating and replot_due(last_plot, final=step == cfg.iters):
            last_plot = time.time()
            panels = dict(PANELS, **({"judge: win rate vs SFT (eval)": ["eval_win_rate"]}
                                     if s.judge else {}))
            plot_metrics(s.log.path, s.png_path, panels, xlabel="iteration",
                         title=f"PPO ({cfg.preset or 'custom'}, {cfg.sft_ckpt})")
    print(f"done: score {metrics.get('score', float('nan')):.4f} | "
          f"kl {metrics.get('kl', float('nan')):.4f} | saved {s.ckpt_path} and {s.png_path} | "
          f"{time.time() - t_start:.0f}s")
    return {**metrics, "iterations": cfg.iters, "ckpt_path": s.ckpt_path,
            "metrics_path": s.log.path, "png_path": s.png_path, "time_s": time.time() - t_start}


if __name__ == "__main__":
    run(train, Config, CONFIGS)
