"""--log_to: metrics also go to TensorBoard (event files readable, same names and values as
metrics.jsonl), imported only when asked, with one clear message when the package is missing. No
network. plot_metrics labels its x-axis with what a step is."""
import sys
from dataclasses import dataclass

import pytest

import lib.tracking
from conftest import metrics_by_name, tensorboard_scalars
from lib.tracking import MetricsLog, plot_metrics


@dataclass
class RunConfig:
    lr: float = 1e-4


def test_tensorboard_events_hold_the_metrics_jsonl_values(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(str(tmp_path), 3, log_to="tensorboard", run_config=RunConfig())
    log.log(0, {"val/loss": 2.5, "val/acc": 0.5})
    for step in (1, 2, 3):
        log.log(step, {"train/loss": 3.0 / step, "lr": 1e-4 * step,
                       "sample": "text is not a scalar"})
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    expected = metrics_by_name(log.path)
    assert set(scalars) == set(expected) == {"val/loss", "val/acc", "train/loss", "lr"}
    for tag, points in expected.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points]
        # float32 there
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6)


@pytest.mark.parametrize("name, module",
                         [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_missing_tracker_package_says_how_to_install(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` fails as if not installed
    with pytest.raises(SystemExit, match=f"pip install {name}"):
        MetricsLog(str(tmp_path), 1, log_to=name)


def test_unknown_tracker_is_refused_and_default_is_off(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="expected wandb, tensorboard"):
        MetricsLog(str(tmp_path), 1, log_to="mlflow")
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    MetricsLog(str(tmp_path), 1).log(1, {"loss": 1.0})  # nothing imported by default
    assert not (tmp_path / "tensorboard").exists()


@pytest.mark.parametrize("xlabel", [None, "iteration"])
def test_plot_metrics_labels_the_x_axis_with_what_a_step_is(tmp_path, monkeypatch, xlabel):
    """Every panel's x-axis says what the caller's step is ("step" unless told: PPO's is an
    iteration), and each panel plots its keys' values against the rows' step."""
    log = MetricsLog(str(tmp_path), 3)
    for step in (1, 2, 3):
        log.log(step, {"score": float(step), "kl": 0.1 * step})
    figures = []
    monkeypatch.setattr(lib.tracking, "save_figure", lambda fig, path: figures.append(fig) or path)
    kwargs = {"xlabel": xlabel} if xlabel else {}
    plot_metrics(log.path, str(tmp_path / "m.png"), {"score": ["score"], "KL": ["kl"]}, **kwargs)
    axes = [ax for ax in figures[0].axes if ax.lines]
    assert [ax.get_xlabel() for ax in axes] == [xlabel or "step"] * 2
    assert list(axes[0].lines[0].get_xdata()) == [1, 2, 3]
    assert list(axes[1].lines[0].get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
