"""--log_to: metrics also go to TensorBoard (event files readable, same names and values as metrics.jsonl),
imported only when asked, with one clear message when the package is missing. No network."""
import sys
from dataclasses import dataclass

import pytest

from lib.tracking import MetricsLog, read_metrics


@dataclass
class RunConfig:
    lr: float = 1e-4


def tensorboard_scalars(log_dir):
    """{tag: [(step, value), ...]} read back from the event files with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def metrics_by_name(path):
    """The numeric columns of metrics.jsonl as {name: [(step, value), ...]}."""
    out = {}
    for row in read_metrics(path):
        for k, v in row.items():
            if k != "step" and isinstance(v, float):
                out.setdefault(k, []).append((row["step"], v))
    return out


def test_tensorboard_events_hold_the_metrics_jsonl_values(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(str(tmp_path), 3, log_to="tensorboard", run_config=RunConfig())
    log.log(0, {"val/loss": 2.5, "val/acc": 0.5})
    for step in (1, 2, 3):
        log.log(step, {"train/loss": 3.0 / step, "lr": 1e-4 * step, "sample": "text is not a scalar"})
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    expected = metrics_by_name(log.path)
    assert set(scalars) == set(expected) == {"val/loss", "val/acc", "train/loss", "lr"}
    for tag, points in expected.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points]
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6)  # float32 there


@pytest.mark.parametrize("name, module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_missing_tracker_package_says_how_to_install(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if not installed
    with pytest.raises(SystemExit, match=f"pip install {name}"):
        MetricsLog(str(tmp_path), 1, log_to=name)


def test_unknown_tracker_is_refused_and_default_is_off(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="expected wandb, tensorboard"):
        MetricsLog(str(tmp_path), 1, log_to="mlflow")
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    MetricsLog(str(tmp_path), 1).log(1, {"loss": 1.0})  # nothing imported by default
    assert not (tmp_path / "tensorboard").exists()
