"""
baselines.py: what WF-Net is compared with, on the same data, backbone, seed and metrics.

Each method here unlearns ONE class per run (WF-Net untrains all classes in one round), so
each is run once per chosen class and evaluated with wfnet.evaluate, plus a linear probe.

    python wfnet.py                                          # first: the original model (and WF-Net)
    python notebooks/experiments/baselines.py --method finetune   # then each baseline, all classes
    python notebooks/experiments/baselines.py --method retrain --classes 0 3
    python notebooks/experiments/baselines.py --method wfnet      # the probe for WF-Net itself
    python notebooks/experiments/baselines.py --method neggrad --seeds 0 1 2   # after wfnet.py --seeds 0 1 2
    python notebooks/experiments/baselines.py --method ssd --relearn   # SSD, and how fast class c comes back

--method: retrain | logit_mask | finetune | neggrad | random_label | ssd | salun | wfnet. SSD takes
--ssd-alpha, --ssd-lambda, --ssd-samples, --ssd-order; --relearn adds the relearning figure to every
method.
Every other flag is wfnet.py's and must match the run that made <out>/original.pt. Writes
<out>/baseline_<method>.json.

Budgets (CHOICE, the same for every per-class method, stated in the output): fine-tune,
NegGrad, random label and SalUn take as many steps as WF-Net's untraining of ALL classes, SGD
with momentum 0.9, lr 0.01 decaying linearly to 0, batch 128; their images are cropped and flipped
exactly when the original model's were (its checkpoint says), the rule WF-Net's untraining follows.
Retrain is the original recipe from scratch on the data without class c. Logit masking sets logit
c to -inf and trains nothing. SSD (Foster et al., AAAI 2024) trains nothing: two diagonal Fishers,
one on the training data (every image, or --ssd-samples of them; once a run) and one on class c's
training images, then a dampening of the weights class c needs more than the rest do. SalUn (Fan et
al., ICLR 2024) is random label on the half of the weights with the largest forget-loss gradient.

Relearning (--relearn): the model that forgot c is fine-tuned on a fixed sample of the training
set, 50 class-c images among 450 others (drawn with the seed: the same for every method), SGD lr
0.01, momentum 0.9, batch 64, no augmentation; every 5 steps its Acc_f on 200 class-c test images
is measured. relearn_steps = the steps until that Acc_f reaches half the original model's class-c
test accuracy (0: already there), None when 300 steps do not get there. Few steps: the forgotten
class was only hidden; logit masking never relearns, since its mask stays on.
"""
import argparse, contextlib, copy, sys, time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import wfnet

METHODS = ("retrain", "logit_mask", "finetune", "neggrad", "random_label", "ssd", "salun", "wfnet")
LR = 0.01           # fine-tune, NegGrad, random label, SalUn: SGD learning rate (linear decay)
ASCENT_CAP = 5.0    # NegGrad: the forget CE stops pushing once above this (no divergence)
SSD_ALPHA = 10.0    # SSD: a weight is selected when I_Df > alpha * I_D (the paper's, class forgetting)
SSD_LAMBDA = 1.0    # SSD: a selected weight is scaled by min(lambda * I_D / I_Df, 1) (the paper's)
SSD_BATCH = 64      # SSD: batch of the per-batch Fisher (the reference code's default; it sets the scale)
# SSD's I_D batches: "shuffled" (mixed classes) or "by-class", as the reference's unshuffled loader
# (class after class) makes them. CHOICE: shuffled. By class, I_D is about the mean of the classes'
# own importances, so with 10 classes alpha = 10 puts alpha * I_D near their sum: few weights pass.
SALUN_KEEP = 0.5    # SalUn: fraction of all weights that random label may move (the paper's 50% sparsity)
# relearning (--relearn): the model that forgot class c, fine-tuned on a few class-c images among
# others (SGD, momentum 0.9, no augmentation); the figure is the steps until Acc_f(c) comes back
RELEARN = dict(
    forget=50,          # class-c training images in the relearning set
    retain=450,         # other training images in it (both drawn with the seed: the same for every method)
    lr=0.01,            # constant
    batch=64,           # drawn at random from the relearning set
    every=5,            # steps between two measurements of Acc_f
    max_steps=300,      # not back by then: None (the mean skips it; relearn_reached counts the others)
    test_images=200,    # class-c test images Acc_f is measured on (a fixed subset)
    target=0.5,         # back: Acc_f >= target x the original model's class-c test accuracy
)


class LogitMask(nn.Module):
    """The original model with logit c suppressed: Acc_f = 0 by construction."""

    def __init__(self, model, c):
        super().__init__()
        self.model, self.c = model, c

    def forward(self, x):
        out = self.model(x).clone()
        out[:, self.c] = float("-inf")
        return out


def _sgd_steps(model, x, y, spec, c, steps, mode, batch_size=128, seed=0,
               autocast=contextlib.nullcontext, augment=False, mask=None):
    """Fine-tune (retain CE), NegGrad (retain CE - forget CE, capped) or random label
    (retain CE + CE of forget samples with a random other label), `steps` SGD steps; augment:
    crop and flip both batches (as the original model was trained); mask ({name: 0/1}, SalUn):
    only the weights at 1 move (no weight decay, so a zero gradient leaves momentum at zero too)."""
    g = torch.Generator().manual_seed(seed)
    retain, forget = (y != c).nonzero().squeeze(1), (y == c).nonzero().squeeze(1)
    model.requires_grad_(True)                            # the original arrives frozen
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    nc = spec["classes"]
    model.train()
    for _ in range(steps):
        ir = retain[torch.randint(len(retain), (batch_size,), generator=g).to(retain.device)]
        with autocast():
            loss = F.cross_entropy(model(wfnet.transform(x[ir], spec, augment, g)), y[ir])
        if mode != "finetune":
            n = batch_size // 2
            f = forget[torch.randint(len(forget), (n,), generator=g).to(forget.device)]
            with autocast():
                logits = model(wfnet.transform(x[f], spec, augment, g))
            if mode == "neggrad":
                loss = loss - F.cross_entropy(logits, y[f]).clamp(max=ASCENT_CAP)
            else:                                         # random label: any class but c
                wrong = (c + torch.randint(1, nc, (n,), generator=g).to(y.device)) % nc
                loss = loss + F.cross_entropy(logits, wrong)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if mask is not None:
            for name, p in model.named_parameters():
                if p.grad is not None:
                    p.grad.mul_(mask[name])
        opt.step()
        sched.step()
    return model.eval()

# -----------------------------------------------------------------------------
# SSD (Selective Synaptic Dampening): the diagonal Fisher importance of every weight on the
# training data, I_D, and on the forget class, I_Df. A weight far more important to class c than to
# the data (I_Df > alpha * I_D) is dampened: multiplied by beta = min(lambda * I_D / I_Df, 1).

def fisher(model, x, y, spec, batch_size=SSD_BATCH, autocast=contextlib.nullcontext):
    """{name: importance} of every parameter: the mean over batches of the squared gradient of the
    batch's mean CE, as SSD's reference code computes it (not per-sample squares); eval mode (the
    BatchNorm running statistics), no augmentation, the batches in the order of x."""
    model.eval().requires_grad_(True)
    names, params = zip(*model.named_parameters())
    imp = [torch.zeros_like(p, dtype=torch.float) for p in params]
    chunks = torch.arange(len(y), device=y.device).split(batch_size)
    for idx in chunks:
        with autocast():
            loss = F.cross_entropy(model(wfnet.transform(x[idx], spec)).float(), y[idx])
        for i, g in zip(imp, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:                             # None: a weight the forward never used
                i += g.float() ** 2
    return {n: i / len(chunks) for n, i in zip(names, imp)}


@torch.no_grad()
def ssd_dampen(model, imp_all, imp_forget, alpha=SSD_ALPHA, lam=SSD_LAMBDA):
    """SSD's step, in place: every parameter with I_Df > alpha * I_D times min(lam * I_D / I_Df, 1);
    all others untouched (bit for bit)."""
    for n, p in model.named_parameters():
        d, f = imp_all[n], imp_forget[n]
        beta = (lam * d / f).clamp(max=1)                 # nan where 0 / 0: never selected
        p.copy_(torch.where(f > alpha * d, p * beta, p))
    return model

# -----------------------------------------------------------------------------
# SalUn (weight saliency): the gradient of the forget loss, over all of class c's training images,
# names the weights that matter to c; random label then moves only those (SALUN_KEEP of them).

def salun_mask(model, x, y, spec, c, keep=SALUN_KEEP, batch_size=256, autocast=contextlib.nullcontext):
    """{name: 0/1 mask like the parameter}: 1 on the `keep` fraction of all parameters, ranked
    jointly, with the largest |gradient of the mean CE over the class-c samples| (eval mode, no
    augmentation; ties in the order of model.parameters())."""
    model.eval().requires_grad_(True)
    names, params = zip(*model.named_parameters())
    grads = [torch.zeros_like(p, dtype=torch.float) for p in params]
    forget = (y == c).nonzero().squeeze(1)
    for idx in forget.split(batch_size):
        with autocast():
            logits = model(wfnet.transform(x[idx], spec)).float()
        loss = F.cross_entropy(logits, y[idx], reduction="sum") / len(forget)
        for s, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                s += g.float()
    size = torch.cat([g.abs().flatten() for g in grads])  # (all parameters,)
    top = size.argsort(descending=True, stable=True)[:int(keep * len(size))]
    flat = torch.zeros_like(size).index_fill_(0, top, 1.0)
    masks = flat.split([p.numel() for p in params])
    return {n: m.view_as(p).to(p.dtype) for n, m, p in zip(names, masks, params)}


def unlearn(method, original, data, c, cfg, make, wf=None, cache=None):
    """The model that forgot class c by `method` (bf16 autocast on CUDA, like wfnet.py); cache: a
    dict that keeps what every class shares (SSD's I_D) from one call to the next."""
    spec, (x, y) = data["spec"], data["train"]
    cache = {} if cache is None else cache
    autocast = wfnet.autocast_for(x.device)
    if method == "logit_mask":
        return LogitMask(original, c)
    if method == "wfnet":
        return wf.export(c).eval()
    if method == "retrain":
        keep = y != c
        torch.manual_seed(cfg["seed"])
        return wfnet.train_original(make(), x[keep], y[keep], spec, cfg["epochs"],
                                    cfg["batch_size"], cfg["lr"], cfg["weight_decay"], cfg["seed"],
                                    autocast, progress=False, optimizer=cfg["optimizer"],
                                    augment=cfg["augment"])
    if method == "ssd":                                   # cfg without SSD's flags: the defaults
        alpha, lam = cfg.get("ssd_alpha", SSD_ALPHA), cfg.get("ssd_lambda", SSD_LAMBDA)
        if "imp_all" not in cache:                        # I_D: once a run (the first class's seconds)
            g = torch.Generator().manual_seed(cfg["seed"])
            keep = torch.randperm(len(y), generator=g)[:cfg.get("ssd_samples") or len(y)].to(y.device)
            if cfg.get("ssd_order") == "by-class":        # the reference's unshuffled loader
                keep = keep[y[keep].argsort(stable=True)]
            cache["imp_all"] = fisher(original, x[keep], y[keep], spec, autocast=autocast)
        imp_forget = fisher(original, x[y == c], y[y == c], spec, autocast=autocast)
        return ssd_dampen(original, cache["imp_all"], imp_forget, alpha, lam)
    mask = salun_mask(original, x, y, spec, c, autocast=autocast) if method == "salun" else None
    mode = "random_label" if method == "salun" else method
    return _sgd_steps(copy.deepcopy(original), x, y, spec, c, cfg["untrain_steps"], mode,
                      cfg["batch_size"], cfg["seed"], autocast, cfg["augment"], mask=mask)

# -----------------------------------------------------------------------------
# relearning: was class c erased, or only hidden? Fine-tune the model that forgot it on a few
# class-c images among others, and count the steps until its accuracy on class c comes back.

def relearn_steps(model, data, c, target, seed=0, autocast=contextlib.nullcontext):
    """Steps of fine-tuning (as RELEARN says) until Acc_f on class c's test images (a fixed subset)
    is >= target (%), measured before the first step and every RELEARN["every"] steps: 0 when
    already there, None when not within RELEARN["max_steps"]. `model` itself is not changed; a
    LogitMask is fine-tuned under its mask. The images are drawn with `seed`, the same for every model."""
    spec, (x, y), (x_te, y_te) = data["spec"], data["train"], data["test"]
    r, g = RELEARN, torch.Generator().manual_seed(seed)
    pick = lambda idx, k: idx[torch.randperm(len(idx), generator=g)[:k].to(idx.device)]
    pool = torch.cat([pick((y == c).nonzero().squeeze(1), r["forget"]),
                      pick((y != c).nonzero().squeeze(1), r["retain"])])
    x_c = x_te[pick((y_te == c).nonzero().squeeze(1), r["test_images"])]
    model = copy.deepcopy(model).requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=r["lr"], momentum=0.9)
    for step in range(r["max_steps"] + 1):
        if step % r["every"] == 0:
            pred = wfnet.predict(model.eval(), x_c, spec, autocast=autocast).argmax(-1)
            if 100.0 * (pred == c).float().mean().item() >= target:
                return step
        if step == r["max_steps"]:
            return None
        b = pool[torch.randint(len(pool), (r["batch"],), generator=g).to(pool.device)]
        model.train()
        with autocast():
            loss = F.cross_entropy(model(wfnet.transform(x[b], spec)).float(), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()                                   # LogitMask: loss inf, its gradients finite
        opt.step()

# -----------------------------------------------------------------------------
# the representation check: does class c survive in the penultimate features? A linear probe
# (softmax regression, full batch, Adam) is fit on the features the model gives to
# `probe_train` training samples of every class, and scored on the class-c test samples.

@torch.no_grad()
def features(model, x, spec, batch_size=1000):
    """Inputs of the last nn.Linear (the penultimate features), (N, D)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    out = []
    hook = last.register_forward_pre_hook(lambda m, inputs: out.append(inputs[0].float()))
    try:
        for i in range(0, len(x), batch_size):
            model(wfnet.transform(x[i:i + batch_size], spec))
    finally:
        hook.remove()
    return torch.cat(out)


def probe_accuracy(model, data, probe_train=10000, epochs=300, seed=0):
    """Per class k: % of class-k test samples a linear probe on the model's features puts in k."""
    spec, (x_tr, y_tr), (x_te, y_te) = data["spec"], data["train"], data["test"]
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(x_tr), generator=g)[:probe_train].to(x_tr.device)
    f_tr, f_te = features(model, x_tr[keep], spec), features(model, x_te, spec)
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
    probe = nn.Linear(f_tr.shape[1], spec["classes"]).to(f_tr.device)
    opt = torch.optim.Adam(probe.parameters(), lr=0.01)
    with torch.enable_grad():
        for _ in range(epochs):
            loss = F.cross_entropy(probe(f_tr), y_tr[keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
    ok = probe(f_te).argmax(-1) == y_te
    return [100.0 * ok[y_te == k].float().mean().item() for k in range(spec["classes"])]

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="per-class unlearning baselines, evaluated like WF-Net",
                                add_help=False)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--classes", type=int, nargs="+", help="classes to forget (default: all)")
    p.add_argument("--probe-train", type=int, default=10000, help="probe training samples")
    p.add_argument("--ssd-alpha", type=wfnet._number(float, 0), default=SSD_ALPHA, help="SSD's selection")
    p.add_argument("--ssd-lambda", type=wfnet._number(float, 0), default=SSD_LAMBDA, help="SSD's dampening")
    p.add_argument("--ssd-samples", type=wfnet._number(int, 0), default=0,
                   help="training images of SSD's I_D, a random subset (0 = all)")
    p.add_argument("--ssd-order", choices=["shuffled", "by-class"], default="shuffled",
                   help="SSD: the batches of I_D, classes mixed or one class after another")
    p.add_argument("--relearn", action="store_true", help="steps until a relearned class c is back")
    args, rest = p.parse_known_args(argv)
    # SSD's flags (another method) and --relearn (off) stay out of the settings: runs made before
    # they existed are still read back by --seeds
    own = {k: v for k, v in vars(args).items()
           if not ((k.startswith("ssd_") and args.method != "ssd") or (k == "relearn" and not v))}
    try:
        cfg = {**wfnet.parse_args(rest), **own}
        if cfg["seeds"]:
            return common.over_seeds(cfg, run, name=f"baseline_{cfg['method']}.json")
        return run(cfg)
    except wfnet.WFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(cfg):
    """One method, its classes, evaluated; cfg is wfnet's plus method, classes, probe_train (and
    ssd_alpha, ssd_lambda, ssd_samples, ssd_order for SSD; relearn when on)."""
    dev, out = torch.device(cfg["device"]), Path(cfg["out"])
    data = wfnet.load_dataset(cfg["dataset"], cfg["data_dir"], dev)
    spec, (x_tr, _) = data["spec"], data["train"]
    nc = spec["classes"]
    method = cfg["method"]
    classes = cfg["classes"] if cfg["classes"] is not None else list(range(nc))
    if any(not 0 <= c < nc for c in classes):
        raise wfnet.WFError(f"--classes must lie in 0..{nc - 1}")
    make = lambda: wfnet.model_from_config(wfnet.made_by(cfg, data), dev)
    path = Path(cfg["checkpoint"] or out / "original.pt")
    if not path.exists():
        raise wfnet.WFError(f"{path} not found: run `python wfnet.py` with the same flags first")
    ckpt = wfnet.load_checkpoint(path)
    original = wfnet.load_model(ckpt, dev, path)
    cfg = {**cfg, "augment": ckpt["meta"].get("augment", cfg["augment"])}   # the original's own recipe
    wf = None
    if method == "wfnet":
        wf = wfnet.WFNet(copy.deepcopy(original), nc, cfg["granularity"], cfg["combine"])
        if not (out / "wfnet.pt").exists():
            raise wfnet.WFError(f"{out / 'wfnet.pt'} not found: run `python wfnet.py` first")
        ckpt = wfnet.load_checkpoint(out / "wfnet.pt")
        wf.alpha.load_state_dict(ckpt["state_dict"])
        shared = ckpt["meta"].get("untrain_seconds", float("nan")) / nc   # one untraining, N_c classes
    models, seconds, probes, cache = {}, {}, {}, {}
    for c in classes:
        t0 = time.time()
        net = unlearn(method, copy.deepcopy(original), data, c, cfg, make, wf, cache)
        seconds[c] = time.time() - t0 if wf is None else shared
        models[c] = net.requires_grad_(False)
        probes[c] = probe_accuracy(net, data, cfg["probe_train"], seed=cfg["seed"])[c]
        print(f"{method}: class {c} in {seconds[c]:.0f} s, probe on class {c}: "
              f"{probes[c]:.1f}%", flush=True)
    torch.manual_seed(cfg["seed"] + 1)                    # the same T_d as wfnet.py's
    random_model = make().eval()
    res = wfnet.evaluate(original, models.__getitem__, data, classes, random_model, cfg["eval_train"],
                         cfg["seed"])
    for r in res["per_class"]:
        r["probe_c"], r["seconds"] = probes[r["cls"]], seconds[r["cls"]]
    orig_probe = probe_accuracy(original, data, cfg["probe_train"], seed=cfg["seed"])
    orig_probe = sum(orig_probe[c] for c in classes) / len(classes)
    res["mean"].update(probe_c=sum(probes.values()) / len(probes), original_probe_c=orig_probe,
                       seconds=sum(seconds.values()) / len(seconds))
    if cfg.get("relearn"):
        for r in res["per_class"]:
            c = r["cls"]
            target = RELEARN["target"] * res["original"]["per_class_test_acc"][c]
            r["relearn_steps"] = relearn_steps(models[c], data, c, target, cfg["seed"],
                                               wfnet.autocast_for(dev))
            print(f"{method}: class {c} back to {target:.1f}% after {r['relearn_steps']} steps", flush=True)
        back = [r["relearn_steps"] for r in res["per_class"] if r["relearn_steps"] is not None]
        res["mean"].update(relearn_steps=sum(back) / len(back) if back else float("nan"),
                           relearn_reached=len(back))             # the mean is over these classes only
        res["relearn"] = dict(RELEARN, momentum=0.9)
    res.update(method=method, classes=classes, budget=_budget(method, cfg, len(x_tr)),
               config=common.config(cfg))
    path = out / f"baseline_{method}.json"
    out.mkdir(parents=True, exist_ok=True)                # a --checkpoint run may name a new folder
    wfnet.write_json(path, res)
    m = res["mean"]
    relearned = (f", relearned in {m['relearn_steps']:.0f} steps ({m['relearn_reached']} of {len(classes)} "
                 f"classes back within {RELEARN['max_steps']})" if cfg.get("relearn") else "")
    print(f"{method} over classes {classes}: Acc_f {m['acc_f_test']:.2f}%, Acc_r "
          f"{m['acc_r_test']:.2f}% ({m['acc_r_drop_test']:.2f} points below the original), "
          f"train Acc_f {m['acc_f_train']:.2f}% / Acc_r {m['acc_r_train']:.2f}%, ZRF {m['zrf']:.3f}, "
          f"MIA-efficacy {m['mia_efficacy']:.3f}, probe on class c {m['probe_c']:.1f}% (the "
          f"original's features: {orig_probe:.1f}%), {m['seconds']:.0f} s per class{relearned} -> {path}")
    return res


def _budget(method, cfg, n):
    sgd = (f"{cfg['untrain_steps']} SGD steps (momentum 0.9, lr {LR} linear decay), "
           f"batch {cfg['batch_size']}, " + ("crop and flip" if cfg["augment"] else "no augmentation"))
    if method == "ssd":
        n_d = min(cfg["ssd_samples"] or n, n)
        return (f"no training: diagonal Fisher (squared gradient of the batch-mean CE, batches of "
                f"{SSD_BATCH}, eval mode, no augmentation) on {n_d} training images ({cfg['ssd_order']}, "
                f"once) and on class c's; alpha {cfg['ssd_alpha']}, lambda {cfg['ssd_lambda']}")
    return {"retrain": f"the original recipe from scratch without class c: {cfg['epochs']} epochs",
            "logit_mask": "none (logit c set to -inf)",
            "wfnet": "one untraining for all classes (wfnet.pt); exported per class",
            "neggrad": f"{sgd}, forget CE capped at {ASCENT_CAP}",
            "salun": f"{sgd}, random label on the {100 * SALUN_KEEP:.0f}% of weights with the largest "
                     "|forget CE gradient| (all class-c training images)",
            }.get(method, sgd)


if __name__ == "__main__":
    main()
