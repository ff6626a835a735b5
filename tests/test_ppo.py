"""PPO (ppo.py): each piece of math against a reference written here, rollout/update
consistency, learning on a programmatic reward, KL control, and train() end to end with
checkpoint, plot and resume."""
import copy
import dataclasses
import json
import math
import os
import time

import numpy as np
import pytest
import torch

import lib.ddp
import ppo
from conftest import (
    GAMMA,
    KL_COEF,
    LAM,
    PPO_FIXTURES,
    PPO_TINY,
    PROMPTS,
    ROLLOUT_SHAPE,
    TEMPERATURE,
    GradRecorder,
    NoSyncRecorder,
    RewardRecorder,
    assert_close_grads,
    gradients,
    hand_length,
    last_output,
    ppo_models,
    ppo_tiny_config,
    ragged_mask,
    ragged_policy,
    scalar_model,
)
from lib.checkpoints import load_model, save_checkpoint
from lib.config import UsageError
from lib.responses import (
    policy_logprobs,
    response_mask_from_eos,
    sample_responses,
    score_responses,
    score_sequences,
)
from lib.tokens import EOS, get_tokenizer, pad_left, pad_right
from model import GPT, GPTConfig, ScalarGPT, token_logprobs

# --------------------------------------------------------------------------------------------- math

def test_gae_matches_naive_loop():
    torch.manual_seed(0)
    lengths, T, gamma, lam = [5, 1, 7, 3], 7, 0.9, 0.8
    mask = ragged_mask(lengths, T)
    rewards, values = torch.randn(4, T), torch.randn(4, T)  # garbage on padding on purpose
    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma, lam)
    # A_t = sum_l (gamma lam)^l delta_{t+l}, V = 0 after the last token
    for i, L in enumerate(lengths):
        v = lambda t: values[i, t].item() if t < L else 0.0
        for t in range(L):
            delta = lambda s: rewards[i, s].item() + gamma * v(s + 1) - v(s)
            ref = sum((gamma * lam) ** l * delta(t + l) for l in range(L - t))
            assert abs(advantages[i, t].item() - ref) < 1e-5, (i, t, advantages[i, t].item(), ref)
            assert abs(returns[i, t].item() - (ref + values[i, t].item())) < 1e-5
        assert torch.all(advantages[i, L:] == 0) and torch.all(returns[i, L:] == 0), \
            "padding must get nothing"


def test_gae_of_one_token_responses_is_reward_minus_value():
    """T = 1 (max_new_tokens 1): A = r - V (nothing after the last token), returns = r."""
    rewards, values = torch.tensor([[0.5], [-1.0]]), torch.tensor([[0.2], [0.3]])
    advantages, returns = ppo.compute_gae(rewards, values, torch.ones(2, 1), gamma=0.9, lam=0.7)
    assert advantages[:, 0].tolist() == pytest.approx([0.3, -1.3])
    assert returns[:, 0].tolist() == pytest.approx([0.5, -1.0])


def test_whiten_gives_masked_mean_zero_variance_one():
    torch.manual_seed(0)
    mask = ragged_mask([6, 2, 4], 6)
    x = torch.randn(3, 6) * 5 + 3
    w = ppo.whiten(x, mask)
    real = w[mask.bool()]
    print(f"mean {real.mean().item():.2e} var {real.var(unbiased=False).item():.6f}")
    assert abs(real.mean().item()) < 1e-5 and abs(real.var(unbiased=False).item() - 1) < 1e-4
    assert torch.all(w[~mask.bool()] == 0)


def test_whiten_of_equal_values_is_zero_not_nan():
    """All advantages equal (variance 0): whitened to 0 (the eps keeps 1/sqrt finite), padding 0."""
    x, mask = torch.full((2, 3), 0.7), torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert ppo.whiten(x, mask).tolist() == [[0.0] * 3] * 2


def test_policy_loss_hand_computed_clipping():
    # ratio = exp(logprobs - old): 1.5 (clipped to 1.2 for A > 0), 0.5 (clipped to 0.8 for A < 0),
    # and the two cases where min() keeps the unclipped term, plus ratio 1.1 inside the range; the
    # 6th is padding.
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1, 3.0]])
    advantages = torch.tensor([[2.0, -1.0, -1.0, 3.0, 1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    old = torch.zeros(1, 6)
    loss, clipfrac, approx_kl = ppo.ppo_policy_loss(ratios.log(), old, advantages, mask,
                                                    cliprange=0.2)
    # -min(r A, clip(r) A): 1.2 * 2 | 0.8 * -1 | 1.5 * -1 (unclipped is worse)
    #                       | 0.5 * 3 (unclipped) | 1.1
    objective = [1.2 * 2.0, 0.8 * -1.0, 1.5 * -1.0, 0.5 * 3.0, 1.1 * 1.0]
    assert abs(loss.item() - (-sum(objective) / 5)) < 1e-6
    assert abs(clipfrac.item() - 2 / 5) < 1e-6  # the first two are clipped
    r = ratios[0, :5]
    assert abs(approx_kl.item() - (r - 1 - r.log()).mean().item()) < 1e-6


def test_policy_loss_ratio_is_new_over_old_probability_with_nonzero_old_logprobs():
    """The hand-computed clipping cases with old log-probabilities that are not 0:
    ratio = exp(new - old)."""
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1]])
    advantages = torch.tensor([[2.0, -1.0, -1.0, 3.0, 1.0]])
    old = torch.tensor([[-2.0, -0.3, -1.1, -4.0, -0.7]])
    loss, clipfrac, approx_kl = ppo.ppo_policy_loss(old + ratios.log(), old, advantages,
                                                    torch.ones(1, 5), 0.2)
    # min(r A, clip(r) A), as in test_policy_loss_hand_computed_clipping
    objective = [1.2 * 2.0, 0.8 * -1.0, 1.5 * -1.0, 0.5 * 3.0, 1.1 * 1.0]
    assert loss.item() == pytest.approx(-sum(objective) / 5, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 5)
    kl = sum(r - 1 - math.log(r) for r in ratios[0].tolist()) / 5
    assert approx_kl.item() == pytest.approx(kl, abs=1e-6)


def test_policy_loss_gradient_vanishes_where_clipped():
    logprobs = torch.tensor([[1.5, 0.5, 1.1]]).log().requires_grad_()
    advantages = torch.tensor([[2.0, -1.0, 1.0]])
    loss, _, _ = ppo.ppo_policy_loss(logprobs, torch.zeros(1, 3), advantages, torch.ones(1, 3), 0.2)
    loss.backward()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 1] == 0 and logprobs.grad[0, 2] != 0


def test_value_loss_clips_as_specified():
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.1, -0.5, 9.0]])
    returns = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = ppo.ppo_value_loss(values, old, returns, mask, cliprange_value=0.2)
    # clipped values 0.2, 0.1, -0.2; max of squared errors:
    # (0.2-1)^2 > (0.5-1)^2 | both 0.81 | 1.5^2 > 1.2^2
    expected = 0.5 * ((0.8 ** 2) + (0.9 ** 2) + (1.5 ** 2)) / 3
    assert abs(loss.item() - expected) < 1e-6
    assert abs(clipfrac.item() - 1 / 3) < 1e-6  # only the first uses the clipped value


def test_value_loss_clips_values_within_cliprange_of_nonzero_old_values_on_both_sides():
    """V_clip = V_old + clip(V - V_old, -0.2, 0.2) around old values that are not 0; the loss takes
    the larger squared error. Entry 1 moved down too far and its clipped error is the larger,
    entry 5 moved up too far and likewise; entries 2 and 4 moved too far but the unclipped error
    is larger; entry 3 moved within the range."""
    old = torch.tensor([[1.0, -1.0, 2.0, 0.5, 0.5]])
    values = torch.tensor([[0.5, -0.3, 2.1, 1.5, 1.0]])
    returns = torch.tensor([[0.0, -2.0, 5.0, 0.0, 3.0]])
    loss, clipfrac = ppo.ppo_value_loss(values, old, returns, torch.ones(1, 5), cliprange_value=0.2)
    # clipped values 0.8, -0.8, 2.1, 0.7, 0.7: max((V - R)^2, (V_clip - R)^2)
    errors = [max(0.5 ** 2, 0.8 ** 2), max(1.7 ** 2, 1.2 ** 2), 2.9 ** 2, max(1.5 ** 2, 0.7 ** 2),
              max(2.0 ** 2, 2.3 ** 2)]
    assert loss.item() == pytest.approx(0.5 * sum(errors) / 5, abs=1e-5)
    assert clipfrac.item() == pytest.approx(2 / 5)


def test_kl_reward_puts_score_on_last_real_token():
    torch.manual_seed(0)
    mask = ragged_mask([3, 5, 1], 5)
    scores = torch.tensor([1.0, -2.0, 0.5])
    logprobs, ref_logprobs = torch.randn(3, 5), torch.randn(3, 5)
    rewards, kl = ppo.compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    expected = -0.1 * (logprobs - ref_logprobs) * mask
    for i, last in enumerate([2, 4, 0]):
        expected[i, last] += scores[i]
    torch.testing.assert_close(rewards, expected)
    assert torch.all(rewards[~mask.bool()] == 0) and torch.all(kl[~mask.bool()] == 0)
    # policy == ref: the KL part is exactly zero, only the scores remain
    rewards, kl = ppo.compute_rewards(scores, logprobs, logprobs.clone(), mask, kl_coef=0.1)
    assert torch.all(kl == 0) and torch.equal(rewards.sum(1), scores)


def test_kl_reward_takes_scores_of_another_float_dtype():
    """A float64 score (or bf16 log-probabilities) is added in the rewards' dtype, not refused."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    ref_logprobs = torch.full((2, 3), -1.0)
    scores = torch.tensor([1.0, 2.0], dtype=torch.float64)
    rewards, _ = ppo.compute_rewards(scores, logprobs, ref_logprobs, mask, 0.5)
    assert rewards.dtype == torch.float32
    assert rewards.tolist() == [[0.0, 1.5, 0.0], [-0.25, -0.25, 1.75]]


def test_adaptive_kl_controller_proportional_and_clipped():
    # Ziegler et al. 2019: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon
    assert ppo.adaptive_kl_coef(0.1, 6.6, 6.0, 100, 10) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert ppo.adaptive_kl_coef(0.1, 60.0, 6.0, 100, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert ppo.adaptive_kl_coef(0.1, 0.0, 6.0, 100, 10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))


def test_response_mask_keeps_first_eos_and_nothing_after():
    responses = torch.tensor([[5, 6, EOS, EOS, EOS], [EOS, EOS, EOS, EOS, EOS], [1, 2, 3, 4, 5]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
    assert torch.equal(response_mask_from_eos(responses), expected)


def test_entropy_sample_estimate_matches_exact_entropy():
    # rollout() logs the entropy as the mean of -log pi(y) over sampled tokens; check it estimates
    # the exact one
    torch.manual_seed(0)
    logits = torch.randn(4, 8, 5) * 2
    probs = torch.softmax(logits / 0.7, -1)
    exact = -(probs * probs.log()).sum(-1)  # (4, 8)
    samples = torch.multinomial(probs.view(-1, 5), 4000, replacement=True)  # (32, 4000)
    estimate = -probs.view(-1, 5).log().gather(1, samples).mean(1)  # what rollout() logs
    assert (estimate - exact.view(-1)).abs().max() < 0.1


# ------------------------------------------------------------------------------------------- models

def test_policy_logprobs_match_full_forward_token_logprobs():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    ids, attention_mask = pad_left([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    P = 4  # the last 3 columns are the "response"
    ours = ppo.policy_logprobs(policy, ids, attention_mask, P, temperature=0.7)
    logits = policy(ids, attention_mask)  # (B, T, V), the model's own path
    ref = token_logprobs(logits[:, P - 1:-1], ids[:, P:], temperature=0.7)
    print(f"max diff {(ours - ref).abs().max().item():.2e}")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_score_read_at_eos_appended_when_missing():
    torch.manual_seed(0)
    rm = ScalarGPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64))
    # row 0: left pad, EOS; row 1: no EOS
    ids = torch.tensor([[EOS, 7, 8, 9, EOS, EOS], [5, 6, 7, 1, 2, 3]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    scores = score_responses(rm, ids, attention_mask, has_eos=torch.tensor([True, False]))
    s0 = score_sequences(rm, torch.tensor([[7, 8, 9, EOS]]), torch.ones(1, 4, dtype=torch.long))
    s1 = score_sequences(rm, torch.tensor([[5, 6, 7, 1, 2, 3, EOS]]),
                         torch.ones(1, 7, dtype=torch.long))
    torch.testing.assert_close(scores, torch.cat([s0, s1]), atol=1e-5, rtol=0)


def letters():
    """Token ids of "a", "b", "c", "d" (single bytes in GPT-2's BPE)."""
    return [get_tokenizer().encode_ordinary(c)[0] for c in "abcd"]


@pytest.fixture(scope="session")
def letters_policy(tmp_path_factory):
    """A tiny 'SFT' policy: after any fixture prompt it writes 1-10 random letters from
    a, b, c, d then EOS. Trained here in a few seconds so a programmatic reward has signal at
    initialisation (a random GPT spreads its samples over all 50257 tokens), and so rollouts mix
    early EOS with none."""
    enc = get_tokenizer()
    prompts = [ppo.encode_prompt(enc, json.loads(line)["prompt"], PPO_TINY["max_prompt_tokens"])
               for line in open(os.path.join(PPO_FIXTURES, "prompts_train.jsonl"))]
    torch.manual_seed(0)
    policy = GPT(GPTConfig(n_layer=PPO_TINY["n_layer"], n_head=PPO_TINY["n_head"],
                           n_embd=PPO_TINY["n_embd"], block_size=PPO_TINY["block_size"]))
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    ids_letters = torch.tensor(letters())
    # a response is at most 10 letters + EOS; left padding puts every response at the end of its row
    R = 11
    for step in range(60):
        rows, n_resp = [], []
        for i in torch.randint(len(prompts), (16,)).tolist():
            n = int(torch.randint(1, 11, ()))
            rows.append(prompts[i] + ids_letters[torch.randint(4, (n,))].tolist() + [EOS])
            n_resp.append(n + 1)
        ids, attention_mask = pad_left(rows)
        logprobs = ppo.policy_logprobs(policy, ids, attention_mask, ids.size(1) - R, 1.0)  # (16, R)
        target_mask = torch.arange(R)[None, :] >= R - torch.tensor(n_resp)[:, None]  # (16, R)
        loss = -ppo.masked_mean(logprobs, target_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"letters policy: final loss {loss.item():.3f} (uniform over 4 letters ~1.39 + EOS)")
    path = str(tmp_path_factory.mktemp("letters") / "policy.pt")
    save_checkpoint(path, policy, ppo.Config())
    return path


def count_a(queries, query_mask, responses, response_mask):
    """Programmatic reward: how many response tokens are the letter "a"."""
    return ((responses == letters()[0]) & response_mask).sum(1).float()


def test_rollout_logprobs_are_what_the_update_recomputes(letters_policy):
    """ratio == 1 on the first minibatch: left-padded prompts, temperature != 1, early EOS
    in the batch."""
    cfg = ppo.Config(**{**PPO_TINY, "temperature": 0.7, "max_new_tokens": 8, "minibatch_size": 4})
    policy, _ = load_model(letters_policy, "gpt")
    ref_policy = copy.deepcopy(policy)
    torch.manual_seed(0)
    critic = ScalarGPT(policy.config)
    enc = get_tokenizer()
    prompts = [ppo.encode_prompt(enc, json.loads(line)["prompt"], cfg.max_prompt_tokens)
               for line in open(os.path.join(PPO_FIXTURES, "prompts_train.jsonl"))][:8]
    queries, query_mask = pad_left(prompts)
    assert len({len(p) for p in prompts}) > 1, "need left padding"
    batch, _ = ppo.rollout(ppo_models(policy, ref_policy, critic, reward_fn=count_a), queries,
                           query_mask, cfg, 0.1, generator=torch.Generator().manual_seed(0))
    lengths = batch["response_mask"].sum(1)
    print(f"response lengths {lengths.tolist()} of {batch['responses'].size(1)}")
    assert (lengths < batch["responses"].size(1)).any()
    assert batch["has_eos"].any() and not batch["has_eos"].all()
    assert torch.all(batch["kl"] == 0), "policy == ref: zero KL"
    for idx in (torch.tensor([5, 0, 3, 6]), torch.arange(8)):
        mb = ppo.minibatch(batch, idx)
        logprobs = ppo.policy_logprobs(policy, mb["ids"], mb["attention_mask"], mb["n_query"],
                                       cfg.temperature)
        ratio = torch.exp(logprobs - mb["logprobs"])[mb["response_mask"]]
        print(f"max |ratio - 1| = {(ratio - 1).abs().max().item():.2e}")
        assert (ratio - 1).abs().max() < 1e-5


@pytest.mark.parametrize("ptx_coef", [0.0, 0.5])
def test_gradient_accumulation_gives_the_gradient_of_the_whole_minibatch(letters_policy, ptx_coef):
    """One minibatch of 8 ragged responses (and a ptx batch of 4 texts of unequal length) in 1, 2
    or 4 micro-batches: the same gradient for policy and critic. Averaging the micro-batches' own
    token means would weigh the tokens of short responses more (it did before: relative error 0.49
    here with 2)."""
    cfg = ppo.Config(**{**PPO_TINY, "max_new_tokens": 8, "batch_size": 8, "minibatch_size": 8,
                        "noptepochs": 1, "grad_clip": 0.0, "ptx_coef": ptx_coef})
    policy, _ = load_model(letters_policy, "gpt")
    torch.manual_seed(0)
    critic = ScalarGPT(policy.config)
    enc = get_tokenizer()
    prompts = [ppo.encode_prompt(enc, json.loads(line)["prompt"], cfg.max_prompt_tokens)
               for line in open(os.path.join(PPO_FIXTURES, "prompts_train.jsonl"))][:8]
    queries, query_mask = pad_left(prompts)
    models = ppo_models(policy, copy.deepcopy(policy), critic, reward_fn=count_a)
    batch, _ = ppo.rollout(models, queries, query_mask, cfg, 0.1,
                           generator=torch.Generator().manual_seed(0))
    lengths = batch["response_mask"].sum(1).tolist()
    print(f"response lengths {lengths}")
    assert len(set(lengths)) >= 3, "the test needs responses of unequal length"
    ptx = pad_right([list(range(100, 100 + n)) + [EOS] for n in (3, 17, 9, 30)])  # (4, 31)
    results = {}
    for accumulation in (1, 2, 4):
        p, c = copy.deepcopy(policy), copy.deepcopy(critic)
        recorder = GradRecorder(list(p.parameters()) + list(c.parameters()))
        stats = ppo.ppo_update(p, c, recorder, batch,
                               dataclasses.replace(cfg, grad_accum=accumulation), iter([ptx]),
                               torch.Generator().manual_seed(0))
        assert len(recorder.grads) == 1
        results[accumulation] = recorder.grads[0], stats
    grads1, stats1 = results[1]
    assert ("ptx_loss" in stats1) == (ptx_coef > 0)
    for accumulation in (2, 4):
        grads, stats = results[accumulation]
        error = max(((g - g1).norm() / g1.norm()).item()
                    for g, g1 in zip(grads, grads1) if g1 is not None)
        print(f"accumulation {accumulation}: max relative gradient error {error:.2e}")
        assert error < 1e-5
        assert all((g is None) == (g1 is None) for g, g1 in zip(grads, grads1))
        # the logged statistics are token-weighted too (pg_loss is ~0 here: whitened
        # advantages, ratio 1)
        assert stats.keys() == stats1.keys()
        assert all(stats[k] == pytest.approx(stats1[k], rel=1e-5, abs=1e-6) for k in stats)


def run_letters(tmp_path, letters_policy, kl_coef, iters):
    cfg = ppo_tiny_config(tmp_path, sft_ckpt=letters_policy, iters=iters, batch_size=16,
                          minibatch_size=8, noptepochs=4, lr=3e-3, kl_coef=kl_coef,
                          eval_interval=iters, sample_every=iters, warmup_iters=1)
    result = ppo.train(cfg, reward_fn=count_a)
    rows = [json.loads(line) for line in open(result["metrics_path"])]
    return [r for r in rows if r["step"] > 0], result  # step 0 is the evaluation before training


def test_ppo_raises_a_programmatic_reward_and_kl_coef_holds_it_back(tmp_path, letters_policy):
    rows, result = run_letters(tmp_path / "free", letters_policy, kl_coef=0.01, iters=12)
    first, last = sum(r["score"] for r in rows[:3]) / 3, sum(r["score"] for r in rows[-3:]) / 3
    print(f"kl_coef 0.01: score {first:.2f} -> {last:.2f}, kl {rows[-1]['kl']:.2f}")
    assert last > first + 1.5, "mean count of 'a' should rise clearly"
    assert all(torch.isfinite(torch.tensor(r["kl"])) for r in rows) and rows[-1]["kl"] < 30
    rows_kl, _ = run_letters(tmp_path / "held", letters_policy, kl_coef=3.0, iters=12)
    last_kl = sum(r["score"] for r in rows_kl[-3:]) / 3
    print(f"kl_coef 3: score -> {last_kl:.2f}, kl {rows_kl[-1]['kl']:.3f}")
    assert rows_kl[-1]["kl"] < 0.25 * rows[-1]["kl"] and last_kl < last - 0.5


# ------------------------------------------------------------------------------------------ train()

def test_train_writes_metrics_plot_and_checkpoint(tmp_path):
    cfg = ppo_tiny_config(tmp_path, ptx_coef=0.5, ptx_batch_size=4, missing_eos_penalty=1.0)
    result = ppo.train(cfg)
    rows = [json.loads(line) for line in open(result["metrics_path"])]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("score", "reward", "kl", "kl_coef", "entropy", "pg_loss", "vf_loss", "approx_kl",
                "pg_clipfrac", "vf_clipfrac", "explained_var", "resp_len", "eos_frac", "lr",
                "t_iter", "t_generate", "t_update", "eval_score", "eval_kl", "ptx_loss"):
        assert key in rows[-1], key
    assert os.path.getsize(result["png_path"]) > 0
    policy, ckpt = load_model(result["ckpt_path"], "gpt")  # loadable by sample.py as a plain GPT
    assert ckpt["kind"] == "gpt" and ckpt["iteration"] == 2
    assert "critic" in ckpt and "optimizer" in ckpt
    # resume: test_resume_after_a_crash_is_exact_with_ptx_and_a_scratch_reward_model


def test_train_adaptive_kl_on_shared_hh(tmp_path, hh_prepared):
    cfg = ppo_tiny_config(tmp_path, data_dir=hh_prepared, iters=2, adaptive_kl=True, kl_target=0.01,
                          kl_horizon=100)
    result = ppo.train(cfg)
    rows = [json.loads(line) for line in open(result["metrics_path"])]
    assert len(rows) == 3
    assert os.path.exists(result["ckpt_path"]) and os.path.exists(result["png_path"])
    assert rows[2]["kl_coef"] != rows[1]["kl_coef"], "adaptive controller should move kl_coef"


def test_resume_after_a_crash_is_exact_with_ptx_and_a_scratch_reward_model(tmp_path, monkeypatch):
    """4 iterations == 2 + 2 resumed, bit for bit: PPO-ptx on (its batches are a function of the
    iteration, like the prompts), a "scratch" reward model (built from its own seed, so the resumed
    run scores against the same one), accumulation and the adaptive KL controller. The crash comes
    inside iteration 4, after the metrics of iteration 3 were logged but before the next checkpoint:
    the resumed run drops that row and redoes it."""
    corpus = tmp_path / "corpus.jsonl"  # --ptx_file: pretraining text without prompts
    corpus.write_text("".join(json.dumps({"prompt": "",
                                          "response": f"Text number {i} says{' more' * i}."}) + "\n"
                              for i in range(7)))
    kw = dict(iters=4, eval_interval=2, batch_size=4, minibatch_size=2, noptepochs=1, grad_accum=2,
              ptx_coef=0.5, ptx_batch_size=4, ptx_file=str(corpus), adaptive_kl=True,
              kl_target=0.01, kl_horizon=100)
    full = ppo.train(ppo_tiny_config(tmp_path / "full", **kw))

    prompt_batch = ppo.prompt_batch

    def crash_in_iteration_4(prompts, batch_size, iteration, *args):
        if iteration == 3:
            raise RuntimeError("simulated crash")
        return prompt_batch(prompts, batch_size, iteration, *args)
    cfg = ppo_tiny_config(tmp_path / "resumed", **kw)
    with monkeypatch.context() as m:
        m.setattr(ppo, "prompt_batch", crash_in_iteration_4)
        with pytest.raises(RuntimeError, match="simulated crash"):
            ppo.train(cfg)
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    assert [json.loads(line)["step"] for line in open(metrics)] == [0, 1, 2, 3]
    resumed = ppo.train(dataclasses.replace(cfg, resume=True))

    untimed = lambda path: [{k: v for k, v in json.loads(line).items() if not k.startswith("t_")}
                            for line in open(path)]
    rows = untimed(resumed["metrics_path"])
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and "ptx_loss" in rows[-1]
    assert rows == untimed(full["metrics_path"])  # scores, losses, ptx_loss, kl_coef: equal floats
    a = torch.load(full["ckpt_path"], weights_only=True)
    b = torch.load(resumed["ckpt_path"], weights_only=True)
    assert a["iteration"] == b["iteration"] == 4 and a["kl_coef"] == b["kl_coef"]
    for part in ("model", "critic"):  # policy and critic weights, bit for bit
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items())


def test_temperature_zero_and_missing_ptx_file_are_refused_with_a_message(tmp_path):
    with pytest.raises(UsageError, match="temperature must be > 0"):
        ppo.train(ppo_tiny_config(tmp_path, temperature=0.0))
    with pytest.raises(SystemExit,
                       match=r"pretraining text \(ptx\) file .*nowhere.jsonl not found"):
        ppo.train(ppo_tiny_config(tmp_path, ptx_coef=1.0, ptx_file=str(tmp_path / "nowhere.jsonl")))


# ------------------------------------------------------------------------ values against references

def test_missing_eos_penalty_lowers_exactly_the_scores_without_eos(letters_policy):
    """Same generator seed with penalty 0 and 0.75: the same rollout responses; those without
    EOS score exactly 0.75 less, those with EOS the same (both through a reward model and
    through a reward_fn)."""
    policy, _ = load_model(letters_policy, "gpt")
    torch.manual_seed(0)
    rm = ScalarGPT(policy.config).eval()
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)
    enc = get_tokenizer()
    prompts = [ppo.encode_prompt(enc, json.loads(line)["prompt"], PPO_TINY["max_prompt_tokens"])
               for line in open(os.path.join(PPO_FIXTURES, "prompts_train.jsonl"))][:8]
    queries, query_mask = pad_left(prompts)
    for reward_model, reward_fn in ((rm, None), (None, count_a)):
        runs = {}
        for penalty in (0.0, 0.75):
            cfg = ppo.Config(**{**PPO_TINY, "max_new_tokens": 6, "missing_eos_penalty": penalty})
            models = ppo_models(policy, policy, rm, reward_model, reward_fn)
            runs[penalty], _ = ppo.rollout(models, queries, query_mask, cfg, 0.1,
                                           generator=torch.Generator().manual_seed(3))
        base, penalised = runs[0.0], runs[0.75]
        assert torch.equal(base["ids"], penalised["ids"]), \
            "the same seed must sample the same responses"
        has_eos = base["has_eos"]
        print(f"has_eos {has_eos.tolist()} "
              f"scores {base['scores'].tolist()} -> {penalised['scores'].tolist()}")
        assert has_eos.any() and not has_eos.all(), "the test needs responses with and without EOS"
        expected = [s - (0.0 if e else 0.75)
                    for s, e in zip(base["scores"].tolist(), has_eos.tolist())]
        assert penalised["scores"].tolist() == pytest.approx(expected, abs=1e-6)


def test_lm_loss_is_the_token_mean_nll_of_each_text_alone():
    """PPO-ptx loss on right-padded texts of unequal length == total next-token NLL over all
    real tokens / their number, each text scored alone (no padding, no mask) with a per-token
    loop over log_softmax."""
    torch.manual_seed(0)
    policy = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    texts = [[11, 12, 13, 14, 15, 16, 17, 18, 19, 20, EOS], [30, 31, 32, EOS],
             [40, 41, 42, 43, 44, 45]]
    ids, attention_mask = pad_right(texts)  # padded with EOS: the pad token is a real token's id
    with torch.no_grad():
        ours = ppo.lm_loss(policy, ids, attention_mask).item()
        total, count = 0.0, 0
        for text in texts:
            logp = torch.log_softmax(policy(torch.tensor([text]))[0].double(), -1)  # (T, V)
            for t in range(len(text) - 1):
                total -= logp[t, text[t + 1]].item()
                count += 1
        # and the same with F.cross_entropy over the padded batch, padding targets ignored
        targets = ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        ce = torch.nn.functional.cross_entropy(policy(ids)[:, :-1].flatten(0, 1), targets.flatten(),
                                               ignore_index=-100).item()
        per_text_mean = sum(torch.log_softmax(policy(torch.tensor([t]))[0], -1)[:-1].gather(
            1, torch.tensor(t[1:])[:, None]).mean().item() for t in texts) / 3
    print(f"lm_loss {ours:.6f} loop {total / count:.6f} cross_entropy {ce:.6f} ({count} tokens)")
    assert count == 10 + 3 + 5
    assert ours == pytest.approx(total / count, abs=1e-5) and ours == pytest.approx(ce, abs=1e-5)
    assert abs(ours + per_text_mean) > 1e-3, "not vacuous: a mean of per-text means differs"


def test_explained_variance_matches_numpy_on_the_masked_entries():
    """1 - Var[returns - values] / Var[returns] over the real response tokens
    only (population variances)."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    mask = ragged_mask([6, 2, 4, 1], 6)
    returns = torch.randn(4, 6) * 3 + 1
    values = returns + torch.randn(4, 6)  # a critic with error of variance ~1
    values[~mask.bool()], returns[~mask.bool()] = 50.0, -50.0  # garbage on padding must not count
    ours = ppo.explained_variance(values, returns, mask).item()
    v, r = values[mask.bool()].double().numpy(), returns[mask.bool()].double().numpy()
    reference = 1 - np.var(r - v) / np.var(r)  # numpy's var: population variance (ddof 0)
    print(f"explained variance ours {ours:.6f} numpy {reference:.6f}")
    assert ours == pytest.approx(reference, abs=1e-5)
    # a perfect critic
    assert ppo.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)


def test_explained_variance_of_returns_with_small_variance_matches_numpy():
    """Returns of variance ~0.01: still 1 - Var[returns - values] / Var[returns] (the floor is only
    against 0)."""
    torch.manual_seed(0)
    returns = 0.1 * torch.randn(3, 5)
    values = returns + 0.05 * torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    r, v = returns[mask.bool()].double().numpy(), values[mask.bool()].double().numpy()
    expected = 1 - np.var(r - v) / np.var(r)
    assert 0.5 < expected < 0.95
    assert ppo.explained_variance(values, returns, mask).item() == pytest.approx(expected, abs=1e-5)


def test_rollout_entropy_is_the_masked_mean_of_minus_logprobs_of_a_full_forward(letters_policy):
    """stats["entropy"] == mean over response tokens (up to and including the first EOS) of -log
    pi(y_t), with log pi from one full forward of the policy on the rollout's ids, logits divided
    by the temperature."""
    cfg = ppo.Config(**{**PPO_TINY, "temperature": 0.7, "max_new_tokens": 8})
    policy, _ = load_model(letters_policy, "gpt")
    torch.manual_seed(0)
    critic = ScalarGPT(policy.config)
    enc = get_tokenizer()
    prompts = [ppo.encode_prompt(enc, json.loads(line)["prompt"], cfg.max_prompt_tokens)
               for line in open(os.path.join(PPO_FIXTURES, "prompts_train.jsonl"))][:8]
    queries, query_mask = pad_left(prompts)
    models = ppo_models(policy, copy.deepcopy(policy), critic, reward_fn=count_a)
    batch, stats = ppo.rollout(models, queries, query_mask, cfg, 0.1,
                               generator=torch.Generator().manual_seed(0))
    ids, P = batch["ids"], queries.size(1)
    assert not batch["response_mask"].all(), "the test needs padding after an early EOS"
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(ids.size(0)):
            real = ids[i, :P][query_mask[i].bool()].tolist()  # the prompt without its left padding
            response = ids[i, P:].tolist()
            # up to and including the EOS
            n = response.index(EOS) + 1 if EOS in response else len(response)
            seq = torch.tensor([real + response[:n]])
            logp = torch.log_softmax(policy(seq)[0].double() / cfg.temperature, -1)  # (T, V)
            for t in range(len(real), len(real) + n):
                total -= logp[t - 1, seq[0, t]].item()
                count += 1
    print(f"entropy logged {stats['entropy']:.6f} reference {total / count:.6f} "
          f"over {count} tokens")
    assert count == int(batch["response_mask"].sum())
    assert stats["entropy"] == pytest.approx(total / count, abs=1e-5)


def test_train_adaptive_kl_coef_follows_the_controller_each_iteration(tmp_path, monkeypatch):
    """Inside train(): row k's kl_coef is the coefficient of iteration k, and the next row's (the
    checkpoint's after the last) is adaptive_kl_coef(that coef, row k's kl, target, horizon,
    batch_size). A target far above the measured KL lowers the coefficient every iteration; one far
    below raises it every iteration. For the second, the rollouts measure the KL to a reference far
    from the policy (a GPT with large logits, patched into rollout()): the KL of a policy that
    starts AS its reference is 0, then sampling noise of either sign."""
    def run(name, target):
        cfg = ppo_tiny_config(tmp_path / name, iters=3, adaptive_kl=True, kl_target=target,
                              kl_horizon=40, kl_coef=0.05, eval_interval=3, sample_every=100)
        result = ppo.train(cfg)
        # step 0: the evaluation
        rows = [json.loads(line) for line in open(result["metrics_path"])][1:]
        assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["kl_coef"] == 0.05
        last = torch.load(result["ckpt_path"], weights_only=True)["kl_coef"]
        coefs = [r["kl_coef"] for r in rows] + [last]
        for k, row in enumerate(rows):
            expected = ppo.adaptive_kl_coef(row["kl_coef"], row["kl"], target, 40, cfg.batch_size)
            assert coefs[k + 1] == pytest.approx(expected, rel=1e-12), (k, rows)
        print(f"target {target}: kl_coef {coefs} kl {[r['kl'] for r in rows]}")
        return coefs, [r["kl"] for r in rows]

    # the KL of a tiny scratch policy after 3 iterations: well below 1e3 / 1.2
    coefs, kls = run("above", 1e3)
    assert all(kl < 1e3 / 1.2 for kl in kls)
    assert coefs == pytest.approx([0.05 * (1 - 0.2 * 8 / 40) ** k for k in range(4)]), \
        "clipped error -0.2, 8 / 40"

    torch.manual_seed(0)
    far = GPT(GPTConfig(**{k: PPO_TINY[k] for k in ("n_layer", "n_head", "n_embd",
                                                    "block_size")})).eval()
    # (tied lm_head) logits of std ~5: peaked
    torch.nn.init.normal_(far.transformer.wte.weight, std=1.0)
    rollout = ppo.rollout
    far_rollout = lambda models, *a, **kw: rollout(
        ppo_models(models.policy, far, models.critic, models.reward_model, models.reward_fn),
        *a, **kw)
    monkeypatch.setattr(ppo, "rollout", far_rollout)
    coefs, kls = run("below", 1e-3)
    assert all(kl > 1.2e-3 for kl in kls), kls
    assert coefs == pytest.approx([0.05 * (1 + 0.2 * 8 / 40) ** k for k in range(4)]), \
        "clipped error +0.2, 8 / 40"


# -------------------------------------------------------------------- rollout and evaluate, by hand
# The EOS-prone policy of conftest.py on PROMPTS against a noisy copy of itself and a random critic:
# each test checks one property of the batch against a reference computed here (unpadded forwards
# one sequence at a time, Python loops, numpy), in well under a second.

ROLLOUT = dict(max_new_tokens=12, temperature=TEMPERATURE, gamma=GAMMA, lam=LAM)


def noisy_copy(model, seed, scale):
    """A copy of `model` with noise on every parameter, in eval mode."""
    torch.manual_seed(seed)
    other = type(model)(model.config)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other.eval()


def rollout_of(cfg, seed=0, reward_model=None, reward_fn=None):
    """ppo.rollout of the EOS-prone policy on PROMPTS against a noisy reference and
    a random critic."""
    policy = ragged_policy()
    queries, query_mask = pad_left(PROMPTS)
    models = ppo_models(policy, noisy_copy(policy, seed=1, scale=0.2), scalar_model(seed=2),
                        reward_model, reward_fn)
    return ppo.rollout(models, queries, query_mask, cfg, KL_COEF,
                       generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("penalty", [0.0, 0.75])
def test_rollout_subtracts_the_missing_eos_penalty_from_exactly_the_responses_without_eos(penalty):
    """The scores, their mean (stats["score"]) and the rewards built from them (each row's
    summed reward is its score - beta * its KL) carry the penalty on the rows without EOS,
    and only there."""
    cfg = ppo.Config(**ROLLOUT_SHAPE, max_new_tokens=12, temperature=1.0,
                     missing_eos_penalty=penalty)
    batch, stats = rollout_of(cfg, seed=0, reward_fn=RewardRecorder())
    rows = batch["responses"].tolist()
    assert any(EOS in r for r in rows) and not all(EOS in r for r in rows)
    expected = [sum(t % 5 for t in r[:hand_length(r)]) - (0.0 if EOS in r else penalty)
                for r in rows]
    assert batch["scores"].tolist() == pytest.approx(expected, abs=1e-6)
    assert stats["score"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    rewards = (batch["rewards"].sum(1) + KL_COEF * batch["kl"].sum(1)).tolist()
    assert rewards == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("penalty", [0.0, 0.75])
def test_evaluation_subtracts_the_missing_eos_penalty_from_exactly_the_responses_without_eos(
        penalty):
    """ppo.evaluate samples as rollouts do (in batches of batch_size, batch b with seed
    cfg.seed + b) and applies the same penalty: eval_score is the mean of the penalised scores."""
    policy = ragged_policy()
    cfg = ppo.Config(**ROLLOUT_SHAPE, max_new_tokens=12, temperature=1.0,
                     missing_eos_penalty=penalty, batch_size=4, seed=0)
    models = ppo_models(policy, noisy_copy(policy, seed=1, scale=0.2), None,
                        reward_fn=RewardRecorder())
    metrics = ppo.evaluate(models, PROMPTS, cfg)
    rows = []
    for b, i in enumerate(range(0, len(PROMPTS), 4)):
        queries, query_mask = pad_left(PROMPTS[i:i + 4])
        generator = torch.Generator().manual_seed(0 + b)
        batch = sample_responses(policy, queries, query_mask, 12, 1.0, generator)
        rows += batch["responses"].tolist()
    assert any(EOS in r for r in rows) and not all(EOS in r for r in rows)
    expected = [sum(t % 5 for t in r[:hand_length(r)]) - (0.0 if EOS in r else penalty)
                for r in rows]
    assert metrics["eval_score"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)


def test_rollout_generation_time_is_between_zero_and_the_time_of_the_call():
    cfg = ppo.Config(**ROLLOUT_SHAPE, max_new_tokens=3)
    t0 = time.time()
    _, stats = rollout_of(cfg, reward_fn=RewardRecorder())
    elapsed = time.time() - t0
    assert 0 <= stats["t_generate"] <= elapsed
    assert 0 <= stats["t_forward"] and stats["t_generate"] + stats["t_forward"] <= elapsed


@pytest.fixture
def rolled():
    """One rollout of the EOS-prone policy against a noisy reference, timed. Function-scoped on
    purpose: mutmut maps a test to the functions called while it runs, and a module-scoped fixture's
    calls would count for the first test that uses it only."""
    policy = ragged_policy()
    ref_policy, critic = noisy_copy(policy, seed=1, scale=0.2), scalar_model(seed=2)
    cfg = ppo.Config(**ROLLOUT_SHAPE, **ROLLOUT)
    queries, query_mask = pad_left(PROMPTS)
    t0 = time.time()
    models = ppo_models(policy, ref_policy, critic, reward_fn=RewardRecorder())
    batch, stats = ppo.rollout(models, queries, query_mask, cfg, KL_COEF,
                               generator=torch.Generator().manual_seed(5))
    return dict(policy=policy, ref_policy=ref_policy, critic=critic, cfg=cfg, batch=batch,
                stats=stats, elapsed=time.time() - t0)


def test_rollout_statistics_are_the_batch_means_computed_by_hand(rolled):
    """score, reward and kl: means over responses of the score and of each row's summed reward and
    KL; entropy: mean of -log pi over response tokens; explained_var: numpy's on the response
    tokens; resp_len: mean length up to and including the first EOS; eos_frac: share of responses
    with an EOS; the two timings add up to at most the time of the call. Exactly these keys."""
    batch, stats = rolled["batch"], rolled["stats"]
    rows = batch["responses"].tolist()
    lengths = [hand_length(r) for r in rows]
    ragged = len(set(lengths)) > 1 and not all(EOS in r for r in rows)
    assert ragged, "the test needs ragged responses, some cut"
    per_row = lambda k: [batch[k][i, :n].tolist() for i, n in enumerate(lengths)]  # response tokens
    mean = lambda xs: sum(xs) / len(xs)
    tokens = lambda k: [x for row in per_row(k) for x in row]
    values = np.array(tokens("values"), dtype=np.float64)
    returns = np.array(tokens("returns"), dtype=np.float64)
    expected = {"score": mean(batch["scores"].tolist()),
                "reward": mean([sum(r) for r in per_row("rewards")]),
                "kl": mean([sum(r) for r in per_row("kl")]),
                "entropy": -mean(tokens("logprobs")),
                "explained_var": 1 - np.var(returns - values) / np.var(returns),
                "resp_len": mean(lengths),
                "eos_frac": mean([EOS in r for r in rows])}
    print({k: (round(stats[k], 5), round(float(v), 5)) for k, v in expected.items()})
    assert set(stats) == set(expected) | {"t_generate", "t_forward"}
    for k, v in expected.items():
        assert stats[k] == pytest.approx(v, abs=1e-5), k
    assert stats["t_generate"] >= 0 and stats["t_forward"] >= 0
    assert stats["t_generate"] + stats["t_forward"] <= rolled["elapsed"]


def test_rollout_samples_with_the_generator_it_is_given(rolled):
    queries, query_mask = pad_left(PROMPTS)
    reference = rolled["policy"].generate(queries, ROLLOUT["max_new_tokens"],
                                          temperature=ROLLOUT["temperature"], eos_token_id=EOS,
                                          attention_mask=query_mask,
                                          generator=torch.Generator().manual_seed(5))
    assert torch.equal(rolled["batch"]["ids"], reference)


def test_rollout_with_a_reward_model_scores_with_it():
    """No reward_fn: the scores are the reward model's, read at the EOS ending each unpadded
    response."""
    policy, rm = ragged_policy(), scalar_model(seed=9)
    queries, query_mask = pad_left(PROMPTS)
    models = ppo_models(policy, noisy_copy(policy, 1, 0.2), scalar_model(seed=2), rm)
    batch, stats = ppo.rollout(models, queries, query_mask, ppo.Config(**ROLLOUT_SHAPE, **ROLLOUT),
                               KL_COEF, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = [last_output(rm, p + r[:hand_length(r)] + ([] if EOS in r else [EOS])).item()
                    for p, r in zip(PROMPTS, batch["responses"].tolist())]
    assert batch["scores"].tolist() == pytest.approx(expected, abs=1e-5)
    assert stats["score"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)


# ------------------------------------------------------------- minibatch and ppo_update, by hand

def test_minibatch_takes_the_rows_and_drops_only_the_columns_that_are_padding_in_all_of_them(
        rolled):
    """Rows [4, 2] of the rollout: the prompt columns left of the longest of their prompts and the
    response columns right of the longest of their responses are gone, every other column is kept,
    and n_query counts the prompt columns left."""
    batch = rolled["batch"]
    P = batch["queries"].size(1)
    # prompts of 2 and 1 tokens (of P = 6), responses of different lengths
    idx = torch.tensor([4, 2])
    lengths = [hand_length(batch["responses"][i].tolist()) for i in idx.tolist()]
    prompt_len = max(len(PROMPTS[i]) for i in idx.tolist())
    R, first = max(lengths), P - prompt_len
    assert 0 < first and R < batch["responses"].size(1), \
        "the test needs columns to drop on both sides"
    mb = ppo.minibatch(batch, idx)
    assert set(mb) == {"logprobs", "ref_logprobs", "values", "advantages", "returns",
                       "response_mask", "ids", "attention_mask", "n_query"}
    for k in ("logprobs", "values", "advantages", "returns", "response_mask"):
        assert torch.equal(mb[k], batch[k][idx][:, :R]), k
    assert torch.equal(mb["ids"], batch["ids"][idx][:, first:P + R])
    assert torch.equal(mb["attention_mask"], batch["attention_mask"][idx][:, first:P + R])
    assert mb["n_query"] == prompt_len


PTX_LENGTHS = (7, 4, 2, 1, 1, 1)  # split in 3 pieces of 2 rows: 9, 1 and 0 predicted tokens


def ptx_batch():
    return pad_right([list(range(100 + 10 * i, 100 + 10 * i + n))
                      for i, n in enumerate(PTX_LENGTHS)])


def update_case(rolled):
    """The update's models: the rollout's policy and critic, moved away from it (so ratios are not 1
    and values not the rollout's: both losses clip)."""
    policy = noisy_copy(rolled["policy"], seed=3, scale=0.05)
    critic = noisy_copy(rolled["critic"], seed=4, scale=0.5)
    return policy, critic


def reference_loss(policy, critic, batch, rows, cfg, ptx=None):
    """The PPO loss of the rows as one batch (no micro-batches, no trimming): token means over
    all of them."""
    P = batch["queries"].size(1)
    ids, attention_mask = batch["ids"][rows], batch["attention_mask"][rows]
    mask = batch["response_mask"][rows]
    logprobs = policy_logprobs(policy, ids, attention_mask, P, cfg.temperature)
    values = ppo.critic_values(critic, ids, attention_mask, P)
    pg, pg_clipfrac, approx_kl = ppo.ppo_policy_loss(logprobs, batch["logprobs"][rows],
                                                     batch["advantages"][rows], mask, cfg.cliprange)
    vf, vf_clipfrac = ppo.ppo_value_loss(values, batch["values"][rows], batch["returns"][rows],
                                         mask, cfg.cliprange_value)
    loss = pg + cfg.vf_coef * vf
    stats = dict(pg_loss=pg.item(), vf_loss=vf.item(), pg_clipfrac=pg_clipfrac.item(),
                 vf_clipfrac=vf_clipfrac.item(), approx_kl=approx_kl.item())
    if ptx is not None:
        ptx_loss = ppo.lm_loss(policy, *ptx)
        loss = loss + cfg.ptx_coef * ptx_loss
        stats["ptx_loss"] = ptx_loss.item()
    return loss, stats


def update_config(**kw):
    """The rollout's config, updating once (noptepochs 1) on all 6 rollouts unless
    kw says otherwise."""
    kw = {"batch_size": 6, "minibatch_size": 6, "noptepochs": 1, **kw}
    return ppo.Config(**ROLLOUT_SHAPE, **ROLLOUT, **kw)


def test_update_step_in_pieces_is_the_gradient_and_statistics_of_the_whole_minibatch_with_ptx(
        rolled):
    """One optimizer step over all 6 rollouts in 3 micro-batches, PPO-ptx on a batch of 6 texts
    split alike into pieces of 9, 1 and 0 predicted tokens: the gradient is that of pg_loss +
    vf_coef vf_loss + ptx_coef lm_loss over the whole minibatch and the whole ptx batch, and each
    logged statistic is its whole-batch value."""
    batch = rolled["batch"]
    policy, critic = update_case(rolled)
    cfg = update_config(grad_accum=3, grad_clip=0.0, vf_coef=0.3, ptx_coef=0.7)
    params = list(policy.parameters()) + list(critic.parameters())
    recorder = GradRecorder(params)
    ptx = ptx_batch()
    stats = ppo.ppo_update(policy, critic, recorder, batch, cfg, iter([ptx]),
                           torch.Generator().manual_seed(0))
    loss, expected = reference_loss(policy, critic, batch, torch.arange(6), cfg, ptx)
    print({k: (round(stats[k], 6), round(v, 6)) for k, v in expected.items()})
    both_clip = 0 < expected["pg_clipfrac"] < 1 and 0 < expected["vf_clipfrac"] < 1
    assert both_clip, "the test needs both losses clipped"
    assert len(recorder.grads) == 1
    assert_close_grads(recorder.grads[0], gradients(loss, params))
    expected["loss"] = loss.item()  # the objective's value, pg + vf_coef vf + ptx_coef ptx
    assert set(stats) == set(expected)
    for k, v in expected.items():
        assert stats[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def test_update_minibatches_follow_the_generators_permutation_and_statistics_average_over_steps(
        rolled):
    """noptepochs 1, minibatches of 3 of the 6 rollouts: step k takes rows
    randperm(6, generator)[3k:3k+3] (the global RNG, seeded otherwise, plays no part), and the
    statistics are the mean over the two steps."""
    batch = rolled["batch"]
    policy, critic = update_case(rolled)
    cfg = update_config(minibatch_size=3, grad_clip=0.0)
    params = list(policy.parameters()) + list(critic.parameters())
    torch.manual_seed(1234)
    recorder = GradRecorder(params)
    stats = ppo.ppo_update(policy, critic, recorder, batch, cfg,
                           generator=torch.Generator().manual_seed(8))
    order = torch.randperm(6, generator=torch.Generator().manual_seed(8))
    assert len(recorder.grads) == 2
    step_stats = []
    for k, rows in enumerate((order[:3], order[3:])):
        loss, s = reference_loss(policy, critic, batch, rows, cfg)
        assert_close_grads(recorder.grads[k], gradients(loss, params))
        step_stats.append(s)
    for key in step_stats[0]:
        mean = (step_stats[0][key] + step_stats[1][key]) / 2
        assert stats[key] == pytest.approx(mean, rel=1e-5, abs=1e-7), key


def test_update_clips_policy_and_critic_gradients_separately_and_logs_the_policy_norm(rolled):
    """grad_clip 1e-3, far below both gradient norms: each network's applied gradient is its own
    gradient scaled to norm 1e-3 (not a common scale), and grad_norm is the policy's norm before
    clipping."""
    batch = rolled["batch"]
    policy, critic = update_case(rolled)
    cfg = update_config(grad_clip=1e-3)
    n_policy = len(list(policy.parameters()))
    params = list(policy.parameters()) + list(critic.parameters())
    recorder = GradRecorder(params)
    stats = ppo.ppo_update(policy, critic, recorder, batch, cfg,
                           generator=torch.Generator().manual_seed(0))
    loss, _ = reference_loss(policy, critic, batch, torch.arange(6), cfg)
    expected = gradients(loss, params)
    norm = lambda gs: math.sqrt(sum((g.double() ** 2).sum().item() for g in gs))
    norms = norm(expected[:n_policy]), norm(expected[n_policy:])
    print(f"gradient norms: policy {norms[0]:.3e} critic {norms[1]:.3e}")
    assert min(norms) > 1e-2
    assert stats["grad_norm"] == pytest.approx(norms[0], rel=1e-4)
    for part, n in ((slice(0, n_policy), norms[0]), (slice(n_policy, None), norms[1])):
        assert_close_grads(recorder.grads[0][part], [g * 1e-3 / n for g in expected[part]])


def test_update_on_a_minibatch_of_a_single_one_token_response_applies_its_whole_gradient(rolled):
    """minibatch_size 1 and a response that is EOS alone: the row holds all the step's tokens
    (share 1), so the gradient is that of the row's own loss."""
    batch = {k: v[2:3] for k, v in rolled["batch"].items()}
    assert int(batch["response_mask"].sum()) == 1, "the test needs row 2 to be a one-token response"
    policy, critic = update_case(rolled)
    cfg = update_config(batch_size=1, minibatch_size=1, grad_clip=0.0)
    params = list(policy.parameters()) + list(critic.parameters())
    recorder = GradRecorder(params)
    ppo.ppo_update(policy, critic, recorder, batch, cfg, generator=torch.Generator())
    loss, _ = reference_loss(policy, critic, batch, torch.arange(1), cfg)
    assert_close_grads(recorder.grads[0], gradients(loss, params))


def test_update_syncs_ddp_gradients_once_after_the_last_micro_batch(rolled, monkeypatch):
    batch = rolled["batch"]
    policy, critic = update_case(rolled)
    recorder = NoSyncRecorder()
    monkeypatch.setattr(lib.ddp, "no_sync", recorder)
    cfg = update_config(grad_accum=3)
    ppo.ppo_update(policy, critic, GradRecorder(policy.parameters()), batch, cfg,
                   generator=torch.Generator())
    assert len(recorder.calls) == 3
    assert all(modules[0] is policy and modules[1] is critic and len(modules) == 2
               for modules, _ in recorder.calls)
    assert [enabled for _, enabled in recorder.calls] == [True, True, False]


def test_update_weights_its_losses_by_step_total_of_the_steps_response_and_ptx_tokens(
        rolled, monkeypatch):
    """Under torchrun a step's token counts are lib.ddp.step_total's (all ranks' / world_size):
    ppo_update asks it for the minibatch's response tokens (twice: the items of the value loss's
    mean and of the policy loss's token mean) and the ptx batch's predicted tokens, once per step,
    and divides by what it returns. A stand-in returning twice the local count halves
    the whole step's gradient."""
    batch = rolled["batch"]
    policy, critic = update_case(rolled)
    calls = []
    monkeypatch.setattr(lib.ddp, "step_total", lambda n: calls.append(n) or 2.0 * n)
    cfg = update_config(grad_accum=3, grad_clip=0.0, vf_coef=0.3, ptx_coef=0.7)
    params = list(policy.parameters()) + list(critic.parameters())
    recorder = GradRecorder(params)
    ptx = ptx_batch()
    ppo.ppo_update(policy, critic, recorder, batch, cfg, iter([ptx]),
                   torch.Generator().manual_seed(0))
    tokens = int(batch["response_mask"].sum())
    assert calls == [tokens, tokens, sum(n - 1 for n in PTX_LENGTHS)]
    loss, _ = reference_loss(policy, critic, batch, torch.arange(6), cfg, ptx)
    assert_close_grads(recorder.grads[0], [g / 2 for g in gradients(loss, params)])


def test_update_stops_on_a_non_finite_loss_naming_the_iteration(rolled):
    """NaN advantages make the loss NaN: FloatingPointError before any optimizer step, naming "the
    PPO loss" and the iteration passed in ("?" when none is)."""
    nan = torch.full_like(rolled["batch"]["advantages"], float("nan"))
    batch = {**rolled["batch"], "advantages": nan}
    policy, critic = update_case(rolled)
    cfg = update_config()
    recorder = GradRecorder(policy.parameters())
    with pytest.raises(FloatingPointError, match=r"^the PPO loss is NaN or inf at step 7:"):
        ppo.ppo_update(policy, critic, recorder, batch, cfg, generator=torch.Generator(),
                       iteration=7)
    with pytest.raises(FloatingPointError, match=r"^the PPO loss is NaN or inf at step \?:"):
        ppo.ppo_update(policy, critic, recorder, batch, cfg, generator=torch.Generator())
    assert recorder.grads == []
