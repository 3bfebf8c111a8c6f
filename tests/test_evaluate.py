"""`nnx evaluate` on 2D models; the CIFAR-10 path is covered in test_cifar_training.py."""
import numpy as np
import pytest
from helpers import flat
from typer.testing import CliRunner

from cli.app import app
from experiments.evaluate import confusion_matrix, evaluate, split_arrays
from mlp.network import Network

runner = CliRunner()



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = runner.invoke(app, ["train", "--data", "blobs", "--hidden", "16", "--epochs", "300",
                                 "--val-fraction", "0.2", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    return out


def test_confusion_matrix_counts_true_rows_predicted_columns():
    m = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    np.testing.assert_array_equal(m, [[1, 1, 0], [0, 1, 0], [1, 0, 1]])


@pytest.mark.numerics
def test_evaluation_agrees_with_the_training_record(run_dir):
    import json
    net = Network.load(run_dir / "model.npz")
    record = json.loads((run_dir / "config.json").read_text())
    assert evaluate(net, "val").accuracy == pytest.approx(record["final_val_acc"])
    assert evaluate(net, "train").accuracy == pytest.approx(record["final_train_acc"])


def test_2d_test_split_is_a_fresh_draw_of_the_same_generator(run_dir):
    net = Network.load(run_dir / "model.npz")
    X_test, y_test, _ = split_arrays(net, "test")
    X_train, _, _ = split_arrays(net, "train")
    assert len(X_test) == 300 and np.bincount(y_test).tolist() == [100, 100, 100]
    assert not np.isin(X_test[:, 0], X_train[:, 0]).any()


def test_cli_prints_accuracy_per_class_and_the_confusion_matrix(run_dir, tmp_path):
    net = Network.load(run_dir / "model.npz")
    expected = evaluate(net, "test")
    result = runner.invoke(app, ["evaluate", str(run_dir / "model.npz"), "--split", "test"])
    assert result.exit_code == 0, result.output
    assert f"accuracy {expected.accuracy:.2%}" in result.output
    assert "Per-class accuracy" in result.output and "Confusion matrix" in result.output
    for row in expected.confusion:
        assert " ".join(map(str, row)) in flat(result.output)


@pytest.mark.parametrize("args, message, code", [
    (["--data", "cifar10"], "trained on blobs, not cifar10", 2),
    (["--split", "holdout"], "'holdout' is not one of", 2),
    (["--flip-average"], "flip averaging needs image data", 1),
])
def test_cli_refuses_bad_requests_in_one_line(run_dir, args, message, code):
    result = runner.invoke(app, ["evaluate", str(run_dir), *args])
    assert result.exit_code == code and message in flat(result.output)
    assert "Traceback" not in result.output


def test_cli_refuses_a_file_that_is_not_a_model(tmp_path):
    bogus = tmp_path / "model.npz"
    np.savez(bogus, weights=np.ones(3))
    result = runner.invoke(app, ["evaluate", str(bogus)])
    assert result.exit_code == 1 and "not an nnx model file" in result.output
