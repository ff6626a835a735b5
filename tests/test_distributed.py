"""Several processes: `torchrun --standalone --nproc_per_node 2` with gloo on CPU, on tiny models
and fixtures.

SFT, reward and DPO: the two ranks end with identical weights, equal (to float tolerance) to one
process running the same global batch. PPO: whitening over two ranks equals whitening the
concatenated batch; one update on the two halves of a global batch (ragged responses, ptx) equals
one process's update on all of it; a 2-process run writes one checkpoint and one metrics file, and
resumes; with RLOO each prompt's group of responses stays on one rank. A failure on one rank ends
the job with its message. Each launch starts two Python processes (a few seconds each); marked
`distributed`, run by default.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from dist_run import ppo_sgd_step

import dpo
import ppo
import reward
import sft
from conftest import (
    HH_FIXTURES,
    PPO_FIXTURES,
    REPO,
    ROLLOUT_SHAPE,
    prepare,
    rollout_case,
    synthetic_preferences,
    write_jsonl,
)
from lib.checkpoints import load_checkpoint, save_checkpoint
from lib.tokens import EOS
from model import GPT, GPTConfig

pytestmark = pytest.mark.distributed
DIST_RUN = os.path.join(REPO, "tests", "dist_run.py")
SHAPE = dict(init_from="scratch", n_layer=2, n_head=2, n_embd=32, block_size=128, dropout=0.0,
             device="cpu")


def torchrun(args, env=None, timeout=300):
    """Two processes on this machine (gloo, CPU) running tests/dist_run.py with `args`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           DIST_RUN, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def flags(config):
    return [s for k, v in config.items()
            for s in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def check(out):
    assert out.returncode == 0, f"torchrun failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def hh_data(tmp_path_factory):
    """The HH fixture through data/hh_rlhf/prepare.py: sft_*, comparisons_* and prompts_* files."""
    out = tmp_path_factory.mktemp("hh")
    prepare.main(["--source", str(HH_FIXTURES), "--subsets", "helpful-base",
                  "--out_dir", str(out)])
    return str(out)


def assert_ranks_equal_and_close_to(copies, name, single_state, atol):
    """Both ranks' saved weights are identical, and within atol of the single-process weights."""
    rank0, rank1 = (torch.load(os.path.join(copies, f"{name}.rank{r}"), weights_only=True)
                    for r in (0, 1))
    worst = 0.0
    for k, v in single_state.items():
        assert torch.equal(rank0["model"][k], rank1["model"][k]), f"ranks differ in {k}"
        worst = max(worst, (rank0["model"][k] - v).abs().max().item())
    print(f"{name}: max |2 processes - 1 process| = {worst:.2e}")
    assert worst < atol


def metrics(path):
    return [json.loads(line) for line in open(path)]


def test_sft_two_processes_match_one_process_on_the_same_global_batch(tmp_path, hh_data):
    # global batch 4 x 2: one process runs 2 micro-batches of 4, each of two ranks one micro-batch
    # of 4
    cfg = dict(SHAPE, data_dir=hh_data, max_prompt_tokens=48, max_response_tokens=16, batch_size=4,
               grad_accum=2, max_steps=3, lr=1e-3, warmup_steps=1, eval_interval=3, eval_examples=4,
               num_eval_samples=1, max_new_tokens=2)
    copies = tmp_path / "copies"
    copies.mkdir()
    check(torchrun(["sft", *flags(dict(cfg, out_dir=tmp_path / "ddp"))],
                   env={"RANK_COPIES": str(copies)}))
    single = sft.train(sft.Config(**cfg, out_dir=str(tmp_path / "single")))
    single_state = load_checkpoint(single["last_path"])["model"]
    assert_ranks_equal_and_close_to(copies, "last.pt", single_state, atol=1e-5)
    ddp_rows = metrics(tmp_path / "ddp" / "metrics.jsonl")
    single_rows = metrics(single["metrics_path"])
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in single_rows] == [0, 1, 2, 3]
    for a, b in zip(ddp_rows, single_rows):  # train loss of the global step, val loss all-reduced
        for key in ("loss", "val_loss"):
            assert (key in a) == (key in b), key
            assert a.get(key, 0) == pytest.approx(b.get(key, 0), abs=1e-5), key


def test_reward_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    train, val = synthetic_preferences(14, seed=0), synthetic_preferences(5, seed=1)
    write_jsonl(tmp_path / "comparisons_train.jsonl", train)
    write_jsonl(tmp_path / "comparisons_val.jsonl", val)
    demos = [{"prompt": r["prompt"], "response": r["chosen"]} for r in val]
    write_jsonl(tmp_path / "sft_val.jsonl", demos)
    # batches of 4 prompts: one process runs 2 micro-batches of 2, each of two ranks one micro-batch
    # of 2; the 4th and last batch holds 2 prompts: one micro-batch of 2, or one prompt on each rank
    cfg = dict(SHAPE, data_dir=str(tmp_path), max_prompt_tokens=16, max_response_tokens=16,
               batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=1, eval_interval=2)
    copies = tmp_path / "copies"
    copies.mkdir()
    check(torchrun(["reward", *flags(dict(cfg, out_dir=tmp_path / "ddp"))],
                   env={"RANK_COPIES": str(copies)}))
    single = reward.train(reward.Config(**cfg, out_dir=str(tmp_path / "single")))
    single_state = load_checkpoint(single["ckpt_path"])["model"]
    assert_ranks_equal_and_close_to(copies, "ckpt.pt", single_state, atol=1e-5)
    ddp_rows = metrics(tmp_path / "ddp" / "metrics.jsonl")
    single_rows = metrics(single["metrics_path"])
    # the weights agree to 1e-5, not to the last bit (the two ranks' gradients are summed in another
    # order), and the scores (|mean| ~2) inherit that: 2.6e-5 apart on an AVX-512 CPU. A rank that
    # normalised by its own demonstrations instead of all of them is caught above: the ranks' biases
    # differ (1.11 against 2.32 here).
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/chosen_mean",
                "val/chosen_std"):
        assert ddp_rows[-1][key] == pytest.approx(single_rows[-1][key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_dpo_two_processes_match_one_process_on_the_same_global_batch(tmp_path, monkeypatch,
                                                                      lora_rank):
    """Plain SGD (its step is proportional to the gradient; Adam's first step hides the gradient's
    scale), batches of 6 pairs in micro-batches of 2: one process runs 3, each of two ranks its 3
    pairs as 2 + 1. The micro-batches' unequal shares and DDP's average over ranks must give the one
    process's gradient. With --lora_rank only the adapters train (DDP averages theirs)."""
    write_jsonl(tmp_path / "comparisons_train.jsonl", synthetic_preferences(24, seed=0))
    write_jsonl(tmp_path / "comparisons_val.jsonl", synthetic_preferences(7, seed=1))
    torch.manual_seed(0)
    sft_model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    sft_path = save_checkpoint(str(tmp_path / "sft.pt"), sft_model, dpo.Config())
    cfg = dict(data_dir=str(tmp_path), init_from=sft_path, device="cpu", max_prompt_tokens=16,
               max_response_tokens=16, batch_size=6, grad_accum=3, max_steps=3,
               lr=0.05 if lora_rank else 0.5, warmup_steps=0, grad_clip=0.0, eval_interval=1,
               lora_rank=lora_rank)
    copies = tmp_path / "copies"
    copies.mkdir()
    check(torchrun(["dpo", *flags(dict(cfg, out_dir=tmp_path / "ddp"))],
                   env={"RANK_COPIES": str(copies), "PLAIN_SGD": "1"}))
    sgd_step = lambda params, lr, *_, **__: torch.optim.SGD(params, lr)
    monkeypatch.setattr(dpo, "make_adamw", sgd_step)
    single = dpo.train(dpo.Config(**cfg, out_dir=str(tmp_path / "single")))
    saved = load_checkpoint(single["ckpt_path"])
    assert saved["step"] == 3  # the val loss fell at every step: the last step's is compared
    if lora_rank:
        assert all("lora_" in k for k in saved["model"])
    else:
        assert "lm_head.weight" in saved["model"]
    start = load_checkpoint(sft_path)["model"]  # (and the adapters' B, which starts at 0)
    moved = max((v - start.get(k, torch.zeros_like(v))).abs().max().item()
                for k, v in saved["model"].items() if k in start or "lora_B" in k)
    print(f"the largest change of a weight in 3 steps: {moved:.1e}")
    assert_ranks_equal_and_close_to(copies, "ckpt.pt", saved["model"], atol=1e-4 * moved)
    ddp_rows = metrics(tmp_path / "ddp" / "metrics.jsonl")
    single_rows = metrics(single["metrics_path"])
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in single_rows] == [0, 1, 2, 3]
    for a, b in zip(ddp_rows, single_rows):  # the global step's statistics, validation gathered
        for key in ("loss", "acc", "margin", "val/loss", "val/acc", "val/margin"):
            assert (key in a) == (key in b), key
            assert a.get(key, 0) == pytest.approx(b.get(key, 0), rel=1e-4, abs=1e-5), key


def test_whitening_over_two_processes_equals_whitening_the_concatenated_batch(tmp_path):
    check(torchrun(["whiten", str(tmp_path)]))
    parts = [torch.load(tmp_path / f"whiten.rank{r}", weights_only=True) for r in (0, 1)]
    # (8, 6): one batch
    x, mask, values = (torch.cat([p[k] for p in parts]) for k in ("x", "mask", "values"))
    torch.testing.assert_close(torch.cat([p["whitened"] for p in parts]), ppo.whiten(x, mask),
                               atol=1e-6, rtol=0)
    real = x[mask.bool()]
    explained_var = ppo.explained_variance(values, x, mask).item()
    for p in parts:  # every rank got the statistics of the whole batch
        assert p["var"].item() == pytest.approx(real.var(unbiased=False).item(), rel=1e-5)
        assert p["explained_var"].item() == pytest.approx(explained_var, abs=1e-6)


def test_ppo_update_over_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    """One PPO optimizer step on a global rollout batch of 8 ragged responses and 4 ptx texts of
    unequal length: two ranks, each with its contiguous 4 rows and 2 texts in 2 micro-batches under
    DDP, take the step of one process running all 8 rows and 4 texts in one micro-batch (plain SGD,
    so the gradient's scale shows in the weights), and report its statistics. Without the
    world_size factor in the response tokens' or the ptx tokens' weights, DDP's average over ranks
    would halve that part of the gradient."""
    # the models of test_ppo_wiring (conftest.py)
    case = rollout_case(prompt_lengths=(5, 2, 7, 1, 6, 3, 8, 4))
    batch = case["batch"]
    lengths = batch["response_mask"].sum(1).tolist()  # (8,)
    print(f"response lengths {lengths} of {batch['responses'].size(1)}")
    ragged = len(set(lengths[:4])) > 1 and len(set(lengths[4:])) > 1
    assert ragged and sum(lengths[:4]) != sum(lengths[4:]), \
        "the test needs ragged responses, and unequal token counts on the two ranks"
    # rank 0: 4 + 18 tokens, rank 1: 10 + 31
    ptx = [list(range(100, 100 + n)) + [EOS] for n in (3, 17, 9, 30)]
    saved = dict(shape=ROLLOUT_SHAPE, policy=case["policy"].state_dict(),
                 critic=case["critic"].state_dict(), batch=batch, ptx=ptx, lr=0.5,
                 cfg=dict(temperature=case["cfg"].temperature, ptx_coef=0.5))
    torch.save(saved, tmp_path / "case.pt")
    check(torchrun(["ppo_update", str(tmp_path / "case.pt"), str(tmp_path)]))
    ranks = [torch.load(tmp_path / f"ppo_update.rank{r}", weights_only=True) for r in (0, 1)]
    policy, critic, stats = ppo_sgd_step(saved, rows=list(range(8)), ptx_rows=list(range(4)),
                                         accumulation=1)
    for part, single in (("policy", policy), ("critic", critic)):
        worst, step_sq, error_sq = 0.0, 0.0, 0.0
        for k, v in single.items():
            assert torch.equal(ranks[0][part][k], ranks[1][part][k]), f"ranks differ: {part} {k}"
            worst = max(worst, (ranks[0][part][k] - v).abs().max().item())
            step_sq += ((v - saved[part][k]) ** 2).sum().item()
            error_sq += ((ranks[0][part][k] - v) ** 2).sum().item()
        # |step of 2 processes - step of 1| / |step of 1|, whole model
        relative = (error_sq / step_sq) ** 0.5
        print(f"{part}: max |2 processes - 1 process| = {worst:.1e}, relative error of the step "
              f"{relative:.1e}")
        assert worst < 1e-6 and relative < 1e-5, part
    assert stats.keys() == ranks[0]["stats"].keys() and "ptx_loss" in stats
    for k, v in stats.items():
        assert ranks[0]["stats"][k] == ranks[1]["stats"][k], k
        assert ranks[0]["stats"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_ppo_two_processes_write_one_checkpoint_and_resume(tmp_path, lora_rank):
    """With --lora_rank the same: DDP averages the adapters' and value head's gradients (the frozen
    shared networks take none), both ranks end with the same adapters, and the run resumes from
    them."""
    shape = {k: v for k, v in SHAPE.items() if k not in ("init_from", "dropout")}
    cfg = dict(shape, data_dir=PPO_FIXTURES, sft_ckpt="scratch", reward_ckpt="scratch",
               out_dir=tmp_path / "out", max_prompt_tokens=48, max_new_tokens=6, iters=2,
               batch_size=4, minibatch_size=4, grad_accum=2, noptepochs=1, lr=1e-3, warmup_iters=1,
               eval_interval=2, eval_prompts=4, sample_every=1, n_samples=1, ptx_coef=0.5,
               ptx_batch_size=2, adaptive_kl=True, lora_rank=lora_rank)
    copies = tmp_path / "copies"
    copies.mkdir()
    check(torchrun(["ppo", *flags(cfg)], env={"RANK_COPIES": str(copies)}))
    files = ["ckpt.pt", "config.json", "metrics.jsonl", "ppo.png"]
    assert sorted(os.listdir(tmp_path / "out")) == files
    rank0, rank1 = (torch.load(copies / f"ckpt.pt.rank{r}", weights_only=True) for r in (0, 1))
    for part in ("model", "critic"):  # policy and critic identical on both ranks
        assert all(torch.equal(v, rank1[part][k]) for k, v in rank0[part].items()), part
    saved = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert saved["iteration"] == 2
    assert all(torch.equal(v, rank0["model"][k]) for k, v in saved["model"].items())
    if lora_rank:
        assert all("lora_" in k for k in saved["model"])
    else:
        assert "lm_head.weight" in saved["model"]
    rows = metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[2]["kl_coef"] != rows[1]["kl_coef"]
    out = check(torchrun(["ppo", *flags(dict(cfg, iters=3, resume=True))]))
    assert out.stdout.count("resumed from") == 1  # printed by rank 0 only
    assert [r["step"] for r in metrics(tmp_path / "out" / "metrics.jsonl")] == [0, 1, 2, 3]
    assert load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["iteration"] == 3


def test_rloo_over_two_processes_keeps_each_group_on_one_rank_and_uses_its_own_rows(tmp_path):
    """--advantage_estimator rloo --samples_per_prompt 2 on two ranks, no critic: in every
    iteration each rank holds whole groups (rows 2i and 2i + 1 the same prompt, no prompt on both
    ranks), every response token's advantage is the RLOO advantage of that rank's own returns (a
    naive loop), the ranks end with the same policy, and the checkpoint has no critic."""
    shape = {k: v for k, v in SHAPE.items() if k not in ("init_from", "dropout")}
    cfg = dict(shape, data_dir=PPO_FIXTURES, sft_ckpt="scratch", reward_ckpt="scratch",
               out_dir=tmp_path / "out", max_prompt_tokens=48, max_new_tokens=4, iters=2,
               batch_size=4, minibatch_size=2, noptepochs=1, lr=1e-3, warmup_iters=1,
               eval_interval=2, eval_prompts=2, sample_every=2, n_samples=1,
               advantage_estimator="rloo", samples_per_prompt=2, kl_penalty="loss",
               kl_estimator="k3")
    copies, record = tmp_path / "copies", tmp_path / "rollouts"
    copies.mkdir()
    record.mkdir()
    check(torchrun(["ppo", *flags(cfg)], env={"RANK_COPIES": str(copies),
                                              "RECORD_ROLLOUTS": str(record)}))
    for it in (1, 2):
        prompts = []
        for r in (0, 1):
            b = torch.load(record / f"rollout.it{it}.rank{r}", weights_only=True)
            rows = [q[m.bool()].tolist() for q, m in zip(b["queries"], b["query_mask"])]
            assert len(rows) == 4 and rows[0] == rows[1] and rows[2] == rows[3], (it, r)
            prompts.append({tuple(rows[0]), tuple(rows[2])})
            returns = b["rewards"].sum(1).tolist()
            for i, n in enumerate(b["response_mask"].sum(1).tolist()):
                other = returns[i + 1 if i % 2 == 0 else i - 1]
                assert b["advantages"][i, :n].tolist() == pytest.approx(
                    [returns[i] - other] * n, abs=1e-5), (it, r, i)
                assert (b["advantages"][i, n:] == 0).all()
        assert len(prompts[0]) == len(prompts[1]) == 2 and not prompts[0] & prompts[1], it
    rank0, rank1 = (torch.load(copies / f"ckpt.pt.rank{r}", weights_only=True) for r in (0, 1))
    assert "critic" not in rank0 and "critic" not in rank1
    assert all(torch.equal(v, rank1["model"][k]) for k, v in rank0["model"].items())
    saved = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert saved["iteration"] == 2 and "critic" not in saved
    assert "vf_loss" not in metrics(tmp_path / "out" / "metrics.jsonl")[-1]


def test_a_failure_on_one_rank_ends_the_job_with_its_message(tmp_path, hh_data):
    cfg = dict(SHAPE, data_dir=hh_data, out_dir=tmp_path / "out", max_prompt_tokens=48,
               max_response_tokens=16, batch_size=2, grad_accum=1, max_steps=2, eval_examples=4,
               num_eval_samples=0)
    # rank 0 waits in an all-reduce
    out = torchrun(["sft", *flags(cfg)], env={"FAIL_ON_RANK": "1"}, timeout=120)
    assert out.returncode != 0
    assert "error (rank 1 of 2): injected failure on rank 1" in out.stderr
