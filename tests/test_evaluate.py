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
                                 "--val-size", "0.2", "--out", str(out), "--overwrite"])
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
    (["--flip-average"], "takes 2D points", 2),
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


def test_tta_views_are_airbenchs_reflect_padded_shifts_and_mirrors():
    """Six views, weights summing to 1; the shifted ones are torch's reflect-padded crops."""
    from experiments.evaluate import tta_views
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 6)).astype(np.float32)
    views = tta_views(x)
    assert [w for w, _ in views] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    np.testing.assert_array_equal(views[1][1], x[..., ::-1])
    torch = pytest.importorskip("torch")
    padded = torch.nn.functional.pad(torch.tensor(x), (1, 1, 1, 1), mode="reflect")
    np.testing.assert_array_equal(views[2][1], padded[:, :, 0:5, 0:6].numpy())
    np.testing.assert_array_equal(views[4][1], padded[:, :, 2:7, 2:8].numpy())
    np.testing.assert_array_equal(views[5][1], padded[:, :, 2:7, 2:8].numpy()[..., ::-1])


def test_tta_scores_are_the_weighted_logits_of_the_views():
    from experiments.evaluate import class_scores, tta_views
    from mlp.arch import build_convnet
    net = build_convnet("conv4x3-pool2-fc10", (3, 8, 8), 10, seed=0)
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    expected = sum(w * net.scores(np.ascontiguousarray(v)) for w, v in tta_views(x))
    np.testing.assert_allclose(class_scores(net, x, tta=True), expected, rtol=1e-6)
    assert not np.allclose(class_scores(net, x, tta=True), net.scores(x))


def test_tta_on_a_2d_model_is_a_usage_error(tmp_path):
    assert runner.invoke(app, ["train", "--epochs", "3", "--out", str(tmp_path)]).exit_code == 0
    for flag in ("--tta", "--flip-average"):
        result = runner.invoke(app, ["evaluate", str(tmp_path), flag])
        assert result.exit_code == 2 and f"Invalid value for '{flag}'" in flat(result.output)
        assert "2D points" in flat(result.output)
