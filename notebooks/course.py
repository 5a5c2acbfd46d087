"""
course.py: what the chapters of the course (notebooks/0*.ipynb) share. It imports wfnet and the
experiment helpers; wfnet.py never imports it.

The expensive models live in the command line's own output folder, runs/<dataset>-<arch>/ at the
repository root (runs/fashion-mnist-resnet18/ for the quick ResNet). Each function below loads a
checkpoint there if the settings that made it match, else trains it and saves it (wfnet's public
functions: original_model, reusable, save_checkpoint, load_model). So any chapter runs alone, the
course runs fast in order, and `python wfnet.py` (run from the repository root) reuses the course's
original.pt and wfnet.pt, and the other way round.
"""
import inspect, sys, time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "notebooks" / "experiments")]
import wfnet  # noqa: E402
import baselines  # noqa: E402

# the settings that make an original model, and the command line's untraining settings -> untrain()'s keywords
MADE_BY, RECIPE = wfnet.MADE_BY, wfnet.UNTRAIN


def setup(full=False, *flags):
    """(cfg, data): wfnet's command-line settings (the quick preset, or the full one with
    full=True, plus any flags such as "--arch", "vit") and the dataset on cfg's device. The cache
    is the command line's default folder, with any flags beyond --arch added to its name
    ("--width", "32" -> runs/fashion-mnist-vit-width-32): pass the same --out to reuse it."""
    cfg = wfnet.parse_args(["--preset", "full" if full else "quick", "--data-dir", str(ROOT / "data"),
                            "--no-progress", *flags])
    settings = [f.lstrip("-") for f in flags if f != "--arch" and f != cfg["arch"]]   # beyond the preset's
    cfg["out"] = str(ROOT / "-".join([cfg["out"], *settings]))   # the command line's folder (plus the flags)
    return cfg, wfnet.load_dataset(cfg["dataset"], cfg["data_dir"], cfg["device"])


def _cached(cfg, data, path, meta, train, made, loaded):
    """The model saved at `path` if made with `meta`'s settings, else train() it and save it.
    Returns (model, seconds it took to train)."""
    ckpt = wfnet.reusable(path, meta)
    if ckpt is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        model = train()
        ckpt = dict(meta={**meta, "train_seconds": time.time() - t0}, state_dict=model.eval().state_dict())
        wfnet.save_checkpoint(path, **ckpt)
        print(made)
    else:
        print(loaded)
    return wfnet.load_model(ckpt, cfg["device"], path), ckpt["meta"]["train_seconds"]


def original(cfg, data):
    """The original model for cfg, as the command line makes it (wfnet.original_model): <out>/original.pt
    if made with these settings, else trained and saved there. Returns (model, seconds it took to train)."""
    Path(cfg["out"]).mkdir(parents=True, exist_ok=True)
    model, _, seconds = wfnet.original_model(cfg, data, Path(cfg["out"]))
    return model, seconds


def untrain_defaults():
    """untrain()'s own keyword defaults (its recipe), minus how it reports."""
    skip = ("y", "spec", "seed", "autocast", "progress", "average")
    return {k: p.default for k, p in inspect.signature(wfnet.untrain).parameters.items()
            if p.default is not inspect.Parameter.empty and k not in skip}


def untrained(cfg, data, model, name="wfnet.pt", **changes):
    """A WFNet around `model` with its memory matrices untrained by cfg's recipe (untrain()'s
    defaults in the quick preset), with `changes` of the command line's names (lambda2=100);
    from <out>/<name> if made with these settings. Returns (wf, info): info holds the loss
    history (L_r, L_f, R per step) and the untraining's seconds."""
    cfg = {**cfg, **changes}
    spec, (x, y) = data["spec"], data["train"]
    nc, path, dev = spec["classes"], Path(cfg["out"]) / name, torch.device(cfg["device"])
    wf = wfnet.WFNet(model, nc, cfg["granularity"], cfg["combine"])
    recipe = {v: cfg[k] for k, v in RECIPE.items()}     # untrain()'s keywords
    meta = dict(original=wfnet.fingerprint(model), eps=wfnet.EPS, seed=cfg["seed"], granularity=cfg["granularity"],
                **recipe)                                 # the settings wfnet.run records
    ckpt = wfnet.reusable(path, meta)
    if ckpt is not None and "history" in ckpt["meta"]:
        wf.alpha.load_state_dict(ckpt["state_dict"])
        print(f"loaded the memory matrices from {path}")
        return wf, dict(history=ckpt["meta"]["history"], seconds=ckpt["meta"]["untrain_seconds"])
    t0 = time.time()
    info = wfnet.untrain(wf, x, y, spec, **recipe, seed=cfg["seed"], autocast=wfnet.autocast_for(dev),
                         progress=False)
    seconds = time.time() - t0
    wfnet.save_checkpoint(path, {**meta, "untrain_seconds": seconds, "history": info["history"]},
                          wf.alpha.state_dict())
    print(f"untrained all {nc} classes -> {path}")
    return wf, dict(history=info["history"], seconds=seconds)


def retrained(cfg, data, c):
    """The retrain oracle for class c: the original recipe from scratch on the training data
    without class c (baselines.unlearn), from <out>/retrain_<c>.pt if it is there.
    Returns (model, seconds)."""
    spec, x = data["spec"], data["train"][0]
    dev, path = torch.device(cfg["device"]), Path(cfg["out"]) / f"retrain_{c}.pt"
    make = lambda: wfnet.model_from_config(wfnet.made_by(cfg, data), dev)
    return _cached(cfg, data, path, {**wfnet.made_by(cfg, data), "forgotten_class": c},
                   lambda: baselines.unlearn("retrain", None, data, c, cfg, make),
                   f"retrained without class {c} -> {path}",
                   f"loaded the model retrained without class {c} from {path}")


def accuracy(net, x, y, spec):
    """% of the samples x (uint8) that net classifies as y."""
    return 100 * (wfnet.predict(net, x, spec).argmax(-1) == y).float().mean().item()
