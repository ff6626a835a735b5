"""Does the chunked output layer pay? chunked_token_logprobs against
token_logprobs(hidden @ weight.T, ...) on the CPU.

GPT-2-small's output layer (n_embd 768, vocab 50257, float32), forward + backward of
sum(logprobs) w.r.t. hidden and weight, for B*T = 8*256 and 16*512 rows. Each configuration
runs once, in a fresh process:
- peak_MB: the process's peak resident memory (ru_maxrss) minus its memory just before the step
  (weight, hidden and tokens already allocated), i.e. what the step adds at its peak (weight.grad,
  147 MB, included; MB = 2**20 bytes);
- saved_MB: the bytes autograd keeps between forward and backward (saved_tensors_hooks, unique
  storages, not counting the inputs hidden and weight);
- seconds: wall time of the step (2 cores shared with other work: +-20%).

    # 8*256 and 16*512 rows, unchunked and chunk 1024 (~2 minutes)
    python bench/bench_logits.py
    python bench/bench_logits.py 2048 0,256,1024  # rows, chunk sizes (0 = unchunked)

Measured (2 CPU cores shared with other work, torch 2.13, float32; one (rows, V) float32 logits
tensor is 393 MB for 2048 rows, 1571 MB for 8192):

      rows  chunk  peak_MB  saved_MB  seconds
      2048  whole     1194       393     10.1
      2048   1024      829         0     14.1
      2048    256      532         0     15.3
      8192  whole     4728      1571     39.2
      8192   1024      848         0     32.3

Unchunked, the step peaks at ~3 logits tensors (the logits, the log_softmax output kept for
backward, the gradient of the logits) + weight.grad. Chunked, the peak no longer grows with the
rows: roughly 3 chunks of logits + two (V, C) weight gradients (each chunk's backward makes a (V, C)
gradient that autograd adds to the one accumulated so far), 530-850 MB for chunks of 256-1024 rows.
The price is one more output-layer matmul in backward (4 instead of 3: +33% of the output layer's
time at 2048 rows, measured +40%); at 8192 rows the unchunked step was the slower one (1.5 GB
tensors: allocation and page faults, memory bandwidth).
"""
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from model import chunked_token_logprobs, token_logprobs  # noqa: E402

MB = 2 ** 20
C, V = 768, 50257  # GPT-2 small's width and vocabulary


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(rows, chunk):
    """One forward + backward of the output layer's token logprobs; prints a JSON line."""
    torch.manual_seed(0)
    hidden = torch.randn(rows, C, requires_grad=True)  # (N, C)
    weight = (torch.randn(V, C) * 0.02).requires_grad_()  # (V, C)
    tokens = torch.randint(0, V, (rows,))  # (N,)
    inputs = {hidden.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):  # count each storage once (a tensor may be saved by several ops)
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    before, peak_before = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if chunk:
            logprobs = chunked_token_logprobs(hidden, weight, tokens, chunk=chunk)  # (N,)
        else:
            logprobs = token_logprobs(hidden @ weight.T, tokens)  # (N,)
    logprobs.sum().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if peak <= peak_before:
        raise RuntimeError(
            "the step did not raise the process's peak: the measure would be meaningless")
    print(json.dumps({"rows": rows, "chunk": chunk or "whole",
                      "peak_MB": round((peak - before) / MB),
                      "saved_MB": round(sum(saved.values()) / MB), "seconds": round(seconds, 1),
                      "logits_MB": round(rows * V * 4 / MB)}), flush=True)


def main(rows_list, chunks):
    print(f"{'rows':>6} {'chunk':>6} {'peak_MB':>8} {'saved_MB':>9} {'seconds':>8}   "
          f"(one (rows, V) float32 logits)")
    for rows in rows_list:
        for chunk in chunks:  # each in a fresh process, so that one's peak does not hide another's
            out = subprocess.run([sys.executable, __file__, "--measure", str(rows), str(chunk)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out)
            print(f"{r['rows']:>6} {r['chunk']:>6} {r['peak_MB']:>8} {r['saved_MB']:>9} "
                  f"{r['seconds']:>8}   ({r['logits_MB']} MB)", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if sys.argv[1:2] == ["--measure"]:
        measure(int(sys.argv[2]), int(sys.argv[3]))
    else:
        rows_list = ([int(r) for r in sys.argv[1].split(",")] if len(sys.argv) > 1
                     else [8 * 256, 16 * 512])
        chunks = [int(c) for c in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0, 1024]
        main(rows_list, chunks)
