"""sample.py end to end on a tiny checkpoint written here, and its messages for bad input."""
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from conftest import REPO
from lib.checkpoints import save_checkpoint
from model import GPT, GPTConfig


@dataclass
class RunConfig:
    note: str = "written by test_sample"


def run_sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=32))
    return save_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt"), model, RunConfig())


def test_sample_generates_reproducibly_from_a_checkpoint(tiny_ckpt, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "\\n\\nHuman: hi\\n\\nAssistant:"}\n'
                       '{"prompt": "Once upon a time"}\n')
    args = ["--init_from", tiny_ckpt, "--prompt_file", str(prompts), "--num_samples", "2",
            "--max_new_tokens", "8", "--seed", "3", "--top_k", "50", "--device", "cpu"]
    a, b = run_sample(*args), run_sample(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout.count("--- prompt") == 4 and "Once upon a time" in a.stdout
    c = run_sample(*args[:-3], "4", "--device", "cpu")  # another seed, other samples
    assert c.returncode == 0 and c.stdout != a.stdout


@pytest.mark.parametrize("args, message", [
    (["--init_from", "no/such/ckpt.pt"],
     "--init_from no/such/ckpt.pt does not exist; it must be a checkpoint"),
    (["--init_from", "no/such/dir"], "--init_from no/such/dir does not exist"),
    (["--prompt", "word " * 100, "--max_new_tokens", "10"], "exceeds the model's block_size"),
    (["--max_new_tokens", "64"], "leaves no room"),
    (["--response", "hi"], "needs --reward_ckpt"),
])
def test_bad_input_gives_one_clear_message(tiny_ckpt, args, message):
    if args[0] != "--init_from":
        args = ["--init_from", tiny_ckpt, *args]
    out = run_sample(*args, "--device", "cpu")
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr


def test_checkpoint_of_another_shape_is_refused_clearly(tiny_ckpt, tmp_path):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["model_config"]["n_embd"] = 64  # the weights no longer fit the declared shape
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    out = run_sample("--init_from", str(bad), "--device", "cpu")
    assert out.returncode != 0 and "do not fit this model" in out.stderr
    assert "Traceback" not in out.stderr


def test_long_prompts_from_a_file_keep_their_end(tiny_ckpt, tmp_path):
    prompts = tmp_path / "long.txt"
    prompts.write_text("word " * 100 + "THE END\n")
    out = run_sample("--init_from", tiny_ckpt, "--prompt_file", str(prompts), "--max_new_tokens",
                     "4", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "cut to its last 60 tokens" in out.stdout
