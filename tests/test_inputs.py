"""Every file and path a user hands in, read one careful way: the JSON-lines reader (torn and
malformed lines, --strict), and a table of bad inputs to the command-line tools, each ending in
one line that names the flag or the file:line, never a traceback. The scripts run in this
process (runpy), so any exception other than the SystemExit of a clear message fails the test,
as a traceback would."""
import io
import json
import os
import runpy
import sys

import pytest
import torch

from conftest import DEMOS, PPO_FIXTURES, REPO, write_jsonl
from lib.checkpoints import check_resumable, save_checkpoint
from lib.data import read_jsonl, set_aside_torn_tail
from model import GPT, GPTConfig

FIELDS = {"prompt": str, "response": str}
GOOD = json.dumps({"prompt": "p", "response": "r"})


# --------------------------------------------------------------------------------------- the reader

@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "p", "response": ', "not valid JSON"),
    ('["p", "r"]', "a JSON list where an object"),
    ('"just a string"', "a JSON str where an object"),
    ('{"prompt": "p"}', 'no "response" field'),
    ('{"prompt": 3, "response": "r"}', '"prompt" is a int, expected a str'),
    ('{"prompt": true, "response": "r"}', '"prompt" is a bool, expected a str'),
    (b'{"prompt": "\xff", "response": "r"}', "not UTF-8 text"),
])
def test_a_bad_middle_line_is_skipped_and_counted_or_refused_under_strict(
        tmp_path, capsys, line, problem):
    path = tmp_path / "data.jsonl"
    line = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(GOOD.encode() + b"\n" + line + b"\n\n" + GOOD.encode() + b"\n")
    assert read_jsonl(str(path), "demonstrations", FIELDS) == [json.loads(GOOD)] * 2
    err = capsys.readouterr().err
    assert f"{path}:2: {problem}" in err and "skipped 1 of 3 lines" in err
    with pytest.raises(SystemExit,
                       match=f"{path}:2: " + problem.replace("(", r"\(").replace("[", r"\[")):
        read_jsonl(str(path), "demonstrations", FIELDS, strict=True)


def test_a_torn_last_line_is_skipped_even_under_strict(tmp_path, capsys):
    path = tmp_path / "rankings.jsonl"
    path.write_text(GOOD + "\n" + GOOD[:12])
    for strict in (False, True):
        assert read_jsonl(str(path), "demonstrations", FIELDS, strict=strict) == [json.loads(GOOD)]
        assert f"{path}:2: the last line is cut short" in capsys.readouterr().err
    path.write_text(GOOD + "\n" + GOOD)  # complete, just without a final newline: a record
    assert read_jsonl(str(path), "demonstrations", FIELDS, strict=True) == [json.loads(GOOD)] * 2
    # the same fragment in the middle is not a torn write
    path.write_text(GOOD[:12] + "\n" + GOOD + "\n")
    with pytest.raises(SystemExit, match=f"{path}:1: not valid JSON"):
        read_jsonl(str(path), "demonstrations", FIELDS, strict=True)


def test_under_torchrun_only_the_first_rank_warns_and_every_rank_stops(
        tmp_path, capsys, monkeypatch):
    """Every rank reads the same file: the warnings are printed once (RANK 0), the rows are the same
    on every rank, and an error stops every rank."""
    path = tmp_path / "data.jsonl"
    # a bad middle line and a torn last one
    path.write_text(GOOD + "\n" + '{"prompt": "p"}' + "\n" + GOOD[:12])
    said = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert read_jsonl(str(path), "demonstrations", FIELDS) == [json.loads(GOOD)]
        said[rank] = capsys.readouterr().err
        with pytest.raises(SystemExit, match=f"{path}:2: no \"response\" field"):
            read_jsonl(str(path), "demonstrations", FIELDS, strict=True)
    assert f"{path}:2: no" in said["0"] and f"{path}:3: the last line is cut short" in said["0"]
    assert "skipped 1 of 2 lines" in said["0"] and said["1"] == ""


def test_a_byte_order_mark_is_not_a_bad_first_line(tmp_path):
    path = tmp_path / "notepad.jsonl"
    # as Windows editors save
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + GOOD.encode() + b"\r\n")
    assert read_jsonl(str(path), "demonstrations", FIELDS, strict=True) == [json.loads(GOOD)] * 2


def test_a_file_without_a_single_good_row_is_an_error(tmp_path):
    path = tmp_path / "x.jsonl"
    # comparisons where demos belong
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 3)
    with pytest.raises(SystemExit,
                       match=r'none of its 3 lines is a \{"prompt": str, "response": str\} object '
                                         r'\(line 1: no "response" field'):
        read_jsonl(str(path), "SFT train", FIELDS)
    path.write_text("\n\n")
    with pytest.raises(SystemExit, match="holds no rows"):
        read_jsonl(str(path), "SFT train", FIELDS)
    assert read_jsonl(str(path), "metrics", allow_empty=True) == []


def test_set_aside_torn_tail_moves_the_fragment_and_keeps_complete_lines(tmp_path):
    path = str(tmp_path / "rankings.jsonl")
    assert set_aside_torn_tail(path) == 0  # no file yet
    with open(path, "w") as f:
        # complete last line without its newline: it only gets the newline
        f.write(GOOD + "\n" + GOOD)
    assert set_aside_torn_tail(path) == 0 and open(path).read() == GOOD + "\n" + GOOD + "\n"
    with open(path, "a") as f:
        f.write(GOOD[:9])
    assert set_aside_torn_tail(path) == 9
    assert open(path).read() == GOOD + "\n" + GOOD + "\n"
    assert open(path + ".torn").read() == GOOD[:9] + "\n"


# ---------------------------------------------------------------------------------------- the tools

def run_tool(script, args, monkeypatch, capsys):
    """Run `python script args` in this process from an empty folder; returns (exit message
    or code, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    return e.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files to point the tools at: a tiny checkpoint, a run folder, good and damaged data files."""
    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    ckpt = save_checkpoint(str(d / "run" / "ckpt.pt"),
                           GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)),
                           GPTConfig())
    (d / "garbage.pt").write_bytes(b"not a checkpoint")
    (d / "a_file").write_text("x")
    data = d / "data"
    data.mkdir()
    write_jsonl(data / "sft_train.jsonl", DEMOS)
    write_jsonl(data / "sft_val.jsonl", DEMOS)
    torn = json.dumps(DEMOS[1])[:30]
    (data / "bad_demos.jsonl").write_text(
        json.dumps(DEMOS[0]) + "\n" + torn + "\n" + json.dumps(DEMOS[2]) + "\n")
    write_jsonl(data / "comparisons.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4)
    (data / "bad_rankings.jsonl").write_text('{"prompt": "p", "ranked": ["a", "b"]}\n'
                                             '{"prompt": "p", "ranked": ["only one"]}\n')
    (data / "bad_prompts.jsonl").write_text('{"prompt": "p"}\n{"text": "no prompt"}\n')
    (data / "empty_prompts.jsonl").write_text('{"prompt": ""}\n' * 3)
    # loads with weights_only, but is not ours
    torch.save({"weights": torch.zeros(2)}, d / "foreign.pt")
    hh = d / "hh" / "helpful-base"  # an HH-RLHF copy whose every line is malformed
    hh.mkdir(parents=True)
    (hh / "train.jsonl").write_text('{"chosen": "no assistant turn", "rejected": "x"}\nnot json\n')
    (d / "labelers.py").write_text("def factory(world_dir):\n"
                                   "    return lambda prompt, response: 0.0\n\n\n"
                                   "def word(prompt, response):\n    return 'high'\n")
    (d / "broken.py").write_text("def f(prompt, response)\n    return 1.0\n")  # a syntax error
    write_jsonl(data / "nothing.jsonl", [{"prompt": "", "response": ""}] * 2)
    write_jsonl(d / "prompts_copy.jsonl", [{"prompt": "p"}, {"prompt": "q"}])
    (d / "world").mkdir()
    (d / "world" / "world.json").write_text('{"lands": [')  # torn
    return {"dir": str(d), "ckpt": ckpt, "run": str(d / "run"), "data": str(data)}


# (script, args with {dir}/{ckpt}/{run}/{data} filled from `world`, what the message must contain)
BAD_INPUTS = [
    # path flags, checked where the flags are parsed
    ("sft.py", ["--data_dir", "{dir}/nowhere"],
     "--data_dir {dir}/nowhere does not exist; it must be an existing folder"),
    ("sft.py", ["--data_dir", "{dir}/a_file"], "--data_dir {dir}/a_file is a file"),
    ("sft.py", ["--data_dir", "{data}", "--train_file", "missing.jsonl"],
     "--train_file missing.jsonl: {data}/missing.jsonl does not exist; "
     "it must be an existing file in --data_dir"),
    ("sft.py", ["--data_dir", "{data}", "--out_dir", "{dir}/a_file"],
     "--out_dir {dir}/a_file is a file"),
    ("sft.py", ["--data_dir", "{data}", "--out_dir", "{dir}/a_file/sub"],
     "--out_dir {dir}/a_file/sub cannot be created"),
    ("sft.py", ["--data_dir", "{data}", "--out_dir", ""], "--out_dir is empty"),
    ("sft.py", ["--data_dir", "{data}", "--init_from", "{run}"],
     "--init_from {run} is a run's folder, not a checkpoint: pass {run}/ckpt.pt"),
    ("sft.py", ["--data_dir", "{data}", "--init_from", "gpt3"], "--init_from gpt3 does not exist"),
    ("sft.py", ["--n_embd", "30", "--n_head", "4"], "--n_embd 30 must be a multiple of --n_head 4"),
    ("sft.py", ["--dtype", "float16"], "--dtype float16 is out of range"),
    ("reward.py", ["--data_dir", "{data}", "--train_files", "comparisons.jsonl,nope.jsonl"],
     "--train_files nope.jsonl: {data}/nope.jsonl does not exist"),
    ("reward.py", ["--data_dir", "{data}", "--init_from", "{dir}/garbage.pt", "--train_files",
                   "comparisons.jsonl", "--val_files", "comparisons.jsonl", "--demo_file",
                   "sft_val.jsonl"],
     "could not read checkpoint"),
    ("ppo.py", ["--data_dir", PPO_FIXTURES, "--sft_ckpt", "scratch", "--reward_ckpt", "scratch",
                "--ptx_file", "{dir}/nope.jsonl"],
     "--ptx_file {dir}/nope.jsonl does not exist; it must be an existing file"),
    ("ppo.py", ["--data_dir", PPO_FIXTURES, "--sft_ckpt", "scratch", "--reward_ckpt", "scratch",
                "--judge_ckpt", "{data}"], "--judge_ckpt {data} is a folder without config.json"),
    ("label.py",
     ["--policy", "{ckpt}", "--prompts", PPO_FIXTURES + "/prompts_val.jsonl", "--out", "{data}"],
     "--out {data} is a folder; it must be a file to write to"),
    ("label.py",
     ["--policy", "{ckpt},{dir}/nope.pt", "--prompts", PPO_FIXTURES + "/prompts_val.jsonl"],
     "--policy {dir}/nope.pt does not exist"),
    ("label.py", ["--policy", "{ckpt}", "--prompts", PPO_FIXTURES + "/prompts_val.jsonl", "--out",
                  "{dir}/r.jsonl", "--labeler", "reward"], "--labeler reward needs --reward_ckpt"),
    ("sample.py", ["--init_from", "{ckpt}", "--prompt_file", "{data}"],
     "--prompt_file {data} is a folder"),
    ("evaluate.py", ["--policy_a", "{ckpt}", "--policy_b", "{ckpt}", "--judge_fn", "x.py:f",
                     "--prompts", "{dir}/none.jsonl"], "--prompts {dir}/none.jsonl does not exist"),
    ("export.py", ["--init_from", "{ckpt}", "--out_dir", "{dir}/a_file"],
     "--out_dir {dir}/a_file is a file"),
    ("sft.py", ["--data_dir", "{data}", "--init_from", "{dir}/foreign.pt", "--out_dir", "{dir}/o1"],
     "{dir}/foreign.pt is a PyTorch file but not a checkpoint of this project"),
    ("sft.py", ["--device", "nonsense"], "--device nonsense is not a device this project runs on"),
    ("sft.py",
     ["--device", "cuda", "--data_dir", "{data}", "--init_from", "scratch", "--out_dir",
      "{dir}/o2"],
     "--device cuda, but PyTorch sees no CUDA GPU here"),
    ("ppo.py", ["--data_dir", PPO_FIXTURES, "--sft_ckpt", "scratch", "--reward_ckpt", "scratch",
                "--resume", "true", "--batch_size", "8", "--minibatch_size", "4", "--out_dir",
                "{run}"],
     "{run}/ckpt.pt cannot be resumed from: it holds no critic"),
    ("label.py",
     ["--policy", "{ckpt}", "--prompts", "{data}/empty_prompts.jsonl", "--out", "{dir}/r3.jsonl"],
     '{data}/empty_prompts.jsonl: none of its 3 lines'),
    ("label.py", ["--policy", "{ckpt}", "--prompts", PPO_FIXTURES + "/prompts_val.jsonl", "--out",
                  "{dir}/r4.jsonl", "--labeler", "fn", "--labeler_fn", "{dir}/labelers.py:factory"],
     "is called as f(prompt, response) (a factory? give its argument with --labeler_arg"),
    ("sample.py", ["--init_from", "{ckpt}", "--prompt", ""], "--prompt is empty"),
    ("data/hh_rlhf/prepare.py", ["--source", "{dir}/hh", "--out_dir", "{dir}/hh_out"],
     "no usable comparisons for train "
     "(read 2 lines; dropped: malformed_json 1, no_shared_prompt 1)"),
    ("data/hh_rlhf/prepare.py", ["--source", "{dir}/hh", "--subsets", ","], "--subsets is empty"),
    ("data/lab/prepare.py", ["--corpus_docs", "0", "--out_dir", "{dir}/lab"],
     "--corpus_docs 0 is out of range"),
    ("data/lab/evaluate_lab.py", ["--data_dir", "{dir}/world", "--out_dir", "{dir}/ev", "--reward",
                                  "{ckpt}", "--sft", "{ckpt}", "--overopt", "{dir}/nowhere"],
     "--overopt {dir}/nowhere does not exist"),
    ("data/lab/evaluate_lab.py", ["--data_dir", "{dir}/world", "--out_dir", "{dir}/ev", "--reward",
                                  "{ckpt}", "--sft",
                                  "{ckpt}"], "{dir}/world/world.json is not a valid world file"),
    ("pipeline.py", ["--task", "hh", "--config", "huge", "--dry_run"],
     "argument --config: invalid choice: 'huge'"),
    ("sft.py", ["--data_dir", "{data}", "--init_from", "scratch", "--train_file", "nothing.jsonl",
                "--out_dir", "{dir}/o3"], "none of its 2 lines is a"),
    ("data/hh_rlhf/prepare.py", ["--source", "{dir}/hh", "--out_dir", ""], "--out_dir '' is empty"),
    ("data/lab/prepare.py", ["--out_dir", "{dir}/a_file/x"],
     "cannot be created: {dir}/a_file is a file"),
    ("data/lab/evaluate_lab.py", ["--data_dir", "{dir}/world", "--out_dir", "", "--reward",
                                  "{ckpt}", "--sft", "{ckpt}"], "--out_dir  is empty"),
    ("data/lab/evaluate_lab.py",
     ["--data_dir", "{dir}/world", "--out_dir", "{dir}/ev", "--reward", "{ckpt}"],
     "--sft is required"),
    ("label.py", ["--policy", "{ckpt}", "--prompts", PPO_FIXTURES + "/prompts_val.jsonl", "--out",
                  "{dir}/r5.jsonl", "--labeler", "fn", "--labeler_fn", "{dir}/labelers.py:word",
                  "--max_new_tokens", "4", "--max_prompt_tokens", "32"],
     "labelers.py:word' returned 'high', not a number"),
    ("label.py", ["--policy", "{ckpt}", "--prompts", PPO_FIXTURES + "/prompts_val.jsonl", "--out",
                  "{dir}/r6.jsonl", "--labeler", "fn", "--labeler_fn", "{dir}/broken.py:f"],
     "could not load {dir}/broken.py"),
    ("label.py",
     ["--policy", "{ckpt}", "--prompts", "{dir}/prompts_copy.jsonl", "--out",
      "{dir}/prompts_copy.jsonl"],
     "is the --prompts file"),
    ("label.py", ["--policy", "{ckpt}", "--prompts", PPO_FIXTURES + "/prompts_val.jsonl", "--out",
                  "{dir}/prompts_copy.jsonl"], "holds lines, but not one ranking"),
    ("evaluate.py", ["--policy_a", "{ckpt}", "--policy_b", "{ckpt}", "--judge_fn",
                     "{dir}/labelers.py:word", "--prompts", PPO_FIXTURES + "/prompts_val.jsonl",
                     "--out", "{dir}/eval2.json", "--max_prompts", "2", "--max_new_tokens", "4",
                     "--max_prompt_tokens", "32"],
     "returned 'high', not a number"),
    ("pipeline.py", ["--task", "lab", "--from_step", "nope", "--dry_run"],
     "--from_step nope is not a step"),
    ("pipeline.py", ["--task", "lab", "--out_dir", "{dir}/a_file", "--dry_run"],
     "--out_dir {dir}/a_file is a file"),
    # malformed lines under --strict (and files read strictly always), named file:line
    ("sft.py", ["--config", "tiny", "--data_dir", "{data}", "--train_file", "bad_demos.jsonl",
                "--strict", "true", "--out_dir",
                "{dir}/out_sft"], "{data}/bad_demos.jsonl:2: not valid JSON"),
    ("reward.py", ["--data_dir", "{data}", "--init_from", "scratch", "--train_files",
                   "bad_rankings.jsonl", "--val_files", "comparisons.jsonl", "--demo_file",
                   "sft_val.jsonl", "--strict", "true", "--out_dir", "{dir}/out_rm"],
     '{data}/bad_rankings.jsonl:2: "ranked" must be a list of at least two'),
    ("label.py", ["--policy", "{ckpt}", "--prompts", "{data}/bad_prompts.jsonl", "--out",
                  "{dir}/r2.jsonl", "--labeler", "fn", "--labeler_fn", "x.py:f", "--strict",
                  "true"],
     '{data}/bad_prompts.jsonl:2: no "prompt" field'),
    ("evaluate.py", ["--policy_a", "{ckpt}", "--policy_b", "{ckpt}", "--judge_fn", "x.py:f",
                     "--prompts", "{data}/bad_prompts.jsonl", "--out", "{dir}/eval.json"],
     '{data}/bad_prompts.jsonl:2: no "prompt"'),
]


@pytest.mark.parametrize("script, args, message", BAD_INPUTS,
                         ids=[f"{s}:{' '.join(a)[:50]}" for s, a, _ in BAD_INPUTS])
def test_bad_input_ends_in_one_line_naming_the_flag_or_file_line(world, monkeypatch, capsys,
                                                                 tmp_path, script, args,
                                                                  message):
    # the defaults (out/sft/ckpt.pt, data/hh_rlhf/...) do not exist here
    monkeypatch.chdir(tmp_path)
    code, err = run_tool(script, [a.format(**world) for a in args], monkeypatch, capsys)
    text = code if isinstance(code, str) else err
    assert code not in (0, None) and message.format(**world) in text, text
    assert "Traceback" not in err


def test_no_assert_checks_user_input():
    """`python -O` strips asserts, and a failed one reads like a bug: user input is checked
    with require() (lib/config.py) or an explicit exit, and nothing outside the tests uses
    assert at all."""
    offenders = []
    for folder, _, files in os.walk(REPO):
        if any(part in folder for part in ("tests", ".git", "mutants", "__pycache__")):
            continue
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                offenders += [f"{path}:{i}" for i, line in enumerate(open(path), 1)
                              if line.lstrip().startswith("assert ")]
    assert not offenders, offenders


def test_resuming_with_another_lora_rank_is_refused():
    state = {"optimizer": {}, "step": 3}
    # the same rank: fine
    check_resumable({**state, "lora": {"rank": 4}}, "last.pt", ("optimizer", "step"), "sft.py", 4)
    with pytest.raises(SystemExit,
                       match="last.pt was written with --lora_rank 4: resume with the same"):
        check_resumable({**state, "lora": {"rank": 4}}, "last.pt", ("optimizer", "step"),
                        "sft.py", 0)
    with pytest.raises(SystemExit, match="written with --lora_rank 0"):
        check_resumable({**state, "lora": None}, "last.pt", ("optimizer", "step"), "sft.py", 8)
    with pytest.raises(SystemExit, match="it holds no step"):
        check_resumable({"optimizer": {}}, "last.pt", ("optimizer", "step"), "sft.py")
