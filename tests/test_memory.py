"""Memory savers in model.py against the plain computation: activation checkpointing of the transformer blocks
(Transformer.grad_checkpoint)."""
import pytest
import torch

import model as model_module
from model import GPT, GPTConfig, ScalarGPT

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
    """A list that gets one entry each time a transformer block starts its forward (recomputations included: a
    pre-hook, since checkpoint stops a recomputation once it has the tensors backward needs)."""
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
def test_grad_checkpoint_gives_the_same_loss_and_gradients_with_dropout_and_padding(cls, monkeypatch):
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
    # dropout was on: another seed gives another loss, so the equality above needed the same masks in the rerun
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
        assert torch.equal(net(idx, mask), plain)  # training mode, no_grad: the same dropout, no checkpoint
        net.transformer.grad_checkpoint = True
    C, nh = DROPOUT.n_embd, DROPOUT.n_head
    kv_cache = [(torch.zeros(3, nh, 11, C // nh), torch.zeros(3, nh, 11, C // nh)) for _ in range(DROPOUT.n_layer)]
    net.transformer(idx, mask, kv_cache)  # training mode, gradients on, but a cache to fill
    net.eval()
    greedy = net.generate(idx, 5, temperature=0.0, attention_mask=mask)
    net.transformer.grad_checkpoint = False
    assert torch.equal(net.generate(idx, 5, temperature=0.0, attention_mask=mask), greedy)
    assert calls == []
