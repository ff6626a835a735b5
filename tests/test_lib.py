"""The library layer (lib/): the pieces every script shares, each against a
reference written here."""
import contextlib

import pytest
import torch

import lib.ddp
import reward
from conftest import PROMPTS, RewardRecorder, hand_length, last_output, ragged_policy, scalar_model
from lib.data import spread
from lib.ddp import step_total
from lib.responses import (
    RM_TOKEN_BUDGETS,
    decode_responses,
    rm_tokens,
    sample_and_score,
    sample_responses,
    score_sequences,
    score_texts,
    sequence_kl,
)
from lib.tokens import EOS, get_tokenizer, pad_left, pad_right
from model import GPT, GPTConfig, ScalarGPT, token_logprobs

SHAPE = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)


def test_spread_gives_every_category_of_a_sorted_file_its_share():
    # the lab's prompts_val.jsonl is sorted like this
    prompts = [f"{c} {i}" for c in ("helpful", "truthful", "harmless") for i in range(30)]
    chosen = spread(prompts, 16)
    counts = {c: sum(p.startswith(c) for p in chosen) for c in ("helpful", "truthful", "harmless")}
    print(counts)
    assert len(set(chosen)) == 16 and all(c in (5, 6) for c in counts.values())
    assert chosen == sorted(chosen, key=prompts.index)  # in file order
    assert spread(prompts[:5], 16) == prompts[:5] and spread(prompts, 1) == [prompts[0]]


def test_step_total_in_one_process_is_the_count_and_never_zero():
    assert step_total(37) == 37.0 and step_total(0) == 1.0


def test_step_total_on_two_ranks_is_the_items_of_both_over_the_world_size(monkeypatch):
    """A stand-in second rank holding 5 items: step_total(3) is (3 + 5) / 2, the sum all-reduced as
    a float; with no item on either rank it is 1 / 2 (never a division by 0)."""
    sent = []
    monkeypatch.setattr(lib.ddp, "get_world_size", lambda: 2)
    monkeypatch.setattr(lib.ddp, "all_reduce_sum", lambda x: sent.append(x) or x + 5.0)
    assert step_total(3) == 4.0
    assert sent == [3.0] and type(sent[0]) is float
    monkeypatch.setattr(lib.ddp, "all_reduce_sum", lambda x: x)
    assert step_total(0) == 0.5


def test_reward_model_token_budgets_are_reward_py_defaults():
    """label.py and sample.py score with a reward model whose checkpoint may not
    record its budgets."""
    assert RM_TOKEN_BUDGETS == {k: getattr(reward.Config, k) for k in RM_TOKEN_BUDGETS}


def test_score_texts_reads_each_text_alone_at_its_eos():
    """Batched, right-padded scoring equals scoring each prompt + response + EOS on its own."""
    torch.manual_seed(0)
    rm = ScalarGPT(SHAPE).eval()
    enc = get_tokenizer()
    prompts = ["Hi there", "A longer prompt, with more tokens in it"]
    responses = [" hello", " a reply that runs on"]
    budgets = {"max_prompt_tokens": 8, "max_response_tokens": 3}
    ours = score_texts(rm, budgets, enc, prompts, responses, contextlib.nullcontext())
    for p, r, s in zip(prompts, responses, ours):
        seq = rm_tokens(enc, p, r, 8, 3)
        assert seq[-1] == EOS and len(seq) <= 8 + 3 + 1
        # the head at the last token, no padding anywhere
        ref = rm(torch.tensor([seq]))[0, -1].item()
        assert s == pytest.approx(ref, abs=1e-5)


def test_sample_and_score_and_kl_match_the_models_read_by_hand():
    """Sampled responses end at their first EOS; the score is the RM's at that EOS (or at
    an appended one); sequence_kl is the sum over the response of log pi - log pi_ref
    from full forwards."""
    torch.manual_seed(0)
    policy, ref_policy, rm = GPT(SHAPE).eval(), GPT(SHAPE).eval(), ScalarGPT(SHAPE).eval()
    with torch.no_grad():  # make EOS likely (about one token in seven), so some responses end early
        direction = torch.randn(SHAPE.n_embd)
        policy.transformer.ln_f.bias.copy_(direction)
        policy.lm_head.weight[EOS] = direction * 9.0 / direction.norm() ** 2
    queries, query_mask = pad_left([[5, 6, 7], [8, 9], [10, 11, 12], [13]])
    batch = sample_and_score(policy, queries, query_mask, 6, 1.0,
                             torch.Generator().manual_seed(0), rm)
    kl = sequence_kl(policy, ref_policy, batch)
    P = queries.size(1)
    texts = decode_responses(get_tokenizer(), batch)
    for i in range(4):
        prompt = queries[i][query_mask[i].bool()].tolist()
        response = batch["responses"][i].tolist()
        n = response.index(EOS) + 1 if EOS in response else len(response)
        assert batch["response_mask"][i].tolist() == [True] * n + [False] * (len(response) - n)
        seq = torch.tensor([prompt + response[:n] + ([] if EOS in response[:n] else [EOS])])
        assert batch["scores"][i].item() == pytest.approx(rm(seq)[0, -1].item(), abs=1e-5)
        full = torch.tensor([prompt + response[:n]])
        lp = token_logprobs(policy(full)[:, :-1], full[:, 1:])[0, -n:]
        ref_lp = token_logprobs(ref_policy(full)[:, :-1], full[:, 1:])[0, -n:]
        assert kl[i].item() == pytest.approx((lp - ref_lp).sum().item(), abs=1e-4)
        assert texts[i] == get_tokenizer().decode([t for t in response[:n] if t != EOS])
    print(f"has_eos {batch['has_eos'].tolist()}")
    both = batch["has_eos"].any() and not batch["has_eos"].all()
    assert P == 3 and both, "the case needs both kinds of response"


def sample(max_new_tokens, temperature=1.0, seed=0, reward_model=None, reward_fn=None, policy=None):
    """sample_and_score on PROMPTS (left-padded) with a generator seeded `seed`."""
    queries, query_mask = pad_left(PROMPTS)
    policy = ragged_policy() if policy is None else policy
    return sample_and_score(policy, queries, query_mask, max_new_tokens, temperature,
                            torch.Generator().manual_seed(seed), reward_model=reward_model,
                            reward_fn=reward_fn)


def test_samples_are_those_of_generate_at_the_given_temperature_with_the_given_generator():
    """The responses are policy.generate's at the temperature passed (0.7, not the default 1; the
    default is 1) with EOS as the stop token and the generator passed in: the same seed gives the
    same responses, another seed others."""
    policy = ragged_policy()
    queries, query_mask = pad_left(PROMPTS)
    batch = sample(10, 0.7, seed=3, reward_fn=RewardRecorder(), policy=policy)
    reference = policy.generate(queries, 10, temperature=0.7, eos_token_id=EOS,
                                attention_mask=query_mask,
                                generator=torch.Generator().manual_seed(3))
    assert torch.equal(batch["ids"], reference)
    again = sample(10, 0.7, seed=3, reward_fn=RewardRecorder(), policy=policy)
    assert torch.equal(again["ids"], batch["ids"])
    other = sample(10, 0.7, seed=4, reward_fn=RewardRecorder(), policy=policy)
    assert not torch.equal(other["ids"][:, :batch["ids"].size(1)],
                           batch["ids"][:, :other["ids"].size(1)])
    default = sample_and_score(policy, queries, query_mask, 10, reward_fn=RewardRecorder(),
                               generator=torch.Generator().manual_seed(3))  # temperature: default
    reference = policy.generate(queries, 10, temperature=1.0, eos_token_id=EOS,
                                attention_mask=query_mask,
                                generator=torch.Generator().manual_seed(3))
    assert torch.equal(default["ids"], reference)


def test_sampled_responses_are_only_eos_after_their_first_eos_and_end_when_all_rows_have_one():
    """Generation stops at EOS: after a row's first EOS come only EOS (padding), and with every row
    ended early the responses are shorter than max_new_tokens. has_eos, the response mask and the
    attention mask follow a Python scan of each row."""
    batch = sample(20, 1.0, seed=0, reward_fn=RewardRecorder(),
                   policy=ragged_policy(seed=1, strength=6.0))
    responses = batch["responses"].tolist()
    lengths = [hand_length(r) for r in responses]
    print(f"response lengths {lengths} of {len(responses[0])}")
    assert all(EOS in r for r in responses) and len(responses[0]) < 20, "all rows ended early"
    assert len(set(lengths)) > 1
    for r, n in zip(responses, lengths):
        assert r[n:] == [EOS] * (len(r) - n)
    mask = [[1] * n + [0] * (len(r) - n) for r, n in zip(responses, lengths)]
    assert batch["response_mask"].tolist() == [[bool(m) for m in row] for row in mask]
    assert batch["has_eos"].tolist() == [True] * len(PROMPTS)
    queries, query_mask = pad_left(PROMPTS)
    assert batch["attention_mask"].tolist() == [q + m for q, m in zip(query_mask.tolist(), mask)]
    assert batch["attention_mask"].dtype == query_mask.dtype
    assert torch.equal(batch["queries"], queries)
    assert torch.equal(batch["responses"], batch["ids"][:, queries.size(1):])


def test_has_eos_is_true_exactly_for_the_responses_that_contain_one():
    batch = sample(12, 1.0, seed=0, reward_fn=RewardRecorder())
    has_eos = [EOS in r for r in batch["responses"].tolist()]
    print(f"has_eos {has_eos}")
    assert any(has_eos) and not all(has_eos), "the test needs responses with and without EOS"
    assert batch["has_eos"].tolist() == has_eos


def test_reward_fn_gets_the_queries_their_mask_the_responses_and_the_response_mask():
    recorder = RewardRecorder()
    batch = sample(12, 1.0, seed=0, reward_fn=recorder)
    queries, query_mask = pad_left(PROMPTS)
    (q, qm, r, rm), = recorder.calls
    assert torch.equal(q, queries) and torch.equal(qm, query_mask)
    assert torch.equal(r, batch["ids"][:, queries.size(1):])
    assert rm.tolist() == [[t < hand_length(row) for t in range(len(row))] for row in r.tolist()]
    expected = [float(sum(t % 5 for t in row[:hand_length(row)])) for row in r.tolist()]
    assert batch["scores"].dtype == torch.float32 and batch["scores"].tolist() == expected


def test_reward_model_scores_each_response_at_its_eos_appended_where_missing():
    """Without reward_fn the score of a row is the reward model's output at the EOS ending
    prompt + response, an EOS appended to the responses cut at max_new_tokens: one unpadded
    forward per row."""
    rm = scalar_model(seed=9)
    batch = sample(12, 1.0, seed=0, reward_model=rm)
    assert batch["has_eos"].any() and not batch["has_eos"].all()
    expected = []
    with torch.no_grad():
        for prompt, response in zip(PROMPTS, batch["responses"].tolist()):
            y = response[:hand_length(response)]
            expected.append(last_output(rm, prompt + y + ([] if EOS in y else [EOS])).item())
    print(f"scores {batch['scores'].tolist()} hand {expected}")
    assert batch["scores"].tolist() == pytest.approx(expected, abs=1e-5)


def test_greedy_sampling_is_the_argmax_at_every_step():
    torch.manual_seed(0)
    policy = GPT(SHAPE).eval()
    queries, query_mask = pad_left([[5, 6, 7]])
    batch = sample_responses(policy, queries, query_mask, 4, temperature=0)
    seq = [5, 6, 7]
    for _ in range(4):
        nxt = policy(torch.tensor([seq]))[0, -1].argmax().item()
        seq.append(nxt)
        if nxt == EOS:
            break
    assert batch["responses"][0].tolist()[:len(seq) - 3] == seq[3:]


def test_score_sequences_reads_the_last_real_token_of_right_padding():
    torch.manual_seed(0)
    rm = ScalarGPT(SHAPE).eval()
    ids, mask = pad_right([[1, 2, 3, EOS], [4, 5, EOS]])
    scores = score_sequences(rm, ids, mask)
    alone = rm(torch.tensor([[4, 5, EOS]]))[0, -1].item()
    assert scores[1].item() == pytest.approx(alone, abs=1e-5)
