"""Tests for the experiments' shared helpers (notebooks/experiments/common.py) and explain.py."""
import json

import numpy as np
import pytest
import torch

import common
import explain
import wfnet
from conftest import one_hot_net, own_class_rows
from wfnet import WFNet


def test_pairs_table_counts_both_forgotten_classes():
    net, x, y, spec = one_hot_net()
    wf = own_class_rows(net)                              # each row forgets its own class exactly
    r = common.evaluate_sets(wf, x, y, spec, [(0, 1), (1, 3)])
    assert [s["classes"] for s in r["per_set"]] == [[0, 1], [1, 3]]
    # forget {0, 1}: classes 0 and 1 are lost; 2 and 3 are untouched
    assert r["per_set"][0]["acc_f"] == 0 and r["per_set"][0]["acc_r"] == 100
    assert r["mean"]["acc_r_drop"] == 0 and r["rule"] == "min"
    data = dict(test=(x, y), spec=dict(spec, classes=4))
    every = common.pairs(wf, data, per_class=0)
    assert [r["classes"] for r in every["per_set"]] == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    # forget {0, 3}: a class-3 input (10 e_3 + e_0) is left with no unit; the bias picks class 3
    assert [r["acc_f"] for r in every["per_set"]] == [0, 0, 50, 0, 0, 0] and every["samples"] == len(y)
    assert len(common.pairs(wf, data, per_class=2, max_pairs=2)["per_set"]) == 2


def test_alpha_off_splits_backbone_and_head():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    wf = wfnet.WFNet(model, 3)
    with torch.no_grad():
        wf.alpha[1][2] = 0                                # the head: row 2 off, 3 of 9 entries
        wf.alpha[0][0, :3] = 0.5                          # the backbone: 3 of 18 entries half off
    backbone, head = common.alpha_off(wf)
    assert backbone == pytest.approx(100 * 1.5 / 18) and head == pytest.approx(100 * 3 / 9)


def test_over_seeds_reports_mean_and_std_and_reads_finished_seeds_back(mnist, tmp_path, capsys):
    args = mnist(200, 100) + ["--explain-samples", "2"]
    summary = common.over_seeds(wfnet.parse_args(args + ["--seeds", "0", "1"]), wfnet.run)
    runs = [json.loads((tmp_path / "o" / f"seed{k}" / "results.json").read_text()) for k in (0, 1)]
    values = [r["mean"]["acc_r_drop_test"] for r in runs]
    fig = summary["figures"]["acc_r_drop_test"]
    assert fig["values"] == pytest.approx(values) and fig["mean"] == pytest.approx(np.mean(values))
    assert fig["std"] == pytest.approx(np.std(values, ddof=1))
    assert summary["figures"]["pearson"]["values"] == [r["explain"]["pearson"] for r in runs]

    def must_not_run(cfg):
        raise AssertionError(f"seed {cfg['seed']} ran again")
    again = common.over_seeds(wfnet.parse_args(args + ["--seeds", "1", "0"]), must_not_run)
    assert again["figures"]["acc_r_drop_test"]["values"] == fig["values"][::-1]
    with pytest.raises(AssertionError, match="seed 1 ran again"):   # other settings: run again
        common.over_seeds(wfnet.parse_args(args + ["--seeds", "1", "--lambda1", "2"]), must_not_run)
    one = common.over_seeds(wfnet.parse_args(args + ["--seeds", "0"]), must_not_run)
    assert one["figures"]["acc_f_test"]["std"] is None    # one seed: no deviation to report


def test_explain_writes_pairs_and_pictures_of_a_run(mnist, tmp_path, capsys):
    args = mnist(200, 100) + ["--explain-samples", "3"]
    res = wfnet.main(args)
    out = tmp_path / "o"
    cfg, data, model, wf = common.load_run(out)
    assert torch.equal(torch.cat([a.flatten() for a in wf.alpha]),
                       torch.cat([a.flatten() for a in wfnet.load_checkpoint(out / "wfnet.pt")["state_dict"].values()]))
    found = explain.main([str(out), "--combine", "product"])
    saved = json.loads((out / "pairs_product.json").read_text())
    assert len(saved["per_set"]) == 45 and saved["samples"] == 30 and saved["rule"] == "product"
    assert found[0] == saved["mean"]
    for png in ("frac_off", "similarity", "curves"):
        assert (out / f"{png}.png").stat().st_size > 0
    assert res["explain"]["samples"] == 30                # the pairs use the explanation's samples
    with pytest.raises(SystemExit) as e:
        explain.main([str(tmp_path / "none")])
    assert e.value.code == 2 and "run `python wfnet.py" in capsys.readouterr().err


def test_backbone_view_holds_the_head_at_one():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    wf = wfnet.WFNet(model, 3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in wf.alpha:
            a.copy_(torch.rand(a.shape, generator=g))
    view, x = common.Backbone(wf), torch.randn(5, 4)
    assert len(view.alpha) == 1 and view.alpha[0] is wf.alpha[0]
    gate = [wf.alpha[0][1]]
    assert torch.equal(view.gated(x, gate), wf.gated(x, [wf.alpha[0][1], torch.ones(3)]))
