"""The whole pipeline in one go, as the README runs it: prepare -> sft -> reward -> ppo -> sample.

Tiny models and a handful of steps on the shared HH-RLHF copy (or the test fixtures when it is
absent): checks that every stage hands its checkpoint to the next and that sample.py reads them all.
Then pipeline.py's own commands: the lab's settings as flags (without them, the commands of before),
the class lab, and their bad input.
"""
import json
import os
import subprocess
import sys

import pytest
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
    sft_cfg = sft.Config(**SHAPE, **BUDGET, init_from="scratch", dropout=0.0, data_dir=data,
                         out_dir=str(out / "sft"), max_steps=6, batch_size=4, grad_accum=1, lr=1e-3,
                         warmup_steps=2, eval_interval=3, eval_examples=8, max_new_tokens=8,
                         device="cpu", log_to="tensorboard")
    sft_result = sft.train(sft_cfg)
    rm_cfg = reward.Config(**BUDGET, init_from=sft_result["ckpt_path"], data_dir=data,
                           out_dir=str(out / "reward"), max_steps=4, batch_size=4, grad_accum=1,
                           lr=1e-4, warmup_steps=1, eval_interval=2, device="cpu",
                           log_to="tensorboard")
    rm_result = reward.train(rm_cfg)
    ppo_cfg = ppo.Config(sft_ckpt=sft_result["ckpt_path"], reward_ckpt=rm_result["ckpt_path"],
                         data_dir=data, out_dir=str(out / "ppo"), max_prompt_tokens=96,
                         max_new_tokens=12, iters=2, batch_size=4, minibatch_size=2, noptepochs=1,
                         lr=1e-4, warmup_iters=1, eval_interval=2, eval_prompts=4, sample_every=1,
                         device="cpu", log_to="tensorboard")
    ppo_result = ppo.train(ppo_cfg)
    for result in (sft_result, rm_result, ppo_result):
        assert os.path.isfile(result["ckpt_path"])
    # the reward model and the critic start from the SFT trunk / the reward model; the policy moved
    sft_ckpt, rm_ckpt, ppo_ckpt = (load_checkpoint(r["ckpt_path"])
                                   for r in (sft_result, rm_result, ppo_result))
    assert rm_ckpt["kind"] == "scalar" and ppo_ckpt["kind"] == "gpt"
    assert ppo_ckpt["config"]["reward_ckpt"] == rm_result["ckpt_path"]
    assert not torch.equal(ppo_ckpt["model"]["transformer.h.0.attn.c_attn.weight"],
                           sft_ckpt["model"]["transformer.h.0.attn.c_attn.weight"])
    for path in ("metrics.jsonl", "ppo.png"):
        assert os.path.isfile(out / "ppo" / path)
    # --log_to tensorboard: the metrics.jsonl names, in every stage
    for stage in ("sft", "reward", "ppo"):
        names = set(metrics_by_name(out / stage / "metrics.jsonl"))
        assert set(tensorboard_scalars(out / stage / "tensorboard")) == names, stage
    # sample.py compares the SFT and PPO policies on the same prompts and scores them with the
    # reward model
    run = subprocess.run([sys.executable, "sample.py",
                          "--init_from", f"{sft_result['ckpt_path']},{ppo_result['ckpt_path']}",
                          "--reward_ckpt", rm_result["ckpt_path"],
                          "--prompt_file", os.path.join(data, "prompts_val.jsonl"),
                          "--max_prompts", "2", "--max_new_tokens", "8", "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("mean reward") == 2 and ppo_result["ckpt_path"] in run.stdout


# ------------------------------------------------------------------------------------------------
# pipeline.py: the lab's settings as flags, and the class lab

TASKS = ("lab", "lab_sizes", "hh")


def step_commands(task, *flags):
    """{step: argv} of `pipeline.py --task task *flags`, with the interpreter written "python"."""
    import pipeline
    a = pipeline.parse_args(["--task", task, *flags])
    steps = {"lab": pipeline.lab_steps, "lab_sizes": pipeline.lab_sizes_steps,
             "hh": pipeline.hh_steps}[task](a)
    return [[name, ["python" if c == sys.executable else c for c in argv]] for name, argv in steps]


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("task", TASKS)
def test_without_flags_every_step_command_is_the_one_before_the_knobs(task, quick):
    """The knobs' defaults are the values that were constants: with no knob flags every command is
    byte for byte the one pipeline.py gave before (tests/fixtures/pipeline/argv.json)."""
    with open(os.path.join(REPO, "tests", "fixtures", "pipeline", "argv.json")) as f:
        expected = json.load(f)[task + ("_quick" if quick else "")]
    flags = ["--out_dir", "out/argv", "--seed", "7"] + (["--quick"] if quick else [])
    assert step_commands(task, *flags) == expected
    if task == "lab":
        assert step_commands(task, *flags, "--config", "full") == expected


def flag_of(steps, step, name):
    argv = dict(steps)[step]
    return argv[argv.index(name) + 1] if name in argv else None


def test_each_knob_reaches_the_steps_it_names():
    steps = step_commands("lab", "--kl_coef", "0.05", "--ptx_coef", "0.5", "--k", "4",
                          "--rankings_per_prompt", "3", "--label_noise", "0", "--ppo_iters", "12")
    ppo_steps = [name for name, argv in steps if argv[1] == "ppo.py"]
    for name in ppo_steps:  # the over-optimisation run has no KL penalty, whatever --kl_coef says
        assert flag_of(steps, name, "--kl_coef") == ("0" if name == "overopt" else "0.05"), name
    assert flag_of(steps, "dpo", "--beta") == "0.05"
    assert flag_of(steps, "ppo_ptx", "--ptx_coef") == "0.5"
    assert [flag_of(steps, name, "--ptx_coef") for name in ppo_steps].count(None) == 6
    assert {name: flag_of(steps, name, "--iters") for name in ppo_steps} == {
        "ppo_round1": "30", "ppo_round2": "60", "ppo": "12", "ppo_ptx": "12", "rloo": "12",
        "grpo": "12", "overopt": "30"}
    for name in ("label", "label_round2", "label_round3"):
        assert flag_of(steps, name, "--k") == "4" and flag_of(steps, name, "--label_noise") == "0.0"
        assert flag_of(steps, name, "--rankings_per_prompt") == "3"
    assert flag_of(steps, "label_val", "--rankings_per_prompt") == "1"  # exact gold, one ranking
    assert flag_of(steps, "label_val", "--label_noise") == "0"
    assert flag_of(steps, "evaluate", "--label_noise") == "0.0"


def test_kl_coef_0_turns_the_ppo_penalty_off_and_dpo_keeps_a_beta_it_can_train_with():
    """DPO's beta is PPO's kl_coef, but dpo.py refuses beta 0 (its loss would be log 2 on every
    pair): with --kl_coef 0 the PPO runs have no penalty and DPO keeps the default's 0.1."""
    steps = step_commands("lab", "--config", "class", "--kl_coef", "0")
    assert all(flag_of(steps, name, "--kl_coef") == "0.0"
               for name, argv in steps if argv[1] == "ppo.py" and name != "overopt")
    assert flag_of(steps, "dpo", "--beta") == "0.1"


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_fewer_rounds_skip_the_later_rounds_and_train_the_final_models_on_the_rounds_run(rounds):
    steps = step_commands("lab", "--rounds", str(rounds), "--out_dir", "out/r")
    names = [name for name, _ in steps]
    files = ["rankings.jsonl", "rankings_round2.jsonl", "rankings_round3.jsonl"][:rounds]
    labels = ["label", "label_round2", "label_round3"]
    assert [name for name in names if name in labels] == labels[:rounds]
    assert [n for n in names if n.startswith(("reward_round", "ppo_round"))] == [
        f"{kind}_round{r}" for r in range(1, rounds) for kind in ("reward", "ppo")]
    assert flag_of(steps, "reward", "--train_files").split(",") == files
    assert flag_of(steps, "dpo", "--train_files").split(",") == files
    # the over-optimisation run and best-of-n use round 1's reward model: with one round, the final
    round1 = "out/r/reward_round1/ckpt.pt" if rounds > 1 else "out/r/reward/ckpt.pt"
    assert flag_of(steps, "overopt", "--reward_ckpt") == round1
    assert flag_of(steps, "evaluate", "--reward_round1") == (round1 if rounds > 1 else None)
    for r in (1, 2):
        expected = f"out/r/ppo_round{r}/ckpt.pt" if r < rounds else None
        assert flag_of(steps, "evaluate", f"--ppo_round{r}") == expected


@pytest.mark.parametrize("config", ["full", "class"])
@pytest.mark.parametrize("quick", [False, True])
def test_lab_configs_call_the_stages_with_flags_they_parse(config, quick):
    """Every stage call of either lab config parses with that stage's own Config (a mistyped flag
    fails here, not minutes into a class)."""
    from lib.config import parse_config
    steps = step_commands("lab", "--config", config, *(["--quick"] if quick else []))
    for name, argv in steps:
        if argv[1] in ("sft.py", "reward.py", "ppo.py", "label.py", "dpo.py"):
            module = __import__(argv[1][:-3])
            parse_config(module.Config, module.CONFIGS, argv[2:])


def test_class_lab_shrinks_the_lab_and_flags_override_it():
    import pipeline
    full, small = pipeline.LAB_CONFIGS["full"], pipeline.LAB_CONFIGS["class"]
    for key in ("rounds", "ppo_iters", "pretrain_steps", "dpo_steps", "overopt_iters",
                "eval_samples", "rm_samples", "bon_samples"):
        assert small[key] <= full[key], key
    steps = step_commands("lab", "--config", "class")
    assert len(steps) < len(step_commands("lab"))
    a = pipeline.parse_args(["--task", "lab", "--config", "class", "--rounds", "2", "--k", "2"])
    assert (a.rounds, a.k, a.ppo_iters) == (2, 2, small["ppo_iters"])


def test_class_lab_is_the_full_labs_first_round_and_its_over_optimisation_run():
    """Every step of the class lab up to its PPO policy runs the command of the full lab's round 1
    but for the folder it writes (`reward` is reward_round1, `ppo` is ppo_round1), so the class
    lab's numbers are those of the full lab's round-1 policy; the over-optimisation run is the full
    lab's, kept and evaluated every 4 iterations instead of 2 (a subset of the full lab's
    checkpoints: evaluating changes no training step)."""
    full = dict(step_commands("lab", "--out_dir", "out/a"))
    small = dict(step_commands("lab", "--config", "class", "--out_dir", "out/a"))
    same = lambda argv: [c.replace("reward_round1", "reward").replace("ppo_round1", "ppo")
                         for c in argv]
    every = lambda argv: int(argv[argv.index("--eval_interval") + 1])
    assert (every(full["overopt"]), every(small["overopt"])) == (2, 4)
    small["overopt"] = [c if c != "4" or small["overopt"][k - 1] != "--eval_interval" else "2"
                        for k, c in enumerate(small["overopt"])]
    for name in ("world", "pretrain", "sft", "label", "label_val", "overopt"):
        assert same(small[name]) == same(full[name]), name
    assert same(full["reward_round1"]) == small["reward"]
    assert same(full["ppo_round1"]) == small["ppo"]


BAD_KNOBS = [("--kl_coef", "-0.1"), ("--kl_coef", "nan"), ("--kl_coef", "11"),
             ("--ptx_coef", "0"), ("--ptx_coef", "inf"), ("--rounds", "0"), ("--rounds", "4"),
             ("--rounds", "two"), ("--k", "3"), ("--k", "0"), ("--k", "66"),
             ("--rankings_per_prompt", "0"), ("--label_noise", "-1"), ("--ppo_iters", "0")]


@pytest.mark.parametrize("flag, value", BAD_KNOBS)
def test_a_knob_out_of_range_ends_in_one_line_naming_the_flag(flag, value, capsys):
    import pipeline
    with pytest.raises(SystemExit) as exit_:
        pipeline.parse_args(["--task", "lab", flag, value])
    assert exit_.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert " error: " in message and flag in message, message


@pytest.mark.parametrize("argv, message", [
    (["--task", "hh", "--rounds", "2"], "--rounds is a setting of --task lab or lab_sizes, not of "
     "--task hh"),
    (["--task", "hh", "--kl_coef", "0.2"], "--kl_coef is a setting of --task lab or lab_sizes"),
    (["--task", "lab", "--from_lab", "out/lab"], "--from_lab is a setting of --task lab_sizes"),
    (["--task", "lab", "--config", "small"], "--config small is not a config of --task lab"),
    (["--task", "hh", "--config", "class"], "--config class is not a config of --task hh"),
])
def test_a_knob_of_another_task_is_refused_in_one_line(argv, message, capsys):
    import pipeline
    with pytest.raises(SystemExit):
        pipeline.parse_args(argv)
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_run_records_its_settings_and_a_quick_run_says_its_numbers_mean_nothing(tmp_path):
    import pipeline
    for quick in (False, True):
        out = tmp_path / str(quick)
        out.mkdir()
        (out / "results.json").write_text(json.dumps({"seed": 3}))
        (out / "results.md").write_text("# Lab results, seed 3\n")
        a = pipeline.parse_args(["--task", "lab", "--config", "class", "--kl_coef", "0.2",
                                 *(["--quick"] if quick else [])])
        pipeline.record_run(str(out), {"world": 60.0, "evaluate": 30.0}, a)
        results = json.loads((out / "results.json").read_text())
        assert results["minutes"] == 1.5
        assert results["settings"] == {**{k: pipeline.LAB_CONFIGS["class"][k] for k in
                                          pipeline.KNOBS}, "config": "class", "kl_coef": 0.2,
                                       "quick": quick}
        md = (out / "results.md").read_text()
        assert md.startswith("**--quick: a smoke test") == quick
        assert "Settings: config class, kl_coef 0.2" in md and "Wall time: 1.5 min" in md
