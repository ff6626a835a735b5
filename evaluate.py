"""
Win rate, InstructGPT's headline metric (Ouyang et al. 2022, arXiv:2203.02155, Figure 1): how
often a judge prefers policy A's response to policy B's (the SFT baseline) on held-out prompts,
ties counting half, with a 95% Wilson confidence interval. Both policies answer every prompt with
the same seed and settings (each batch restarts the same random stream, so A's and B's samples
share their randomness as far as the policies agree). Also reported: each policy's mean judge
score, mean response length (tokens, with the EOS), fraction of responses ending in EOS, and KL to
a reference policy (--ref_ckpt, usually SFT).

The judge: in the paper, human labelers. Here a reward model (--judge_ckpt) or a Python function
(prompt, response) -> float (--judge_fn file.py:NAME, or a factory with --judge_arg). Do not judge
with the reward model PPO optimised: PPO climbs that model's errors as well as its signal, so its
score rises while true preference can fall (over-optimisation, Gao et al. 2022, arXiv:2210.10760).
Train an independent judge on comparisons PPO never saw, e.g. HH's validation split:

    python reward.py --config tiny --train_files comparisons_val.jsonl --out_dir out/judge
    python evaluate.py --policy_a out/ppo/ckpt.pt --policy_b out/sft/ckpt.pt \\
        --prompts data/hh_rlhf/prompts_val.jsonl --judge_ckpt out/judge/ckpt.pt \\
        --ref_ckpt out/sft/ckpt.pt --out out/eval/winrate.json
    python evaluate.py --judge_fn mylabel.py:score ...          # a programmatic judge
"""

import json
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from lib.checkpoints import atomic_write_text, load_model
from lib.config import load_function, require, run
from lib.data import read_prompts
from lib.responses import decode_responses, sample_and_judge
from lib.tokens import decode_response, encode_prompt, get_tokenizer
from lib.training import autocast, setup_device
from lib.winrate import wilson_interval, win_rate


@dataclass
class Config:
    # io
    policy_a: str = "out/ppo/ckpt.pt"  # the policy evaluated (e.g. PPO)
    policy_b: str = "out/sft/ckpt.pt"  # the baseline (paper: the SFT model)
    prompts: str = "data/hh_rlhf/prompts_val.jsonl"  # held-out prompts, JSON lines {"prompt"}
    max_prompts: int = 0  # use only the first N prompts (0 = all)
    out: str = "out/eval/winrate.json"  # everything measured, per-prompt scores and a few samples
    # judge (one of the two)
    judge_ckpt: str = ""  # a reward model trained on comparisons PPO never saw (not PPO's own)
    judge_fn: str = ""  # or a function (prompt, response) -> float: "file.py:NAME" or "module:NAME"
    judge_arg: Optional[str] = None  # if given, NAME(judge_arg) returns the judge function
    ref_ckpt: str = ""  # report each policy's KL(policy || ref) to this one (e.g. SFT); "" = skip
    # sampling, the same for both policies
    temperature: float = 1.0  # 1 = each policy's own distribution (what the KL is measured under)
    max_new_tokens: int = 64  # response length limit
    max_prompt_tokens: int = 192  # a longer prompt keeps its end
    batch_size: int = 16  # prompts per generation call
    n_show: int = 3  # side-by-side samples printed
    # system
    device: str = "auto"  # auto, cpu, cuda, ...
    dtype: str = "auto"  # autocast: auto = bfloat16 on CUDA, float32 on CPU; or bfloat16, float32
    seed: int = 1337

    # temperature: the KL divides the logits by it
    RANGES = {"max_prompts": ">= 0", "n_show": ">= 0", "temperature": "> 0"}
    PATHS = {"policy_a": "model", "policy_b": "model", "prompts": "file", "out": "out_file",
             "judge_ckpt": "model", "ref_ckpt": "model"}  # checked where the flags are parsed


CONFIGS = {"tiny": dict(max_new_tokens=48, max_prompt_tokens=128)}  # ppo.py's tiny rollout settings


# ----------------------------------------------------------------------------------------------
# Judging: lib/responses.py's sample_and_judge, the one implementation ppo.py's evaluation shares

def text_judge(fn, enc, prompt_texts):
    """A function (prompt, response) -> float as a judge of sample_and_judge: scores (B,) of a
    batch of responses to prompt_texts[rows] (the prompts' full text, not the cut tokens)."""
    def judge(batch, rows):
        texts = decode_responses(enc, batch)
        return torch.tensor([float(fn(prompt_texts[i], t)) for i, t in zip(rows, texts)])
    return judge


def answer_and_judge(policy, judge, enc, prompts, cfg, ref_policy=None):
    """The policy's responses to `prompts` (text), judged (sample_and_judge: batch b sampled with
    seed cfg.seed + b). Returns {responses (text), scores, lengths, eos, kl (None without
    ref_policy)}, one entry per prompt."""
    tokens = [encode_prompt(enc, p, cfg.max_prompt_tokens) for p in prompts]
    out = sample_and_judge(policy, tokens, {"score": judge}, cfg.max_new_tokens,
                           temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size,
                           ref_policy=ref_policy)
    return {"responses": [decode_response(enc, r) for r in out["responses"]],
            "scores": out["score"], "lengths": out["lengths"], "eos": out["has_eos"],
            "kl": out["kl"] if ref_policy is not None else None}


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(ckpt, result):
    return {"ckpt": ckpt, "mean_score": mean(result["scores"]), "resp_len": mean(result["lengths"]),
            "eos_frac": mean([float(e) for e in result["eos"]]),
            "kl_to_ref": mean(result["kl"]) if result["kl"] is not None else None}


def print_side_by_side(prompts, a, b, n):
    for i in range(min(n, len(prompts))):
        sa, sb = a["scores"][i], b["scores"][i]
        verdict = "A wins" if sa > sb else "B wins" if sa < sb else "tie"
        print(f"--- prompt {i + 1} | A {sa:+.3f} vs B {sb:+.3f}: {verdict}\n"
              f"[prompt] ...{prompts[i][-300:]!r}\n"
              f"[A] {a['responses'][i]!r}\n[B] {b['responses'][i]!r}")


def main(cfg):
    """Win rate of policy A over policy B on held-out prompts; returns (and writes to cfg.out) the
    report."""
    require(bool(cfg.judge_ckpt) != bool(cfg.judge_fn),
            "give exactly one judge: --judge_ckpt or --judge_fn")
    t_start = time.time()
    device = setup_device(cfg.device, cfg.seed)
    ctx = autocast(device, cfg.dtype)
    # strict: a skipped prompt would change the win rate
    prompts = read_prompts(cfg.prompts, cfg.max_prompts, strict=True)

    if cfg.judge_ckpt:
        judge, _ = load_model(cfg.judge_ckpt, kind="scalar", device=device)
        judge.eval()
        # + 1: the EOS the judge reads its score at
        longest = cfg.max_prompt_tokens + cfg.max_new_tokens + 1
        require(longest <= judge.config.block_size, f"max_prompt_tokens + max_new_tokens + 1 = "
                f"{longest} exceeds the judge's block_size {judge.config.block_size}")
    else:
        judge_fn = load_function(cfg.judge_fn, cfg.judge_arg, takes=("prompt", "response"))
        judge = None  # made for each policy's tokenizer below
    ref_policy = None
    if cfg.ref_ckpt:
        ref_policy, _ = load_model(cfg.ref_ckpt, kind="gpt", device=device)
        ref_policy.eval()

    results = {}
    for name, ckpt in (("a", cfg.policy_a), ("b", cfg.policy_b)):
        policy, _ = load_model(ckpt, kind="gpt", device=device)
        policy.eval()
        enc = get_tokenizer(policy.config.vocab)  # GPT-2's, or a lab model's world's (config.vocab)
        require(cfg.max_prompt_tokens + cfg.max_new_tokens <= policy.config.block_size,
                f"max_prompt_tokens + max_new_tokens exceeds the block_size "
                f"{policy.config.block_size} of {ckpt}")
        t0 = time.time()
        policy_judge = judge if judge is not None else text_judge(judge_fn, enc, prompts)
        with ctx:
            results[name] = answer_and_judge(policy, policy_judge, enc, prompts, cfg, ref_policy)
        print(f"policy {name.upper()} {ckpt}: {len(prompts)} responses sampled and judged in "
              f"{time.time() - t0:.0f}s")

    a, b = results["a"], results["b"]
    wr = win_rate(a["scores"], b["scores"])
    lo, hi = wilson_interval(wr["wins"] + wr["ties"] / 2, wr["n"])
    print_side_by_side(prompts, a, b, cfg.n_show)
    report = {**wr, "ci95": [lo, hi], "judge": cfg.judge_ckpt or cfg.judge_fn,
              "policy_a": summarize(cfg.policy_a, a), "policy_b": summarize(cfg.policy_b, b),
              "config": asdict(cfg), "time_s": time.time() - t_start,
              "samples": [{"prompt": p, "response_a": ra, "response_b": rb,
                           "score_a": sa, "score_b": sb}
                          for p, ra, rb, sa, sb in zip(prompts, a["responses"], b["responses"],
                                                        a["scores"], b["scores"])]}
    atomic_write_text(cfg.out, json.dumps(report, indent=1) + "\n")
    for name in ("a", "b"):
        s = report[f"policy_{name}"]
        kl = f" | KL to ref {s['kl_to_ref']:.3f}" if s["kl_to_ref"] is not None else ""
        print(f"{name.upper()} {s['ckpt']}: mean judge score {s['mean_score']:+.4f} | "
              f"resp_len {s['resp_len']:.1f} | eos_frac {s['eos_frac']:.2f}{kl}")
    print(f"win rate of A over B: {wr['win_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}) | "
          f"wins {wr['wins']}, ties {wr['ties']}, losses {wr['losses']} of {wr['n']} | "
          f"judge {report['judge']} | written to {cfg.out}")
    return report


if __name__ == "__main__":
    run(main, Config, CONFIGS)
