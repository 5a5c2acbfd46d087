"""Tests for wfnet.py: numbers against independent references, on tiny synthetic data."""
import copy, gzip, inspect, json, math, pickle, sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from scipy.stats import pearsonr, spearmanr

import wfnet
from conftest import ROOT, FAST, one_hot_net, own_class_rows, randomize, randomize_bn, synthetic_images, tiny, tiny_models, write_mnist_like
from wfnet import WFNet

ARCHS = list(tiny_models())                  # resnet18, torchvision_resnet, vit, small, attention, torchvision_vit


# ---------------------------------------------------------------- weight filtering

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_forget_none_is_the_wrapped_model(arch, granularity):
    model, x = tiny(arch)
    ref = model.requires_grad_(False)(x)                  # frozen, as WFNet leaves it
    wf = randomize(WFNet(model, 5, granularity))
    assert torch.equal(wf(x), ref) and torch.equal(wf(x, forget=None), ref)
    wf0 = WFNet(tiny(arch)[0], 5, granularity)            # alpha = 1: the original exactly
    assert torch.allclose(wf0(x, forget=3), wf0(x), atol=1e-5)


def test_every_weight_of_the_attention_models_is_filtered():
    names = WFNet(tiny("attention")[0], 5).names
    assert names == ["embed.weight", "attention.in_proj_weight", "attention.out_proj.weight", "head.weight"]
    names = WFNet(tiny("torchvision_vit")[0], 5).names
    assert names[0] == "conv_proj.weight" and names[-1] == "heads.head.weight" and len(names) == 10
    assert "encoder.layers.encoder_layer_1.self_attention.in_proj_weight" in names


@pytest.mark.parametrize("arch", ARCHS)
def test_channel_gate_equals_hand_scaled_weights(arch):
    """Random alpha; the reference scales row k of every filtered weight by a_k, one by one, and
    runs the model's own forward (nn.MultiheadAttention's included)."""
    model, x = tiny(arch)
    wf = randomize(WFNet(model, 5, "channel"))
    for c in range(5):
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for n, a in zip(wf.names, wf.alpha):
                w = ref.get_parameter(n)
                for k in range(w.shape[0]):
                    w[k] *= a[c, k]
        out = wf(x, forget=c)
        assert torch.allclose(out, ref(x), atol=1e-5)
        assert not torch.allclose(out, model(x), atol=1e-3)   # the filter does something


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_granularity_equals_the_channel_gate_with_the_same_rows(arch):
    """Weight-level alpha equal to the channel alpha repeated over each row: the same function."""
    model, x = tiny(arch)
    channel = randomize(WFNet(model, 5, "channel"))
    weight = WFNet(model, 5, "weight")
    with torch.no_grad():
        for n, ac, aw in zip(channel.names, channel.alpha, weight.alpha):
            aw.copy_(ac[:, :, None].expand(-1, -1, model.get_parameter(n)[0].numel()).reshape(aw.shape))
    for c in (0, 2, 4):
        assert torch.allclose(weight(x, forget=c), channel(x, forget=c), atol=1e-5)


def test_weight_granularity_equals_functional_layers():
    model, x = tiny("small")
    wf = randomize(WFNet(model, 5, "weight"))
    conv, lin = model[0], model[3]
    for c in range(5):
        h = F.relu(F.conv2d(x, conv.weight * wf.alpha[0][c].view_as(conv.weight), conv.bias))
        ref = F.linear(h.flatten(1), lin.weight * wf.alpha[1][c].view_as(lin.weight), lin.bias)
        assert torch.allclose(wf(x, forget=c), ref, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_export_equals_filtered_forward_and_loads_without_wfnet(arch, granularity):
    model, x = tiny(arch)
    wf = randomize(WFNet(model, 5, granularity))
    for c in (0, 4):
        exported = wf.export(forget=c)
        assert torch.allclose(exported(x), wf(x, forget=c), atol=1e-5)
        fresh = tiny(arch)[0]
        fresh.load_state_dict(exported.state_dict())      # plain state_dict, same keys
        assert torch.allclose(fresh(x), exported(x))
    assert torch.equal(wf(x), model(x))                   # export left the wrapped model alone


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_per_sample_batch_equals_one_pass_per_class(arch, granularity):
    model, x = tiny(arch)
    wf = randomize(WFNet(model, 5, granularity))
    forget = torch.tensor([3, 0, 3, 4, 1, 0])
    batched = wf(x, forget=forget)
    for i, c in enumerate(forget.tolist()):
        assert torch.allclose(batched[i], wf(x[i:i + 1], forget=c)[0], atol=1e-5)


def test_gated_attention_is_multihead_attention_itself():
    """With the gates at 1, the gated forward gives nn.MultiheadAttention's outputs and weights, for
    both layouts and both ways of returning the weights; an instance forward of the user's stays."""
    torch.manual_seed(0)
    for batch_first in (True, False):
        m = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
        q, k = torch.randn(3, 4, 8), torch.randn(3, 5, 8)        # (B, L, E), (B, S, E)
        if not batch_first:
            q, k = q.transpose(0, 1), k.transpose(0, 1)   # (L, B, E), (S, B, E)
        for average in (True, False):
            ref = m(q, k, k, average_attn_weights=average)
            out = wfnet._gated_attention(m, torch.ones(24), torch.ones(8), q, k, k, average_attn_weights=average)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out, ref))
    model, x = tiny("attention")
    calls = []

    def users_forward(*args, **kw):                       # e.g. a library's hook on the instance
        calls.append(1)
        return nn.MultiheadAttention.forward(model.attention, *args, **kw)
    model.attention.forward = users_forward
    wf = randomize(WFNet(model, 5))
    wf(x, forget=0)                                       # the first pass checks the gates (see _plan)
    calls.clear()
    assert not torch.allclose(wf(x, forget=1), wf(x), atol=1e-3) and calls == [1]   # gated, then the user's
    assert model.attention.forward is users_forward


def test_attention_with_a_mask_is_refused_not_filtered_wrongly():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 5)

        def forward(self, x):
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
            return self.head(self.attention(x, x, x, attn_mask=mask)[0].mean(1))
    x = torch.randn(2, 3, 4)
    wf = WFNet(Masked().eval(), 5)
    assert torch.equal(wf(x), wf.model(x))
    with pytest.raises(NotImplementedError, match="masks"):
        wf(x, forget=1)
    with pytest.raises(ValueError, match="one embed dim"):
        WFNet(nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)), 5)


def test_gradients_reach_alpha_through_the_batched_gate():
    model, x = tiny("resnet18")
    wf = WFNet(model, 5, "channel")
    wf(x, forget=torch.tensor([0, 1, 2, 0, 1, 2])).sum().backward()
    grads = wf.alpha[0].grad
    assert grads[:3].abs().sum() > 0 and grads[3:].abs().sum() == 0  # rows 3, 4 unused
    assert all(p.grad is None for p in wf.model.parameters())        # backbone frozen


def test_forget_out_of_range_raises():
    model, x = tiny("small")
    wf = WFNet(model, 5)
    for bad in (5, -1, torch.tensor([0, 1, 2, 3, 4, 7])):
        with pytest.raises(ValueError, match="out of range"):
            wf(x, forget=bad)
    with pytest.raises(ValueError, match="entries"):
        wf(x, forget=torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        WFNet(model, 5, granularity="row")


# ---------------------------------------------------------------- forgetting a set of classes

@pytest.mark.parametrize("combine", ["min", "product"])
@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_a_set_of_classes_combines_the_rows_by_the_rule(combine, granularity):
    model, x = tiny("resnet18")
    wf = randomize(WFNet(model, 5, granularity, combine))
    rule = torch.minimum if combine == "min" else torch.mul
    ref = copy.deepcopy(model)                            # weights scaled by rule(alpha[1], alpha[3])
    with torch.no_grad():
        for n, a in zip(wf.names, wf.alpha):
            w = ref.get_parameter(n)
            w *= rule(a[1], a[3]).view((-1, *[1] * (w.dim() - 1)) if granularity == "channel" else w.shape)
    assert torch.allclose(wf(x, forget=[1, 3]), ref(x), atol=1e-5)
    assert torch.allclose(wf(x, forget=(3, 1, 3)), ref(x), atol=1e-5)   # a set: order, repeats
    assert torch.allclose(wf.export(forget=[1, 3])(x), ref(x), atol=1e-5)
    assert torch.allclose(wf(x, forget=[2]), wf(x, forget=2))
    per_sample = torch.tensor([[1, 3], [0, 1], [2, 4], [1, 3], [4, 0], [0, 2]])
    batched = wf(x, forget=per_sample)                    # (B, S): one set per sample
    for i, s in enumerate(per_sample.tolist()):
        assert torch.allclose(batched[i], wf(x[i:i + 1], forget=s)[0], atol=1e-5)
    twice = wf(x, forget=torch.tensor([[2, 2]] * 6))      # a (B, S) row is taken as given:
    once = wf(x, forget=2)                                # min is idempotent, product squares
    assert torch.allclose(twice, once, atol=1e-6) == (combine == "min")
    with pytest.raises(ValueError, match="empty"):
        wf(x, forget=[])
    with pytest.raises(ValueError, match="out of range"):
        wf(x, forget=[1, 5])


# ---------------------------------------------------------------- explanations

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
    wf = WFNet(tiny("small")[0], 3)
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
    reversed_confusion = [[90, 2, 8], [2, 90, 8], [8, 8, 84]]  # most confused where least similar
    assert wfnet.class_similarity(wf, reversed_confusion)["pearson"] < -0.9
    randomize(wf)                                         # random rows; a confusion full of ties
    confusion = torch.randint(0, 4, (3, 3), generator=torch.Generator().manual_seed(1)).float()
    r = wfnet.class_similarity(wf, confusion)
    i, j = np.triu_indices(3, 1)
    sim, conf = np.array(r["similarity"])[i, j], ((confusion + confusion.T) / 2).numpy()[i, j]
    assert r["pearson"] == pytest.approx(pearsonr(sim, conf).statistic, abs=1e-5)
    assert len(set(conf.tolist())) < len(conf)            # the case has ties
    assert r["spearman"] == pytest.approx(spearmanr(sim, conf).statistic, abs=1e-5)   # average ranks for ties
    conf = wfnet._confusion(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0]), 3)
    assert conf.tolist() == [[50, 50, 0], [0, 100, 0], [100, 0, 0]]


def test_explain_from_python_without_a_confusion_matrix():
    net, x, y, spec = one_hot_net()
    wf = own_class_rows(net)                              # each row forgets its own class exactly
    ex = wfnet.explain(wf, dict(test=(x, y), spec=spec), per_class=0, max_fraction=0.25)
    assert ex["samples"] == len(y) and len(ex["curves"]) == 4 and len(ex["alpha"]) == 2
    assert ex["alpha"][0]["frac_off"] == [0.25] * 4 and ex["alpha"][1]["frac_off"] == [0.0] * 4
    hold = [r["deletion_alpha"]["auc_other"] > r["deletion_alpha"]["auc_c"] for r in ex["curves"]]
    assert all(hold)                                      # deleting unit c costs only class c


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


def test_alpha_moves_under_untraining():
    """The first Adam step moves every entry with a gradient by about lr: those pushed down stay
    below 1 after the projection. A clamp in the forward pass would leave all of them at 1."""
    x, y = synthetic_images(64)
    torch.manual_seed(0)
    wf = WFNet(wfnet.ResNet18(10, 1, 4), 10)
    info = wfnet.untrain(wf, x, y, wfnet.DATASETS["mnist"], steps=1, batch_size=64, lr=0.01, lambda2=0,
                         progress=False)            # the data terms alone: R pulls a random network up
    moved = max((1 - a).max().item() for a in wf.alpha)
    assert info["steps"] == 1 and len(info["history"]) == 1
    assert moved == pytest.approx(0.01, rel=0.05), "alpha did not move: the gradient is dead at initialization"
    assert all(a.min() >= 0 and a.max() <= 1 for a in wf.alpha)


def test_weight_granularity_untrains_a_channels_last_model():
    """The command line's models are channels_last; weight-granularity untraining once
    corrupted the heap there after two or three steps (the test process crashed)."""
    model = wfnet.ResNet18(10, 1, width=4, stem_stride=2).to(memory_format=torch.channels_last)
    wf = WFNet(model, 10, "weight")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.arange(256) % 10
    info = wfnet.untrain(wf, x, y, wfnet.DATASETS["mnist"], steps=8, batch_size=32,
                         progress=False)
    assert info["steps"] == 8 and info["skipped_steps"] == 0
    assert all(torch.isfinite(a).all() for a in wf.alpha)
    assert min(a.min().item() for a in wf.alpha) < 1     # alpha moved


def test_a_non_finite_step_never_reaches_alpha(monkeypatch):
    """The loss of step 2 of 5 is NaN: that step leaves alpha (and Adam's moments) exactly as they
    were, the others train, the count comes back and the schedule still runs to its end."""
    snapshots, calls, scheds = [], [0], []
    loss = wfnet.wfnet_loss

    def nan_at_step_2(*args, **kw):
        calls[0] += 1
        out = loss(*args, **kw)
        return (out[0] * float("nan"),) + out[1:] if calls[0] == 2 else out
    step = torch.optim.lr_scheduler.LambdaLR.step

    def record(self, *a, **k):                            # after each optimizer step, before the projection
        scheds.append(self)
        snapshots.append(torch.cat([p.detach().flatten().clone() for p in self.optimizer.param_groups[0]["params"]]))
        return step(self, *a, **k)
    monkeypatch.setattr(wfnet, "wfnet_loss", nan_at_step_2)
    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", record)
    torch.manual_seed(0)
    wf = WFNet(wfnet.ResNet18(10, 1, 4), 10)
    x, y = synthetic_images(160)
    info = wfnet.untrain(wf, x, y, wfnet.DATASETS["mnist"], steps=5, batch_size=32, progress=False)
    snapshots = snapshots[1:]                             # the first call is LambdaLR's own, at construction
    assert info["steps"] == 5 and info["skipped_steps"] == 1 and len(info["history"]) == 5
    assert torch.equal(snapshots[1], snapshots[0].clamp(0, 1))    # step 2 changed nothing
    assert not torch.equal(snapshots[2], snapshots[1].clamp(0, 1))   # step 3 trained again
    assert all(torch.isfinite(a).all() for a in wf.alpha)
    opt = scheds[-1].optimizer
    assert scheds[-1].last_epoch == 5 and opt.param_groups[0]["lr"] == 0   # the linear decay ran to its end
    assert all(opt.state[p]["step"].item() == 4 for p in wf.alpha)     # Adam counted the four real steps


def test_untrain_defaults_are_the_command_lines_quick_recipe():
    """A user who calls untrain(wf, x, y, spec) gets what `python wfnet.py` runs on a CPU."""
    defaults = {k: p.default for k, p in inspect.signature(wfnet.untrain).parameters.items()}
    cfg = wfnet.parse_args(["--device", "cpu"])
    for arg, setting in (("steps", "untrain_steps"), ("batch_size", "untrain_batch_size"), ("T", "T"),
                         ("lr", "untrain_lr"), ("lambda0", "lambda0"), ("lambda1", "lambda1"), ("lambda2", "lambda2")):
        assert defaults[arg] == cfg[setting], arg


def test_untrain_defaults_forget_every_class_of_a_small_generated_dataset():
    """untrain(wf, x, y, spec) as a user calls it, on 2,000 generated images that are not
    Fashion-MNIST: its own defaults forget every class and keep the others."""
    x, y = synthetic_images(2000, seed=5)
    spec, test = dict(wfnet.DATASETS["mnist"], classes=10), synthetic_images(500, seed=6)
    torch.manual_seed(0)
    model = wfnet.train_original(wfnet.ResNet18(10, 1, 8, 2), x, y, spec, 2, 64, 0.05, progress=False,
                                 augment=False)
    wf = WFNet(model, 10)
    wfnet.untrain(wf, x, y, spec, progress=False)
    res = wfnet.evaluate(model, lambda c: partial(wf, forget=c), dict(train=(x, y), test=test, spec=spec),
                         eval_train=0)
    assert res["original"]["test_acc"] > 99
    assert max(r["acc_f_test"] for r in res["per_class"]) <= 2, [r["acc_f_test"] for r in res["per_class"]]
    assert max(r["acc_f_train"] for r in res["per_class"]) <= 2
    assert res["mean"]["acc_r_drop_test"] <= 1


def test_the_untraining_never_crops_or_flips(monkeypatch):
    """An original trained without augmentation must not be untrained on images it never saw
    (and one trained with it forgets as well without: notebooks/RESULTS.md)."""
    seen, transform = [], wfnet.transform

    def record(x, spec, augment=False, gen=None):
        seen.append(augment)
        return transform(x, spec, augment, gen)
    monkeypatch.setattr(wfnet, "transform", record)
    x, y = synthetic_images(64)
    wf = WFNet(wfnet.ResNet18(10, 1, 4), 10)
    wfnet.untrain(wf, x, y, dict(wfnet.DATASETS["mnist"], flip=True), steps=3, batch_size=16, progress=False)
    assert seen == [False] * 3


def test_untraining_is_deterministic():
    x, y = synthetic_images(64)
    spec = wfnet.DATASETS["mnist"]
    alphas = []
    for _ in range(2):
        torch.manual_seed(0)
        wf = WFNet(wfnet.ResNet18(10, 1, 4), 10)
        wfnet.untrain(wf, x, y, spec, steps=2, batch_size=32, seed=3, progress=False)
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

def test_mnist_is_read_from_torchvision_layout(tmp_path):
    ref = write_mnist_like(tmp_path, "MNIST", 30, 20)
    d = wfnet.load_dataset("mnist", tmp_path)
    for split in ("train", "test"):
        assert torch.equal(d[split][0], ref[split][0]) and torch.equal(d[split][1], ref[split][1])
    assert d["train"][0].shape == (30, 1, 28, 28) and d["train"][1].dtype == torch.long


def test_fashion_mnist_is_unpacked_from_the_debian_folder(tmp_path, monkeypatch):
    ref = write_mnist_like(tmp_path / "deb", "x", 12, 8)
    debian = tmp_path / "deb" / "x" / "raw"
    for f in list(debian.iterdir()):                      # Debian ships the four files gzipped
        (debian / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    sys.path.insert(0, str(ROOT / "data"))
    import fashion_mnist                                  # data/fashion_mnist.py
    fashion_mnist.unpack(tmp_path / "data", debian)
    d = wfnet.load_dataset("fashion-mnist", tmp_path / "data")
    assert torch.equal(d["test"][0], ref["test"][0]) and torch.equal(d["train"][1], ref["train"][1])
    assert sorted(p.name for p in (tmp_path / "data" / "FashionMNIST" / "raw").iterdir()) == sorted(
        p.name.removesuffix(".gz") for p in debian.iterdir())


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_is_read_from_torchvision_pickles(tmp_path, monkeypatch, name):
    """Python-2-style pickles with str keys, in torchvision's folder; the checksums are of the
    real files, so the test lets any file pass them."""
    import torchvision
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    g = np.random.default_rng(0)
    folder, files, key, meta = tmp_path / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + [
        "test_batch"], "labels", ("batches.meta", "label_names")
    if name == "cifar100":
        folder, files, key, meta = tmp_path / "cifar-100-python", ["train", "test"], "fine_labels", ("meta",
                                                                                                   "fine_label_names")
    folder.mkdir()
    batches = {}
    for f in files:
        batches[f] = (g.integers(0, 256, (4, 3072), dtype=np.uint8), [int(v) for v in g.integers(0, 10, 4)])
        (folder / f).write_bytes(pickle.dumps({"data": batches[f][0], key: batches[f][1]}))
    (folder / meta[0]).write_bytes(pickle.dumps({meta[1]: [str(i) for i in range(100)]}))
    d = wfnet.load_dataset(name, tmp_path)
    test = batches[files[-1]]
    assert d["test"][0].shape == (4, 3, 32, 32)
    assert torch.equal(d["test"][0].reshape(4, -1), torch.from_numpy(test[0]))  # CHW as stored
    assert d["test"][1].tolist() == test[1] and len(d["train"][0]) == 4 * (len(files) - 1)


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


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
    (["--arch", "vgg"], "argument --arch: invalid choice: 'vgg'"),
    (["--granularity", "row"], "argument --granularity: invalid choice"),
    (["--combine", "max"], "argument --combine: invalid choice"),
    (["--explain-samples", "-1"], "argument --explain-samples: needs a finite number >= 0, not -1"),
    (["--eval-train", "-5"], "argument --eval-train: needs a finite number >= 0, not -5"),
    (["--batch-size", "0"], "argument --batch-size: needs a finite number >= 1, not 0"),
    (["--width", "0"], "argument --width: needs a finite number >= 1, not 0"),
    (["--width", "-2"], "argument --width: needs a finite number >= 1, not -2"),
    (["--epochs", "0"], "argument --epochs: needs a finite number >= 1, not 0"),
    (["--lr", "nan"], "argument --lr: needs a finite number > 0, not nan"),
    (["--lr", "0"], "argument --lr: needs a finite number > 0, not 0"),
    (["--weight-decay", "-1"], "argument --weight-decay: needs a finite number >= 0, not -1"),
    (["--weight-decay", "inf"], "argument --weight-decay: needs a finite number >= 0, not inf"),
    (["--lambda0", "nan"], "finite lambdas >= 0 (nan, 1.0, 1.0)"),
    (["--lambda1", "inf"], "finite lambdas >= 0 (3.0, inf, 1.0)"),
    (["--untrain-lr", "nan"], "a finite lr > 0 (nan)"),
    (["--device", "tpu"], "--device tpu: choose cpu, or cuda"),
    (["--untrain-steps", "0"], "the untraining needs steps >= 1 (0)"),
    (["--untrain-batch-size", "129"], "an even batch size >= 2 (129)"),
    (["--untrain-lr", "0"], "lr > 0 (0.0)"),
    (["-T", "0"], "T >= 1 (0)"),
    (["--lambda2", "-1"], "lambdas >= 0"),
    (["--untrain-lr", "x"], "argument --untrain-lr: invalid"),
    (["--stem-stride", "3"], "argument --stem-stride: invalid choice"),
    (["--seeds", "0", "1", "0"], "--seeds takes distinct seeds"),
    (["--seeds", "0", "1", "--seed", "2"], "no --seed or --checkpoint"),
    (["--seeds", "0", "--checkpoint", "x.pt"], "no --seed or --checkpoint"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, message, capsys, tmp_path):
    code, err = cli(args + ["--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cuda_where_there_is_none(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = cli(["--device", "cuda"], capsys)
    assert code == 2 and "where a CUDA device is available" in err and len(err.splitlines()) == 1


def test_missing_data_offline(tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(*a, download=False, **k):
        raise OSError("no network") if download else RuntimeError("Dataset not found")
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    code, err = cli(FAST + ["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not found" in err and "download failed (OSError)" in err
    assert len(err.splitlines()) == 1


def test_bad_checkpoints(mnist, tmp_path, capsys):
    base, out = mnist(40, 20), tmp_path / "o"
    out.mkdir()
    code, err = cli(base + ["--checkpoint", str(tmp_path / "missing.pt")], capsys)
    assert code == 2 and err == f"error: {tmp_path / 'missing.pt'} does not exist"
    (out / "original.pt").write_bytes(b"PK\x03\x04 truncated")
    code, err = cli(base, capsys)
    assert code == 2 and "not a readable wfnet checkpoint" in err and len(err.splitlines()) == 1
    assert not (out / "results.json").exists() and not (out / "wfnet.pt").exists()
    other = tmp_path / "other.pt"
    settings = dict(dataset="mnist", arch="resnet18", num_classes=10, in_channels=1, image_size=28, width=4)
    wfnet.save_checkpoint(other, {**settings, "num_classes": 100}, {})
    code, err = cli(base + ["--checkpoint", str(other)], capsys)
    assert code == 2 and "made for mnist with 100 classes" in err
    wfnet.save_checkpoint(other, settings, wfnet.ResNet18(10, 1, 8).state_dict())
    code, err = cli(base + ["--checkpoint", str(other)], capsys)
    assert code == 2 and "does not hold a wfnet backbone with the settings that made it" in err
    wfnet.save_checkpoint(other, {k: v for k, v in settings.items() if k != "width"}, wfnet.ResNet18(10, 1, 4).state_dict())
    code, err = cli(base + ["--checkpoint", str(other)], capsys)
    assert code == 2 and "does not hold a wfnet backbone" in err
    assert not (out / "results.json").exists()
    for bad in ({"meta": {}, "state_dict": {}, "x": nn.Linear(2, 2)}, [1, 2]):   # not weights-only; no dict
        torch.save(bad, other)
        code, err = cli(base + ["--checkpoint", str(other)], capsys)
        assert code == 2 and "not a readable" in err
    (out / "original.pt").unlink()
    code, err = cli(base + ["--batch-size", "100000"], capsys)
    assert code == 2 and "make no step" in err and len(err.splitlines()) == 1


def test_a_checkpoint_is_rebuilt_from_its_own_settings_and_memory_matrices_follow_their_original(mnist, tmp_path):
    """--checkpoint builds the network its settings describe (stride-1 stem here, whatever the flags
    say); a retrained original.pt never meets the memory matrices of the one before."""
    flags = mnist(200, 50) + ["--explain-samples", "2"]
    other = tmp_path / "stride1.pt"
    settings = dict(dataset="mnist", arch="resnet18", num_classes=10, in_channels=1, image_size=28, width=4,
                    stem_stride=1)
    torch.manual_seed(0)
    wfnet.save_checkpoint(other, settings, wfnet.ResNet18(10, 1, 4, stem_stride=1).state_dict())
    res = wfnet.run(wfnet.parse_args(flags + ["--checkpoint", str(other), "--lambda2", "0"]))   # random: R alone holds alpha
    assert res["original_made_by"]["stem_stride"] == 1
    wfnet.run(wfnet.parse_args(flags))                    # trains original.pt, untrains for it
    first = torch.load(tmp_path / "o" / "wfnet.pt", weights_only=True)["meta"]["original"]
    wfnet.run(wfnet.parse_args(flags + ["--lr", "0.05"]))   # another original: new memory matrices
    second = torch.load(tmp_path / "o" / "wfnet.pt", weights_only=True)["meta"]["original"]
    model = wfnet.load_model(wfnet.load_checkpoint(tmp_path / "o" / "original.pt"), "cpu")
    assert first != second == wfnet.fingerprint(model)


def test_a_checkpoint_records_what_made_it(mnist, tmp_path):
    """With --checkpoint, wfnet.pt records the settings the checkpoint was trained with (its
    epochs, lr, seed and augmentation), not the flags of this run."""
    flags = mnist(200, 50) + ["--explain-samples", "2"]
    wfnet.run(wfnet.parse_args(flags + ["--lr", "0.05", "--seed", "3", "--augment"]))
    first = tmp_path / "o" / "original.pt"
    flags[flags.index("--out") + 1] = str(tmp_path / "p")
    wfnet.run(wfnet.parse_args(flags + ["--checkpoint", str(first), "--epochs", "7"]))
    meta = torch.load(tmp_path / "p" / "wfnet.pt", weights_only=True)["meta"]
    made = meta["original_made_by"]
    assert (made["lr"], made["seed"], made["epochs"], meta["seed"]) == (0.05, 3, 1, 0)
    assert made["augment"] is True


def test_end_to_end_untraining_forgets_and_retains(tmp_path, capsys):
    """A tiny real run: untraining lowers Acc_f far below the original and keeps Acc_r."""
    write_mnist_like(tmp_path / "data", "MNIST", 300, 200)
    out = tmp_path / "o"
    args = ["--dataset", "mnist", "--width", "4", "--epochs", "3", "--batch-size", "32",
            "--lr", "0.05", "--untrain-steps", "270", "--untrain-batch-size", "32",
            "--untrain-lr", "0.08", "--data-dir", str(tmp_path / "data"), "--out", str(out),
            "--no-progress", "--explain-samples", "10"]
    res = wfnet.run(wfnet.parse_args(args))
    orig = res["original"]["test_acc"]
    assert orig > 95                                      # the synthetic task is easy
    assert res["mean"]["acc_f_test"] < orig / 2           # the original: Acc_f = Acc = ~99%
    assert res["mean"]["acc_r_drop_test"] < 5
    assert 1 - math.log(2) <= res["mean"]["zrf"] <= 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["mean"] == pytest.approx(res["mean"])
    assert len(saved["matrix_test"]) == 10 and len(saved["per_class"]) == 10
    for png in ("matrix", "alpha"):
        assert (out / f"{png}.png").stat().st_size > 0
    ex = saved["explain"]
    assert ex["samples"] == 100 and len(ex["curves"]) == 10
    assert -1 <= ex["pearson"] <= 1 and 0 <= ex["deletion_alpha_beats_random"] <= 10
    assert len(ex["alpha"]) == 21                         # ResNet-18: 20 convs + fc
    capsys.readouterr()
    wfnet.run(wfnet.parse_args(args))                     # a second run reuses both checkpoints
    printed = capsys.readouterr().out
    assert "reusing the original model" in printed and "reusing the memory matrices" in printed
    assert not list(out.glob("*.tmp"))
    wfnet.run(wfnet.parse_args(args + ["--lambda1", "2"]))   # another untraining setting: a new wfnet.pt
    assert torch.load(out / "wfnet.pt", weights_only=True)["meta"]["lambda1"] == 2


def test_seeds_report_mean_and_sample_std(mnist, tmp_path, capsys):
    args = mnist(200, 100) + ["--explain-samples", "2"]
    returned = wfnet.main(args + ["--seeds", "0", "1"])
    runs = [json.loads((tmp_path / "o" / f"seed{k}" / "results.json").read_text()) for k in (0, 1)]
    assert [r["config"]["seed"] for r in runs] == [0, 1]
    assert [r["mean"]["acc_r_test"] for r in returned] == pytest.approx([r["mean"]["acc_r_test"] for r in runs])
    printed = capsys.readouterr().out.splitlines()
    for key, run_value in (("acc_f_test", lambda r: r["mean"]["acc_f_test"]),
                           ("original_test_acc", lambda r: r["original"]["test_acc"]),
                           ("zrf", lambda r: r["mean"]["zrf"])):
        values = [run_value(r) for r in runs]
        line = next(x for x in printed if x.split()[:1] == [key]).split()
        assert float(line[1]) == pytest.approx(np.mean(values), abs=1e-3)
        assert float(line[3]) == pytest.approx(np.std(values, ddof=1), abs=1e-3)


def test_presets_and_flags_resolve():
    cfg = wfnet.parse_args(["--device", "cpu"])
    assert (cfg["preset"], cfg["arch"], cfg["width"], cfg["optimizer"]) == ("quick", "resnet18", 16, "sgd")
    assert (cfg["stem_stride"], cfg["augment"], cfg["untrain_steps"], cfg["T"]) == (2, False, 1400, 1)
    cfg = wfnet.parse_args(["--device", "cpu", "--preset", "full", "--augment"])
    assert (cfg["stem_stride"], cfg["augment"], cfg["width"]) == (1, True, 64)
    cfg = wfnet.parse_args(["--device", "cpu", "--stem-stride", "1", "--no-augment"])
    assert (cfg["stem_stride"], cfg["augment"]) == (1, False)
    cfg = wfnet.parse_args(["--device", "cpu", "--arch", "vit"])
    assert (cfg["width"], cfg["optimizer"], cfg["lr"]) == (64, "adamw", 1e-3)
    cfg = wfnet.parse_args(["--device", "cpu", "--preset", "full", "--width", "8", "-T", "2"])
    assert (cfg["width"], cfg["epochs"], cfg["T"], cfg["eval_train"]) == (8, 30, 2, 0)


# ---------------------------------------------------------------- found on the way

def test_a_width_4_resnet_trains_in_the_cpus_memory_format():
    """channels_last on CPU (oneDNN, torch 2.14.1) corrupted the heap when training convolutions
    with fewer than 8 channels: this model aborted the process within 40 SGD steps there."""
    model = wfnet.model_from_config(dict(arch="resnet18", num_classes=10, in_channels=1, image_size=28, width=4,
                                         stem_stride=2), "cpu")
    assert model.stem[0].weight.is_contiguous()          # the default format, not channels_last
    x = torch.randint(0, 256, (40 * 16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    wfnet.train_original(model, x, torch.arange(len(x)) % 10, wfnet.DATASETS["mnist"], 1, 16, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_layers_the_filter_does_not_cover_are_named_in_a_warning():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 3))
    with pytest.warns(UserWarning, match="leaves 0 unfiltered"):
        wf = WFNet(model, 3)
    assert wf.names == ["2.weight"]


def test_a_failure_while_gating_leaves_no_hook_or_patched_forward(monkeypatch):
    model, x = tiny("attention")
    wf = WFNet(model, 5)
    calls = []
    original = nn.Module.register_forward_hook

    def fail_on_second(self, hook, *a, **k):
        calls.append(self)
        if len(calls) == 2:
            raise RuntimeError("hook registration failed")
        return original(self, hook, *a, **k)
    monkeypatch.setattr(nn.Module, "register_forward_hook", fail_on_second)
    with pytest.raises(RuntimeError, match="hook registration failed"):
        wf(x, forget=1)
    monkeypatch.undo()
    assert "forward" not in model.attention.__dict__ and not model.embed._forward_hooks
    assert torch.equal(wf(x), model(x))


def test_the_library_checks_the_untraining_settings():
    wf = WFNet(wfnet.ResNet18(10, 1, 4), 10)
    x, y = synthetic_images(64)
    for bad in (dict(steps=0), dict(batch_size=129), dict(batch_size=1), dict(T=0), dict(lr=0), dict(lambda1=-1)):
        with pytest.raises(ValueError, match="the untraining needs"):
            wfnet.untrain(wf, x, y, wfnet.DATASETS["mnist"], progress=False, **bad)


def test_a_diverging_original_is_an_error_and_saved_nowhere(mnist, tmp_path, capsys):
    code, err = cli(mnist(200, 50) + ["--lr", "1e30"], capsys)
    assert code == 2 and "loss turned non-finite in epoch 1" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "original.pt").exists() and not (tmp_path / "o" / "results.json").exists()


def test_an_untraining_that_learns_nothing_is_an_error(monkeypatch):
    wf = WFNet(wfnet.ResNet18(10, 1, 4), 10)
    x, y = synthetic_images(64)
    real = wfnet.wfnet_loss
    monkeypatch.setattr(wfnet, "wfnet_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"),) + real(*a, **k)[1:])
    with pytest.raises(wfnet.WFError, match=r"left alpha untouched \(3/3 steps skipped"):
        wfnet.untrain(wf, x, y, wfnet.DATASETS["mnist"], steps=3, batch_size=32, progress=False)
    monkeypatch.undo()
    with pytest.raises(wfnet.WFError, match=r"left alpha untouched \(0/3 steps skipped"):
        wfnet.untrain(wf, x, y, wfnet.DATASETS["mnist"], steps=3, batch_size=32, lambda0=0, lambda1=0, progress=False)


def test_untrain_evaluate_and_explain_take_datasets_as_tensors():
    """A Dataset of (normalized image, label) gives the batches, the first untraining step and the
    metrics that the uint8 tensors give."""
    spec = wfnet.DATASETS["mnist"]
    x, y = synthetic_images(200)
    ds = torch.utils.data.TensorDataset(wfnet.transform(x, spec), y)
    idx = [torch.tensor([5, 0, 17, 3]), torch.tensor([199, 1])]
    for (xa, ya), (xb, yb) in zip(wfnet.batches(x, y, spec, idx), wfnet.batches(ds, y, None, idx)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(wfnet.labels(ds), y) and torch.equal(wfnet.labels(torch.utils.data.Subset(ds, [4, 2])), y[[4, 2]])
    model = wfnet.train_original(wfnet.ResNet18(10, 1, 4), ds, None, None, 1, 32, 0.05, progress=False)
    wf, wf2 = WFNet(model, 10), WFNet(model, 10)
    steps = [wfnet.untrain(w, *d, steps=3, batch_size=32, lambda2=0, progress=False)["history"]
             for w, d in ((wf, (x, y, spec)), (wf2, (ds,)))]
    assert torch.allclose(torch.tensor(steps[0][0]), torch.tensor(steps[1][0]), rtol=1e-5)   # the same first batch
    res = [wfnet.evaluate(model, lambda c: partial(wf, forget=c), d, eval_train=100)
           for d in (dict(train=(x, y), test=(x, y), spec=spec), dict(train=ds, test=ds))]
    keys = ("acc_f_test", "acc_r_test", "acc_f_train", "acc_r_train")
    assert [[r[k] for k in keys] for r in res[0]["per_class"]] == [[r[k] for k in keys] for r in res[1]["per_class"]]
    assert res[0]["eval_train_samples"] == res[1]["eval_train_samples"] == 100
    ex = [wfnet.explain(wf, d, per_class=3, max_fraction=0.25) for d in (dict(test=(x, y), spec=spec), dict(test=ds))]
    assert [c["deletion_alpha"]["acc_c"] for c in ex[0]["curves"]] == [c["deletion_alpha"]["acc_c"] for c in ex[1]["curves"]]
