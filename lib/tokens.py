"""
Text <-> tokens for every stage: GPT-2's tokenizer (through tiktoken), prompts and responses encoded within
their token budgets, and batches padded on the side each use needs. Used by the stage scripts and by
lib/responses.py. The mask convention is model.py's: 1 on real tokens, 0 on padding.
"""
import sys

import torch

EOS = 50256  # <|endoftext|>: end of sequence, and the padding id (GPT-2 has no separate pad token)


def get_tokenizer():
    """GPT-2's BPE through tiktoken ("r50k_base" is the same tokenizer as "gpt2")."""
    import tiktoken
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:
        sys.exit(f"error: could not load the GPT-2 tokenizer ({type(e).__name__}: {e}). tiktoken downloads it "
                 f"once; offline, point TIKTOKEN_CACHE_DIR at a folder holding a local copy of its GPT-2 files.")


def encode_prompt(enc, text, max_tokens):
    """Tokens of a prompt; a long prompt keeps its end (the latest turns, which the response answers)."""
    ids = enc.encode_ordinary(text)
    return ids[-max_tokens:] if len(ids) > max_tokens else ids


def encode_response(enc, text, max_tokens, eos=True):
    """Tokens of a response followed by EOS; a response cut to `max_tokens` carries no EOS."""
    ids = enc.encode_ordinary(text)
    if len(ids) >= max_tokens + (0 if eos else 1):
        return ids[:max_tokens]
    return ids + [EOS] if eos else ids


def pad(seqs, side, pad_id=EOS):
    """List of token lists -> (ids, attention_mask), both LongTensor (B, T_max), padded on `side`."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def pad_left(seqs, pad_id=EOS):
    """Prompts for generation: left padding, so every row's next token goes in the same column."""
    return pad(seqs, "left", pad_id)


def pad_right(seqs, pad_id=EOS):
    """Training sequences: right padding, which causal attention never sees from a real token."""
    return pad(seqs, "right", pad_id)


def decode_response(enc, tokens):
    """Text of a generated response: the tokens before the first EOS (after it comes only padding)."""
    return enc.decode(tokens[:tokens.index(EOS)] if EOS in tokens else tokens)
