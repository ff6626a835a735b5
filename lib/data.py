"""
Reading the JSON-lines files a user hands in (demonstrations, comparisons, rankings, prompts, the
ptx text, the lab's files), one careful way for all of them, and the shuffled order in which
training visits their rows. Used by the stage scripts.

The policy for a bad line, the same for every file:
- a line that is not valid JSON, not a JSON object, or lacks a field the file needs (or has it with
  the wrong type) is skipped and counted, each one named `file:line` with what is wrong;
  `--strict true` refuses the file instead. Files that define a reported measurement (the held-out
  prompts of evaluate.py and of the lab) are always read strictly: a silently skipped prompt would
  change the number and its interval;
- a LAST line that ends without a newline and is not valid JSON is a torn write (a kill or a full
  disk mid-line): it never was a record, so it is skipped with a note even under --strict; a writer
  that appends to the file (label.py) first sets it aside (`set_aside_torn_tail`), so the next
  record starts on a line of its own;
- a file with no valid row at all is an error (with the first problem),
  unless the caller allows it empty.
"""
import json
import os
import sys

import torch

SHOW_BAD = 5  # bad lines named one by one; the rest are counted
PREPARE_HINT = ("Prepare the data first: python data/hh_rlhf/prepare.py (offline: --source "
                "path/to/a/local/copy/of/hh-rlhf), or python data/lab/prepare.py for the lab's "
                "world")


def warn(message):
    """A warning about a user's file, printed once: under torchrun every rank reads the same file,
    and only the first (RANK 0) says what is wrong with it. Errors still stop every rank."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def describe(fields):
    """{"prompt": str, "ranked": list} -> '{"prompt": str, "ranked": list}', for messages."""
    return "{" + ", ".join(f'"{k}": {t.__name__}' for k, t in fields.items()) + "}"


def row_problem(line, fields, check=None):
    """(row, None) for a good line, else (None, what is wrong with it)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte {e.start})"
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__} where an object {describe(fields)} is expected"
    for key, kind in fields.items():
        if key not in row:
            return None, f'no "{key}" field (expected {describe(fields)}, got keys {sorted(row)})'
        if not isinstance(row[key], kind) or isinstance(row[key], bool) and kind is not bool:
            return None, f'"{key}" is a {type(row[key]).__name__}, expected a {kind.__name__}'
    problem = check(row) if check else None
    return (None, problem) if problem else (row, None)


def read_jsonl(path, what="data", fields=None, check=None, strict=False, allow_empty=False,
               hint=PREPARE_HINT):
    """The rows of the JSON-lines file `path`, read by the policy above. `fields`: {key: type} every
    row needs; `check(row)`: None, or what else is wrong with a row. Blank lines are not records."""
    if os.path.isdir(path):
        sys.exit(f"error: {what} file {path} is a folder; a JSON-lines file is expected")
    if not os.path.isfile(path):
        sys.exit(f"error: {what} file {path} not found." + (f" {hint}" if hint else ""))
    with open(path, "rb") as f:
        # without the BOM some editors write
        lines = f.read().removeprefix(b"\xef\xbb\xbf").split(b"\n")
    # no newline after the last line: written to its end, or torn
    ends_open = lines[-1].strip() != b""
    rows, bad, n_lines = [], [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row, problem = row_problem(line, fields or {}, check)
        if problem and n == len(lines) and ends_open and problem.startswith("not valid JSON"):
            warn(f"warning: {path}:{n}: the last line is cut short (no newline at its end, not "
                 f"valid JSON): an interrupted write, not a record; skipped")
            continue
        n_lines += 1
        if problem and strict:
            sys.exit(f"error: {path}:{n}: {problem}. Fix or remove that line (the {what} file is "
                     f"read strictly).")
        if problem:
            bad.append((n, problem))
            if len(bad) <= SHOW_BAD:
                warn(f"warning: {path}:{n}: {problem}; line skipped")
        else:
            rows.append(row)
    if not rows and not allow_empty:
        why = (f"none of its {n_lines} lines is a {describe(fields or {})} object "
               f"(line {bad[0][0]}: {bad[0][1]})" if bad else "it holds no rows")
        sys.exit(f"error: {what} file {path}: {why}")
    if bad:
        shown = ", ".join(str(n) for n, _ in bad[:SHOW_BAD])
        shown += ", ..." if len(bad) > SHOW_BAD else ""
        warn(f"warning: {path}: skipped {len(bad)} of {n_lines} lines that are not {what} rows "
             f"(lines {shown}); --strict true refuses such a file")
    return rows


def set_aside_torn_tail(path):
    """Before appending to `path`: if its last line has no newline, end it. A complete JSON
    line just gets its newline; a torn one (not valid JSON) is cut off and appended to
    `path`.torn, so the next record starts on a line of its own and nothing is lost. Returns
    the number of bytes set aside."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return 0
        start = data.rfind(b"\n") + 1
        tail = data[start:]
        if row_problem(tail, {})[1] is None or not tail.strip():
            f.write(b"\n")
            return 0
        with open(path + ".torn", "ab") as g:
            g.write(tail + b"\n")
            g.flush()
            os.fsync(g.fileno())
        f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    line_number = data.count(b"\n") + 1
    print(f"note: {path}:{line_number}: the last line was cut short (an interrupted write); its "
          f"{len(tail)} bytes were moved to {path}.torn and the file continues on a new line",
          file=sys.stderr)
    return len(tail)


def prompt_problem(row):
    """A prompt row's check: a policy needs at least one token to condition on."""
    if row["prompt"]:
        return None
    return 'the "prompt" is empty (a policy needs at least one token to start from)'


def read_prompts(path, max_prompts=0, strict=False):
    """Unique prompts of a JSON lines file ({"prompt": str} rows), in file order (the first
    max_prompts if > 0)."""
    rows = read_jsonl(path, "prompts", {"prompt": str}, check=prompt_problem, strict=strict)
    prompts = list(dict.fromkeys(row["prompt"] for row in rows))
    return prompts[:max_prompts] if max_prompts > 0 else prompts


def data_paths(data_dir, names):
    """Comma-separated file names, relative to data_dir (an absolute name stays as it is)."""
    return [os.path.join(data_dir, name.strip()) for name in names.split(",") if name.strip()]


def ranking_problem(row):
    """None for a comparison {prompt, chosen, rejected} or a ranking {prompt, ranked: [best, ...,
    worst]}, else what is wrong with the row (the JSON-lines reader skips it, or refuses the file
    under --strict)."""
    if "ranked" in row:
        ranked = row["ranked"]
        if not (isinstance(ranked, list) and len(ranked) >= 2
                and all(isinstance(r, str) for r in ranked)):
            return '"ranked" must be a list of at least two response strings, best first'
    elif not all(isinstance(row.get(k), str) for k in ("chosen", "rejected")):
        return ('expected "chosen" and "rejected" strings or a "ranked" list, got keys '
                f'{sorted(row)}')
    return None


def read_rankings(paths, strict=False):
    """JSON lines files -> [(prompt, [response, ...] best first)]."""
    rankings = []
    for path in paths:
        rows = read_jsonl(path, "comparisons", {"prompt": str}, check=ranking_problem,
                          strict=strict)
        for row in rows:
            ranked = row["ranked"] if "ranked" in row else [row["chosen"], row["rejected"]]
            rankings.append((row["prompt"], ranked))
    return rankings


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
    """n items spread evenly over the list, in order (all of it if n >= len): from a file sorted by
    category, as the lab's held-out prompts are, every category gets its share."""
    n = min(n, len(items))
    return [items[i * len(items) // n] for i in range(n)]
