"""PPO's call sites (ppo.py): what rollout() hands to the math, where the critic is read, what the
update recomputes before its first step, and what the critic starts from. Each is checked against a
computation written here token by token (unpadded forwards, plain Python loops), so a refactor that
swaps the arguments of a call, shifts a slice by one position or drops a copy fails here even where
the math functions, tested alone in test_ppo.py, are still right."""
import copy
import dataclasses
import math

import pytest
import torch

import ppo
from conftest import (
    GAMMA,
    KL_COEF,
    LAM,
    PPO_FIXTURES,
    ROLLOUT_SHAPE,
    TEMPERATURE,
    hand_length,
    rollout_case,
)
from lib.checkpoints import load_checkpoint, save_checkpoint
from lib.tokens import EOS, pad_left
from model import GPTConfig, ScalarGPT


def hand_score(response):
    """score_fn (conftest.py) of one response, by hand."""
    return sum(t % 7 for t in response) / 10 - 1


@pytest.fixture(scope="module")
def case():
    c = rollout_case()
    lengths = [hand_length(r) for r in c["batch"]["responses"].tolist()]
    print(f"response lengths {lengths} of {c['batch']['responses'].size(1)}")
    R = c["batch"]["responses"].size(1)
    ragged = len(set(lengths)) >= 3 and min(lengths) < R and max(lengths) == R
    assert ragged, "the test needs ragged responses"
    return c


def prefix_outputs(model, prompt, response):
    """The model's outputs at the positions that see the prompt and y_<t, for each response token t:
    one forward of the unpadded sequence prompt + response, position len(prompt) - 1 + t."""
    out = model(torch.tensor([prompt + response]))[0]  # (n,) or (n, V)
    return [out[len(prompt) - 1 + t] for t in range(len(response))]


def hand_logprobs(policy, prompt, response, temperature):
    return [torch.log_softmax(logits.double() / temperature, -1)[y].item()
            for logits, y in zip(prefix_outputs(policy, prompt, response), response)]


def hand_values(critic, prompt, response):
    return [v.item() for v in prefix_outputs(critic, prompt, response)]


def to_tensor(rows, R):
    """Lists of per-token floats (ragged) -> (B, R) float tensor, 0 after each row's end."""
    out = torch.zeros(len(rows), R)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


# ------------------------------------------------------------------------------------------ rollout

@torch.no_grad()
def test_rollout_rewards_advantages_and_returns_match_a_token_by_token_computation(case):
    """InstructGPT eq. (2) token by token and GAE with gamma 0.9, lambda 0.7, computed here from
    scratch on each unpadded response: r_t = -beta (log pi(y_t) - log pi_ref(y_t)) + score on the
    last real token (the EOS), A_t = delta_t + gamma lambda A_{t+1}, returns A + V, then the
    advantages whitened over all response tokens. Fails if the gamma and lambda of compute_gae are
    swapped, if the KL sign flips, or the score moves."""
    batch, stats = case["batch"], case["stats"]
    R = batch["responses"].size(1)
    rows = dict(logprobs=[], ref_logprobs=[], values=[], kl=[], rewards=[], advantages=[],
                returns=[])
    scores = []
    for prompt, response in zip(case["prompts"], batch["responses"].tolist()):
        y = response[:hand_length(response)]
        lp = hand_logprobs(case["policy"], prompt, y, TEMPERATURE)
        ref = hand_logprobs(case["ref_policy"], prompt, y, TEMPERATURE)
        v = hand_values(case["critic"], prompt, y)
        score = hand_score(y)
        kl = [a - b for a, b in zip(lp, ref)]
        r = [-KL_COEF * k + (score if t == len(y) - 1 else 0.0) for t, k in enumerate(kl)]
        adv, ret = [0.0] * len(y), [0.0] * len(y)
        a, next_v = 0.0, 0.0  # V = 0 after the last token
        for t in reversed(range(len(y))):
            a = r[t] + GAMMA * next_v - v[t] + GAMMA * LAM * a
            adv[t], ret[t], next_v = a, a + v[t], v[t]
        for k, x in zip(rows, (lp, ref, v, kl, r, adv, ret)):
            rows[k].append(x)
        scores.append(score)
    flat = [a for row in rows["advantages"] for a in row]
    mean = sum(flat) / len(flat)
    # population variance, as whiten()
    std = math.sqrt(sum((a - mean) ** 2 for a in flat) / len(flat) + 1e-8)
    rows["advantages"] = [[(a - mean) / std for a in row] for row in rows["advantages"]]
    expected = {k: to_tensor(v, R) for k, v in rows.items()}  # (B, R), 0 on padding
    mask = to_tensor([[1.0] * len(row) for row in rows["kl"]], R).bool()  # (B, R)

    assert torch.equal(batch["response_mask"], mask)
    torch.testing.assert_close(batch["scores"], torch.tensor(scores), atol=1e-6, rtol=0)
    for k in ("logprobs", "ref_logprobs", "values"):  # unspecified on padding
        torch.testing.assert_close(batch[k][mask], expected[k][mask], atol=2e-5, rtol=0, msg=k)
    for k in ("kl", "rewards", "returns", "advantages"):  # 0 on padding
        error = (batch[k] - expected[k]).abs().max().item()
        print(f"{k}: max |rollout - hand| = {error:.1e}")
        torch.testing.assert_close(batch[k], expected[k], atol=5e-5, rtol=0, msg=k)
    assert stats["kl"] == pytest.approx(sum(map(sum, rows["kl"])) / len(scores), abs=1e-4)
    assert stats["reward"] == pytest.approx(sum(map(sum, rows["rewards"])) / len(scores), abs=1e-4)
    assert stats["score"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
    assert abs(stats["kl"]) > 0.1, "the test needs KL != 0"


# ---------------------------------------------------------------------------------- critic position

@torch.no_grad()
def test_critic_value_of_a_response_token_is_read_where_the_state_before_it_ends():
    """critic_values()[:, t] is V(prompt + y_<t): the critic's output at the position of the token
    before y_t (the last prompt token for t = 0), here on left-padded prompts and ragged responses,
    against unpadded forwards. Reading one position later ([:, n_query:]) or earlier
    ([:, n_query - 2:-2]) fails."""
    torch.manual_seed(0)
    critic = ScalarGPT(GPTConfig(**ROLLOUT_SHAPE))
    prompts = [[11, 12, 13], [21, 22, 23, 24, 25], [31, 32]]
    responses = [[41, 42, 43, 44], [51, EOS], [61, 62, 63]]
    queries, query_mask = pad_left(prompts)  # (3, 5)
    R = max(map(len, responses))
    padded = torch.tensor([r + [EOS] * (R - len(r)) for r in responses])  # (3, 4)
    ids = torch.cat([queries, padded], 1)  # (3, 9)
    response_mask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in responses])  # (3, 4)
    attention_mask = torch.cat([query_mask, response_mask], 1)  # (3, 9)
    values = ppo.critic_values(critic, ids, attention_mask, queries.size(1))  # (3, 4)
    expected = to_tensor([hand_values(critic, p, r) for p, r in zip(prompts, responses)], R)
    assert values.shape == (3, R)
    torch.testing.assert_close(values[response_mask.bool()], expected[response_mask.bool()],
                               atol=1e-5, rtol=0)


@torch.no_grad()
def test_rollout_values_are_the_critic_read_before_each_response_token(case):
    """The rollout's values are critic_values() of its sequences (so rollout itself reads the critic
    at the same positions), and those are V(prompt + y_<t) of unpadded forwards."""
    batch = case["batch"]
    P, mask = batch["queries"].size(1), batch["response_mask"]
    direct = ppo.critic_values(case["critic"], batch["ids"], batch["attention_mask"], P)  # (B, R)
    torch.testing.assert_close(batch["values"][mask], direct[mask], atol=1e-6, rtol=0)
    expected = to_tensor([hand_values(case["critic"], p, r[:hand_length(r)])
                          for p, r in zip(case["prompts"], batch["responses"].tolist())],
                         mask.size(1))
    torch.testing.assert_close(batch["values"][mask], expected[mask], atol=1e-5, rtol=0)


def test_update_recomputes_the_rollout_values_and_logprobs_before_its_first_step(case, monkeypatch):
    """ppo_update's first optimizer step (one minibatch of all rows in 2 micro-batches, trimmed of
    padding columns by minibatch()) sees value and logprob tensors equal to the rollout's: ratio 1
    and V = V_old on every response token. After that step (2nd epoch) they differ, so the check
    is not vacuous."""
    calls = {"value": [], "policy": []}
    value_loss, policy_loss = ppo.ppo_value_loss, ppo.ppo_policy_loss

    def recording_value_loss(values, old_values, returns, mask, cliprange_value):
        calls["value"].append((values.detach().clone(), old_values.clone(), mask.clone()))
        return value_loss(values, old_values, returns, mask, cliprange_value)

    def recording_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange, loss_agg):
        calls["policy"].append((logprobs.detach().clone(), old_logprobs.clone(), mask.clone()))
        return policy_loss(logprobs, old_logprobs, advantages, mask, cliprange, loss_agg)
    monkeypatch.setattr(ppo, "ppo_value_loss", recording_value_loss)
    monkeypatch.setattr(ppo, "ppo_policy_loss", recording_policy_loss)
    batch = case["batch"]
    B = batch["ids"].size(0)
    cfg = ppo.Config(**{**dataclasses.asdict(case["cfg"]), "batch_size": B, "minibatch_size": B,
                        "grad_accum": 2, "noptepochs": 2, "grad_clip": 0.0})
    policy, critic = copy.deepcopy(case["policy"]), copy.deepcopy(case["critic"])
    optimizer = torch.optim.Adam(list(policy.parameters()) + list(critic.parameters()), lr=1e-2)
    ppo.ppo_update(policy, critic, optimizer, batch, cfg,
                   generator=torch.Generator().manual_seed(0))
    assert len(calls["value"]) == len(calls["policy"]) == 4  # 2 epochs x 2 micro-batches
    for kind in ("value", "policy"):
        first, later = calls[kind][:2], calls[kind][2:]
        counted = sum(int(m.sum()) for _, _, m in first)
        assert counted == int(batch["response_mask"].sum()), "all tokens seen"
        for new, old, m in first:
            error = (new - old)[m.bool()].abs().max().item()
            print(f"{kind}: first step max |update - rollout| = {error:.1e}")
            assert error < 1e-5, kind
        assert all((new - old)[m.bool()].abs().max() > 1e-3 for new, old, m in later), kind


# -------------------------------------------------------------------------------------- critic init

def train_config(tmp_path, **kw):
    """The smallest train() run: 1 iteration of 4 prompts, 4 new tokens, evaluation on 2 prompts."""
    return ppo.Config(**{**ROLLOUT_SHAPE, "out_dir": str(tmp_path / "out"),
                         "data_dir": PPO_FIXTURES, "sft_ckpt": "scratch", "device": "cpu",
                         "max_prompt_tokens": 32, "max_new_tokens": 4, "iters": 1, "batch_size": 4,
                         "minibatch_size": 4, "noptepochs": 1, "eval_interval": 1,
                         "eval_prompts": 2, "sample_every": 1, "n_samples": 0, "lr": 1e-2,
                         "warmup_iters": 1, **kw})


def count_even(queries, query_mask, responses, response_mask):
    """Programmatic reward: how many response tokens have an even id."""
    return ((responses % 2 == 0) & response_mask).sum(1).float()


@pytest.mark.parametrize("source, reward_fn",
                         [("checkpoint", None), ("checkpoint", count_even), ("scratch", None)],
                         ids=["reward-model", "reward_fn", "scratch"])
def test_critic_starts_as_a_copy_of_the_reward_model_and_trains_apart_from_it(tmp_path, monkeypatch,
                                                                              source,
                                                                               reward_fn):
    """InstructGPT 3.5: the value function is initialised from the reward model. At the first
    rollout the critic's weights equal the reward checkpoint's (head included), or those of the
    "scratch" reward model the run scores with; it is another object, and training it leaves the
    reward model as it was."""
    if source == "checkpoint":
        torch.manual_seed(7)
        rm = ScalarGPT(GPTConfig(**ROLLOUT_SHAPE))
        with torch.no_grad():
            rm.score_head.bias.fill_(0.5)  # unlike a fresh head's 0
        reward_ckpt = save_checkpoint(str(tmp_path / "rm.pt"), rm, ppo.Config(), reward_shift=0.0)
        rm_state = load_checkpoint(reward_ckpt)["model"]
    else:
        reward_ckpt, rm_state = "scratch", None
    seen = []
    rollout = ppo.rollout

    def capturing_rollout(models, *args, **kwargs):
        critic, reward_model = models.critic, models.reward_model
        if not seen:
            rm_copy = None if reward_model is None else copy.deepcopy(reward_model.state_dict())
            seen.append(dict(critic=critic, reward_model=reward_model,
                             critic_state=copy.deepcopy(critic.state_dict()), rm_state=rm_copy))
        return rollout(models, *args, **kwargs)
    monkeypatch.setattr(ppo, "rollout", capturing_rollout)
    result = ppo.train(train_config(tmp_path, reward_ckpt=reward_ckpt), reward_fn=reward_fn)
    start = seen[0]
    if rm_state is None:  # scratch: the reward model the run built is the reference
        rm_state = start["rm_state"]
    if reward_fn is None:
        assert start["reward_model"] is not None
        assert start["critic"] is not start["reward_model"], \
            "the critic is the reward model itself, not a copy"
        assert start["rm_state"].keys() == rm_state.keys()
        assert all(torch.equal(start["rm_state"][k], v) for k, v in rm_state.items()), \
            "reward model as loaded"
    assert start["critic_state"].keys() == rm_state.keys()
    for k, v in rm_state.items():
        assert torch.equal(start["critic_state"][k], v), \
            f"critic starts unlike the reward model in {k}"
    # after one iteration: the critic moved, the reward model did not
    trained = load_checkpoint(result["ckpt_path"])["critic"]
    assert all(torch.equal(trained[k], v) for k, v in start["critic"].state_dict().items())
    moved = max((trained[k] - v).abs().max().item() for k, v in rm_state.items())
    print(f"critic moved by up to {moved:.2e} from the reward model")
    assert moved > 1e-4
    if reward_fn is None:
        rm_after = start["reward_model"].state_dict()
        assert all(torch.equal(v, rm_state[k]) for k, v in rm_after.items())
        assert not any(p.requires_grad for p in start["reward_model"].parameters())
