"""
Text <-> tokens for every stage: GPT-2's tokenizer (through tiktoken), prompts and responses encoded
within their token budgets, and batches padded on the side each use needs. Used by the stage scripts
and by lib/responses.py. The mask convention is model.py's: 1 on real tokens, 0 on padding.

A world's vocabulary (the lab's, data/lab/prepare.py's vocab.json) is a subset of GPT-2's ids: text
is still GPT-2 BPE and ids stay GPT-2's everywhere outside the model, which holds rows for those ids
only (model.py's Transformer.rows). It travels in the checkpoint (config.vocab);
`get_tokenizer(model.config.vocab)` spells a token outside it with the vocabulary's own tokens and
refuses text with characters the world never uses, naming them.
"""
import json
import sys

import torch

from lib.config import UsageError

EOS = 50256  # <|endoftext|>: end of sequence, and the padding id (GPT-2 has no separate pad token)


def get_tokenizer(vocab=None):
    """GPT-2's BPE through tiktoken ("r50k_base" is the same tokenizer as "gpt2"); restricted to
    `vocab`, a model's config.vocab, when it has one."""
    import tiktoken
    try:
        enc = tiktoken.get_encoding("r50k_base")
    except Exception as e:
        sys.exit(f"error: could not load the GPT-2 tokenizer ({type(e).__name__}: {e}). tiktoken "
                 f"downloads it once; offline, point TIKTOKEN_CACHE_DIR at a folder holding a "
                 f"local copy of its GPT-2 files.")
    return enc if vocab is None else InVocabulary(enc, vocab)


class InVocabulary:
    """GPT-2's tokenizer for a model with a world's vocabulary: the same ids,
    for text the model has rows for.

    Re-encoding text the model wrote does not always give back its tokens: three newlines it
    wrote one at a time come back as GPT-2's one-token "\n\n" and "\n", and "\n\n" may be outside
    the vocabulary. So a token outside the vocabulary is spelled with the vocabulary's own tokens
    (its shortest spelling: the same bytes, so the same text), and the world's vocabulary holds
    every character of the world as a token of its own, so anything written in the world's
    characters encodes. Text with any other character is refused with one message naming it:
    never an id the model has no row for."""

    def __init__(self, enc, vocab):
        self.enc, self.vocab = enc, frozenset(vocab)
        self.of_bytes = {enc.decode_single_token_bytes(i): i for i in self.vocab if i != EOS}
        self.longest = max(map(len, self.of_bytes))
        self.spellings = {}  # GPT-2 id outside the vocabulary -> its spelling (None: there is none)

    def spell(self, token):
        """The shortest list of vocabulary ids whose bytes are `token`'s, or None."""
        b = self.enc.decode_single_token_bytes(token)
        best = [[]] + [None] * len(b)  # best[j]: the shortest spelling of b[:j]
        for j in range(1, len(b) + 1):
            for i in range(max(0, j - self.longest), j):
                piece = self.of_bytes.get(b[i:j])
                if best[i] is None or piece is None:
                    continue
                if best[j] is None or len(best[i]) + 1 < len(best[j]):
                    best[j] = best[i] + [piece]
        return best[-1]

    def encode_ordinary(self, text):
        ids, unknown = [], []
        for token in self.enc.encode_ordinary(text):
            if token not in self.vocab and token not in self.spellings:
                self.spellings[token] = self.spell(token)
            spelled = [token] if token in self.vocab else self.spellings[token]
            if spelled is None:
                unknown.append(self.enc.decode([token]))
            else:
                ids += spelled
        if unknown:
            known = {c for piece in self.of_bytes for c in piece.decode("utf-8", "replace")}
            chars = sorted({c for c in text if c not in known}) or sorted(set(unknown))
            raise UsageError(f"the model knows only its world's {len(self.vocab)} tokens, and "
                             f"{text.strip()[:80]!r} has characters the world never uses: "
                             f"{' '.join(map(repr, chars))}. Write with the world's characters "
                             f"(its vocab.json lists its tokens)")
        return ids

    def decode(self, ids):
        return self.enc.decode(ids)


def load_vocab(path):
    """The GPT-2 ids of a vocab.json written by data/lab/prepare.py:
    sorted, distinct, EOS included."""
    try:
        with open(path) as f:
            ids = json.load(f)["ids"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--vocab {path} is not a vocabulary file ({type(e).__name__}: {e}); it "
                         f"must be the vocab.json data/lab/prepare.py writes") from None
    if not (isinstance(ids, list) and ids and all(isinstance(i, int) and 0 <= i <= EOS for i in ids)
            and EOS in ids and ids == sorted(set(ids))):
        raise UsageError(f"--vocab {path}: 'ids' must be sorted distinct GPT-2 token ids "
                         f"(0..{EOS}) including EOS {EOS}, as data/lab/prepare.py writes them")
    return ids


def encode_prompt(enc, text, max_tokens):
    """Tokens of a prompt; a long prompt keeps its end (the latest turns,
    which the response answers)."""
    ids = enc.encode_ordinary(text)
    return ids[-max_tokens:] if len(ids) > max_tokens else ids


def encode_response(enc, text, max_tokens, eos=True):
    """Tokens of a response followed by EOS; a response cut to `max_tokens` carries no EOS."""
    ids = enc.encode_ordinary(text)
    if len(ids) >= max_tokens + (0 if eos else 1):
        return ids[:max_tokens]
    return ids + [EOS] if eos else ids


def pad(seqs, side, pad_id=EOS):
    """List of token lists -> (ids, attention_mask), both LongTensor
    (B, T_max), padded on `side`."""
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
    """Text of a generated response: the tokens before the first EOS
    (after it comes only padding)."""
    return enc.decode(tokens[:tokens.index(EOS)] if EOS in tokens else tokens)
