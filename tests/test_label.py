"""label.py: the human terminal labeler driven by scripted input (bad input, skip, quit, resume,
crash), the Bradley-Terry programmatic labeler against its probabilities, and reward-labeler
rankings that reward.py trains on."""
import collections
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import label
import reward
from conftest import REPO
from lib.checkpoints import save_checkpoint
from lib.config import UsageError, load_function
from lib.data import read_jsonl, read_prompts
from lib.responses import score_texts
from lib.tokens import get_tokenizer
from model import GPT, GPTConfig, ScalarGPT

PROMPTS = os.path.join(REPO, "tests", "fixtures", "ppo", "prompts_train.jsonl")
SHAPE = dict(block_size=96, n_layer=1, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny random policy and reward model (a reward.Config inside, so its token
    budgets are known)."""
    d = tmp_path_factory.mktemp("label_ckpts")
    torch.manual_seed(0)
    policy = save_checkpoint(str(d / "policy.pt"), GPT(GPTConfig(**SHAPE)), label.Config())
    rm = ScalarGPT(GPTConfig(**SHAPE))
    # scores of order 1: distinct, so rankings are strict
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)
    rm_cfg = reward.Config(max_prompt_tokens=48, max_response_tokens=16)
    return {"policy": policy,
            "reward": save_checkpoint(str(d / "rm.pt"), rm, rm_cfg, reward_shift=0.0)}


def config(ckpts, tmp_path, **kw):
    return label.Config(**{"policy": ckpts["policy"], "prompts": PROMPTS,
                           "out": str(tmp_path / "rankings.jsonl"), "k": 4, "max_new_tokens": 6,
                           "max_prompt_tokens": 48, "batch_size": 8, "max_prompts": 6,
                           "device": "cpu", "seed": 7, **kw})


def scripted(answers):
    """An input function that gives `answers` in order (an Exception instance is raised instead)."""
    answers, asked = list(answers), []

    def input_fn(question):
        asked.append(question)
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer
    input_fn.asked = asked
    return input_fn


def samples_of(cfg, prompts):
    """The responses main() samples for `prompts` (one generation batch, same seed):
    the test's oracle."""
    policy = GPT(GPTConfig(**SHAPE))
    policy.load_state_dict(torch.load(cfg.policy, weights_only=True)["model"])
    generator = torch.Generator().manual_seed(cfg.seed)
    return label.sample_responses_text(policy.eval(), get_tokenizer(), prompts, cfg.k, cfg,
                                       generator, torch.device("cpu"))


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------ parsing

def test_parse_ranking_accepts_rankings_best_first():
    assert label.parse_ranking("2 1 4 3", 4) == [1, 0, 3, 2]
    assert label.parse_ranking(" 2,1, 4,3 ", 4) == [1, 0, 3, 2]
    assert label.parse_ranking("2143", 4) == [1, 0, 3, 2]
    assert label.parse_ranking("10 1 2 3 4 5 6 7 8 9", 10) == [9] + list(range(9))


@pytest.mark.parametrize("text, message", [("2 x 4 3", "'x' is not a response number"),
                                           ("2 1 5 3", "5 is out of range"),
                                           ("0 1 2 3", "0 is out of range"),
                                           ("2 1 2 3", "2 appears twice"),
                                           ("2 1", "incomplete: 2 of 4"), ("213", "missing 4"),
                                           ("", "best first"), ("-1 2 3 4", "not a response")])
def test_parse_ranking_explains_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        label.parse_ranking(text, 4)


# ------------------------------------------------------------------------------------ human labeler

def test_human_labeler_reprompts_on_each_bad_input(capsys):
    responses = [" alpha", " beta", " gamma", " delta"]
    input_fn = scripted(["two one", "5 1 2 3", "1 1 2 3", "2 1", "?", "2 1 4 3"])
    assert label.HumanLabeler(input_fn)("\n\nHuman: hi\n\nAssistant:", responses) == [1, 0, 3, 2]
    out = capsys.readouterr().out
    assert len(input_fn.asked) == 6 and len(set(input_fn.asked)) == 1  # the same question each time
    for message in ("'two' is not a response number", "5 is out of range", "1 appears twice",
                    "incomplete: 2 of 4", "q  quit"):
        assert message in out
    assert all(f"[{i}]\n{r}" in out for i, r in enumerate(responses, 1))


def test_human_labeler_skip_quit_and_end_of_input():
    assert label.HumanLabeler(scripted(["s"]))("p", ["a", "b"]) is None
    for answer in ("q", EOFError(), KeyboardInterrupt()):
        with pytest.raises(label.Quit):
            label.HumanLabeler(scripted([answer]))("p", ["a", "b"])


def test_identical_responses_are_shown_once_and_ranked_together(capsys):
    input_fn = scripted(["1 2 3 4", "2 1 3"])
    ranking = label.HumanLabeler(input_fn)("p", [" same", " other", " same", " third"])
    out = capsys.readouterr().out
    assert out.count(" same") == 1 and "identical: sampled 2 of 4 times" in out and "[4]" not in out
    assert "4 is out of range" in out  # three distinct responses, numbered 1-3
    assert ranking == [1, 0, 2, 3]  # " other", then both " same", then " third"


def test_human_session_writes_exactly_the_rankings_given_and_resumes(ckpts, tmp_path, capsys):
    cfg = config(ckpts, tmp_path)
    prompts = read_prompts(PROMPTS, cfg.max_prompts)
    samples = samples_of(cfg, prompts)
    assert all(len(set(s)) == cfg.k for s in samples[:4]), "fixture assumption: distinct samples"
    # prompt 1 ranked after a bad answer, prompt 2 skipped, prompt 3 ranked, then quit at prompt 4
    summary = label.main(cfg, input_fn=scripted(["3 3 1 2", "4 3 2 1", "s", "2 4 1 3", "q"]))
    assert summary["ranked"] == 2 and summary["skipped"] == 1
    assert summary["stopped"] and summary["ties"] == 0
    rows = read_lines(cfg.out)
    fingerprint = label.policy_fingerprint([cfg.policy])
    assert rows == [{"prompt": prompts[0], "ranked": [samples[0][i] for i in (3, 2, 1, 0)],
                     "policy": fingerprint},
                    {"prompt": prompts[2], "ranked": [samples[2][i] for i in (1, 3, 0, 2)],
                     "policy": fingerprint}]
    assert "3 appears twice" in capsys.readouterr().out
    # a rerun skips the ranked prompts: it asks about prompt 2 (skipped before) first, then prompt 4
    summary = label.main(cfg, input_fn=scripted(["1 2 3 4", "s", "q"]))
    assert summary["already_ranked"] == 2 and summary["ranked"] == 1
    rows = read_lines(cfg.out)
    assert [r["prompt"] for r in rows] == [prompts[0], prompts[2], prompts[1]]
    # the rerun's one generation batch
    rerun_samples = samples_of(cfg, [prompts[i] for i in (1, 3, 4, 5)])
    assert rows[2]["ranked"] == rerun_samples[0]  # ranked "1 2 3 4"
    assert reward.read_rankings([cfg.out]) == [(r["prompt"], r["ranked"]) for r in rows]


def test_crash_after_n_rankings_leaves_n_parseable_lines(ckpts, tmp_path):
    cfg = config(ckpts, tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        answers = ["1 2 3 4", "4 3 2 1", "2 1 3 4", RuntimeError("simulated crash")]
        label.main(cfg, input_fn=scripted(answers))
    rows = read_lines(cfg.out)
    assert len(rows) == 3 and all(len(r["ranked"]) == 4 for r in rows)
    examples, counts = reward.tokenize_rankings(reward.read_rankings([cfg.out]), get_tokenizer(),
                                                reward.Config())
    assert counts["rankings"] == 3 and counts["pairs"] == 18


def test_all_identical_responses_are_skipped_without_asking(ckpts, tmp_path):
    # greedy: the K samples are the same
    cfg = config(ckpts, tmp_path, temperature=0.0, max_prompts=3)
    never = scripted([AssertionError("the labeler should not be asked")])
    summary = label.main(cfg, input_fn=never)
    assert summary["ranked"] == 0 and summary["skipped"] == 3 and summary["all_identical"] == 3


def test_k_samples_are_shared_out_over_several_policies(ckpts, tmp_path):
    """--policy A,B: the first policy gives ceil(K/2) of the K responses and the second the rest (a
    second round ranks the new policy against the old one). Greedy decoding makes each policy's
    answer one known text."""
    torch.manual_seed(1)
    other = save_checkpoint(str(tmp_path / "other.pt"), GPT(GPTConfig(**SHAPE)), label.Config())
    prompts = [json.loads(line)["prompt"] for line in open(PROMPTS)][:3]
    enc, device = get_tokenizer(), torch.device("cpu")
    cfg = config(ckpts, tmp_path, temperature=0.0, k=5)
    greedy = {}
    for name, path in (("a", ckpts["policy"]), ("b", other)):
        model = label.load_model(path, kind="gpt", device="cpu")[0].eval()
        samples = label.sample_responses_text(model, enc, prompts, 1, cfg, None, device)
        greedy[name] = [r[0] for r in samples]
    assert greedy["a"] != greedy["b"], "fixture assumption: the two policies answer differently"
    cfg = config(ckpts, tmp_path, temperature=0.0, k=5, policy=f"{ckpts['policy']},{other}",
                 labeler="fn", labeler_fn=f"{__file__}:length_score", max_prompts=3)
    label.main(cfg)
    rows = {r["prompt"]: r["ranked"] for r in read_lines(cfg.out)}
    for i, prompt in enumerate(prompts):
        assert sorted(rows[prompt]) == sorted([greedy["a"][i]] * 3 + [greedy["b"][i]] * 2)
    with pytest.raises(UsageError, match="names 3 checkpoints; give 1 to k = 2"):
        label.main(config(ckpts, tmp_path, k=2, policy=",".join([ckpts["policy"]] * 3)))


def test_rankings_per_prompt_ranks_fresh_samples_and_resumes(ckpts, tmp_path):
    cfg = config(ckpts, tmp_path, labeler="fn", labeler_fn=f"{__file__}:length_score",
                 max_prompts=3, rankings_per_prompt=2)
    assert label.main(cfg)["ranked"] == 6
    rows = read_lines(cfg.out)
    prompts = {r["prompt"] for r in rows}
    assert collections.Counter(r["prompt"] for r in rows) == {p: 2 for p in prompts}
    assert len({r["prompt"] for r in rows}) == 3
    assert rows[0]["prompt"] == rows[3]["prompt"]
    assert rows[0]["ranked"] != rows[3]["ranked"], "not fresh samples"
    # a rerun asking for more adds only the missing third ranking of each prompt
    cfg.rankings_per_prompt = 3
    summary = label.main(cfg)
    assert summary["already_ranked"] == 6 and summary["ranked"] == 3
    assert len(read_lines(cfg.out)) == 9


def test_a_file_of_other_checkpoints_is_refused_and_kept(ckpts, tmp_path):
    """A policy retrained at the same path (or an earlier run's file): its rankings are not
    continued as if they were this policy's, and the file is left as it was. The same checkpoints
    continue it; lines written without a fingerprint count as they are."""
    path = tmp_path / "policy.pt"
    path.write_bytes(open(ckpts["policy"], "rb").read())
    cfg = config(ckpts, tmp_path, policy=str(path), labeler="fn",
                 labeler_fn=f"{__file__}:length_score", max_prompts=3)
    assert label.main(cfg)["ranked"] == 3
    fingerprint = hashlib.sha256(hashlib.sha256(path.read_bytes()).digest()).hexdigest()[:16]
    assert {row["policy"] for row in read_lines(cfg.out)} == {fingerprint}
    assert label.main(cfg)["already_ranked"] == 3  # the same checkpoint continues its file

    torch.manual_seed(2)  # retrained: other weights at the same path
    save_checkpoint(str(path), GPT(GPTConfig(**SHAPE)), label.Config())
    before = open(cfg.out, "rb").read()
    cfg.max_prompts = 6
    message = (f"holds 3 rankings of samples from other checkpoints than --policy {path} "
               f"\\(fingerprint {fingerprint} in the file")
    with pytest.raises(SystemExit, match=message):
        label.main(cfg)
    assert open(cfg.out, "rb").read() == before

    old = tmp_path / "old.jsonl"  # a file from before fingerprints (or written by hand)
    old.write_text("".join(json.dumps({"prompt": row["prompt"], "ranked": row["ranked"]}) + "\n"
                           for row in read_lines(cfg.out)))
    summary = label.main(label.Config(**{**cfg.__dict__, "out": str(old)}))
    assert summary["already_ranked"] == 3 and summary["ranked"] == 3
    # a hand-edited fingerprint of another type: the message, not a traceback
    edited = tmp_path / "edited.jsonl"
    edited.write_text(json.dumps({"prompt": "p", "ranked": ["a", "b"], "policy": ["x"]}) + "\n")
    with pytest.raises(SystemExit, match="holds 1 rankings of samples from other checkpoints"):
        label.main(label.Config(**{**cfg.__dict__, "out": str(edited)}))
    swapped = label.policy_fingerprint([ckpts["policy"], str(path)])
    assert label.policy_fingerprint([str(path), ckpts["policy"]]) != swapped


def length_score(prompt, response):
    """A labeling function for the tests: longer is better."""
    return float(len(response))


def test_a_torn_last_line_is_set_aside_and_labelling_resumes_past_it(ckpts, tmp_path):
    """What a kill mid-write leaves: a complete ranking, then half a line. The rerun moves the
    fragment to --out.torn, redoes that prompt, and leaves a file every line of which
    reward.py reads strictly."""
    cfg = config(ckpts, tmp_path, labeler="fn", labeler_fn=f"{__file__}:length_score",
                 max_prompts=3)
    prompts = read_prompts(PROMPTS, 3)
    first = json.dumps({"prompt": prompts[0], "ranked": ["x", "y"]}) + "\n"
    torn = json.dumps({"prompt": prompts[1], "ranked": ["x", "y"]})[:25]
    with open(cfg.out, "w") as f:
        f.write(first + torn)
    summary = label.main(cfg)
    assert summary["already_ranked"] == 1 and summary["ranked"] == 2
    assert open(cfg.out + ".torn").read() == torn + "\n"
    assert open(cfg.out).read().startswith(first)
    rows = read_jsonl(cfg.out, "rankings", {"prompt": str, "ranked": list}, strict=True)
    assert [r["prompt"] for r in rows] == prompts
    expected = [(r["prompt"], r["ranked"]) for r in rows[1:]]
    assert reward.read_rankings([cfg.out], strict=True)[1:] == expected


def test_a_second_labeler_on_the_same_file_is_refused(ckpts, tmp_path):
    cfg = config(ckpts, tmp_path, labeler="fn", labeler_fn=f"{__file__}:length_score",
                 max_prompts=2)
    with label.one_writer(cfg.out):  # the first labeler, still at work
        with pytest.raises(SystemExit, match="another label.py is writing .*rankings.jsonl"):
            label.main(cfg)
    assert not os.path.exists(cfg.out)  # the refused one wrote nothing
    assert label.main(cfg)["ranked"] == 2  # the lock went with the first labeler


def test_a_killed_labeler_leaves_no_stale_lock(tmp_path):
    """kill -9 gives a process no chance to clean up: the kernel drops its flock, so the
    next labeler starts."""
    out = str(tmp_path / "rankings.jsonl")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import time, label\nwith label.one_writer({out!r}):\n    print('locked', flush=True)\n"
                               f"    time.sleep(120)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match="another label.py"):
            with label.one_writer(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert os.path.exists(out + ".lock")  # the lock file stays; the lock on it does not
    with label.one_writer(out):
        pass


# ----------------------------------------------------------------------------------- score labelers

def test_noise_zero_reproduces_the_exact_order():
    rng = random.Random(0)
    for _ in range(50):
        scores = [rng.gauss(0, 1) for _ in range(rng.randint(2, 9))]
        assert label.rank_by_scores(scores, 0.0, rng) == sorted(range(len(scores)),
                                                                key=lambda i: -scores[i])
    # equal scores: either order, both seen; everything else exact
    seen = {tuple(label.rank_by_scores([1.0, 3.0, 1.0], 0.0, rng)) for _ in range(50)}
    assert seen == {(1, 0, 2), (1, 2, 0)}


def test_noisy_labeler_agreement_matches_bradley_terry():
    scores, noise, draws = [0.0, 0.4, 1.0, 2.5], 0.8, 20000
    labeler = label.ScoreLabeler(lambda prompt, responses: scores, noise=noise, seed=1)
    above = {pair: 0 for pair in itertools.combinations(range(4), 2)}  # i above j, for i < j
    for _ in range(draws):
        position = {r: p for p, r in enumerate(labeler("p", ["a", "b", "c", "d"]))}
        for i, j in above:
            above[i, j] += position[i] < position[j]
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    for (i, j), n in above.items():
        p = sigmoid((scores[i] - scores[j]) / noise)  # Bradley-Terry: P(i above j)
        se = math.sqrt(p * (1 - p) / draws)
        print(f"pair {i},{j}: measured {n / draws:.4f} Bradley-Terry {p:.4f}")
        assert abs(n / draws - p) < 4 * se
    # the reported agreement with the exact order: mean over pairs of sigmoid(|s_i - s_j| / noise)
    expected = sum(sigmoid(abs(scores[i] - scores[j]) / noise) for i, j in above) / len(above)
    assert labeler.pairs == 6 * draws
    assert abs(labeler.agree / labeler.pairs - expected) < 0.01


def test_fn_labeler_from_a_file_with_factory_and_noise(ckpts, tmp_path):
    path = tmp_path / "gold.py"
    path.write_text("def count(letter):\n"
                    "    return lambda prompt, response: response.count(letter)\n")
    exact = label.main(config(ckpts, tmp_path, labeler="fn", labeler_fn=f"{path}:count",
                              labeler_arg="e"))
    rows = read_lines(exact["out"])
    assert exact["ranked"] == len(rows) == 6 and exact["agreement_with_exact"] == 1.0
    counts = [[r.count("e") for r in row["ranked"]] for row in rows]
    assert all(c == sorted(c, reverse=True) for c in counts)
    ties = sum(a.count("e") == b.count("e")
               for row in rows for a, b in itertools.combinations(row["ranked"], 2))
    assert exact["ties"] == ties and exact["agreement_pairs"] == 6 * 6 - ties
    noisy = label.main(config(ckpts, tmp_path, labeler="fn", labeler_fn=f"{path}:count",
                              labeler_arg="e", label_noise=100.0,
                              out=str(tmp_path / "noisy.jsonl")))
    assert noisy["agreement_with_exact"] < 0.9  # nearly a coin flip at temperature 100


def test_bad_labeler_fn_gives_a_clear_message(tmp_path):
    (tmp_path / "f.py").write_text("x = 3\n")
    with pytest.raises(SystemExit, match="expected path/to/file.py:NAME"):
        load_function("nocolon")
    with pytest.raises(SystemExit, match="defines no 'score'"):
        load_function(f"{tmp_path / 'f.py'}:score")
    with pytest.raises(SystemExit, match="is not callable"):
        load_function(f"{tmp_path / 'f.py'}:x")


def test_reward_labeler_rankings_train_reward_py(ckpts, tmp_path):
    cfg = config(ckpts, tmp_path, labeler="reward", reward_ckpt=ckpts["reward"], max_prompts=8)
    summary = label.main(cfg)
    assert summary["ranked"] == 8 and summary["agreement_with_exact"] == 1.0
    rm = ScalarGPT(GPTConfig(**SHAPE))
    rm.load_state_dict(torch.load(ckpts["reward"], weights_only=True)["model"])
    enc = get_tokenizer()
    for row in read_lines(cfg.out):  # best first by the reward model's own scoring
        budgets = {"max_prompt_tokens": 48, "max_response_tokens": 16}
        scores = [score_texts(rm.eval(), budgets, enc, [row["prompt"]], [r],
                              contextlib.nullcontext())[0]
                  for r in row["ranked"]]
        assert scores == sorted(scores, reverse=True)
    result = reward.train(reward.Config(**SHAPE, max_prompt_tokens=48, max_response_tokens=16,
                                        init_from="scratch", data_dir=str(tmp_path),
                                        train_files="rankings.jsonl", val_files="rankings.jsonl",
                                        demo_file="rankings.jsonl",
                                        out_dir=str(tmp_path / "rm_out"), batch_size=4,
                                        grad_accum=1, max_steps=2, warmup_steps=1, eval_interval=2,
                                        device="cpu"))
    assert result["train_counts"]["rankings"] == 8 and result["train_counts"]["pairs"] == 8 * 6
    assert os.path.isfile(result["ckpt_path"]) and math.isfinite(result["val/loss"])
