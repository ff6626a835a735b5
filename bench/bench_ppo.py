"""Seconds per PPO iteration of ppo.py on CPU, on the shape of a TRL PPOTrainer
benchmark (side by side with it).

Random-init policy, ref_policy, critic and reward model of one GPT-2 shape (default 4 layers x 256
wide x 4 heads, vocab 50257), 16 prompts of 32 random tokens (never the EOS id), 32 new tokens at
temperature 1 (a random model practically never samples EOS), 1 PPO epoch, 1 minibatch of 16, fp32,
2 threads. One iteration = ppo.rollout (generate, reward, policy/ref/critic forwards, KL reward,
GAE) + ppo.ppo_update (forward, backward, AdamW step). Prints one JSON line: median seconds per
iteration after a warm-up, the generation / rollout-forward / update split, and peak RSS.

    python bench/bench_ppo.py [--iters 6 --threads 2]
    (TRL's side: the same shapes through trl.PPOTrainer, a separate script not in this repository)
"""
import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import ppo  # noqa: E402
from lib.tokens import EOS  # noqa: E402
from model import GPT, GPTConfig, ScalarGPT  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="prompts per PPO iteration")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--iters", type=int, default=6, help="PPO iterations incl. 1 warm-up")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    shape = GPTConfig(n_layer=a.layers, n_head=a.heads, n_embd=a.embd, vocab_size=50257,
                      block_size=256)
    policy = GPT(shape)
    ref_policy = copy.deepcopy(policy).requires_grad_(False)
    critic, reward_model = ScalarGPT(shape), ScalarGPT(shape).requires_grad_(False)
    cfg = ppo.Config(batch_size=a.batch, minibatch_size=a.batch, noptepochs=1,
                     max_new_tokens=a.response, temperature=1.0, lr=1e-5, device="cpu")
    optimizer = ppo.make_optimizer(policy, critic, cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    queries = torch.randint(0, EOS, (a.batch, a.prompt), generator=g)
    query_mask = torch.ones_like(queries)

    rows = []
    for it in range(a.iters):
        t0 = time.perf_counter()
        batch, stats = ppo.rollout(policy, ref_policy, critic, reward_model, queries, query_mask,
                                   cfg, cfg.kl_coef, generator=torch.Generator().manual_seed(it))
        t1 = time.perf_counter()
        ppo.ppo_update(policy, critic, optimizer, batch, cfg,
                       generator=torch.Generator().manual_seed(it))
        t2 = time.perf_counter()
        rows.append({"iter": t2 - t0, "generate": stats["t_generate"],
                     "rollout_forward": t1 - t0 - stats["t_generate"], "update": t2 - t1,
                     "resp_len": stats["resp_len"]})
        print(f"iter {it + 1}: {rows[-1]['iter']:.3f} s", file=sys.stderr, flush=True)
    measured = rows[1:] if len(rows) > 1 else rows
    med = {k: statistics.median(r[k] for r in measured) for k in measured[0]}
    print(json.dumps({
        "bench": "ppo_iteration_fp32", "config": vars(a),
        "iter_seconds_median": med["iter"], "iter_seconds_all": [round(r["iter"], 4) for r in rows],
        "warmup_iter_seconds": rows[0]["iter"],
        "phase_seconds_median": {k: v for k, v in med.items() if k not in ("iter", "resp_len")},
        "mean_response_tokens": med["resp_len"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }, sort_keys=True))


if __name__ == "__main__":
    main()
