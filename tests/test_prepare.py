"""Tests for data/hh_rlhf/prepare.py: splitting, drop reasons, strictness, determinism, carving,
fetching through the hub cache."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HH_FIXTURES, A, H, gzip_fixtures, prepare

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "hh-rlhf"

FRANCE = H + "What is the capital of France?" + A
BREAD = H + "Can you help me bake bread?" + A + " Sure! What kind of bread?" + H + "Sourdough." + A
OUTPUTS = [f"{kind}_{split}.jsonl" for kind in ("comparisons", "sft", "prompts")
           for split in ("train", "val")]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def output_bytes(out_dir):
    return {name: (Path(out_dir) / name).read_bytes() for name in OUTPUTS + ["stats.json"]}


def write_synthetic(path, n_prompts=20, pairs_per_prompt=2):
    """A gzipped split with several comparisons per prompt, to exercise carving by prompt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(n_prompts):
            for j in range(pairs_per_prompt):
                prompt = H + f"Question number {i}?" + A
                row = {"chosen": prompt + f" Good answer {j}.",
                       "rejected": prompt + f" Bad answer {j}."}
                f.write(json.dumps(row) + "\n")


def test_split_dialogue_splits_at_last_assistant_turn():
    prompt, response = prepare.split_dialogue(BREAD + " Use a starter.")
    assert prompt == BREAD
    assert response == " Use a starter."  # the leading space stays with the response
    assert prepare.split_dialogue(FRANCE) == (FRANCE, "")
    with pytest.raises(ValueError):
        prepare.split_dialogue(H + "no assistant here")


def test_parse_pair_keeps_exact_texts():
    line = json.dumps({"chosen": BREAD + " Flour and water.", "rejected": BREAD + " An oven.\n"})
    assert prepare.parse_pair(line) == ({"prompt": BREAD, "chosen": " Flour and water.",
                                         "rejected": " An oven.\n"},
                                        None)


def test_every_drop_reason_is_counted_on_fixture(tmp_path):
    stats = prepare.main(["--source", str(HH_FIXTURES), "--out_dir", str(tmp_path)])
    subset = stats["subsets"]["helpful-base"]
    train, test = subset["train"], subset["test"]
    assert train == {"read": 12, "kept": 3, "malformed_json": 2, "missing_keys": 1,
                     "no_shared_prompt": 3, "empty_response": 2, "identical_responses": 1}
    assert test == {"read": 4, "kept": 3, "malformed_json": 0, "missing_keys": 1,
                    "no_shared_prompt": 0, "empty_response": 0, "identical_responses": 0}
    assert stats["total"]["read"] == 16 and stats["total"]["kept"] == 6
    assert stats["train"] == {"comparisons": 3, "prompts": 2}
    assert stats["val"] == {"comparisons": 3, "prompts": 3}
    assert stats["notes"] == []  # both splits present: nothing carved
    assert read_jsonl(tmp_path / "comparisons_train.jsonl") == [
        {"prompt": FRANCE, "chosen": " The capital of France is Paris.",
         "rejected": " I don't know."},
        {"prompt": BREAD, "chosen": " You need a starter, flour, water and salt.",
         "rejected": " Bread is baked in an oven."},
        {"prompt": FRANCE, "chosen": " Paris.", "rejected": " Lyon."},
    ]
    assert read_jsonl(tmp_path / "sft_train.jsonl")[1] == {
        "prompt": BREAD, "response": " You need a starter, flour, water and salt."}
    assert read_jsonl(tmp_path / "prompts_train.jsonl") == [{"prompt": FRANCE}, {"prompt": BREAD}]
    assert json.loads((tmp_path / "stats.json").read_text()) == stats


def test_strict_fails_naming_file_and_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--source", str(HH_FIXTURES), "--out_dir", str(tmp_path), "--strict"])
    assert "train.jsonl:3: malformed_json" in str(e.value.code)
    assert not (tmp_path / "comparisons_train.jsonl").exists()


def test_rerun_is_byte_identical_and_no_prompt_in_both_splits(tmp_path):
    # no test file: val is carved
    write_synthetic(tmp_path / "src" / "helpful-base" / "train.jsonl.gz")
    args = ["--source", str(tmp_path / "src"), "--val_fraction", "0.2"]
    first = prepare.main(args + ["--out_dir", str(tmp_path / "a")])
    again = prepare.main(args + ["--out_dir", str(tmp_path / "a")])
    other = prepare.main(args + ["--out_dir", str(tmp_path / "b")])
    assert first == again == other
    assert output_bytes(tmp_path / "a") == output_bytes(tmp_path / "b")
    train = {r["prompt"] for r in read_jsonl(tmp_path / "a" / "comparisons_train.jsonl")}
    val = {r["prompt"] for r in read_jsonl(tmp_path / "a" / "comparisons_val.jsonl")}
    assert len(train) == 16 and len(val) == 4 and not train & val
    assert first["prompts_in_both_splits"] == 0
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_test_only_source_is_carved_into_both_splits(tmp_path, capsys):
    # like the shared dev copy
    write_synthetic(tmp_path / "src" / "harmless-base" / "test.jsonl.gz")
    stats = prepare.main(["--source", str(tmp_path / "src"), "--subsets", "harmless-base",
                          "--out_dir", str(tmp_path)])
    assert stats["train"] == {"comparisons": 38, "prompts": 19}
    assert stats["val"] == {"comparisons": 2, "prompts": 1}
    assert "harmless-base: no train file" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "prompts_train.jsonl")) == 19


def test_missing_subset_folder_names_what_was_found(tmp_path):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--source", str(HH_FIXTURES), "--subsets", "harmless-base", "--out_dir",
                      str(tmp_path)])
    message = str(e.value.code)
    assert "no subset folder 'harmless-base'" in message and "found: helpful-base" in message


def run_prepare_offline(cache, out_dir):
    """prepare.py (no --source) in a fresh process with HF_HUB_OFFLINE=1 and HF_HUB_CACHE=cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(REPO / "data" / "hh_rlhf" / "prepare.py"),
                           "--out_dir", str(out_dir)],
                          env=env, capture_output=True, text=True)


def test_download_reads_the_hub_cache_like_a_local_source(tmp_path):
    # a cache laid out as the Hugging Face hub client does:
    # datasets--<org>--<name>/snapshots/<rev>/..., refs/main
    repo = tmp_path / "hub" / "datasets--Anthropic--hh-rlhf"
    gzip_fixtures(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    run = run_prepare_offline(tmp_path / "hub", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    local = prepare.main(["--source", str(HH_FIXTURES), "--out_dir", str(tmp_path / "local")])
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["total"] == local["total"]
    assert {k: v for k, v in output_bytes(tmp_path / "out").items() if k != "stats.json"} == \
        {k: v for k, v in output_bytes(tmp_path / "local").items() if k != "stats.json"}


def test_offline_without_cached_copy_says_pass_source(tmp_path):
    run = run_prepare_offline(tmp_path / "empty", tmp_path / "out")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "not in the Hugging Face cache" in run.stderr and "HF_HUB_OFFLINE is set" in run.stderr
    assert "--source DIR" in run.stderr
    assert not (tmp_path / "out" / "comparisons_train.jsonl").exists()


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared HH-RLHF dev copy not present")
def test_shared_copy_prepares_plausibly(tmp_path):
    stats = prepare.main(["--source", str(SHARED), "--subsets", "harmless-base", "--out_dir",
                          str(tmp_path)])
    total = stats["total"]
    assert total["read"] == 1156 and 1000 < total["kept"] <= 1156
    assert total["read"] == total["kept"] + sum(total[r] for r in prepare.REASONS)
    assert stats["train"]["comparisons"] + stats["val"]["comparisons"] == total["kept"]
    assert 0 < stats["val"]["comparisons"] < stats["train"]["comparisons"]
    assert stats["prompts_in_both_splits"] == 0
    for r in read_jsonl(tmp_path / "comparisons_val.jsonl"):
        assert r["prompt"].endswith(A) and r["chosen"] != r["rejected"]
