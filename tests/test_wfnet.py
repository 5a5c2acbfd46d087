"""Tests for wfnet.py: numbers against independent references, on tiny synthetic data."""
import copy, gzip, json, math, pickle, struct, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wfnet  # noqa: E402
from wfnet import WFNet  # noqa: E402

torch.set_num_threads(2)


def tiny_models():
    torch.manual_seed(0)
    return {"resnet18": wfnet.ResNet18(5, 1, width=4).eval(),
            "vit": wfnet.ViT(5, 1, 28, width=32, depth=1).eval(),
            "small": nn.Sequential(nn.Conv2d(1, 3, 3, bias=True), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(3 * 26 * 26, 5)).eval()}


def randomize(wf, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in wf.alpha:
            a.copy_(torch.rand(a.shape, generator=g))
    return wf


def randomize_bn(model):
    """Non-trivial BatchNorm statistics, so that eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


X = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(2))


# ---------------------------------------------------------------- weight filtering

@pytest.mark.parametrize("arch", ["resnet18", "vit", "small"])
@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_forget_none_is_the_wrapped_model(arch, granularity):
    model = randomize_bn(tiny_models()[arch])
    ref = model(X)
    wf = randomize(WFNet(model, 5, granularity))
    assert torch.equal(wf(X), ref)
    assert torch.equal(wf(X, forget=None), ref)
    wf0 = WFNet(tiny_models()[arch], 5, granularity)     # alpha = 1: the original exactly
    assert torch.allclose(wf0(X, forget=3), wf0(X), atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet18", "vit", "small"])
def test_channel_gate_equals_hand_scaled_weights(arch):
    model = randomize_bn(tiny_models()[arch])
    wf = randomize(WFNet(model, 5, "channel"))
    for c in range(5):
        ref = copy.deepcopy(model)
        convs = [m for m in ref.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            for m, a in zip(convs, wf.alpha):
                for k in range(m.weight.shape[0]):       # row k of W times a_k, one by one
                    m.weight[k] *= a[c, k]
        assert torch.allclose(wf(X, forget=c), ref(X), atol=1e-5)


def test_weight_granularity_equals_functional_layers():
    model = tiny_models()["small"]
    wf = randomize(WFNet(model, 5, "weight"))
    conv, lin = model[0], model[3]
    for c in range(5):
        a0 = wf.alpha[0][c].view_as(conv.weight)
        a1 = wf.alpha[1][c].view_as(lin.weight)
        h = F.relu(F.conv2d(X, conv.weight * a0, conv.bias))
        ref = F.linear(h.flatten(1), lin.weight * a1, lin.bias)
        assert torch.allclose(wf(X, forget=c), ref, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "vit"])
@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_export_equals_filtered_forward_and_loads_without_wfnet(arch, granularity):
    model = randomize_bn(tiny_models()[arch])
    wf = randomize(WFNet(model, 5, granularity))
    for c in (0, 4):
        exported = wf.export(forget=c)
        assert torch.allclose(exported(X), wf(X, forget=c), atol=1e-5)
        fresh = tiny_models()[arch]
        fresh.load_state_dict(exported.state_dict())   # plain state_dict, same keys
        assert torch.allclose(fresh(X), exported(X))
    assert torch.equal(wf(X), model(X))                 # export left the wrapped model alone


@pytest.mark.parametrize("arch", ["resnet18", "vit"])
@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_per_sample_batch_equals_one_pass_per_class(arch, granularity):
    wf = randomize(WFNet(randomize_bn(tiny_models()[arch]), 5, granularity))
    forget = torch.tensor([3, 0, 3, 4, 1, 0])
    batched = wf(X, forget=forget)
    for i, c in enumerate(forget.tolist()):
        assert torch.allclose(batched[i], wf(X[i:i + 1], forget=c)[0], atol=1e-5)


def test_gradients_reach_alpha_through_the_batched_gate():
    wf = WFNet(tiny_models()["resnet18"], 5, "channel")
    forget = torch.tensor([0, 1, 2, 0, 1, 2])
    wf(X, forget=forget).sum().backward()
    grads = wf.alpha[0].grad
    assert grads[:3].abs().sum() > 0 and grads[3:].abs().sum() == 0  # rows 3, 4 unused
    assert all(p.grad is None for p in wf.model.parameters())        # backbone frozen


def test_forget_out_of_range_raises():
    wf = WFNet(tiny_models()["small"], 5)
    for bad in (5, -1, torch.tensor([0, 1, 2, 3, 4, 7])):
        with pytest.raises(ValueError, match="out of range"):
            wf(X, forget=bad)
    with pytest.raises(ValueError, match="entries"):
        wf(X, forget=torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        WFNet(tiny_models()["small"], 5, granularity="row")


# ---------------------------------------------------------------- forgetting a set of classes

@pytest.mark.parametrize("combine", ["min", "product"])
@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_a_set_of_classes_combines_the_rows_by_the_rule(combine, granularity):
    model = randomize_bn(tiny_models()["resnet18"])
    wf = randomize(WFNet(model, 5, granularity, combine))
    rule = torch.minimum if combine == "min" else torch.mul
    ref = copy.deepcopy(model)                            # weights scaled by rule(alpha[1], alpha[3])
    layers = [m for m in ref.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for m, a in zip(layers, wf.alpha):
            g = rule(a[1], a[3])
            shape = (-1, *[1] * (m.weight.dim() - 1)) if granularity == "channel" else m.weight.shape
            m.weight *= g.view(shape)
    assert torch.allclose(wf(X, forget=[1, 3]), ref(X), atol=1e-5)
    assert torch.allclose(wf(X, forget=(3, 1, 3)), ref(X), atol=1e-5)   # a set: order, repeats
    assert torch.allclose(wf.export(forget=[1, 3])(X), ref(X), atol=1e-5)
    assert torch.allclose(wf(X, forget=[2]), wf(X, forget=2))
    per_sample = torch.tensor([[1, 3], [0, 1], [2, 4], [1, 3], [4, 0], [0, 2]])
    batched = wf(X, forget=per_sample)                    # (B, S): one set per sample
    for i, s in enumerate(per_sample.tolist()):
        assert torch.allclose(batched[i], wf(X[i:i + 1], forget=s)[0], atol=1e-5)
    twice = wf(X, forget=torch.tensor([[2, 2]] * 6))      # a (B, S) row is taken as given:
    once = wf(X, forget=2)                                # min is idempotent, product squares
    assert torch.allclose(twice, once, atol=1e-6) == (combine == "min")
    with pytest.raises(ValueError, match="empty"):
        wf(X, forget=[])
    with pytest.raises(ValueError, match="out of range"):
        wf(X, forget=[1, 5])


# ---------------------------------------------------------------- explanations

def one_hot_net(nc=4):
    """Flatten -> Linear(nc, nc) -> ReLU -> Linear(nc, nc), both identity (plus a tiny output
    bias that breaks ties): hidden unit k and output unit k carry class k. A class-k input is 10 e_k + e_(k+1): switching hidden unit k
    (or output unit k) off makes it class k+1; nothing else changes any prediction."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(nc, nc), nn.ReLU(), nn.Linear(nc, nc))
    with torch.no_grad():
        for m in (net[1], net[3]):
            m.weight.copy_(torch.eye(nc))
            m.bias.zero_()
        net[3].bias.copy_(0.001 * torch.arange(nc))      # all hidden units off: the last class wins
    y = torch.arange(nc).repeat(5)
    x = (10 * F.one_hot(y, nc) + F.one_hot((y + 1) % nc, nc)).to(torch.uint8).view(-1, 1, 1, nc)
    spec = dict(mean=(0.0,), std=(1 / 255,), pad=0, flip=False)   # transform(x) = x as floats
    return net.eval(), x, y, spec


def test_deletion_and_insertion_curves_on_a_known_network():
    net, x, y, spec = one_hot_net()
    wf = WFNet(net, 4)
    c = 2
    with torch.no_grad():
        wf.alpha[0][c, c] = 0.0                           # class 2 switches hidden unit 2 off
        wf.alpha[1][c, c] = 0.5                           # and halves output unit 2
    # 8 components; k = 0, 1, 2: the alpha order deletes hidden 2, then output 2
    r = wfnet.deletion_insertion(wf, x, y, spec, c, max_fraction=0.25, points=3)
    assert r["fraction"] == [0, 0.125, 0.25]
    assert r["deletion_alpha"]["acc_c"] == [100, 0, 0]
    assert r["deletion_alpha"]["acc_other"] == [100, 100, 100]
    assert r["deletion_alpha"]["auc_c"] == pytest.approx(25)      # trapezoid: (50 + 0) / 2
    assert r["deletion_alpha"]["auc_other"] == pytest.approx(100)
    # insertion starts from the filtered model (class 2 forgotten), restores hidden 2 first
    assert r["insertion_alpha"]["acc_c"] == [0, 100, 100]
    assert r["insertion_alpha"]["auc_c"] == pytest.approx(75)
    # a random order ends where the alpha order does only if it happened to pick those units
    for curve in ("deletion_random", "insertion_random"):
        assert r[curve]["acc_c"][0] == r[curve.split("_")[0] + "_alpha"]["acc_c"][0]


def test_class_similarity_and_its_correlation_with_confusion():
    wf = WFNet(tiny_models()["small"], 3)
    with torch.no_grad():
        for a in wf.alpha:
            a.fill_(1)
        wf.alpha[0][0, :2] = 0                            # classes 0 and 1 switch off unit 0..1,
        wf.alpha[0][1, :2] = 0                            # class 2 switches off unit 2 only
        wf.alpha[0][2, 2] = 0
    confusion = [[90, 8, 2], [8, 90, 2], [2, 2, 96]]
    r = wfnet.class_similarity(wf, confusion)
    sim = torch.tensor(r["similarity"])
    assert torch.allclose(sim, torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]]), atol=1e-6)
    assert r["pearson"] == pytest.approx(1.0) and r["spearman"] == pytest.approx(1.0)
    assert wfnet._pearson(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1)
    conf = wfnet._confusion(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0]), 3)
    assert conf.tolist() == [[50, 50, 0], [0, 100, 0], [100, 0, 0]]


def test_pairs_table_counts_both_forgotten_classes():
    net, x, y, spec = one_hot_net()
    wf = WFNet(net, 4)
    with torch.no_grad():
        for c in range(4):
            wf.alpha[0][c, c] = 0                         # each row forgets its own class exactly
    data = dict(test=(x, y), spec=spec)                    # explain() from Python, no confusion given
    ex = wfnet.explain(wf, data, per_class=0, max_fraction=0.25, max_pairs=2)
    assert len(ex["pairs"]["per_set"]) == 2 and ex["samples"] == len(y) and len(ex["curves"]) == 4
    r = wfnet.evaluate_sets(wf, x, y, spec, [(0, 1), (1, 3)])
    assert [s["classes"] for s in r["per_set"]] == [[0, 1], [1, 3]]
    # forget {0, 1}: classes 0 and 1 are lost; 2 and 3 are untouched
    assert r["per_set"][0]["acc_f"] == 0 and r["per_set"][0]["acc_r"] == 100
    assert r["mean"]["acc_r_drop"] == 0 and r["rule"] == "min"


# ---------------------------------------------------------------- loss and untraining

def test_loss_terms_on_a_hand_made_case():
    nc = 4
    logits_f = torch.zeros(2, nc)                       # uniform: CE = ln 4 for any label
    logits_r = torch.tensor([[2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 1.0, 0, 0]])
    y_r = torch.tensor([0, 2, 3])
    alpha = [torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0, 1.0, 1.0, 0.5]])]
    loss, L_r, L_f, R = wfnet.wfnet_loss(logits_f, torch.tensor([1, 2]), logits_r, y_r, alpha,
                                         lambda0=2.0, lambda1=3.0, lambda2=5.0)
    ce = [-math.log(math.exp(2) / (math.exp(2) + 3)), -math.log(math.exp(3) / (math.exp(3) + 3)),
          -math.log(1 / (math.e + 3))]
    assert L_r.item() == pytest.approx(sum(ce) / 3, rel=1e-5)
    assert L_f.item() == pytest.approx(1 / (math.log(4) + wfnet.EPS), rel=1e-5)
    assert R.item() == pytest.approx((0 + 0.5 + 1 + 0 + 0 + 0.5) / 6, rel=1e-6)
    assert loss.item() == pytest.approx(2 * L_r.item() + 3 * L_f.item() + 5 * R.item(), rel=1e-6)
    # guard: a perfectly classified forget sample (CE = 0) gives a finite loss and gradient
    logits = torch.tensor([[100.0, 0, 0, 0]], requires_grad=True)
    loss, *_ = wfnet.wfnet_loss(logits, torch.tensor([0]), logits_r, y_r, alpha)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def synthetic_images(n, nc=10, seed=0, size=28):
    """Class k: a bright 6x6 square at a class-specific place, plus noise. uint8 (n,1,28,28)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % nc
    x = torch.rand(n, 1, size, size, generator=g) * 60
    for i in range(n):
        r, c = divmod(int(y[i]), 4)
        x[i, 0, 2 + 8 * r:8 + 8 * r, 2 + 6 * c:8 + 6 * c] += 150
    return x.clamp(0, 255).to(torch.uint8), y


def test_alpha_moves_under_untraining():
    x, y = synthetic_images(64)
    spec = wfnet.DATASETS["mnist"]
    wf = WFNet(tiny_models()["resnet18"].__class__(10, 1, 4), 10)
    info = wfnet.untrain(wf, x, y, spec, epochs=2, batch_size=32, progress=False)
    moved = max((1 - a).abs().max().item() for a in wf.alpha)
    assert info["steps"] == 4 and len(info["history"]) == 4
    assert moved > 1e-3, "alpha did not move: the gradient is dead at initialization"
    assert all(a.min() >= 0 and a.max() <= 1 for a in wf.alpha)


def test_weight_granularity_untrains_a_channels_last_model():
    """The command line's models are channels_last; weight-granularity untraining once
    corrupted the heap there after two or three steps (the test process crashed)."""
    model = wfnet.ResNet18(10, 1, width=4, stem_stride=2).to(memory_format=torch.channels_last)
    wf = WFNet(model, 10, "weight")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.arange(256) % 10
    info = wfnet.untrain(wf, x, y, wfnet.DATASETS["mnist"], epochs=1, batch_size=32,
                         progress=False)
    assert info["steps"] == 8 and info["skipped_steps"] == 0
    assert all(torch.isfinite(a).all() for a in wf.alpha)
    assert min(a.min().item() for a in wf.alpha) < 1     # alpha moved


def test_untraining_is_deterministic():
    x, y = synthetic_images(64)
    spec = wfnet.DATASETS["mnist"]
    alphas = []
    for _ in range(2):
        torch.manual_seed(0)
        wf = WFNet(wfnet.ResNet18(10, 1, 4), 10)
        wfnet.untrain(wf, x, y, spec, epochs=1, batch_size=32, seed=3, progress=False)
        alphas.append(torch.cat([a.flatten() for a in wf.alpha]))
    assert torch.equal(alphas[0], alphas[1])


# ---------------------------------------------------------------- metrics

def test_js_and_zrf_against_scipy_and_by_hand():
    p = torch.tensor([[0.5, 0.5], [0.2, 0.8], [1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0], [0.6, 0.4], [0.0, 1.0]])
    js = wfnet.js_divergence(p, q)
    ref = [jensenshannon(a, b) ** 2 for a, b in zip(p.numpy(), q.numpy())]  # natural log
    assert js.numpy() == pytest.approx(ref, rel=1e-5)
    # by hand: m = (.75, .25); 0.5 * (0.5 ln(2/3) + 0.5 ln 2) + 0.5 * ln(4/3)
    assert js[0].item() == pytest.approx(0.25 * math.log(2 / 3) + 0.25 * math.log(2)
                                         + 0.5 * math.log(4 / 3), rel=1e-6)
    assert js[2].item() == pytest.approx(math.log(2), rel=1e-6)   # disjoint: ln 2
    assert wfnet.zrf_score(p, p) == pytest.approx(1.0)
    assert wfnet.zrf_score(p[2:], q[2:]) == pytest.approx(1 - math.log(2), rel=1e-6)


def test_mia_efficacy_on_separable_confidences():
    g = torch.Generator().manual_seed(0)
    members = 0.9 + 0.1 * torch.rand(500, generator=g)       # confident: members
    nonmembers = 0.4 * torch.rand(500, generator=g)          # unconfident: non-members
    low = 0.3 * torch.rand(200, generator=g)
    high = 0.92 + 0.08 * torch.rand(200, generator=g)
    assert wfnet.mia_efficacy(members, nonmembers, low) == pytest.approx(1.0)
    assert wfnet.mia_efficacy(members, nonmembers, high) == pytest.approx(0.0)
    mixed = torch.cat([low[:100], high[:100]])
    assert wfnet.mia_efficacy(members, nonmembers, mixed) == pytest.approx(0.5, abs=0.02)


# ---------------------------------------------------------------- data loaders

def write_idx(path, array, gz):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(header + array.tobytes())


def write_mnist_like(root, folder, n_train, n_test, gz=True, seed=0):
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x, y = synthetic_images(n, seed=seed + (split == "test"))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[:, 0].numpy(), gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y.numpy(), gz)
        data[split] = (x, y)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_loader_reads_torchvision_layout(tmp_path, gz):
    ref = write_mnist_like(tmp_path, "MNIST", 30, 20, gz)
    d = wfnet.load_dataset("mnist", tmp_path)
    for split in ("train", "test"):
        assert torch.equal(d[split][0], ref[split][0]) and torch.equal(d[split][1], ref[split][1])
    assert d["train"][0].shape == (30, 1, 28, 28) and d["train"][1].dtype == torch.long


def test_fashion_mnist_falls_back_to_debian_folder(tmp_path, monkeypatch):
    ref = write_mnist_like(tmp_path / "deb", "x", 12, 8)
    monkeypatch.setattr(wfnet, "DEBIAN_FASHION", str(tmp_path / "deb" / "x" / "raw"))
    d = wfnet.load_dataset("fashion-mnist", tmp_path / "empty")
    assert torch.equal(d["test"][0], ref["test"][0])


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader_reads_torchvision_pickles(tmp_path, name):
    g = np.random.default_rng(0)
    folder = tmp_path / wfnet.DATASETS[name]["folder"]
    folder.mkdir()
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    key = b"labels"
    if name == "cifar100":
        files, key = ["train", "test"], b"fine_labels"
    batches = {}
    for f in files:
        batches[f] = (g.integers(0, 256, (4, 3072), dtype=np.uint8), list(g.integers(0, 10, 4)))
        with open(folder / f, "wb") as fh:
            pickle.dump({b"data": batches[f][0], key: batches[f][1]}, fh)
    d = wfnet.load_dataset(name, tmp_path)
    test = batches[files[-1]]
    assert d["test"][0].shape == (4, 3, 32, 32)
    assert torch.equal(d["test"][0].reshape(4, -1), torch.from_numpy(test[0]))
    assert d["test"][1].tolist() == [int(v) for v in test[1]]
    assert len(d["train"][0]) == 4 * (len(files) - 1)


def test_augmentation_is_a_crop_of_the_padded_image():
    spec = dict(wfnet.DATASETS["mnist"], mean=(0.0,), std=(1.0,))
    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    out = wfnet.transform(x, spec, augment=True, gen=torch.Generator().manual_seed(0))
    padded = F.pad(x.float() / 255, (2, 2, 2, 2))
    for i in range(8):                                  # some 28x28 window of the padded image
        windows = padded[i, 0].unfold(0, 28, 1).unfold(1, 28, 1)      # (5, 5, 28, 28)
        assert (windows == out[i, 0]).all(-1).all(-1).any()


# ---------------------------------------------------------------- command line

def cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        wfnet.main(args)
    err = capsys.readouterr().err.strip()
    return e.value.code, err


FAST = ["--width", "4", "--epochs", "1", "--untrain-epochs", "1", "--batch-size", "32",
        "--untrain-batch-size", "32", "--no-progress", "--dataset", "mnist"]


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--arch", "vgg"], "unknown arch"),
    (["--granularity", "row"], "unknown granularity"),
    (["--forget", "10"], "out of range"),
    (["--forget", "2", "-1"], "out of range"),
    (["--combine", "max"], "unknown combine rule"),
    (["--explain-samples", "-1"], "--explain-samples must be >= 0"),
    (["--device", "tpu"], "unknown device"),
    (["--epochs", "0"], "must be >= 1"),
    (["--untrain-epochs", "0"], "untrain epochs > 0"),
    (["--stem-stride", "3"], "--stem-stride must be 1 or 2"),
    (["--seeds", "0", "1", "0"], "repeats a seed"),
    (["--seeds", "0", "1", "--seed", "2"], "drop --seed and --checkpoint"),
    (["--seeds", "0", "--checkpoint", "x.pt"], "drop --seed and --checkpoint"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, message, capsys, tmp_path):
    code, err = cli(args + ["--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cuda_where_there_is_none(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = cli(["--device", "cuda"], capsys)
    assert code == 2 and "no CUDA device" in err and len(err.splitlines()) == 1


def test_missing_data_offline(tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    code, err = cli(FAST + ["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
                    capsys)
    assert code == 2 and "not found" in err and "download failed" in err
    assert len(err.splitlines()) == 1


def test_bad_checkpoints(tmp_path, capsys):
    write_mnist_like(tmp_path / "data", "MNIST", 40, 20)
    out = tmp_path / "o"
    out.mkdir()
    base = FAST + ["--data-dir", str(tmp_path / "data"), "--out", str(out)]
    (out / "original.pt").write_bytes(b"PK\x03\x04 truncated")
    code, err = cli(base, capsys)
    assert code == 2 and "not a readable wfnet checkpoint" in err and len(err.splitlines()) == 1
    assert not (out / "results.json").exists() and not (out / "wfnet.pt").exists()
    wfnet.save_checkpoint(out / "original.pt", dict(dataset="cifar10", arch="resnet18",
                                                    num_classes=10), {})
    code, err = cli(base, capsys)
    assert code == 2 and "dataset='cifar10'" in err
    wfnet.save_checkpoint(out / "original.pt", dict(dataset="mnist", arch="vit",
                                                    num_classes=10), {})
    code, err = cli(base, capsys)
    assert code == 2 and "arch='vit'" in err
    other = tmp_path / "other.pt"
    wfnet.save_checkpoint(other, dict(dataset="mnist", arch="resnet18", num_classes=100), {})
    code, err = cli(base + ["--checkpoint", str(other)], capsys)
    assert code == 2 and "num_classes=100" in err
    wfnet.save_checkpoint(other, dict(dataset="mnist", arch="resnet18", num_classes=10),
                          wfnet.ResNet18(10, 1, 8).state_dict())
    code, err = cli(base + ["--checkpoint", str(other)], capsys)
    assert code == 2 and "does not fit" in err
    wfnet.save_checkpoint(other, dict(dataset="mnist", arch="resnet18", num_classes=10, width=4,
                                      stem_stride=1), wfnet.ResNet18(10, 1, 4).state_dict())
    code, err = cli(base + ["--checkpoint", str(other)], capsys)  # same shapes, other network
    assert code == 2 and "pass --stem-stride 1" in err
    assert not (out / "results.json").exists()
    torch.save({"meta": {}, "state_dict": {}, "x": nn.Linear(2, 2)}, other)  # not weights-only
    code, err = cli(base + ["--checkpoint", str(other)], capsys)
    assert code == 2 and "not a readable" in err


def test_end_to_end_untraining_forgets_and_retains(tmp_path, capsys):
    """A tiny real run: untraining lowers Acc_f far below the original and keeps Acc_r."""
    write_mnist_like(tmp_path / "data", "MNIST", 300, 200)
    out = tmp_path / "o"
    args = ["--dataset", "mnist", "--width", "4", "--epochs", "3", "--batch-size", "32",
            "--lr", "0.05", "--untrain-epochs", "12", "--untrain-batch-size", "32",
            "--untrain-lr", "0.08", "--data-dir", str(tmp_path / "data"), "--out", str(out),
            "--no-progress", "--forget", "2", "--explain-samples", "10"]
    res = wfnet.run(wfnet.parse_args(args))
    orig = res["original"]["test_acc"]
    assert orig > 95                                    # the synthetic task is easy
    assert res["mean"]["acc_f_test"] < orig / 2         # the original: Acc_f = Acc = ~99%
    assert res["mean"]["acc_r_drop_test"] < 5
    assert 1 - math.log(2) <= res["mean"]["zrf"] <= 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["mean"] == pytest.approx(res["mean"])
    assert len(saved["matrix_test"]) == 10 and len(saved["per_class"]) == 10
    for png in ("matrix", "alpha", "frac_off", "similarity", "curves"):
        assert (out / f"{png}.png").stat().st_size > 0
    ex = saved["explain"]
    assert ex["samples"] == 100 and len(ex["curves"]) == 10 and len(ex["pairs"]["per_set"]) == 45
    assert -1 <= ex["pearson"] <= 1 and 0 <= ex["deletion_alpha_beats_random"] <= 10
    assert len(ex["alpha"]) == len(saved["explain"]["alpha"]) == 21   # ResNet-18: 20 convs + fc
    exported = torch.load(out / "forget_2.pt", weights_only=True)
    model = wfnet.ResNet18(10, 1, 4)
    model.load_state_dict(exported["state_dict"])
    wfnet.run(wfnet.parse_args(args[:-4] + ["--forget", "3", "1", "--explain-samples", "10"]))
    exported = torch.load(out / "forget_1_3.pt", weights_only=True)
    assert exported["meta"]["forgotten_classes"] == [1, 3]
    capsys.readouterr()
    wfnet.run(wfnet.parse_args(args))                   # second run reuses both checkpoints
    printed = capsys.readouterr().out
    assert "reusing the original model" in printed and "reusing the memory matrices" in printed
    assert not list(out.glob("*.tmp"))


def test_seeds_report_mean_and_std_and_reuse_finished_seeds(tmp_path, capsys):
    write_mnist_like(tmp_path / "data", "MNIST", 200, 100)
    out = tmp_path / "s"
    args = FAST + ["--data-dir", str(tmp_path / "data"), "--out", str(out), "--explain-samples", "2"]
    summary = wfnet.run_seeds(wfnet.parse_args(args + ["--seeds", "0", "1"]))
    runs = [json.loads((out / f"seed{k}" / "results.json").read_text()) for k in (0, 1)]
    assert [r["config"]["seed"] for r in runs] == [0, 1]
    for key, run_value in (("acc_f_test", lambda r: r["mean"]["acc_f_test"]),
                           ("original_test_acc", lambda r: r["original"]["test_acc"]),
                           ("pairs_acc_f", lambda r: r["explain"]["pairs"]["mean"]["acc_f"])):
        values = [run_value(r) for r in runs]
        fig = summary["figures"][key]
        assert fig["values"] == pytest.approx(values)
        assert fig["mean"] == pytest.approx(np.mean(values))
        assert fig["std"] == pytest.approx(np.std(values, ddof=1))
    assert json.loads((out / "seeds_results.json").read_text())["seeds"] == [0, 1]
    def must_not_run(cfg):
        raise AssertionError(f"seed {cfg['seed']} ran again")
    again = wfnet.run_seeds(wfnet.parse_args(args + ["--seeds", "1", "0"]), must_not_run)
    assert again["figures"]["acc_f_test"]["values"] == summary["figures"]["acc_f_test"]["values"][::-1]
    with pytest.raises(AssertionError, match="seed 1 ran again"):   # other settings: run again
        wfnet.run_seeds(wfnet.parse_args(args + ["--seeds", "1", "--lambda1", "2"]), must_not_run)
    one = wfnet.run_seeds(wfnet.parse_args(args + ["--seeds", "0"]), must_not_run)
    assert one["figures"]["acc_f_test"]["std"] is None    # one seed: no deviation to report


def test_presets_and_flags_resolve():
    cfg = wfnet.parse_args(["--device", "cpu"])
    assert (cfg["preset"], cfg["arch"], cfg["width"], cfg["optimizer"]) == ("quick", "resnet18", 16, "sgd")
    assert (cfg["stem_stride"], cfg["augment"], cfg["untrain_epochs"]) == (2, False, 0.8)
    cfg = wfnet.parse_args(["--device", "cpu", "--preset", "full", "--augment"])
    assert (cfg["stem_stride"], cfg["augment"], cfg["width"]) == (1, True, 64)
    cfg = wfnet.parse_args(["--device", "cpu", "--stem-stride", "1", "--no-augment"])
    assert (cfg["stem_stride"], cfg["augment"]) == (1, False)
    cfg = wfnet.parse_args(["--device", "cpu", "--arch", "vit"])
    assert (cfg["width"], cfg["optimizer"], cfg["lr"]) == (64, "adamw", 1e-3)
    cfg = wfnet.parse_args(["--device", "cpu", "--preset", "full", "--width", "8", "-T", "2"])
    assert (cfg["width"], cfg["epochs"], cfg["T"], cfg["eval_train"]) == (8, 30, 2, 0)
