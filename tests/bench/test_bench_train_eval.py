"""bench_train_eval runs its cases, and its predict_logits row computes the plain model's
logits."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))


def test_bench_train_eval_runs_and_predicts_the_plain_logits():
    import bench_train_eval

    rows = bench_train_eval.main(["--width", "0.125", "--train-size", "96", "--batch", "32", "--eval-size", "70",
                                  "--reps", "2", "--no-csv", "--device", "cpu"])
    assert [(r["bench"], r["case"]) for r in rows] == [
        ("train", "plain PyTorch, fp32"), ("train", "train_classifier, fp32"), ("train", "train_classifier, bf16"),
        ("predict", "model.eval(), fp32"), ("predict", "predict_logits, fp32")]
    assert all(r["ms"] > 0 for r in rows)
    assert rows[-1]["max_abs_diff"] < 1e-4
