"""Shared test setup: import the repository's modules, use the offline tokenizer copy, few threads."""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
sys.path.insert(0, REPO)
if os.path.isdir(os.path.join(SHARED, "tiktoken")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken"))
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_HH = os.path.join(SHARED, "data", "hh-rlhf")
needs_shared_hh = pytest.mark.skipif(not os.path.isdir(SHARED_HH), reason="../shared/data/hh-rlhf not present")


@pytest.fixture(scope="session")
def hh_prepared(tmp_path_factory):
    """The shared HH-RLHF copy prepared by data/hh_rlhf/prepare.py into a temp folder (skips if absent)."""
    if not os.path.isdir(SHARED_HH):
        pytest.skip("../shared/data/hh-rlhf not present")
    import importlib.util
    spec = importlib.util.spec_from_file_location("hh_rlhf_prepare", os.path.join(REPO, "data", "hh_rlhf", "prepare.py"))
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    out = tmp_path_factory.mktemp("hh_prepared")
    prepare.main(["--source", SHARED_HH, "--subsets", "harmless-base", "--out_dir", str(out)])
    return str(out)
