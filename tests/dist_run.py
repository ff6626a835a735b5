"""Launched by tests/test_distributed.py under torchrun: runs a stage's command line on every rank, or the
all-reduce whitening check, and leaves what each rank ends with in files the test compares.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_run.py sft --max_steps 3 ...
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_run.py whiten OUT_DIR

Stages write files on rank 0 only; here every rank also saves the weights it would checkpoint to
$RANK_COPIES/<checkpoint name>.rank<r> (through the stage's save_checkpoint), so ranks can be compared.
$FAIL_ON_RANK=r makes rank r alone fail in its first training batch (sft: collate raises an assertion).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lib.config  # noqa: E402
import lib.ddp  # noqa: E402


def whiten_check(out_dir):
    """Each rank whitens its own part (3 and 5 rows of ragged masks) with the all-reduce helper."""
    import ppo
    rank, _ = lib.ddp.init_distributed("cpu")
    g = torch.Generator().manual_seed(rank)
    rows = 3 + 2 * rank
    x = torch.randn(rows, 6, generator=g) * (1 + rank) + rank  # (rows, 6): a different mean and scale per rank
    mask = (torch.arange(6)[None, :] < torch.randint(1, 7, (rows, 1), generator=g)).float()  # (rows, 6)
    values = torch.randn(rows, 6, generator=g)
    torch.save({"x": x, "mask": mask, "values": values, "whitened": ppo.whiten(x, mask),
                "explained_var": ppo.explained_variance(values, x, mask),
                "var": lib.ddp.global_masked_var(x, mask)}, os.path.join(out_dir, f"whiten.rank{rank}"))
    lib.ddp.close_distributed()


def run_stage(name, argv):
    stage = __import__(name)
    copies, rank = os.environ.get("RANK_COPIES"), int(os.environ["RANK"])
    if copies:
        save = stage.save_checkpoint

        def save_on_every_rank(path, model, cfg, **extra):
            state = {"model": model.state_dict(), **{k: extra[k] for k in ("critic",) if k in extra}}
            torch.save(state, os.path.join(copies, f"{os.path.basename(path)}.rank{rank}"))
            return save(path, model, cfg, **extra)
        stage.save_checkpoint = save_on_every_rank
    if os.environ.get("FAIL_ON_RANK") == str(rank):
        def failing_collate(examples):
            raise AssertionError(f"injected failure on rank {rank}")
        stage.collate = failing_collate
    sys.argv = [f"{name}.py"] + argv
    lib.config.run(stage.train, stage.Config, stage.CONFIGS)


if __name__ == "__main__":
    if sys.argv[1] == "whiten":
        whiten_check(sys.argv[2])
    else:
        run_stage(sys.argv[1], sys.argv[2:])
