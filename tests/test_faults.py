"""Bad input and faults end with one clear message and never damage a good output: checkpoints of
the wrong kind, config values out of range, impossible generate() arguments, a diverging run,
corrupt data files, and durable (fsync'd) atomic writes."""
import dataclasses
import hashlib
import os
import typing
from dataclasses import dataclass

import pytest
import torch

import dpo
import lib.checkpoints
import lib.config
import ppo
import reward
import sample
import sft
from conftest import (
    DEMOS,
    HH_FIXTURES,
    gzip_fixtures,
    ppo_tiny_config,
    prepare,
    reward_tiny_config,
    sft_tiny_config,
    synthetic_preferences,
    write_data,
    write_jsonl,
)
from lib.checkpoints import load_model, save_checkpoint
from lib.config import FIELD_RANGES, parse_config
from model import GPT, GPTConfig, ScalarGPT

SHAPE = dict(n_layer=1, n_head=2, n_embd=32, block_size=128)


@dataclass
class RunConfig:
    note: str = "written by test_faults"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A language-model checkpoint (as sft.py writes), a reward model (as reward.py writes, with its
    normalisation) and a bare scalar model without it."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    return {"lm": save_checkpoint(str(d / "sft.pt"), GPT(GPTConfig(**SHAPE)), RunConfig()),
            "rm": save_checkpoint(str(d / "rm.pt"), ScalarGPT(GPTConfig(**SHAPE)), RunConfig(),
                                  reward_shift=0.5),
            "bare": save_checkpoint(str(d / "bare.pt"), ScalarGPT(GPTConfig(**SHAPE)), RunConfig())}


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ----------------------------------------------------------------------------------------- 1. kinds

@pytest.mark.parametrize("source, kind, given, expected", [
    ("lm", "scalar", "holds a language model", "a reward model (written by reward.py) is expected"),
    ("rm", "gpt", "holds a reward model",
     "a language model (written by sft.py or ppo.py) is expected"),
    ("bare", "scalar", "without reward.py's normalisation",
     "a trained, normalised reward model is expected"),
])
def test_trained_model_of_another_kind_is_refused_naming_given_and_expected(
        ckpts, source, kind, given, expected):
    with pytest.raises(SystemExit) as e:
        load_model(ckpts[source], kind)
    message = str(e.value.code)
    assert given in message and expected in message and ckpts[source] in message


def test_transplant_only_where_a_stage_initialises_a_new_model(ckpts):
    lm, _ = load_model(ckpts["lm"], "gpt")
    # reward.py from SFT: trunk copied, fresh head
    rm, _ = load_model(ckpts["lm"], "scalar", transplant=True)
    for k, v in lm.state_dict().items():
        if k.startswith("transformer."):
            assert torch.equal(rm.state_dict()[k], v), k
    # a trained reward model loads as itself
    assert load_model(ckpts["rm"], "scalar")[1]["reward_shift"] == 0.5
    # scratch stays allowed (demos)
    assert isinstance(load_model("scratch", "scalar", SHAPE)[0], ScalarGPT)


def test_ppo_refuses_an_sft_checkpoint_as_reward_model_and_a_reward_model_as_policy(
        ckpts, tmp_path):
    with pytest.raises(SystemExit) as e:
        ppo.train(ppo_tiny_config(tmp_path, sft_ckpt=ckpts["lm"], reward_ckpt=ckpts["lm"]))
    assert "holds a language model" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        ppo.train(ppo_tiny_config(tmp_path, sft_ckpt=ckpts["rm"], reward_ckpt=ckpts["rm"]))
    assert "holds a reward model" in str(e.value.code)
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_sample_refuses_a_reward_model_as_policy_and_a_language_model_as_reward_model(ckpts):
    with pytest.raises(SystemExit) as e:
        sample.main(sample.Config(init_from=ckpts["rm"], max_new_tokens=4, device="cpu"))
    assert "holds a reward model" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        sample.main(sample.Config(init_from=ckpts["lm"], reward_ckpt=ckpts["lm"], max_new_tokens=4,
                                  device="cpu"))
    assert "holds a language model" in str(e.value.code)


# ---------------------------------------------------------------------------------------- 2. ranges

SCRIPTS = {"sft.py": sft, "reward.py": reward, "ppo.py": ppo, "sample.py": sample, "dpo.py": dpo}
# For each rule: values that must be refused and one on the boundary that must be accepted, as typed
# on the command line (written here independently of lib.config.in_range).
EDGES = {">= 1": (["0", "-2"], "1"), ">= 0": (["-1"], "0"), ">= 2": (["1"], "2"),
         "> 0": (["0", "-0.5", "nan", "inf"], "1e-9"), "(0, 1]": (["0", "1.01", "nan"], "1"),
         "[0, 1)": (["1", "-0.01"], "0"), "[0, 1]": (["-0.01", "1.01"], "1")}


def field_type(cls, name):
    t = typing.get_type_hints(cls)[name]
    return next((a for a in typing.get_args(t) if a is not type(None)), t)


CASES = [(script, f.name, bad, good)
         for script, module in SCRIPTS.items() for f in dataclasses.fields(module.Config)
         if field_type(module.Config, f.name) in (int, float)
         for rule in [{**FIELD_RANGES, **getattr(module.Config, "RANGES", {})}.get(f.name)]
         for bad, good in [EDGES[rule] if rule in EDGES else ([], None)]]


@pytest.mark.parametrize("script, field, bad, good", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_every_numeric_field_has_a_range_that_is_enforced(script, field, bad, good):
    """check_ranges is what parse_config runs on every parsed config (the next test goes
    through the flags)."""
    module = SCRIPTS[script]
    assert good is not None, \
        f"{script} --{field} has no range rule (add it to lib.config.FIELD_RANGES)"
    typ = field_type(module.Config, field)
    for value in bad:
        with pytest.raises(SystemExit) as e:
            parsed = typ(float(value)) if typ is float else typ(value)
            lib.config.check_ranges(dataclasses.replace(module.Config(), **{field: parsed}))
        message = str(e.value.code)
        assert f"--{field} " in message and "out of range" in message, (value, e.value.code)
    lib.config.check_ranges(dataclasses.replace(module.Config(), **{field: typ(good)}))


@pytest.mark.parametrize("script, argv", [
    ("sample.py", ["--num_samples", "0"]), ("sample.py", ["--top_k", "0"]),
    ("sample.py", ["--top_p", "0"]),
    ("sample.py", ["--temperature", "-1"]), ("sample.py", ["--dtype", "float16"]),
    ("ppo.py", ["--config", "tiny", "--max_new_tokens", "0"]), ("ppo.py", ["--temperature", "0"]),
    ("sft.py", ["--max_steps", "0"]), ("reward.py", ["--lr", "0"]),
])
def test_issue_examples_out_of_range_end_with_one_message(script, argv):
    with pytest.raises(SystemExit) as e:
        parse_config(SCRIPTS[script].Config, SCRIPTS[script].CONFIGS, argv)
    assert f"error: {argv[-2]} " in str(e.value.code) and "it must be" in str(e.value.code)


def test_script_specific_ranges_and_every_preset_are_valid():
    # greedy
    assert parse_config(sample.Config, sample.CONFIGS, ["--temperature", "0"]).temperature == 0
    # no limit
    assert parse_config(reward.Config, reward.CONFIGS, ["--max_steps", "0"]).max_steps == 0
    for module in SCRIPTS.values():
        for name in module.CONFIGS:
            parse_config(module.Config, module.CONFIGS, ["--config", name])


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(top_k=0), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(temperature=-1.0),
                                    dict(temperature=float("nan"))])
def test_generate_raises_value_error_for_impossible_arguments(kwargs):
    model = GPT(GPTConfig(**SHAPE, vocab_size=64))
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        model.generate(torch.zeros(1, 3, dtype=torch.long), **args)


def test_generate_stops_on_non_finite_logits():
    model = GPT(GPTConfig(**SHAPE, vocab_size=64))
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2)


# ------------------------------------------------------------------------------------ 3. divergence

def test_diverging_ppo_stops_naming_step_and_cause_and_keeps_the_last_checkpoint(tmp_path):
    small = dict(iters=1, batch_size=4, minibatch_size=2, noptepochs=1, eval_prompts=2,
                 max_new_tokens=4, sample_every=100)
    cfg = ppo_tiny_config(tmp_path, **small)
    good = ppo.train(cfg)["ckpt_path"]
    before = sha256(good)
    # an absurd learning rate: the first update blows up the policy
    with pytest.raises(FloatingPointError) as e:
        ppo.train(dataclasses.replace(cfg, iters=3, resume=True, lr=1e30, grad_clip=0.0,
                                      warmup_iters=0))
    message = str(e.value)
    assert "at step 2" in message and "learning rate" in message and "--grad_clip" in message
    assert sha256(good) == before  # the last good checkpoint is untouched
    assert torch.isfinite(load_model(good, "gpt")[0].lm_head.weight).all()


def test_diverging_sft_stops_at_the_step_and_keeps_the_best_checkpoint(tmp_path):
    cfg = sft_tiny_config(tmp_path, write_data(tmp_path / "data", DEMOS, DEMOS[:2]), max_steps=3,
                          eval_interval=1, lr=1e30, min_lr=1e30, warmup_steps=0, grad_clip=0.0,
                          num_eval_samples=0)
    ckpt = os.path.join(cfg.out_dir, "ckpt.pt")
    with pytest.raises(FloatingPointError) as e:
        # step 0 evaluates the init and saves it; the first update blows up the weights
        sft.train(cfg)
    assert "at step 1" in str(e.value) and "learning rate" in str(e.value)
    assert torch.load(ckpt, weights_only=True)["step"] == 0
    # --resume's state: step 0, finite
    last = torch.load(os.path.join(cfg.out_dir, "last.pt"), weights_only=True)
    assert last["step"] == 0 and all(torch.isfinite(v).all() for v in last["model"].values())


def test_diverging_reward_model_stops_at_the_step_and_writes_nothing(tmp_path):
    rows = synthetic_preferences(24, seed=0)
    write_jsonl(tmp_path / "comparisons_train.jsonl", rows)
    write_jsonl(tmp_path / "comparisons_val.jsonl", rows[:4])
    write_jsonl(tmp_path / "sft_val.jsonl",
                [{"prompt": r["prompt"], "response": r["chosen"]} for r in rows[:4]])
    cfg = reward_tiny_config(tmp_path, lr=1e30, warmup_steps=0, grad_clip=0.0, batch_size=4,
                             grad_accum=1, max_steps=4)
    with pytest.raises(FloatingPointError) as e:
        reward.train(cfg)
    assert "at step 2" in str(e.value) and "learning rate" in str(e.value)
    assert not os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt"))


def test_checkpoint_with_nan_weights_is_never_written(tmp_path):
    model = GPT(GPTConfig(**SHAPE))
    path = save_checkpoint(str(tmp_path / "ckpt.pt"), model, RunConfig(), step=1)
    before = sha256(path)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match="at step 2"):
        save_checkpoint(path, model, RunConfig(), step=2)
    assert sha256(path) == before and not os.path.exists(path + ".tmp")


# ------------------------------------------------------------------------------------ 4. data files

def test_truncated_source_file_names_the_file_and_the_fix(tmp_path):
    src = gzip_fixtures(tmp_path / "src")
    damaged = src / "helpful-base" / "train.jsonl.gz"
    damaged.write_bytes(damaged.read_bytes()[:-20])  # cut short: gzip raises EOFError at the end
    with pytest.raises(SystemExit) as e:
        prepare.main(["--source", str(src), "--out_dir", str(tmp_path / "out")])
    message = str(e.value.code)
    assert str(damaged) in message and "damaged" in message and "--source" in message
    assert not (tmp_path / "out" / "comparisons_train.jsonl").exists()


def test_damaged_cached_download_is_fetched_again(tmp_path, capsys, monkeypatch):
    # the hub cache holds an interrupted download; a stand-in for the hub client (no network in
    # tests) serves the cached file and, asked to force the download, writes the good file over it
    # as the real client does
    import huggingface_hub
    good = gzip_fixtures(tmp_path / "hub")
    cache = tmp_path / "cache" / "datasets--Anthropic--hh-rlhf"
    snapshot = gzip_fixtures(cache / "snapshots" / "abc123")
    cached = snapshot / "helpful-base" / "train.jsonl.gz"
    cached.write_bytes(cached.read_bytes()[:30])
    forced = []

    def hub_client(repo_id, filename, repo_type=None, force_download=False):
        assert (repo_id, repo_type) == ("Anthropic/hh-rlhf", "dataset")
        if force_download:
            forced.append(filename)
            (snapshot / filename).write_bytes((good / filename).read_bytes())
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub_client)
    stats = prepare.main(["--out_dir", str(tmp_path / "out")])
    assert "damaged" in capsys.readouterr().out and forced == ["helpful-base/train.jsonl.gz"]
    assert cached.read_bytes() == (good / "helpful-base" / "train.jsonl.gz").read_bytes()
    assert stats["total"] == prepare.main(["--source", str(HH_FIXTURES), "--out_dir",
                                           str(tmp_path / "l")])["total"]


# ----------------------------------------------------------------------------------------- 5. fsync

@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"),
                    reason="needs /proc to name file descriptors")
def test_atomic_writers_fsync_the_file_before_and_the_directory_after_the_rename(
        tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recording_replace(a, b):
        events.append(("replace", str(a), str(b)))
        return replace(a, b)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    d = str(tmp_path)
    writers = [(os.path.join(d, "ckpt.pt"),
                lambda p: save_checkpoint(p, GPT(GPTConfig(**SHAPE)), RunConfig())),
               (os.path.join(d, "config.json"),
                lambda p: lib.checkpoints.atomic_write_text(p, "{}\n")),
               (os.path.join(d, "sft_train.jsonl"),
                lambda p: prepare.write_jsonl(p, [{"prompt": "a"}]))]
    for path, write in writers:
        events.clear()
        write(path)
        assert events == [("fsync", path + ".tmp"), ("replace", path + ".tmp", path),
                          ("fsync", d)], events
