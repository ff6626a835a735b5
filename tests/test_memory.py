"""Memory savers in model.py against the plain computation: activation checkpointing of the
transformer blocks (Transformer.grad_checkpoint) and the chunked output layer
(chunked_token_logprobs, GPT(idx, targets=...))."""
import pytest
import torch

import model as model_module
import sft
from conftest import DEMOS, sft_tiny_config, write_data
from model import GPT, GPTConfig, ScalarGPT, chunked_token_logprobs, token_logprobs

DROPOUT = GPTConfig(block_size=32, vocab_size=53, n_layer=3, n_head=2, n_embd=16, dropout=0.2)


def padded_batch(vocab, seed=0):
    """Left-padded (B, T) ids and attention_mask: rows of 11, 6 and 2 real tokens."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :9] = 0
    return idx, mask


def count_checkpoint_calls(monkeypatch):
    """Spy on model.py's checkpoint: a list that gets one entry per checkpointed block call."""
    calls, real = [], model_module.checkpoint

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", spy)
    return calls


def count_block_forwards(net):
    """A list that gets one entry each time a transformer block starts its forward
    (recomputations included: a pre-hook, since checkpoint stops a recomputation once it has the
    tensors backward needs)."""
    runs = []
    for block in net.transformer.h:
        block.register_forward_pre_hook(lambda *_: runs.append(1))
    return runs


def loss_and_grads(net, idx, mask, grad_checkpoint):
    net.transformer.grad_checkpoint = grad_checkpoint
    torch.manual_seed(123)  # the same dropout masks for both runs
    out = net(idx, mask).float()  # (B, T, V) or (B, T)
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape)  # every output counts, differently
    loss = (out * weights * mask.view(*mask.shape, *[1] * (out.dim() - 2))).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("cls", [GPT, ScalarGPT])
def test_grad_checkpoint_gives_the_same_loss_and_gradients_with_dropout_and_padding(
        cls, monkeypatch):
    torch.manual_seed(0)
    net = cls(DROPOUT).train()
    idx, mask = padded_batch(DROPOUT.vocab_size)
    loss, grads = loss_and_grads(net, idx, mask, grad_checkpoint=False)
    calls, runs = count_checkpoint_calls(monkeypatch), count_block_forwards(net)
    loss_ckpt, grads_ckpt = loss_and_grads(net, idx, mask, grad_checkpoint=True)
    assert len(calls) == DROPOUT.n_layer  # every block went through checkpoint ...
    assert len(runs) == 2 * DROPOUT.n_layer  # ... and was run again in backward
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # dropout was on: another seed gives another loss, so the equality above needed the same masks
    # in the rerun
    torch.manual_seed(7)
    assert not torch.allclose(net(idx, mask).float().sum(), loss_and_grads(net, idx, mask, True)[0])


def test_grad_checkpoint_is_skipped_in_eval_under_no_grad_and_with_a_kv_cache(monkeypatch):
    torch.manual_seed(0)
    net = GPT(DROPOUT)
    idx, mask = padded_batch(DROPOUT.vocab_size)
    net.eval()
    reference = net(idx, mask)
    net.transformer.grad_checkpoint = True
    calls = count_checkpoint_calls(monkeypatch)
    assert torch.equal(net(idx, mask), reference)  # eval, gradients on
    net.train()
    with torch.no_grad():
        torch.manual_seed(1)
        plain = net(idx, mask)
        net.transformer.grad_checkpoint = False
        torch.manual_seed(1)
        # training mode, no_grad: the same dropout, no checkpoint
        assert torch.equal(net(idx, mask), plain)
        net.transformer.grad_checkpoint = True
    C, nh = DROPOUT.n_embd, DROPOUT.n_head
    kv_cache = [(torch.zeros(3, nh, 11, C // nh), torch.zeros(3, nh, 11, C // nh))
                for _ in range(DROPOUT.n_layer)]
    net.transformer(idx, mask, kv_cache)  # training mode, gradients on, but a cache to fill
    net.eval()
    greedy = net.generate(idx, 5, temperature=0.0, attention_mask=mask)
    net.transformer.grad_checkpoint = False
    assert torch.equal(net.generate(idx, 5, temperature=0.0, attention_mask=mask), greedy)
    assert calls == []


@pytest.mark.parametrize("shape, chunk",
                         [((2, 7), 3), ((3, 5), 4), ((1, 1), 5), ((13,), 13), ((4, 9), 100)])
def test_chunked_token_logprobs_equal_the_whole_logits_in_values_and_gradients(shape, chunk):
    g = torch.Generator().manual_seed(sum(shape) + chunk)
    V, C, temperature = 41, 12, 0.7
    hidden = torch.randn(*shape, C, generator=g, requires_grad=True)  # (..., C)
    weight = torch.randn(V, C, generator=g, requires_grad=True)  # (V, C)
    tokens = torch.randint(0, V, shape, generator=g)  # (...)
    # a weight per position: gradients differ by position
    upstream = torch.randn(shape, generator=g)

    def run(fn):
        out = fn()
        (out * upstream).sum().backward()
        grads = hidden.grad.clone(), weight.grad.clone()
        hidden.grad, weight.grad = None, None
        return out.detach(), grads

    want, (want_dh, want_dw) = run(lambda: token_logprobs(hidden @ weight.T, tokens, temperature))
    got, (dh, dw) = run(lambda: chunked_token_logprobs(hidden, weight, tokens, temperature, chunk))
    assert got.shape == tokens.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh, want_dh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, want_dw, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        got = chunked_token_logprobs(hidden, weight, tokens, temperature, chunk)
        torch.testing.assert_close(got, want)


def test_chunked_token_logprobs_keep_no_more_than_a_chunk_of_logits_for_backward():
    V, C, chunk = 41, 12, 3
    hidden = torch.randn(4, 5, C, requires_grad=True)
    weight = torch.randn(V, C, requires_grad=True)
    tokens = torch.randint(0, V, (4, 5))

    def saved_logit_rows(fn):
        """The most rows of any (rows, V) tensor autograd keeps for backward while fn runs."""
        rows = [0]

        def pack(t):
            if t.dim() >= 2 and t.size(-1) == V:
                rows.append(t.numel() // V)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().sum().backward()
        return max(rows)

    # all of them: the reference
    assert saved_logit_rows(lambda: token_logprobs(hidden @ weight.T, tokens)) == 20
    chunked = lambda: chunked_token_logprobs(hidden, weight, tokens, chunk=chunk)
    assert saved_logit_rows(chunked) <= chunk


def test_gpt_with_targets_returns_the_logprobs_of_its_logits_with_the_same_gradients():
    torch.manual_seed(0)
    net = GPT(DROPOUT).eval()
    idx, mask = padded_batch(DROPOUT.vocab_size, seed=1)
    start, temperature = 4, 1.3
    targets = torch.roll(idx, -1, dims=1)[:, start:]  # (B, T - start)

    def run(fn):
        out = fn()
        (out * mask[:, start:]).sum().backward()
        grads = {name: p.grad.clone() for name, p in net.named_parameters()}
        net.zero_grad(set_to_none=True)
        return out.detach(), grads

    want, want_grads = run(
        lambda: token_logprobs(net(idx, mask, start=start), targets, temperature))
    got, grads = run(lambda: net(idx, mask, start=start, targets=targets, temperature=temperature,
                                 chunk=5))
    assert got.shape == targets.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_the_stages_flag_checkpoints_every_block_to_the_same_losses(tmp_path, monkeypatch):
    """--grad_checkpoint true through sft.train: every block of every training step goes through
    checkpoint, and the losses are those of a run without it (dropout on, same seed)."""
    data_dir = write_data(tmp_path / "data", DEMOS, DEMOS)
    calls = []
    checkpoint = model_module.checkpoint
    counting = lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    monkeypatch.setattr(model_module, "checkpoint", counting)
    runs = []
    for flag in (False, True):
        runs.append(sft.train(sft_tiny_config(tmp_path / str(flag), data_dir, max_steps=4,
                                              eval_interval=4, dropout=0.1, grad_checkpoint=flag)))
        assert len(calls) == (4 * 2 if flag else 0)  # 4 steps x 2 blocks, only with the flag
    for key in ("train_loss", "val_loss"):
        assert runs[1][key] == pytest.approx(runs[0][key], rel=1e-5), key
