"""
Reading the JSON-lines files the stages share (demonstrations, comparisons, prompts) and the shuffled order
in which training visits their rows. Used by the stage scripts.
"""
import json
import os
import sys

import torch


def read_jsonl(path, what="data"):
    if not os.path.isfile(path):
        sys.exit(f"error: {what} file {path} not found. Prepare the data first: "
                 f"python data/hh_rlhf/prepare.py (offline: --source path/to/a/local/copy/of/hh-rlhf)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_prompts(path, max_prompts=0):
    """Unique prompts of a JSON lines file, in file order (the first max_prompts if > 0)."""
    rows = read_jsonl(path, what="prompts")
    if rows and "prompt" not in rows[0]:
        sys.exit(f"error: {path}: expected JSON lines with a \"prompt\" field, got keys {sorted(rows[0])}")
    prompts = list(dict.fromkeys(row["prompt"] for row in rows))
    return prompts[:max_prompts] if max_prompts > 0 else prompts


def index_batches(n, batch_size, seed, start=0):
    """Endless batches of indices into range(n): each epoch is a fresh shuffle, every example once.

    start: skip the first `start` indices of the stream (a resumed run passes the number of examples
    already trained on), so the batches that follow are exactly those of an uninterrupted run."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(start // n):
        torch.randperm(n, generator=g)  # a finished epoch: drawn only to advance the generator
    pending = torch.randperm(n, generator=g).tolist()[start % n:]
    while True:
        pending += torch.randperm(n, generator=g).tolist()
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            pending = pending[batch_size:]


def spread(items, n):
    """n items spread evenly over the list, in order (all of it if n >= len): from a file sorted by category,
    as the lab's held-out prompts are, every category gets its share."""
    n = min(n, len(items))
    return [items[i * len(items) // n] for i in range(n)]
