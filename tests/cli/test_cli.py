"""The command line end to end on the embedded sklearn digits: train, unlearn, eval, compose,
the method flags reaching UnlearnConfig, and refusals that say what was wrong."""

import hashlib
import json

import pytest

from fastunlearn.cli import common
from fastunlearn.cli import main as cli
from fastunlearn.data.checkpoint import load_model


def run(capsys, *argv):
    cli.main(list(argv))
    return capsys.readouterr().out


def sha(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "orig.safetensors")
    cli.main(["train", "--data", "digits", "--arch", "smallcnn", "--width", "8", "--train-epochs", "10",
              "--out", path, "--no-progress", "--device", "cpu"])
    return path


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "unlearn", "eval", "compose", "report", "bench", "demo", "backends"):
        assert cmd in out


def test_unlearn_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        cli.main(["unlearn", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--search-compile" in out and "--recheck-margin" in out
    assert "(default 0.1) (default: 0.1)" not in out and "(default: 0.1)" in out


def test_train_unlearn_eval_compose(capsys, tmp_path, original):
    before = sha(original)
    out_model, out_json = str(tmp_path / "forgot.safetensors"), str(tmp_path / "m.json")
    out = run(capsys, "unlearn", "--model", original, "--data", "digits", "--forget-class", "3", "--epochs", "2",
              "--lr", "1e-3", "--relabel", "nearest_incorrect", "--out", out_model, "--json", out_json,
              "--no-progress", "--device", "cpu")
    assert "saved" in out and sha(original) == before  # the original file is never rewritten
    rows = json.loads(open(out_json).read())
    assert set(rows) == {"original", "unlearned"}
    assert rows["original"]["forget_acc"] > 0.8 and rows["original"]["remain_acc"] > 0.8
    assert rows["unlearned"]["forget_acc"] < rows["original"]["forget_acc"] - 0.1
    assert rows["unlearned"]["remain_acc"] > 0.8
    model, meta = load_model(out_model, "cpu")
    assert meta["config"]["relabel"] == "nearest_incorrect" and meta["config"]["epochs"] == 2

    eval_json = str(tmp_path / "e.json")
    out = run(capsys, "eval", "--model", out_model, "--retrain", original, "--data", "digits", "--forget-class", "3",
              "--json", eval_json, "--device", "cpu")
    assert "forget_acc" in out or "forget" in out
    ev = json.loads(open(eval_json).read())
    assert "gap" in ev["model"] and ev["model"]["forget_acc"] == pytest.approx(rows["unlearned"]["forget_acc"])

    mixed = str(tmp_path / "mixed.safetensors")
    run(capsys, "compose", "--backbone", original, "--head", out_model, "--out", mixed)
    m_mixed, _ = load_model(mixed, "cpu")
    m_orig, _ = load_model(original, "cpu")
    sd_mixed, sd_orig, sd_forgot = m_mixed.state_dict(), m_orig.state_dict(), model.state_dict()
    head = [k for k in sd_mixed if k.startswith("classifier")]
    assert head and all((sd_mixed[k] == sd_forgot[k]).all() for k in head)
    assert all((sd_mixed[k] == sd_orig[k]).all() for k in sd_mixed if k not in head)


def test_method_flags_reach_the_config():
    args = cli.build_parser().parse_args(
        ["unlearn", "--model", "m", "--out", "o", "--forget-class", "0", "--eps", "0.2", "--steps", "3",
         "--gamma", "0.1", "--relabel", "soft", "--precision", "bf16", "--recheck-margin", "2.5", "--search-compile",
         "--remain-reg", "1", "--remain-target", "distill", "--batch-size", "32", "--augment", "flip",
         "--fuse-batch-norm", "off"])
    cfg = common.config_from_args(args)
    assert cfg.fuse_batch_norm is False
    assert (cfg.eps, cfg.steps, cfg.gamma, cfg.relabel, cfg.precision) == (0.2, 3, 0.1, "soft", "bf16")
    assert (cfg.recheck_margin, cfg.search_compile, cfg.remain_reg, cfg.remain_target, cfg.batch_size,
            cfg.augment) == (2.5, True, 1.0, "distill", 32, "flip")
    plain = common.config_from_args(cli.build_parser().parse_args(["unlearn", "--model", "m", "--out", "o"]))
    assert plain == type(plain)()  # no flag given: the authors' defaults, exactly


def test_refusals_name_the_problem(capsys, tmp_path, original):
    out = str(tmp_path / "x.safetensors")
    rc = cli.main(["unlearn", "--model", original, "--data", "digits", "--forget-class", "3", "--eps", "2",
                   "--out", out, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "--eps" in err and "UnlearnConfig" not in err and "2.0" in err, err
    rc = cli.main(["unlearn", "--model", str(tmp_path / "missing.safetensors"), "--data", "digits",
                   "--forget-class", "3", "--out", out, "--device", "cpu"])
    assert rc == 2 and "missing.safetensors does not exist" in capsys.readouterr().err
    rc = cli.main(["unlearn", "--model", original, "--data", "digits", "--forget-class", "12", "--out", out,
                   "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "12" in err, err
    assert not (tmp_path / "x.safetensors").exists()  # nothing written by a refused run


def test_tune_prints_the_candidates_and_caches_the_choice(capsys, tmp_path, original, monkeypatch):
    import os

    from fastunlearn.runtime import tuning

    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(tuning.TUNE_ENV, "1")
    out = run(capsys, "tune", "--model", original, "--data", "digits", "--examples", "64", "--batch-size", "16",
              "--budget", "60", "--device", "cpu")
    lines = out.splitlines()
    assert lines[0].startswith("tuned in") and str(tmp_path) in lines[0]
    headers = [i for i, line in enumerate(lines) if line.startswith("part")]
    assert len(headers) == 2  # the search's table and the train step's
    assert any(line.startswith("search") and "*" in line for line in lines)
    assert any(line.startswith("train") and "*" in line for line in lines)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    tuning.forget_memory()
