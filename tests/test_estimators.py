"""The critic-free advantage estimators and the KL's placement (ppo.py): kl_estimate's k1, k2, k3
against their formulas and by exact enumeration; group_advantages (RLOO, GRPO, Dr. GRPO) and
compute_advantages (REINFORCE++, the group estimators, GAE) against naive loops, with the planted
mistakes a student makes shown to differ; aggregate's three averages by hand; the KL in the loss
through ppo_update against an autograd reference; micro-batches weighted by responses; train()
end to end without a critic; and the settings that cannot work together refused with one line."""
import copy
import dataclasses
import json
import math
import os

import pytest
import torch

import ppo
from conftest import (
    PPO_FIXTURES,
    PROMPTS,
    ROLLOUT_SHAPE,
    GradRecorder,
    RewardRecorder,
    assert_close_grads,
    gradients,
    ppo_models,
    ppo_tiny_config,
    ragged_mask,
    ragged_policy,
    scalar_model,
)
from lib.checkpoints import load_model, save_checkpoint
from lib.config import UsageError, parse_config
from lib.responses import policy_logprobs
from lib.tokens import EOS, get_tokenizer, pad_left
from model import GPT, GPTConfig

# ------------------------------------------------------------------------------------- kl_estimate

def test_kl_estimate_k1_k2_k3_are_the_formulas_computed_by_hand():
    """x = log pi - log pi_ref = 0.5, 0, -1, 2: k1 = x, k2 = x^2 / 2, k3 = e^-x - 1 + x."""
    logprobs = torch.tensor([[-1.0, -0.5, -2.0, -0.25]])
    ref_logprobs = torch.tensor([[-1.5, -0.5, -1.0, -2.25]])
    by_hand = {"k1": [0.5, 0.0, -1.0, 2.0],
               "k2": [0.125, 0.0, 0.5, 2.0],
               "k3": [math.exp(-0.5) - 0.5, 0.0, math.e - 2.0, math.exp(-2.0) + 1.0]}
    for estimator, expected in by_hand.items():
        got = ppo.kl_estimate(logprobs, ref_logprobs, estimator)
        assert got.shape == (1, 4)
        assert got[0].tolist() == pytest.approx(expected, abs=1e-6), estimator
    assert torch.equal(ppo.kl_estimate(logprobs, ref_logprobs), logprobs - ref_logprobs)  # k1
    with pytest.raises(ValueError, match="k4"):
        ppo.kl_estimate(logprobs, ref_logprobs, "k4")


def test_k2_and_k3_are_never_negative_where_k1_is():
    g = torch.Generator().manual_seed(0)
    logprobs = -3 * torch.rand(8, 50, generator=g)
    ref_logprobs = -3 * torch.rand(8, 50, generator=g)
    assert (ppo.kl_estimate(logprobs, ref_logprobs, "k1") < 0).any()
    for estimator in ("k2", "k3"):
        assert (ppo.kl_estimate(logprobs, ref_logprobs, estimator) >= 0).all(), estimator


def test_k1_and_k3_are_unbiased_for_the_kl_by_enumeration_and_k2_is_not():
    """Over a categorical of 5 outcomes: sum_a pi(a) k(a) is KL(pi || pi_ref) exactly for k1 and
    k3 (not for k2), and the mean of k3 over 200k samples from pi is within 3 standard errors."""
    pi = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2], dtype=torch.float64)
    exact = sum(p * math.log(p / q) for p, q in zip(pi.tolist(), ref.tolist()))
    k = {e: ppo.kl_estimate(pi.log(), ref.log(), e) for e in ("k1", "k2", "k3")}
    expectation = {e: (pi * v).sum().item() for e, v in k.items()}
    print(f"KL {exact:.5f}; expectations {expectation}")
    assert expectation["k1"] == pytest.approx(exact, abs=1e-12)
    assert expectation["k3"] == pytest.approx(exact, abs=1e-12)
    assert abs(expectation["k2"] - exact) > 0.05
    samples = torch.multinomial(pi, 200_000, replacement=True,
                                generator=torch.Generator().manual_seed(0))
    k3 = k["k3"][samples]
    standard_error = k3.std().item() / math.sqrt(len(samples))
    assert abs(k3.mean().item() - exact) < 3 * standard_error


# -------------------------------------------------------------------------------- group_advantages

def naive_group(returns, K, kind):
    """A loop over responses; response i's group is rows K * (i // K) ... K * (i // K) + K - 1."""
    out = []
    for i, r in enumerate(returns):
        group = returns[K * (i // K):K * (i // K) + K]
        mean = sum(group) / K
        if kind == "rloo":
            others = [x for j, x in enumerate(group) if j != i % K]
            out.append(r - sum(others) / (K - 1))
        elif kind == "dr_grpo":
            out.append(r - mean)
        else:  # grpo, Bessel's std
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (K - 1))
            out.append((r - mean) / (std + 1e-6))
    return out


RETURNS = [1.0, 3.0, 0.5, 2.5, -1.0, 4.0, 0.0, 0.25, 2.0, -2.0, 3.5, 1.5]  # 12: groups of 2, 3, 4


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("estimator", ["rloo", "grpo", "dr_grpo"])
def test_group_advantages_match_a_naive_loop_over_contiguous_groups(estimator, K):
    got = ppo.group_advantages(torch.tensor(RETURNS, dtype=torch.float64), K, estimator)
    assert got.tolist() == pytest.approx(naive_group(RETURNS, K, estimator), abs=1e-9)
    # the groups are contiguous rows, not strided ones (prompt_batch repeats each prompt K times
    # in a row)
    strided = [RETURNS[j * (len(RETURNS) // K) + i] for i in range(len(RETURNS) // K)
               for j in range(K)]
    assert got.tolist() != pytest.approx(naive_group(strided, K, estimator), abs=1e-3)


def test_group_advantages_differ_from_the_planted_mistakes():
    """rloo whose baseline includes the response itself, grpo without the std, grpo with the
    biased (population) std: each gives other numbers than the project's."""
    returns = torch.tensor(RETURNS)
    groups = returns.view(-1, 3)
    deviation = groups - groups.mean(1, keepdim=True)
    wrong = {"rloo": [("baseline includes itself", deviation)],
             "grpo": [("no std", deviation),
                      ("biased std", deviation / (groups.std(1, unbiased=False, keepdim=True)
                                                  + 1e-6))]}
    for estimator, variants in wrong.items():
        got = ppo.group_advantages(returns, 3, estimator)
        for name, variant in variants:
            assert not torch.allclose(got, variant.view(-1), atol=1e-3), (estimator, name)


def test_grpo_of_a_group_of_equal_returns_is_zero_not_nan():
    got = ppo.group_advantages(torch.tensor([2.0, 2.0, 1.0, 3.0]), 2, "grpo")
    assert got[:2].tolist() == [0.0, 0.0] and torch.isfinite(got).all()


# ------------------------------------------------------------------------------ compute_advantages

def naive_whiten(rows):
    """(x - mean) / sqrt(var + 1e-8) over all tokens of all rows, population variance."""
    flat = [x for row in rows for x in row]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / len(flat)
    return [[(x - mean) / math.sqrt(var + 1e-8) for x in row] for row in rows]


LENGTHS, T = [5, 1, 7, 3], 7


@pytest.mark.parametrize("gamma", [0.9, 1.0])
def test_reinforce_pp_advantages_are_whitened_returns_to_go_of_a_naive_loop(gamma):
    """Each token's sum_{s >= t} gamma^(s-t) r_s within its response (the rewards on padding,
    garbage here, play no part), whitened over the batch's tokens; 0 on padding; no returns."""
    torch.manual_seed(0)
    mask = ragged_mask(LENGTHS, T)
    rewards = torch.randn(4, T, dtype=torch.float64)
    cfg = ppo.Config(advantage_estimator="reinforce_pp", gamma=gamma, lam=0.5)  # lam not used
    advantages, returns = ppo.compute_advantages(rewards, torch.randn(4, T), mask, cfg)
    assert returns is None
    to_go = [[sum(gamma ** (s - t) * rewards[b, s].item() for s in range(t, n)) for t in range(n)]
             for b, n in enumerate(LENGTHS)]
    expected = naive_whiten(to_go)
    for b, n in enumerate(LENGTHS):
        assert advantages[b, :n].tolist() == pytest.approx(expected[b], abs=1e-6)
        assert (advantages[b, n:] == 0).all()


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "dr_grpo"])
def test_group_estimators_give_every_response_token_its_responses_advantage(estimator):
    """Rewards as compute_rewards makes them (-beta k1 per token, the score on the last one): a
    response's return is its score - beta * its summed log-ratio; the group estimator of those
    returns (naive loop) on every one of its tokens, 0 on padding."""
    torch.manual_seed(1)
    lengths = [2, 5, 1, 4, 3, 3]
    mask = ragged_mask(lengths, 5)
    scores = torch.randn(6, dtype=torch.float64)
    logprobs, ref_logprobs = -torch.rand(6, 5, dtype=torch.float64), -torch.rand(6, 5)
    rewards, _ = ppo.compute_rewards(scores, logprobs, ref_logprobs.double(), mask, 0.3)
    cfg = ppo.Config(advantage_estimator=estimator, samples_per_prompt=2)
    advantages, returns = ppo.compute_advantages(rewards, torch.zeros(6, 5), mask, cfg)
    assert returns is None
    per_response = [scores[b].item() - 0.3 * sum(logprobs[b, t].item() - ref_logprobs[b, t].item()
                                                  for t in range(n))
                    for b, n in enumerate(lengths)]
    expected = naive_group(per_response, 2, estimator)
    for b, n in enumerate(lengths):
        assert advantages[b, :n].tolist() == pytest.approx([expected[b]] * n, abs=1e-6)
        assert (advantages[b, n:] == 0).all()


def test_gae_advantages_are_compute_gae_whitened_and_its_returns():
    torch.manual_seed(2)
    mask = ragged_mask(LENGTHS, T)
    rewards, values = torch.randn(4, T), torch.randn(4, T)
    cfg = ppo.Config(gamma=0.9, lam=0.8)
    advantages, returns = ppo.compute_advantages(rewards, values, mask, cfg)
    raw, expected_returns = ppo.compute_gae(rewards, values, mask, 0.9, 0.8)
    assert torch.equal(advantages, ppo.whiten(raw, mask))
    assert torch.equal(returns, expected_returns)


# --------------------------------------------------------------------------------------- aggregate

def test_aggregate_token_mean_and_the_two_per_response_means_by_hand():
    """Responses of 1 and 3 tokens, losses 1 | 2 3 4 (100 on padding, never counted):
    token_mean (1+2+3+4)/4 = 2.5; seq_mean_token_mean (1 + 9/3)/2 = 2; seq_mean_token_sum
    (1 + 9)/2 = 5. ppo_policy_loss at ratio 1 is aggregate of -A."""
    losses = torch.tensor([[1.0, 100.0, 100.0], [2.0, 3.0, 4.0]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    by_hand = {"token_mean": 2.5, "seq_mean_token_mean": 2.0, "seq_mean_token_sum": 5.0}
    for loss_agg, expected in by_hand.items():
        assert ppo.aggregate(losses, mask, loss_agg).item() == pytest.approx(expected), loss_agg
        logprobs = torch.full((2, 3), -1.0)
        loss, _, _ = ppo.ppo_policy_loss(logprobs, logprobs, -losses, mask, 0.2, loss_agg)
        assert loss.item() == pytest.approx(expected), loss_agg
    assert ppo.aggregate(losses, mask).item() == pytest.approx(2.5)  # token_mean by default
    with pytest.raises(ValueError, match="token_max"):
        ppo.aggregate(losses, mask, "token_max")


# --------------------------------------------------------------------------------- compute_rewards

@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_reward_pays_the_estimators_sample_per_token_and_returns_the_log_ratio(estimator):
    """r_t = -beta k(x_t) on response tokens, the score added on the last one, 0 on padding; the
    kl returned is still x_t = log pi - log pi_ref (the statistic, a k1 sample)."""
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-0.8, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    scores, beta = torch.tensor([2.0, -1.0]), 0.1
    k = {"k2": lambda x: x * x / 2, "k3": lambda x: math.exp(-x) - 1 + x}[estimator]
    expected = [[-beta * k(0.5), -beta * k(-1.0), -beta * k(0.0) + 2.0],
                [-beta * k(0.5) - 1.0, 0.0, 0.0]]
    rewards, kl = ppo.compute_rewards(scores, logprobs, ref_logprobs, mask, beta, estimator)
    assert rewards.tolist()[0] == pytest.approx(expected[0], abs=1e-6)
    assert rewards.tolist()[1] == pytest.approx(expected[1], abs=1e-6)
    assert kl.flatten().tolist() == pytest.approx([0.5, -1.0, 0.0, 0.5, 0.0, 0.0], abs=1e-6)


# ------------------------------------------------------ ppo_update with the KL in the loss, by hand

def moved(model, seed, scale):
    """A copy of `model` with noise on every parameter, in eval mode."""
    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other.eval()


def group_rollout(critic=None, estimator="rloo"):
    """A rollout of the EOS-prone policy on PROMPTS[:3], each twice in a row (K = 2, 6 ragged
    responses), against a noisy reference, with the KL in the loss (no KL in the rewards)."""
    policy = ragged_policy()
    cfg = ppo.Config(**ROLLOUT_SHAPE, max_new_tokens=10, temperature=0.8,
                     advantage_estimator=estimator, samples_per_prompt=2, kl_penalty="loss")
    queries, query_mask = pad_left([p for p in PROMPTS[:3] for _ in range(2)])
    models = ppo_models(policy, moved(policy, seed=1, scale=0.2), critic,
                        reward_fn=RewardRecorder())
    batch, _ = ppo.rollout(models, queries, query_mask, cfg, 0.3,
                           generator=torch.Generator().manual_seed(5))
    lengths = batch["response_mask"].sum(1).tolist()
    assert len(set(lengths)) > 2, f"the test needs ragged responses, got lengths {lengths}"
    return policy, cfg, batch


def hand_aggregate(v, mask, how):
    mask = mask.float()
    if how == "token_mean":
        return (v * mask).sum() / mask.sum()
    per_row = (v * mask).sum(1)
    if how == "seq_mean_token_mean":
        per_row = per_row / mask.sum(1)
    return per_row.sum() / len(per_row)


def hand_objective(policy, batch, cfg):
    """pg_loss + kl_coef * kl_loss of all rows as one batch, each term written out here: PPO's
    clipped surrogate and the KL sample at the current logprobs, both averaged by cfg.loss_agg."""
    P = batch["queries"].size(1)
    mask = batch["response_mask"]
    logprobs = policy_logprobs(policy, batch["ids"], batch["attention_mask"], P, cfg.temperature)
    ratio = torch.exp(logprobs - batch["logprobs"])
    A = batch["advantages"]
    surrogate = torch.max(-A * ratio, -A * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange))
    x = logprobs - batch["ref_logprobs"]
    k = {"k1": x, "k2": x ** 2 / 2, "k3": torch.exp(-x) - 1 + x}[cfg.kl_estimator]
    pg_loss = hand_aggregate(surrogate, mask, cfg.loss_agg)
    kl_loss = hand_aggregate(k, mask, cfg.loss_agg)
    return pg_loss + cfg.kl_coef * kl_loss, pg_loss, kl_loss


@pytest.mark.parametrize("estimator,loss_agg", [("k1", "token_mean"), ("k2", "seq_mean_token_mean"),
                                                ("k3", "seq_mean_token_sum")])
def test_update_with_the_kl_in_the_loss_takes_the_gradient_of_pg_plus_beta_kl_by_autograd(
        estimator, loss_agg):
    """No critic, one step over the 6 rollouts in 2 micro-batches (a group split between them): the
    gradient is autograd's of pg_loss + kl_coef * the KL estimator's aggregate, and kl_loss and
    pg_loss are their whole-batch values; no vf_loss."""
    policy, cfg, batch = group_rollout()
    assert batch["returns"] is None
    policy = moved(policy, seed=3, scale=0.05)  # ratios not 1
    cfg = dataclasses.replace(cfg, kl_estimator=estimator, loss_agg=loss_agg, kl_coef=0.5,
                              batch_size=6, minibatch_size=6, noptepochs=1, grad_accum=2,
                              grad_clip=0.0)
    params = list(policy.parameters())
    recorder = GradRecorder(params)
    stats = ppo.ppo_update(policy, None, recorder, batch, cfg,
                           generator=torch.Generator().manual_seed(0))
    loss, pg_loss, kl_loss = hand_objective(policy, batch, cfg)
    assert abs(kl_loss.item()) > 1e-3, "the test needs a KL to the reference"
    assert_close_grads(recorder.grads[0], gradients(loss, params))
    assert stats["kl_loss"] == pytest.approx(kl_loss.item(), rel=1e-5)
    assert stats["pg_loss"] == pytest.approx(pg_loss.item(), rel=1e-4, abs=1e-7)
    assert "vf_loss" not in stats and "vf_clipfrac" not in stats


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_a_step_on_the_kl_loss_alone_lowers_the_kl_sample_to_the_reference(estimator):
    """Zero advantages, --kl_penalty loss: one small plain SGD step (the EOS-prone policy's KL
    loss is sharply curved: lr 1e-3 overshoots) moves the policy so that the batch's KL estimate
    to the reference falls (a flipped sign in the loss would raise it)."""
    policy, cfg, batch = group_rollout()
    batch = {**batch, "advantages": torch.zeros_like(batch["advantages"])}
    cfg = dataclasses.replace(cfg, kl_estimator=estimator, kl_coef=1.0, batch_size=6,
                              minibatch_size=6, noptepochs=1, grad_clip=0.0)
    _, _, before = hand_objective(policy, batch, cfg)
    ppo.ppo_update(policy, None, torch.optim.SGD(policy.parameters(), lr=1e-5), batch, cfg,
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, _, after = hand_objective(policy, batch, cfg)
    print(f"{estimator}: KL estimate {before.item():.4f} -> {after.item():.4f}")
    assert after < before * (1 - 5e-4)


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "seq_mean_token_sum"])
def test_micro_batches_of_a_per_response_mean_are_weighted_by_responses(loss_agg):
    """grad_accum 2 and 3 (micro-batches of 3 and 2 ragged responses, unequal token counts) give
    grad_accum 1's gradient and statistics when the loss is a mean over responses: each micro-batch
    weighs its share of the responses, not of the tokens."""
    policy, cfg, batch = group_rollout()
    policy = moved(policy, seed=3, scale=0.05)
    cfg = dataclasses.replace(cfg, loss_agg=loss_agg, kl_coef=0.5, batch_size=6, minibatch_size=6,
                              noptepochs=1, grad_clip=0.0)
    results = {}
    for accumulation in (1, 2, 3):
        p = copy.deepcopy(policy)
        recorder = GradRecorder(p.parameters())
        stats = ppo.ppo_update(p, None, recorder, batch,
                               dataclasses.replace(cfg, grad_accum=accumulation),
                               generator=torch.Generator().manual_seed(0))
        results[accumulation] = recorder.grads[0], stats
    loss, _, _ = hand_objective(policy, batch, cfg)
    expected = gradients(loss, list(policy.parameters()))
    for accumulation in (1, 2, 3):
        grads, stats = results[accumulation]
        assert_close_grads(grads, expected)
        for k in ("pg_loss", "kl_loss", "loss"):
            assert stats[k] == pytest.approx(results[1][1][k], rel=1e-5, abs=1e-7), k


def test_with_a_critic_and_a_per_response_mean_micro_batches_keep_the_value_losss_token_weights():
    """GAE with loss_agg seq_mean_token_mean: the value loss is still a token mean, so grad_accum 2
    must give grad_accum 1's critic gradient, and every statistic its whole-minibatch value."""
    critic = scalar_model(seed=2)
    policy, cfg, batch = group_rollout(critic=critic, estimator="gae")
    policy, critic = moved(policy, seed=3, scale=0.05), moved(critic, seed=4, scale=0.5)
    cfg = dataclasses.replace(cfg, kl_penalty="reward", loss_agg="seq_mean_token_mean",
                              batch_size=6, minibatch_size=6, noptepochs=1, grad_clip=0.0)
    results = {}
    for accumulation in (1, 2):
        p, c = copy.deepcopy(policy), copy.deepcopy(critic)
        recorder = GradRecorder(list(p.parameters()) + list(c.parameters()))
        stats = ppo.ppo_update(p, c, recorder, batch,
                               dataclasses.replace(cfg, grad_accum=accumulation),
                               generator=torch.Generator().manual_seed(0))
        results[accumulation] = recorder.grads[0], stats
    (grads1, stats1), (grads2, stats2) = results[1], results[2]
    assert_close_grads(grads2, grads1)
    for k in stats1:
        assert stats2[k] == pytest.approx(stats1[k], rel=1e-5, abs=1e-7), k


# ------------------------------------------------------------------------- train() without a critic

@pytest.fixture(scope="module")
def small_vocab_policy(tmp_path_factory):
    """A random tiny 'SFT' policy over the fixture prompts' own tokens and EOS (~200 rows, not
    GPT-2's 50257): a train() run takes seconds."""
    enc = get_tokenizer()
    ids = {EOS}
    for split in ("train", "val"):
        for line in open(os.path.join(PPO_FIXTURES, f"prompts_{split}.jsonl")):
            ids |= set(ppo.encode_prompt(enc, json.loads(line)["prompt"], 48))
    torch.manual_seed(0)
    policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128, vocab=sorted(ids),
                           vocab_size=len(ids)))
    return save_checkpoint(str(tmp_path_factory.mktemp("vocab") / "sft.pt"), policy, ppo.Config())


def token_score(queries, query_mask, responses, response_mask):
    """Programmatic reward: sum of (token id mod 7) over the response / 10."""
    return (responses % 7 * response_mask).sum(1).float() / 10


def tiny_run_config(tmp_path, sft_ckpt, **kw):
    kw = {"batch_size": 4, "minibatch_size": 2, "noptepochs": 1, "eval_prompts": 2,
          "eval_interval": 2, **kw}
    return ppo_tiny_config(tmp_path, sft_ckpt=sft_ckpt, **kw)


@pytest.mark.parametrize("estimator,kl_penalty,kl_estimator", [
    ("rloo", "loss", "k1"), ("grpo", "loss", "k3"), ("dr_grpo", "loss", "k2"),
    ("reinforce_pp", "reward", "k3"), ("gae", "loss", "k2")])
def test_train_runs_with_each_estimator_and_saves_a_critic_only_with_gae(
        tmp_path, small_vocab_policy, estimator, kl_penalty, kl_estimator):
    K = 1 if estimator in ("gae", "reinforce_pp") else 2
    cfg = tiny_run_config(tmp_path, small_vocab_policy, advantage_estimator=estimator,
                          samples_per_prompt=K, kl_penalty=kl_penalty, kl_estimator=kl_estimator)
    result = ppo.train(cfg, reward_fn=token_score)
    rows = [json.loads(line) for line in open(result["metrics_path"])]
    assert [r["step"] for r in rows] == [0, 1, 2]
    critic = estimator == "gae"
    for key in ("vf_loss", "vf_clipfrac", "explained_var"):
        assert (key in rows[-1]) == critic, key
    assert ("kl_loss" in rows[-1]) == (kl_penalty == "loss")
    assert all(math.isfinite(rows[-1][k]) for k in ("score", "kl", "pg_loss", "entropy"))
    saved = torch.load(result["ckpt_path"], weights_only=True)
    assert ("critic" in saved) == ("critic_config" in saved) == critic
    assert saved["iteration"] == 2 and saved["config"]["advantage_estimator"] == estimator
    policy, _ = load_model(result["ckpt_path"], "gpt")
    assert isinstance(policy, GPT)


# --------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flag,value", [("advantage_estimator", "foo"), ("kl_estimator", "k4"),
                                        ("kl_penalty", "reward_and_loss"),
                                        ("loss_agg", "token_sum"), ("samples_per_prompt", "0")])
def test_an_unknown_estimator_or_placement_is_refused_naming_the_flag(flag, value):
    with pytest.raises(SystemExit) as e:
        parse_config(ppo.Config, ppo.CONFIGS, [f"--{flag}", value])
    message = str(e.value.code)
    print(message)
    assert message.startswith(f"error: --{flag} {value} is out of range") and "\n" not in message


def test_settings_that_cannot_work_together_are_refused_with_one_line_naming_the_flags(tmp_path):
    refused = [
        (dict(advantage_estimator="grpo"), r"--advantage_estimator grpo .*--samples_per_prompt 2"),
        (dict(advantage_estimator="rloo", samples_per_prompt=4, batch_size=6, minibatch_size=2),
         r"--batch_size 6 must be a multiple of --samples_per_prompt 4"),
        (dict(adaptive_kl=True, kl_penalty="loss"), r"--adaptive_kl .*--kl_penalty loss"),
    ]
    for settings, message in refused:
        with pytest.raises(UsageError, match=message) as e:
            ppo.train(ppo_tiny_config(tmp_path, **settings))
        assert "\n" not in str(e.value)


def test_resuming_a_gae_run_with_another_estimator_is_refused(tmp_path, small_vocab_policy):
    cfg = tiny_run_config(tmp_path, small_vocab_policy, iters=1, eval_interval=1)
    ppo.train(cfg, reward_fn=token_score)
    other = dataclasses.replace(cfg, iters=2, resume=True, advantage_estimator="rloo",
                                samples_per_prompt=2)
    with pytest.raises(UsageError, match=r"trained with --advantage_estimator gae: resume with "
                                         r"the same \(not rloo\)") as e:
        ppo.train(other, reward_fn=token_score)
    assert "\n" not in str(e.value)
