"""Any classifier, really: one model of every family in torchvision's classification zoo, in the
smallest configuration its constructor allows, filtered with random alpha and checked against the
weights folded by hand (export), per-sample rows against one pass per class, sets, and the channel
gate against the weight filter with the same per-channel values. Plus the ways a model can use a
filtered weight other than calling its layer."""
import math, warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision import models as tvm

import wfnet
from conftest import randomize
from wfnet import WFNet

NC = 3   # classes: the memory matrices of the weight filter on VGG's classifier are 3 x 120M


def families():
    """family -> (the names in torchvision.models.list_models it covers, a constructor, image size)."""
    from torchvision.models import (convnext, densenet, efficientnet, maxvit, mnasnet, mobilenetv2, mobilenetv3, regnet,
                                    resnet, shufflenetv2, swin_transformer as swin, vgg)
    mb3 = [mobilenetv3.InvertedResidualConfig(8, 3, 16, 8, True, "RE", 2, 1, 1.0),
           mobilenetv3.InvertedResidualConfig(8, 3, 16, 16, False, "HS", 2, 1, 1.0)]
    mb = [efficientnet.MBConvConfig(4, 3, 2, 8, 16, 1)]
    small_swin = lambda **k: swin.SwinTransformer([2, 2], 8, [1, 1], [2, 2], [2, 2], num_classes=NC, **k)
    return {   # VGG and AlexNet keep their fixed classifiers (4096 units): the largest here
        "alexnet": ("alexnet", lambda: tvm.AlexNet(NC), 64),
        "vgg": ("vgg", lambda: vgg.VGG(vgg.make_layers([8, "M", 512, "M"], batch_norm=True), NC), 32),
        "resnet": (("resnet", "resnext", "wide_resnet"),
                   lambda: resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], NC, groups=2, width_per_group=8), 32),
        "densenet": ("densenet", lambda: densenet.DenseNet(4, (1, 1), 8, 2, num_classes=NC), 32),
        "inception": ("inception", lambda: tvm.Inception3(NC, aux_logits=False, init_weights=False), 75),
        "googlenet": ("googlenet", lambda: tvm.GoogLeNet(NC, aux_logits=False, init_weights=False), 32),
        "squeezenet": ("squeezenet", lambda: tvm.SqueezeNet("1_1", NC), 32),
        "shufflenet": ("shufflenet", lambda: shufflenetv2.ShuffleNetV2([1, 1, 1], [8, 8, 16, 16, 16], NC), 32),
        "mobilenet_v2": ("mobilenet_v2", lambda: mobilenetv2.MobileNetV2(NC, 0.25, [[1, 8, 1, 1], [2, 16, 1, 2]]), 32),
        "mobilenet_v3": ("mobilenet_v3", lambda: mobilenetv3.MobileNetV3(mb3, 32, NC), 32),
        "mnasnet": ("mnasnet", lambda: mnasnet.MNASNet(0.1, NC), 32),
        "efficientnet": ("efficientnet_b",
                         lambda: efficientnet.EfficientNet([efficientnet.MBConvConfig(1, 3, 1, 8, 8, 1), *mb], 0.0,
                                                           num_classes=NC), 32),
        "efficientnet_v2": ("efficientnet_v2",
                            lambda: efficientnet.EfficientNet([efficientnet.FusedMBConvConfig(1, 3, 1, 8, 8, 1), *mb],
                                                              0.0, num_classes=NC, last_channel=32), 32),
        "regnet": ("regnet", lambda: regnet.RegNet(regnet.BlockParams.from_init_params(2, 8, 8, 2, 8, 1.0), NC, 8), 32),
        "convnext": ("convnext", lambda: convnext.ConvNeXt([convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 1)],
                                                           num_classes=NC), 32),
        "vit": ("vit", lambda: tvm.VisionTransformer(16, 8, 1, 2, 8, 16, num_classes=NC), 16),
        "swin": (("swin_t", "swin_s", "swin_b"), small_swin, 16),
        "swin_v2": ("swin_v2", lambda: small_swin(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2), 16),
        "maxvit": ("maxvit", lambda: maxvit.MaxVit((32, 32), 8, 2, [16], [1], 8, 0.0, num_classes=NC), 32),
    }


# where the channel gate on activations is not the filter, every weight is scaled instead: torchvision's
# Swin passes qkv.weight and proj.weight to a function (the layers are never called)
SCALED = ("swin", "swin_v2")


def test_every_classifier_in_torchvision_belongs_to_a_tested_family():
    fams = families()
    for name in torchvision.models.list_models(module=torchvision.models):
        owners = [f for f, (prefixes, _, _) in fams.items() if name.startswith(prefixes)]
        assert len(owners) == 1, f"{name}: families {owners}"


def built(family):
    """The family's model, its heads drawn at random (some start at zero), BatchNorm statistics from a
    few random batches (a fresh model's make many outputs ~0), and a batch of 4 images."""
    _, make, size = families()[family]
    torch.manual_seed(0)
    model = make()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1 / math.sqrt(m.in_features))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size))
    return model.eval(), torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(families()))
def test_every_family_is_filtered_exactly(family):
    model, x = built(family)
    ref = model.requires_grad_(False)(x)
    scale = ref.abs().max().item()
    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # nothing unfiltered to warn of
        wf = WFNet(model, NC)
    assert torch.equal(wf(x), ref) and close(wf(x, forget=1), ref)   # alpha = 1: the original
    randomize(wf)
    out = wf(x, forget=1)
    assert close(out, wf.export(1)(x)) and not close(out, ref)        # the filter does something
    assert close(wf(x, forget=[0, 2]), wf.export([0, 2])(x))
    rows = torch.tensor([2, 0, 1, 2])
    each = torch.cat([wf(x[i:i + 1], forget=int(c)) for i, c in enumerate(rows)])
    assert close(wf(x, forget=rows), each)                            # a row per sample
    sets = torch.tensor([[0, 1], [2, 2], [1, 2], [0, 0]])
    each = torch.cat([wf(x[i:i + 1], forget=s.tolist()) for i, s in enumerate(sets)])
    assert close(wf(x, forget=sets), each)                            # a set per sample
    assert wf.plan == ((family not in SCALED,) * 2)      # (gates exact, one pass takes a row per sample)
    wfw = WFNet(model, NC, "weight")                                  # the same values per weight
    with torch.no_grad():
        for a, w, b in zip(wf.alpha, wfw.weights, wfw.alpha):
            b.copy_(a[:, :, None].expand(NC, *w.shape[:1], w[0].numel()).reshape(NC, -1))
    assert close(wfw(x, forget=1), out)


class StdConv2d(nn.Conv2d):
    """Weight standardization (as in BiT and NFNets): each output unit's weight is normalized in forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class PaddedConv2d(nn.Conv2d):
    """Its own forward, and still a row scale of its weight: filtered as usual."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


def test_layers_that_normalize_their_weight_are_named_and_left_unfiltered():
    net = nn.Sequential(StdConv2d(3, 4, 3), nn.ReLU(), PaddedConv2d(4, 4, 3),
                        nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3)), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(2, 3, 8, 8)
    net(x)
    with pytest.warns(UserWarning, match=r"leaves 0, 3 unfiltered: .* recomputes its weight"):
        wf = randomize(WFNet(net.eval(), 3))
    assert wf.names == ["2.weight", "5.weight"]
    assert torch.allclose(wf(x, forget=1), wf.export(1)(x), atol=1e-5) and wf.plan == (True, True)
    assert "0.weight" in WFNet(net, 3, "weight").names    # the weight filter is no row scale: kept


class WindowAttention(nn.Module):
    """Windows joined into the batch before a Linear, as window-attention models do: the layer's
    output has B * windows first, so a gate per sample cannot be laid over it."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Conv2d(3, 8, 2, 2), nn.Linear(8, 8), nn.Linear(8, NC)

    def forward(self, x):
        h = self.embed(x)                                 # (B, 8, 4, 4)
        w = h.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 4, 5, 1).reshape(-1, 4, 8)   # (B * 4, 4, 8)
        w = self.mix(w).relu()
        return self.head(w.reshape(len(x), -1, 8).mean(1))


class FunctionalUse(nn.Module):
    """A layer whose weight is read without calling it, and a layer called and also read elsewhere."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, NC)

    def forward(self, x):
        h = F.linear(x.flatten(1), self.a.weight, self.a.bias).relu()   # a: never called
        h = self.b(h).relu() + 0.1 * h @ self.b.weight.T                # b: called, and its weight read
        return self.head(h)


@pytest.mark.parametrize("net, x", [(WindowAttention(), torch.randn(4, 3, 8, 8)),
                                    (FunctionalUse(), torch.randn(4, 3, 2, 2))])
def test_weights_used_other_ways_are_filtered_as_export_folds_them(net, x):
    wf = randomize(WFNet(net.eval(), NC))
    rows = torch.tensor([2, 0, 1, 2])
    for c in range(NC):
        assert torch.allclose(wf(x, forget=c), wf.export(c)(x), atol=1e-5)
    each = torch.cat([wf.export(int(c))(x[i:i + 1]) for i, c in enumerate(rows)])
    assert torch.allclose(wf(x, forget=rows), each, atol=1e-5)
    assert wf.plan == ((False, False) if isinstance(net, FunctionalUse) else (True, False))
    logits = wf(x, forget=rows)                           # the untraining's gradient reaches every row
    torch.autograd.grad(logits.square().sum(), list(wf.alpha))
    wfnet.untrain(wf, x.repeat(8, 1, 1, 1).mul(40).add(128).clamp(0, 255).byte(), torch.arange(32) % NC,
                  dict(mean=(0.5,) * 3, std=(0.2,) * 3, pad=0, flip=False), steps=2, batch_size=16, lambda2=0, progress=False)
