"""
wfnet.py: WF-Net, multi-class unlearning by weight filtering, in one file.

Reference implementation of Poppi et al., "Multi-Class Explainable Unlearning for Image
Classification via Weight Filtering" (arXiv 2304.02049). A trained classifier is frozen;
every Conv2d and Linear layer l gets a memory matrix alpha_l of shape (N_c, K_l). Row c
multiplies the layer's weights. After ONE untraining round, running the network with row c
of every alpha makes it behave as if class c had never been learned, for any c.

    python wfnet.py                                   # quick Fashion-MNIST run, 2-core CPU
    python wfnet.py --dataset cifar10 --device cuda   # the whole pipeline on a GPU
    python wfnet.py --seeds 0 1 2                     # once per seed: mean and std of every figure

The file reads in the order of the idea: data -> backbones -> weight filtering -> untraining
-> metrics -> explanations (plots) -> command line. Two kinds of comments: teaching comments
(full sentences tying code to the paper) and functional comments (terse, tensor shapes).
Where the paper is silent, the choice made here is marked "CHOICE:".
Measured results (command, machine, time) are in README.md.
"""
import argparse, contextlib, copy, gzip, itertools, json, math, os, pickle, platform, statistics, struct, sys, time
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange

# -----------------------------------------------------------------------------
# defaults: "quick" finishes on a 2-core CPU; "full" is the paper-scale GPU run.
# Every value can be overridden from the command line (--epochs 15, --lambda1 2, ...).

COMMON = dict(dataset="fashion-mnist", arch="resnet18", batch_size=128,
              untrain_batch_size=128, T=4,
              lambda0=3.0, lambda1=1.0, lambda2=1.0, granularity="channel", combine="min",
              explain_samples=100, seed=0, data_dir="data", out=None, device="auto", compile=False)
PRESETS = {
    "quick": dict(epochs=3, augment=False, untrain_epochs=0.8, untrain_lr=0.05, eval_train=10000),
    "full": dict(epochs=30, augment=True, untrain_epochs=5, untrain_lr=0.01, eval_train=0),
}
ARCHS = {  # per backbone: optimizer of the original model; width (and stem stride) as (quick, full)
    "resnet18": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4, width=(16, 64), stem_stride=(2, 1)),
    "vit": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, width=(64, 256)),
}
EPS = 1e-2  # guard of the 1/CE forget term: 1 / (CE + EPS) stays finite, gradient stays alive


class WFError(Exception):
    """A user error: printed as one line by the command line, exit status 2."""

# -----------------------------------------------------------------------------
# data: each split is loaded once into uint8 tensors that live on the device;
# normalization and augmentation (random crop with padding, flip) run batched there.

DATASETS = {
    "mnist": dict(folder="MNIST", tv="MNIST", classes=10, mean=(0.1307,), std=(0.3081,),
                  pad=2, flip=False, names=[str(i) for i in range(10)]),
    "fashion-mnist": dict(folder="FashionMNIST", tv="FashionMNIST", classes=10, mean=(0.2860,),
                          std=(0.3530,), pad=2, flip=True,
                          names=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                 "Shirt", "Sneaker", "Bag", "Ankle boot"]),
    "cifar10": dict(folder="cifar-10-batches-py", tv="CIFAR10", classes=10,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), pad=4, flip=True,
                    names=["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                           "ship", "truck"]),
    "cifar100": dict(folder="cifar-100-python", tv="CIFAR100", classes=100,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), pad=4, flip=True,
                     names=[str(i) for i in range(100)]),
}
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path):
    """Read an idx file (MNIST format, optionally .gz) into a uint8 tensor."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    if zero != 0 or dtype != 0x08 or len(data) != 4 + 4 * ndim + math.prod(dims):
        raise WFError(f"{path} is not a valid uint8 idx file")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(dims)


def _find_idx(dirs):
    """Return {split: (images, labels) paths} from the first folder that holds all four files."""
    for d in dirs:
        found = {}
        for split, stems in IDX_FILES.items():
            paths = [next((p for p in (d / s, d / (s + ".gz")) if p.exists()), None) for s in stems]
            if None not in paths:
                found[split] = paths
        if len(found) == 2:
            return found
    return None


def _load_idx_dataset(name, spec, data_dir):
    dirs = [data_dir / spec["folder"] / "raw", data_dir / spec["folder"]]
    if name == "fashion-mnist":
        dirs.append(Path(DEBIAN_FASHION))
    found = _find_idx(dirs)
    if found is None:
        _download(name, spec, data_dir, dirs)
        found = _find_idx(dirs)
    if found is None:
        raise WFError(f"{name}: the download finished, but its files are not in {dirs[0]}")
    out = {}
    for split, (images, labels) in found.items():
        out[split] = (_read_idx(images).unsqueeze(1), _read_idx(labels).long())  # (N,1,28,28), (N,)
    return out


def _load_cifar(name, spec, data_dir):
    folder = data_dir / spec["folder"]
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    if name == "cifar100":
        files = {"train": ["train"], "test": ["test"]}
    if not all((folder / f).exists() for fs in files.values() for f in fs):
        _download(name, spec, data_dir, [folder])
    out = {}
    for split, fs in files.items():
        xs, ys = [], []
        for f in fs:
            with open(folder / f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")  # torchvision's on-disk format
            xs.append(torch.tensor(d[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32))
            ys.append(torch.tensor(d[b"labels" if name == "cifar10" else b"fine_labels"]))
        out[split] = (torch.cat(xs), torch.cat(ys).long())
    return out


def _download(name, spec, data_dir, tried):
    import torchvision
    try:
        for train in (True, False):
            getattr(torchvision.datasets, spec["tv"])(str(data_dir), train=train, download=True)
    except Exception as e:
        where = ", ".join(str(d) for d in tried)
        hint = " or run `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else ""
        raise WFError(f"{name} not found in {where} and the download failed ({type(e).__name__}); "
                      f"put torchvision's files under --data-dir{hint}") from None


def load_dataset(name, data_dir="data", device="cpu"):
    """Return dict(train=(x, y), test=(x, y), spec=...): x uint8 (N,C,H,W), y int64, on device."""
    if name not in DATASETS:
        raise WFError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    spec, data_dir = DATASETS[name], Path(data_dir)
    load = _load_cifar if name.startswith("cifar") else _load_idx_dataset
    try:
        splits = load(name, spec, data_dir)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, RuntimeError, struct.error) as e:
        raise WFError(f"could not read {name} from {data_dir}: {e}") from None
    out = {k: (x.to(device), y.to(device)) for k, (x, y) in splits.items()}
    out["spec"] = spec
    return out


def transform(x, spec, augment=False, gen=None):
    """uint8 (B,C,H,W) -> normalized float, channels_last; with augment: random crop and flip."""
    x = x.float().div_(255)
    if augment:
        B, C, H, W = x.shape
        p = spec["pad"]
        x = F.pad(x, (p, p, p, p))
        dy, dx = (torch.randint(0, 2 * p + 1, (2, B), generator=gen).to(x.device))
        rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (B,1,H,1)
        cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # (B,1,1,W)
        x = x[torch.arange(B, device=x.device)[:, None, None, None],
              torch.arange(C, device=x.device)[None, :, None, None], rows, cols]  # (B,C,H,W)
        if spec["flip"]:
            flip = (torch.rand(B, generator=gen) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
    mean = torch.tensor(spec["mean"], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

# -----------------------------------------------------------------------------
# backbones: ResNet-18 with a 3x3 stem and no max-pool for 28/32 px (stride 1: the CIFAR stem;
# stride 2, used by the quick preset: 4x fewer operations, stage 1 at half resolution), and a
# small Vision Transformer. Both use only Conv2d/Linear for their weights, so WF-Net filters
# everything (ViT: patch embedding, qkv, proj, MLP, head).

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes, in_channels=3, width=64, stem_stride=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for i, stride in enumerate([1, 2, 2, 2]):
            cout = width * 2 ** i
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))                     # (B, 8w, H/8s, W/8s), s = stem stride
        return self.fc(x.mean(dim=(2, 3)))                # (B, N_c)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                 # (B, N, D)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)     # (B, h, N, D/h)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=2):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, num_classes, in_channels=3, image_size=32, width=128, depth=6, patch=4):
        super().__init__()
        n = (image_size // patch) ** 2
        self.patches = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch),
            nn.Linear(patch * patch * in_channels, width))  # (B, n, D)
        self.pos = nn.Parameter(torch.randn(1, n, width) * 0.02)
        self.blocks = nn.Sequential(*[Block(width, max(1, width // 32)) for _ in range(depth)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.blocks(self.patches(x) + self.pos)       # (B, n, D)
        return self.head(self.ln(x).mean(dim=1))          # (B, N_c), mean-pooled tokens


def build_model(arch, num_classes, in_channels, image_size, width, stem_stride=1):
    if arch == "resnet18":
        return ResNet18(num_classes, in_channels, width, stem_stride)
    if arch == "vit":
        return ViT(num_classes, in_channels, image_size, width)
    raise WFError(f"unknown arch {arch!r}; choose resnet18 or vit")

# -----------------------------------------------------------------------------
# weight filtering: the memory matrices. For a layer y = W x + b, alpha_l[c] multiplies W.
# CHOICE (granularity): "channel" (default) keeps one alpha per output unit (conv kernel,
# linear row), K_l = out channels; "weight" keeps one per weight, K_l = W.numel(), the literal
# "point-wise" reading. Scaling row k of W by a_k equals scaling the pre-bias output k by a_k,
# so the channel gate is applied to activations: (W x) * a + b = y * a + b * (1 - a). That
# makes a batch where every sample forgets a different class ONE forward pass.
# CHOICE (parametrization): alpha is a plain tensor initialized at 1 (= the original model
# exactly) and projected back into [0, 1] after each optimizer step. The forward pass uses
# it unclamped, so its gradient is alive at the start (clamp() in the forward would pass no
# gradient at alpha = 1, and untraining would silently do nothing).
# CHOICE (a set of classes): forget=[3, 5] runs with the element-wise MINIMUM of rows 3 and 5
# (combine="min"): each component is turned down as far as the most demanding class asks, no
# further. For rows of 0s and 1s it equals the product (applying one filter after the other);
# on the partial values the untraining leaves (35% of alpha lies between 0.01 and 0.99) the
# product compounds (0.8 * 0.8 = 0.64) and costs the retained classes more: see README.md.
# min is also idempotent, so forget=[3, 3] is forget=3.

def _gate(a, module, inputs, y):
    """Forward hook: rescale the output units of a Conv2d/Linear by the gate a, (K,) or (B, K)."""
    if isinstance(module, nn.Conv2d):
        a = a[..., None, None]                            # (.., K, 1, 1) against (B, K, H, W)
        b = module.bias[:, None, None] if module.bias is not None else None
    else:
        if a.dim() == 2:                                  # (B, K) against (B, ..., K)
            a = a.view(a.shape[0], *[1] * (y.dim() - 2), a.shape[1])
        b = module.bias
    return y * a if b is None else y * a + b * (1 - a)


class WFNet(nn.Module):
    """Wrap any classifier: freeze it and add one memory matrix per Conv2d and Linear layer.

    wf(x) or wf(x, forget=None): the wrapped model's outputs, unchanged.
    wf(x, forget=c): run with row c of every alpha.
    wf(x, forget=[3, 5]): forget a set of classes; the rows are combined by `combine`.
    wf(x, forget=t): per sample, t a LongTensor of shape (B,) (one class each) or (B, S) (a set each).
    wf.export(forget=c or [3, 5]): a plain copy of the model with the row(s) folded into its weights.
    Layers are found with model.named_modules(); nn.MultiheadAttention's internal
    projections are not Linear modules and are left unfiltered.
    """

    def __init__(self, model, num_classes, granularity="channel", combine="min"):
        super().__init__()
        if granularity not in ("channel", "weight"):
            raise ValueError(f"granularity must be 'channel' or 'weight', not {granularity!r}")
        if combine not in ("min", "product"):
            raise ValueError(f"combine must be 'min' or 'product', not {combine!r}")
        self.model = model.eval().requires_grad_(False)
        self.num_classes, self.granularity, self.combine = num_classes, granularity, combine
        self.names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.layers = [model.get_submodule(n) for n in self.names]  # plain list: not re-registered
        sizes = [m.weight.shape[0] if granularity == "channel" else m.weight.numel()
                 for m in self.layers]
        self.alpha = nn.ParameterList(
            [nn.Parameter(torch.ones(num_classes, k, device=m.weight.device))
             for k, m in zip(sizes, self.layers)])        # alpha_l: (N_c, K_l)

    def train(self, mode=True):
        super().train(mode)
        self.model.eval()  # the backbone stays frozen: BatchNorm uses its running statistics
        return self

    def _rows(self, forget, batch):
        """forget -> a LongTensor of classes: (S,) one set for the batch, or (B, S) per sample."""
        if isinstance(forget, torch.Tensor) and forget.dim() in (1, 2):
            rows = forget if forget.dim() == 2 else forget[:, None]
            if rows.shape[0] != batch:
                raise ValueError(f"forget has {rows.shape[0]} entries for a batch of {batch}")
        elif isinstance(forget, (list, tuple, set, range)):
            rows = torch.tensor(sorted(set(int(c) for c in forget)), dtype=torch.long)
            if len(rows) == 0:
                raise ValueError("forget is an empty set of classes")
        else:
            rows = torch.tensor([int(forget)])
        bad = (rows < 0) | (rows >= self.num_classes)
        if bad.any():
            raise ValueError(f"forget class {int(rows[bad][0])} out of range "
                             f"0..{self.num_classes - 1}")
        return rows.to(self.alpha[0].device)

    def gates(self, rows):
        """Per layer, the gate that forgets the classes in `rows`: alpha_l[rows] combined over
        the set, (K_l,) for rows (S,) or (B, K_l) for rows (B, S)."""
        if rows.shape[-1] == 1:
            return [a[rows[..., 0]] for a in self.alpha]
        if self.combine == "min":
            return [a[rows].amin(-2) for a in self.alpha]
        return [a[rows].prod(-2) for a in self.alpha]

    def forward(self, x, forget=None):
        if forget is None:
            return self.model(x)
        rows = self._rows(forget, x.shape[0])
        if rows.dim() == 1 or self.granularity == "channel":
            return self.gated(x, self.gates(rows))
        # weight granularity, one set per sample: one pass per distinct set, then restore the order
        sets, inverse = rows.unique(dim=0, return_inverse=True)
        groups = [(inverse == i).nonzero().squeeze(1) for i in range(len(sets))]
        outs = [self.gated(x[idx], self.gates(s)) for idx, s in zip(groups, sets)]
        return torch.cat(outs)[torch.cat(groups).argsort()]

    def gated(self, x, gates):
        """Run the frozen model with any per-layer gates (one value per component, in [0, 1])."""
        if self.granularity == "weight":
            # .contiguous(): with a channels_last weight, the backward pass of this product
            # corrupted the heap (torch 2.14.1, CPU) within a few untraining steps
            weights = {f"{n}.weight": (m.weight * g.view_as(m.weight)).contiguous()
                       for n, m, g in zip(self.names, self.layers, gates)}
            return torch.func.functional_call(self.model, weights, (x,))
        handles = [m.register_forward_hook(partial(_gate, g)) for m, g in zip(self.layers, gates)]
        try:
            return self.model(x)
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def export(self, forget):
        """A plain copy of the wrapped model with the row(s) of `forget` folded into its weights."""
        if isinstance(forget, torch.Tensor) and forget.dim() > 0:
            raise ValueError("export takes one class or a list of classes, not a per-sample tensor")
        model = copy.deepcopy(self.model).requires_grad_(True)
        for n, g in zip(self.names, self.gates(self._rows(forget, None))):
            w = model.get_submodule(n).weight
            w.mul_(g.view(-1, *[1] * (w.dim() - 1)) if self.granularity == "channel"
                   else g.view_as(w))
        return model

# -----------------------------------------------------------------------------
# untraining: only alpha is trained. Each mini-batch of size B holds B/2 forget samples, each
# run with the alpha row of its own label, and B/2 retain samples, each repeated T times
# with a random row c != its label (label expansion, (T, B/2)). The loss is
#     L = lambda0 * CE(retain) + lambda1 * 1 / CE(forget) + lambda2 * mean(1 - alpha)
# both data terms averaged over their samples. Channel granularity runs all 2.5 B (T = 4)
# samples in one forward pass.

def wfnet_loss(logits_f, y_f, logits_r, y_r, alpha, lambda0=1.0, lambda1=1.0, lambda2=1.0):
    """The paper's loss. Returns (L, L_r, L_f, R); logits_r/y_r are already T-expanded."""
    L_r = F.cross_entropy(logits_r, y_r)
    ce_f = F.cross_entropy(logits_f, y_f, reduction="none")
    L_f = (1 / (ce_f + EPS)).mean()                       # inverted CE, guarded against CE ~ 0
    R = torch.cat([(1 - a).flatten() for a in alpha]).mean()
    return lambda0 * L_r + lambda1 * L_f + lambda2 * R, L_r, L_f, R


def untrain_steps(n, epochs, batch_size):
    """Optimizer steps of an untraining over n samples; epochs may be fractional (0.8)."""
    return max(1, round(epochs * (n // batch_size)))


def untrain(wf, x, y, spec, epochs=1, batch_size=128, T=4, lr=1e-2, lambda0=1.0, lambda1=1.0,
            lambda2=1.0, seed=0, autocast=contextlib.nullcontext, progress=True):
    """Train the memory matrices of `wf` for all classes in one round. Returns the history."""
    from tqdm import tqdm
    gen = torch.Generator().manual_seed(seed)
    n, half, nc = len(x), batch_size // 2, wf.num_classes
    steps = untrain_steps(n, epochs, batch_size)
    opt = torch.optim.Adam(wf.alpha.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)  # linear decay to 0
    history, skipped, perm = [], 0, torch.empty(0, dtype=torch.long)
    wf.train()
    bar = tqdm(range(steps), desc="untrain", disable=not progress, mininterval=2)
    for step in bar:
        if len(perm) < batch_size:
            perm = torch.randperm(n, generator=gen)
        idx, perm = perm[:batch_size].to(x.device), perm[batch_size:]
        xb, yb = transform(x[idx], spec, augment=True, gen=gen), y[idx]
        xf, yf, xr, yr = xb[:half], yb[:half], xb[half:], yb[half:]
        shift = torch.randint(1, nc, (T, len(yr)), generator=gen).to(yr.device)
        cr = (yr + shift) % nc                            # (T, B/2): a random row != label
        inputs = torch.cat([xf, xr.repeat(T, 1, 1, 1)])   # (B/2 + T*B/2, C, H, W)
        rows = torch.cat([yf, cr.flatten()])
        with autocast():
            logits = wf(inputs, forget=rows).float()
        loss, L_r, L_f, R = wfnet_loss(logits[:half], yf, logits[half:], yr.repeat(T), wf.alpha,
                                       lambda0, lambda1, lambda2)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            skipped += 1                                  # never let inf/NaN reach alpha
            continue
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for a in wf.alpha:
                a.clamp_(0, 1)                            # projection back into [0, 1]
        history.append((L_r.item(), L_f.item(), R.item()))
        bar.set_postfix(L_r=f"{L_r.item():.3f}", L_f=f"{L_f.item():.3f}", R=f"{R.item():.4f}",
                        refresh=False)
    wf.eval()
    return dict(history=history, skipped_steps=skipped, steps=steps)

# -----------------------------------------------------------------------------
# training the original model: SGD with Nesterov momentum, one-cycle learning rate
# (linear warm-up for 20% of the steps, then linear decay), weight decay, batched
# on-device augmentation.

def train_original(model, x, y, spec, epochs, batch_size=128, lr=0.1, weight_decay=5e-4, seed=0,
                   autocast=contextlib.nullcontext, progress=True, optimizer="sgd", augment=True):
    from tqdm import tqdm
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x) // batch_size)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0)]
    if optimizer == "adamw":                              # the usual choice for ViTs
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    warm = max(1, int(0.2 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warm if s < warm else max(0.0, (steps - s) / (steps - warm)))
    model.train()
    bar = tqdm(total=steps, desc="train", disable=not progress, mininterval=2)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size].to(x.device)
            xb = transform(x[idx], spec, augment, gen)
            with autocast():
                loss = F.cross_entropy(model(xb).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()

# -----------------------------------------------------------------------------
# metrics. From the ONE untrained checkpoint, for every class c: Acc_f(c) (class-c samples,
# row c active; goal ~0) and Acc_r(c) (all other samples, row c active; goal = original),
# on test and train, plus the N_c x N_c matrix (forget c x true class).
# ZRF (Chundawat et al. 2023): 1 - mean_i JS(M(x_i) || T_d(x_i)) over forget samples, T_d
# the same architecture at random init. Textbook JS, natural log, per sample:
# JS(P, Q) = 0.5 KL(P || m) + 0.5 KL(Q || m), m = (P + Q) / 2, so ZRF lies in [1 - ln 2, 1].
# MIA-efficacy (SalUn protocol): an SVC (rbf, C=3) on the true-label softmax confidence,
# fit on retain-train (members) vs test (non-members); efficacy = fraction of forget-train
# samples judged NON-members. Higher is better.

@torch.no_grad()
def predict(net, x, spec, forget=None, gates=None, batch_size=1000, autocast=contextlib.nullcontext):
    """Softmax probabilities (N, N_c) on uint8 x: of `net`, or of a WFNet forgetting `forget`
    (or run with explicit per-layer `gates`, see WFNet.gated)."""
    out = []
    for i in range(0, len(x), batch_size):
        xb = transform(x[i:i + batch_size], spec)
        with autocast():
            if gates is not None:
                logits = net.gated(xb, gates)
            else:
                logits = net(xb) if forget is None else net(xb, forget=forget)
        out.append(logits.float().softmax(-1))
    return torch.cat(out)


def js_divergence(p, q):
    """Per-sample Jensen-Shannon divergence (natural log) between rows of p and q: (N,)."""
    m = (p + q) / 2
    kl = lambda a, b: (a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum(-1)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def zrf_score(p_model, p_random):
    """ZRF = 1 - mean JS(model || randomly initialized model) over forget samples."""
    return 1 - js_divergence(p_model, p_random).mean().item()


def mia_efficacy(conf_members, conf_nonmembers, conf_forget, seed=0, max_fit=3000):
    """Fraction of forget samples an SVC (fit members vs non-members) calls non-members."""
    from sklearn.svm import SVC
    g = torch.Generator().manual_seed(seed)
    k = min(len(conf_members), len(conf_nonmembers), max_fit)
    mem = conf_members[torch.randperm(len(conf_members), generator=g)[:k]]
    non = conf_nonmembers[torch.randperm(len(conf_nonmembers), generator=g)[:k]]
    X = torch.cat([mem, non]).double().view(-1, 1).numpy()
    labels = [1] * k + [0] * k
    svc = SVC(C=3, kernel="rbf", gamma="auto").fit(X, labels)
    return float((svc.predict(conf_forget.double().view(-1, 1).numpy()) == 0).mean())


def evaluate(wf, data, random_model=None, eval_train=10000, seed=0, batch_size=1000,
             autocast=contextlib.nullcontext, forgotten=None, classes=None):
    """Every metric of the ONE WFNet, for every class c (or for `classes`). Returns a
    JSON-ready dict. For another method, wf is the original model and forgotten(c) the model
    that forgot class c."""
    spec = data["spec"]
    nc, classes = spec["classes"], range(spec["classes"]) if classes is None else classes
    forgotten = forgotten or (lambda c: partial(wf, forget=c))
    x_te, y_te = data["test"]
    x_tr, y_tr = data["train"]
    if eval_train and eval_train < len(x_tr):  # a fixed random subset keeps CPU runs short
        keep = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(seed))
        keep = keep[:eval_train].to(x_tr.device)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    run = partial(predict, spec=spec, batch_size=batch_size, autocast=autocast)
    orig_te, orig_tr = run(wf, x_te), run(wf, x_tr)
    rand_te = run(random_model, x_te) if random_model is not None else None
    ok_orig_te, ok_orig_tr = orig_te.argmax(-1) == y_te, orig_tr.argmax(-1) == y_tr
    matrix, rows = torch.full((nc, nc), float("nan")), []
    for c in classes:
        net = forgotten(c)
        p_te, p_tr = run(net, x_te), run(net, x_tr)
        ok_te, ok_tr = p_te.argmax(-1) == y_te, p_tr.argmax(-1) == y_tr
        f_te, f_tr = y_te == c, y_tr == c
        for k in range(nc):
            matrix[c, k] = ok_te[y_te == k].float().mean()
        conf_tr = p_tr.gather(1, y_tr[:, None]).squeeze(1).cpu()
        conf_te = p_te.gather(1, y_te[:, None]).squeeze(1).cpu()
        row = dict(cls=c, acc_f_test=_acc(ok_te[f_te]), acc_r_test=_acc(ok_te[~f_te]),
                   orig_acc_r_test=_acc(ok_orig_te[~f_te]), acc_f_train=_acc(ok_tr[f_tr]),
                   acc_r_train=_acc(ok_tr[~f_tr]), orig_acc_r_train=_acc(ok_orig_tr[~f_tr]),
                   mia_efficacy=mia_efficacy(conf_tr[~f_tr.cpu()], conf_te[~f_te.cpu()],
                                             conf_tr[f_tr.cpu()], seed))
        if rand_te is not None:
            row["zrf"] = zrf_score(p_te[f_te], rand_te[f_te])
        rows.append(row)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "cls"}
    for split in ("test", "train"):
        mean[f"acc_r_drop_{split}"] = mean[f"orig_acc_r_{split}"] - mean[f"acc_r_{split}"]
    per_class_orig = [_acc(ok_orig_te[y_te == k]) for k in range(nc)]
    return dict(original=dict(test_acc=_acc(ok_orig_te), train_acc=_acc(ok_orig_tr),
                              per_class_test_acc=per_class_orig,
                              confusion_test=_confusion(y_te, orig_te.argmax(-1), nc).tolist()),
                per_class=rows, mean=mean, matrix_test=(100 * matrix).tolist(),
                eval_train_samples=len(x_tr))


def _acc(ok):
    return 100.0 * ok.float().mean().item() if len(ok) else float("nan")


def _confusion(y, pred, nc):
    """(N_c, N_c): % of the samples of true class i (row) predicted as class j."""
    counts = torch.zeros(nc, nc).index_put_((y.cpu(), pred.cpu()), torch.ones(len(y)),
                                            accumulate=True)
    return 100 * counts / counts.sum(1, keepdim=True).clamp_min(1)

# -----------------------------------------------------------------------------
# explanations: row c of every alpha names the components class c depends on ("explainable by
# design"). Three readings of it, each written as numbers (results.json) and a picture:
# - per layer, alpha as a classes x components heatmap and the fraction each class switches off;
# - class-class similarity of the alpha rows, beside the original model's confusion matrix;
# - deletion / insertion curves: in the original model switch components off in order of
#   1 - alpha[c] (deletion), or restore them in that order into the model filtered by row c
#   (insertion), tracking class-c and other-class accuracy, each beside a random order.
# And one step past the paper: forgetting a SET of classes by combining their rows.
# CHOICE (components): all filtered components of all layers are ranked together; ties in
# alpha are broken at random. The curves run from 0 to `max_fraction` of all components, and
# their area is the mean accuracy over that range (%), by the trapezoid rule.

def alpha_summary(wf, threshold=0.5):
    """Per layer: mean alpha and the fraction of components each class switches off (< 0.5)."""
    return [dict(layer=n, mean_alpha=a.mean().item(),
                 frac_off=(a < threshold).float().mean(1).tolist())
            for n, a in zip(wf.names, wf.alpha)]


def class_similarity(wf, confusion):
    """Cosine similarity of the classes' switched-off vectors (1 - alpha over all layers), and
    its correlation with the symmetrized confusion of the original model over class pairs."""
    off = torch.cat([(1 - a.detach().float()).cpu() for a in wf.alpha], 1)   # (N_c, sum K_l)
    unit = off / off.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = unit @ unit.T                                   # (N_c, N_c)
    conf = torch.as_tensor(confusion, dtype=torch.float)
    conf = (conf + conf.T) / 2                            # how often i and j are mistaken for each other
    i, j = torch.triu_indices(len(sim), len(sim), 1)
    a, b = sim[i, j], conf[i, j]
    rank = lambda v: v.argsort().argsort().float()
    return dict(similarity=sim.tolist(), pearson=_pearson(a, b), spearman=_pearson(rank(a), rank(b)))


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm()).clamp_min(1e-12)).item()


def _subset(y, per_class, seed):
    """Indices of `per_class` samples of every class (all samples if per_class is 0)."""
    if not per_class:
        return torch.arange(len(y), device=y.device)
    g = torch.Generator().manual_seed(seed)
    idx = [(y == k).nonzero().squeeze(1).cpu() for k in y.unique().tolist()]
    return torch.cat([i[torch.randperm(len(i), generator=g)[:per_class]] for i in idx]).to(y.device)


def deletion_insertion(wf, x, y, spec, c, max_fraction=0.1, points=6, seed=0,
                       batch_size=1000, autocast=contextlib.nullcontext):
    """Deletion and insertion curves of class c, in alpha order and in a random order."""
    sizes = [a.shape[1] for a in wf.alpha]
    row = torch.cat([a[c].detach() for a in wf.alpha])    # (K,) all components, all layers
    g = torch.Generator().manual_seed(seed + c)
    perm = torch.randperm(len(row), generator=g).to(row.device)
    orders = dict(alpha=perm[(1 - row[perm]).argsort(descending=True, stable=True)],
                  random=torch.randperm(len(row), generator=g).to(row.device))
    ks = [round(f * len(row)) for f in torch.linspace(0, max_fraction, points).tolist()]

    def acc(gate):                                        # (accuracy on class c, on the others), %
        ok = predict(wf, x, spec, gates=gate.split(sizes), batch_size=batch_size,
                     autocast=autocast).argmax(-1) == y
        return _acc(ok[y == c]), _acc(ok[y != c])

    out = dict(fraction=[k / len(row) for k in ks])
    for curve, start, value in (("deletion", torch.ones_like(row), 0.0), ("insertion", row, 1.0)):
        first = acc(start)                                # k = 0 is the same for both orders
        for name, order in orders.items():
            accs = [first]
            for k in ks[1:]:
                gate = start.clone()
                gate[order[:k]] = value                   # switch off (deletion) / restore (insertion)
                accs.append(acc(gate))
            acc_c, acc_o = zip(*accs)
            out[f"{curve}_{name}"] = dict(acc_c=list(acc_c), acc_other=list(acc_o),
                                          auc_c=_auc(out["fraction"], acc_c),
                                          auc_other=_auc(out["fraction"], acc_o))
    return out


def _auc(xs, ys):
    """Area under ys(xs) over the range of xs, by the trapezoid rule: a mean accuracy in %."""
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
    return area / (xs[-1] - xs[0])


def evaluate_sets(wf, x, y, spec, sets, batch_size=1000, autocast=contextlib.nullcontext):
    """Forget each set of classes at once: Acc_f over all its classes, Acc_r over the rest."""
    run = partial(predict, spec=spec, batch_size=batch_size, autocast=autocast)
    ok_orig = run(wf, x).argmax(-1) == y
    rows = []
    for s in sets:
        ok = run(wf, x, forget=list(s)).argmax(-1) == y
        f = torch.isin(y, torch.tensor(list(s), device=y.device))
        rows.append(dict(classes=list(s), acc_f=_acc(ok[f]), acc_r=_acc(ok[~f]),
                         orig_acc_r=_acc(ok_orig[~f])))
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("acc_f", "acc_r", "orig_acc_r")}
    mean["acc_r_drop"] = mean["orig_acc_r"] - mean["acc_r"]
    return dict(rule=wf.combine, samples=len(y), per_set=rows, mean=mean)


def explain(wf, data, confusion=None, per_class=100, max_pairs=45, max_fraction=0.1, seed=0,
            batch_size=1000, autocast=contextlib.nullcontext):
    """Every explanation of a trained WFNet, and the pairs of classes forgotten at once, on
    `per_class` test samples of every class (0 = the whole test set). JSON-ready. `confusion`
    is the original model's (evaluate()["original"]["confusion_test"]); None computes it."""
    spec, nc = data["spec"], wf.num_classes
    x, y = data["test"]
    if confusion is None:
        confusion = _confusion(y, predict(wf, x, spec, batch_size=batch_size,
                                          autocast=autocast).argmax(-1), nc)
    keep = _subset(y, per_class, seed)
    x, y = x[keep], y[keep]
    curves = [deletion_insertion(wf, x, y, spec, c, max_fraction, seed=seed, batch_size=batch_size,
                                 autocast=autocast) for c in range(nc)]
    pairs = list(itertools.combinations(range(nc), 2))
    if len(pairs) > max_pairs:                            # e.g. CIFAR-100: a random subset of pairs
        g = torch.Generator().manual_seed(seed)
        pairs = [pairs[i] for i in sorted(torch.randperm(len(pairs), generator=g)[:max_pairs].tolist())]
    wins = sum(r["deletion_alpha"]["auc_c"] < r["deletion_random"]["auc_c"] for r in curves)
    holds = sum(r["deletion_alpha"]["auc_other"] > r["deletion_alpha"]["auc_c"] for r in curves)
    return dict(samples=len(y), alpha=alpha_summary(wf), **class_similarity(wf, confusion),
                curves=curves, deletion_alpha_beats_random=wins, deletion_others_hold=holds,
                pairs=evaluate_sets(wf, x, y, spec, pairs, batch_size, autocast))


def _sorted_columns(a):
    """Order components by the class that switches them off most, then by how far: the
    components each class owns form a block; those no class touches (alpha >= 0.99) go last."""
    low, who = a.min(0)
    who = torch.where(low < 0.99, who, len(a))
    return a[:, (who * 2 + low).argsort()]


def save_plots(wf, results, out, names):
    """matrix.png, alpha.png, and with explanations frac_off.png, similarity.png, curves.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nc, ex = wf.num_classes, results.get("explain")
    labels = names if nc <= 20 else None
    fig, ax = plt.subplots(figsize=(7, 6))
    _heatmap(ax, results["matrix_test"], labels, labels, "test accuracy (%) per forgotten class "
             "(row c of alpha) x true class", annotate=True, vmin=0, vmax=100)
    _savefig(fig, out / "matrix.png")

    cols = math.ceil(math.sqrt(len(wf.alpha)))
    fig, axes = plt.subplots(math.ceil(len(wf.alpha) / cols), cols, figsize=(3 * cols, 2 * cols),
                             squeeze=False)
    for ax, n, a in zip(axes.flat, wf.names, wf.alpha):
        a = _sorted_columns(a.detach().float().cpu())     # (N_c, K_l)
        ax.imshow(a.numpy(), aspect="auto", vmin=0, vmax=1, cmap="magma", interpolation="nearest")
        ax.set_title(n, fontsize=7)
        ax.set_yticks([])
        ax.set_xticks([])
    for ax in axes.flat[len(wf.alpha):]:
        ax.axis("off")
    fig.suptitle("alpha per layer (rows: classes; columns: components grouped by the class that "
                 "switches them off most; black = off)", fontsize=9)
    _savefig(fig, out / "alpha.png")
    if ex is None:
        return

    frac = [[100 * r["frac_off"][c] for r in ex["alpha"]] for c in range(nc)]   # (N_c, layers)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(wf.names)), 4))
    _heatmap(ax, frac, wf.names, labels, "components switched off (alpha < 0.5), % of the layer")
    _savefig(fig, out / "frac_off.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    conf = torch.tensor(results["original"]["confusion_test"]).fill_diagonal_(float("nan"))
    _heatmap(axes[0], ex["similarity"], labels, labels, "cosine similarity of 1 - alpha rows")
    _heatmap(axes[1], conf, labels, labels, "original model: % of true class (row) predicted as")
    fig.suptitle(f"over class pairs: Pearson {ex['pearson']:.2f}, Spearman {ex['spearman']:.2f}")
    _savefig(fig, out / "similarity.png")

    cols = min(nc, 5)
    rows = math.ceil(nc / cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3 * cols, 5 * rows), squeeze=False,
                             sharex=True, sharey=True)
    for c, r in enumerate(ex["curves"]):
        x = [100 * f for f in r["fraction"]]
        for k, curve in enumerate(("deletion", "insertion")):
            ax = axes[2 * (c // cols) + k, c % cols]
            for order, color in (("alpha", "C3"), ("random", "C0")):
                d = r[f"{curve}_{order}"]
                ax.plot(x, d["acc_c"], color=color, label=f"class c, {order} order")
                ax.plot(x, d["acc_other"], color=color, ls="--", label=f"others, {order} order")
            ax.set_title(f"{curve}: {names[c]}", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig.supxlabel("components switched off (deletion) / restored (insertion), % of all")
    fig.supylabel("test accuracy (%)")
    _savefig(fig, out / "curves.png")


def _heatmap(ax, m, xlabels, ylabels, title, annotate=False, **kw):
    m = torch.as_tensor(m, dtype=torch.float)
    im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis", **kw)
    ax.set_title(title, fontsize=9)
    if xlabels is not None:
        ax.set_xticks(range(m.shape[1]), xlabels, rotation=90, fontsize=7)
    if ylabels is not None:
        ax.set_yticks(range(m.shape[0]), ylabels, fontsize=7)
    if annotate and ylabels is not None:
        for (i, j), v in zip(itertools.product(*map(range, m.shape)), m.flatten().tolist()):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="w" if v < 50 else "k")
    ax.figure.colorbar(im, ax=ax)


def _savefig(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(str(path) + ".tmp", format="png", dpi=110)
    plt.close(fig)
    os.replace(str(path) + ".tmp", path)

# -----------------------------------------------------------------------------
# checkpoints: written to a temporary file, then renamed; loaded with weights_only=True.
# Each holds {"meta": the settings that made it, "state_dict": tensors}.

def save_checkpoint(path, meta, state_dict):
    tmp = str(path) + ".tmp"
    torch.save(dict(meta=meta, state_dict={k: v.cpu() for k, v in state_dict.items()}), tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and {"meta", "state_dict"} <= ckpt.keys()
        return ckpt
    except Exception:
        raise WFError(f"{path} is not a readable wfnet checkpoint (truncated or corrupt?); "
                      f"delete it or choose another --out") from None


def load_model(cfg, spec, shape, device, ckpt, path):
    """A frozen backbone for cfg's settings holding the weights of `ckpt` (read from `path`)."""
    model = model_from_config(cfg, spec, shape, device)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise WFError(f"{path} does not fit these flags (arch, width, stem stride?)") from None
    return model.eval().requires_grad_(False)


def _check_identity(path, meta, want):
    """A checkpoint made for another dataset, arch or class count is an error, not a retrain."""
    for k in ("dataset", "arch", "num_classes"):
        if meta.get(k) != want[k]:
            raise WFError(f"{path} was made for {k}={meta.get(k)!r}, this run has {want[k]!r}; "
                          f"use another --out")


def _matches(meta, want):
    """A checkpoint is reused only when every setting that made it equals this run's."""
    return all(meta.get(k) == v for k, v in want.items())


def _write_json(path, obj):
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# command line: train (or reuse) the original model, untrain all classes in one round,
# evaluate every class, write results.json and plots.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="WF-Net: multi-class unlearning by weight filtering")
    p.add_argument("--preset", default="auto", help="quick | full | auto (quick on CPU, full on CUDA)")
    p.add_argument("--dataset", help="mnist | fashion-mnist | cifar10 | cifar100")
    p.add_argument("--arch", help="resnet18 | vit")
    p.add_argument("--width", type=int, help="ResNet base width (64 = ResNet-18) or ViT dim")
    p.add_argument("--stem-stride", type=int, help="ResNet stem stride: 1 (CIFAR stem) or 2")
    p.add_argument("--epochs", type=int, help="epochs of the original model")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate of the original model")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="crop/flip augmentation of the original model's training")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--untrain-epochs", type=float, help="may be fractional, e.g. 0.6")
    p.add_argument("--untrain-batch-size", type=int, help="B: half forget, half retain")
    p.add_argument("--untrain-lr", type=float, help="Adam learning rate of alpha")
    p.add_argument("-T", "--T", type=int, dest="T", help="retain label expansion")
    for i in range(3):
        p.add_argument(f"--lambda{i}", type=float)
    p.add_argument("--granularity", help="channel | weight")
    p.add_argument("--combine", help="min | product: how the rows of a set of forgotten classes combine")
    p.add_argument("--explain-samples", type=int,
                   help="test samples per class for the explanation curves and the pairs (0 = all)")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-train", type=int, help="train samples for train metrics (0 = all)")
    p.add_argument("--data-dir")
    p.add_argument("--out", help="output folder (default runs/<dataset>-<arch>)")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the original model's training")
    p.add_argument("--checkpoint", help="an original-model checkpoint to start from")
    p.add_argument("--forget", type=int, nargs="+",
                   help="also export the model with this class (or set of classes) forgotten")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="run once per seed, in <out>/seed<k>, and report mean and std over them")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.preset not in ("auto", *PRESETS):
        raise WFError(f"unknown preset {args.preset!r}; choose auto, quick or full")
    device = args.device or COMMON["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise WFError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WFError("--device cuda was asked for, but no CUDA device is available here")
    preset = args.preset if args.preset != "auto" else ("full" if device != "cpu" else "quick")
    arch = args.arch or COMMON["arch"]
    if arch not in ARCHS:
        raise WFError(f"unknown arch {arch!r}; choose resnet18 or vit")
    cfg = {**COMMON, **PRESETS[preset], **ARCHS[arch]}
    for k in ("width", "stem_stride"):
        if k in ARCHS[arch]:
            cfg[k] = ARCHS[arch][k][preset == "full"]
    cfg.update({k: v for k, v in vars(args).items() if v is not None and k in cfg})
    cfg["preset"] = preset
    cfg.update(device=device, checkpoint=args.checkpoint, forget=args.forget,
               progress=not args.no_progress, seeds=args.seeds)
    if cfg["dataset"] not in DATASETS:
        raise WFError(f"unknown dataset {cfg['dataset']!r}; choose one of {', '.join(DATASETS)}")
    if cfg["granularity"] not in ("channel", "weight"):
        raise WFError(f"unknown granularity {cfg['granularity']!r}; choose channel or weight")
    if cfg["combine"] not in ("min", "product"):
        raise WFError(f"unknown combine rule {cfg['combine']!r}; choose min or product")
    nc = DATASETS[cfg["dataset"]]["classes"]
    for c in cfg["forget"] or []:
        if not 0 <= c < nc:
            raise WFError(f"--forget {c} is out of range 0..{nc - 1} for {cfg['dataset']}")
    if args.seeds and len(set(args.seeds)) < len(args.seeds):
        raise WFError(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed")
    if args.seeds and (args.seed is not None or args.checkpoint):
        raise WFError("--seeds trains one original model per seed: drop --seed and --checkpoint")
    if cfg["explain_samples"] < 0:
        raise WFError("--explain-samples must be >= 0 (0 = the whole test set)")
    if min(cfg["epochs"], cfg["T"], cfg["width"]) < 1 or cfg["untrain_epochs"] <= 0 \
            or min(cfg["batch_size"], cfg["untrain_batch_size"]) < 2:
        raise WFError("epochs, T and width must be >= 1, untrain epochs > 0, batch sizes >= 2")
    if cfg.get("stem_stride", 1) not in (1, 2):
        raise WFError(f"--stem-stride must be 1 or 2, not {cfg['stem_stride']}")
    cfg["out"] = cfg["out"] or f"runs/{cfg['dataset']}-{cfg['arch']}"
    return cfg


def model_from_config(cfg, spec, shape, device):
    """A fresh backbone for this run's settings, channels_last on `device`; shape is (C, H, W)."""
    return build_model(cfg["arch"], spec["classes"], shape[0], shape[1], cfg["width"],
                       cfg.get("stem_stride", 1)).to(device, memory_format=torch.channels_last)


def autocast_for(device):
    """bf16 autocast on CUDA; float32 on CPU (a context that does nothing)."""
    if device.type == "cuda":
        return partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _machine(device):
    return dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)


def run(cfg):
    torch.manual_seed(cfg["seed"])
    dev, out = torch.device(cfg["device"]), Path(cfg["out"])
    autocast = autocast_for(dev)
    data = load_dataset(cfg["dataset"], cfg["data_dir"], dev)
    spec = data["spec"]
    x_tr, y_tr = data["train"]
    nc, shape = spec["classes"], x_tr.shape[1:]           # (C, H, W)
    out.mkdir(parents=True, exist_ok=True)
    make = partial(model_from_config, cfg, spec, shape, dev)
    ident = dict(dataset=cfg["dataset"], arch=cfg["arch"], num_classes=nc)
    orig_meta = {**ident, **{k: cfg[k] for k in ("width", "stem_stride", "epochs", "batch_size",
                                                  "augment", "optimizer", "lr", "weight_decay",
                                                  "seed") if k in cfg}}

    # 1. the original model: load --checkpoint, reuse <out>/original.pt, or train it
    model, orig_path = make(), Path(cfg["checkpoint"] or out / "original.pt")
    ckpt = load_checkpoint(orig_path) if orig_path.exists() or cfg["checkpoint"] else None
    if ckpt is not None:
        _check_identity(orig_path, ckpt["meta"], ident)
        for k in ("width", "stem_stride"):                # same shapes, other network: say so
            if cfg["checkpoint"] and k in ckpt["meta"] and ckpt["meta"][k] != cfg.get(k):
                raise WFError(f"{orig_path} was trained with {k}={ckpt['meta'][k]}; pass "
                              f"--{k.replace('_', '-')} {ckpt['meta'][k]}")
    if ckpt is not None and (cfg["checkpoint"] or _matches(ckpt["meta"], orig_meta)):
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError:
            raise WFError(f"{orig_path} does not fit {cfg['arch']} width {cfg['width']}") from None
        t_pre = ckpt["meta"].get("train_seconds", float("nan"))
        print(f"reusing the original model from {orig_path} (trained in {t_pre:.0f} s)")
    else:
        if ckpt is not None:
            print(f"{orig_path} was trained with other settings; training a new one")
        net = torch.compile(model) if cfg["compile"] else model
        t0 = time.time()
        train_original(net, x_tr, y_tr, spec, cfg["epochs"], cfg["batch_size"], cfg["lr"],
                       cfg["weight_decay"], cfg["seed"], autocast, cfg["progress"],
                       cfg["optimizer"], cfg["augment"])
        t_pre = time.time() - t0
        save_checkpoint(out / "original.pt", {**orig_meta, "train_seconds": t_pre},
                        model.state_dict())
        print(f"trained the original model in {t_pre:.0f} s -> {out / 'original.pt'}")
    model = model.eval()

    # 2. untraining: one round, all classes
    wf = WFNet(model, nc, cfg["granularity"], cfg["combine"])
    wf_meta = {**orig_meta, **{k: cfg[k] for k in ("granularity", "untrain_epochs", "T",
               "untrain_batch_size", "untrain_lr", "lambda0", "lambda1", "lambda2")}, "eps": EPS}
    wf_path = out / "wfnet.pt"
    ckpt = load_checkpoint(wf_path) if wf_path.exists() else None
    if ckpt is not None:
        _check_identity(wf_path, ckpt["meta"], ident)
    if ckpt is not None and not cfg["checkpoint"] and _matches(ckpt["meta"], wf_meta):
        wf.alpha.load_state_dict(ckpt["state_dict"])
        t_un = ckpt["meta"]["untrain_seconds"]
        print(f"reusing the memory matrices from {wf_path} (untrained in {t_un:.0f} s)")
    else:
        t0 = time.time()
        info = untrain(wf, x_tr, y_tr, spec, cfg["untrain_epochs"], cfg["untrain_batch_size"],
                       cfg["T"], cfg["untrain_lr"], cfg["lambda0"], cfg["lambda1"],
                       cfg["lambda2"], cfg["seed"], autocast, cfg["progress"])
        t_un = time.time() - t0
        if info["skipped_steps"]:
            print(f"warning: {info['skipped_steps']} steps had a non-finite loss and were skipped")
        save_checkpoint(wf_path, {**wf_meta, "untrain_seconds": t_un}, wf.alpha.state_dict())
        print(f"untrained all {nc} classes in {t_un:.0f} s -> {wf_path}")

    # 3. evaluation of every class from the one checkpoint
    t0 = time.time()
    torch.manual_seed(cfg["seed"] + 1)                    # T_d for ZRF: same arch, random init
    random_model = make().eval()
    res = evaluate(wf, data, random_model, cfg["eval_train"], cfg["seed"], autocast=autocast)
    t_ev = time.time() - t0

    # 4. explanations, and every pair of classes forgotten at once
    t0 = time.time()
    res["explain"] = explain(wf, data, res["original"]["confusion_test"], cfg["explain_samples"],
                             seed=cfg["seed"], autocast=autocast)
    t_ex = time.time() - t0
    res.update(config=_config(cfg),
               class_names=spec["names"],
               times_s=dict(pretrain=t_pre, untrain=t_un, evaluate=t_ev, explain=t_ex),
               machine=_machine(dev),
               notes=dict(acc="percent; acc_f: forgotten class (lower is better), acc_r: other "
                          "classes (higher is better), orig_acc_r: original model, same samples",
                          zrf="1 - mean textbook JS (natural log) to a random-init model; "
                          "higher = closer to random", mia_efficacy="fraction of forget-train "
                          "samples judged non-members; higher is better"))
    _write_json(out / "results.json", res)
    save_plots(wf, res, out, spec["names"])
    if cfg["forget"]:
        forget = sorted(set(cfg["forget"]))
        path = out / f"forget_{'_'.join(map(str, forget))}.pt"
        save_checkpoint(path, {**ident, "forgotten_classes": forget, "combine": cfg["combine"]},
                        wf.export(forget).state_dict())
        print(f"exported the model without class(es) {forget} -> {path}")
    _print_table(res, spec["names"])
    print(f"times: pretrain {t_pre:.0f} s, untrain {t_un:.0f} s, evaluate {t_ev:.0f} s, "
          f"explain {t_ex:.0f} s; results -> {out / 'results.json'}, plots -> {out}/*.png")
    return res


# -----------------------------------------------------------------------------
# seeds: one configuration repeated, each figure reported as mean and standard deviation.

_NOT_SETTINGS = ("progress", "seeds", "out", "data_dir",   # where and how a run is shown,
                 "benchmark")                             # not what it computes


def run_seeds(cfg, run_one=None, name="results.json"):
    """`run_one(cfg)` (default: run) once per seed of cfg["seeds"], each in <out>/seed<k>. A
    seed whose <out>/seed<k>/<name> was written with the same settings is read back, not run
    again. Mean and sample standard deviation (n - 1) of every figure -> <out>/seeds_<name>."""
    results = []
    for seed in cfg["seeds"]:
        one = {**cfg, "seed": seed, "out": str(Path(cfg["out"]) / f"seed{seed}"), "seeds": None}
        path = Path(one["out"]) / name
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):                     # none yet, or unreadable: run it
            old = {}
        if _settings(old.get("config", {})) == _settings(json.loads(json.dumps(one))):
            print(f"seed {seed}: reusing {path}")
            results.append(old)
        else:
            print(f"seed {seed}: running into {one['out']}", flush=True)
            results.append((run_one or run)(one))
    per_seed = [_figures(r) for r in results]
    figures = {}
    for k in per_seed[0]:
        values = [f.get(k) for f in per_seed]
        if None not in values:
            figures[k] = dict(mean=statistics.mean(values), values=values,
                              std=statistics.stdev(values) if len(values) > 1 else None)
    summary = dict(seeds=cfg["seeds"], std="sample standard deviation (n - 1)", figures=figures,
                   config=_config(cfg))
    path = Path(cfg["out"]) / f"seeds_{name}"
    _write_json(path, summary)
    print(f"over seeds {cfg['seeds']}: mean +- sample std (the values per seed) -> {path}")
    for k, v in figures.items():
        std = "n/a" if v["std"] is None else f"{v['std']:.3f}"
        print(f"{k:>28} {v['mean']:10.3f} +- {std:>7}   ("
              + ", ".join(f"{x:.3f}" for x in v["values"]) + ")")
    return summary


def _settings(config):
    return {k: v for k, v in config.items() if k not in _NOT_SETTINGS}


def _config(cfg):
    """The settings of a run, as written into its results."""
    return {k: v for k, v in cfg.items() if k != "progress"}


def _figures(res):
    """The scalar figures of one run, by name: the original's accuracy, the mean over classes
    of every metric, the wall times and the explanation summaries."""
    figures = {f"original_{k}": res["original"][k] for k in ("test_acc", "train_acc")}
    figures.update(res["mean"])
    figures.update({f"seconds_{k}": v for k, v in res.get("times_s", {}).items()})
    if "explain" in res:
        ex = res["explain"]
        figures.update(pairs_acc_f=ex["pairs"]["mean"]["acc_f"],
                       pairs_acc_r_drop=ex["pairs"]["mean"]["acc_r_drop"],
                       deletion_alpha_beats_random=ex["deletion_alpha_beats_random"],
                       deletion_others_hold=ex["deletion_others_hold"],
                       pearson=ex["pearson"], spearman=ex["spearman"])
    return figures


def _print_table(res, names):
    cols = ["acc_f_test", "acc_r_test", "orig_acc_r_test", "acc_f_train", "acc_r_train", "zrf",
            "mia_efficacy"]
    cols = [c for c in cols if c in res["mean"]]
    print(f"original model: test {res['original']['test_acc']:.2f}%, "
          f"train {res['original']['train_acc']:.2f}%")
    print(f"{'class':>14} " + " ".join(f"{c:>15}" for c in cols))
    for r in res["per_class"]:
        print(f"{names[r['cls']][:14]:>14} " + " ".join(f"{r[c]:>15.3f}" for c in cols))
    print(f"{'mean':>14} " + " ".join(f"{res['mean'][c]:>15.3f}" for c in cols))
    print(f"mean Acc_r drop vs original on the same samples: {res['mean']['acc_r_drop_test']:.2f} "
          "points (acc in %, lower Acc_f and higher MIA-efficacy are better)")
    ex = res.get("explain")
    if ex is None:
        return
    print(f"deletion / insertion areas (mean accuracy in %, up to "
          f"{100 * ex['curves'][0]['fraction'][-1]:.0f}% of all components; lower deletion_c is better):")
    heads = [(curve, order, part) for curve in ("deletion", "insertion")
             for order in ("alpha", "random") for part in ("c", "other")]
    labels = [f"{curve[:3]}_{part}_{order}" for curve, order, part in heads]   # e.g. del_c_alpha
    print(f"{'class':>14} " + " ".join(f"{label:>15}" for label in labels))
    for c, r in enumerate(ex["curves"]):
        print(f"{names[c][:14]:>14} " + " ".join(f"{r[f'{curve}_{order}'][f'auc_{part}']:>15.1f}"
                                                 for curve, order, part in heads))
    nc = len(ex["curves"])
    print(f"deletion in alpha order drops class c faster than a random order for "
          f"{ex['deletion_alpha_beats_random']}/{nc} classes; the other classes hold up better than "
          f"class c for {ex['deletion_others_hold']}/{nc}")
    print(f"alpha-row similarity vs the original model's confusion, over class pairs: "
          f"Pearson {ex['pearson']:.2f}, Spearman {ex['spearman']:.2f}")
    p = ex["pairs"]
    worst = max(p["per_set"], key=lambda r: r["acc_f"])
    print(f"{len(p['per_set'])} pairs forgotten at once (rows combined by {p['rule']}, "
          f"{ex['samples']} test samples): mean Acc_f {p['mean']['acc_f']:.2f}%, Acc_r "
          f"{p['mean']['acc_r']:.2f}% ({p['mean']['acc_r_drop']:.2f} points below the original); "
          f"worst pair {worst['classes']}: Acc_f {worst['acc_f']:.1f}%")


def main(argv=None):
    try:
        cfg = parse_args(argv)
        if cfg["seeds"]:
            run_seeds(cfg)
        else:
            run(cfg)
    except WFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
