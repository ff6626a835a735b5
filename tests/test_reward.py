"""Reward model (reward.py): eq. (1) against references, score read at EOS, learning,
normalisation, data paths."""
import contextlib
import dataclasses
import itertools
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import reward
from conftest import REWARD_TINY, reward_tiny_config, synthetic_preferences, write_jsonl
from lib import responses
from lib.checkpoints import load_model, save_checkpoint
from lib.tokens import EOS, get_tokenizer, pad_left, pad_right
from lib.training import lr_at
from model import GPT, GPTConfig, ScalarGPT

# --------------------------------------------------------------------------------------------- loss

def test_preference_loss_matches_bce_and_hand_computation():
    r_w = torch.tensor([1.0, -0.5, 2.0, 0.0])
    r_l = torch.tensor([0.0, 0.5, -1.0, 0.0])
    ours = reward.preference_loss(r_w, r_l)
    bce = F.binary_cross_entropy_with_logits(r_w - r_l, torch.ones(4))
    hand = sum(-math.log(1 / (1 + math.exp(-(w - l))))
               for w, l in zip(r_w.tolist(), r_l.tolist())) / 4
    print(f"ours {ours.item():.6f} bce {bce.item():.6f} hand {hand:.6f}")
    torch.testing.assert_close(ours, bce)
    assert abs(ours.item() - hand) < 1e-6
    # K = 2: one pair per prompt, so passing prompt indices changes nothing
    torch.testing.assert_close(reward.preference_loss(r_w, r_l, torch.arange(4)), bce)


def test_k4_ranking_gives_6_pairs_scaled_by_1_over_c_k_2_once():
    # two prompts: K = 4 (6 pairs) and K = 2 (1 pair); each prompt's pairs are averaged,
    # then the prompts
    rankings = [("p", ["a", "b", "c", "d"]), ("q", ["e", "f"])]
    examples, counts = reward.tokenize_rankings(rankings, get_tokenizer(),
                                                reward.Config(**REWARD_TINY))
    assert [len(ex["pairs"]) for ex in examples] == [6, 1] and counts["pairs"] == 7
    assert examples[0]["pairs"] == list(itertools.combinations(range(4), 2))
    ids, attention_mask, winner, loser, prompt_index = reward.collate(examples)
    assert ids.shape[0] == 6 and prompt_index.tolist() == [0] * 6 + [1]
    scores = torch.randn(6)
    ours = reward.preference_loss(scores[winner], scores[loser], prompt_index)
    per_prompt = []
    for offset, k in ((0, 4), (4, 2)):
        pairs = list(itertools.combinations(range(k), 2))
        total = sum(-math.log(torch.sigmoid(scores[offset + w] - scores[offset + l]).item())
                    for w, l in pairs)
        per_prompt.append(total / math.comb(k, 2))
    hand = sum(per_prompt) / 2
    print(f"ours {ours.item():.6f} hand {hand:.6f}")
    assert abs(ours.item() - hand) < 1e-5
    # scaling twice (per-pair mean of the batch, or 1/C(K,2) on top of a mean) would
    # give something else
    assert abs(ours.item() - reward.preference_loss(scores[winner], scores[loser]).item()) > 1e-3


def test_ties_are_dropped_and_counted():
    rankings = [("p", ["a", "b", "a", "c"]), ("q", ["same", "same"])]
    examples, counts = reward.tokenize_rankings(rankings, get_tokenizer(),
                                                reward.Config(**REWARD_TINY))
    assert counts["ties"] == 2 and counts["pairs"] == 5 and counts["prompts"] == 1
    # "a" is one sequence, scored once; both of its pairs with "c" point to it
    assert len(examples[0]["seqs"]) == 3
    assert examples[0]["pairs"] == [(0, 1), (0, 2), (1, 0), (1, 2), (0, 2)]


def test_repeated_responses_scored_once_give_the_loss_and_gradient_of_scoring_each():
    # eq. (1) with every response of a ranking scored separately (the naive reading), against the
    # batches of tokenize_rankings + collate, where a repeated response is one sequence; a pair
    # pointing at the wrong sequence, or a lost repeat, changes the loss
    torch.manual_seed(0)
    cfg = reward.Config(**REWARD_TINY)
    model = ScalarGPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    enc = get_tokenizer()
    rankings = [("the sky is", ["blue", "green", "blue", "red", "green"]),
                ("two plus two", ["four", "five"]),
                ("name a fruit", ["pear", "pear", "plum", "pear"])]
    examples, counts = reward.tokenize_rankings(rankings, enc, cfg)
    assert [len(ex["seqs"]) for ex in examples] == [3, 2, 2] and counts["ties"] == 2 + 3
    ids, attention_mask, winner, loser, prompt_index = reward.collate(examples)
    assert ids.shape[0] == 7  # not the 11 responses
    scores = responses.score_sequences(model, ids, attention_mask)
    ours = reward.preference_loss(scores[winner], scores[loser], prompt_index)
    ours_grad = torch.autograd.grad(ours, list(model.parameters()))

    def score_alone(prompt, response):  # one response, one forward pass, no padding
        ids = torch.tensor([responses.rm_tokens(enc, prompt, response, cfg.max_prompt_tokens,
                                                cfg.max_response_tokens)])  # (1, T)
        return responses.score_sequences(model, ids, torch.ones_like(ids))[0]

    per_prompt = []
    for prompt, ranked in rankings:
        r = [score_alone(prompt, y) for y in ranked]
        pairs = itertools.combinations(range(len(ranked)), 2)
        losses = [-F.logsigmoid(r[w] - r[l]) for w, l in pairs if ranked[w] != ranked[l]]
        per_prompt.append(sum(losses) / len(losses))
    naive = sum(per_prompt) / len(per_prompt)
    naive_grad = torch.autograd.grad(naive, list(model.parameters()))
    print(f"ours {ours.item():.6f} naive {naive.item():.6f}")
    torch.testing.assert_close(ours, naive)
    for a, b in zip(ours_grad, naive_grad):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------- score at EOS

def test_last_token_index_any_padding_side():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert responses.last_token_index(mask).tolist() == [2, 4, 2, 4]


def test_last_token_index_stays_on_the_masks_device():
    """The positions are made on the mask's device (the meta device stands in for a GPU here)."""
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert responses.last_token_index(mask.to("meta")).device.type == "meta"
    assert responses.last_token_index(mask).tolist() == [1, 2]


def test_score_read_at_eos_whatever_the_padding():
    torch.manual_seed(0)
    model = ScalarGPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).eval()
    # scores of order 1, so differences show
    torch.nn.init.normal_(model.score_head.weight, std=1.0)
    enc = get_tokenizer()
    seq = responses.rm_tokens(enc, "\n\nHuman: hi there\n\nAssistant:", " Hello, how can I help?",
                              16, 24)
    assert seq[-1] == EOS
    with torch.no_grad():
        alone = model(torch.tensor([seq]))[0, -1]
        for left, right in [(0, 0), (3, 0), (0, 5), (7, 2), (1, 11)]:
            ids = torch.tensor([[EOS] * left + seq + [EOS] * right])
            attention_mask = torch.tensor([[0] * left + [1] * len(seq) + [0] * right])
            score = responses.score_sequences(model, ids, attention_mask)
            torch.testing.assert_close(score, alone[None], atol=1e-5, rtol=1e-5)
        # and in a mixed batch with a shorter sequence, both padding sides
        short = seq[:5] + [EOS]
        for pad in (pad_left, pad_right):
            ids, attention_mask = pad([seq, short])
            scores = responses.score_sequences(model, ids, attention_mask)
            torch.testing.assert_close(scores[0], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(scores[1], model(torch.tensor([short]))[0, -1], atol=1e-5,
                                       rtol=1e-5)
        # not vacuous: another position (or the mean) gives a different number
        full = model(torch.tensor([seq]))[0]
        assert (full[-2] - alone).abs() > 1e-3 and (full.mean() - alone).abs() > 1e-3


def test_cut_response_still_ends_with_eos():
    enc = get_tokenizer()
    seq = responses.rm_tokens(enc, "prompt", " one two three four five six seven eight", 16, 3)
    assert len(seq) == len(enc.encode_ordinary("prompt")) + 3 + 1 and seq[-1] == EOS


# ------------------------------------------------------------------------------------------ train()

@pytest.fixture(scope="module")
def trained_on_marker(tmp_path_factory):
    """The real train() on a synthetic preference: chosen responses contain "banana"."""
    tmp = tmp_path_factory.mktemp("marker")
    write_jsonl(tmp / "comparisons_train.jsonl", synthetic_preferences(320, seed=0))
    val = synthetic_preferences(64, seed=1)
    write_jsonl(tmp / "comparisons_val.jsonl", val)
    write_jsonl(tmp / "sft_val.jsonl",
                [{"prompt": r["prompt"], "response": r["chosen"]} for r in val])
    cfg = reward_tiny_config(tmp)
    return cfg, reward.train(cfg)


def test_reward_model_learns_synthetic_preference(trained_on_marker):
    cfg, result = trained_on_marker
    rows = [json.loads(line) for line in open(result["metrics_path"])]
    first = next(r for r in rows if "val/acc" in r)
    print(f"val acc {first['val/acc']:.3f} -> {result['val/acc']:.3f} in {result['steps']} steps, "
          f"val loss {first['val/loss']:.3f} -> {result['val/loss']:.3f}")
    assert result["steps"] == 40
    assert result["val/acc"] >= 0.95
    assert result["val/loss"] < first["val/loss"] - 0.3
    assert os.path.isfile(result["png_path"])
    assert os.path.isfile(os.path.join(cfg.out_dir, "config.json"))


def test_normalised_demonstrations_score_mean_zero(trained_on_marker):
    cfg, result = trained_on_marker
    reward_model, ckpt = load_model(result["ckpt_path"], kind="scalar")
    assert ckpt["kind"] == "scalar" and abs(ckpt["reward_shift"] - result["reward_shift"]) < 1e-9
    enc = get_tokenizer()
    demos = reward.read_demonstrations(os.path.join(cfg.data_dir, cfg.demo_file))
    budgets = {"max_prompt_tokens": cfg.max_prompt_tokens,
               "max_response_tokens": cfg.max_response_tokens}
    scores = [responses.score_texts(reward_model.eval(), budgets, enc, [p], [r],
                                    contextlib.nullcontext())[0]
              for p, r in demos]
    print(f"mean demo score after normalisation {sum(scores) / len(scores):+.2e} "
          f"(shift {result['reward_shift']:+.3f})")
    assert abs(sum(scores) / len(scores)) < 1e-4
    # the val chosen responses are the demonstrations here
    assert abs(result["val/chosen_mean"]) < 1e-4


def test_k_way_rankings_train_through_the_same_path(tmp_path):
    ranked = []
    for row in synthetic_preferences(24, seed=2):
        # best has the marker twice, then once, then none; one ranking has a duplicated
        # response (a tie)
        two = row["chosen"] + " banana"
        ranked.append({"prompt": row["prompt"],
                       "ranked": [two, row["chosen"], row["rejected"], " stone"]})
    ranked[0]["ranked"].append(ranked[0]["ranked"][2])
    write_jsonl(tmp_path / "ranked_train.jsonl", ranked)
    write_jsonl(tmp_path / "pairs_train.jsonl", synthetic_preferences(8, seed=3))
    write_jsonl(tmp_path / "comparisons_val.jsonl", ranked[1:5] + synthetic_preferences(4, seed=4))
    cfg = reward_tiny_config(tmp_path, train_files="ranked_train.jsonl, pairs_train.jsonl",
                             demo_file="comparisons_val.jsonl", batch_size=4, grad_accum=2)
    result = reward.train(cfg)
    counts = result["train_counts"]
    assert counts["rankings"] == 32 and counts["ties"] == 1
    # K=4 -> 6 pairs; the K=5 row 10 - 1 tie
    assert counts["pairs"] == 24 * 6 + (math.comb(5, 2) - 1 - 6) + 8
    assert result["steps"] == 8 and math.isfinite(result["val/loss"])
    assert result["val_counts"]["pairs"] == 4 * 6 + 4


def test_train_on_shared_hh_few_steps(hh_prepared, tmp_path):
    """3 steps on the shared HH data: the reported val/acc, val/loss and val/margin are those
    of a recount."""
    cfg = reward.Config(**{**REWARD_TINY, "block_size": 128, "max_prompt_tokens": 64,
                           "max_response_tokens": 32},
                        out_dir=str(tmp_path / "out"), data_dir=hh_prepared, init_from="scratch",
                        device="cpu", max_steps=3, eval_interval=3, batch_size=4, grad_accum=1)
    result = reward.train(cfg)
    assert result["steps"] == 3 and result["train_counts"]["pairs"] > 1000
    assert os.path.isfile(result["ckpt_path"]) and os.path.isfile(result["png_path"])
    # the reported validation metrics == a recount from the saved model's scores of each response
    # alone (no padding, no batching), over the validation pairs whose tokens differ: accuracy, eq.
    # (1) loss, margin
    model = load_model(result["ckpt_path"], kind="scalar")[0].eval()
    enc, r_w, r_l = get_tokenizer(), [], []
    with torch.no_grad():
        for row in map(json.loads, open(os.path.join(hh_prepared, "comparisons_val.jsonl"))):
            seqs = [responses.rm_tokens(enc, row["prompt"], row[k], cfg.max_prompt_tokens,
                                        cfg.max_response_tokens)
                    for k in ("chosen", "rejected")]
            if seqs[0] != seqs[1]:  # (identical once cut: a tie, not a pair)
                r_w.append(model(torch.tensor([seqs[0]]))[0, -1].item())  # the score at the EOS
                r_l.append(model(torch.tensor([seqs[1]]))[0, -1].item())
    n = len(r_w)
    acc = sum(w > l for w, l in zip(r_w, r_l)) / n
    loss = sum(math.log1p(math.exp(-(w - l))) for w, l in zip(r_w, r_l)) / n
    print(f"{n} validation pairs: acc {result['val/acc']:.4f} recount {acc:.4f}, "
          f"loss {result['val/loss']:.5f} recount {loss:.5f}")
    # not a degenerate model (all ties, all one way)
    assert n == result["val_counts"]["pairs"] and 0.1 < acc < 0.9
    assert result["val/acc"] == pytest.approx(acc, abs=1e-6)
    assert result["val/loss"] == pytest.approx(loss, abs=1e-4)
    assert result["val/margin"] == pytest.approx(sum(r_w) / n - sum(r_l) / n, abs=1e-4)


def test_missing_sft_checkpoint_says_run_sft_first(tmp_path):
    with pytest.raises(SystemExit, match="sft.py"):
        reward.train(reward.Config(init_from=str(tmp_path / "sft" / "ckpt.pt"),
                                   out_dir=str(tmp_path / "out")))



@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_after_a_crash_continues_exactly_as_an_uninterrupted_run(
        tmp_path, monkeypatch, lora_rank):
    # 6 steps (2 epochs of 3) == 3 + 3 resumed: the crash comes at step 5, between the checkpoints
    # of steps 3 and 6, so the resumed run drops the metrics row of step 4 and redoes it; it starts
    # in the second epoch (shuffle order) with dropout on (random state) and 2 micro-batches per
    # step. With LoRA: adapters and head on an SFT trunk, rebuilt on it for the resumed run.
    write_jsonl(tmp_path / "comparisons_train.jsonl", synthetic_preferences(24, seed=5))
    write_jsonl(tmp_path / "comparisons_val.jsonl", synthetic_preferences(8, seed=6))
    write_jsonl(tmp_path / "sft_val.jsonl",
                [{"prompt": "\n\nHuman: hi\n\nAssistant:", "response": " banana"}])
    kw = dict(epochs=2, batch_size=8, grad_accum=2, eval_interval=3, log_interval=1, dropout=0.1)
    if lora_rank:
        torch.manual_seed(0)
        shape = {k: REWARD_TINY[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
        kw.update(init_from=save_checkpoint(str(tmp_path / "sft.pt"), GPT(GPTConfig(**shape)),
                                            reward.Config()),
                  lora_rank=lora_rank, lora_dropout=0.1)
    full = reward.train(reward_tiny_config(tmp_path, out_dir=str(tmp_path / "full"), **kw))

    # train() asks lr_at(step) (0-based) at the start of each step
    def crash_at_step_5(step, *args):
        if step == 4:
            raise RuntimeError("simulated crash")
        return lr_at(step, *args)
    cfg = reward_tiny_config(tmp_path, out_dir=str(tmp_path / "resumed"), **kw)
    with monkeypatch.context() as m:
        m.setattr(reward, "lr_at", crash_at_step_5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            reward.train(cfg)
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    assert [json.loads(line)["step"] for line in open(metrics)] == list(range(5))
    resumed = reward.train(dataclasses.replace(cfg, resume=True))

    untimed = lambda path: [{k: v for k, v in json.loads(line).items() if k != "ms_per_step"}
                            for line in open(path)]
    # one row per step, equal floats
    assert untimed(resumed["metrics_path"]) == untimed(full["metrics_path"])
    assert resumed["steps"] == full["steps"] == 6
    assert resumed["reward_shift"] == full["reward_shift"]
    a = torch.load(full["ckpt_path"], weights_only=True)
    b = torch.load(resumed["ckpt_path"], weights_only=True)
    for name in a["model"]:  # the normalised reward model, bit for bit
        assert torch.equal(a["model"][name], b["model"][name]), name
    a = torch.load(os.path.join(tmp_path / "full", "last.pt"), weights_only=True)
    b = torch.load(os.path.join(cfg.out_dir, "last.pt"), weights_only=True)
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items())
