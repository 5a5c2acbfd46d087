"""
common.py: what the experiments share, beside wfnet.py (which never imports this file).

- load_run(out): the data, original model and WFNet of a finished `python wfnet.py --out OUT` run;
- evaluate_sets / pairs: forgetting sets of classes at once (every pair, by default);
- over_seeds: one configuration per seed, each seed's result read back when it exists;
- alpha_off: how much of alpha is off in the backbone and in the classifier head;
- plot_explanations: frac_off.png, similarity.png and curves.png of a run's results.json.
"""
import contextlib, itertools, json, math, os, platform, statistics, sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import wfnet  # noqa: E402

NOT_SETTINGS = ("progress", "seeds", "out", "data_dir")  # where and how a run is shown, not what it computes


def machine(device):
    """Where a measurement ran."""
    return dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__, device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)


def config(cfg):
    """The settings of a run, as written into its results."""
    return {k: v for k, v in cfg.items() if k != "progress"}


def load_run(out, **overrides):
    """(cfg, data, original model, WFNet with the run's memory matrices) of the run in `out`;
    `overrides` change settings that do not change the checkpoints (combine, explain_samples)."""
    out = Path(out)
    try:
        cfg = {**json.loads((out / "results.json").read_text())["config"], **overrides, "progress": False}
    except (OSError, ValueError, KeyError):
        raise wfnet.WFError(f"{out / 'results.json'} is not there or not readable: run `python wfnet.py "
                            f"--out {out}` first") from None
    dev = torch.device(cfg["device"] if cfg["device"] == "cpu" or torch.cuda.is_available() else "cpu")
    data = wfnet.load_dataset(cfg["dataset"], cfg["data_dir"], dev)
    original = Path(cfg.get("checkpoint") or out / "original.pt")   # --checkpoint runs write none
    model = wfnet.load_model(wfnet.load_checkpoint(original), dev, original)
    wf = wfnet.WFNet(model, data["spec"]["classes"], cfg["granularity"], cfg["combine"])
    wf.alpha.load_state_dict(wfnet.load_checkpoint(out / "wfnet.pt")["state_dict"])
    return cfg, data, model, wf


def evaluate_sets(wf, x, y, spec, sets, batch_size=1000, autocast=contextlib.nullcontext):
    """Forget each set of classes at once: Acc_f over all its classes, Acc_r over the rest."""
    run = partial(wfnet.predict, spec=spec, batch_size=batch_size, autocast=autocast)
    ok_orig, rows = run(wf, x).argmax(-1) == y, []
    for s in sets:
        ok = run(partial(wf, forget=list(s)), x).argmax(-1) == y
        f = torch.isin(y, torch.tensor(list(s), device=y.device))
        rows.append(dict(classes=list(s), acc_f=percent(ok[f]), acc_r=percent(ok[~f]),
                         orig_acc_r=percent(ok_orig[~f])))
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("acc_f", "acc_r", "orig_acc_r")}
    mean["acc_r_drop"] = mean["orig_acc_r"] - mean["acc_r"]
    return dict(rule=wf.combine, samples=len(y), per_set=rows, mean=mean)


def percent(ok):
    """% of True in a boolean tensor (nan when empty)."""
    return 100.0 * ok.float().mean().item() if len(ok) else float("nan")


def pairs(wf, data, per_class=100, max_pairs=45, seed=0):
    """Every pair of classes forgotten at once (a random subset of `max_pairs` when there are
    more), on the explanation's test samples."""
    sets = list(itertools.combinations(range(wf.num_classes), 2))
    if len(sets) > max_pairs:
        pick = torch.randperm(len(sets), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        sets = [sets[i] for i in sorted(pick.tolist())]
    return evaluate_sets(wf, *wfnet.explain_subset(*data["test"], per_class, seed), data["spec"], sets)


class Backbone:
    """A WFNet seen without its last filtered weight (the classifier head, held at 1): deletion
    curves of the backbone's components alone (wfnet.deletion_insertion takes it)."""

    def __init__(self, wf):
        self.wf, self.alpha, self.num_classes = wf, wf.alpha[:-1], wf.num_classes

    def gated(self, x, gates):
        return self.wf.gated(x, [*gates, torch.ones_like(self.wf.alpha[-1][0])])


def alpha_off(wf):
    """100 * mean(1 - alpha) over the backbone (every filtered weight but the last) and over the
    classifier head (the last): (backbone, head)."""
    off = lambda alphas: 100 * torch.cat([(1 - a).flatten() for a in alphas]).mean().item()
    return off(wf.alpha[:-1]), off(wf.alpha[-1:])


def summarize(values):
    return dict(mean=statistics.mean(values), values=values,
                std=statistics.stdev(values) if len(values) > 1 else None)


def figures(res):
    """The scalar figures of a wfnet.py or baselines.py result: the original's accuracy, every
    mean metric, the wall times and (for wfnet.py) the explanation summaries."""
    f = {f"original_{k}": res["original"][k] for k in ("test_acc", "train_acc")}
    f.update(res["mean"])
    f.update({f"seconds_{k}": v for k, v in res.get("times_s", {}).items()})
    for k in ("deletion_alpha_beats_random", "pearson", "spearman"):
        if k in res.get("explain", {}):
            f[k] = res["explain"][k]
    return f


def over_seeds(cfg, run_one, name="results.json"):
    """run_one(cfg) once per seed of cfg["seeds"], each in <out>/seed<k>. A seed whose
    <out>/seed<k>/<name> was written with the same settings is read back, not run again.
    Mean and sample standard deviation (n - 1) of every figure -> <out>/seeds_<name>."""
    results = []
    for seed in cfg["seeds"]:
        one = {**cfg, "seed": seed, "out": str(Path(cfg["out"]) / f"seed{seed}"), "seeds": None}
        path = Path(one["out"]) / name
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):                     # none yet, or unreadable: run it
            old = {}
        settings = lambda c: {k: v for k, v in c.items() if k not in NOT_SETTINGS}
        if settings(old.get("config", {})) == settings(json.loads(json.dumps(config(one)))):
            print(f"seed {seed}: reusing {path}")
            results.append(old)
        else:
            print(f"seed {seed}: running into {one['out']}", flush=True)
            results.append(run_one(one))
    per_seed = [figures(r) for r in results]
    summary = dict(seeds=cfg["seeds"], std="sample standard deviation (n - 1)", config=config(cfg),
                   figures={k: summarize([f[k] for f in per_seed]) for k in per_seed[0]
                            if all(k in f for f in per_seed)})
    wfnet.write_json(Path(cfg["out"]) / f"seeds_{name}", summary)
    print(f"over seeds {cfg['seeds']}: mean +- sample std (the values per seed) -> {cfg['out']}/seeds_{name}")
    for k, v in summary["figures"].items():
        std = "n/a" if v["std"] is None else f"{v['std']:.3f}"
        print(f"{k:>28} {v['mean']:10.3f} +- {std:>7}   (" + ", ".join(f"{x:.3f}" for x in v["values"]) + ")")
    return summary

# -----------------------------------------------------------------------------
# pictures of a run's explanations (results.json), beside wfnet.py's matrix.png and alpha.png


def plot_explanations(res, out):
    """frac_off.png (per layer and class), similarity.png (beside the confusion), curves.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ex, names = res["explain"], res["class_names"]
    nc, layers = len(names), [r["layer"].removesuffix(".weight") for r in ex["alpha"]]
    labels = names if nc <= 20 else None
    frac = [[100 * r["frac_off"][c] for r in ex["alpha"]] for c in range(nc)]   # (N_c, layers)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 4))
    heatmap(ax, frac, layers, labels, "components switched off (alpha < 0.5), % of the layer")
    save(fig, Path(out) / "frac_off.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    conf = torch.tensor(res["original"]["confusion_test"]).fill_diagonal_(float("nan"))
    heatmap(axes[0], ex["similarity"], labels, labels, "cosine similarity of 1 - alpha rows")
    heatmap(axes[1], conf, labels, labels, "original model: % of true class (row) predicted as")
    fig.suptitle(f"over class pairs: Pearson {ex['pearson']:.2f}, Spearman {ex['spearman']:.2f}")
    save(fig, Path(out) / "similarity.png")

    cols = min(nc, 5)
    rows = math.ceil(nc / cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3 * cols, 5 * rows), squeeze=False, sharex=True, sharey=True)
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
    save(fig, Path(out) / "curves.png")


def heatmap(ax, m, xlabels, ylabels, title, **kw):
    m = torch.as_tensor(m, dtype=torch.float)
    im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis", **kw)
    ax.set_title(title, fontsize=9)
    if xlabels is not None:
        ax.set_xticks(range(m.shape[1]), xlabels, rotation=90, fontsize=7)
    if ylabels is not None:
        ax.set_yticks(range(m.shape[0]), ylabels, fontsize=7)
    ax.figure.colorbar(im, ax=ax)


def save(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)
    plt.close(fig)
