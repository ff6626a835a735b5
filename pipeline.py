"""
The whole of InstructGPT in one command, as a visible sequence of stage-script calls (like a Makefile):
each step is printed, then run as a plain `python stage.py --flag value ...` subprocess, and timed.

    python pipeline.py --task lab                      # the lab: a miniature world, ~13 min on a 2-core CPU
    python pipeline.py --task lab_sizes                # Figure 1 in miniature: three model sizes
    python pipeline.py --task lab --seed 2 --out_dir out/lab2
    python pipeline.py --task lab --quick --in_process --out_dir out/lab_quick   # every step shrunk, one process
    python pipeline.py --task lab --dry_run            # print the commands only
    python pipeline.py --task hh --source path/to/hh-rlhf --subsets harmless-base   # HH-RLHF from a local copy, CPU
    python pipeline.py --task hh --config small        # HH-RLHF with GPT-2 124M on one GPU

--task lab (data/lab/): generate the world -> pretrain the base model on the world's corpus (sft.py with
prompt "": plain language modelling, the paper's "GPT-3") -> SFT on the labelers' few demonstrations -> round
1: label.py ranks K = 8 samples per prompt, 4 of SFT and 4 of the base model (twice, fresh samples each),
with the noisy gold labeler -> reward.py -> ppo.py -> round 2: label.py ranks 4 samples of the round-1 PPO
policy and 4 of SFT per prompt (twice) -> reward.py on both rounds -> ppo.py -> round 3: the same with the
round-2 policy's samples -> reward.py (anew from SFT, on all three rounds) -> the final ppo.py (saving its EMA
of the weights, as in the paper) -> ppo.py with PPO-ptx (the corpus as pretraining mix) -> DPO on every ranking
-> an over-optimisation run (the round-1 reward model, kl_coef 0, checkpoints every 2 iterations) ->
data/lab/evaluate_lab.py: every policy judged by the exact gold on held-out prompts, DIR/results.json,
DIR/results.md, plots. The gold function reaches the reward models only through label.py's rankings.

--task lab_sizes: the paper's Figure 1 in miniature. The same world; the base model, SFT, PPO and PPO-ptx at
each of three model sizes (SIZES, ~20x apart in parameters), PPO of every size against one reward model (from the
largest SFT model, as the paper's PPO models of every size used one 6B reward model); every policy judged by the
exact gold against the largest SFT model: DIR/results.json ("figure1"), DIR/results.md, DIR/figure1.png.

--task hh: prepare HH-RLHF -> sft.py -> reward.py (PPO's reward model, train split) -> a judge reward model
trained on the validation comparisons only -> ppo.py -> evaluate.py: win rate of PPO over SFT by that judge.

The wall time of every step is printed and saved in DIR/times.json (and, for the lab, in results.json). A new
run needs a new --out_dir: a DIR that holds an earlier run's rankings is refused before the first step, rather than
by label.py minutes later, once the new policies exist (--from_step continues a run).
"""
import argparse
import json
import os
import runpy
import shlex
import subprocess
import sys
import time
import traceback

PY = sys.executable
LAB = "data/lab"
# The lab's model: 6 layers of width 192 (2.7M parameters) with rows for the world's ~290 GPT-2 tokens only
# (prepare.py's vocab.json). With GPT-2's 50257-token output layer, that layer was 94% of a 4x64 model's compute;
# on the world's vocabulary the same compute buys a trunk 13x larger, which states the world's facts (SFT answers
# 93-97% of held-out factual questions right in seeds 1-4).
LAB_MODEL = ["--n_layer", "6", "--n_head", "6", "--n_embd", "192", "--block_size", "128"]
PRETRAIN_STEPS = 600
# --task lab_sizes: three sizes of the lab's model, smallest first, spanning ~20x in parameters
SIZES = [("small", ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "128"]),
         ("medium", ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "128"]),
         ("large", LAB_MODEL)]

# glibc returns every tensor larger than its mmap threshold (at most 32 MB by default) to the kernel when it is
# freed, and the next step's tensor of the same size comes back as fresh zeroed pages: with the lab's
# (batch x tokens x 50257) logits that page-faulting is ~40% of a CPU step. Raising the thresholds keeps freed
# memory in the heap for reuse (1.7x faster pretraining here); it changes no result. Set for every step below.
CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 32), "MALLOC_TRIM_THRESHOLD_": str(2 ** 33)}
KL_COEF = 0.1  # DEVIATION: beta of every lab PPO run but the over-optimisation one (paper: 0.02, for its RM scale)
# PPO's (lr, iters). The round-2 and final policies take smaller steps for longer than round 1. At round 1's
# setting the round-2 policy was a draw: PPO's seed alone moved its win rate over SFT by up to 0.08, and one draw went
# back to fabricating (data/lab/README.md, "PPO's own seed"). Round 1 keeps the larger steps: its drift to wrong
# values is what the round-2 rankings teach the reward model to penalise (seed 1 with small steps in round 1 too:
# less drift, and the round-2 policy lost more helpfulness).
ROUND1_PPO = ("3e-4", 30)
ROUND2_PPO = ("1e-4", 60)
FINAL_PPO = ("1e-4", 90)
# The final policies (ppo, ppo_ptx) are the paper's EMA of the policy weights, decay 0.992 (appendix C.4): the
# rollouts come from the live weights, the EMA is what is saved and evaluated. At 0.992 the EMA averages over about
# the last 125 optimizer steps, so the final run is 90 iterations (360 steps) instead of round 2's 60: on the ten
# seeds' final reward models the EMA at 60 kept helpfulness but won less than the live weights; 30 more iterations
# raise the win rate, the average keeps helpfulness (data/lab/README.md, "The paper's EMA of the final policies").
# Whole runs with it on seeds 1-5 and on seeds 11-15, never run before: data/lab/README.md, "What it shows".
# DEVIATION: the round-1 and round-2 policies are their live weights; their exploits are what the next round's
# rankings teach the reward model to penalise.
FINAL_EMA = ["--ema_decay", "0.992"]
RANKINGS = "rankings.jsonl,rankings_round2.jsonl,rankings_round3.jsonl"  # the three rounds' rankings
LABEL_NOISE = 1.5  # Bradley-Terry temperature of the labelers: ~73% agreement with the exact gold, the paper's
# inter-labeler agreement (README)


def quick(a, full, small):
    """A step size, shrunk by --quick."""
    return str(small if a.quick else full)


def sampling(a):
    return ["--max_prompt_tokens", "32", "--max_new_tokens", quick(a, 24, 8)]


def world_step(a, data):
    return ("world", [PY, f"{LAB}/prepare.py", "--out_dir", data, "--seed", str(a.seed), *(["--quick"] * a.quick)])


def pretrain(a, data, out_dir, shape):
    """The base model ("GPT-3"): sft.py with prompt "", plain language modelling on the world's corpus, on a model
    with rows for the world's vocabulary only."""
    return [PY, "sft.py", "--init_from", "scratch", *shape, "--vocab", f"{data}/vocab.json", "--dropout", "0",
            "--data_dir", data, "--train_file", "corpus_train.jsonl", "--val_file", "corpus_val.jsonl",
            "--out_dir", out_dir, "--max_prompt_tokens", "1", "--max_response_tokens", "80", "--num_eval_samples", "0",
            "--batch_size", "16", "--grad_accum", "1", "--max_steps", quick(a, PRETRAIN_STEPS, 3), "--lr", "3e-3",
            "--min_lr", "3e-4", "--warmup_steps", quick(a, 10, 1), "--eval_interval", quick(a, 100, 3),
            "--eval_examples", quick(a, 100, 8), "--seed", str(a.seed)]


def sft(a, data, base, out_dir):
    """SFT on the labelers' few demonstrations."""
    return [PY, "sft.py", "--init_from", base, "--dropout", "0", "--data_dir", data, "--out_dir", out_dir,
            "--max_prompt_tokens", "32", "--max_response_tokens", "40", "--max_new_tokens", "24", "--batch_size", "8",
            "--grad_accum", "1", "--max_steps", quick(a, 20, 2), "--lr", "3e-4", "--min_lr", "1e-4",
            "--warmup_steps", quick(a, 5, 1), "--eval_interval", quick(a, 10, 2), "--seed", str(a.seed)]


def label(a, data, policy, prompts, out, noise, max_prompts, seed, repeat):
    """K samples per prompt of `policy` (comma-separated: shared out), ranked by the gold labeler of temperature
    `noise` (label.py --labeler fn)."""
    return [PY, "label.py", "--policy", policy, "--prompts", f"{data}/{prompts}", "--k", quick(a, 8, 4),
            "--rankings_per_prompt", repeat, "--labeler", "fn", "--labeler_fn", f"{LAB}/gold.py:labeler",
            "--labeler_arg", data, "--label_noise", str(noise), "--out", out, "--temperature", "1.0", *sampling(a),
            "--batch_size", "16", "--max_prompts", max_prompts, "--seed", str(seed)]


def reward(a, d, init_from, train_files, out_dir):
    """A reward model from `init_from` (the SFT model), 4 epochs over the rankings of `train_files`."""
    return [PY, "reward.py", "--init_from", init_from, "--data_dir", d, "--train_files", train_files,
            "--val_files", "rankings_val.jsonl", "--demo_file", "data/sft_val.jsonl", "--out_dir", out_dir,
            "--max_prompt_tokens", "32", "--max_response_tokens", "40", "--epochs", quick(a, 4, 1),
            "--batch_size", "8", "--grad_accum", "1", "--lr", "3e-4", "--warmup_steps", quick(a, 5, 1),
            "--eval_interval", quick(a, 10, 1), "--seed", str(a.seed)]


def ppo(a, data, sft_ckpt, reward_ckpt, out_dir, *extra, kl_coef=KL_COEF, every=None, steps=ROUND1_PPO):
    """A lab PPO run; `steps` = (lr, iters)."""
    lr, iters = steps
    return [PY, "ppo.py", "--sft_ckpt", sft_ckpt, "--reward_ckpt", reward_ckpt, "--data_dir", data,
            "--out_dir", out_dir, *sampling(a), "--batch_size", quick(a, 32, 4), "--minibatch_size", quick(a, 16, 2),
            "--noptepochs", "2", "--lr", lr, "--warmup_iters", quick(a, 3, 1), "--iters", quick(a, iters, 2),
            "--eval_interval", every or quick(a, 10, 2), "--eval_prompts", quick(a, 16, 4),
            "--sample_every", quick(a, 10, 1), "--kl_coef", str(kl_coef), "--seed", str(a.seed), *extra]


def ptx(data):
    """PPO-ptx: the world's corpus as the pretraining mix."""
    return ["--ptx_coef", "1.0", "--ptx_file", f"{data}/corpus_train.jsonl", "--ptx_batch_size", "4",
            "--ptx_max_tokens", "48"]


def lab_steps(a):
    """The lab pipeline: [(name, argv)]."""
    d, data = a.out_dir, os.path.join(a.out_dir, "data")
    steps = [world_step(a, data), ("pretrain", pretrain(a, data, f"{d}/base", LAB_MODEL)),
             ("sft", sft(a, data, f"{d}/base/ckpt.pt", f"{d}/sft"))]
    steps += [
        # Round 1: K samples per prompt, ranked by the noisy labelers -> reward model -> PPO.
        # DEVIATION: the paper ranks each prompt once; the world has only 283 labeling prompts, so each is ranked
        # twice with fresh samples. More comparisons per prompt raised the RM's gold agreement (0.64 -> 0.80 on an
        # earlier world); more distinct prompts for the same number of comparisons show each fact in several
        # phrasings, and kept round-2 PPO as helpful as SFT (data/lab/README.md, "Checking a value").
        # DEVIATION: half of round 1's K samples come from the base model, half from SFT (the paper's comparisons
        # are of several models' outputs). SFT's demonstrations removed the corpus's evasive and wrong answers to
        # factual questions; an RM that never sees them ranked learns that "I don't know" is always good.
        ("label", label(a, data, f"{d}/sft/ckpt.pt,{d}/base/ckpt.pt", "prompts_label.jsonl", f"{d}/rankings.jsonl",
                        a.label_noise, quick(a, 0, 4), a.seed, quick(a, 2, 1))),
        # the reward models' validation rankings: exact gold order, on a few PPO prompts
        ("label_val", label(a, data, f"{d}/sft/ckpt.pt", "prompts_train.jsonl", f"{d}/rankings_val.jsonl", 0,
                            quick(a, 16, 2), a.seed + 1, "1")),
        ("reward_round1", reward(a, d, f"{d}/sft/ckpt.pt", "rankings.jsonl", f"{d}/reward_round1")),
        ("ppo_round1", ppo(a, data, f"{d}/sft/ckpt.pt", f"{d}/reward_round1/ckpt.pt", f"{d}/ppo_round1")),
        # Round 2 (the paper's loop, section 3.1): K/2 samples of the round-1 PPO policy and K/2 of SFT per prompt,
        # ranked; the reward model retrained on both rounds learns what the first one missed (the policy's exploits)
        ("label_round2", label(a, data, f"{d}/ppo_round1/ckpt.pt,{d}/sft/ckpt.pt", "prompts_label.jsonl",
                               f"{d}/rankings_round2.jsonl", a.label_noise, quick(a, 0, 4), a.seed + 2,
                               quick(a, 2, 1))),
        ("reward_round2", reward(a, d, f"{d}/sft/ckpt.pt", "rankings.jsonl,rankings_round2.jsonl",
                                 f"{d}/reward_round2")),
        ("ppo_round2", ppo(a, data, f"{d}/sft/ckpt.pt", f"{d}/reward_round2/ckpt.pt", f"{d}/ppo_round2",
                           steps=ROUND2_PPO)),
        # Round 3: the same again with the round-2 policy's samples. The round-2 policy still finds wrong values
        # the round-2 reward model likes ("The flag of Kaze is blue."); ranking them, and a new reward model from
        # SFT on all three rounds, raised the final policy's helpfulness over the round-2 one's in eight of ten
        # seeds (seed 6: 0.72 -> 0.90; data/lab/README.md, "A third round").
        ("label_round3", label(a, data, f"{d}/ppo_round2/ckpt.pt,{d}/sft/ckpt.pt", "prompts_label.jsonl",
                               f"{d}/rankings_round3.jsonl", a.label_noise, quick(a, 0, 4), a.seed + 3,
                               quick(a, 2, 1))),
        ("reward", reward(a, d, f"{d}/sft/ckpt.pt", RANKINGS, f"{d}/reward")),
        # DPO (Rafailov et al. 2023): the SFT model trained directly on every ranked pair the final reward model
        # saw, with PPO's beta, no reward model and no RL
        ("dpo", [PY, "dpo.py", "--init_from", f"{d}/sft/ckpt.pt", "--data_dir", d,
                 "--train_files", RANKINGS, "--val_files", "rankings_val.jsonl",
                 "--out_dir", f"{d}/dpo", "--max_prompt_tokens", "32", "--max_response_tokens", "40",
                 "--beta", str(KL_COEF), "--batch_size", "32", "--max_steps", quick(a, 150, 2), "--lr", "1e-4",
                 "--warmup_steps", quick(a, 10, 1), "--eval_interval", quick(a, 25, 1), "--seed", str(a.seed)]),
        ("ppo", ppo(a, data, f"{d}/sft/ckpt.pt", f"{d}/reward/ckpt.pt", f"{d}/ppo", *FINAL_EMA, steps=FINAL_PPO)),
        ("ppo_ptx", ppo(a, data, f"{d}/sft/ckpt.pt", f"{d}/reward/ckpt.pt", f"{d}/ppo_ptx", *ptx(data), *FINAL_EMA,
                        steps=FINAL_PPO)),
        # Over-optimisation (Gao et al. 2022): the round-1 reward model, no KL penalty, the policy kept at every
        # evaluation (ckpt_NNNN.pt)
        ("overopt", ppo(a, data, f"{d}/sft/ckpt.pt", f"{d}/reward_round1/ckpt.pt", f"{d}/overopt",
                        "--keep_checkpoints", "true", kl_coef=0, every=quick(a, 2, 1))),
        ("evaluate", [PY, f"{LAB}/evaluate_lab.py", "--data_dir", data, "--out_dir", d, "--base", f"{d}/base/ckpt.pt",
                      "--sft", f"{d}/sft/ckpt.pt", "--ppo_round1", f"{d}/ppo_round1/ckpt.pt",
                      "--ppo_round2", f"{d}/ppo_round2/ckpt.pt",
                      "--ppo", f"{d}/ppo/ckpt.pt", "--ppo_ptx", f"{d}/ppo_ptx/ckpt.pt", "--dpo", f"{d}/dpo/ckpt.pt",
                      "--reward", f"{d}/reward/ckpt.pt",
                      "--reward_round1", f"{d}/reward_round1/ckpt.pt", "--overopt", f"{d}/overopt",
                      "--rankings", f"{d}/rankings.jsonl", "--label_noise", str(a.label_noise),
                      "--samples", quick(a, 4, 1), "--rm_samples", quick(a, 8, 4), "--bon_samples", quick(a, 64, 4),
                      "--max_prompts", quick(a, 0, 6), "--max_new_tokens", quick(a, 24, 8), "--seed", str(a.seed)]),
    ]
    return steps


def lab_sizes_steps(a):
    """Figure 1 in miniature: the base model, SFT, PPO and PPO-ptx at each of SIZES, every policy judged by the
    exact gold against the largest SFT model. One reward model for every size, trained from the largest SFT model
    on rankings of the largest SFT and base models' samples (the paper's PPO models of every size used one 6B RM)."""
    d, data = a.out_dir, os.path.join(a.out_dir, "data")
    largest = SIZES[-1][0]
    steps = [world_step(a, data)]
    for name, shape in SIZES:
        steps += [(f"pretrain_{name}", pretrain(a, data, f"{d}/{name}/base", shape)),
                  (f"sft_{name}", sft(a, data, f"{d}/{name}/base/ckpt.pt", f"{d}/{name}/sft"))]
    steps += [
        ("label", label(a, data, f"{d}/{largest}/sft/ckpt.pt,{d}/{largest}/base/ckpt.pt", "prompts_label.jsonl",
                        f"{d}/rankings.jsonl", a.label_noise, quick(a, 0, 4), a.seed, quick(a, 2, 1))),
        ("label_val", label(a, data, f"{d}/{largest}/sft/ckpt.pt", "prompts_train.jsonl", f"{d}/rankings_val.jsonl",
                            0, quick(a, 16, 2), a.seed + 1, "1")),
        ("reward", reward(a, d, f"{d}/{largest}/sft/ckpt.pt", "rankings.jsonl", f"{d}/reward")),
    ]
    for name, _ in SIZES:
        steps += [(f"ppo_{name}", ppo(a, data, f"{d}/{name}/sft/ckpt.pt", f"{d}/reward/ckpt.pt", f"{d}/{name}/ppo")),
                  (f"ppo_ptx_{name}", ppo(a, data, f"{d}/{name}/sft/ckpt.pt", f"{d}/reward/ckpt.pt",
                                          f"{d}/{name}/ppo_ptx", *ptx(data)))]
    steps.append(("evaluate", [PY, f"{LAB}/evaluate_lab.py", "--data_dir", data, "--out_dir", d, "--figure1", d,
                               "--sizes", ",".join(name for name, _ in SIZES), "--reward", f"{d}/reward/ckpt.pt",
                               "--samples", quick(a, 4, 1), "--max_prompts", quick(a, 0, 6),
                               "--max_new_tokens", quick(a, 24, 8), "--seed", str(a.seed)]))
    return steps


def hh_steps(a):
    """HH-RLHF: the same stages with the stage scripts' presets; win rate of PPO over SFT by a judge RM."""
    d, data = a.out_dir, os.path.join(a.out_dir, "data")
    cfg = ["--config", a.config]
    source = ["--source", a.source] if a.source else []
    quick = (lambda *flags: list(flags)) if a.quick else (lambda *flags: [])
    return [
        ("prepare", [PY, "data/hh_rlhf/prepare.py", "--out_dir", data, "--subsets", a.subsets, *source]),
        ("sft", [PY, "sft.py", *cfg, "--data_dir", data, "--out_dir", f"{d}/sft",
                 *quick("--max_steps", "2", "--eval_interval", "2", "--eval_examples", "4")]),
        ("reward", [PY, "reward.py", *cfg, "--init_from", f"{d}/sft/ckpt.pt", "--data_dir", data,
                    "--out_dir", f"{d}/reward", *quick("--max_steps", "2", "--eval_interval", "2")]),
        # an independent judge: trained on the validation comparisons only, which PPO's reward model never saw
        ("judge", [PY, "reward.py", *cfg, "--init_from", f"{d}/sft/ckpt.pt", "--data_dir", data,
                   "--train_files", "comparisons_val.jsonl", "--out_dir", f"{d}/judge",
                   *quick("--max_steps", "2", "--eval_interval", "2")]),
        ("ppo", [PY, "ppo.py", *cfg, "--sft_ckpt", f"{d}/sft/ckpt.pt", "--reward_ckpt", f"{d}/reward/ckpt.pt",
                 "--data_dir", data, "--out_dir", f"{d}/ppo",
                 *quick("--iters", "2", "--batch_size", "4", "--minibatch_size", "2", "--eval_interval", "2",
                        "--eval_prompts", "4")]),
        ("evaluate", [PY, "evaluate.py", *cfg, "--policy_a", f"{d}/ppo/ckpt.pt", "--policy_b", f"{d}/sft/ckpt.pt",
                      "--prompts", f"{data}/prompts_val.jsonl", "--judge_ckpt", f"{d}/judge/ckpt.pt",
                      "--ref_ckpt", f"{d}/sft/ckpt.pt", "--out", f"{d}/winrate.json",
                      *quick("--max_prompts", "4", "--max_new_tokens", "8")]),
    ]


def show(command):
    return " ".join(["python"] + [shlex.quote(c) for c in command[1:]])


def run_in_process(command):
    """Run `python script.py args...` in this interpreter, as `python` would run it (runpy, __name__ ==
    "__main__"); returns its exit code. The same script and arguments as a subprocess, without the few seconds
    of start-up (importing torch, tiktoken, matplotlib) that each step would pay again."""
    argv = sys.argv
    sys.argv = command[1:]
    try:
        runpy.run_path(command[1], run_name="__main__")
        return 0
    except SystemExit as e:  # sys.exit("error: ...") prints its message and exits 1, as python would
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
    Returns {step: seconds}, also written to out_dir/times.json (kept from earlier runs for skipped steps)."""
    names = [name for name, _ in steps]
    if from_step and from_step not in names:
        sys.exit(f"error: --from_step {from_step} is not a step of this task; the steps are: {', '.join(names)}")
    times_path = os.path.join(out_dir, "times.json")
    times = {}
    if from_step and os.path.isfile(times_path):
        try:
            with open(times_path) as f:
                times = {k: v for k, v in json.load(f).items() if k in names[:names.index(from_step)]}
        except (ValueError, AttributeError):  # a damaged times.json only loses the earlier steps' wall times
            print(f"note: {times_path} is not readable; the earlier steps' times are not carried over")
    if not dry_run:
        refuse_stale_rankings(steps, names.index(from_step) if from_step else 0)
    t_start = time.time()
    if in_process:  # glibc reads its malloc settings at start-up: they would not reach the steps
        print("every step runs in this Python process (--in_process)", flush=True)
    else:
        print("every step runs with " + " ".join(f"{k}={v}" for k, v in CPU_MALLOC_ENV.items()), flush=True)
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
            sys.exit(f"error: step '{name}' failed (exit code {returncode}); its command is above. Fix it, "
                     f"then rerun from this step with --from_step {name}.")
        times[name] = round(time.time() - t0, 1)
        print(f"=== {name} done in {times[name]:.0f}s (total {(time.time() - t_start) / 60:.1f} min)", flush=True)
        os.makedirs(out_dir, exist_ok=True)
        with open(times_path + ".tmp", "w") as f:
            json.dump(times, f, indent=1)
        os.replace(times_path + ".tmp", times_path)
    return times


def refuse_stale_rankings(steps, first):
    """A label step after the first step of this invocation would find an earlier run's rankings, of other
    policies, in its --out. label.py refuses such a file (it continues a file only for the checkpoints that began
    it), but only after the steps before it have run; stop before anything runs instead, naming the files. The
    first step itself may be a label step: that continues its own file."""
    stale = []
    for name, command in steps[first + 1:]:
        out = command[command.index("--out") + 1] if command[1] == "label.py" else ""
        if out and os.path.isfile(out) and os.path.getsize(out) > 0:
            stale.append((name, out))
    if stale:
        sys.exit("error: these rankings are from an earlier run, and the steps that write them would add this run's "
                 "rankings to them: " + ", ".join(f"{path} ({name})" for name, path in stale) + ". Use a new "
                 "--out_dir, or move those files away; to continue an interrupted run, rerun from its first "
                 "unfinished step with --from_step.")


def record_times(out_dir, times):
    """Add the wall times to the lab's results.json and results.md."""
    path = os.path.join(out_dir, "results.json")
    with open(path) as f:
        results = json.load(f)
    results["minutes"] = round(sum(times.values()) / 60, 2)
    results["step_seconds"] = times
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    with open(os.path.join(out_dir, "results.md"), "a") as f:
        f.write(f"\nWall time: {results['minutes']:.1f} min. Per step (s): "
                + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + "\n")
    print(f"\nresults: {path} ({results['minutes']:.1f} min)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("lab", "lab_sizes", "hh"), required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out_dir", default="", help="default out/lab or out/hh")
    p.add_argument("--quick", action="store_true", help="shrink every step to seconds (tests)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--from_step", default="", help="start at this step, reusing the outputs of the earlier ones")
    p.add_argument("--in_process", action="store_true",
                   help="run each step's script in this Python process (runpy) instead of a subprocess: saves each "
                        "step's start-up, a few seconds (the --quick test uses it)")
    p.add_argument("--label_noise", type=float, default=LABEL_NOISE,
                   help="lab: Bradley-Terry temperature of the labelers")
    p.add_argument("--config", default="tiny", choices=("tiny", "small", "medium", "large", "xl"),
                   help="hh: preset of every stage (tiny on a CPU, small on one GPU)")
    p.add_argument("--source", default="", help="hh: a local copy of HH-RLHF (its folder of *.jsonl.gz files)")
    p.add_argument("--subsets", default="helpful-base", help="hh: comma-separated HH-RLHF subsets")
    a = p.parse_args(argv)
    a.out_dir = a.out_dir or f"out/{a.task}"
    if not a.label_noise >= 0:
        p.error(f"--label_noise {a.label_noise} is out of range: it must be >= 0 (0 = exact labelers)")
    if os.path.exists(a.out_dir) and not os.path.isdir(a.out_dir):
        p.error(f"--out_dir {a.out_dir} is a file; it must be a folder to write to (it may not exist yet)")
    if a.source and not os.path.isdir(a.source):
        p.error(f"--source {a.source} is not a folder; it must be a local copy of HH-RLHF (its <subset>/ folders)")
    # the steps run from the repository's folder: a relative path the user gave is made relative to it
    here = os.path.dirname(os.path.abspath(__file__))
    from_here = lambda path: path if not path or os.path.isabs(path) else os.path.relpath(os.path.abspath(path), here)
    a.out_dir, a.source = from_here(a.out_dir), from_here(a.source)
    return a


def main(argv=None):
    a = parse_args(argv)
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # stage scripts are called by relative path
    steps = {"lab": lab_steps, "lab_sizes": lab_sizes_steps, "hh": hh_steps}[a.task](a)
    times = run_steps(steps, a.out_dir, a.dry_run, a.from_step, a.in_process)
    if a.task in ("lab", "lab_sizes") and not a.dry_run:
        record_times(a.out_dir, times)
    elif not a.dry_run:
        print(f"\ndone in {sum(times.values()) / 60:.1f} min: {a.out_dir}/winrate.json")
    return times


if __name__ == "__main__":
    main()
