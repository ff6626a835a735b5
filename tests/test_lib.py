"""The library layer (lib/): the pieces every script shares, each against a reference written here."""
import contextlib

import pytest
import torch

import reward
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
    prompts = [f"helpful {i}" for i in range(30)] + [f"truthful {i}" for i in range(30)] + \
              [f"harmless {i}" for i in range(30)]  # the lab's prompts_val.jsonl is sorted like this
    chosen = spread(prompts, 16)
    counts = {c: sum(p.startswith(c) for p in chosen) for c in ("helpful", "truthful", "harmless")}
    print(counts)
    assert len(set(chosen)) == 16 and all(c in (5, 6) for c in counts.values())
    assert chosen == sorted(chosen, key=prompts.index)  # in file order
    assert spread(prompts[:5], 16) == prompts[:5] and spread(prompts, 1) == [prompts[0]]


def test_step_total_in_one_process_is_the_count_and_never_zero():
    assert step_total(37) == 37.0 and step_total(0) == 1.0


def test_reward_model_token_budgets_are_reward_py_defaults():
    """label.py and sample.py score with a reward model whose checkpoint may not record its budgets."""
    assert RM_TOKEN_BUDGETS == {k: getattr(reward.Config, k) for k in RM_TOKEN_BUDGETS}


def test_score_texts_reads_each_text_alone_at_its_eos():
    """Batched, right-padded scoring equals scoring each prompt + response + EOS on its own."""
    torch.manual_seed(0)
    rm = ScalarGPT(SHAPE).eval()
    enc = get_tokenizer()
    prompts, responses = ["Hi there", "A longer prompt, with more tokens in it"], [" hello", " a reply that runs on"]
    budgets = {"max_prompt_tokens": 8, "max_response_tokens": 3}
    ours = score_texts(rm, budgets, enc, prompts, responses, contextlib.nullcontext())
    for p, r, s in zip(prompts, responses, ours):
        seq = rm_tokens(enc, p, r, 8, 3)
        assert seq[-1] == EOS and len(seq) <= 8 + 3 + 1
        ref = rm(torch.tensor([seq]))[0, -1].item()  # the head at the last token, no padding anywhere
        assert s == pytest.approx(ref, abs=1e-5)


def test_sample_and_score_and_kl_match_the_models_read_by_hand():
    """Sampled responses end at their first EOS; the score is the RM's at that EOS (or at an appended one);
    sequence_kl is the sum over the response of log pi - log pi_ref from full forwards."""
    torch.manual_seed(0)
    policy, ref_policy, rm = GPT(SHAPE).eval(), GPT(SHAPE).eval(), ScalarGPT(SHAPE).eval()
    with torch.no_grad():  # make EOS likely (about one token in seven), so some responses end early
        direction = torch.randn(SHAPE.n_embd)
        policy.transformer.ln_f.bias.copy_(direction)
        policy.lm_head.weight[EOS] = direction * 9.0 / direction.norm() ** 2
    queries, query_mask = pad_left([[5, 6, 7], [8, 9], [10, 11, 12], [13]])
    batch = sample_and_score(policy, queries, query_mask, 6, 1.0, torch.Generator().manual_seed(0), rm)
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
    assert P == 3 and batch["has_eos"].any() and not batch["has_eos"].all(), "the case needs both kinds of response"


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
    assert scores[1].item() == pytest.approx(rm(torch.tensor([[4, 5, EOS]]))[0, -1].item(), abs=1e-5)
