"""Tests for baselines.py, on tiny synthetic data."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
import wfnet
from conftest import FAST, write_mnist_like


def test_logit_mask_removes_exactly_one_logit():
    model = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    out = baselines.LogitMask(model, 1)(x)
    assert torch.isinf(out[:, 1]).all() and (out[:, 1] < 0).all()
    assert torch.equal(out[:, [0, 2]], model(x)[:, [0, 2]])


def test_features_are_the_last_linear_input():
    model = wfnet.ResNet18(10, 1, width=4).eval()
    x = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    spec = wfnet.DATASETS["mnist"]
    feats = baselines.features(model, x, spec)
    xb = wfnet.transform(x, spec)
    assert torch.allclose(model.fc(feats), model(xb), atol=1e-5)  # fc(features) = logits


def test_probe_recovers_separable_classes_and_not_noise():
    """Features that name the class: the probe is right on every class. Features that are
    noise: the probe is near chance."""
    y = torch.arange(300) % 3
    x = torch.zeros(300, 1, 1, 3, dtype=torch.uint8)
    data = dict(spec=dict(classes=3, mean=(0.0,), std=(1 / 255,), pad=0, flip=False),
                train=(x, y), test=(x, y))
    ident = nn.Sequential(nn.Flatten(), nn.Linear(3, 3))
    data["train"] = data["test"] = ((10 * F.one_hot(y, 3)).to(torch.uint8).view(-1, 1, 1, 3), y)
    # features(model) are the inputs of the last Linear: the one-hot images themselves
    assert baselines.probe_accuracy(ident, data, epochs=200) == [100.0, 100.0, 100.0]
    noise = torch.randint(0, 256, (300, 1, 1, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    data["train"], data["test"] = (noise, y), (noise.flip(0), y)
    assert sum(baselines.probe_accuracy(ident, data, epochs=200)) / 3 < 60


def test_neggrad_and_random_label_forget_finetune_keeps(tmp_path):
    write_mnist_like(tmp_path / "data", "MNIST", 400, 200)
    data = wfnet.load_dataset("mnist", tmp_path / "data")
    spec, (x, y) = data["spec"], data["train"]
    torch.manual_seed(0)
    model = wfnet.train_original(wfnet.ResNet18(10, 1, 4), x, y, spec, 3, 32, 0.05,
                                 progress=False, augment=False)
    acc_c = lambda m: (wfnet.predict(m, x[y == 2], spec).argmax(-1) == 2).float().mean().item()
    before = acc_c(model)
    assert before > 0.9
    for mode in ("neggrad", "random_label"):
        m = baselines._sgd_steps(wfnet.copy.deepcopy(model), x, y, spec, 2, 30, mode, 32)
        assert acc_c(m) < before / 2, mode
    acc_r = lambda m: (wfnet.predict(m, x[y != 2], spec).argmax(-1) == y[y != 2]).float().mean()
    m = baselines._sgd_steps(wfnet.copy.deepcopy(model), x, y, spec, 2, 30, "finetune", 32)
    assert acc_r(m) > 0.9                                 # trained on the retain set only


def test_command_line(tmp_path, capsys, monkeypatch):
    write_mnist_like(tmp_path / "data", "MNIST", 300, 100)
    flags = FAST + ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        baselines.main(["--method", "finetune"] + flags)
    assert e.value.code == 2 and "run `python wfnet.py`" in capsys.readouterr().err
    wfnet.run(wfnet.parse_args(flags + ["--explain-samples", "2"]))
    for method in ("finetune", "wfnet", "logit_mask"):
        res = baselines.main(["--method", method, "--classes", "0", "3", "--probe-train", "200"]
                             + flags)
        saved = json.loads((tmp_path / "o" / f"baseline_{method}.json").read_text())
        assert saved["classes"] == [0, 3] and [r["cls"] for r in saved["per_class"]] == [0, 3]
        assert {"acc_f_test", "acc_r_test", "zrf", "mia_efficacy", "probe_c"} <= saved["mean"].keys()
        assert res["budget"] == saved["budget"]
    assert saved["mean"]["acc_f_test"] == 0               # logit masking, by construction
    seen, sgd_steps = [], baselines._sgd_steps            # fine-tune augments as the original was trained
    monkeypatch.setattr(baselines, "_sgd_steps", lambda *a, **kw: (seen.append(a[-1]), sgd_steps(*a, **kw))[1])
    ckpt = wfnet.load_checkpoint(tmp_path / "o" / "original.pt")
    for augmented in (False, True):                       # whatever this run's flags say
        checkpoint = tmp_path / f"original_{augmented}.pt"
        wfnet.save_checkpoint(checkpoint, {**ckpt["meta"], "augment": augmented}, ckpt["state_dict"])
        res = baselines.main(["--method", "finetune", "--classes", "0", "--probe-train", "100",
                              "--checkpoint", str(checkpoint)] + flags)
        assert seen.pop() is augmented and ("crop and flip" in res["budget"]) == augmented
    with pytest.raises(SystemExit) as e:
        baselines.main(["--method", "finetune", "--classes", "12"] + flags)
    assert e.value.code == 2


def test_seeds_summarize_a_baseline(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "data", "MNIST", 200, 100)
    flags = FAST + ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o")]
    wfnet.main(flags + ["--explain-samples", "2", "--seeds", "0", "1"])
    method = ["--method", "logit_mask", "--classes", "1", "--probe-train", "100"]
    summary = baselines.main(method + flags + ["--seeds", "0", "1"])
    runs = [json.loads((tmp_path / "o" / f"seed{k}" / "baseline_logit_mask.json").read_text())
            for k in (0, 1)]
    assert summary["figures"]["probe_c"]["values"] == [r["mean"]["probe_c"] for r in runs]
    assert summary["figures"]["acc_f_test"]["mean"] == 0  # logit masking, every seed
    assert summary["figures"]["original_probe_c"]["values"] == [
        r["mean"]["original_probe_c"] for r in runs]
    def must_not_run(cfg):
        raise AssertionError(f"seed {cfg['seed']} ran again")
    monkeypatch.setattr(baselines, "run", must_not_run)
    baselines.main(method + flags + ["--seeds", "0", "1"])   # both seeds read back
    with pytest.raises(AssertionError, match="seed 0 ran again"):   # other classes: run again
        baselines.main(["--method", "logit_mask", "--classes", "2", "--probe-train", "100"]
                       + flags + ["--seeds", "0"])
