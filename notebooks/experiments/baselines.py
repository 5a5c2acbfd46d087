"""
baselines.py: what WF-Net is compared with, on the same data, backbone, seed and metrics.

Each method here unlearns ONE class per run (WF-Net untrains all classes in one round), so
each is run once per chosen class and evaluated with wfnet.evaluate, plus a linear probe.

    python wfnet.py                                          # first: the original model (and WF-Net)
    python notebooks/experiments/baselines.py --method finetune   # then each baseline, all classes
    python notebooks/experiments/baselines.py --method retrain --classes 0 3
    python notebooks/experiments/baselines.py --method wfnet      # the probe for WF-Net itself
    python notebooks/experiments/baselines.py --method neggrad --seeds 0 1 2   # after wfnet.py --seeds 0 1 2

--method: retrain | logit_mask | finetune | neggrad | random_label | wfnet. Every other flag is
wfnet.py's and must match the run that made <out>/original.pt. Writes <out>/baseline_<method>.json.

Budgets (CHOICE, the same for every per-class method, stated in the output): fine-tune,
NegGrad and random label take as many steps as WF-Net's untraining of ALL classes, SGD with
momentum 0.9, lr 0.01 decaying linearly to 0, batch 128; their images are cropped and flipped
exactly when the original model's were (its checkpoint says), the rule WF-Net's untraining follows. Retrain is the original recipe from scratch on the data
without class c. Logit masking sets logit c to -inf and trains nothing.
"""
import argparse, contextlib, copy, sys, time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import wfnet

METHODS = ("retrain", "logit_mask", "finetune", "neggrad", "random_label", "wfnet")
LR = 0.01           # fine-tune, NegGrad, random label: SGD learning rate (linear decay)
ASCENT_CAP = 5.0    # NegGrad: the forget CE stops pushing once above this (no divergence)


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
               autocast=contextlib.nullcontext, augment=False):
    """Fine-tune (retain CE), NegGrad (retain CE - forget CE, capped) or random label
    (retain CE + CE of forget samples with a random other label), `steps` SGD steps; augment:
    crop and flip both batches (as the original model was trained)."""
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
        opt.step()
        sched.step()
    return model.eval()


def unlearn(method, original, data, c, cfg, make, wf=None):
    """The model that forgot class c by `method` (bf16 autocast on CUDA, like wfnet.py)."""
    spec, (x, y) = data["spec"], data["train"]
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
    steps = cfg["untrain_steps"]
    return _sgd_steps(copy.deepcopy(original), x, y, spec, c, steps, method, cfg["batch_size"],
                      cfg["seed"], autocast, cfg["augment"])

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
    args, rest = p.parse_known_args(argv)
    try:
        cfg = {**wfnet.parse_args(rest), **vars(args)}
        if cfg["seeds"]:
            return common.over_seeds(cfg, run, name=f"baseline_{cfg['method']}.json")
        return run(cfg)
    except wfnet.WFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(cfg):
    """One method, its classes, evaluated; cfg is wfnet's plus method, classes, probe_train."""
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
    models, seconds, probes = {}, {}, {}
    for c in classes:
        t0 = time.time()
        net = unlearn(method, copy.deepcopy(original), data, c, cfg, make, wf)
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
    res.update(method=method, classes=classes, budget=_budget(method, cfg, len(x_tr)),
               config=common.config(cfg))
    path = out / f"baseline_{method}.json"
    wfnet.write_json(path, res)
    m = res["mean"]
    print(f"{method} over classes {classes}: Acc_f {m['acc_f_test']:.2f}%, Acc_r "
          f"{m['acc_r_test']:.2f}% ({m['acc_r_drop_test']:.2f} points below the original), "
          f"train Acc_f {m['acc_f_train']:.2f}% / Acc_r {m['acc_r_train']:.2f}%, ZRF {m['zrf']:.3f}, "
          f"MIA-efficacy {m['mia_efficacy']:.3f}, probe on class c {m['probe_c']:.1f}% (the "
          f"original's features: {orig_probe:.1f}%), {m['seconds']:.0f} s per class -> {path}")
    return res


def _budget(method, cfg, n):
    steps = cfg["untrain_steps"]
    return {"retrain": f"the original recipe from scratch without class c: {cfg['epochs']} epochs",
            "logit_mask": "none (logit c set to -inf)",
            "wfnet": "one untraining for all classes (wfnet.pt); exported per class",
            }.get(method, f"{steps} SGD steps (momentum 0.9, lr {LR} linear decay), "
                          f"batch {cfg['batch_size']}, " + ("crop and flip" if cfg["augment"] else "no augmentation")
                          + (f", forget CE capped at {ASCENT_CAP}" if method == "neggrad" else ""))


if __name__ == "__main__":
    main()
