"""Tests for tune.py: the grid, its errors, and that a finished combination is read back."""
import json

import pytest
import torch

import tune
import wfnet
from conftest import FAST, write_mnist_like


def test_grid_is_every_combination_typed_by_the_command_line():
    combos = tune.grid(["lambda0=3,10", "T=2,4"])
    assert combos == [dict(lambda0="3", T="2"), dict(lambda0="3", T="4"),
                      dict(lambda0="10", T="2"), dict(lambda0="10", T="4")]
    assert tune.grid([]) == [{}]
    cfg = tune.config(["--untrain-lr", "0.02"], combos[3])
    assert cfg["T"] == 4 and type(cfg["T"]) is int and cfg["lambda0"] == 10.0
    assert cfg["untrain_lr"] == 0.02 and cfg["lambda2"] == wfnet.COMMON["lambda2"]


@pytest.mark.parametrize("tries, message", [
    (["epochs=3"], "NAME one of"), (["lambda0="], "NAME"), (["T=2.5"], "invalid int value"),
    (["T=0"], "T >= 1 (0)"), (["lambda0=1", "lambda0=2"], "twice"),
    (["untrain_steps=0"], "steps >= 1 (0)")])
def test_bad_tries_are_one_line(tries, message, capsys):
    with pytest.raises(SystemExit) as e:
        tune.main([f"--try={t}" for t in tries])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_tune_runs_each_combination_once_per_seed(tmp_path, monkeypatch, capsys):
    write_mnist_like(tmp_path / "data", "MNIST", 200, 100)
    flags = FAST + ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):                       # no original models yet
        tune.main(flags + ["--seeds", "0", "1"])
    assert "wfnet.py --seeds" in capsys.readouterr().err
    wfnet.main(flags + ["--explain-samples", "2", "--seeds", "0", "1"])
    table = tune.main(flags + ["--seeds", "0", "1", "--try", "lambda1=1,2"])
    assert [combo for combo, _ in table] == [dict(lambda1="1"), dict(lambda1="2")]
    assert [runs[0]["settings"]["lambda1"] for _, runs in table] == [1.0, 2.0]
    more = tune.main(flags + ["--seeds", "1", "--try", "lambda1=3", "--more"])[0][1][0]
    assert 0 <= more["backbone_deletion_wins"] <= 10 and more["worst_acc_f_test"] >= more["acc_f_test"]
    assert all(k in more for k in tune.MORE)
    runs = [r for r in json.loads((tmp_path / "o" / "tune.json").read_text())["runs"] if r["settings"]["lambda1"] != 3]
    assert len(runs) == 4 and {r["seed"] for r in runs} == {0, 1}
    # lambda1=1 is wfnet.py's setting: the same untraining as the seed's wfnet.pt
    res = json.loads((tmp_path / "o" / "seed1" / "results.json").read_text())["mean"]
    assert table[0][1][1]["acc_r_drop_test"] == pytest.approx(res["acc_r_drop_test"])
    assert table[0][1][1]["acc_f_train"] == pytest.approx(res["acc_f_train"])
    monkeypatch.setattr(tune, "untrain_and_evaluate", lambda *a: pytest.fail("ran again"))
    again = tune.main(flags + ["--seeds", "0", "1", "--try", "lambda1=2.0"])
    assert again[0][1] == table[1][1]
    (tmp_path / "o" / "tune.json").write_text("[1, 2]")   # not tune.py's: refused, kept
    with pytest.raises(SystemExit):
        tune.main(flags + ["--seeds", "0"])
    err = capsys.readouterr().err.strip()
    assert "not a tune.py result file" in err and len(err.splitlines()) == 1
    assert (tmp_path / "o" / "tune.json").read_text() == "[1, 2]"


def test_an_original_made_with_other_flags_is_refused(tmp_path, capsys):
    write_mnist_like(tmp_path / "data", "MNIST", 200, 100)
    flags = FAST + ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o")]
    wfnet.main(flags + ["--explain-samples", "2", "--seeds", "0"])
    with pytest.raises(SystemExit) as e:
        tune.main(flags + ["--seeds", "0", "--lr", "0.05"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "no original model made with these flags" in err and len(err.splitlines()) == 1
    seed1 = tmp_path / "o" / "seed1"                      # seed 0's model copied as seed 1
    seed1.mkdir()
    (seed1 / "original.pt").write_bytes((tmp_path / "o" / "seed0" / "original.pt").read_bytes())
    with pytest.raises(SystemExit):
        tune.main(flags + ["--seeds", "1"])
    assert "no original model made with these flags" in capsys.readouterr().err


def test_snap_evaluates_one_untraining_at_each_threshold(tmp_path, capsys):
    write_mnist_like(tmp_path / "data", "MNIST", 200, 100)
    flags = FAST + ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--seeds", "0"]
    wfnet.main(flags + ["--explain-samples", "2"])
    plain = tune.main(flags)[0][1][0]
    table = tune.main(flags + ["--snap", "1,0.5"])
    assert [combo for combo, _ in table] == [dict(snap=1.0), dict(snap=0.5)]
    no_snap, snapped = table[0][1][0], table[1][1][0]
    assert no_snap["acc_f_test"] == pytest.approx(plain["acc_f_test"])   # the same untraining, unsnapped
    assert no_snap["acc_r_drop_test"] == pytest.approx(plain["acc_r_drop_test"])
    assert snapped["backbone_off"] < no_snap["backbone_off"]   # entries at 0.5 or above went back to 1
    capsys.readouterr()
    tune.main(flags + ["--snap", "0.7"])                  # a new threshold: the kept alpha is read back
    assert "read back from" in capsys.readouterr().out
