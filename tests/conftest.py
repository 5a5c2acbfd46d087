"""Shared test helpers: tiny models, and synthetic images written in torchvision's on-disk layout."""
import struct, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "notebooks" / "experiments")]
import wfnet  # noqa: E402

torch.set_num_threads(2)

# a tiny, fast command line: width 4, one epoch, batch 32, on MNIST-format files
FAST = ["--width", "4", "--epochs", "1", "--untrain-steps", "9", "--batch-size", "32",
        "--untrain-batch-size", "32", "--no-progress", "--dataset", "mnist"]


def synthetic_images(n, nc=10, seed=0, size=28):
    """Class k: a bright 6x6 square at a class-specific place, plus noise. uint8 (n,1,28,28)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % nc
    x = torch.rand(n, 1, size, size, generator=g) * 60
    for i in range(n):
        r, c = divmod(int(y[i]), 4)
        x[i, 0, 2 + 8 * r:8 + 8 * r, 2 + 6 * c:8 + 6 * c] += 150
    return x.clamp(0, 255).to(torch.uint8), y


def write_idx(path, array):
    """An idx file (the MNIST format): a big-endian header, then the uint8 array."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    Path(path).write_bytes(header + array.tobytes())


def write_mnist_like(root, folder, n_train, n_test, seed=0):
    """torchvision's layout, <root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x, y = synthetic_images(n, seed=seed + (split == "test"))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[:, 0].numpy())
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y.numpy())
        data[split] = (x, y)
    return data


@pytest.fixture
def mnist(tmp_path):
    """make(n_train, n_test): synthetic MNIST files under tmp_path/data; returns the flags of a
    fast run on them, with --out tmp_path/o."""
    def make(n_train=300, n_test=100):
        write_mnist_like(tmp_path / "data", "MNIST", n_train, n_test)
        return FAST + ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o")]
    return make


class WithAttention(nn.Module):
    """Tokens -> nn.MultiheadAttention (sequence first, biases) -> mean -> head."""

    def __init__(self, nc=5, dim=8):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.attention = nn.MultiheadAttention(dim, 2)
        self.head = nn.Linear(dim, nc)

    def forward(self, x):                                 # (B, L, 4)
        h = self.embed(x).transpose(0, 1)                 # (L, B, D)
        h, _ = self.attention(h, h, h, need_weights=False)
        return self.head(h.mean(0))


def tiny_models():
    """Every kind of model the wrapper must filter the same way in every path, with inputs."""
    import torchvision
    torch.manual_seed(0)
    x28 = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    tv_vit = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=2, num_heads=2,
                                                  hidden_dim=8, mlp_dim=16, num_classes=5)
    vit = wfnet.model_from_config(dict(arch="vit", num_classes=5, in_channels=1, image_size=28, width=32), "cpu")
    for m in (tv_vit, vit):
        nn.init.normal_(m.heads.head.weight)              # torchvision starts the head at zero
    from torchvision.models.resnet import BasicBlock, ResNet
    tv_resnet = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)   # torchvision's ResNet, one block per stage
    return {"resnet18": (wfnet.ResNet18(5, 1, width=4), x28),
            "torchvision_resnet": (tv_resnet, torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))),
            "vit": (vit, x28),
            "small": (nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 26 * 26, 5)), x28),
            "attention": (WithAttention(), torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(3))),
            "torchvision_vit": (tv_vit, torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(4)))}


def tiny(arch):
    model, x = tiny_models()[arch]
    return randomize_bn(model.eval()), x


def randomize(wf, seed=0):
    """Every alpha entry uniform in [0, 1]: an equivalence at alpha = 1 proves nothing."""
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


def own_class_rows(net, nc=4):
    """A WFNet over one_hot_net whose row c switches off hidden unit c: it forgets exactly class c."""
    wf = wfnet.WFNet(net, nc)
    with torch.no_grad():
        for c in range(nc):
            wf.alpha[0][c, c] = 0
    return wf
