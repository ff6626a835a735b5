"""evaluate.py: win rate and Wilson interval against hand computations; the command end to end on
tiny checkpoints; ppo.py's --judge_ckpt evaluation (win rate exactly 0.5 while the policy is still
the SFT model, then recounted from the judge's scores after an update)."""
import json
import math
import os

import pytest
import torch

import evaluate
import ppo
from conftest import REPO
from lib import winrate
from lib.checkpoints import load_model, save_checkpoint
from lib.config import UsageError
from lib.data import spread
from lib.responses import sample_and_judge
from lib.tokens import get_tokenizer
from model import GPT, GPTConfig, ScalarGPT

FIXTURES = os.path.join(REPO, "tests", "fixtures", "ppo")
SHAPE = dict(block_size=96, n_layer=1, n_head=2, n_embd=32)


# --------------------------------------------------------------------------------------- statistics

def test_win_rate_counts_ties_half():
    result = winrate.win_rate([1.0, 2.0, 3.0, 4.0, 0.5], [0.0, 2.0, 5.0, 1.0, 0.5])
    assert result == {"win_rate": (2 + 2 / 2) / 5, "wins": 2, "ties": 2, "losses": 1, "n": 5}
    assert winrate.win_rate([1.0] * 7, [1.0] * 7)["win_rate"] == 0.5  # all ties
    assert winrate.win_rate([2.0] * 7, [1.0] * 7)["win_rate"] == 1.0  # all wins
    assert winrate.win_rate([0.0] * 7, [1.0] * 7)["win_rate"] == 0.0  # all losses


def wilson_by_quadratic(successes, n, z):
    """The Wilson interval as the two solutions p of (p_hat - p)^2 = z^2 p (1 - p) / n (the
    proportions that a z-test would not reject), from the quadratic formula: an independent
    derivation."""
    p_hat = successes / n
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("successes, n",
                         [(7, 10), (10, 10), (0, 10), (5, 10), (28.5, 57), (1, 1), (513, 1000)])
def test_wilson_interval_matches_the_quadratic(successes, n):
    ours = winrate.wilson_interval(successes, n)
    hand = wilson_by_quadratic(successes, n, 1.96)
    print(f"{successes}/{n}: ours {ours} quadratic {hand}")
    assert ours == pytest.approx(hand, abs=1e-12)


def test_wilson_interval_known_values_and_edge_cases():
    # textbook 7/10
    assert winrate.wilson_interval(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    # all wins: the upper end is 1, the lower well below it
    lo, hi = winrate.wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 / (1 + 1.96 ** 2 / 10))
    lo, hi = winrate.wilson_interval(5, 10)  # all ties counted half: symmetric about 1/2
    assert lo + hi == pytest.approx(1.0) and lo == pytest.approx(0.2366, abs=1e-4)
    assert winrate.wilson_interval(0, 0) == (0.0, 1.0)  # no data: anything is possible
    wide, narrow = winrate.wilson_interval(30, 60), winrate.wilson_interval(300, 600)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


# -------------------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_ckpts")
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        paths[name] = save_checkpoint(str(d / f"{name}.pt"), GPT(GPTConfig(**SHAPE)), ppo.Config())
    judge = ScalarGPT(GPTConfig(**SHAPE))
    torch.nn.init.normal_(judge.score_head.weight, std=1.0)
    paths["judge"] = save_checkpoint(str(d / "judge.pt"), judge, ppo.Config(), reward_shift=0.0)
    return paths


def eval_config(ckpts, tmp_path, **kw):
    return evaluate.Config(**{"policy_a": ckpts["a"], "policy_b": ckpts["b"],
                              "judge_ckpt": ckpts["judge"],
                              "prompts": os.path.join(FIXTURES, "prompts_train.jsonl"),
                              "max_prompts": 10, "max_new_tokens": 6, "max_prompt_tokens": 48,
                              "batch_size": 4, "device": "cpu",
                              "out": str(tmp_path / "winrate.json"), **kw})


def test_evaluate_report_is_consistent_with_its_per_prompt_scores(ckpts, tmp_path):
    report = evaluate.main(eval_config(ckpts, tmp_path, ref_ckpt=ckpts["b"]))
    with open(tmp_path / "winrate.json") as f:
        assert json.load(f) == json.loads(json.dumps(report))  # written, and nothing but the report
    a = [s["score_a"] for s in report["samples"]]
    b = [s["score_b"] for s in report["samples"]]
    assert report["n"] == len(a) == 10
    wins, ties = sum(x > y for x, y in zip(a, b)), sum(x == y for x, y in zip(a, b))
    assert report["win_rate"] == pytest.approx((wins + ties / 2) / 10)
    assert report["ci95"] == pytest.approx(list(wilson_by_quadratic(wins + ties / 2, 10, 1.96)))
    assert report["policy_a"]["mean_score"] == pytest.approx(sum(a) / 10)
    assert report["policy_b"]["kl_to_ref"] == 0.0  # B is the reference: log-ratio exactly 0
    assert report["policy_a"]["kl_to_ref"] != 0.0
    # random GPTs spread their samples over 50257 tokens: no EOS in these 2 x 10 x 6 draws,
    # every response full
    for name in ("policy_a", "policy_b"):
        assert report[name]["resp_len"] == 6.0 and report[name]["eos_frac"] == 0.0, report[name]


def test_same_policy_same_seed_ties_everywhere(ckpts, tmp_path):
    judge = tmp_path / "judge.py"
    judge.write_text("def length(prompt, response):\n    return len(response)\n")
    report = evaluate.main(eval_config(ckpts, tmp_path, policy_b=ckpts["a"], judge_ckpt="",
                                       judge_fn=f"{judge}:length"))
    assert report["ties"] == 10 and report["win_rate"] == 0.5
    samples = report["samples"]
    assert [s["response_a"] for s in samples] == [s["response_b"] for s in samples]
    mean_length = sum(len(s["response_a"]) for s in samples) / 10
    assert report["policy_a"]["mean_score"] == pytest.approx(mean_length)


def test_evaluate_needs_exactly_one_judge(ckpts, tmp_path):
    with pytest.raises(UsageError, match="exactly one judge"):
        evaluate.main(eval_config(ckpts, tmp_path, judge_ckpt=""))


def test_ppo_judge_win_rate_is_one_half_while_the_policy_is_sft(ckpts, tmp_path):
    """eval_win_rate: 0.5 at step 0 (policy == SFT, same seed); after one update, a recount
    from the judge."""
    result = ppo.train(ppo.Config(sft_ckpt=ckpts["a"], reward_ckpt=ckpts["judge"],
                                  judge_ckpt=ckpts["judge"], data_dir=FIXTURES,
                                  out_dir=str(tmp_path / "ppo"), max_prompt_tokens=48,
                                  max_new_tokens=6, iters=1, batch_size=4, minibatch_size=2,
                                  noptepochs=1, eval_interval=1, eval_prompts=6, sample_every=100,
                                  device="cpu", lr=0.1, warmup_iters=1))
    with open(result["metrics_path"]) as f:
        rows = [json.loads(line) for line in f]
    # step 0: the policy is the SFT model, sampled with the same seed as the
    # baseline: identical responses
    assert rows[0]["eval_win_rate"] == 0.5
    assert rows[0]["eval_judge_score"] == pytest.approx(rows[0]["eval_score"])
    # after the update: the judge's scores of the trained policy's and the SFT policy's held-out
    # responses (the same sampling), compared by hand, ties half
    cfg = ppo.Config(max_prompt_tokens=48, max_new_tokens=6, batch_size=4, device="cpu")
    prompts = ppo.load_prompts(os.path.join(FIXTURES, "prompts_val.jsonl"), get_tokenizer(), 48)
    prompts = spread(prompts, 6)
    judge = load_model(ckpts["judge"], "scalar")[0].eval()
    def judge_scores(ckpt):  # sampled as ppo.evaluate samples: seed cfg.seed + b for batch b
        policy = load_model(ckpt, "gpt")[0]
        return sample_and_judge(policy, prompts, {"judge": judge}, cfg.max_new_tokens,
                                seed=cfg.seed, batch_size=cfg.batch_size)["judge"]
    trained, sft = judge_scores(result["ckpt_path"]), judge_scores(ckpts["a"])
    wins, ties = sum(a > b for a, b in zip(trained, sft)), sum(a == b for a, b in zip(trained, sft))
    print(f"trained {trained}\nsft     {sft}\n"
          f"wins {wins} ties {ties} of 6: eval_win_rate {rows[-1]['eval_win_rate']}")
    assert ties < 6, "lr 0.1 (0.01 in the first iteration): the policy must have moved"
    assert rows[-1]["eval_win_rate"] == pytest.approx((wins + ties / 2) / 6)
    assert rows[-1]["eval_judge_score"] == pytest.approx(sum(trained) / 6)
