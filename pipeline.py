"""
The whole of InstructGPT in one command, as a visible sequence of stage-script calls (like a
Makefile): each step is printed, then run as a plain `python stage.py --flag value ...` subprocess,
and timed.

    python pipeline.py --task lab                  # the lab: a miniature world, 15-17 min, 2 CPUs
    python pipeline.py --task lab --config class   # the class lab: one round, shorter runs, <5 min
    python pipeline.py --task lab --config class --kl_coef 0 --out_dir out/kl0   # change a knob
    python pipeline.py --task lab_sizes            # Figure 1 in miniature: three model sizes
    python pipeline.py --task lab_sizes --from_lab out/lab   # the same from a finished lab run
    python pipeline.py --task lab --seed 2 --out_dir out/lab2
    python pipeline.py --task lab --quick --in_process --out_dir out/lab_quick   # a smoke test
    python pipeline.py --task lab --dry_run        # print the commands only
    python pipeline.py --task hh --source path/to/hh-rlhf --subsets harmless-base   # HH-RLHF, CPU
    python pipeline.py --task hh --config small    # HH-RLHF with GPT-2 124M on one GPU

--task lab (data/lab/): generate the world -> pretrain the base model on the world's corpus (sft.py
with prompt "": plain language modelling, the paper's "GPT-3") -> SFT on the labelers' few
demonstrations -> round 1: label.py ranks K = 8 samples per prompt, 4 of SFT and 4 of the base model
(twice, fresh samples each), with the noisy gold labeler -> reward.py -> ppo.py -> round 2: label.py
ranks 4 samples of the round-1 PPO policy and 4 of SFT per prompt (twice) -> reward.py on both
rounds -> ppo.py -> round 3: the same with the round-2 policy's samples -> reward.py (anew from SFT,
on all three rounds) -> DPO on every ranking -> the final ppo.py (saving its EMA of the weights, as
in the paper) -> ppo.py with PPO-ptx (the corpus as pretraining mix) -> ppo.py with RLOO and with
GRPO (--advantage_estimator, K = 4 samples per prompt, no critic) -> an over-optimisation run
(the round-1 reward model, kl_coef 0, checkpoints every 2 iterations) -> data/lab/evaluate_lab.py:
every policy judged by the exact gold on held-out prompts, DIR/results.json, DIR/results.md, plots.
The gold function reaches the reward models only through label.py's rankings.

The lab's experimental settings are flags (--kl_coef, --ptx_coef, --rounds, --k,
--rankings_per_prompt, --label_noise, --ppo_iters), each recorded in results.json ("settings").
--config class (LAB_CONFIGS) is the class lab: one labeling round instead of three, shorter runs,
no RLOO or GRPO (see LAB_CONFIGS for what it shrinks and why); flags override the config's
values. --quick shrinks every step to seconds: a smoke test whose numbers mean nothing.

--task lab_sizes: the paper's Figure 1 in miniature. The same world; the base model, SFT, PPO and
PPO-ptx at each of three model sizes (SIZES, ~20x apart in parameters). The largest is the lab's
model and runs the lab's loop (three labeling rounds); its final reward model is the one every
size's PPO and PPO-ptx optimise, with the final PPO settings and the EMA (the paper's PPO models of
every size used one 6B reward model). Every policy is judged by the exact gold against the largest
SFT model: DIR/results.json ("figure1"), DIR/results.md, DIR/figure1.png. --from_lab LAB_DIR takes
a finished lab run as the largest size (its world, models and reward model, read only) and trains
only the smaller sizes.

--task hh: prepare HH-RLHF -> sft.py -> reward.py (PPO's reward model, train split) -> a judge
reward model trained on the validation comparisons only -> ppo.py -> evaluate.py: win rate of PPO
over SFT by that judge.

The wall time of every step is printed and saved in DIR/times.json (and, for the lab, in
results.json). A new run needs a new --out_dir: a DIR that holds an earlier run's rankings is
refused before the first step, rather than by label.py minutes later, once the new policies exist
(--from_step continues a run).
"""
import argparse
import json
import math
import os
import runpy
import shlex
import subprocess
import sys
import time
import traceback

PY = sys.executable
LAB = "data/lab"
# The lab's model: 6 layers of width 192 (2.7M parameters) with rows for the world's ~290 GPT-2
# tokens only (prepare.py's vocab.json). GPT-2's 50257-token output layer would take most of the
# compute of a model this small; on the world's vocabulary the same compute buys a trunk large
# enough for SFT to state the world's facts.
LAB_MODEL = ["--n_layer", "6", "--n_head", "6", "--n_embd", "192", "--block_size", "128"]
PRETRAIN_STEPS = 600
# --task lab_sizes: three sizes of the lab's model, smallest first, spanning ~20x in parameters
SIZES = [("small", ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "128"]),
         ("medium", ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "128"]),
         ("large", LAB_MODEL)]

# glibc returns every tensor larger than its mmap threshold (at most 32 MB by default) to the kernel
# when it is freed, and the next step's tensor of the same size comes back as fresh zeroed pages:
# with (batch x tokens x 50257) logits that page-faulting is a large share of a CPU step. Raising
# the thresholds keeps freed memory in the heap for reuse; it changes no result. Set for every step.
CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 32), "MALLOC_TRIM_THRESHOLD_": str(2 ** 33)}
# DEVIATION: beta of every lab PPO run but the over-optimisation one, and DPO's beta (paper: 0.02,
# for its reward model's scale)
KL_COEF = 0.1
# PPO's (lr, iters). The round-2 and final policies take smaller steps for longer than round 1: at
# round 1's step size, PPO's own seed alone decided whether the round-2 policy won or went back to
# fabricating (data/lab/EXPERIMENTS.md, "Later PPO runs take smaller steps for longer"). Round 1
# keeps the larger steps: its drift to wrong values is what the round-2 rankings teach the reward
# model to penalise.
ROUND1_PPO = ("3e-4", 30)
ROUND2_PPO = ("1e-4", 60)
FINAL_PPO = ("1e-4", 90)
# The final policies (ppo, ppo_ptx) are the paper's EMA of the policy weights, decay 0.992
# (appendix C.4): the rollouts come from the live weights, the EMA is what is saved and evaluated.
# At 0.992 the EMA averages over about the last 125 optimizer steps, so the final run is 90
# iterations (360 steps) rather than round 2's 60, for the average to catch up with the live
# weights (data/lab/EXPERIMENTS.md, "The final policies are the paper's EMA, after 90
# iterations").
# DEVIATION: the round-1 and round-2 policies are their live weights; their exploits are what the
# next round's rankings teach the reward model to penalise.
FINAL_EMA = ["--ema_decay", "0.992"]
# Bradley-Terry temperature of the labelers: ~73% agreement with the exact gold, the paper's
# inter-labeler agreement (README)
LABEL_NOISE = 1.5

# The lab's settings. "full" is the lab; "class" the class lab: 4.6-4.8 minutes alone on a 2-core
# CPU (course/instructor.md, "How long it takes").
# The class lab is the full lab's first round: the same world, base model, SFT, rankings and
# reward model, and its PPO policy is the full lab's round-1 policy (round 1's larger steps for 30
# iterations, its live weights: a 0.992 EMA needs more steps than that to catch up). One round
# already turns fabrication into "I don't know" and harmful compliance into refusals, and wins
# over SFT by the gold (data/lab/README.md, "The loop works"); rounds 2 and 3 and their reward
# models are half of the full lab's time. The over-optimisation run is the full lab's, its policy
# kept and evaluated every 4 iterations instead of 2 (the same weights: evaluating changes no
# training step). What is cut beyond that: the critic-free policies (RLOO, GRPO), DPO's steps,
# and the evaluation's samples (2 per held-out prompt and policy; 4 SFT samples per prompt for the
# reward model's agreement; best-of-n up to n = 16).
# Flags override these values: `--config class --rounds 3` is the class lab with three rounds.
LAB_CONFIGS = {
    "full": dict(kl_coef=KL_COEF, ptx_coef=1.0, rounds=3, k=8, rankings_per_prompt=2,
                 label_noise=LABEL_NOISE, ppo_iters=FINAL_PPO[1], ppo_lr=FINAL_PPO[0], ema=True,
                 pretrain_steps=PRETRAIN_STEPS, dpo_steps=150, overopt_iters=ROUND1_PPO[1],
                 overopt_every=2, eval_samples=4, rm_samples=8, bon_samples=64,
                 critic_free=("rloo", "grpo")),
    "class": dict(kl_coef=KL_COEF, ptx_coef=1.0, rounds=1, k=8, rankings_per_prompt=2,
                  label_noise=LABEL_NOISE, ppo_iters=ROUND1_PPO[1], ppo_lr=ROUND1_PPO[0],
                  ema=False, pretrain_steps=PRETRAIN_STEPS, dpo_steps=50,
                  overopt_iters=ROUND1_PPO[1], overopt_every=4, eval_samples=2, rm_samples=4,
                  bon_samples=16, critic_free=()),
}
# The knobs a user sets by flag: (type, check, what the check requires).
KNOBS = {
    "kl_coef": (float, lambda v: 0 <= v <= 10, "a number in [0, 10] (the KL penalty's beta; 0 is "
                "no penalty); DPO's beta too (0.1 when it is 0)"),
    "ptx_coef": (float, lambda v: 0 < v <= 100, "a number in (0, 100] (PPO-ptx's weight of the "
                 "pretraining loss; ptx off is the ppo row)"),
    "rounds": (int, lambda v: 1 <= v <= 3, "1, 2 or 3 (labeling rounds)"),
    "k": (int, lambda v: 2 <= v <= 64 and v % 2 == 0, "an even number in [2, 64] (samples ranked "
          "per prompt, half from each of two policies)"),
    "rankings_per_prompt": (int, lambda v: 1 <= v <= 8, "an integer in [1, 8] (rankings of fresh "
                            "samples per labeling prompt and round)"),
    "label_noise": (float, lambda v: 0 <= v <= 100, "a number in [0, 100] (the labelers' "
                    "Bradley-Terry temperature; 0 = exact labelers)"),
    "ppo_iters": (int, lambda v: 1 <= v <= 1000, "an integer in [1, 1000] (the final PPO runs' "
                  "iterations)"),
}
HH_CONFIGS = ("tiny", "small", "medium", "large", "xl")


def quick(a, full, small):
    """A step size, shrunk by --quick."""
    return str(small if a.quick else full)


def sampling(a):
    return ["--max_prompt_tokens", "32", "--max_new_tokens", quick(a, 24, 8)]


def world_step(a, data):
    return ("world", [PY, f"{LAB}/prepare.py", "--out_dir", data, "--seed", str(a.seed),
                      *(["--quick"] * a.quick)])


def pretrain(a, data, out_dir, shape):
    """The base model ("GPT-3"): sft.py with prompt "", plain language modelling on the world's
    corpus, on a model with rows for the world's vocabulary only."""
    return [PY, "sft.py", "--init_from", "scratch", *shape, "--vocab", f"{data}/vocab.json",
            "--dropout", "0", "--data_dir", data, "--train_file", "corpus_train.jsonl",
            "--val_file", "corpus_val.jsonl", "--out_dir", out_dir, "--max_prompt_tokens", "1",
            "--max_response_tokens", "80", "--num_eval_samples", "0", "--batch_size", "16",
            "--grad_accum", "1", "--max_steps", quick(a, a.lab["pretrain_steps"], 3),
            "--lr", "3e-3", "--min_lr", "3e-4", "--warmup_steps", quick(a, 10, 1),
            "--eval_interval", quick(a, 100, 3), "--eval_examples", quick(a, 100, 8),
            "--seed", str(a.seed)]


def sft(a, data, base, out_dir):
    """SFT on the labelers' few demonstrations."""
    return [PY, "sft.py", "--init_from", base, "--dropout", "0", "--data_dir", data,
            "--out_dir", out_dir, "--max_prompt_tokens", "32", "--max_response_tokens", "40",
            "--max_new_tokens", "24", "--batch_size", "8", "--grad_accum", "1",
            "--max_steps", quick(a, 20, 2), "--lr", "3e-4", "--min_lr", "1e-4",
            "--warmup_steps", quick(a, 5, 1), "--eval_interval", quick(a, 10, 2),
            "--seed", str(a.seed)]


def label(a, data, policy, prompts, out, noise, max_prompts, seed, repeat):
    """K samples per prompt of `policy` (comma-separated: shared out), ranked by the gold labeler of
    temperature `noise` (label.py --labeler fn)."""
    return [PY, "label.py", "--policy", policy, "--prompts", f"{data}/{prompts}",
            "--k", quick(a, a.k, 4), "--rankings_per_prompt", repeat, "--labeler", "fn",
            "--labeler_fn", f"{LAB}/gold.py:labeler", "--labeler_arg", data,
            "--label_noise", str(noise), "--out", out, "--temperature", "1.0", *sampling(a),
            "--batch_size", "16", "--max_prompts", max_prompts, "--seed", str(seed)]


def reward(a, d, init_from, train_files, out_dir):
    """A reward model from `init_from` (the SFT model), 4 epochs over the rankings of
    `train_files`."""
    return [PY, "reward.py", "--init_from", init_from, "--data_dir", d,
            "--train_files", train_files, "--val_files", "rankings_val.jsonl",
            "--demo_file", "data/sft_val.jsonl", "--out_dir", out_dir, "--max_prompt_tokens", "32",
            "--max_response_tokens", "40", "--epochs", quick(a, 4, 1), "--batch_size", "8",
            "--grad_accum", "1", "--lr", "3e-4", "--warmup_steps", quick(a, 5, 1),
            "--eval_interval", quick(a, 10, 1), "--seed", str(a.seed)]


def dpo_beta(a):
    """DPO's beta is PPO's kl_coef, the same trade-off (Rafailov et al. 2023, eq. 3). With
    --kl_coef 0 DPO keeps the default's: at beta 0 its loss is log 2 on every pair and its gradient
    zero (dpo.py refuses it)."""
    return a.kl_coef if a.kl_coef > 0 else KL_COEF


def ppo(a, data, sft_ckpt, reward_ckpt, out_dir, *extra, kl_coef=None, every=None,
        steps=ROUND1_PPO):
    """A lab PPO run; `steps` = (lr, iters); kl_coef defaults to --kl_coef."""
    lr, iters = steps
    kl_coef = a.kl_coef if kl_coef is None else kl_coef
    return [PY, "ppo.py", "--sft_ckpt", sft_ckpt, "--reward_ckpt", reward_ckpt, "--data_dir", data,
            "--out_dir", out_dir, *sampling(a), "--batch_size", quick(a, 32, 4),
            "--minibatch_size", quick(a, 16, 2), "--noptepochs", "2", "--lr", lr,
            "--warmup_iters", quick(a, 3, 1), "--iters", quick(a, iters, 2),
            "--eval_interval", every or quick(a, 10, 2), "--eval_prompts", quick(a, 16, 4),
            "--sample_every", quick(a, 10, 1), "--kl_coef", str(kl_coef), "--seed", str(a.seed),
            *extra]


def ptx(a, data):
    """PPO-ptx: the world's corpus as the pretraining mix."""
    return ["--ptx_coef", str(a.ptx_coef), "--ptx_file", f"{data}/corpus_train.jsonl",
            "--ptx_batch_size", "4", "--ptx_max_tokens", "48"]


def rankings_file(r):
    """The rankings of labeling round r."""
    return "rankings.jsonl" if r == 1 else f"rankings_round{r}.jsonl"


def loop_steps(a, d, data):
    """The paper's loop (section 3.1) at the lab's model size, in d: the world, the base model,
    SFT, then `rounds` labeling rounds, each but the last ending in a reward model and a PPO
    policy (reward_round{r}, ppo_round{r}); the last round's reward model is d/reward, anew from
    SFT on every round's rankings. -> (steps, the rankings files, comma-separated)."""
    sft_ckpt = f"{d}/sft/ckpt.pt"
    steps = [world_step(a, data), ("pretrain", pretrain(a, data, f"{d}/base", LAB_MODEL)),
             ("sft", sft(a, data, f"{d}/base/ckpt.pt", f"{d}/sft"))]
    repeat = quick(a, a.rankings_per_prompt, 1)
    files = []
    for r in range(1, a.rounds + 1):
        files.append(rankings_file(r))
        if r == 1:
            # Round 1: K samples per prompt, ranked by the noisy labelers -> reward model -> PPO.
            # DEVIATION: the paper ranks each prompt once; the world has only 283 labeling prompts,
            # so each is ranked twice with fresh samples. More comparisons per prompt raise the
            # reward model's agreement with the gold; more distinct prompts for the same number of
            # comparisons show each fact in several phrasings (data/lab/EXPERIMENTS.md, "Each fact
            # is asked in ten phrasings").
            # DEVIATION: half of round 1's K samples come from the base model, half from SFT (the
            # paper's comparisons are of several models' outputs). SFT's demonstrations removed the
            # corpus's evasive and wrong answers to factual questions; a reward model that never
            # sees them ranked learns that "I don't know" is always good.
            steps += [
                ("label", label(a, data, f"{sft_ckpt},{d}/base/ckpt.pt", "prompts_label.jsonl",
                                f"{d}/{files[-1]}", a.label_noise, quick(a, 0, 4), a.seed,
                                repeat)),
                # the reward models' validation rankings: exact gold order, on a few PPO prompts
                ("label_val", label(a, data, sft_ckpt, "prompts_train.jsonl",
                                    f"{d}/rankings_val.jsonl", 0, quick(a, 16, 2), a.seed + 1,
                                    "1"))]
        else:
            # Round r (the paper's loop, section 3.1): K/2 samples of the round r-1 PPO policy and
            # K/2 of SFT per prompt, ranked; the reward model retrained on every round so far
            # learns what the previous one missed (the policy's exploits). A third round ranks the
            # wrong values the round-2 policy still finds ("The flag of Kaze is blue."), which
            # raises the final policy's helpfulness (data/lab/EXPERIMENTS.md, "A third round, its
            # reward model trained anew from SFT").
            steps.append((f"label_round{r}", label(
                a, data, f"{d}/ppo_round{r - 1}/ckpt.pt,{sft_ckpt}", "prompts_label.jsonl",
                f"{d}/{files[-1]}", a.label_noise, quick(a, 0, 4), a.seed + r, repeat)))
        if r < a.rounds:
            steps += [(f"reward_round{r}", reward(a, d, sft_ckpt, ",".join(files),
                                                  f"{d}/reward_round{r}")),
                      (f"ppo_round{r}", ppo(a, data, sft_ckpt, f"{d}/reward_round{r}/ckpt.pt",
                                            f"{d}/ppo_round{r}",
                                            steps=ROUND1_PPO if r == 1 else ROUND2_PPO))]
    rankings = ",".join(files)
    steps.append(("reward", reward(a, d, sft_ckpt, rankings, f"{d}/reward")))
    return steps, rankings


def final_ppo_steps(a, data, sft_ckpt, reward_ckpt, d, suffix=""):
    """The final policies: PPO and PPO-ptx on the final reward model, with the final settings
    (lab["ppo_lr"], --ppo_iters) and, in the full lab, the EMA of the weights, in d/ppo and
    d/ppo_ptx; step names ppo{suffix}, ppo_ptx{suffix}."""
    final = (a.lab["ppo_lr"], a.ppo_iters)
    ema = FINAL_EMA if a.lab["ema"] else []
    return [(f"ppo{suffix}", ppo(a, data, sft_ckpt, reward_ckpt, f"{d}/ppo", *ema, steps=final)),
            (f"ppo_ptx{suffix}", ppo(a, data, sft_ckpt, reward_ckpt, f"{d}/ppo_ptx",
                                     *ptx(a, data), *ema, steps=final))]


def lab_steps(a):
    """The lab pipeline: [(name, argv)]. The loop (loop_steps), then the final policies (dpo, ppo,
    ppo_ptx, and the critic-free ones) trained on the last reward model, the over-optimisation run
    and the evaluation."""
    d, data = a.out_dir, os.path.join(a.out_dir, "data")
    lab = a.lab
    sft_ckpt = f"{d}/sft/ckpt.pt"
    steps, rankings = loop_steps(a, d, data)
    final = (lab["ppo_lr"], a.ppo_iters)
    ema = FINAL_EMA if lab["ema"] else []
    # the reward model the over-optimisation run optimises and best-of-n selects with
    reward_round1 = f"{d}/reward_round1" if a.rounds > 1 else f"{d}/reward"
    steps += [
        # DPO (Rafailov et al. 2023): the SFT model trained directly on every ranked pair the final
        # reward model saw, with PPO's beta, no reward model and no RL
        ("dpo", [PY, "dpo.py", "--init_from", sft_ckpt, "--data_dir", d,
                 "--train_files", rankings, "--val_files", "rankings_val.jsonl",
                 "--out_dir", f"{d}/dpo", "--max_prompt_tokens", "32",
                 "--max_response_tokens", "40", "--beta", str(dpo_beta(a)), "--batch_size", "32",
                 "--max_steps", quick(a, lab["dpo_steps"], 2), "--lr", "1e-4",
                 "--warmup_steps", quick(a, 10, 1), "--eval_interval", quick(a, 25, 1),
                 "--seed", str(a.seed)]),
        *final_ppo_steps(a, data, sft_ckpt, f"{d}/reward/ckpt.pt", d),
        # The critic-free estimators (docs/estimators.md) on the final PPO's footing: the same
        # reward model, beta, KL in the reward, steps and EMA, and as many sampled responses per
        # iteration, drawn as K = 4 per prompt for a quarter of the prompts
        *((name, ppo(a, data, sft_ckpt, f"{d}/reward/ckpt.pt", f"{d}/{name}",
                     "--advantage_estimator", name, "--samples_per_prompt", quick(a, 4, 2),
                     *ema, steps=final))
          for name in lab["critic_free"]),
        # Over-optimisation (Gao et al. 2022): the round-1 reward model, no KL penalty, the policy
        # kept at every evaluation (ckpt_NNNN.pt)
        ("overopt", ppo(a, data, sft_ckpt, f"{reward_round1}/ckpt.pt", f"{d}/overopt",
                        "--keep_checkpoints", "true", kl_coef=0,
                        every=quick(a, lab["overopt_every"], 1),
                        steps=(ROUND1_PPO[0], lab["overopt_iters"]))),
    ]
    rounds = [flag for r in range(1, a.rounds)
              for flag in (f"--ppo_round{r}", f"{d}/ppo_round{r}/ckpt.pt")]
    steps.append(("evaluate", [
        PY, f"{LAB}/evaluate_lab.py", "--data_dir", data, "--out_dir", d,
        "--base", f"{d}/base/ckpt.pt", "--sft", sft_ckpt, *rounds, "--ppo", f"{d}/ppo/ckpt.pt",
        "--ppo_ptx", f"{d}/ppo_ptx/ckpt.pt", "--dpo", f"{d}/dpo/ckpt.pt",
        *[flag for name in lab["critic_free"] for flag in (f"--{name}", f"{d}/{name}/ckpt.pt")],
        "--reward", f"{d}/reward/ckpt.pt",
        *(["--reward_round1", f"{reward_round1}/ckpt.pt"] if a.rounds > 1 else []),
        "--overopt", f"{d}/overopt", "--rankings", f"{d}/rankings.jsonl",
        "--label_noise", str(a.label_noise), "--samples", quick(a, lab["eval_samples"], 1),
        "--rm_samples", quick(a, lab["rm_samples"], 4),
        "--bon_samples", quick(a, lab["bon_samples"], 4), "--max_prompts", quick(a, 0, 6),
        "--max_new_tokens", quick(a, 24, 8), "--seed", str(a.seed)]))
    return steps


def lab_sizes_steps(a):
    """Figure 1 in miniature: the base model, SFT, PPO and PPO-ptx at each of SIZES, every policy
    judged by the exact gold against the largest SFT model. The largest size is the lab's model and
    runs the lab's loop (loop_steps: three labeling rounds); its final reward model is the one every
    size's PPO optimises, as the paper's PPO models of every size used one 6B reward model trained
    on comparisons of many policies' outputs. Every size's PPO and PPO-ptx take the final settings
    and the EMA (final_ppo_steps). With --from_lab DIR, a finished lab run is the largest size
    (its world, base, SFT, reward model, PPO and PPO-ptx): only the smaller sizes are trained."""
    d = a.out_dir
    large = a.from_lab or d
    data = os.path.join(large, "data")
    reward_ckpt = f"{large}/reward/ckpt.pt"
    steps = []
    if not a.from_lab:
        loop, _ = loop_steps(a, d, data)
        steps += loop + final_ppo_steps(a, data, f"{d}/sft/ckpt.pt", reward_ckpt, d)
    for name, shape in SIZES[:-1]:
        steps += [(f"pretrain_{name}", pretrain(a, data, f"{d}/{name}/base", shape)),
                  (f"sft_{name}", sft(a, data, f"{d}/{name}/base/ckpt.pt", f"{d}/{name}/sft")),
                  *final_ppo_steps(a, data, f"{d}/{name}/sft/ckpt.pt", reward_ckpt,
                                   f"{d}/{name}", suffix=f"_{name}")]
    sizes = [f"{name}={d}/{name}" for name, _ in SIZES[:-1]] + [f"{SIZES[-1][0]}={large}"]
    steps.append(("evaluate", [
        PY, f"{LAB}/evaluate_lab.py", "--data_dir", data, "--out_dir", d, "--figure1", d,
        "--sizes", ",".join(sizes), "--reward", reward_ckpt,
        "--samples", quick(a, 4, 1), "--max_prompts", quick(a, 0, 6),
        "--max_new_tokens", quick(a, 24, 8), "--seed", str(a.seed)]))
    return steps


def hh_steps(a):
    """HH-RLHF: the same stages with the stage scripts' presets; win rate of PPO over SFT by a judge
    RM."""
    d, data = a.out_dir, os.path.join(a.out_dir, "data")
    cfg = ["--config", a.config]
    source = ["--source", a.source] if a.source else []
    quick = (lambda *flags: list(flags)) if a.quick else (lambda *flags: [])
    return [
        ("prepare", [PY, "data/hh_rlhf/prepare.py", "--out_dir", data, "--subsets", a.subsets,
                     *source]),
        ("sft", [PY, "sft.py", *cfg, "--data_dir", data, "--out_dir", f"{d}/sft",
                 *quick("--max_steps", "2", "--eval_interval", "2", "--eval_examples", "4")]),
        ("reward", [PY, "reward.py", *cfg, "--init_from", f"{d}/sft/ckpt.pt", "--data_dir", data,
                    "--out_dir", f"{d}/reward",
                    *quick("--max_steps", "2", "--eval_interval", "2")]),
        # an independent judge: trained on the validation comparisons only, which PPO's reward
        # model never saw
        ("judge", [PY, "reward.py", *cfg, "--init_from", f"{d}/sft/ckpt.pt", "--data_dir", data,
                   "--train_files", "comparisons_val.jsonl", "--out_dir", f"{d}/judge",
                   *quick("--max_steps", "2", "--eval_interval", "2")]),
        ("ppo", [PY, "ppo.py", *cfg, "--sft_ckpt", f"{d}/sft/ckpt.pt",
                 "--reward_ckpt", f"{d}/reward/ckpt.pt", "--data_dir", data,
                 "--out_dir", f"{d}/ppo",
                 *quick("--iters", "2", "--batch_size", "4", "--minibatch_size", "2",
                        "--eval_interval", "2", "--eval_prompts", "4")]),
        ("evaluate", [PY, "evaluate.py", *cfg, "--policy_a", f"{d}/ppo/ckpt.pt",
                      "--policy_b", f"{d}/sft/ckpt.pt", "--prompts", f"{data}/prompts_val.jsonl",
                      "--judge_ckpt", f"{d}/judge/ckpt.pt", "--ref_ckpt", f"{d}/sft/ckpt.pt",
                      "--out", f"{d}/winrate.json",
                      *quick("--max_prompts", "4", "--max_new_tokens", "8")]),
    ]


def show(command):
    return " ".join(["python"] + [shlex.quote(c) for c in command[1:]])


def run_in_process(command):
    """Run `python script.py args...` in this interpreter, as `python` would run it (runpy, __name__
    == "__main__"); returns its exit code. The same script and arguments as a subprocess, without
    the few seconds of start-up (importing torch, tiktoken, matplotlib) that each step would pay
    again."""
    argv = sys.argv
    sys.argv = command[1:]
    try:
        runpy.run_path(command[1], run_name="__main__")
        return 0
    except SystemExit as e:  # sys.exit("error: ...") prints its message, exits 1, as python would
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except Exception:  # a crash: its traceback, then the pipeline's own message naming the step
        traceback.print_exc()
        return 1
    finally:
        sys.argv = argv


def run_steps(steps, out_dir, dry_run=False, from_step="", in_process=False):
    """Print and run each step in order (from `from_step` on, if given); stop at the first failure.
    Returns {step: seconds}, also written to out_dir/times.json (kept from earlier runs for skipped
    steps)."""
    names = [name for name, _ in steps]
    if from_step and from_step not in names:
        sys.exit(f"error: --from_step {from_step} is not a step of this task; the steps are: "
                 f"{', '.join(names)}")
    times_path = os.path.join(out_dir, "times.json")
    times = {}
    if from_step and os.path.isfile(times_path):
        try:
            with open(times_path) as f:
                earlier = names[:names.index(from_step)]
                times = {k: v for k, v in json.load(f).items() if k in earlier}
        except (ValueError, AttributeError):  # a damaged times.json loses the earlier times only
            print(f"note: {times_path} is not readable; the earlier steps' times are not "
                  f"carried over")
    if not dry_run:
        refuse_stale_rankings(steps, names.index(from_step) if from_step else 0)
    t_start = time.time()
    if in_process:  # glibc reads its malloc settings at start-up: they would not reach the steps
        print("every step runs in this Python process (--in_process)", flush=True)
    else:
        print("every step runs with " + " ".join(f"{k}={v}" for k, v in CPU_MALLOC_ENV.items()),
              flush=True)
    for i, (name, command) in enumerate(steps, 1):
        if from_step and i - 1 < names.index(from_step):
            continue
        print(f"\n=== [{i}/{len(steps)}] {name}: {show(command)}", flush=True)
        if dry_run:
            continue
        t0 = time.time()
        if in_process:
            returncode = run_in_process(command)
        else:
            returncode = subprocess.run(command, env={**os.environ, **CPU_MALLOC_ENV}).returncode
        if returncode != 0:
            sys.exit(f"error: step '{name}' failed (exit code {returncode}); its command is above. "
                     f"Fix it, then rerun from this step with --from_step {name}.")
        times[name] = round(time.time() - t0, 1)
        print(f"=== {name} done in {times[name]:.0f}s (total "
              f"{(time.time() - t_start) / 60:.1f} min)", flush=True)
        os.makedirs(out_dir, exist_ok=True)
        with open(times_path + ".tmp", "w") as f:
            json.dump(times, f, indent=1)
        os.replace(times_path + ".tmp", times_path)
    return times


def refuse_stale_rankings(steps, first):
    """A label step after the first step of this invocation would find an earlier run's rankings, of
    other policies, in its --out. label.py refuses such a file (it continues a file only for the
    checkpoints that began it), but only after the steps before it have run; stop before anything
    runs instead, naming the files. The first step itself may be a label step: that continues its
    own file."""
    stale = []
    for name, command in steps[first + 1:]:
        out = command[command.index("--out") + 1] if command[1] == "label.py" else ""
        if out and os.path.isfile(out) and os.path.getsize(out) > 0:
            stale.append((name, out))
    if stale:
        sys.exit("error: these rankings are from an earlier run, and the steps that write them "
                 "would add this run's rankings to them: "
                 + ", ".join(f"{path} ({name})" for name, path in stale) + ". Use a new --out_dir, "
                 "or move those files away; to continue an interrupted run, rerun from its first "
                 "unfinished step with --from_step.")


SMOKE_TEST = ("--quick: a smoke test that every step runs; every step is shrunk to seconds, so its "
              "numbers mean nothing (the class lab is --config class).")


def settings(a):
    """The lab's settings of this run, as results.json records them."""
    return {"config": a.config, **{k: getattr(a, k) for k in KNOBS}, "quick": a.quick,
            **({"from_lab": a.from_lab} if getattr(a, "from_lab", "") else {})}


def record_run(out_dir, times, a):
    """Add the wall times and the settings to the lab's results.json and results.md; a --quick run's
    results.md opens with the warning that its numbers mean nothing."""
    path = os.path.join(out_dir, "results.json")
    with open(path) as f:
        results = json.load(f)
    results["minutes"] = round(sum(times.values()) / 60, 2)
    results["step_seconds"] = times
    results["settings"] = settings(a)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    md_path = os.path.join(out_dir, "results.md")
    with open(md_path) as f:
        md = f.read()
    if a.quick and SMOKE_TEST not in md:
        md = f"**{SMOKE_TEST}**\n\n" + md
    md += ("\nSettings: " + ", ".join(f"{k} {v}" for k, v in results["settings"].items())
           + " (`python pipeline.py --help` says what each means).\n"

           + f"\nWall time: {results['minutes']:.1f} min. Per step (s): "
           + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + "\n")
    with open(md_path + ".tmp", "w") as f:
        f.write(md)
    os.replace(md_path + ".tmp", md_path)
    print(f"\nresults: {path} ({results['minutes']:.1f} min)")


FROM_LAB_FILES = ("data/world.json", "base/ckpt.pt", "sft/ckpt.pt", "reward/ckpt.pt",
                  "ppo/ckpt.pt", "ppo_ptx/ckpt.pt")


def from_lab(p, a, given):
    """--from_lab DIR: check that DIR is a finished full lab run, and take its seed and settings
    (the smaller sizes are trained as its largest size was)."""
    if a.task != "lab_sizes":
        p.error(f"--from_lab is a setting of --task lab_sizes, not of --task {a.task}")
    if os.path.abspath(a.from_lab) == os.path.abspath(a.out_dir):
        p.error(f"--out_dir {a.out_dir} is --from_lab's folder: give lab_sizes a folder of its own "
                f"(it writes results.json, which would replace the lab's)")
    path = os.path.join(a.from_lab, "results.json")
    if not os.path.isfile(path):
        p.error(f"--from_lab {a.from_lab} holds no results.json: it must be the folder of a "
                f"finished `python pipeline.py --task lab` run")
    with open(path) as f:
        lab = json.load(f)
    missing = [f for f in FROM_LAB_FILES if not os.path.isfile(os.path.join(a.from_lab, f))]
    run = lab.get("settings") or {}
    if missing or "seed" not in lab or not run:
        p.error(f"--from_lab {a.from_lab} is not a finished lab run (it lacks "
                f"{(missing or ['its settings in results.json'])[0]}): run `python pipeline.py "
                f"--task lab --out_dir {a.from_lab}` to the end first")
    if run.get("config") != "full":
        p.error(f"--from_lab {a.from_lab} is a run of --config {run.get('config')}; Figure 1 "
                f"takes the full lab's loop (three rounds, the EMA): run --task lab without "
                f"--config")
    if bool(run.get("quick")) != a.quick:
        p.error(f"--from_lab {a.from_lab} was run {'with' if run.get('quick') else 'without'} "
                f"--quick; give lab_sizes the same")
    if a.seed is not None and a.seed != lab["seed"]:
        p.error(f"--seed {a.seed} is not the seed of --from_lab {a.from_lab} ({lab['seed']}): "
                f"the smaller sizes learn the lab's world; leave --seed out")
    if given:
        p.error(f"--{given[0]} cannot be set with --from_lab: every size takes the lab's "
                f"settings (its results.json's \"settings\")")
    a.seed = lab["seed"]
    for name in KNOBS:
        setattr(a, name, run.get(name, a.lab[name]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("lab", "lab_sizes", "hh"), required=True)
    p.add_argument("--seed", type=int, default=None, help="default 1 (lab_sizes --from_lab: the "
                   "lab's)")
    p.add_argument("--out_dir", default="", help="default out/lab or out/hh")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: every step shrunk to seconds, its numbers mean nothing")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--from_step", default="",
                   help="start at this step, reusing the outputs of the earlier ones")
    p.add_argument("--in_process", action="store_true",
                   help="run each step's script in this Python process (runpy) instead of a "
                        "subprocess: saves each step's start-up, a few seconds (the --quick test "
                        "uses it)")
    p.add_argument("--config", default=None, choices=(*LAB_CONFIGS, *HH_CONFIGS),
                   help="lab: full (default) or class (the class lab, under 5 minutes); hh: preset "
                        "of every stage (tiny, the default, on a CPU; small on one GPU)")
    full = LAB_CONFIGS["full"]
    lab_help = {
        "kl_coef": "beta of the KL penalty of every PPO run but the over-optimisation one, and "
                   "DPO's beta",
        "ptx_coef": "PPO-ptx: weight of the pretraining loss (the ppo_ptx policy)",
        "rounds": "labeling rounds, 1..3; the final reward model is trained on every round run",
        "k": "samples ranked per prompt (even: half from each of two policies)",
        "rankings_per_prompt": "rankings of fresh samples per labeling prompt and round",
        "label_noise": "Bradley-Terry temperature of the labelers (0 = exact)",
        "ppo_iters": "iterations of the final PPO runs (ppo, ppo_ptx; lab_sizes: every size's)",
    }
    for name, (kind, _, _) in KNOBS.items():
        p.add_argument(f"--{name}", type=kind, default=None,
                       help=f"lab, lab_sizes: {lab_help[name]} (full: {full[name]}, class: "
                            f"{LAB_CONFIGS['class'][name]})")
    p.add_argument("--source", default="",
                   help="hh: a local copy of HH-RLHF (its folder of *.jsonl.gz files)")
    p.add_argument("--subsets", default="helpful-base", help="hh: comma-separated HH-RLHF subsets")
    p.add_argument("--from_lab", default="",
                   help="lab_sizes: a finished run of --task lab (its folder) as the largest size: "
                        "its world, models and final reward model are reused, only the smaller "
                        "sizes are trained")
    a = p.parse_args(argv)
    a.out_dir = a.out_dir or f"out/{a.task}"
    configs = {"lab": tuple(LAB_CONFIGS), "lab_sizes": ("full",), "hh": HH_CONFIGS}[a.task]
    a.config = a.config or configs[0]
    if a.config not in configs:
        p.error(f"--config {a.config} is not a config of --task {a.task}; it takes "
                f"{', '.join(configs)}")
    given = [name for name in KNOBS if getattr(a, name) is not None]
    if given and a.task == "hh":
        p.error(f"--{given[0]} is a setting of --task lab or lab_sizes, not of --task hh")
    a.lab = LAB_CONFIGS[a.config] if a.task != "hh" else LAB_CONFIGS["full"]
    if a.from_lab:
        from_lab(p, a, given)
    a.seed = 1 if a.seed is None else a.seed
    for name, (_, check, requirement) in KNOBS.items():
        value = getattr(a, name)
        if value is None:
            setattr(a, name, a.lab[name])
        elif not (math.isfinite(value) and check(value)):
            p.error(f"--{name} {value} is out of range: it must be {requirement}")
    if os.path.exists(a.out_dir) and not os.path.isdir(a.out_dir):
        p.error(f"--out_dir {a.out_dir} is a file; it must be a folder to write to (it may not "
                f"exist yet)")
    if a.source and not os.path.isdir(a.source):
        p.error(f"--source {a.source} is not a folder; it must be a local copy of HH-RLHF (its "
                f"<subset>/ folders)")
    # the steps run from the repository's folder: a relative path the user gave is made relative
    # to it
    here = os.path.dirname(os.path.abspath(__file__))

    def from_here(path):
        return path if not path or os.path.isabs(path) else os.path.relpath(os.path.abspath(path),
                                                                             here)
    a.out_dir, a.source, a.from_lab = map(from_here, (a.out_dir, a.source, a.from_lab))
    return a


def main(argv=None):
    a = parse_args(argv)
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # the stage scripts' paths are relative
    if a.quick and a.task != "hh":
        print(SMOKE_TEST, flush=True)
    steps = {"lab": lab_steps, "lab_sizes": lab_sizes_steps, "hh": hh_steps}[a.task](a)
    times = run_steps(steps, a.out_dir, a.dry_run, a.from_step, a.in_process)
    if a.task in ("lab", "lab_sizes") and not a.dry_run:
        record_run(a.out_dir, times, a)
    elif not a.dry_run:
        print(f"\ndone in {sum(times.values()) / 60:.1f} min: {a.out_dir}/winrate.json")
    return times


if __name__ == "__main__":
    main()
