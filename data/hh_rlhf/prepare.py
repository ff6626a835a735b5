"""
Prepare Anthropic's HH-RLHF preference data (MIT licence) for the three stages.

Source format: per subset (helpful-base, harmless-base, helpful-online, helpful-rejection-sampled) a
train.jsonl.gz and a test.jsonl.gz, one JSON object per line, {"chosen": dialogue, "rejected":
dialogue}, where a dialogue is "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:
...". The two dialogues of a pair differ only in the final assistant turn.

Each pair is split at the LAST "\\n\\nAssistant:" into the prompt (up to and including that
marker) and the response (the rest, kept exactly: it usually starts with a space, which is how
GPT-2 BPE tokenizes a word after "Assistant:"). Pairs whose two prompts differ are dropped, as are
pairs with an empty response or identical responses. Output, next to this file (or --out_dir), for
train and val:
    comparisons_{train,val}.jsonl  {"prompt", "chosen", "rejected"}: reward model (reward.py)
    sft_{train,val}.jsonl          {"prompt", "response"}: demonstrations = chosen (sft.py)
    prompts_{train,val}.jsonl      {"prompt"}: unique prompts, first-seen order (ppo.py)
    stats.json                     counts read / kept / dropped by reason
Train comes from the train files and val from the test files; a subset missing one of them has it
carved from the other by unique prompt (--val_fraction, --seed), so no prompt is in both. No token
budgets here: they are applied when batching. Re-running gives byte-identical files.

    python data/hh_rlhf/prepare.py  # download helpful-base once
    python data/hh_rlhf/prepare.py --subsets helpful-base,harmless-base
    # offline, from a local copy
    python data/hh_rlhf/prepare.py --source path/to/hh-rlhf --subsets harmless-base
"""
import argparse
import gzip
import json
import os
import random
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # repo root, for common.py and model.py
from lib.checkpoints import fsync_replace  # noqa: E402
from lib.config import path_problem  # noqa: E402

HUB_REPO = "Anthropic/hh-rlhf"  # dataset repository on the Hugging Face hub
SUBSETS = ("helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled")
SPLITS = ("train", "test")
MARKER = "\n\nAssistant:"
REASONS = ("malformed_json", "missing_keys", "no_shared_prompt", "empty_response",
           "identical_responses")
SHOW_BAD = 10  # bad lines printed individually; the rest are only counted


def split_dialogue(text):
    """Split a dialogue at its last "\\n\\nAssistant:" into (prompt ending
    with the marker, response)."""
    i = text.rfind(MARKER)
    if i < 0:
        raise ValueError("no assistant turn")
    i += len(MARKER)
    return text[:i], text[i:]


def parse_pair(line):
    """One source line -> ({"prompt", "chosen", "rejected"}, None), or
    (None, reason) if it is dropped."""
    try:
        pair = json.loads(line)
    except ValueError:  # bad JSON or bad UTF-8
        return None, "malformed_json"
    if not isinstance(pair, dict):
        return None, "malformed_json"
    if not all(isinstance(pair.get(k), str) for k in ("chosen", "rejected")):
        return None, "missing_keys"
    try:
        prompt, chosen = split_dialogue(pair["chosen"])
        prompt_r, rejected = split_dialogue(pair["rejected"])
    except ValueError:
        return None, "no_shared_prompt"
    # A response that itself contains "\n\nAssistant:" also ends up here:
    # its prompt no longer matches.
    if prompt != prompt_r:
        return None, "no_shared_prompt"
    if not chosen.strip() or not rejected.strip():
        return None, "empty_response"
    if chosen == rejected:
        return None, "identical_responses"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None


def carve(records, val_fraction, seed):
    """Split records into (rest, val) by unique prompt, so that no prompt lands in both."""
    prompts = list(dict.fromkeys(r["prompt"] for r in records))
    random.Random(seed).shuffle(prompts)
    n_val = 0
    if len(prompts) > 1:  # at least one prompt on each side
        n_val = min(max(1, round(val_fraction * len(prompts))), len(prompts) - 1)
    val_prompts = set(prompts[:n_val])
    rest = [r for r in records if r["prompt"] not in val_prompts]
    return rest, [r for r in records if r["prompt"] in val_prompts]


def find_file(folder, split):
    """Path of <folder>/<split>.jsonl.gz or <split>.jsonl, or None."""
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


DAMAGED = (EOFError, gzip.BadGzipFile, zlib.error)  # a .gz cut short, not gzip, bad data / CRC


def gzip_damage(path):
    """None if the .gz at `path` decompresses to its end, else the error
    that says how it is damaged."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except DAMAGED as e:
        return e
    return None


def read_file(path, bad, strict, fix="run prepare.py again: it fetches a damaged download again"):
    """Parse one source file; returns (kept records, counts). Dropped lines are appended to `bad`. A
    damaged (truncated, corrupt) .gz ends the run with a message naming it and `fix`."""
    counts = {"read": 0, "kept": 0, **{r: 0 for r in REASONS}}
    records = []
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():  # blank lines (e.g. a trailing newline) are not records
                    continue
                counts["read"] += 1
                record, reason = parse_pair(line)
                if record is None:
                    if strict:
                        raise SystemExit(f"error: {path}:{lineno}: {reason} (--strict)")
                    counts[reason] += 1
                    bad.append(f"{path}:{lineno}: {reason}")
                    if len(bad) <= SHOW_BAD:
                        print(f"  skipping {bad[-1]}")
                    continue
                counts["kept"] += 1
                records.append(record)
    except DAMAGED as e:
        raise SystemExit(f"error: {path} is damaged (truncated or corrupt: {type(e).__name__}: "
                         f"{e}); {fix}") from None
    return records, counts


def download_subsets(subsets):
    """Fetch <subset>/<split>.jsonl.gz of Anthropic/hh-rlhf through the Hugging Face hub client,
    once: the files live in the Hugging Face cache (HF_HUB_CACHE; HF_ENDPOINT, HF_TOKEN and
    HF_HUB_OFFLINE work). A damaged cached file (a truncated or corrupt .gz) is fetched once more.
    Returns the cached snapshot folder, laid out like --source."""
    paths = []
    for subset in subsets:
        for split in SPLITS:
            path = fetch(f"{subset}/{split}.jsonl.gz")
            damage = gzip_damage(path)
            if damage:
                print(f"note: {path} is damaged ({type(damage).__name__}: {damage}); downloading "
                      f"it again")
                path = fetch(f"{subset}/{split}.jsonl.gz", force=True)
                damage = gzip_damage(path)
                if damage:
                    raise SystemExit(f"error: the download of {path} is damaged "
                                     f"({type(damage).__name__}: {damage}); try again later, or "
                                     f"pass --source DIR with a local copy")
            paths.append(path)
    return os.path.dirname(os.path.dirname(paths[0]))  # <snapshot>/<subset>/<split>.jsonl.gz


def fetch(filename, force=False):
    """Local path of one file of the dataset repository (downloaded if
    needed, or again if force)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return hf_hub_download(HUB_REPO, filename, repo_type="dataset", force_download=force)
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise SystemExit(f"error: {HUB_REPO}/{filename} is not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) and could not be downloaded{offline}. "
                         f"Connect to the internet (or a mirror set in HF_ENDPOINT), or pass "
                         f"--source DIR with a local copy laid out as "
                         f"<subset>/<split>.jsonl[.gz]") from None
    except Exception as e:  # repository or network errors of the hub client
        raise SystemExit(f"error: could not download {HUB_REPO}/{filename} ({type(e).__name__}: "
                         f"{e})\nor pass --source DIR with a local copy") from None


def write_jsonl(path, rows):
    """Write rows as JSON lines atomically (temp file + rename), so a
    crash never leaves half a file."""
    with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    fsync_replace(path + ".tmp", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--subsets", default="helpful-base",
                   help=f"comma-separated, from {', '.join(SUBSETS)}")
    p.add_argument("--source", default=None,
                   help="local folder laid out as <subset>/<split>.jsonl[.gz]; no download")
    p.add_argument("--out_dir", default=HERE, help="where prepared files go")
    p.add_argument("--val_fraction", type=float, default=0.05,
                   help="share of prompts carved out when a split is missing")
    p.add_argument("--seed", type=int, default=1337, help="seed for carving splits")
    p.add_argument("--strict", action="store_true", help="any dropped line is an error")
    args = p.parse_args(argv)
    subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
    if not subsets:
        p.error(f"--subsets is empty: name one or more of {', '.join(SUBSETS)}")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val_fraction {args.val_fraction} is out of range: it must be in (0, 1)")
    if path_problem(args.out_dir, "out_dir"):
        p.error(f"--out_dir {args.out_dir!r} {path_problem(args.out_dir, 'out_dir')}; it must be a "
                f"folder to write to")

    # 1. locate (or download) the source files
    if args.source is None:
        unknown = [s for s in subsets if s not in SUBSETS]
        if unknown:
            raise SystemExit(f"error: unknown subset(s) {', '.join(unknown)}; HH-RLHF has "
                             f"{', '.join(SUBSETS)}")
        source = download_subsets(subsets)
    else:
        source = args.source
        if not os.path.isdir(source):
            raise SystemExit(f"error: --source {source} is not a folder")
        found = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d)))
        for s in subsets:
            folder = os.path.join(source, s)
            if s not in found:
                raise SystemExit(f"error: --source {source} has no subset folder '{s}' "
                                 f"(found: {', '.join(found) or 'nothing'})")
            if not any(find_file(folder, sp) for sp in SPLITS):
                raise SystemExit(f"error: {folder} has no train/test .jsonl(.gz) "
                                 f"(found: {', '.join(sorted(os.listdir(folder))) or 'nothing'})")

    # 2. parse, filter, and carve a missing split from the other one
    stats = {"subsets": {}, "notes": []}
    bad, train, val = [], [], []
    for s in subsets:
        parsed = {}
        for split in SPLITS:
            path = find_file(os.path.join(source, s), split)
            if path is not None:
                fix = ("run prepare.py again: it fetches a damaged download again"
                       if args.source is None else
                       "check the --source copy (copy it again from the original, or delete it to "
                       "use the other split)")
                records, counts = read_file(path, bad, args.strict, fix)
                parsed[split], stats["subsets"].setdefault(s, {})[split] = records, counts
        if "train" in parsed and "test" in parsed:
            sub_train, sub_val = parsed["train"], parsed["test"]
        else:
            have, want = ("train", "test") if "train" in parsed else ("test", "train")
            sub_train, sub_val = carve(parsed[have], args.val_fraction, args.seed)
            stats["notes"].append(f"{s}: no {want} file, split {have} by prompt into train/val "
                                  f"(val_fraction {args.val_fraction}, seed {args.seed})")
        train += sub_train
        val += sub_val
    if len(bad) > SHOW_BAD:
        print(f"  ... and {len(bad) - SHOW_BAD} more dropped lines (see counts below)")
    per_file = [c for sub in stats["subsets"].values() for c in sub.values()]
    stats["total"] = {k: sum(c[k] for c in per_file) for k in per_file[0]}

    total = stats["total"]
    for name, records in (("train", train), ("val", val)):
        # empty or wholly malformed source files: refuse rather than write empty data
        if not records:
            dropped = ", ".join(f"{r} {total[r]}" for r in REASONS if total[r]) or (
                "none, but too few prompts to carve both splits" if total["read"]
                else "none: the files hold no lines")
            raise SystemExit(f"error: no usable comparisons for {name} (read {total['read']} "
                             f"lines; dropped: {dropped}); nothing written. Check --source.")

    # 3. write the three views of each split
    os.makedirs(args.out_dir, exist_ok=True)
    prompts = {}
    for name, records in (("train", train), ("val", val)):
        prompts[name] = list(dict.fromkeys(r["prompt"] for r in records))
        write_jsonl(os.path.join(args.out_dir, f"comparisons_{name}.jsonl"), records)
        write_jsonl(os.path.join(args.out_dir, f"sft_{name}.jsonl"),
                    ({"prompt": r["prompt"], "response": r["chosen"]} for r in records))
        write_jsonl(os.path.join(args.out_dir, f"prompts_{name}.jsonl"),
                    ({"prompt": q} for q in prompts[name]))
        stats[name] = {"comparisons": len(records), "prompts": len(prompts[name])}
    stats["prompts_in_both_splits"] = len(set(prompts["train"]) & set(prompts["val"]))
    tmp = os.path.join(args.out_dir, "stats.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(stats, indent=2) + "\n")
    fsync_replace(tmp, os.path.join(args.out_dir, "stats.json"))

    # 4. summary
    print(f"{'subset/split':<34}{'read':>8}{'kept':>8}  dropped")
    rows = [(f"{s}/{sp}", c) for s, sub in stats["subsets"].items() for sp, c in sub.items()]
    for name, c in rows + [("total", stats["total"])]:
        dropped = ", ".join(f"{r} {c[r]}" for r in REASONS if c[r]) or "-"
        print(f"{name:<34}{c['read']:>8}{c['kept']:>8}  {dropped}")
    for note in stats["notes"]:
        print(f"note: {note}")
    if stats["prompts_in_both_splits"]:
        print(f"note: {stats['prompts_in_both_splits']} prompts occur in both train and val (as in "
              f"the source split)")
    print(f"train: {stats['train']['comparisons']} comparisons, {stats['train']['prompts']} "
          f"prompts | val: {stats['val']['comparisons']} comparisons, {stats['val']['prompts']} "
          f"prompts -> {args.out_dir}")
    print("next: python sft.py --config tiny")
    return stats


if __name__ == "__main__":
    main()
