"""Tests for baselines.py, on tiny synthetic data."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
import wfnet
from conftest import FAST, one_hot_net, synthetic_images, write_mnist_like


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

# -----------------------------------------------------------------------------
# SSD, SalUn and relearning, against hand computations on a linear model: for logits W x + b,
# the gradient of the mean CE is (softmax - onehot)^T x / B for W and its column mean for b.

def linear_data(n=12, seed=0):
    """Flatten -> Linear(4, 3), and uint8 inputs (n,1,1,4) that transform() leaves as they are."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.randint(0, 4, (n, 1, 1, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    spec = dict(mean=(0.0,), std=(1 / 255,), pad=0, flip=False)
    return net, x, torch.arange(n) % 3, spec


def ce_grads(net, x, y):
    """{name: gradient of the mean CE} of Flatten -> Linear, by the formula."""
    w, b = net[1].weight.detach(), net[1].bias.detach()
    xf = x.flatten(1).float()
    err = (xf @ w.T + b).softmax(-1) - F.one_hot(y, 3)    # (B, 3)
    return {"1.weight": err.T @ xf / len(y), "1.bias": err.mean(0)}


def test_fisher_is_the_mean_of_squared_batch_gradients():
    net, x, y, spec = linear_data(10)
    imp = baselines.fisher(net, x, y, spec, batch_size=4)  # batches of 4, 4, 2
    parts = [ce_grads(net, x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)]
    for name in ("1.weight", "1.bias"):
        assert torch.allclose(imp[name], sum(g[name] ** 2 for g in parts) / 3, atol=1e-7)


def test_ssd_dampens_exactly_the_selected_weights():
    """alpha 2: a weight is selected when I_Df > 2 I_D (strictly); it is multiplied by
    min(lambda I_D / I_Df, 1); every other weight keeps its bits."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    imp_all = {"1.weight": torch.tensor([[1.0, 1.0, 0.0], [2.0, 4.0, 1.0]]),
               "1.bias": torch.tensor([1.0, 0.0])}
    imp_forget = {"1.weight": torch.tensor([[16.0, 8.0, 0.0], [32.0, 8.0, 4.0]]),
                  "1.bias": torch.tensor([0.5, 3.0])}
    # by hand: I_Df / I_D = 16, 8, 0/0 | 16, 2 (not > 2), 4; bias 0.5, 3/0 -> dampened to 0
    factors = {1.0: ([[1 / 16, 1 / 8, 1], [1 / 16, 1, 1 / 4]], [1, 0]),
               4.0: ([[1 / 4, 1 / 2, 1], [1 / 4, 1, 1]], [1, 0])}   # lambda 4: 4 * 4 / 4 = 1, kept
    for lam, (fw, fb) in factors.items():
        model = baselines.ssd_dampen(wfnet.copy.deepcopy(net), imp_all, imp_forget, alpha=2.0, lam=lam)
        assert torch.equal(model[1].weight, before["1.weight"] * torch.tensor(fw))
        assert torch.equal(model[1].bias, before["1.bias"] * torch.tensor(fb, dtype=torch.float))
    model = baselines.ssd_dampen(wfnet.copy.deepcopy(net), imp_all, imp_forget, alpha=100.0, lam=1.0)
    assert torch.equal(model[1].weight, before["1.weight"])   # alpha 100: only I_D = 0 < I_Df is selected
    assert torch.equal(model[1].bias, before["1.bias"] * torch.tensor([1.0, 0.0]))


def test_salun_mask_is_the_top_half_of_the_forget_gradient():
    net, x, y, spec = linear_data(12)
    mask = baselines.salun_mask(net, x, y, spec, c=1, batch_size=3)
    g = ce_grads(net, x[y == 1], y[y == 1])               # the forget class only
    size = torch.cat([g["1.weight"].flatten(), g["1.bias"]]).abs()
    assert len(size.unique()) == 15                       # no ties: the top int(15 / 2) = 7 are one set
    top = set(sorted(range(15), key=lambda i: -size[i])[:7])
    expect = torch.tensor([float(i in top) for i in range(15)])
    assert torch.equal(torch.cat([mask["1.weight"].flatten(), mask["1.bias"]]), expect)


def test_salun_moves_only_the_masked_weights():
    """Random label under the mask, momentum 0.9: the unmasked half keeps its bits, BatchNorm's
    weights and the head included; the masked half moves."""
    x, y = synthetic_images(40)
    spec = dict(wfnet.DATASETS["mnist"], classes=10)
    torch.manual_seed(0)
    model = wfnet.ResNet18(10, 1, width=4, stem_stride=2).eval()
    mask = baselines.salun_mask(model, x, y, spec, 2)
    total = sum(p.numel() for p in model.parameters())
    assert sum(m.sum().item() for m in mask.values()) == total // 2
    after = baselines._sgd_steps(wfnet.copy.deepcopy(model), x, y, spec, 2, 4, "random_label", 16, mask=mask)
    moved = 0
    for (n, p), q in zip(model.named_parameters(), after.parameters()):
        assert torch.equal(q[mask[n] == 0], p[mask[n] == 0]), n
        moved += (q != p)[mask[n] == 1].sum().item()
    assert moved > 0.95 * (total // 2)


def test_relearn_steps_counts_until_class_c_is_back(monkeypatch):
    """one_hot_net gets every class right: 0 steps. With its output unit c switched off it
    relearns c after some steps (and not within fewer); behind a logit mask, never."""
    net, x, y, spec = one_hot_net()
    data = dict(spec=spec, train=(x, y), test=(x, y))
    assert baselines.relearn_steps(net, data, 1, 50.0) == 0
    hidden = wfnet.copy.deepcopy(net)
    with torch.no_grad():
        hidden[3].weight[1] = 0
        hidden[3].bias[1] = -5.0
    before = [p.clone() for p in hidden.parameters()]
    steps = baselines.relearn_steps(hidden, data, 1, 50.0)
    assert steps and steps % baselines.RELEARN["every"] == 0
    assert all(torch.equal(p, q) for p, q in zip(hidden.parameters(), before))   # a copy was tuned
    monkeypatch.setitem(baselines.RELEARN, "max_steps", steps - 1)
    assert baselines.relearn_steps(hidden, data, 1, 50.0) is None
    monkeypatch.setitem(baselines.RELEARN, "max_steps", 100)
    assert baselines.relearn_steps(baselines.LogitMask(net, 1), data, 1, 50.0) is None


def test_ssd_and_salun_with_relearning_from_the_command_line(mnist, tmp_path, monkeypatch):
    flags = mnist(300, 100)
    cfg = wfnet.parse_args(flags)
    data = wfnet.load_dataset("mnist", cfg["data_dir"])
    (tmp_path / "o").mkdir()
    original = wfnet.original_model(cfg, data, tmp_path / "o")[0]   # <out>/original.pt, all these need
    x_te, y_te = data["test"]
    c = int(torch.bincount(y_te[wfnet.predict(original, x_te, data["spec"]).argmax(-1) == y_te]).argmax())
    monkeypatch.setitem(baselines.RELEARN, "max_steps", 20)
    one = ["--classes", str(c), "--probe-train", "100"]
    for method in ("ssd", "salun", "logit_mask"):
        res = baselines.main(["--method", method, "--relearn"] + one + flags)
        saved = json.loads((tmp_path / "o" / f"baseline_{method}.json").read_text())
        assert {"acc_f_test", "acc_r_test", "zrf", "mia_efficacy", "probe_c", "relearn_steps",
                "relearn_reached"} <= saved["mean"].keys()
        assert "relearn_steps" in saved["per_class"][0] and saved["relearn"]["forget"] == 50
        assert res["budget"] == saved["budget"] and ("ssd_alpha" in saved["config"]) == (method == "ssd")
    assert saved["original"]["per_class_test_acc"][c] > 50   # logit masking: never back
    assert saved["per_class"][0]["relearn_steps"] is None and saved["mean"]["relearn_reached"] == 0
    seen, fisher = [], baselines.fisher                   # the labels of I_D's images, then I_Df's
    def labels_seen(model, x, y, *args, **kw):
        seen.append(y)
        return fisher(model, x, y, *args, **kw)
    monkeypatch.setattr(baselines, "fisher", labels_seen)
    ssd = ["--method", "ssd", "--ssd-alpha", "1e30", "--ssd-samples", "50", "--ssd-order", "by-class"]
    res = baselines.main(ssd + one + flags)
    assert "on 50 training images (by-class" in res["budget"] and "relearn" not in res["config"]
    assert len(seen[0]) == 50 and torch.equal(seen[0], seen[0].sort().values) and (seen[1] == c).all()
    assert res["per_class"][0]["acc_f_test"] == res["original"]["per_class_test_acc"][c]   # nothing dampened
