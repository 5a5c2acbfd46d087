"""
wfnet.py: WF-Net (Poppi et al., "Multi-Class Explainable Unlearning for Image Classification via
Weight Filtering", arXiv 2304.02049) in one file. A trained classifier is frozen; every filtered
weight W_l gets a memory matrix alpha_l (N_c, K_l) whose row c multiplies W_l. After ONE untraining
round, running the network with row c of every alpha makes it behave as if class c had never been
learned, for any c. "CHOICE:" marks where the paper is silent. The medium scale (image folders,
torchvision's backbones, torchrun) is notebooks/experiments/medium.py, which imports this file.

    python wfnet.py                                   # quick Fashion-MNIST run on a 2-core CPU
    python wfnet.py --dataset cifar10 --device cuda   # the whole pipeline on one GPU
"""
import argparse, contextlib, copy, hashlib, json, math, os, statistics, sys, time, warnings
from functools import partial
from pathlib import Path

import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# -----------------------------------------------------------------------------
# defaults: "quick" finishes on a 2-core CPU, "full" is the paper-scale GPU run; flags override them.

COMMON = dict(dataset="fashion-mnist", arch="resnet18", batch_size=128, untrain_batch_size=128,
              T=1, lambda0=3.0, lambda1=1.0, lambda2=1.0, granularity="channel", combine="min",
              explain_samples=100, seed=0, data_dir="data", out=None, compile=False)
PRESETS = {
    "quick": dict(epochs=3, augment=False, untrain_steps=1400, untrain_lr=0.05, eval_train=10000),
    "full": dict(epochs=30, augment=True, untrain_steps=4875, untrain_lr=0.01, eval_train=0),
}
ARCHS = {  # per backbone: optimizer of the original model; width (and stem stride) as (quick, full)
    "resnet18": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4, width=(16, 64), stem_stride=(2, 1)),
    "vit": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, width=(64, 256)),
}
EPS = 1e-2  # guard of the 1/CE forget term: 1 / (CE + EPS) stays finite, its gradient alive

class WFError(ValueError):
    """Bad input (a flag, a file): the command line prints it as one line, exit status 2."""

# -----------------------------------------------------------------------------
# data: the small datasets live on the device as uint8 tensors (torchvision reads each split once),
# normalized and augmented (random crop with padding, flip) batched there. A map-style Dataset of
# (image, label), images transformed by it, can stand in for them: read through a DataLoader.

LOADER = dict(num_workers=0)  # the DataLoader's settings for a Dataset (medium.py adds workers)
DATASETS = {
    "mnist": dict(tv="MNIST", mean=(0.1307,), std=(0.3081,), pad=2, flip=False),
    "fashion-mnist": dict(tv="FashionMNIST", mean=(0.2860,), std=(0.3530,), pad=2, flip=True),
    "cifar10": dict(tv="CIFAR10", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), pad=4, flip=True),
    "cifar100": dict(tv="CIFAR100", mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), pad=4, flip=True),
}

def load_dataset(name, data_dir="data", device="cpu"):
    """dict(train=(x, y), test=(x, y), spec=...): x uint8 images (N,C,H,W) and y int64 labels, on
    the device; spec: the dataset's normalization, augmentation, class names and source. Read from
    <data_dir>/<tv>/tensors.pt, decoded once (data/image_tree.py writes it from a folder of images),
    else by torchvision (downloading what is missing) and cached there."""
    spec, cache = dict(DATASETS[name]), Path(data_dir) / DATASETS[name]["tv"] / "tensors.pt"
    if not cache.is_file():
        _decode(name, Path(data_dir), cache)
    try:
        saved = torch.load(cache, map_location=device, weights_only=True)
    except Exception:                                     # unreadable, whatever torch raises for it
        raise WFError(f"{cache} is not readable: delete it to decode the dataset again") from None
    spec.update(classes=len(saved["names"]), names=saved["names"], source=saved["source"])
    return dict(spec=spec, train=saved["train"], test=saved["test"])

def _decode(name, root, cache):                           # torchvision's files -> tensors.pt
    import torchvision
    tv, splits = DATASETS[name]["tv"], {}
    for split in ("train", "test"):
        try:                                              # downloads only what is not there yet
            ds = getattr(torchvision.datasets, tv)(str(root), train=split == "train", download=True)
        except (RuntimeError, OSError) as e:              # no network (URLError is an OSError), bad files
            raise WFError(f"{name} not found in {root} and the download failed ({type(e).__name__}): "
                          "put torchvision's files under --data-dir, or see data/README.md") from None
        x = torch.as_tensor(ds.data)                      # MNIST: (N,H,W); CIFAR: (N,H,W,C)
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
        splits[split] = (x.contiguous(), torch.as_tensor(ds.targets).long())
    cache.parent.mkdir(parents=True, exist_ok=True)
    saved = dict(splits, names=list(ds.classes), source=f"torchvision's {tv} files")
    _write(cache, lambda tmp: torch.save(saved, tmp))

def transform(x, spec, augment=False, gen=None):
    """uint8 (B,C,H,W) -> normalized float (channels_last on CUDA); with augment: random crop, flip."""
    x = x.float().div_(255)
    if augment:
        (B, C, H, W), p, dev = x.shape, spec["pad"], x.device
        dy, dx = torch.randint(0, 2 * p + 1, (2, B), generator=gen).to(dev)
        crops = F.pad(x, (p, p, p, p)).unfold(2, H, 1).unfold(3, W, 1)  # (B,C,2p+1,2p+1,H,W)
        x = crops[torch.arange(B, device=dev), :, dy, dx]                # (B,C,H,W)
        if spec["flip"]:
            flip = (torch.rand(B, generator=gen) < 0.5).to(dev)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
    mean, std = (torch.tensor(spec[k], device=x.device).view(1, -1, 1, 1) for k in ("mean", "std"))
    return ((x - mean) / std).contiguous(memory_format=memory_format(x.device))

def memory_format(device):   # channels_last on CUDA only: on CPU it corrupted the heap for convs of < 8 channels
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format

def batches(x, y, spec, index_batches, augment=False, gen=None):
    """(images, labels) on y's device for each index tensor of `index_batches`; x: uint8 images,
    or a Dataset of (image, label) read by a DataLoader (its transform: spec, augment unused)."""
    if isinstance(x, torch.utils.data.Dataset):
        sampler = (idx.tolist() for idx in index_batches)
        for xb, yb in torch.utils.data.DataLoader(x, batch_sampler=sampler, **LOADER):
            fmt = memory_format(y.device) if xb.dim() == 4 else torch.contiguous_format
            yield xb.to(y.device, memory_format=fmt, non_blocking=True), yb.to(y.device)
        return
    for idx in index_batches:
        yield transform(x[idx.to(x.device)], spec, augment, gen), y[idx.to(y.device)]

def labels(ds):                                         # its `targets` (torchvision's), else read
    if isinstance(ds, torch.utils.data.Subset):
        return labels(ds.dataset)[torch.as_tensor(ds.indices)]
    targets = getattr(ds, "targets", None)
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))] if targets is None else targets)

def _split(split, device):                                # (x, y), or a Dataset and its labels
    return (split, labels(split).to(device)) if isinstance(split, torch.utils.data.Dataset) else split

# -----------------------------------------------------------------------------
# backbones: ResNet-18 with a 3x3 stem and no max-pool for 28/32 px (stride 1 is the CIFAR stem;
# the quick preset's stride 2 costs 4x less), and torchvision's Vision Transformer, small: patches of
# 4 px, 6 blocks, a head per 32 dims. Any other classifier can be wrapped: see WFNet.

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

def model_from_config(meta, device):
    """A fresh backbone as `meta` (made_by's settings, or a checkpoint's) describes it."""
    if meta["arch"] == "vit":                            # (image size, patch, blocks, heads, dim, MLP dim)
        import torchvision
        w = meta["width"]
        model = torchvision.models.VisionTransformer(meta["image_size"], 4, 6, max(1, w // 32), w, 2 * w,
                                                     num_classes=meta["num_classes"])
        model.conv_proj = nn.Conv2d(meta["in_channels"], w, 4, 4)   # torchvision's takes 3 channels
    else:
        model = ResNet18(meta["num_classes"], meta["in_channels"], meta["width"], meta.get("stem_stride", 1))
    return model.to(device, memory_format=memory_format(device))

# -----------------------------------------------------------------------------
# weight filtering: for a layer y = W x + b, alpha_l[c] multiplies W. Filtered: every Conv2d and
# Linear weight, and nn.MultiheadAttention's in_proj_weight and out_proj.weight (gated in its own
# forward, below). A weight the model reads without calling its layer is scaled itself (see _plan).
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

def _gate_hook(a, seen, module, inputs, y):               # Conv2d: units on dim 1; Linear: last
    if seen is not None:
        seen[module] = y.shape[0]                         # the output's batch size, for _plan
    return _scale(y, a, module.bias, 1 if isinstance(module, nn.Conv2d) else -1)

def _undoes_a_row_scale(m):   # halving m's weight barely moves its output: weight standardization
    w, conv = m.weight, isinstance(m, nn.Conv2d)
    if w.is_meta or type(m).forward in (nn.Conv2d.forward, nn.Linear.forward):
        return False
    size = [(k - 1) * d + 3 for k, d in zip(m.kernel_size, m.dilation)] if conv else []
    x = torch.randn(2, w.shape[1] * getattr(m, "groups", 1), *size, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        y, half = m(x), torch.func.functional_call(m, {"weight": w / 2}, (x,))
        halves = torch.full((len(w),), 0.5, device=w.device)
        moved = y - _scale(y, halves, m.bias, 1 if conv else -1)   # what a row scale moves
        return bool((half - y).abs().max() < 0.01 * moved.abs().max())

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

UNFILTERED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)   # warned of

class WFNet(nn.Module):
    """Wrap any classifier: freeze it and give every filtered weight a memory matrix.

    wf(x) or wf(x, forget=None): the wrapped model's outputs, unchanged.
    wf(x, forget=c): row c of every alpha; forget=[3, 5]: a set of classes, rows combined.
    wf(x, forget=t): per sample, t a LongTensor (B,) (a class each) or (B, S) (a set each).
    wf.export(forget=c or [3, 5]): a plain copy of the model with the row(s) in its weights.
    """

    def __init__(self, model, num_classes, granularity="channel", combine="min"):
        super().__init__()
        if granularity not in ("channel", "weight") or combine not in ("min", "product"):
            raise ValueError(f"granularity is channel or weight ({granularity!r}), combine min or product ({combine!r})")
        self.model = model.eval().requires_grad_(False)
        self.num_classes, self.granularity, self.combine = num_classes, granularity, combine
        self.names, self.sites, attention, off = [], [], set(), []   # filtered; (module, indices)
        for n, m in model.named_modules():
            prefix = n + "." if n else ""
            if isinstance(m, nn.MultiheadAttention):
                if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
                    raise ValueError(f"{n}: only attention with one embed dim for q, k and v is filtered")
                attention.add(n)
                self.sites.append((m, [len(self.names), len(self.names) + 1]))
                self.names += [prefix + "in_proj_weight", prefix + "out_proj.weight"]
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and n.rpartition(".")[0] not in attention:
                computed = not isinstance(m.weight, nn.Parameter)   # weight norm, a parametrization
                if computed or granularity == "channel" and _undoes_a_row_scale(m):
                    off.append(n)
                    continue
                self.sites.append((m, [len(self.names)]))
                self.names.append(prefix + "weight")
        off += [n for n, m in model.named_modules() if isinstance(m, UNFILTERED)]
        if off:
            warnings.warn(f"WFNet leaves {', '.join(off)} unfiltered: it filters Conv2d, Linear "
                          "and attention, not a layer that recomputes its weight or normalizes it "
                          "per output unit (undoing a row of alpha); fold that into a plain weight")
        self.weights = [model.get_parameter(n) for n in self.names]   # a plain list: not registered again
        self.plan = None                                  # how rows reach the weights: see _plan
        sizes = [w.shape[0] if granularity == "channel" else w.numel() for w in self.weights]
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
        return [a[rows].amin(-2) if self.combine == "min" else a[rows].prod(-2) for a in self.alpha]

    def forward(self, x, forget=None):
        return self.model(x) if forget is None else self.filtered(x, self._rows(forget, x.shape[0]))

    def filtered(self, x, rows):
        """Run with the rows of `rows`, checked classes: (S,) for the batch, (B, S) per sample."""
        if rows.dim() == 1 or (self.granularity == "channel" and self._plan(x)[1]):
            return self.gated(x, self.gates(rows))
        # a set per sample that one pass cannot take: a pass per distinct set, then the order back
        sets, inverse = rows.unique(dim=0, return_inverse=True)
        groups = [(inverse == i).nonzero().squeeze(1) for i in range(len(sets))]
        outs = [self.gated(x[idx], self.gates(s)) for idx, s in zip(groups, sets)]
        return torch.cat(outs)[torch.cat(groups).argsort()]

    def gated(self, x, gates):
        """Run the frozen model with any per-weight gates (one value per component, in [0, 1])."""
        if self.granularity == "channel" and self._plan(x)[0]:
            return self._hooked(x, gates)
        return torch.func.functional_call(self.model, self._scaled(gates), (x,))

    def _scaled(self, gates):                             # {name: the weight times its gates}
        rows = self.granularity == "channel"             # one gate per row of w, else per weight
        view = lambda w: (-1,) + (1,) * (w.dim() - 1) if rows else w.shape
        return {n: (w * g.view(view(w))).contiguous()
                for n, w, g in zip(self.names, self.weights, gates)}

    def _hooked(self, x, gates, seen=None):
        """Channel gates on activations: a hook a layer, nn.MultiheadAttention's own forward."""
        hooks, forwards = [], {}
        try:
            for m, i in self.sites:
                if isinstance(m, nn.MultiheadAttention):  # an instance forward, the old one put back below
                    forwards[m] = m.__dict__.get("forward")
                    m.forward = partial(_gated_attention, m, gates[i[0]], gates[i[1]])
                else:
                    hooks.append(m.register_forward_hook(partial(_gate_hook, gates[i[0]], seen)))
            return self.model(x)
        finally:
            for h in hooks:
                h.remove()
            for m, old in forwards.items():
                m.__dict__.pop("forward")
                if old is not None:
                    m.forward = old

    def _plan(self, x):
        """Once, on 2 samples with random rows: do gates on activations give the weights scaled? Not
        where a weight is read without calling its layer (Swin's F.linear(x, qkv.weight)): then every
        weight is scaled. Returns (exact, one pass takes a row per sample: the batch first everywhere)."""
        if self.plan is None:
            xs, seen, g = x[torch.tensor([0, -1])], {}, torch.Generator().manual_seed(0)
            rows = [torch.rand(w.shape[0], generator=g).to(w) for w in self.weights]
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                gated = self._hooked(xs, rows, seen)
                scaled = torch.func.functional_call(self.model, self._scaled(rows), (xs,))
            tol = 1e-2 * scaled.abs().max().item()        # room for TF32, not a skipped weight
            exact = torch.allclose(gated, scaled, rtol=1e-2, atol=tol)
            self.plan = exact, exact and all(b == 2 for b in seen.values())
        return self.plan

    @torch.no_grad()
    def export(self, forget):
        """A plain copy of the wrapped model with the row(s) of `forget` folded into its weights."""
        if isinstance(forget, torch.Tensor) and forget.dim() > 0:
            raise ValueError("export takes one class or a list of classes, not a per-sample tensor")
        model = copy.deepcopy(self.model).requires_grad_(True)
        for n, w in self._scaled(self.gates(self._rows(forget, None))).items():
            model.get_parameter(n).copy_(w)
        return model

# -----------------------------------------------------------------------------
# untraining: only alpha is trained. A mini-batch of B holds B/2 forget samples, each run with the
# row of its own label, and B/2 retain samples, each repeated T times with a random row c != its
# label (label expansion, (T, B/2)). The loss, both data terms averaged over their samples:
#     L = lambda0 * CE(retain) + lambda1 * 1 / CE(forget) + lambda2 * mean(1 - alpha)
# CHOICE (the recipe, measured over seeds in notebooks/RESULTS.md): Adam on alpha, lr 0.05 decaying
# linearly to 0, B = 128, lambda0 = 3 (1 / CE is easy to satisfy; the retain term needs the weight),
# lambda2 = 1; T = 1 for 1,400 steps (more forget samples than a larger T; half the steps leave pairs
# of classes below the original). Both halves drawn uniformly, neither cropped nor flipped: images an
# unaugmented original never saw teach alpha to repair them, at the other classes' cost.

def wfnet_loss(logits_f, y_f, logits_r, y_r, alpha, lambda0=1.0, lambda1=1.0, lambda2=1.0):
    """The paper's loss. Returns (L, L_r, L_f, R); logits_r/y_r are already T-expanded."""
    L_r = F.cross_entropy(logits_r, y_r)
    ce_f = F.cross_entropy(logits_f, y_f, reduction="none")
    L_f = (1 / (ce_f + EPS)).mean()                       # inverted CE, guarded against CE ~ 0
    R = torch.cat([(1 - a).flatten() for a in alpha]).mean()
    return lambda0 * L_r + lambda1 * L_f + lambda2 * R, L_r, L_f, R

def check_recipe(steps, batch_size, T, lr, lambda0, lambda1, lambda2):   # untrain()'s, and run()'s before training
    rates = (lr, lambda0, lambda1, lambda2)
    if (steps < 1 or batch_size < 2 or batch_size % 2 or T < 1 or lr <= 0 or min(rates) < 0
            or not all(map(math.isfinite, rates))):
        raise ValueError(f"the untraining needs steps >= 1 ({steps}), an even batch size >= 2 ({batch_size}), "
                         f"T >= 1 ({T}), a finite lr > 0 ({lr}), finite lambdas >= 0 {rates[1:]}")

def untrain(wf, x, y=None, spec=None, steps=1400, batch_size=128, T=1, lr=0.05, lambda0=3.0,
            lambda1=1.0, lambda2=1.0, seed=0, autocast=contextlib.nullcontext, progress=True,
            average=None):
    """Train the memory matrices of `wf` for all classes in one round on images x, labels y, or
    a Dataset x (see batches); average(grads, found_inf), if given, runs before every step
    (medium.py's torchrun averages both). Returns the history (L_r, L_f, R a step), the skips."""
    from tqdm import tqdm
    check_recipe(steps, batch_size, T, lr, lambda0, lambda1, lambda2)
    x, y = _split(x if y is None else (x, y), wf.alpha[0].device)
    gen, dev = torch.Generator().manual_seed(seed), y.device
    n, half, nc = len(y), batch_size // 2, wf.num_classes
    if n < batch_size or y.min() < 0 or y.max() >= nc:    # checked once here, not in every step
        raise ValueError(f"untrain needs at least {batch_size} samples and labels in 0..{nc - 1}")
    opt = torch.optim.Adam(wf.alpha.parameters(), lr=lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)  # linear decay to 0
    history, skipped = [], torch.zeros((), device=dev)

    def draws():                                          # B indices a step (B/2 forget, B/2 retain), epoch by epoch
        while True:
            yield from torch.randperm(n, generator=gen)[:n // batch_size * batch_size].view(-1, batch_size)

    wf.train()
    bar = tqdm(range(steps), desc="untrain", disable=not progress, mininterval=2)
    for step, (xb, yb) in zip(bar, batches(x, y, spec, draws(), False, gen)):
        xf, yf, xr, yr = xb[:half], yb[:half], xb[half:], yb[half:]
        shift = torch.randint(1, nc, (T, half), generator=gen).to(dev)
        rows = torch.cat([yf, ((yr + shift) % nc).flatten()])   # own label; (T, B/2) rows != label
        with autocast():
            xs = torch.cat([xf, xr.repeat(T, *[1] * (xr.dim() - 1))])   # (B/2 + T B/2, ...)
            logits = wf.filtered(xs, rows[:, None]).float()
        loss, L_r, L_f, R = wfnet_loss(logits[:half], yf, logits[half:], yr.repeat(T), wf.alpha,
                                       lambda0, lambda1, lambda2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # a non-finite loss never reaches alpha: the fused step is skipped on the device, moments and
        # step count untouched, with no host sync (torch.amp.GradScaler's contract); the schedule advances
        opt.found_inf = (~torch.isfinite(loss)).float()
        if average is not None:
            average([a.grad for a in wf.alpha], opt.found_inf)
        skipped += opt.found_inf
        opt.step()
        sched.step()
        with torch.no_grad():
            for a in wf.alpha:
                a.clamp_(0, 1)                            # the projection back into [0, 1]
        history.append(torch.stack([L_r, L_f, R]).detach())
        if progress and step % 25 == 0:                   # channel granularity: the only host sync
            bar.set_postfix(dict(zip(("L_r", "L_f", "R"), history[-1].tolist())), refresh=False)
    wf.eval()
    if int(skipped) == steps or all(bool((a == 1).all()) for a in wf.alpha):   # no result
        raise WFError(f"the untraining left alpha untouched ({int(skipped)}/{steps} steps skipped: "
                      "a non-finite loss); check the lambdas, the learning rate and the data")
    return dict(history=torch.stack(history).tolist(), skipped_steps=int(skipped), steps=steps)

# -----------------------------------------------------------------------------
# training the original model: SGD with Nesterov momentum (AdamW for the ViT), one-cycle learning
# rate (linear warm-up for 20% of the steps, then linear decay), weight decay off biases and norms.

def train_original(model, x, y, spec, epochs, batch_size=128, lr=0.1, weight_decay=5e-4, seed=0,
                   autocast=contextlib.nullcontext, progress=True, optimizer="sgd", augment=True):
    """Train `model` (or a DistributedDataParallel around it) on images x, labels y, or a Dataset x
    (see batches). A loss turning non-finite stops it with a WFError: nothing diverged is kept."""
    from tqdm import tqdm
    x, y = _split(x if y is None else (x, y), next(model.parameters()).device)
    gen, n = torch.Generator().manual_seed(seed), len(y)
    steps = epochs * (n // batch_size)
    if steps < 1:
        raise WFError(f"{epochs} epochs of batch {batch_size} on {n} training images make no step")
    groups = [dict(params=[p for p in model.parameters() if p.dim() > 1], weight_decay=weight_decay),
              dict(params=[p for p in model.parameters() if p.dim() <= 1], weight_decay=0)]
    opt = (torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99)) if optimizer == "adamw" else
           torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True))
    warm = max(1, int(0.2 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    model.train()
    nonfinite = torch.zeros((), dtype=torch.bool, device=y.device)
    for epoch in tqdm(range(epochs), desc="train", disable=not progress):
        perm = torch.randperm(n, generator=gen)[:n // batch_size * batch_size].view(-1, batch_size)
        for xb, yb in batches(x, y, spec, perm, augment, gen):
            with autocast():
                loss = F.cross_entropy(model(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            nonfinite |= ~torch.isfinite(loss.detach())   # on the device: one host sync an epoch
        if nonfinite:
            raise WFError(f"the original model's loss turned non-finite in epoch {epoch + 1} "
                          f"(lr {lr}, weight decay {weight_decay}): lower the learning rate")
    return model.eval()

# -----------------------------------------------------------------------------
# metrics, for every class c with the model that forgot c: Acc_f(c) on class-c samples (goal ~0),
# Acc_r(c) on all others (goal = original), on test and train, and the N_c x N_c matrix. ZRF
# (Chundawat et al. 2023): 1 - mean JS(M(x) || T_d(x)) over forget samples, T_d a random-init copy;
# the textbook JS, natural log, per sample, so ZRF lies in [1 - ln 2, 1]. MIA-efficacy (SalUn): an SVC
# on the true-label confidence, fit on retain-train (members) vs test (non-members); efficacy = the
# fraction of forget-train samples it judges non-members (higher is better).

@torch.no_grad()
def predict(net, x, spec=None, batch_size=1000, autocast=contextlib.nullcontext, device="cpu"):
    """Softmax probabilities (N, N_c) of net on images x (see batches; a Dataset's on `device`)."""
    out, dummy = [], torch.zeros(len(x), dtype=torch.long, device=getattr(x, "device", device))
    for xb, _ in batches(x, dummy, spec, torch.arange(len(x)).split(batch_size)):
        with autocast():
            out.append(net(xb).float().softmax(-1))
    return torch.cat(out)

def js_divergence(p, q):
    """Per-sample Jensen-Shannon divergence (natural log) between rows of p and q: (N,)."""
    m = (p + q) / 2
    kl = lambda a, b: (a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum(-1)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)

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
             batch_size=1000, autocast=contextlib.nullcontext, each=map):
    """Every metric for every class c in `classes` (default all), a JSON-ready dict: `original` is the
    model before unlearning, `forgotten(c)` the model that forgot c (WF-Net: partial(wf, forget=c));
    data: dict(train=, test=, spec=), (images, labels) or Datasets (see batches). each(row, classes)
    maps the classes to their rows (medium.py shares them out over processes)."""
    dev, spec = next(original.parameters()).device, data.get("spec")
    (x_te, y_te), (x_tr, y_tr) = _split(data["test"], dev), _split(data["train"], dev)
    if eval_train and eval_train < len(y_tr):             # a fixed random subset keeps CPU runs short
        keep = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(seed))[:eval_train]
        x_tr, y_tr = _subset(x_tr, keep), y_tr[keep.to(y_tr.device)]
    run = partial(predict, spec=spec, batch_size=batch_size, autocast=autocast, device=dev)
    orig_te, orig_tr = run(original, x_te), run(original, x_tr)
    nc = orig_te.shape[1]                                 # the class count: the model's outputs
    ok_orig_te, ok_orig_tr = orig_te.argmax(-1) == y_te, orig_tr.argmax(-1) == y_tr
    rand_te = run(random_model, x_te) if random_model is not None else None

    def row(c):
        p_te, p_tr = run(forgotten(c), x_te), run(forgotten(c), x_tr)
        ok_te, ok_tr, f_te, f_tr = p_te.argmax(-1) == y_te, p_tr.argmax(-1) == y_tr, y_te == c, y_tr == c
        conf_tr, conf_te = (p.gather(1, t[:, None]).squeeze(1).cpu() for p, t in ((p_tr, y_tr), (p_te, y_te)))
        out = dict(cls=c, acc_f_test=_acc(ok_te[f_te]), acc_r_test=_acc(ok_te[~f_te]),
                   orig_acc_r_test=_acc(ok_orig_te[~f_te]), acc_f_train=_acc(ok_tr[f_tr]),
                   acc_r_train=_acc(ok_tr[~f_tr]), orig_acc_r_train=_acc(ok_orig_tr[~f_tr]),
                   mia_efficacy=mia_efficacy(conf_tr[~f_tr.cpu()], conf_te[~f_te.cpu()], conf_tr[f_tr.cpu()], seed),
                   per_class_test=_per_class(ok_te, y_te, nc))
        if rand_te is not None:
            out["zrf"] = 1 - js_divergence(p_te[f_te], rand_te[f_te]).mean().item()   # ZRF
        return out

    rows = list(each(row, list(range(nc)) if classes is None else list(classes)))
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

def _subset(x, idx):                                      # images on the device, or a Dataset
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
# design"). Read per layer (the fraction each class switches off), as class-class similarity beside
# the original's confusion, and as deletion / insertion curves: switch components off in the original
# in order of 1 - alpha[c], or restore them in that order into the model filtered by row c; track
# class-c and other-class accuracy, each beside a random order.
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
    rank = torch.tensor(scipy.stats.rankdata(pair.numpy(), axis=1))   # ties share their average rank
    return dict(similarity=sim.tolist(), pearson=torch.corrcoef(pair)[0, 1].nan_to_num().item(),
                spearman=torch.corrcoef(rank)[0, 1].nan_to_num().item())

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
        ok = predict(net, x, spec, batch_size, autocast, y.device).argmax(-1) == y
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
    (x, y), spec, nc = _split(data["test"], wf.alpha[0].device), data.get("spec"), wf.num_classes
    if confusion is None:
        pred = predict(wf, x, spec, batch_size, autocast, y.device).argmax(-1)
        confusion = _confusion(y, pred, nc)
    x, y = explain_subset(x, y, per_class, seed)
    classes = range(nc) if classes is None else classes
    curves = [dict(cls=c, **deletion_insertion(wf, x, y, spec, c, max_fraction, seed=seed, batch_size=batch_size,
                                               autocast=autocast)) for c in classes]
    alpha = [dict(layer=n, mean_alpha=a.mean().item(), frac_off=(a < 0.5).float().mean(1).tolist())
             for n, a in zip(wf.names, wf.alpha)]         # per weight: fraction off (< 0.5) per class
    return dict(samples=len(y), alpha=alpha, **class_similarity(wf, confusion), curves=curves,
                deletion_alpha_beats_random=sum(r["deletion_alpha"]["auc_c"] < r["deletion_random"]["auc_c"]
                                                for r in curves))

def save_plots(wf, res, out, names):
    """The run's two pictures: matrix.png (test accuracy, forgotten x true class) and alpha.png (every
    filtered component per class, a tick where each layer's components begin)."""
    from matplotlib.figure import Figure                  # no pyplot: no backend, no window
    alpha = 100 * torch.cat([a.detach().float().cpu() for a in wf.alpha], 1)   # (N_c, sum K_l), %
    starts, shown = torch.tensor([0] + [a.shape[1] for a in wf.alpha]).cumsum(0)[:-1].tolist(), [0]
    for i, k in enumerate(starts):                        # a layer's name where there is room for it
        shown += [i] if k - starts[shown[-1]] > alpha.shape[1] / 30 else []
    pictures = dict(matrix=(torch.tensor(res["matrix_test"]), "test accuracy (%)", "true class",
                            (range(len(names)), names)),
                    alpha=(alpha, "alpha (%) per class (dark = off)", "filtered layer (where it begins)",
                           ([starts[i] for i in shown], [wf.names[i][:-7] for i in shown])))   # no ".weight"
    for name, (m, title, xlabel, xticks) in pictures.items():
        fig = Figure(figsize=(7, 6))
        ax = fig.subplots()
        fig.colorbar(ax.imshow(m.numpy(), aspect="auto", interpolation="nearest", vmin=0, vmax=100), ax=ax)
        ax.set_xticks(*xticks, fontsize=7, rotation=90)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xticks(starts if name == "alpha" else [], minor=True)   # every layer's start
        ax.set(title=title, xlabel=xlabel, ylabel="forgotten class")
        fig.tight_layout()
        _write(out / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))

# -----------------------------------------------------------------------------
# checkpoints and results: written to a temporary file, then renamed (nothing is left half-written).
# A checkpoint is {"meta": the settings that made it, "state_dict": tensors}, read weights-only; an
# original model is rebuilt from its own meta, and memory matrices record the original they belong to.

MADE_BY = ("dataset", "arch", "width", "stem_stride", "epochs", "batch_size", "augment", "optimizer", "lr",
           "weight_decay", "seed")                        # the settings of cfg that make an original model
UNTRAIN = dict(untrain_steps="steps", untrain_batch_size="batch_size", T="T", untrain_lr="lr", lambda0="lambda0",
               lambda1="lambda1", lambda2="lambda2")   # the command line's settings -> untrain()'s keywords

def _write(path, write):
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)

def write_json(path, obj):
    """obj as JSON at path, written to a temporary file and renamed."""
    _write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))

def save_checkpoint(path, meta, state_dict):
    state_dict = {k: v.cpu() for k, v in state_dict.items()}
    _write(path, lambda tmp: torch.save(dict(meta=meta, state_dict=state_dict), tmp))

def load_checkpoint(path):
    if not Path(path).is_file():
        raise WFError(f"{path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:                                     # truncated, not a zip, not weights only
        ckpt = None
    if not (isinstance(ckpt, dict) and {"meta", "state_dict"} <= ckpt.keys()):
        raise WFError(f"{path} is not a readable wfnet checkpoint (truncated or corrupt?); "
                      "delete it or choose another --out")
    return ckpt

def reusable(path, meta):
    """The checkpoint at `path` if every setting in `meta` is what made it; else None."""
    if not Path(path).exists():
        return None
    ckpt = load_checkpoint(path)
    return ckpt if all(ckpt["meta"].get(k) == v for k, v in meta.items()) else None

def made_by(cfg, data):
    """The settings that make the original model: its shape on this data and its training recipe."""
    shape = data["train"][0].shape[1:]                    # (C, H, W)
    return dict(num_classes=data["spec"]["classes"], in_channels=shape[0], image_size=shape[-1],
                **{k: cfg[k] for k in MADE_BY if k in cfg})

def load_model(ckpt, device, path="the checkpoint"):
    """The original model a checkpoint holds, rebuilt from its own settings, frozen."""
    try:
        model = model_from_config(ckpt["meta"], device)
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError):                      # settings missing, or weights of another shape
        raise WFError(f"{path} does not hold a wfnet backbone with the settings that made it") from None
    return model.eval().requires_grad_(False)

def fingerprint(model):
    """A short hash of a model's weights: memory matrices are reused only with their own original."""
    tensors = [v.detach().cpu().contiguous().flatten().view(torch.uint8) for v in model.state_dict().values()]
    return hashlib.sha256(torch.cat(tensors).numpy().tobytes()).hexdigest()[:16]

# -----------------------------------------------------------------------------
# command line: train (or reuse, or load --checkpoint) the original model, untrain all classes in
# one round, evaluate and explain every class, write results and plots.

def _number(kind, low, strict=False):                     # argparse: finite, >= low (> if strict)
    def parse(text):
        value, sign = kind(text), ">" if strict else ">="
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise argparse.ArgumentTypeError(f"needs a finite number {sign} {low}, not {text}")
        return value
    return parse

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="WF-Net: multi-class unlearning by weight filtering",
                                usage=argparse.SUPPRESS)  # an error is one line, exit status 2
    add = p.add_argument
    add("--preset", default="auto", choices=["auto", *PRESETS], help="auto: quick on CPU, full on CUDA")
    add("--dataset", choices=DATASETS)
    add("--arch", choices=ARCHS)
    add("--width", type=_number(int, 1), help="ResNet base width (64 = ResNet-18) or ViT dim")
    add("--stem-stride", type=int, choices=[1, 2], help="ResNet stem: 1 (CIFAR stem) or 2")
    add("--epochs", type=_number(int, 1), help="epochs of the original model")
    add("--lr", type=_number(float, 0, True), help="peak learning rate of the original model")
    add("--weight-decay", type=_number(float, 0), help="of the original model")
    add("--batch-size", type=_number(int, 1), help="of the original model's training")
    add("--augment", action=argparse.BooleanOptionalAction, help="crop/flip for the original model")
    add("--untrain-steps", type=int, help="optimizer steps of the untraining")
    add("--untrain-lr", type=float, help="Adam learning rate of alpha")
    add("--untrain-batch-size", type=int, help="B: half forget, half retain (even)")
    add("-T", "--T", type=int, dest="T", help="retain label expansion")
    for i, term in enumerate(("retain CE", "1 / forget CE", "R(1 - alpha)")):
        add(f"--lambda{i}", type=float, help=f"weight of {term}")
    add("--granularity", choices=["channel", "weight"])
    add("--combine", choices=["min", "product"], help="how the rows of a set of classes combine")
    add("--eval-train", type=_number(int, 0), help="train samples for the train metrics (0 = all)")
    add("--explain-samples", type=_number(int, 0), help="test samples a class to explain (0 = all)")
    add("--seed", type=int)
    add("--seeds", type=int, nargs="+", help="run once per seed, in <out>/seed<k>; mean and std")
    add("--data-dir")
    add("--out", help="output folder (default runs/<dataset>-<arch>)")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add("--compile", action="store_true", default=None, help="torch.compile the original's training")
    add("--checkpoint", help="an original-model checkpoint to start from")
    add("--no-progress", action="store_true")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device != "cpu" and (device.split(":")[0] != "cuda" or not torch.cuda.is_available()):
        raise WFError(f"--device {device}: choose cpu, or cuda where a CUDA device is available")
    if args.seeds and (len(set(args.seeds)) < len(args.seeds) or args.seed is not None or args.checkpoint):
        raise WFError("--seeds takes distinct seeds and trains one original model each: no --seed or --checkpoint")
    preset = args.preset if args.preset != "auto" else ("quick" if device == "cpu" else "full")
    cfg = {**COMMON, **PRESETS[preset]}
    for k, v in ARCHS[args.arch or COMMON["arch"]].items():
        cfg[k] = v[preset == "full"] if isinstance(v, tuple) else v   # (quick, full)
    cfg.update({k: v for k, v in vars(args).items() if v is not None and k in cfg})
    cfg.update(preset=preset, device=device, checkpoint=args.checkpoint, progress=not args.no_progress,
               seeds=args.seeds)
    cfg["out"] = cfg["out"] or f"runs/{cfg['dataset']}-{cfg['arch']}"
    return cfg

def autocast_for(device):
    """bf16 autocast on a GPU that has bf16; float32 elsewhere (a context that does nothing)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext

def original_model(cfg, data, out):
    """(model, the settings that made it, seconds it took to train): --checkpoint, <out>/original.pt
    if made with cfg's settings, or trained here and saved there."""
    dev, meta = torch.device(cfg["device"]), made_by(cfg, data)
    path = Path(cfg["checkpoint"] or out / "original.pt")
    ckpt = load_checkpoint(path) if cfg["checkpoint"] else reusable(path, meta)
    if ckpt is not None:
        made = (ckpt["meta"].get("dataset"), ckpt["meta"].get("num_classes"))
        if made != (cfg["dataset"], meta["num_classes"]):
            raise WFError(f"{path} was made for {made[0]} with {made[1]} classes, not {cfg['dataset']}")
        print(f"reusing the original model from {path}")
        meta = dict(ckpt["meta"])
        return load_model(ckpt, dev, path), meta, meta.pop("train_seconds", 0.0)
    torch.manual_seed(cfg["seed"])
    model, t0 = model_from_config(meta, dev), time.time()
    train_original(torch.compile(model) if cfg["compile"] else model, *data["train"], data["spec"], cfg["epochs"],
                   cfg["batch_size"], cfg["lr"], cfg["weight_decay"], cfg["seed"], autocast_for(dev),
                   cfg["progress"], cfg["optimizer"], cfg["augment"])
    seconds = time.time() - t0
    save_checkpoint(path, {**meta, "train_seconds": seconds}, model.eval().requires_grad_(False).state_dict())
    print(f"trained the original model in {seconds:.0f} s -> {path}")
    return model, meta, seconds

def run(cfg):
    dev, out = torch.device(cfg["device"]), Path(cfg["out"])
    autocast = autocast_for(dev)
    recipe = {v: cfg[k] for k, v in UNTRAIN.items()}      # untrain()'s keywords
    check_recipe(**recipe)                                # before any training
    data = load_dataset(cfg["dataset"], cfg["data_dir"], dev)
    spec, nc = data["spec"], data["spec"]["classes"]
    print(f"{cfg['dataset']}: {spec['source']}")
    out.mkdir(parents=True, exist_ok=True)
    model, meta, t_pre = original_model(cfg, data, out)

    # one untraining for all classes, reused only for this very original model and these settings
    wf = WFNet(model, nc, cfg["granularity"], cfg["combine"])
    wf_meta = dict(original=fingerprint(model), eps=EPS, seed=cfg["seed"], granularity=cfg["granularity"], **recipe)
    wf_ckpt = reusable(out / "wfnet.pt", wf_meta)
    if wf_ckpt is not None:
        wf.alpha.load_state_dict(wf_ckpt["state_dict"])
        print(f"reusing the memory matrices from {out / 'wfnet.pt'}")
    else:
        t0 = time.time()
        info = untrain(wf, *data["train"], spec, **recipe, seed=cfg["seed"], autocast=autocast,
                       progress=cfg["progress"])
        wf_ckpt = dict(meta={**wf_meta, "original_made_by": meta, "untrain_seconds": time.time() - t0,
                             "history": info["history"]}, state_dict=wf.alpha.state_dict())
        save_checkpoint(out / "wfnet.pt", **wf_ckpt)
        print(f"untrained all {nc} classes in {wf_ckpt['meta']['untrain_seconds']:.0f} s -> {out / 'wfnet.pt'}"
              + (f" ({info['skipped_steps']} steps skipped: a non-finite loss)" if info["skipped_steps"] else ""))

    # every class evaluated from the one checkpoint, and explained
    t0 = time.time()
    torch.manual_seed(cfg["seed"] + 1)                    # T_d for ZRF: same arch, random init
    res = evaluate(model, lambda c: partial(wf, forget=c), data, None, model_from_config(meta, dev).eval(),
                   cfg["eval_train"], cfg["seed"], autocast=autocast)
    t_ev, t0 = time.time() - t0, time.time()
    res["explain"] = explain(wf, data, res["original"]["confusion_test"], cfg["explain_samples"], seed=cfg["seed"],
                             autocast=autocast)
    times = dict(pretrain=t_pre, untrain=wf_ckpt["meta"]["untrain_seconds"], evaluate=t_ev, explain=time.time() - t0)
    res.update(config={k: v for k, v in cfg.items() if k != "progress"}, original_made_by=meta,
               class_names=spec["names"], data_source=spec["source"], times_s=times,
               torch=torch.__version__, device=str(dev),
               gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None)
    write_json(out / "results.json", res)
    save_plots(wf, res, out, spec["names"])
    _print_table(res, spec["names"])
    print("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; results -> {out / 'results.json'}, plots -> {out}/matrix.png, alpha.png")
    return res

def _print_table(res, names):
    m, ex, cols = res["mean"], res["explain"], ["acc_f_test", "acc_r_test", "orig_acc_r_test", "acc_f_train",
                                                "acc_r_train", "zrf", "mia_efficacy"]
    print(f"original model: test {res['original']['test_acc']:.2f}%, train {res['original']['train_acc']:.2f}%\n"
          f"{'forgotten class':>15} " + " ".join(f"{c:>15}" for c in cols))
    for name, r in [(names[r["cls"]], r) for r in res["per_class"]] + [("mean", m)]:
        print(f"{name[:15]:>15} " + " ".join(f"{r[c]:>15.3f}" for c in cols))
    print(f"mean Acc_r drop vs the original on the same samples: {m['acc_r_drop_test']:.2f} points (acc in %; "
          f"lower Acc_f and higher MIA-efficacy are better)\ndeletion in alpha order drops class c faster than a "
          f"random order for {ex['deletion_alpha_beats_random']}/{len(ex['curves'])} classes; alpha-row similarity "
          f"vs confusion: Pearson {ex['pearson']:.2f}, Spearman {ex['spearman']:.2f}")

def main(argv=None):
    try:
        cfg = parse_args(argv)
        if not cfg["seeds"]:
            return run(cfg)
        runs = [run({**cfg, "seed": s, "seeds": None, "out": f"{cfg['out']}/seed{s}"}) for s in cfg["seeds"]]
        print(f"over seeds {cfg['seeds']}: mean +- sample std (the value of each seed)")
        for k, v in {"original_test_acc": [r["original"]["test_acc"] for r in runs],
                     **{k: [r["mean"][k] for r in runs] for k in runs[0]["mean"]}}.items():
            std = statistics.stdev(v) if len(v) > 1 else float("nan")
            print(f"{k:>28} {statistics.mean(v):9.3f} +- {std:6.3f}  ({', '.join(f'{x:.3f}' for x in v)})")
        return runs
    except ValueError as e:                               # WFError, and the library's own range checks
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    main()
