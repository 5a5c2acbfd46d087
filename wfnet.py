"""
wfnet.py: WF-Net (Poppi et al., "Multi-Class Explainable Unlearning for Image Classification via
Weight Filtering", arXiv 2304.02049) in one file. A trained classifier is frozen; every filtered
weight W_l gets a memory matrix alpha_l (N_c, K_l) whose row c multiplies W_l. After ONE untraining
round, running the network with row c of every alpha makes it behave as if class c had never been
learned, for any c. Sections: data, backbones, weight filtering, untraining, the original model,
metrics, explanations, checkpoints, command line. "CHOICE:" marks where the paper is silent.

    python wfnet.py                                   # quick Fashion-MNIST run on a 2-core CPU
    python wfnet.py --dataset cifar10 --device cuda   # the whole pipeline on a GPU
    torchrun --nproc_per_node 8 wfnet.py --dataset imagefolder --data-dir imagenet --arch resnet50 --pretrained
"""
import argparse, contextlib, copy, gzip, itertools, json, math, os, platform, statistics, sys, time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange

# -----------------------------------------------------------------------------
# defaults: "quick" finishes on a 2-core CPU, "full" is the paper-scale GPU run; flags override them.

COMMON = dict(dataset="fashion-mnist", arch="resnet18", batch_size=128, untrain_batch_size=128,
              T=1, lambda0=3.0, lambda1=1.0, lambda2=1.0, focus=0.1, granularity="channel", combine="min",
              untrain_augment=None, explain_samples=100, seed=0, data_dir="data", out=None, compile=False)
PRESETS = {
    "quick": dict(epochs=3, augment=False, untrain_steps=1400, untrain_lr=0.05, eval_train=10000),
    "full": dict(epochs=30, augment=True, untrain_steps=4875, untrain_lr=0.01, eval_train=0),
}
ARCHS = {  # per backbone: optimizer of the original model; width (and stem stride) as (quick, full)
    "resnet18": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4, width=(16, 64), stem_stride=(2, 1)),
    "vit": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, width=(64, 256)),
    "torchvision": dict(optimizer="sgd", lr=0.1, weight_decay=1e-4),   # imagefolder: get_model(arch); ViTs: "vit"'s
}
MAX_CLASSES = 100  # beyond: --eval-classes defaults to a sample this large, the explanations to 20 classes
EPS = 1e-2  # guard of the 1/CE forget term: 1 / (CE + EPS) stays finite, its gradient alive


class WFError(ValueError):
    """A user error: printed as one line by the command line, exit status 2."""

def _rank():
    """(rank, world size): (0, 1) unless launched by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

# -----------------------------------------------------------------------------
# data: the small datasets live on the device as uint8 tensors (torchvision reads each split once),
# normalized and augmented (random crop with padding, flip) batched there. "imagefolder" is an
# ImageNet-style tree too large for memory: torchvision's ImageFolder read by DataLoader workers,
# with the standard ImageNet transforms. Either way batches come from lists of sample indices.

DATASETS = {
    "mnist": dict(tv="MNIST", classes=10, mean=(0.1307,), std=(0.3081,), pad=2, flip=False,
                  names=[str(i) for i in range(10)]),
    "fashion-mnist": dict(tv="FashionMNIST", classes=10, mean=(0.2860,), std=(0.3530,), pad=2, flip=True,
                          names=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                 "Shirt", "Sneaker", "Bag", "Ankle boot"]),
    "cifar10": dict(tv="CIFAR10", classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    pad=4, flip=True, names="airplane automobile bird cat deer dog frog horse ship truck".split()),
    "cifar100": dict(tv="CIFAR100", classes=100, mean=(0.5071, 0.4865, 0.4409),
                     std=(0.2673, 0.2564, 0.2762), pad=4, flip=True, names=[str(i) for i in range(100)]),
    "imagefolder": dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),   # <data-dir>/{train,val}/<class>/
}
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist

def load_dataset(name, data_dir="data", device="cpu", image_size=224):
    """Return dict(train=(x, y), test=(x, y), spec=...): y int64 labels on the device; x uint8 images
    (N,C,H,W) on the device, or for "imagefolder" an ImageFolder (train/ and val/ of data_dir)."""
    import torchvision
    spec, root = dict(DATASETS[name]), Path(data_dir)
    if name == "imagefolder":
        return _image_folder(root, spec, device, image_size)
    raw = root / spec["tv"] / "raw"
    if name == "fashion-mnist" and Path(DEBIAN_FASHION).is_dir():  # Debian's copy: unpack it once
        for gz in Path(DEBIAN_FASHION).glob("*-ubyte.gz"):
            if not (raw / gz.stem).exists():
                raw.mkdir(parents=True, exist_ok=True)
                _write(raw / gz.stem, lambda tmp: tmp.write_bytes(gzip.decompress(gz.read_bytes())), every_rank=True)
    out = dict(spec=spec)
    for split in ("train", "test"):
        make = partial(getattr(torchvision.datasets, spec["tv"]), str(root), train=split == "train")
        try:
            try:
                ds = make(download=False)
            except RuntimeError:                          # not there (or corrupt): download it
                ds = make(download=True)
        except Exception as e:
            hint = " or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else ""
            raise WFError(f"{name} not found in {root} and the download failed ({type(e).__name__}); "
                          f"put torchvision's files under --data-dir{hint}") from None
        x = torch.as_tensor(ds.data)                      # MNIST: (N,H,W); CIFAR: (N,H,W,C)
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
        out[split] = (x.contiguous().to(device), torch.as_tensor(ds.targets).long().to(device))
    return out

def _image_folder(root, spec, device, size):
    from torchvision import datasets, transforms as T
    norm = [T.ToTensor(), T.Normalize(spec["mean"], spec["std"])]
    spec.update(device=torch.device(device), size=size,
                train_tf=T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm]),
                eval_tf=T.Compose([T.Resize(size * 8 // 7), T.CenterCrop(size), *norm]))   # 256 -> 224
    out = dict(spec=spec)
    for split, folder in (("train", "train"), ("test", "val")):
        try:
            ds = datasets.ImageFolder(root / folder, spec["eval_tf"])
        except (FileNotFoundError, OSError) as e:
            raise WFError(f"{root / folder}: {str(e).splitlines()[0]} (--data-dir needs train/ and val/, "
                          "one folder of images per class)") from None
        out[split] = (ds, torch.tensor(ds.targets, device=device))
    if out["train"][0].classes != out["test"][0].classes:
        raise WFError(f"{root}/train and {root}/val have different class folders")
    spec.update(classes=len(ds.classes), names=ds.classes)
    return out

def transform(x, spec, augment=False, gen=None):
    """uint8 (B,C,H,W) -> normalized float, channels_last; with augment: random crop and flip."""
    x = x.float().div_(255)
    if augment:
        (B, C, H, W), p, dev = x.shape, spec["pad"], x.device
        dy, dx = torch.randint(0, 2 * p + 1, (2, B), generator=gen).to(dev)
        crops = F.pad(x, (p, p, p, p)).unfold(2, H, 1).unfold(3, W, 1)  # (B,C,2p+1,2p+1,H,W)
        x = crops[torch.arange(B, device=dev), :, dy, dx]                # (B,C,H,W)
        if spec["flip"]:
            flip = (torch.rand(B, generator=gen) < 0.5).to(dev)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
    mean = torch.tensor(spec["mean"], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

def batches(x, y, spec, index_batches, augment=False, gen=None, parts=0):
    """(images, labels) on the device for each index tensor of `index_batches`. parts > 0: under
    torchrun each process takes its share of each of the batch's `parts` equal parts."""
    rank, world = _rank() if parts else (0, 1)
    mine = lambda t: t.unflatten(0, (max(parts, 1), world, -1))[:, rank].flatten(0, 1)
    if torch.is_tensor(x):                                # the whole batch, then the share: the same
        for idx in index_batches:                         # augmentation as in a single process
            yield mine(transform(x[idx.to(x.device)], spec, augment, gen)), mine(y[idx.to(y.device)])
        return
    if augment:
        x = copy.copy(x)
        x.transform = spec["train_tf"]
    loader = torch.utils.data.DataLoader(x, batch_sampler=(mine(i).tolist() for i in index_batches),
                                         num_workers=min(8, (os.cpu_count() or 2) // world),
                                         pin_memory=spec["device"].type == "cuda")
    for xb, yb in loader:
        yield (xb.to(spec["device"], non_blocking=True).contiguous(memory_format=torch.channels_last),
               yb.to(spec["device"], non_blocking=True))

# -----------------------------------------------------------------------------
# backbones: ResNet-18 with a 3x3 stem and no max-pool for 28/32 px (stride 1 is the CIFAR stem;
# the quick preset's stride 2 costs 4x less), and a small Vision Transformer. Any classifier
# can be wrapped (torchvision's too): see WFNet.

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Sequential())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


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
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):                                 # (B, N, D)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=2):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, num_classes, in_channels=3, image_size=32, width=128, depth=6, patch=4):
        super().__init__()
        self.patches = nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch),
                                     nn.Linear(patch * patch * in_channels, width))   # (B, n, D)
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, width) * 0.02)
        self.blocks = nn.Sequential(*[Block(width, max(1, width // 32)) for _ in range(depth)])
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.blocks(self.patches(x) + self.pos)       # (B, n, D)
        return self.head(self.ln(x).mean(dim=1))          # (B, N_c), mean-pooled tokens

# -----------------------------------------------------------------------------
# weight filtering: for a layer y = W x + b, alpha_l[c] multiplies W. Filtered: every Conv2d and
# Linear weight, and nn.MultiheadAttention's in_proj_weight and out_proj.weight (it calls them
# functionally; torchvision's ViTs use it).
# CHOICE (granularity): "channel" (default) keeps one alpha per output unit (a row of W); "weight"
# one per weight, the literal "point-wise". Since (a_k W_k) x + b_k = a_k y_k + b_k (1 - a_k), the
# channel gate acts on activations: a batch where each sample forgets another class is ONE pass.
# CHOICE (parametrization): alpha starts at 1 (the original exactly), is used unclamped and projected
# into [0, 1] after each step (a clamp in the forward pass gives no gradient at 1: nothing moves).
# CHOICE (sets): forget=[3, 5] uses the element-wise MINIMUM of rows 3 and 5; "product" compounds.

def _scale(y, a, bias, dim=-1):
    """y * a + bias * (1 - a) on the output units (dim) of y; a is (K,) or per sample (B, K)."""
    unit = [1] * y.dim()
    unit[dim] = -1                                        # (1, .., K, .., 1)
    a = a.view(unit if a.dim() == 1 else [a.shape[0]] + unit[1:])
    return y * a if bias is None else y * a + bias.view(unit) * (1 - a)

def _gate_hook(a, module, inputs, y):                     # Conv2d: units on dim 1; Linear: last
    return _scale(y, a, module.bias, 1 if isinstance(module, nn.Conv2d) else -1)

def _gated_attention(m, a_in, a_out, query, key, value, key_padding_mask=None, need_weights=True,
                     attn_mask=None, average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention.forward with its in- and out-projection units gated (batched inputs)."""
    if key_padding_mask is not None or attn_mask is not None or is_causal or query.dim() != 3:
        raise NotImplementedError("WFNet gates nn.MultiheadAttention on batched inputs without masks")
    if not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))   # (B, L, E)
    E, b_in = m.embed_dim, m.in_proj_bias
    biases = (None,) * 3 if b_in is None else b_in.split(E)
    q, k, v = (rearrange(_scale(F.linear(t, w, b), a, b), "b l (h d) -> b h l d", h=m.num_heads)
               for t, w, a, b in zip((query, key, value), m.in_proj_weight.split(E), a_in.split(E, -1), biases))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=m.dropout if m.training else 0.0)
    out = F.linear(rearrange(out, "b h l d -> b l (h d)"), m.out_proj.weight, m.out_proj.bias)
    out = _scale(out, a_out, m.out_proj.bias)
    weights = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1) if need_weights else None  # (B, h, L, S)
    weights = weights.mean(1) if need_weights and average_attn_weights else weights
    return (out if m.batch_first else out.transpose(0, 1)), weights


def _free_memory(device):
    """Bytes: free on a GPU, the machine's memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else math.inf


class WFNet(nn.Module):
    """Wrap any classifier: freeze it and give every filtered weight a memory matrix.

    wf(x) or wf(x, forget=None): the wrapped model's outputs, unchanged.
    wf(x, forget=c): row c of every alpha; forget=[3, 5]: a set of classes, rows combined.
    wf(x, forget=t): per sample, t a LongTensor (B,) (a class each) or (B, S) (a set each); this
        needs the batch first in every filtered output (not so in a sequence-first Transformer).
    wf.export(forget=c or [3, 5]): a plain copy of the model with the row(s) in its weights.
    """

    def __init__(self, model, num_classes, granularity="channel", combine="min"):
        super().__init__()
        if granularity not in ("channel", "weight") or combine not in ("min", "product"):
            raise ValueError(f"granularity is channel or weight ({granularity!r}), combine min or product ({combine!r})")
        self.model = model.eval().requires_grad_(False)
        self.num_classes, self.granularity, self.combine = num_classes, granularity, combine
        self.names, self.sites, attention = [], [], set()  # filtered weights; (module, their indices)
        for n, m in model.named_modules():
            prefix = n + "." if n else ""
            if isinstance(m, nn.MultiheadAttention):
                if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
                    raise ValueError(f"{n}: only attention with one embed dim for q, k and v is filtered")
                attention.add(n)
                self.sites.append((m, [len(self.names), len(self.names) + 1]))
                self.names += [prefix + "in_proj_weight", prefix + "out_proj.weight"]
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and n.rpartition(".")[0] not in attention:
                self.sites.append((m, [len(self.names)]))
                self.names.append(prefix + "weight")
        self.weights = [model.get_parameter(n) for n in self.names]   # a plain list: not registered again
        sizes = [w.shape[0] if granularity == "channel" else w.numel() for w in self.weights]
        need, free = 16 * num_classes * sum(sizes), _free_memory(self.weights[0].device)
        if need > free:                                   # alpha, its gradient, Adam's two moments: float32
            raise WFError(f"the memory matrices ({num_classes} x {sum(sizes):,} {granularity}s) would need "
                          f"{need / 2**30:.1f} GiB to untrain, {free / 2**30:.1f} GiB is there: use fewer classes"
                          + (" or --granularity channel" if granularity == "weight" else ""))
        self.alpha = nn.ParameterList([nn.Parameter(torch.ones(      # alpha_l: (N_c, K_l)
            num_classes, k, device=w.device)) for w, k in zip(self.weights, sizes)])

    def train(self, mode=True):
        super().train(mode)
        self.model.eval()  # the backbone stays frozen: BatchNorm uses its running statistics
        return self

    def _rows(self, forget, batch):
        """forget -> a LongTensor of classes: (S,) one set for the batch, or (B, S) per sample."""
        if isinstance(forget, torch.Tensor) and forget.dim() > 0:
            rows = forget.view(len(forget), -1)           # (B,) -> (B, 1)
            if len(rows) != batch:
                raise ValueError(f"forget has {len(rows)} entries for a batch of {batch}")
        else:
            many = isinstance(forget, (list, tuple, set, range))
            rows = torch.tensor(sorted({int(c) for c in forget}) if many else [int(forget)], dtype=torch.long)
            if len(rows) == 0:
                raise ValueError("forget is an empty set of classes")
        bad = (rows < 0) | (rows >= self.num_classes)
        if bad.any():
            raise ValueError(f"forget class {int(rows[bad][0])} out of range 0..{self.num_classes - 1}")
        return rows.to(self.alpha[0].device)

    def gates(self, rows):
        """Per filtered weight, alpha_l[rows] combined over the set: (K_l,) or (B, K_l)."""
        if rows.shape[-1] == 1:
            return [a[rows[..., 0]] for a in self.alpha]
        return [a[rows].amin(-2) if self.combine == "min" else a[rows].prod(-2) for a in self.alpha]

    def forward(self, x, forget=None):
        return self.model(x) if forget is None else self.filtered(x, self._rows(forget, x.shape[0]))

    def filtered(self, x, rows):
        """Run with the rows of `rows`, checked classes: (S,) for the batch, (B, S) per sample."""
        if rows.dim() == 1 or self.granularity == "channel":
            return self.gated(x, self.gates(rows))
        # weight granularity, a set per sample: one pass per distinct set, then restore the order
        sets, inverse = rows.unique(dim=0, return_inverse=True)
        groups = [(inverse == i).nonzero().squeeze(1) for i in range(len(sets))]
        outs = [self.gated(x[idx], self.gates(s)) for idx, s in zip(groups, sets)]
        return torch.cat(outs)[torch.cat(groups).argsort()]

    def gated(self, x, gates):
        """Run the frozen model with any per-weight gates (one value per component, in [0, 1])."""
        if self.granularity == "weight":
            # .contiguous(): with a channels_last weight, the backward pass of this product
            # corrupted the heap (torch 2.14.1, CPU) within a few untraining steps
            weights = {n: (w * g.view_as(w)).contiguous()
                       for n, w, g in zip(self.names, self.weights, gates)}
            return torch.func.functional_call(self.model, weights, (x,))
        hooks, forwards = [], {}
        for m, i in self.sites:
            if isinstance(m, nn.MultiheadAttention):      # an instance forward, the old one put back below
                forwards[m] = m.__dict__.get("forward")
                m.forward = partial(_gated_attention, m, gates[i[0]], gates[i[1]])
            else:
                hooks.append(m.register_forward_hook(partial(_gate_hook, gates[i[0]])))
        try:
            return self.model(x)
        finally:
            for h in hooks:
                h.remove()
            for m, old in forwards.items():
                m.__dict__.pop("forward")
                if old is not None:
                    m.forward = old

    @torch.no_grad()
    def export(self, forget):
        """A plain copy of the wrapped model with the row(s) of `forget` folded into its weights."""
        if isinstance(forget, torch.Tensor) and forget.dim() > 0:
            raise ValueError("export takes one class or a list of classes, not a per-sample tensor")
        model = copy.deepcopy(self.model).requires_grad_(True)
        for n, g in zip(self.names, self.gates(self._rows(forget, None))):
            w = model.get_parameter(n)
            w.mul_(g.view(-1, *[1] * (w.dim() - 1)) if self.granularity == "channel" else g.view_as(w))
        return model

# -----------------------------------------------------------------------------
# untraining: only alpha is trained. A mini-batch of B holds B/2 forget samples, each run with the
# row of its own label, and B/2 retain samples, each repeated T times with a random row c != its
# label (label expansion, (T, B/2)). The loss, both data terms averaged over their samples:
#     L = lambda0 * CE(retain) + lambda1 * 1 / CE(forget) + lambda2 * mean(1 - alpha)
# CHOICE (the recipe, measured over seeds 0-4 in notebooks/RESULTS.md): Adam, lr 0.05 decaying
# linearly to 0, lambda0 = 3, lambda2 = 1. T = 1 with 2.5 times the steps of T = 4 (the same images):
# the forget term sees 2.5 times the samples, and the last classes get forgotten. The forget half is
# drawn by class, each with weight (its running forget accuracy + `focus`): a class still recognized
# gets the samples, one already forgotten keeps a share. Drawn uniformly, one class lags behind.

def wfnet_loss(logits_f, y_f, logits_r, y_r, alpha, lambda0=1.0, lambda1=1.0, lambda2=1.0):
    """The paper's loss. Returns (L, L_r, L_f, R); logits_r/y_r are already T-expanded."""
    L_r = F.cross_entropy(logits_r, y_r)
    ce_f = F.cross_entropy(logits_f, y_f, reduction="none")
    L_f = (1 / (ce_f + EPS)).mean()                       # inverted CE, guarded against CE ~ 0
    R = torch.cat([(1 - a).flatten() for a in alpha]).mean()
    return lambda0 * L_r + lambda1 * L_f + lambda2 * R, L_r, L_f, R

def untrain(wf, x, y, spec, steps=1400, batch_size=128, T=1, lr=0.05, lambda0=3.0, lambda1=1.0,
            lambda2=1.0, focus=0.1, augment=False, seed=0, autocast=contextlib.nullcontext, progress=True,
            log_every=25):
    """Train the memory matrices of `wf` for all classes in one round on images x (see load_dataset)
    with labels y. Returns the history (L_r, L_f, R per step), the steps, and the steps skipped for a
    non-finite loss. focus=0 draws the forget half uniformly, as the retain half. augment: crop and flip
    the images, as the original model was trained (see the CHOICE above). Under torchrun each
    process runs its share of every batch and the gradients of alpha are averaged."""
    from tqdm import tqdm
    gen, dev, (rank, world) = torch.Generator().manual_seed(seed), y.device, _rank()
    dgen = torch.Generator(dev).manual_seed(seed)         # the forget draws stay on the device
    n, half, nc = len(y), batch_size // 2, wf.num_classes
    if half % world:
        raise WFError(f"the untraining batch ({batch_size}) must split into {2 * world} equal parts")
    if y.min() < 0 or y.max() >= nc:                      # checked once here, not in every step
        raise ValueError(f"labels must lie in 0..{nc - 1}")
    opt = torch.optim.Adam(wf.alpha.parameters(), lr=lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)  # linear decay to 0
    history, skipped = [], torch.zeros((), device=dev)
    by_class, count = y.argsort(), torch.bincount(y, minlength=nc)   # class k: by_class[start[k]:][:count[k]]
    start, present = count.cumsum(0) - count, (count > 0).float()
    remembered = present.clone()                          # running forget accuracy per class

    def draws():                                          # a batch: B/2 forget, then B/2 retain indices
        perm = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            if len(perm) < batch_size:
                perm = torch.randperm(n, generator=gen)
            take = half if focus else batch_size
            idx, perm = perm[:take].to(dev), perm[take:]
            if focus:
                k = torch.multinomial((remembered + focus) * present, half, True, generator=dgen)
                pick = (torch.rand(half, device=dev, generator=dgen) * count[k]).long()
                idx = torch.cat([by_class[start[k] + pick], idx])
            yield idx

    wf.train()
    bar = tqdm(range(steps), desc="untrain", disable=not progress or rank > 0, mininterval=2)
    for step, (xb, yb) in zip(bar, batches(x, y, spec, draws(), augment, gen, parts=2)):
        h = len(yb) // 2                                  # this process's share of each half
        xf, yf, xr, yr = xb[:h], yb[:h], xb[h:], yb[h:]
        shift = torch.randint(1, nc, (T, half), generator=gen)[:, rank * h:(rank + 1) * h].to(dev)
        rows = torch.cat([yf, ((yr + shift) % nc).flatten()])   # own label; (T, B/2) rows != label
        with autocast():
            logits = wf.filtered(torch.cat([xf, xr.repeat(T, 1, 1, 1)]), rows[:, None]).float()
        loss, L_r, L_f, R = wfnet_loss(logits[:h], yf, logits[h:], yr.repeat(T), wf.alpha,
                                       lambda0, lambda1, lambda2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # a non-finite loss never reaches alpha: the fused step is skipped on the device, moments and
        # step count untouched, with no host sync (torch.amp.GradScaler's contract); the schedule advances
        opt.found_inf = (~torch.isfinite(loss)).float()
        if world > 1:                                     # the global batch's gradient, on every process
            for t in [a.grad for a in wf.alpha] + [opt.found_inf]:
                dist.all_reduce(t)
            for a in wf.alpha:
                a.grad /= world
            opt.found_inf.clamp_(max=1)                   # the fused step skips on exactly 1
        skipped += opt.found_inf
        opt.step()
        sched.step()
        with torch.no_grad():
            for a in wf.alpha:
                a.clamp_(0, 1)                            # the projection back into [0, 1]
            if focus:                                     # only the focused draws read it
                seen = torch.stack([torch.bincount(yf, minlength=nc), torch.bincount(
                    yf, (logits[:h].argmax(-1) == yf).float(), minlength=nc)])   # (2, N_c): drawn, recognized
                if world > 1:
                    dist.all_reduce(seen)
                remembered = torch.where(seen[0] > 0, 0.9 * remembered + 0.1 * seen[1] / seen[0].clamp_min(1),
                                         remembered)
        history.append(torch.stack([L_r, L_f, R]).detach())
        if progress and step % log_every == 0:            # channel granularity: the only host sync
            bar.set_postfix(dict(zip(("L_r", "L_f", "R"), history[-1].tolist())), refresh=False)
    wf.eval()
    return dict(history=torch.stack(history).tolist(), skipped_steps=int(skipped), steps=steps)

# -----------------------------------------------------------------------------
# training the original model: SGD with Nesterov momentum (AdamW for the ViT), one-cycle learning
# rate (linear warm-up for 20% of the steps, then linear decay), weight decay off biases and norms.

def train_original(model, x, y, spec, epochs, batch_size=128, lr=0.1, weight_decay=5e-4, seed=0,
                   autocast=contextlib.nullcontext, progress=True, optimizer="sgd", augment=True):
    from tqdm import tqdm
    gen, (rank, world), n = torch.Generator().manual_seed(seed), _rank(), len(y)
    steps = epochs * (n // batch_size)
    if steps < 1 or batch_size % world:
        raise WFError(f"a batch of {batch_size} must fit the {n} training images and split over {world} processes")
    groups = [dict(params=[p for p in model.parameters() if p.dim() > 1], weight_decay=weight_decay),
              dict(params=[p for p in model.parameters() if p.dim() <= 1], weight_decay=0)]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    warm = max(1, int(0.2 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model   # averages the gradients
    net.train()
    for _ in tqdm(range(epochs), desc="train", disable=not progress or rank > 0):
        perm = torch.randperm(n, generator=gen)[:n // batch_size * batch_size].view(-1, batch_size)
        for xb, yb in batches(x, y, spec, perm, augment, gen, parts=1):
            with autocast():
                loss = F.cross_entropy(net(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()

# -----------------------------------------------------------------------------
# metrics, for every class c with the model that forgot c: Acc_f(c) on class-c samples (goal ~0),
# Acc_r(c) on all others (goal = original), on test and train, and the N_c x N_c matrix. ZRF
# (Chundawat et al. 2023): 1 - mean JS(M(x) || T_d(x)) over forget samples, T_d a random-init copy;
# the textbook JS, natural log, per sample, so ZRF lies in [1 - ln 2, 1]. MIA-efficacy (SalUn): an SVC
# on the true-label confidence, fit on retain-train (members) vs test (non-members); efficacy = the
# fraction of forget-train samples it judges non-members (higher is better).

@torch.no_grad()
def predict(net, x, spec, batch_size=1000, autocast=contextlib.nullcontext):
    """Softmax probabilities (N, N_c) of net on the images x (see load_dataset)."""
    out = []
    for xb, _ in batches(x, torch.zeros(len(x), dtype=torch.long), spec, torch.arange(len(x)).split(batch_size)):
        with autocast():
            out.append(net(xb).float().softmax(-1))
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
    svc = SVC(C=3, kernel="rbf", gamma="auto").fit(torch.cat([mem, non]).double().view(-1, 1).numpy(),
                                                   [1] * k + [0] * k)
    return float((svc.predict(conf_forget.double().view(-1, 1).numpy()) == 0).mean())

def evaluate(original, forgotten, data, classes=None, random_model=None, eval_train=10000, seed=0,
             batch_size=1000, autocast=contextlib.nullcontext):
    """Every metric for every class c in `classes` (default all): `original` is the model before
    unlearning, `forgotten(c)` the model that forgot c (for WF-Net, partial(wf, forget=c): every
    class from one checkpoint). Under torchrun the classes are shared out. A JSON-ready dict."""
    spec, (rank, world) = data["spec"], _rank()
    nc, (x_te, y_te), (x_tr, y_tr) = spec["classes"], data["test"], data["train"]
    if eval_train and eval_train < len(y_tr):             # a fixed random subset keeps CPU runs short
        keep = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(seed))[:eval_train]
        x_tr, y_tr = _subset(x_tr, keep), y_tr[keep.to(y_tr.device)]
    run = partial(predict, spec=spec, batch_size=batch_size, autocast=autocast)
    orig_te, orig_tr = run(original, x_te), run(original, x_tr)
    ok_orig_te, ok_orig_tr = orig_te.argmax(-1) == y_te, orig_tr.argmax(-1) == y_tr
    rand_te = run(random_model, x_te) if random_model is not None else None
    rows, classes = [], list(range(nc)) if classes is None else list(classes)
    for c in classes[rank::world]:
        p_te, p_tr = run(forgotten(c), x_te), run(forgotten(c), x_tr)
        ok_te, ok_tr, f_te, f_tr = p_te.argmax(-1) == y_te, p_tr.argmax(-1) == y_tr, y_te == c, y_tr == c
        conf_tr, conf_te = (p.gather(1, t[:, None]).squeeze(1).cpu() for p, t in ((p_tr, y_tr), (p_te, y_te)))
        row = dict(cls=c, acc_f_test=_acc(ok_te[f_te]), acc_r_test=_acc(ok_te[~f_te]),
                   orig_acc_r_test=_acc(ok_orig_te[~f_te]), acc_f_train=_acc(ok_tr[f_tr]),
                   acc_r_train=_acc(ok_tr[~f_tr]), orig_acc_r_train=_acc(ok_orig_tr[~f_tr]),
                   mia_efficacy=mia_efficacy(conf_tr[~f_tr.cpu()], conf_te[~f_te.cpu()], conf_tr[f_tr.cpu()], seed),
                   per_class_test=_per_class(ok_te, y_te, nc))
        if rand_te is not None:
            row["zrf"] = zrf_score(p_te[f_te], rand_te[f_te])
        rows.append(row)
    if world > 1:                                         # every process gets every class's row
        shares = [None] * world
        dist.all_gather_object(shares, rows)
        rows = sorted(sum(shares, []), key=lambda r: classes.index(r["cls"]))
    matrix = torch.full((nc, nc), float("nan"))
    for r in rows:
        matrix[r["cls"]] = torch.tensor(r.pop("per_class_test"))
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "cls"}
    for split in ("test", "train"):
        mean[f"acc_r_drop_{split}"] = mean[f"orig_acc_r_{split}"] - mean[f"acc_r_{split}"]
    return dict(original=dict(test_acc=_acc(ok_orig_te), train_acc=_acc(ok_orig_tr),
                              per_class_test_acc=_per_class(ok_orig_te, y_te, nc),
                              confusion_test=_confusion(y_te, orig_te.argmax(-1), nc).tolist()),
                per_class=rows, mean=mean, matrix_test=matrix.tolist(), eval_train_samples=len(y_tr))

def _subset(x, idx):
    return x[idx.to(x.device)] if torch.is_tensor(x) else torch.utils.data.Subset(x, idx.tolist())

def _per_class(ok, y, nc):
    """Accuracy (%) on each true class: (N_c,) as a list, nan for a class without samples."""
    return (100 * torch.bincount(y, ok.float(), nc) / torch.bincount(y, minlength=nc)).tolist()

def _acc(ok):
    return 100.0 * ok.float().mean().item() if len(ok) else float("nan")

def _confusion(y, pred, nc):
    """(N_c, N_c): % of the samples of true class i (row) predicted as class j."""
    counts = torch.zeros(nc, nc).index_put_((y.cpu(), pred.cpu()), torch.ones(len(y)), accumulate=True)
    return 100 * counts / counts.sum(1, keepdim=True).clamp_min(1)

# -----------------------------------------------------------------------------
# explanations: row c of every alpha names the components class c depends on ("explainable by
# design"). Three readings: per layer, the fraction of components each class switches off; the
# class-class similarity of the rows beside the original model's confusion; and deletion /
# insertion curves: in the original model switch components off in order of 1 - alpha[c]
# (deletion), or restore them in that order into the model filtered by row c (insertion), and
# track class-c and other-class accuracy, each beside a random order.
# CHOICE: the components of all layers are ranked together, ties broken at random; the curves run
# from 0 to `max_fraction` of them, and their area is the mean accuracy over that range (%).

def class_similarity(wf, confusion):
    """Cosine similarity of the classes' switched-off vectors (1 - alpha over all layers), and its
    Pearson and Spearman correlation with the symmetrized confusion over class pairs."""
    off = torch.cat([(1 - a.detach().float()).cpu() for a in wf.alpha], 1)   # (N_c, sum K_l)
    unit = off / off.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = unit @ unit.T                                   # (N_c, N_c)
    conf = torch.as_tensor(confusion, dtype=torch.float)
    i, j = torch.triu_indices(len(sim), len(sim), 1)
    pair = torch.stack([sim[i, j], (conf[i, j] + conf[j, i]) / 2])   # (2, pairs): similarity, confusion
    rank = torch.stack([_ranks(v) for v in pair])         # (2, pairs)
    return dict(similarity=sim.tolist(), pearson=torch.corrcoef(pair)[0, 1].nan_to_num().item(),
                spearman=torch.corrcoef(rank)[0, 1].nan_to_num().item())

def _ranks(v):
    """Ranks from 0, ties sharing their average rank (Spearman's convention)."""
    _, inverse, count = torch.unique(v, return_inverse=True, return_counts=True)   # sorted values
    return (count.cumsum(0) - count + (count - 1) / 2)[inverse]

def deletion_insertion(wf, x, y, spec, c, max_fraction=0.1, points=6, seed=0, batch_size=1000,
                       autocast=contextlib.nullcontext):
    """Deletion and insertion curves of class c, in alpha order and in a random order."""
    row = torch.cat([a[c].detach() for a in wf.alpha])    # (K,) all components, all layers
    g = torch.Generator().manual_seed(seed + c)
    perm = torch.randperm(len(row), generator=g).to(row.device)
    orders = dict(alpha=perm[(1 - row[perm]).argsort(descending=True, stable=True)],
                  random=torch.randperm(len(row), generator=g).to(row.device))
    ks = [round(f * len(row)) for f in torch.linspace(0, max_fraction, points).tolist()]
    frac = torch.tensor(ks, dtype=torch.float64) / len(row)

    def acc(gate):                                        # (accuracy on class c, on the others), %
        net = partial(wf.gated, gates=gate.split([a.shape[1] for a in wf.alpha]))
        ok = predict(net, x, spec, batch_size, autocast).argmax(-1) == y
        return _acc(ok[y == c]), _acc(ok[y != c])

    out = dict(fraction=frac.tolist())
    for curve, start, value in (("deletion", torch.ones_like(row), 0.0), ("insertion", row, 1.0)):
        first = acc(start)                                # k = 0 is the same for both orders
        for name, order in orders.items():
            accs = [first]
            for k in ks[1:]:
                gate = start.clone()
                gate[order[:k]] = value                   # switch off (deletion) / restore (insertion)
                accs.append(acc(gate))
            acc_c, acc_o = torch.tensor(accs, dtype=torch.float64).T      # (points,) each
            area = lambda v: (torch.trapezoid(v, frac) / (frac[-1] - frac[0])).item()
            out[f"{curve}_{name}"] = dict(acc_c=acc_c.tolist(), acc_other=acc_o.tolist(),
                                          auc_c=area(acc_c), auc_other=area(acc_o))
    return out

def explain_subset(x, y, per_class, seed):
    """`per_class` random samples of every class (0 = all): the samples the explanations use."""
    if not per_class:
        return x, y
    g = torch.Generator().manual_seed(seed)
    keep = [(y == k).nonzero().squeeze(1).cpu() for k in y.unique().tolist()]
    keep = torch.cat([i[torch.randperm(len(i), generator=g)[:per_class]] for i in keep])
    return _subset(x, keep), y[keep.to(y.device)]

def explain(wf, data, confusion=None, per_class=100, max_fraction=0.1, seed=0, classes=None,
            batch_size=1000, autocast=contextlib.nullcontext):
    """Every explanation of a trained WFNet, on `per_class` test samples of every class (0 = all),
    the deletion/insertion curves for `classes` (default all). `confusion`: the original model's
    (evaluate()["original"]["confusion_test"]); None computes it."""
    (x, y), spec, nc = data["test"], data["spec"], wf.num_classes
    if confusion is None:
        confusion = _confusion(y, predict(wf, x, spec, batch_size, autocast).argmax(-1), nc)
    x, y = explain_subset(x, y, per_class, seed)
    classes = range(nc) if classes is None else classes
    curves = [dict(cls=c, **deletion_insertion(wf, x, y, spec, c, max_fraction, seed=seed, batch_size=batch_size,
                                               autocast=autocast)) for c in classes]
    alpha = [dict(layer=n, mean_alpha=a.mean().item(), frac_off=(a < 0.5).float().mean(1).tolist())
             for n, a in zip(wf.names, wf.alpha)]         # per weight: fraction off (< 0.5) per class
    return dict(samples=len(y), alpha=alpha, **class_similarity(wf, confusion), curves=curves,
                deletion_alpha_beats_random=sum(r["deletion_alpha"]["auc_c"] < r["deletion_random"]["auc_c"]
                                                for r in curves),
                deletion_others_hold=sum(r["deletion_alpha"]["auc_other"] > r["deletion_alpha"]["auc_c"]
                                         for r in curves))

def save_plots(wf, res, out, names):
    """matrix.png (accuracy per forgotten class x true class) and alpha.png (per filtered weight)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nc, m = wf.num_classes, torch.tensor(res["matrix_test"])
    fig, ax = plt.subplots(figsize=(7, 6))
    fig.colorbar(ax.imshow(m.numpy(), vmin=0, vmax=100, cmap="viridis"), ax=ax)
    if nc <= 20:
        ax.set_xticks(range(nc), names, rotation=90, fontsize=7)
        ax.set_yticks(range(nc), names, fontsize=7)
        for (i, j), v in zip(itertools.product(range(nc), range(nc)), m.flatten().tolist()):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 50 else "k")
    ax.set_title("test accuracy (%): forgotten class (row c of alpha) x true class", fontsize=9)
    _savefig(fig, out / "matrix.png")
    cols = math.ceil(math.sqrt(len(wf.alpha)))
    fig, axes = plt.subplots(math.ceil(len(wf.alpha) / cols), cols, figsize=(3 * cols, 2 * cols), squeeze=False)
    for ax, n, a in itertools.zip_longest(axes.flat, wf.names, wf.alpha):
        ax.axis("off")
        if a is not None:                                 # columns grouped by the class that switches
            a = a.detach().float().cpu()                  # them off most, untouched ones last
            low, who = a.min(0)
            a = a[:, (torch.where(low < 0.99, who, nc) * 2 + low).argsort()]
            ax.imshow(a.numpy(), aspect="auto", vmin=0, vmax=1, cmap="magma", interpolation="nearest")
            ax.set_title(n.removesuffix(".weight"), fontsize=7)
    fig.suptitle("alpha per filtered weight (rows: classes; columns: components; black = off)", fontsize=9)
    _savefig(fig, out / "alpha.png")

def _savefig(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    _write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)

# -----------------------------------------------------------------------------
# checkpoints and results: written to a temporary file, then renamed (nothing is left half-written);
# a checkpoint is {"meta": the settings that made it, "state_dict": tensors}, read weights-only.

def _write(path, write, every_rank=False):
    if every_rank or _rank()[0] == 0:                     # under torchrun, process 0 writes the results
        tmp = Path(f"{path}.{os.getpid()}.tmp")
        write(tmp)
        os.replace(tmp, path)

def _write_json(path, obj):
    _write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))

def save_checkpoint(path, meta, state_dict):
    state_dict = {k: v.cpu() for k, v in state_dict.items()}
    _write(path, lambda tmp: torch.save(dict(meta=meta, state_dict=state_dict), tmp))

def load_checkpoint(path):
    if not Path(path).is_file():
        raise WFError(f"{path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        ckpt = None
    if not (isinstance(ckpt, dict) and {"meta", "state_dict"} <= ckpt.keys()):
        raise WFError(f"{path} is not a readable wfnet checkpoint (truncated or corrupt?); "
                      "delete it or choose another --out")
    return ckpt

def _reusable(path, meta):
    """The checkpoint at `path` if every setting that made it equals `meta`'s; else None. One made
    for another dataset, arch or class count is an error, not a retrain."""
    if not path.exists():
        return None
    ckpt = load_checkpoint(path)
    for k in ("dataset", "arch", "num_classes"):
        if ckpt["meta"].get(k) != meta[k]:
            raise WFError(f"{path} was made for {k}={ckpt['meta'].get(k)!r}, this run has {meta[k]!r}; use another --out")
    if any(ckpt["meta"].get(k) != v for k, v in meta.items()):
        print(f"{path} was made with other settings; making a new one")
        return None
    return ckpt

def model_from_config(cfg, spec, shape, device, pretrained=False):
    """A fresh backbone for these settings, channels_last on `device`; shape is (C, H, W). On an image
    folder: torchvision's get_model(arch), with its ImageNet weights if `pretrained`."""
    if cfg["dataset"] != "imagefolder":
        model = (ResNet18(spec["classes"], shape[0], cfg["width"], cfg.get("stem_stride", 1))
                 if cfg["arch"] == "resnet18" else ViT(spec["classes"], shape[0], shape[1], cfg["width"]))
        return model.to(device, memory_format=torch.channels_last)
    import torchvision
    weights = torchvision.models.get_model_weights(cfg["arch"]).DEFAULT if pretrained else None
    if weights and len(weights.meta["categories"]) != spec["classes"]:
        raise WFError(f"--pretrained: {cfg['arch']}'s weights know {len(weights.meta['categories'])} classes, "
                      f"the image folder has {spec['classes']}")
    size = dict(image_size=shape[1]) if cfg["arch"].startswith("vit") and not weights else {}
    try:
        model = torchvision.models.get_model(cfg["arch"], weights=weights, num_classes=spec["classes"], **size)
    except (OSError, RuntimeError) as e:                  # no internet (urllib's URLError is an OSError)
        raise WFError(f"could not fetch {weights.url} ({type(e).__name__}); put that file in "
                      f"{torch.hub.get_dir()}/checkpoints/") from None
    return model.to(device, memory_format=torch.channels_last)

def load_model(cfg, spec, shape, device, ckpt, path):
    """The backbone for cfg's settings holding the weights of `ckpt` (read from `path`), frozen."""
    for k, want in (("dataset", cfg["dataset"]), ("arch", cfg["arch"]), ("num_classes", spec["classes"]),
                    ("width", cfg.get("width")), ("stem_stride", cfg.get("stem_stride"))):
        if ckpt["meta"].get(k, want) != want:             # same shapes can be another network: say so
            raise WFError(f"{path} was made with {k}={ckpt['meta'][k]!r}, this run has {want!r}"
                          + (f": pass --{k.replace('_', '-')} {ckpt['meta'][k]}" if k in ("width", "stem_stride") else ""))
    model = model_from_config(cfg, spec, shape, device)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise WFError(f"{path} does not fit {cfg['arch']}" + (f" width {cfg['width']}" if "width" in cfg else "")) from None
    return model.eval().requires_grad_(False)

# -----------------------------------------------------------------------------
# command line: train (or reuse, or load --checkpoint, or take torchvision's pretrained) the original
# model, untrain all classes in one round, evaluate and explain every class, write results and plots.

class _Parser(argparse.ArgumentParser):
    def error(self, message):                             # one line and exit status 2, in main()
        raise WFError(message)

def _at_least(low, kind=int, strict=False):
    def check(s):
        if kind(s) < low or (strict and kind(s) == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, not {s}")
        return kind(s)
    check.__name__ = kind.__name__                        # argparse: "invalid int value: 'x'"
    return check

def parse_args(argv=None):
    p = _Parser(description="WF-Net: multi-class unlearning by weight filtering")
    add, positive, count = p.add_argument, _at_least(0, float, strict=True), _at_least(1)
    add("--preset", default="auto", choices=["auto", *PRESETS], help="auto: quick on CPU, full on CUDA")
    add("--dataset", choices=DATASETS)
    add("--arch", help="resnet18 | vit; on an image folder, a torchvision model: resnet18, resnet50, vit_b_16, ...")
    add("--pretrained", action="store_true", help="image folder: torchvision's ImageNet weights as the original")
    add("--image-size", type=_at_least(16), help="image folder: the training crop (224)")
    add("--width", type=count, help="ResNet base width (64 = ResNet-18) or ViT dim")
    add("--stem-stride", type=int, choices=[1, 2], help="ResNet stem: 1 (CIFAR stem) or 2")
    add("--epochs", type=count, help="epochs of the original model")
    add("--lr", type=positive, help="peak learning rate of the original model")
    add("--weight-decay", type=_at_least(0, float))
    add("--augment", action=argparse.BooleanOptionalAction, help="crop/flip for the original model")
    add("--untrain-steps", type=count, help="optimizer steps of the untraining")
    add("--untrain-lr", type=positive, help="Adam learning rate of alpha")
    add("--batch-size", type=_at_least(2), help="of the original model's training")
    add("--untrain-batch-size", type=_at_least(2), help="B: half forget, half retain")
    add("-T", "--T", type=count, dest="T", help="retain label expansion")
    add("--focus", type=_at_least(0, float), help="forget draws by class: remembered + focus (0 = uniform)")
    add("--untrain-augment", action=argparse.BooleanOptionalAction, help="crop/flip in the untraining "
        "(default: as the original model was trained)")
    for i in range(3):
        add(f"--lambda{i}", type=_at_least(0, float))
    add("--eval-train", type=_at_least(0), help="train samples for the train metrics (0 = all)")
    add("--granularity", choices=["channel", "weight"])
    add("--combine", choices=["min", "product"], help="how the rows of a set of classes combine")
    add("--eval-classes", type=int, nargs="+", help=f"the forget classes to evaluate (default all; beyond "
        f"{MAX_CLASSES} classes, {MAX_CLASSES} at random)")
    add("--explain-samples", type=_at_least(0), help="test samples per class to explain (0 = all)")
    add("--seed", type=int)
    add("--seeds", type=int, nargs="+", help="run once per seed, in <out>/seed<k>; mean and std")
    add("--data-dir")
    add("--out", help="output folder (default runs/<dataset>-<arch>)")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add("--compile", action="store_true", default=None, help="torch.compile the original's training")
    add("--checkpoint", help="an original-model checkpoint to start from")
    add("--forget", type=int, nargs="+", help="also export the model with these classes forgotten")
    add("--no-progress", action="store_true")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device != "cpu" and device.split(":")[0] != "cuda":
        raise WFError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device != "cpu" and not torch.cuda.is_available():
        raise WFError("--device cuda was asked for, but no CUDA device is available here")
    if "LOCAL_RANK" in os.environ and device != "cpu":    # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    preset = args.preset if args.preset != "auto" else ("quick" if device == "cpu" else "full")
    dataset, arch = args.dataset or COMMON["dataset"], args.arch or COMMON["arch"]
    if dataset == "imagefolder":
        import torchvision
        if arch not in torchvision.models.list_models(torchvision.models):
            raise WFError(f"--arch {arch}: not one of torchvision's classification models (resnet50, vit_b_16, ...)")
        arch_cfg = dict(ARCHS["torchvision"], **{k: v for k, v in ARCHS["vit"].items() if k != "width"}
                        if arch.startswith("vit") else {}, image_size=224, pretrained=False, eval_train=10000)
    elif arch not in ("resnet18", "vit"):
        raise WFError(f"--arch {arch}: resnet18 or vit (torchvision's models: --dataset imagefolder)")
    elif args.pretrained or args.image_size:
        raise WFError("--pretrained and --image-size are for torchvision's models: --dataset imagefolder")
    else:
        arch_cfg = ARCHS[arch]
    cfg = {**COMMON, **PRESETS[preset], **arch_cfg}
    cfg.update({k: v[preset == "full"] for k, v in arch_cfg.items() if isinstance(v, tuple)})
    cfg.update({k: v for k, v in vars(args).items() if v is not None and k in cfg})
    cfg.update(preset=preset, device=device, checkpoint=args.checkpoint, forget=args.forget,
               progress=not args.no_progress, seeds=args.seeds, eval_classes=args.eval_classes)
    if args.seeds and (len(set(args.seeds)) < len(args.seeds) or args.seed is not None or args.checkpoint):
        raise WFError("--seeds takes distinct seeds and trains one original model each: no --seed or --checkpoint")
    cfg["out"] = cfg["out"] or f"runs/{cfg['dataset']}-{cfg['arch']}"
    return cfg

def autocast_for(device):
    """bf16 autocast on CUDA; float32 on CPU (a context that does nothing)."""
    return partial(torch.autocast, "cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext

def _machine(device):
    return dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__, device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)

MADE_BY = ("dataset", "arch", "width", "stem_stride", "epochs", "batch_size", "augment", "optimizer", "lr",
           "weight_decay", "seed", "image_size", "pretrained")   # the settings an original model records
UNTRAIN = dict(untrain_steps="steps", untrain_batch_size="batch_size", T="T", untrain_lr="lr", lambda0="lambda0",
               lambda1="lambda1", lambda2="lambda2", focus="focus", untrain_augment="augment")   # -> untrain()'s keyword

def run(cfg):
    torch.manual_seed(cfg["seed"])
    dev, out = torch.device(cfg["device"]), Path(cfg["out"])
    autocast = autocast_for(dev)
    data = load_dataset(cfg["dataset"], cfg["data_dir"], dev, cfg.get("image_size", 224))
    spec, (x_tr, y_tr) = data["spec"], data["train"]
    nc, shape = spec["classes"], x_tr.shape[1:] if torch.is_tensor(x_tr) else (3, spec["size"], spec["size"])
    for flag in ("forget", "eval_classes"):
        if any(not 0 <= c < nc for c in cfg[flag] or []):
            raise WFError(f"--{flag.replace('_', '-')} {' '.join(map(str, cfg[flag]))} is out of range 0..{nc - 1}")
    out.mkdir(parents=True, exist_ok=True)

    # 1. the original model: --checkpoint, torchvision's pretrained weights, <out>/original.pt made with
    # these settings, or trained here
    path, t0 = Path(cfg["checkpoint"] or out / "original.pt"), time.time()
    meta = dict(num_classes=nc, **{k: cfg[k] for k in MADE_BY if k in cfg})
    ckpt = load_checkpoint(path) if cfg["checkpoint"] else None if cfg.get("pretrained") else _reusable(path, meta)
    if ckpt is not None:
        model, meta = load_model(cfg, spec, shape, dev, ckpt, path), ckpt["meta"]
        print(f"reusing the original model from {path}")
    elif cfg.get("pretrained"):
        model = model_from_config(cfg, spec, shape, dev, pretrained=True).eval().requires_grad_(False)
        print(f"the original model: torchvision's {cfg['arch']} with its ImageNet weights")
    else:
        model = model_from_config(cfg, spec, shape, dev)
        train_original(torch.compile(model) if cfg["compile"] else model, x_tr, y_tr, spec, cfg["epochs"],
                       cfg["batch_size"], cfg["lr"], cfg["weight_decay"], cfg["seed"], autocast,
                       cfg["progress"], cfg["optimizer"], cfg["augment"])
        meta = {**meta, "train_seconds": time.time() - t0}
        save_checkpoint(path, meta, model.eval().requires_grad_(False).state_dict())
        print(f"trained the original model in {meta['train_seconds']:.0f} s -> {path}")
    t_pre, meta = meta.get("train_seconds", 0.0), {k: v for k, v in meta.items() if k != "train_seconds"}
    if cfg["untrain_augment"] is None:                    # the untraining sees what the original saw
        cfg = {**cfg, "untrain_augment": bool(meta.get("augment", False))}

    # 2. untraining: one round, all classes
    wf = WFNet(model, nc, cfg["granularity"], cfg["combine"])
    wf_meta = {**meta, "eps": EPS, "untrain_seed": cfg["seed"], **{k: cfg[k] for k in ("granularity", *UNTRAIN)}}
    wf_ckpt = None if cfg["checkpoint"] else _reusable(out / "wfnet.pt", wf_meta)
    if wf_ckpt is not None:
        wf.alpha.load_state_dict(wf_ckpt["state_dict"])
        print(f"reusing the memory matrices from {out / 'wfnet.pt'}")
    else:
        t0 = time.time()
        info = untrain(wf, x_tr, y_tr, spec, **{v: cfg[k] for k, v in UNTRAIN.items()}, seed=cfg["seed"],
                       autocast=autocast, progress=cfg["progress"])
        wf_ckpt = dict(meta={**wf_meta, "untrain_seconds": time.time() - t0}, state_dict=wf.alpha.state_dict())
        save_checkpoint(out / "wfnet.pt", **wf_ckpt)
        print(f"untrained all {nc} classes in {wf_ckpt['meta']['untrain_seconds']:.0f} s -> {out / 'wfnet.pt'}"
              + (f" ({info['skipped_steps']} steps skipped: a non-finite loss)" if info["skipped_steps"] else ""))
    t_un = wf_ckpt["meta"]["untrain_seconds"]

    # 3. the classes evaluated from the one checkpoint (a sample of them when there are many), explained
    classes = cfg["eval_classes"] or list(range(nc))
    if not cfg["eval_classes"] and nc > MAX_CLASSES:
        classes = sorted(torch.randperm(nc, generator=torch.Generator().manual_seed(cfg["seed"]))[:MAX_CLASSES].tolist())
    t0 = time.time()
    torch.manual_seed(cfg["seed"] + 1)                    # T_d for ZRF: same arch, random init
    res = evaluate(model, lambda c: partial(wf, forget=c), data, classes,
                   model_from_config(cfg, spec, shape, dev).eval(), cfg["eval_train"], cfg["seed"], autocast=autocast)
    t_ev, t0 = time.time() - t0, time.time()
    res["explain"] = explain(wf, data, res["original"]["confusion_test"], cfg["explain_samples"] if nc <= MAX_CLASSES
                             else 2, seed=cfg["seed"], classes=classes[:20 if nc > MAX_CLASSES else None], autocast=autocast)
    res.update(config={k: v for k, v in cfg.items() if k != "progress"}, original_made_by=meta, class_names=spec["names"],
               times_s=dict(pretrain=t_pre, untrain=t_un, evaluate=t_ev,
                            explain=time.time() - t0), machine=_machine(dev))
    _write_json(out / "results.json", res)
    save_plots(wf, res, out, spec["names"])
    if cfg["forget"]:
        forget = sorted(set(cfg["forget"]))
        path = out / f"forget_{'_'.join(map(str, forget))}.pt"
        save_checkpoint(path, {**meta, "forgotten_classes": forget, "combine": cfg["combine"]},
                        wf.export(forget).state_dict())
        print(f"exported the model without class(es) {forget} -> {path}")
    _print_table(res, spec["names"])
    print("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in res["times_s"].items())
          + f"; results -> {out / 'results.json'}, plots -> {out}/matrix.png, alpha.png")
    return res

def _print_table(res, names):
    m, ex = res["mean"], res["explain"]
    cols = [c for c in ("acc_f_test", "acc_r_test", "orig_acc_r_test", "acc_f_train", "acc_r_train", "zrf",
                        "mia_efficacy") if c in m]
    print(f"original model: test {res['original']['test_acc']:.2f}%, train {res['original']['train_acc']:.2f}%; "
          f"{len(res['per_class'])} of {len(names)} classes evaluated, {len(ex['curves'])} explained\n"
          f"{'forgotten class':>15} " + " ".join(f"{c:>15}" for c in cols))
    for name, r in [(names[r["cls"]], r) for r in res["per_class"]] + [("mean", m)]:
        print(f"{name[:15]:>15} " + " ".join(f"{r[c]:>15.3f}" for c in cols))
    print(f"mean Acc_r drop vs the original on the same samples: {m['acc_r_drop_test']:.2f} points (acc in %; "
          f"lower Acc_f and higher MIA-efficacy are better)\ndeletion in alpha order drops class c faster than a "
          f"random order for {ex['deletion_alpha_beats_random']}/{len(ex['curves'])} classes; alpha-row similarity "
          f"vs confusion: Pearson {ex['pearson']:.2f}, Spearman {ex['spearman']:.2f}")

def run_seeds(cfg):
    """run(cfg) once per seed, in <out>/seed<k>; the mean and sample std of every mean figure."""
    runs = [run({**cfg, "seed": s, "seeds": None, "out": f"{cfg['out']}/seed{s}"}) for s in cfg["seeds"]]
    values = {"original_test_acc": [r["original"]["test_acc"] for r in runs],
              **{k: [r["mean"][k] for r in runs] for k in runs[0]["mean"]},
              **{k: [r["explain"][k] for r in runs] for k in ("deletion_alpha_beats_random", "pearson")}}
    summary = {k: dict(mean=statistics.mean(v), std=statistics.stdev(v) if len(v) > 1 else None, values=v)
               for k, v in values.items()}
    print(f"over seeds {cfg['seeds']}: mean +- sample std (the value of each seed)")
    for k, f in summary.items():
        print(f"{k:>28} {f['mean']:9.3f} +- {f['std'] or float('nan'):6.3f}  ({', '.join(f'{v:.3f}' for v in f['values'])})")
    _write_json(Path(cfg["out"]) / "seeds_results.json", dict(seeds=cfg["seeds"], std="sample (n - 1)", figures=summary))
    return summary

def main(argv=None):
    try:
        cfg = parse_args(argv)
        if "RANK" in os.environ and not dist.is_initialized():   # launched by torchrun: join its processes
            if cfg["device"] != "cpu":
                torch.cuda.set_device(cfg["device"])
            dist.init_process_group("nccl" if cfg["device"] != "cpu" else "gloo")
            if dist.get_rank() > 0:                       # process 0 prints; the others only compute
                sys.stdout, cfg["progress"] = open(os.devnull, "w"), False
        return run_seeds(cfg) if cfg["seeds"] else run(cfg)
    except WFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
