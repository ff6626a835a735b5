"""The whole pipeline in one go, as the README runs it: prepare -> sft -> reward -> ppo -> sample.

Tiny models and a handful of steps on the shared HH-RLHF copy (or the test fixtures when it is absent):
checks that every stage hands its checkpoint to the next and that sample.py reads them all.
"""
import os
import subprocess
import sys

import torch

import ppo
import reward
import sft
from conftest import HH_FIXTURES, REPO, SHARED_HH, metrics_by_name, prepare, tensorboard_scalars
from lib.checkpoints import load_checkpoint

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=256)
BUDGET = dict(max_prompt_tokens=96, max_response_tokens=32)


def prepared_data(tmp_path):
    if os.path.isdir(SHARED_HH):
        source, subsets = SHARED_HH, "harmless-base"
    else:
        source, subsets = str(HH_FIXTURES), "helpful-base"
    out = tmp_path / "data"
    prepare.main(["--source", source, "--subsets", subsets, "--out_dir", str(out)])
    return str(out)


def test_sft_reward_ppo_sample_chain(tmp_path):
    data = prepared_data(tmp_path)
    out = tmp_path / "out"
    sft_result = sft.train(sft.Config(**SHAPE, **BUDGET, init_from="scratch", dropout=0.0, data_dir=data,
                                      out_dir=str(out / "sft"), max_steps=6, batch_size=4, grad_accum=1, lr=1e-3,
                                      warmup_steps=2, eval_interval=3, eval_examples=8, max_new_tokens=8,
                                      device="cpu", log_to="tensorboard"))
    rm_result = reward.train(reward.Config(**BUDGET, init_from=sft_result["ckpt_path"], data_dir=data,
                                           out_dir=str(out / "reward"), max_steps=4, batch_size=4, grad_accum=1,
                                           lr=1e-4, warmup_steps=1, eval_interval=2, device="cpu",
                                           log_to="tensorboard"))
    ppo_result = ppo.train(ppo.Config(sft_ckpt=sft_result["ckpt_path"], reward_ckpt=rm_result["ckpt_path"],
                                      data_dir=data, out_dir=str(out / "ppo"), max_prompt_tokens=96,
                                      max_new_tokens=12, iters=2, batch_size=4, minibatch_size=2, noptepochs=1,
                                      lr=1e-4, warmup_iters=1, eval_interval=2, eval_prompts=4, sample_every=1,
                                      device="cpu", log_to="tensorboard"))
    for result in (sft_result, rm_result, ppo_result):
        assert os.path.isfile(result["ckpt_path"])
    # the reward model and the critic start from the SFT trunk / the reward model; the policy moved
    sft_ckpt, rm_ckpt, ppo_ckpt = (load_checkpoint(r["ckpt_path"]) for r in (sft_result, rm_result, ppo_result))
    assert rm_ckpt["kind"] == "scalar" and ppo_ckpt["kind"] == "gpt"
    assert ppo_ckpt["config"]["reward_ckpt"] == rm_result["ckpt_path"]
    assert not torch.equal(ppo_ckpt["model"]["transformer.h.0.attn.c_attn.weight"],
                           sft_ckpt["model"]["transformer.h.0.attn.c_attn.weight"])
    for path in ("metrics.jsonl", "ppo.png"):
        assert os.path.isfile(out / "ppo" / path)
    for stage in ("sft", "reward", "ppo"):  # --log_to tensorboard: the metrics.jsonl names, in every stage
        names = set(metrics_by_name(out / stage / "metrics.jsonl"))
        assert set(tensorboard_scalars(out / stage / "tensorboard")) == names, stage
    # sample.py compares the SFT and PPO policies on the same prompts and scores them with the reward model
    run = subprocess.run([sys.executable, "sample.py",
                          "--init_from", f"{sft_result['ckpt_path']},{ppo_result['ckpt_path']}",
                          "--reward_ckpt", rm_result["ckpt_path"],
                          "--prompt_file", os.path.join(data, "prompts_val.jsonl"),
                          "--max_prompts", "2", "--max_new_tokens", "8", "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("mean reward") == 2 and ppo_result["ckpt_path"] in run.stdout
