"""dpo.py: eq. (7) against a hand computation, sequence log-probabilities against a token-by-token loop, the
exact optimum of the micro-world (the same pi* = pi_ref exp(r / beta) / Z that PPO reaches), and train() learning a
synthetic preference."""
import contextlib
import copy
import itertools
import math

import pytest
import torch

import dpo
from conftest import synthetic_preferences, write_jsonl
from lib.checkpoints import save_checkpoint
from lib.tokens import EOS
from lib.tracking import read_metrics
from model import GPT, GPTConfig


def test_dpo_loss_against_a_hand_computation():
    beta = 0.5
    logps = dict(chosen=torch.tensor([-3.0, -1.0]), rejected=torch.tensor([-2.0, -4.0]),
                 ref_chosen=torch.tensor([-2.5, -2.0]), ref_rejected=torch.tensor([-2.0, -3.0]))
    loss, r_w, r_l = dpo.dpo_loss(logps["chosen"], logps["rejected"], logps["ref_chosen"], logps["ref_rejected"],
                                  beta)
    # pair 1: beta (-3 + 2.5) - beta (-2 + 2) = -0.25; pair 2: beta (-1 + 2) - beta (-4 + 3) = 1.0
    by_hand = (math.log(1 + math.exp(0.25)) + math.log(1 + math.exp(-1.0))) / 2  # -log sigmoid(z) = log(1 + e^-z)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert r_w.tolist() == [-0.25, 0.5] and r_l.tolist() == [0.0, -0.5]
    weighted, _, _ = dpo.dpo_loss(logps["chosen"], logps["rejected"], logps["ref_chosen"], logps["ref_rejected"], beta,
                                  weights=torch.tensor([3.0, 1.0]))
    assert abs(weighted.item() - (3 * math.log(1 + math.exp(0.25)) + math.log(1 + math.exp(-1.0))) / 4) < 1e-6


def test_sequence_logprobs_sum_the_response_tokens_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=EOS + 1)).eval()
    pairs = [([5, 6, 7], [8, 9, EOS], [10, EOS]), ([11], [12, 13, 14, 15], [16])]
    ids, attention_mask, response_mask = dpo.collate(pairs)
    got = dpo.sequence_logprobs(model, ids, attention_mask, response_mask)
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    for b, (prompt, response) in enumerate(seqs):
        tokens, expected = prompt + response, 0.0
        for t in range(len(prompt), len(tokens)):  # token t given tokens < t, one forward per token
            logits = model(torch.tensor([tokens[:t]]))[0, -1]
            expected += torch.log_softmax(logits, -1)[tokens[t]].item()
        assert abs(got[b].item() - expected) < 1e-4, (b, got[b].item(), expected)


def test_pair_logprobs_score_each_distinct_sequence_once_and_give_every_pairs_own():
    # every pair of a 4-way ranking and of another prompt's 3-way one: 9 pairs, 7 distinct sequences. Scored in
    # batches of 3 sequences, each side must equal its own pair scored alone.
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=EOS + 1)).eval()
    rankings = [([5, 6], [[8, EOS], [9, 9, EOS], [10, EOS], [11, 12, 13]]), ([7], [[8, EOS], [14, EOS], [15]])]
    pairs = [(p, ys[w], ys[l]) for p, ys in rankings for w, l in itertools.combinations(range(len(ys)), 2)]
    calls = []
    counting = lambda module, args: calls.append(args[0].shape[0])
    handle = model.register_forward_pre_hook(counting)
    chosen, rejected = dpo.pair_logprobs(model, pairs, "cpu", contextlib.nullcontext(), batch_size=3)
    handle.remove()
    assert sum(calls) == 7 and max(calls) <= 3
    for i, pair in enumerate(pairs):
        alone = dpo.sequence_logprobs(model, *dpo.collate([pair]))  # (2,): this pair's chosen, rejected
        torch.testing.assert_close(torch.stack([chosen[i], rejected[i]]), alone, atol=1e-5, rtol=1e-5)


# The micro-world of tests/test_optimum.py: 2 one-token prompts, every response of 2 tokens over 4 tokens.
V, R, BETA = 4, 2, 0.5
PROMPTS = torch.tensor([[0], [1]])
RESPONSES = torch.tensor(list(itertools.product(range(V), repeat=R)))  # (16, R)


def all_logps(policy):
    """log pi(y|x) (2, 16) of every response, by dpo.sequence_logprobs."""
    ids = torch.cat([PROMPTS.repeat_interleave(len(RESPONSES), 0), RESPONSES.repeat(len(PROMPTS), 1)], 1)  # (32, 3)
    return dpo.sequence_logprobs(policy, ids, torch.ones_like(ids), torch.ones(len(ids), R)).view(len(PROMPTS), -1)


def train_dpo_on_all_pairs(rewards, beta, steps=300, loss_beta=None):
    """Full-batch DPO on every pair (i, j) of every prompt, each order weighted by the Bradley-Terry probability
    sigmoid(r_i - r_j) that a labeler prefers it: the expected loss under preferences drawn from r."""
    torch.manual_seed(0)
    ref = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=V)).eval().requires_grad_(False)
    policy = copy.deepcopy(ref).requires_grad_(True)
    i, j = torch.triu_indices(len(RESPONSES), len(RESPONSES), 1)
    with torch.no_grad():
        ref_logps = all_logps(ref)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(steps):
        logps = all_logps(policy)
        loss = 0.0
        for x in range(len(PROMPTS)):
            p = torch.sigmoid(rewards[x, i] - rewards[x, j])  # P(i preferred to j)
            a, b, ra, rb = logps[x, i], logps[x, j], ref_logps[x, i], ref_logps[x, j]
            loss = loss + dpo.dpo_loss(torch.cat([a, b]), torch.cat([b, a]), torch.cat([ra, rb]), torch.cat([rb, ra]),
                                       loss_beta or beta, weights=torch.cat([p, 1 - p]))[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        log_star = torch.log_softmax(ref_logps + rewards / beta, dim=1)
        lp = all_logps(policy)
        start = float((ref_logps.exp() * (ref_logps - log_star)).sum(1).mean())
        return start, float((lp.exp() * (lp - log_star)).sum(1).mean())


def test_dpo_reaches_the_exact_optimum_of_the_kl_regularised_objective():
    rewards = torch.rand(2, len(RESPONSES), generator=torch.Generator().manual_seed(0)) * 2 - 1
    start, end = train_dpo_on_all_pairs(rewards, BETA)
    assert start > 0.3 and end < 0.01, (start, end)
    _, wrong = train_dpo_on_all_pairs(rewards, BETA, loss_beta=BETA * BETA)  # beta applied twice: another optimum
    assert wrong > 10 * end, (end, wrong)


def test_train_learns_a_synthetic_preference(tmp_path):
    """Chosen responses contain "banana": DPO's implicit reward learns to rank the validation pairs."""
    write_jsonl(tmp_path / "comparisons_train.jsonl", synthetic_preferences(96, seed=0))
    write_jsonl(tmp_path / "comparisons_val.jsonl", synthetic_preferences(24, seed=1))
    torch.manual_seed(0)
    base = save_checkpoint(str(tmp_path / "sft.pt"), GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)),
                           dpo.Config())
    cfg = dpo.Config(out_dir=str(tmp_path / "out"), data_dir=str(tmp_path), init_from=base, beta=0.1, device="cpu",
                     max_prompt_tokens=16, max_response_tokens=24, batch_size=16, max_steps=60, lr=1e-3,
                     warmup_steps=5, eval_interval=20)
    result = dpo.train(cfg)
    rows = [r for r in read_metrics(result["metrics_path"]) if "val/acc" in r]
    assert abs(rows[0]["val/loss"] - math.log(2)) < 1e-6  # at the start pi = pi_ref: every margin is 0
    assert result["val/acc"] >= 0.9 and result["val/loss"] < 0.5, result
