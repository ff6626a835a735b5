"""Command-line configuration: defaults < preset < flags, type checks, helpful errors."""
import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest

from conftest import REPO
from lib.checkpoints import load_model, save_checkpoint
from lib.config import INTERNAL_FIELDS, MODEL_PRESETS, parse_config, print_config
from model import GPT, GPTConfig


@dataclass
class Config:
    lr: float = 1e-3  # learning rate
    n_layer: int = 4
    compile: bool = False
    top_k: Optional[int] = None
    init_from: str = "scratch"
    preset: str = ""


PRESETS = {"tiny": dict(n_layer=2, lr=5e-4), "other": dict(compile=True)}


def test_defaults_then_preset_then_flags():
    assert parse_config(Config, PRESETS, []) == Config()
    cfg = parse_config(Config, PRESETS, ["--config", "tiny", "--lr", "2e-5"])
    # preset sets n_layer, the flag wins on lr
    assert (cfg.n_layer, cfg.lr, cfg.preset) == (2, 2e-5, "tiny")
    cfg = parse_config(Config, PRESETS, ["--compile", "false", "--config", "other", "--top_k", "5"])
    assert cfg.compile is False and cfg.top_k == 5 and isinstance(cfg.top_k, int)
    assert parse_config(Config, PRESETS, ["--top_k", "none"]).top_k is None
    assert parse_config(Config, PRESETS, ["--n_layer", "8"]).n_layer == 8
    # a bare bool flag
    assert parse_config(Config, PRESETS, ["--compile", "--n_layer", "8"]).compile is True


@pytest.mark.parametrize("argv, expected", [
    (["--lrr", "1"], "unrecognized arguments: --lrr"),
    (["--n_layer", "2.5"], "invalid int value"),
    (["--compile", "maybe"], "expected true or false"),
    (["--config", "huge"], "invalid choice"),
])
def test_bad_flags_exit_with_the_valid_fields(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Config, PRESETS, argv)
    message = str(e.value.code)
    assert expected in message and "--lr" in message and "--n_layer" in message


@pytest.mark.parametrize("script", ["sft.py", "reward.py", "ppo.py", "sample.py"])
def test_help_lists_every_field_with_its_meaning_and_default(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    module = __import__(script[:-3])
    for field in dataclasses.fields(module.Config):
        assert (f"--{field.name} " in out.stdout) == (field.name not in INTERNAL_FIELDS)
    assert "--preset" not in out.stdout  # set by --config, not by a user
    assert "--config" in out.stdout and "(default: " in out.stdout
    if script == "sample.py":
        # the field's comment is its help
        assert "0 = greedy (default: 0.8)" in " ".join(out.stdout.split())


def test_printed_shape_is_the_loaded_models_not_the_configs(tmp_path, capsys):
    """A model from a checkpoint has the checkpoint's shape: the printed config does
    not claim another."""
    shape = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    path = save_checkpoint(str(tmp_path / "ckpt.pt"), GPT(shape), Config())
    cfg = Config(init_from=path)  # its n_layer 4 is the scratch shape, unused here
    print_config(cfg)
    load_model(cfg.init_from, "gpt", dict(n_layer=cfg.n_layer))
    out = capsys.readouterr().out
    assert "n_layer=(from init_from)" in out and "n_layer=4" not in out
    assert f"model shape from {path}: n_layer=1, n_head=2, n_embd=32, block_size=16" in out
    print_config(Config())  # scratch: the config's shape is the model's
    assert "n_layer=4" in capsys.readouterr().out


def test_model_size_presets_are_gpt2_shapes():
    assert MODEL_PRESETS["small"] == dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    assert MODEL_PRESETS["xl"]["n_embd"] == 1600


def test_settings_that_cannot_work_end_with_one_message(tmp_path):
    out = subprocess.run([sys.executable, "ppo.py", "--config", "tiny", "--batch_size", "10",
                          "--minibatch_size", "4", "--sft_ckpt", "scratch", "--reward_ckpt",
                          "scratch", "--out_dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0
    assert "error: batch_size must be a multiple of minibatch_size" in out.stderr
    assert "Traceback" not in out.stderr
