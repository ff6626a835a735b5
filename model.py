"""
One self-contained GPT (the GPT-2 architecture) shared by every stage of the pipeline.

- `GPT`: token + learned position embeddings, pre-LayerNorm transformer blocks (causal
  self-attention through `F.scaled_dot_product_attention`, GELU MLP), final LayerNorm, `lm_head`
  tied to the token embedding. Used for the SFT model, the PPO policy and its frozen reference.
- `ScalarGPT`: the same trunk with a `Linear(n_embd, 1)` head, one score per position. Used for the
  reward model and the PPO critic (InstructGPT section 3.5: "the SFT model with the final
  unembedding layer removed").
- `GPT.generate`: sampling with a KV cache (temperature, top-k, top-p, EOS), left-padded batches.
- A world's vocabulary (`GPTConfig.vocab`, the lab's): rows for a subset of GPT-2's ids only;
  token ids stay GPT-2's outside the model (`Transformer.rows` maps them in, `generate` maps a
  sampled row back out).
- `GPT.from_pretrained`: OpenAI's GPT-2 weights in the Hugging Face format (config.json +
  model.safetensors) from a local folder; no network code here (lib/checkpoints.py's
  fetch_gpt2 fetches them).
- `token_logprobs`: log-probabilities of given tokens, used by SFT, PPO and evaluation;
  `chunked_token_logprobs` (and `GPT(idx, targets=...)`) the same from hidden states, a chunk
  of logits at a time.

Mask convention (the one used everywhere in this repository): a mask is 1/True on positions that
count (real tokens, response tokens, ...) and 0/False on positions that do not (padding). The
`attention_mask` of a batch is the Hugging Face one: 1 on real tokens, 0 on padding.

Imports only torch, safetensors (to read weight files) and the standard library.
"""

import contextlib
import copy
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum sequence length (GPT-2: 1024 positions)
    vocab_size: int = 50257  # GPT-2 BPE vocabulary, <|endoftext|> = 50256
    # the GPT-2 ids (sorted) the model has rows for: a world's vocabulary (data/lab); None = all
    vocab: list = None
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as in GPT-2


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} must be divisible by n_head {config.n_head}")
        self.n_head = config.n_head
        # q, k, v at once
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, attn_mask=None, kv_cache=None, past_len=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            # The cache is preallocated for the whole generation: write this step's keys/values in
            # place and attend over everything so far (no torch.cat, no reallocation per step).
            k_cache, v_cache = kv_cache  # (B, nh, T_max, hs) each
            k_cache[:, :, past_len:past_len + T] = k
            v_cache[:, :, past_len:past_len + T] = v
            k, v = k_cache[:, :, :past_len + T], v_cache[:, :, :past_len + T]  # (B, nh, S, hs)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None and past_len == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 uses the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


# ----------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021, arXiv:2106.09685): a frozen weight W plus a trained low-rank update,
#   h = W x + (alpha / r) B A x,
# with A (r, in) random and B (out, r) zero at the start (eq. 3), so training starts from the base
# model exactly. On the four projections of every block; everything else stays frozen.

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRALinear(nn.Linear):
    """nn.Linear (same `weight` and `bias`, so state-dict names stay GPT-2's) + the adapter
    lora_A, lora_B. `enabled = False` runs the base layer alone: PPO's reference policy is the
    policy with its adapters off."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        # not nn.Linear's __init__: it would allocate and initialise a weight only to drop it
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the base layer's own tensors, not copies
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))  # B = 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises weights
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x):
        y = super().forward(x)  # (..., out)
        if not self.enabled:
            return y
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return y + self.scale * lora

    def merged_weight(self):
        """W + (alpha / r) B A: the plain Linear weight giving this layer's output (adapters on),
        in float32 (W may be bf16)."""
        return self.weight.float() + self.scale * (self.lora_B @ self.lora_A)


def add_lora(model, rank, alpha, dropout=0.0):
    """Put an adapter on each LORA_TARGETS projection of `model` (a GPT or ScalarGPT), in place,
    and freeze every parameter but the adapters; a caller that also trains a head unfreezes it.
    Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.h:
        for target in LORA_TARGETS:
            parent, name = target.split(".")
            module = getattr(getattr(block, parent), name)
            if not isinstance(module, LoRALinear):
                setattr(getattr(block, parent), name, LoRALinear(module, rank, alpha, dropout))
    return model


@contextlib.contextmanager
def lora_disabled(model):
    """The base model: every adapter of `model` off inside the block (a no-op without adapters)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def share_weights(module):
    """A new module tree over the same parameter and buffer tensors (nothing copied): adapters added
    to it leave `module` as it was while both read one set of frozen weights. Under LoRA, PPO's
    policy is add_lora(share_weights(ref_policy)) and its critic is
    add_lora(share_weights(reward_model)) with its own head."""
    clone = copy.copy(module)
    clone._modules = {name: None if child is None else share_weights(child)
                      for name, child in module._modules.items()}
    clone._parameters, clone._buffers = dict(module._parameters), dict(module._buffers)
    return clone


def lora_state_dict(model):
    """The trained part of a LoRA model: its adapters and any parameter left trainable (a head)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad or "lora_" in name}
    return {k: v for k, v in model.state_dict().items() if k in trained}


def merged_state_dict(model):
    """The state dict of the plain model with the same outputs, which export.py and the next stage
    load: each adapter folded into its weight, W <- W + (alpha / r) B A, and the lora_ tensors
    dropped."""
    sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[name + ".weight"] = m.merged_weight().detach()
    return sd


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None, past_len=0):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, past_len)  # pre-LayerNorm residual
        return x + self.mlp(self.ln_2(x))


def attention_bias(attention_mask, T, past_len=0):
    """Boolean SDPA mask (B, 1, T, S) for T new queries after `past_len` cached positions.

    Query i (absolute position past_len + i) may attend to key j when j <= past_len + i (causal) and
    key j is a real token. A padding query would then see no key at all (NaN from softmax), so every
    query may also attend to itself; the outputs at padding positions are never used.
    """
    S = past_len + T
    device = attention_mask.device
    q_idx = torch.arange(past_len, S, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=device)[None, :]  # (1, S)
    keep = attention_mask[:, None, None, :S].bool() & (k_idx <= q_idx)  # (B, 1, T, S)
    return keep | (k_idx == q_idx)  # (B, 1, T, S)


class Transformer(nn.Module):
    """The GPT-2 trunk: embeddings, blocks, final LayerNorm. Returns hidden states (B, T, C).

    A world's vocabulary (config.vocab, data/lab/prepare.py): text is still GPT-2 BPE and every
    token id outside the model stays GPT-2's, but the model holds rows for the ids in config.vocab
    only (~290 for the lab's world instead of 50257, so its output layer is ~190x smaller). `rows`
    maps GPT-2 ids to those rows on the way in (embedding, targets), and GPT.generate maps a sampled
    row back to its GPT-2 id."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        ids = row_of = None
        if config.vocab is not None:
            vocab = list(config.vocab)
            if vocab != sorted(set(vocab)) or config.vocab_size != len(vocab):
                raise ValueError(f"vocab must be {config.vocab_size} sorted distinct GPT-2 ids")
            ids = torch.tensor(vocab, dtype=torch.long)  # (V,) row -> GPT-2 id
            # GPT-2 id -> row, -1 outside the vocabulary
            row_of = torch.full((int(ids[-1]) + 1,), -1, dtype=torch.long)
            row_of[ids] = torch.arange(len(ids))
        # part of the config, not of the weights
        self.register_buffer("vocab_ids", ids, persistent=False)
        self.register_buffer("row_of", row_of, persistent=False)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        # recompute each block in backward instead of keeping its activations
        self.grad_checkpoint = False

    def forward(self, idx, attention_mask=None, kv_cache=None, past_len=0):
        """idx (B, T) new tokens; attention_mask (B, past_len + T) over cached and new tokens."""
        B, T = idx.shape
        if attention_mask is None and past_len > 0:
            attention_mask = torch.ones(B, past_len + T, dtype=torch.long, device=idx.device)
        if attention_mask is None:  # no padding, no cache: plain causal attention
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
            attn_mask = None
        else:
            # Position ids count real tokens only, so a left-padded sequence sees the same positions
            # (0, 1, 2, ...) as when it is run alone.
            pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
            attn_mask = attention_bias(attention_mask, T, past_len)  # (B, 1, T, S)
        if pos.max() >= self.config.block_size:
            raise ValueError(
                f"sequence of {int(pos.max()) + 1} tokens exceeds block_size "
                f"{self.config.block_size}: shorten the prompt or lower max_new_tokens")
        x = self.drop(self.wte(self.rows(idx)) + self.wpe(pos))  # (B, T, C)
        # Activation checkpointing: backward needs every block's inner activations (attention
        # inputs, the 4C-wide MLP, dropout masks), n_layer sets of them. Checkpointed, a block keeps
        # only its input x and reruns its forward during backward, so one block's activations are
        # alive at a time; the price is one more forward (~1/3 more compute). The RNG state is saved
        # and restored, so the rerun draws the same dropout masks.
        recompute = (self.grad_checkpoint and self.training and torch.is_grad_enabled()
                     and kv_cache is None)
        for i, block in enumerate(self.h):
            if recompute:
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask, None if kv_cache is None else kv_cache[i], past_len)
        return self.ln_f(x)  # (B, T, C)

    def rows(self, idx):
        """GPT-2 token ids -> rows of wte and of the output layer (the same ids without a world's
        vocabulary). An id outside the vocabulary is an error, never another token's row
        (lib/tokens.py names the text first)."""
        if self.row_of is None:
            return idx
        rows = self.row_of[idx.clamp(0, len(self.row_of) - 1)]
        bad = (rows < 0) | (idx < 0) | (idx >= len(self.row_of))
        if bool(bad.any()):
            raise ValueError(f"token id {int(idx[bad][0])} is not in this model's vocabulary of "
                             f"{self.config.vocab_size} tokens (config.vocab)")
        return rows


def _init_weights(module, n_layer):
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
    for name, p in module.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        elif p.dim() >= 2:
            nn.init.normal_(p, mean=0.0, std=0.02)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    for m in module.modules():  # LayerNorm: weight 1, bias 0
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# rows of logits computed at once by chunked_token_logprobs (bench/bench_logits.py)
LOGITS_CHUNK = 1024


class GPT(nn.Module):
    """GPT-2 language model: logits for every position."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        _init_weights(self, config.n_layer)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, attention_mask=None, start=0, targets=None, temperature=1.0,
                chunk=LOGITS_CHUNK):
        """idx (B, T) -> logits (B, T - start, vocab) of positions start.. (the output layer, most
        of a small model's compute, runs only where asked). attention_mask (B, T): 1 on real
        tokens, 0 on padding.

        Given targets (B, T - start), returns their log-probabilities instead,
        log softmax(logits / temperature)[targets] (B, T - start) in float32, from
        chunked_token_logprobs: the (B, T - start, V) logits are never held whole. A keyword of
        forward rather than a method of its own, so that a DDP-wrapped model computes it through
        DDP's forward like the logits."""
        h = self.transformer(idx, attention_mask)[:, start:]  # (B, T - start, C)
        if targets is None:
            return self.lm_head(h)  # (B, T - start, V)
        targets = self.transformer.rows(targets)  # (B, T - start) rows of the output layer
        logprobs = chunked_token_logprobs(h, self.lm_head.weight, targets, temperature, chunk)
        return logprobs  # (B, T - start)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 eos_token_id=None, attention_mask=None, use_cache=True, generator=None):
        """Sample up to `max_new_tokens` after the prompts `idx` (B, T), left-padded if
        `attention_mask` is given.

        Returns the full sequences (B, T + n_new). A row that emitted `eos_token_id` keeps emitting
        it (as padding) and generation stops early once every row has. temperature == 0 is greedy.
        `use_cache=False` recomputes the whole prefix at every step (the reference for the cache).
        Impossible arguments raise ValueError; logits that are NaN or inf (broken weights) raise
        FloatingPointError.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None: no top-k), got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None: no nucleus sampling), got {top_p}")
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"prompt of {T} tokens + max_new_tokens {max_new_tokens} exceeds block_size "
                f"{self.config.block_size}: shorten the prompt or lower max_new_tokens")
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        # One buffer for the whole output and one for its mask: no torch.cat in the loop.
        seq = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=idx.device)
        seq[:, :T] = idx
        mask = torch.ones(B, T + max_new_tokens, dtype=attention_mask.dtype, device=idx.device)
        mask[:, :T] = attention_mask
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        kv_cache = None
        if use_cache:
            C, nh, device = self.config.n_embd, self.config.n_head, self.lm_head.weight.device
            # keys/values kept in the dtype they are computed in (bf16 under autocast: half memory)
            dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                     else self.lm_head.weight.dtype)
            shape = (B, nh, T + max_new_tokens, C // nh)  # (B, nh, S, hs) for keys and values
            kv_cache = [(torch.empty(shape, dtype=dtype, device=device),
                         torch.empty(shape, dtype=dtype, device=device))
                        for _ in range(self.config.n_layer)]
        past_len, n = 0, T
        for _ in range(max_new_tokens):
            if use_cache:  # feed only the tokens the cache has not seen
                h = self.transformer(seq[:, past_len:n], mask[:, :n], kv_cache, past_len)
                past_len = n
            else:
                h = self.transformer(seq[:, :n], mask[:, :n])
            # Only the last position is needed. W @ h^T runs 1.3-2.5x faster than h @ W^T on CPU
            # (MKL) for a few rows against the 50k-row output matrix, the largest matmul of a decode
            # step; the sampling ops that follow want the (B, V) result contiguous.
            logits = (self.lm_head.weight @ h[:, -1, :].T).T.contiguous()  # (B, V)
            if not bool(torch.isfinite(logits).all()):  # NaN would sample an out-of-vocabulary id
                raise FloatingPointError(
                    f"non-finite logits (NaN or inf) at new token {n - T + 1}: the model's weights "
                    f"are broken (NaN/inf, or too large after a diverged run)")
            next_token = sample_token(logits, temperature, top_k, top_p, generator)  # (B,) rows
            if self.transformer.vocab_ids is not None:  # a world's vocabulary: the row's GPT-2 id
                next_token = self.transformer.vocab_ids[next_token]  # (B,)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(done, eos_token_id)
                done |= next_token == eos_token_id
            seq[:, n] = next_token
            n += 1
            if eos_token_id is not None and bool(done.all()):
                break
        return seq[:, :n]

    @classmethod
    def from_pretrained(cls, folder, dropout=0.0):
        """OpenAI GPT-2 weights in Hugging Face format from a local folder holding config.json and
        model.safetensors (lib/checkpoints.py's load_model also takes gpt2, gpt2-medium, ... and
        fetches them from the hub)."""
        if not os.path.isdir(folder):
            raise ValueError(f"{folder} is not a folder with config.json + model.safetensors")
        config, state_dict, _ = load_hf_gpt2(folder, dropout)
        model = cls(config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte, loaded through it
        if missing or unexpected:
            raise ValueError(f"{folder} does not hold GPT-2 weights: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model


class ScalarGPT(nn.Module):
    """GPT trunk + Linear(n_embd, 1): one scalar per position (reward model and PPO critic)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.score_head = nn.Linear(config.n_embd, 1)
        _init_weights(self, config.n_layer)
        # A small head keeps initial scores near 0 (the value of the bias) whatever the trunk does.
        nn.init.normal_(self.score_head.weight, std=1.0 / math.sqrt(config.n_embd + 1))

    def forward(self, idx, attention_mask=None):
        """idx (B, T) -> scores (B, T), one per position."""
        return self.score_head(self.transformer(idx, attention_mask)).squeeze(-1)  # (B, T)


def token_logprobs(logits, tokens, temperature=1.0):
    """log softmax(logits / temperature)[tokens]: logits (B, T, V), tokens (B, T) -> (B, T) fp32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # one fused log_softmax kernel: ~1.4x faster on CPU (forward + backward) than
    # logit - logsumexp(logits), and either way a single (B, T, V) tensor is kept for backward
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)


def chunked_token_logprobs(hidden, weight, tokens, temperature=1.0, chunk=LOGITS_CHUNK):
    """token_logprobs(hidden @ weight.T, tokens, temperature) without ever holding all the logits.

    hidden (..., C) from the trunk, weight (V, C) the output layer's, tokens (...) -> (...),
    float32. The rows (positions) are taken `chunk` at a time: a chunk's logits are computed,
    reduced to its tokens' logprobs and dropped. When gradients are on, each chunk is checkpointed:
    backward recomputes the chunk's logits (one more output-layer matmul) instead of keeping them,
    so memory holds one chunk's (chunk, V) logits, not all (..., V) of them (50257 float32 logits
    per row: 200 MB per 1024 rows). bench/bench_logits.py measures it.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 row, got {chunk}")
    h, y = hidden.reshape(-1, hidden.size(-1)), tokens.reshape(-1)  # (N, C), (N,)

    def rows(h, weight, y):  # (n, C), (V, C), (n,) -> (n,)
        return token_logprobs(F.linear(h, weight), y, temperature)

    # Checkpointed only with gradients on and more than one chunk: no_grad (as in rollouts) keeps
    # nothing for backward, and one chunk holds no more than the bound, so checkpointing it would
    # only add the matmul.
    chunks = zip(h.split(chunk), y.split(chunk))
    if torch.is_grad_enabled() and h.size(0) > chunk:
        out = [checkpoint(rows, hc, weight, yc, use_reentrant=False) for hc, yc in chunks]
    else:
        out = [rows(hc, weight, yc) for hc, yc in chunks]
    return torch.cat(out).view(tokens.shape)  # (...)


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Sample one token per row from logits (B, V). temperature 0 (or top_k 1) is greedy."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)  # (B,)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
        # probability reaches top_p; the most likely token always survives.
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # the mass before it already reaches top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    # Inverse-CDF sampling: one uniform number per row, located in the cumulative (unnormalised)
    # distribution. The same distribution as torch.multinomial, ~20x faster over a 50k vocabulary on
    # CPU, where multinomial was half of a decode step.
    weights = (logits - logits.max(-1, keepdim=True).values).exp_()  # (B, V) = probs * total
    cdf = weights.cumsum_(-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    u = torch.rand(total.shape, device=total.device, generator=generator) * total  # (B, 1)
    # rounding must not reach the total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    # right=True: the first i with cdf[i] > u, so a zero-probability token (cdf[i] == cdf[i-1]) is
    # never drawn
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)  # (B,)


# ----------------------------------------------------------------------------------------------
# GPT-2 weights: a local Hugging Face folder -> our names (lib/checkpoints.py's fetch_gpt2 fetches
# the folder from the hub)

def load_hf_gpt2(folder, dropout=0.0):
    """Read a Hugging Face GPT-2 folder (config.json + model.safetensors): returns (GPTConfig,
    state dict in our names, the config.json dict). Tensors other than GPT-2's (an exported
    score_head) keep their names."""
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                       n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                       dropout=dropout, bias=True)
    return config, hf_gpt2_state_dict(load_file(os.path.join(folder, "model.safetensors"))), hf


def hf_gpt2_state_dict(tensors):
    """Hugging Face GPT-2 weights -> our state dict. HF stores its Conv1D weights as (in, out), the
    transpose of nn.Linear's (out, in); parameter names are otherwise the same (as in nanoGPT)."""
    sd = {}
    for name, t in tensors.items():
        if name.startswith("score_head."):  # the reward model's head, exported by export.py
            sd[name] = t.float()
            continue
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers; lm_head is tied to wte
        if name.endswith(("attn.c_attn.weight", "attn.c_proj.weight",
                          "mlp.c_fc.weight", "mlp.c_proj.weight")):
            t = t.t()
        sd["transformer." + name] = t.float().contiguous()
    return sd
