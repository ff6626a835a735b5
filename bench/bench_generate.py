"""Generation throughput of model.GPT.generate on CPU, with and without the KV cache.

Prints one JSON line per measurement (generated tokens/s, median of --reps runs after a warm-up).
Default shapes: the `tiny` preset (4 layers x 256 wide x 4 heads, vocab 50257) at batch 8, prompt
32, 128 new tokens (cache against recompute), and batch 16, prompt 32, 64 new tokens (the shape of a
benchmark of Hugging Face's generate, for a side-by-side). Pure sampling at temperature 1 with no
EOS, so every row generates exactly the requested tokens, as in the HF bench. With transformers
installed, also checks that greedy outputs equal HF's on the same weights.

    python bench/bench_generate.py [--threads 2 --reps 5]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from model import GPT, GPTConfig  # noqa: E402


def measure(model, batch, prompt, new, use_cache, reps, warmup=1):
    idx = torch.randint(0, 50256, (batch, prompt), generator=torch.Generator().manual_seed(0))
    secs = []
    for r in range(warmup + reps):
        t0 = time.perf_counter()
        out = model.generate(idx, new, temperature=1.0, use_cache=use_cache)
        if r >= warmup:
            secs.append(time.perf_counter() - t0)
    if out.shape != (batch, prompt + new):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}")
    return batch * new / statistics.median(secs), statistics.median(secs)


def greedy_equals_hf(model, batch, prompt, new):
    try:
        import transformers
    except ImportError:
        return None
    folder = tempfile.mkdtemp()
    c = model.config
    hf_cfg = transformers.GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                     vocab_size=c.vocab_size, n_positions=c.block_size)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(folder)
    ours = GPT.from_pretrained(folder).eval()
    idx = torch.randint(0, 50256, (batch, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new,
                             do_sample=False, pad_token_id=50256, eos_token_id=None)
    return bool(torch.equal(ours.generate(idx, new, temperature=0.0), theirs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256)).eval()  # `tiny` shape
    for batch, prompt, new in [(8, 32, 128), (16, 32, 64)]:
        row = {"bench": "generate", "shape": "4x256", "batch": batch, "prompt": prompt, "new": new,
               "threads": torch.get_num_threads()}
        for use_cache in (True, False):
            tps, sec = measure(model, batch, prompt, new, use_cache, a.reps)
            row["cache" if use_cache else "nocache"] = {"tokens_per_s": round(tps, 1),
                                                        "seconds": round(sec, 4)}
        speedup = row["cache"]["tokens_per_s"] / row["nocache"]["tokens_per_s"]
        row["cache_speedup"] = round(speedup, 2)
        print(json.dumps(row), flush=True)
    print(json.dumps({"bench": "greedy_equals_hf", "batch": 4, "prompt": 32, "new": 32,
                      "equal": greedy_equals_hf(model, 4, 32, 32)}), flush=True)


if __name__ == "__main__":
    main()
