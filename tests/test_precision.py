"""The GPU code path on the CPU: `--dtype bfloat16` runs CPU autocast in bf16 (float32 stays the CPU
default), every stage trains that way with finite losses, and `--compile true` (inductor) trains the
smallest model to the same losses as eager mode."""
import math

import pytest
import torch

import ppo
import reward
import sft
from conftest import (
    DEMOS,
    ppo_tiny_config,
    reward_tiny_config,
    sft_tiny_config,
    synthetic_preferences,
    write_data,
    write_jsonl,
)
from lib.training import autocast

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("auto", torch.float32),
                                             ("float32", torch.float32)])
def test_autocast_on_the_cpu_is_bf16_only_when_asked(dtype, expected):
    x = torch.randn(4, 8)
    with autocast(CPU, dtype):
        assert (x @ x.T).dtype == expected


def run_sft(tmp_path, **kw):
    data_dir = write_data(tmp_path / "data", DEMOS, DEMOS)
    return sft.train(sft_tiny_config(tmp_path, data_dir, max_steps=4, eval_interval=4, **kw))


def run_reward(tmp_path, **kw):
    tmp_path.mkdir(parents=True)
    write_jsonl(tmp_path / "comparisons_train.jsonl", synthetic_preferences(16, seed=0))
    val = synthetic_preferences(8, seed=1)
    write_jsonl(tmp_path / "comparisons_val.jsonl", val)
    write_jsonl(tmp_path / "sft_val.jsonl",
                [{"prompt": r["prompt"], "response": r["chosen"]} for r in val])
    return reward.train(reward_tiny_config(tmp_path, max_steps=3, eval_interval=3, **kw))


def run_ppo(tmp_path, **kw):
    return ppo.train(ppo_tiny_config(tmp_path, iters=1, **kw))


@pytest.mark.parametrize("stage, losses", [(run_sft, ("train_loss", "val_loss")),
                                           (run_reward, ("val/loss",)),
                                           (run_ppo, ("pg_loss", "vf_loss"))])
def test_every_stage_trains_in_bf16_on_the_cpu(tmp_path, stage, losses):
    """The bf16 run completes with finite losses that differ from float32's only by bf16 rounding: a
    dtype error anywhere in the bf16 path (a float32 tensor meeting a bf16 one, a cache of the wrong
    dtype) fails here."""
    bf16 = stage(tmp_path / "bf16", dtype="bfloat16")
    fp32 = stage(tmp_path / "fp32", dtype="float32")
    for key in losses:
        assert math.isfinite(bf16[key]), (key, bf16[key])
        assert bf16[key] != fp32[key], \
            f"{key}: bf16 and float32 agree exactly; was bf16 autocast used at all?"
        assert bf16[key] == pytest.approx(fp32[key], rel=0.1, abs=0.05), key


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's own use of torch.jit
def test_compile_on_the_cpu_gives_eager_losses(tmp_path):
    """torch.compile (inductor, C++ on the CPU) of the smallest model: the same losses as eager, to
    float rounding (inductor fuses and reorders float operations)."""
    compiled = run_sft(tmp_path / "compiled", compile=True, n_layer=1, n_embd=32)
    eager = run_sft(tmp_path / "eager", compile=False, n_layer=1, n_embd=32)
    for key in ("train_loss", "val_loss"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4), key
