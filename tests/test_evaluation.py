"""`evaluation` pieces that need no model: EvalResult's reports, label_map, evaluate's stop and
empty-split handling, plot_confusion. Scores of real checkpoints are checked against the
Predictor in test_eval_predict_cli.py."""

import json
import signal

import matplotlib
import numpy as np
import pytest

from resnet_jax import evaluation


def _result(**overrides) -> evaluation.EvalResult:
    confusion = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 2]])
    fields = {"loss": 0.5, "top1": 5 / 7, "top5": 1.0, "count": 7, "confusion": confusion}
    return evaluation.EvalResult(**{**fields, **overrides})


def test_eval_result_metrics_per_class_and_json():
    result = _result(class_names=["cat", "dog", "fish"], data="somewhere", skipped=(("x", "y"),))
    assert result.as_metrics() == {"val_loss": 0.5, "val_accuracy": 5 / 7, "val_top5": 1.0}
    assert set(result.as_metrics(prefix="test_")) == {"test_loss", "test_accuracy", "test_top5"}
    assert result.per_class() == [
        {"class": "cat", "images": 4, "correct": 3, "accuracy": 0.75},
        {"class": "dog", "images": 0, "correct": 0, "accuracy": None},
        {"class": "fish", "images": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)},
    ]
    report = json.loads(json.dumps(result.to_json()))
    assert report["confusion"] == result.confusion.tolist() and report["count"] == 7
    assert report["class_names"] == ["cat", "dog", "fish"] and report["data"] == "somewhere"
    assert report["skipped"] == [{"path": "x", "reason": "y"}]
    unnamed = _result()  # as the trainer's evaluation returns it: no names, no origin
    assert unnamed.names == ["0", "1", "2"]
    assert [row["class"] for row in unnamed.per_class()] == ["0", "1", "2"]


def test_label_map_matches_by_name():
    mapping = evaluation.label_map(["roses", "daisy"], ["daisy", "tulips", "roses"])
    np.testing.assert_array_equal(mapping, [2, 0])
    np.testing.assert_array_equal(evaluation.label_map(["a", "b", "c"], None), [0, 1, 2])
    with pytest.raises(ValueError, match=r"the data has classes \['cactus'\] that the checkpoint"):
        evaluation.label_map(["daisy", "cactus"], ["daisy", "roses"])


def _never_called(*args):
    raise AssertionError("the eval step must not run")


def test_evaluate_stops_before_a_batch_and_refuses_an_empty_split():
    batch = {"image": np.zeros((4, 8, 8, 3), np.uint8), "label": np.zeros(4, np.int32)}
    with pytest.raises(evaluation.EvalInterrupted, match="SIGTERM") as stopped:
        evaluation.evaluate(
            _never_called, {}, iter([batch]), None, "shard_map", 3, stop=lambda: signal.SIGTERM
        )
    assert stopped.value.signum == signal.SIGTERM
    with pytest.raises(ValueError, match="evaluation split is empty"):
        evaluation.evaluate(_never_called, {}, iter([]), None, "shard_map", 3)


def test_plot_confusion_writes_a_png_and_leaves_matplotlib_alone(tmp_path):
    backend = matplotlib.get_backend()
    out = tmp_path / "plots" / "confusion.png"
    path = evaluation.plot_confusion(_result().confusion, ["cat", "dog", "fish"], out)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend
