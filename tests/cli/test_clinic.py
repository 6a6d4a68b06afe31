"""The command line as a clinic uses it, on the embedded sklearn digits: nothing broken is
ever written, files know where they came from (provenance, manifests, verify), small forget
sets, checkpoints / resume / Ctrl-C, errors that name the flag, file and line, and help."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import fastunlearn as fu
from fastunlearn.cli import main as cli
from fastunlearn.cli import train as train_cmd
from fastunlearn.cli.resume import Interrupted, run_resumable
from fastunlearn.data.checkpoint import load_model, save_model
from fastunlearn.engine.finetune import DivergedError
from fastunlearn.runtime import manifest

DIGITS = ["--data", "digits", "--device", "cpu", "--no-progress"]


def cli_run(*argv, cwd=None, env=None):
    """The CLI in a fresh process: (rc, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "fastunlearn.cli", *argv], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=600)
    return p.returncode, p.stdout, p.stderr


def sha(path):
    return manifest.sha256_file(path)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clinic") / "orig.safetensors")
    rc = cli.main(["train", "--arch", "smallcnn", "--width", "8", "--train-epochs", "8", "--train-size", "1200",
                   "--out", path, *DIGITS])
    assert rc == 0
    return path


def unlearn_args(model, out, *extra):
    return ["unlearn", "--model", model, "--out", out, "--epochs", "2", "--lr", "1e-3", *DIGITS, *extra]


# ------------------------------------------------------------------ nothing broken is written
@pytest.mark.parametrize("field,value", [("lr", float("inf")), ("lr", float("nan")), ("momentum", float("nan")),
                                         ("eps", float("inf")), ("gamma", float("inf")), ("lamda", float("nan")),
                                         ("remain_reg", float("inf")), ("alpha", float("inf"))])
def test_config_refuses_non_finite(field, value):
    with pytest.raises(ValueError, match=field):
        fu.UnlearnConfig(**{field: value})


@pytest.mark.parametrize("flag", ["inf", "nan"])
def test_cli_lr_non_finite_names_the_flag_and_writes_nothing(tmp_path, original, flag):
    out = tmp_path / "a.safetensors"
    rc, _, err = cli_run(*unlearn_args(original, str(out), "--forget-class", "3"), "--lr", flag)
    assert rc == 2 and "--lr" in err and "UnlearnConfig" not in err and "Traceback" not in err, err
    assert not out.exists()


def test_divergence_stops_returns_no_model_and_names_lr(original):
    model, meta = load_model(original)
    from fastunlearn.cli.common import load_splits, subset
    _, splits = load_splits("digits")
    x, y = subset(splits["train"], 1200, 0)
    keep = y != 3
    with pytest.raises(DivergedError, match=r"config\.lr"):
        fu.unlearn(model, (x[~keep], y[~keep]), config=fu.UnlearnConfig(lr=1e30, epochs=3), mean=meta["mean"],
                   std=meta["std"], progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the input is untouched


def test_cli_divergence_writes_nothing(tmp_path, original):
    out = tmp_path / "d.safetensors"
    rc, _, err = cli_run(*unlearn_args(original, str(out), "--forget-class", "3"), "--lr", "1e30")
    assert rc == 2 and "diverged" in err and "--lr" in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "d.manifest.json").exists()


def test_out_may_not_overwrite_an_input_without_force(tmp_path, original):
    copy = tmp_path / "m.safetensors"
    copy.write_bytes(open(original, "rb").read())
    before = sha(str(copy))
    rc = cli.main(unlearn_args(str(copy), str(copy), "--forget-class", "3"))
    assert rc == 2 and sha(str(copy)) == before
    rc = cli.main(unlearn_args(str(copy), str(copy), "--forget-class", "3", "--force"))
    assert rc == 0 and sha(str(copy)) != before


@pytest.mark.parametrize("out", ["/proc/nope/out.safetensors", "newdir/sub/x.safetensors"])
def test_out_folder_is_checked_before_any_work(tmp_path, original, out, capsys):
    t0 = time.perf_counter()
    rc = cli.main(unlearn_args(original, out if out.startswith("/") else str(tmp_path / out), "--forget-class", "3"))
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err, err
    assert not (tmp_path / "newdir").exists()  # no folder created silently
    assert "forgetting" not in capsys.readouterr().out and time.perf_counter() - t0 < 60


def test_outputs_respect_the_umask(tmp_path, original):
    old = os.umask(0o022)
    try:
        out = str(tmp_path / "u.safetensors")
        assert cli.main(unlearn_args(original, out, "--forget-class", "3")) == 0
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o644
    assert os.stat(manifest.manifest_path(out)).st_mode & 0o777 == 0o644


# ------------------------------------------------------------------ provenance, manifests, verify
def test_chained_revisions_keep_the_chain(tmp_path, original):
    r1, r2 = str(tmp_path / "r1.safetensors"), str(tmp_path / "r2.safetensors")
    assert cli.main(unlearn_args(original, r1, "--forget-class", "3")) == 0
    assert cli.main(unlearn_args(r1, r2, "--forget-class", "5")) == 0
    _, meta = load_model(r2)
    prov = meta["provenance"]
    assert [p["path"] for p in prov["parents"]] == [os.path.abspath(r1), os.path.abspath(original)]
    assert prov["parents"][0]["sha256"] == sha(r1) and prov["parents"][0]["forget"]["classes"] == [3]
    assert prov["forget"]["classes"] == [5] and prov["data"]["train_size"] == 1200
    assert prov["input_model"]["sha256"] == sha(r1)
    for key in ("torch", "python", "fastunlearn", "device_name"):
        assert key in prov["environment"]


def test_model_records_its_provenance_and_a_manifest_beside_it(original):
    _, meta = load_model(original)
    data = meta["provenance"]["data"]
    assert (data["dataset"], data["train_size"], data["train_seed"], data["input_shape"]) == \
        ("digits", 1200, 0, [1, 8, 8])
    beside = json.loads(open(manifest.manifest_path(original)).read())
    assert beside["output"]["sha256"] == sha(original) and beside["kind"] == "train"


def test_contradicting_data_is_refused(tmp_path, original):
    # A model recorded as trained on 3x8x8 images of a canonical set, offered digits (1x8x8).
    model, meta = load_model(original)
    foreign = str(tmp_path / "foreign.safetensors")
    prov = dict(meta["provenance"], data=dict(meta["provenance"]["data"], dataset="fashion-mnist",
                                              input_shape=[1, 28, 28]))
    save_model(model, foreign, meta["arch"], mean=meta["mean"], std=meta["std"], dataset="fashion-mnist",
               provenance=prov)
    rc, _, err = cli_run(*unlearn_args(foreign, str(tmp_path / "o.safetensors"), "--forget-class", "3"))
    assert rc == 2 and "fashion-mnist" in err and "--data" in err, err
    assert not (tmp_path / "o.safetensors").exists()


def test_contradicting_input_shape_is_refused(tmp_path, original):
    # A data set known only by its folder name: the recorded image shape is what is compared.
    model, meta = load_model(original)
    foreign = str(tmp_path / "foreign.safetensors")
    prov = dict(meta["provenance"], data=dict(meta["provenance"]["data"], dataset="scans", input_shape=[3, 8, 8]))
    save_model(model, foreign, meta["arch"], mean=meta["mean"], std=meta["std"], dataset="scans", provenance=prov)
    rc = cli.main(["eval", "--model", foreign, "--forget-class", "3", *DIGITS])
    assert rc == 2
    rc, _, err = cli_run(*unlearn_args(foreign, str(tmp_path / "o.safetensors"), "--forget-class", "3"))
    assert rc == 2 and "[1, 8, 8]" in err and "[3, 8, 8]" in err, err
    assert not (tmp_path / "o.safetensors").exists()


def test_eval_and_report_use_the_recorded_train_size(tmp_path, original):
    out = tmp_path / "rep"
    rc = cli.main(["report", "--models", original, "--forget-class", "3", "--no-tsne", "--test-size", "200",
                   "--out", str(out), *DIGITS])
    assert rc == 0
    sizes = json.loads((out / "metrics.json").read_text())["sizes"]
    assert sizes["forget"] + sizes["remain"] == 1200
    assert json.loads((out / "manifest.json").read_text())["models"]
    rc = cli.main(["eval", "--model", original, "--forget-class", "3", "--train-size", "1000", *DIGITS])
    assert rc == 2


def test_verify_detects_a_changed_model_and_a_changed_forget_list(tmp_path, original, capsys):
    idx = tmp_path / "forget.txt"
    idx.write_text("\n".join(str(i) for i in range(0, 40, 2)) + "\n")
    out = str(tmp_path / "v.safetensors")
    assert cli.main(unlearn_args(original, out, "--forget-indices", str(idx))) == 0
    record = manifest.manifest_path(out)
    capsys.readouterr()
    assert cli.main(["verify", "--manifest", record, "--device", "cpu"]) == 0
    assert "MISMATCH" not in capsys.readouterr().out
    idx.write_text("\n".join(str(i) for i in range(1, 41, 2)) + "\n")
    assert cli.main(["verify", "--manifest", record, "--device", "cpu"]) == 1
    assert "MISMATCH forget-index list" in capsys.readouterr().out
    idx.write_text("\n".join(str(i) for i in range(0, 40, 2)) + "\n")
    model, meta = load_model(out)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    save_model(model, out, meta.pop("arch"), **meta)
    assert cli.main(["verify", "--manifest", record, "--device", "cpu"]) == 1
    assert "MISMATCH output" in capsys.readouterr().out


def test_verify_re_runs_the_metrics_of_a_report(tmp_path, original, capsys):
    un = str(tmp_path / "u.safetensors")
    assert cli.main(unlearn_args(original, un, "--forget-class", "3")) == 0
    out = tmp_path / "rep"
    assert cli.main(["report", "--models", original, un, "--forget-class", "3", "--no-tsne", "--test-size", "200",
                     "--out", str(out), *DIGITS]) == 0
    record = str(out / "manifest.json")
    capsys.readouterr()
    assert cli.main(["verify", "--manifest", record, "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    for what in ("ok       forget-index list", "ok       metric forget_acc of u", "ok       metric mia_lr of orig",
                 "ok       model u"):
        assert what in said, said
    assert "not checked" not in said and "MISMATCH" not in said
    rec = json.loads(open(record).read())
    rec["metrics"]["u"]["remain_acc"] += 0.01
    open(record, "w").write(json.dumps(rec))
    assert cli.main(["verify", "--manifest", record, "--device", "cpu"]) == 1
    assert "MISMATCH metric remain_acc of u: now" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["truncated", "text", "pt"])
def test_bad_model_files_get_one_line(tmp_path, original, kind):
    bad = tmp_path / f"bad.{'pt' if kind == 'pt' else 'safetensors'}"
    if kind == "truncated":
        bad.write_bytes(open(original, "rb").read()[:-500])
    elif kind == "text":
        bad.write_text("not a model\n")
    else:
        torch.save({"w": torch.zeros(3)}, bad)
    rc, _, err = cli_run("eval", "--model", str(bad), "--forget-class", "3", *DIGITS)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in err, err


# ------------------------------------------------------------------ small forget sets
def test_a_one_image_forget_set_unlearns_evaluates_and_reports(tmp_path, original):
    idx = tmp_path / "one.txt"
    idx.write_text("7\n")
    out, js = str(tmp_path / "one.safetensors"), str(tmp_path / "one.json")
    rc, stdout, err = cli_run(*unlearn_args(original, out, "--forget-indices", str(idx), "--json", js))
    assert rc == 0, err
    assert "n/a (needs >= 5)" in stdout
    rows = json.loads(open(js).read())
    assert rows["unlearned"]["mia_lr"] is None and rows["unlearned"]["remain_acc"] > 0.5
    rep = tmp_path / "rep"
    assert cli.main(["report", "--models", original, out, "--retrain", original, "--forget-indices", str(idx),
                     "--no-tsne", "--test-size", "200", "--out", str(rep), *DIGITS]) == 0
    assert "n/a (needs >= 5)" in (rep / "report.md").read_text()
    assert json.loads((rep / "metrics.json").read_text())["rows"]["one"]["mia_lr"] is None


def test_evaluate_with_two_forget_images_gives_accuracies():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(40, 1, 2, 2), torch.randint(0, 3, (40,))
    m = fu.evaluate(model, (x[:2], y[:2]), (x[2:20], y[2:20]), (x[20:], y[20:]))
    assert m["mia_lr"] is None and 0 <= m["forget_acc"] <= 1 and 0 <= m["mia_efficacy"] <= 1


# ------------------------------------------------------------------ interrupt and resume
def test_checkpoint_and_resume_from_the_cli(tmp_path, original):
    ck = tmp_path / "ck"
    ck.mkdir()
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    assert cli.main(unlearn_args(original, a, "--forget-class", "3", "--checkpoint-dir", str(ck),
                                 "--checkpoint-every", "3")) == 0
    assert (ck / "checkpoint.pt").exists()
    assert cli.main(unlearn_args(original, b, "--forget-class", "3", "--resume", str(ck / "checkpoint.pt"))) == 0
    wa, wb = load_model(a)[0].state_dict(), load_model(b)[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # resumed from step 3 of 4: the same weights


def test_interrupt_says_where_and_how_to_resume(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "checkpoint.pt").write_bytes(b"x")

    class Args:
        checkpoint_dir, checkpoint_every, resume, out = str(ck), None, None, "o.safetensors"
        argv = ["unlearn", "--model", "m.safetensors", "--out", "o.safetensors"]

    def call(on_step, **kw):
        for s in range(1, 4):
            on_step(s, {"total": 10})
        raise KeyboardInterrupt

    with pytest.raises(Interrupted) as e:
        run_resumable(Args, call, 100, fu.UnlearnConfig())
    assert "at step 3 of 10" in e.value.message and "--resume" in e.value.message
    assert e.value.message.count("\n") == 0


def test_ctrl_c_prints_one_line(tmp_path, original):
    ck = tmp_path / "ck"
    ck.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "fastunlearn.cli", *unlearn_args(
        original, str(tmp_path / "c.safetensors"), "--forget-class", "3", "--checkpoint-dir", str(ck),
        "--checkpoint-every", "1"), "--epochs", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A test runner's worker may ignore SIGINT, and an ignored signal stays ignored across exec:
        # the child gets the default disposition, as a command typed in a terminal has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while not (ck / "checkpoint.pt").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert (ck / "checkpoint.pt").exists(), "no checkpoint within 300 s"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    lines = err.strip().splitlines()
    assert p.returncode == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert "interrupted at step" in lines[0] and "--resume" in lines[0]
    assert not (tmp_path / "c.safetensors").exists()


# ------------------------------------------------------------------ errors name the flag, file and line
def test_epochs_zero_is_refused(tmp_path, original, capsys):
    assert cli.main(unlearn_args(original, str(tmp_path / "z.safetensors"), "--forget-class", "3",
                                 "--epochs", "0")) == 2
    assert "--epochs" in capsys.readouterr().err and not (tmp_path / "z.safetensors").exists()


def test_bad_indices_line_names_file_and_line(tmp_path, original, capsys):
    idx = tmp_path / "bad.txt"
    idx.write_text("1\n2\nabc\n")
    assert cli.main(unlearn_args(original, str(tmp_path / "o.safetensors"), "--forget-indices", str(idx))) == 2
    err = capsys.readouterr().err
    assert str(idx) in err and "line 3" in err and "'abc'" in err


def test_rule_with_an_unknown_operator_names_the_operator(tmp_path, original, capsys):
    meta = tmp_path / "meta.csv"
    meta.write_text("index,device\n" + "".join(f"{i},{'A' if i % 2 else 'B'}\n" for i in range(1200)))
    assert cli.main(unlearn_args(original, str(tmp_path / "o.safetensors"), "--forget-rule", "device ~= A",
                                 "--metadata", str(meta))) == 2
    assert "'~=' is not an operator" in capsys.readouterr().err


# ------------------------------------------------------------------ help
def test_every_flag_has_help_with_its_default_once():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert p.description, f"{name} --help has no description"
        for a in p._actions:
            if a.dest != "help":
                assert a.help, f"{name} {a.option_strings or a.dest} has no help"
        text = p.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        assert text.count("(default: cuda if available)") == 0


def test_eval_and_report_show_progress(tmp_path, original, capsys):
    shown = [a for a in DIGITS if a != "--no-progress"]
    assert cli.main(["eval", "--model", original, "--forget-class", "3", *shown]) == 0
    assert "evaluating model" in capsys.readouterr().err
    assert cli.main(["report", "--models", original, "--forget-class", "3", "--no-tsne", "--test-size", "200",
                     "--out", str(tmp_path / "rep"), *shown]) == 0
    err = capsys.readouterr().err
    assert "scoring 1 models" in err and "report:" in err, err


def test_train_warns_before_a_long_cpu_job(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_cmd, "WARN_SECONDS", 0.0)
    assert cli.main(["train", "--arch", "smallcnn", "--width", "4", "--train-epochs", "1", "--train-size", "200",
                     "--out", str(tmp_path / "t.safetensors"), *DIGITS]) == 0
    err = capsys.readouterr().err
    assert "minutes on this CPU" in err and "--train-size" in err


def test_retrain_trains_without_the_forget_set(tmp_path, capsys):
    out = str(tmp_path / "re.safetensors")
    assert cli.main(["retrain", "--arch", "smallcnn", "--width", "8", "--train-epochs", "4", "--train-size", "600",
                     "--forget-class", "3", "--out", out, *DIGITS]) == 0
    _, meta = load_model(out)
    prov = meta["provenance"]
    assert prov["kind"] == "retrain" and prov["forget"]["classes"] == [3]
    assert prov["counts"]["train"] == 600 - prov["forget"]["count"]
