"""
tune.py: untraining settings side by side, untrained from the same original models.

    python wfnet.py --seeds 0 1 2 --out runs/quick       # first: one original model per seed
    python notebooks/experiments/tune.py --seeds 0 1 2 --out runs/quick --try lambda0=3,10 --try lambda2=1,100

Every combination of the --try values (any of untrain_steps, untrain_batch_size, untrain_lr,
T, lambda0, lambda1, lambda2) is untrained once per seed from <out>/seed<k>/original.pt (the
other settings are wfnet.py's flags) and evaluated on every class with wfnet.evaluate, without
explanations. Printed per combination, as mean, sample std and the worst seed: Acc_f (the mean
over classes and the worst class) and the Acc_r drop on the training subset (choose on these, so
that the test set stays for reporting) and on the test set; how much of alpha is turned off,
100 * mean(1 - alpha), in the backbone (every filtered layer but the last) and in the classifier
head (the last); the untraining time. With --more, also every pair of classes forgotten at once
(100 samples per class of each split) and deletion over the backbone's components alone: for how
many classes the alpha order removes class c faster than a random order (10 test samples'
worth of curves per class, as wfnet.explain).
A filter that lives only in the head is logit masking with extra steps: the backbone figure
tells the two apart. Results go to <out>/tune.json; a combination
already there for a seed, with the same settings, is read back, not run again.
--snap 1,0.9 evaluates one untraining per seed (kept in <out>/seed<k>/tune_alpha.pt) once per
threshold, with every alpha entry at or above it set back to 1 after the untraining (1: none).
"""
import argparse, itertools, json, statistics, sys, time
from functools import partial
from pathlib import Path

import torch

import common
import wfnet

TUNABLE = ("untrain_steps", "untrain_batch_size", "untrain_lr", "T", "lambda0", "lambda1",
           "lambda2")
FIGURES = ("acc_f_train", "worst_acc_f_train", "acc_r_drop_train", "acc_f_test", "worst_acc_f_test",
           "acc_r_test", "acc_r_drop_test", "backbone_off", "head_off", "untrain_s")
MORE = ("pairs_acc_f_train", "pairs_acc_r_drop_train", "pairs_acc_f_test", "pairs_acc_r_drop_test",
        "backbone_deletion_wins")
HIGHER_IS_BETTER = ("backbone_deletion_wins",)


def grid(tries):
    """["lambda0=3,10", "T=2"] -> [{"lambda0": "3", "T": "2"}, {"lambda0": "10", "T": "2"}]."""
    axes = {}
    for t in tries:
        key, _, values = t.partition("=")
        if key not in TUNABLE or not values:
            raise wfnet.WFError(f"--try {t!r}: write NAME=V1,V2,... with NAME one of "
                                + ", ".join(TUNABLE))
        if key in axes:
            raise wfnet.WFError(f"--try gives {key} twice; list its values in one --try")
        axes[key] = values.split(",")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def config(rest, combo):
    """wfnet.py's settings for one combination: its flags parsed, typed and checked by
    wfnet.parse_args, so --try accepts exactly what the command line does."""
    flags = [x for k, v in combo.items() for x in (f"--{k.replace('_', '-')}", v)]
    try:
        cfg = wfnet.parse_args(rest + flags)
        wfnet.check_recipe(**{v: cfg[k] for k, v in wfnet.UNTRAIN.items()})
        return cfg
    except ValueError as e:
        raise wfnet.WFError(f"--try {combo}: {e}") from None


def untrain_only(cfg, data, model):
    """One untraining of every class with cfg's settings: (the WFNet, seconds)."""
    wf = wfnet.WFNet(model, data["spec"]["classes"], cfg["granularity"], cfg["combine"])
    t0 = time.time()
    wfnet.untrain(wf, *data["train"], data["spec"], **{v: cfg[k] for k, v in wfnet.UNTRAIN.items()},
                  seed=cfg["seed"], autocast=wfnet.autocast_for(data["train"][0].device),
                  progress=cfg["progress"])
    return wf, time.time() - t0


def snap_alpha(wf, snap):
    """After the untraining: every alpha entry at `snap` or above set back to exactly 1."""
    with torch.no_grad():
        for a in wf.alpha:
            a.data[a.data >= snap] = 1


def untrain_and_evaluate(cfg, data, model, more=False):
    """One untraining of every class with cfg's settings; the figures over the classes."""
    wf, seconds = untrain_only(cfg, data, model)
    return evaluate_wf(cfg, data, model, wf, seconds, more)


def evaluate_wf(cfg, data, model, wf, seconds, more=False):
    """The figures over the classes of an untrained WFNet."""
    res = wfnet.evaluate(model, lambda c: partial(wf, forget=c), data, None, None, cfg["eval_train"],
                         cfg["seed"])
    m, rows = res["mean"], res["per_class"]
    backbone, head = common.alpha_off(wf)
    out = dict(acc_f_train=m["acc_f_train"], acc_r_drop_train=m["acc_r_drop_train"],
               acc_f_test=m["acc_f_test"], acc_r_test=m["acc_r_test"], acc_r_drop_test=m["acc_r_drop_test"],
               worst_acc_f_train=max(r["acc_f_train"] for r in rows),
               worst_acc_f_test=max(r["acc_f_test"] for r in rows),
               backbone_off=backbone, head_off=head, untrain_s=seconds)
    if more:
        for split in ("train", "test"):
            p = common.pairs(wf, dict(test=data[split], spec=data["spec"]), 100, 45, cfg["seed"])["mean"]
            out.update({f"pairs_acc_f_{split}": p["acc_f"], f"pairs_acc_r_drop_{split}": p["acc_r_drop"]})
        x, y = wfnet.explain_subset(*data["test"], 100, cfg["seed"])
        curves = [wfnet.deletion_insertion(common.Backbone(wf), x, y, data["spec"], c, seed=cfg["seed"])
                  for c in range(wf.num_classes)]
        out["backbone_deletion_wins"] = sum(r["deletion_alpha"]["auc_c"] < r["deletion_random"]["auc_c"]
                                            for r in curves)
    return out


def snapped(cfg, data, model, seed, settings, snaps, more):
    """One untraining (kept in <out>/seed<k>/tune_alpha.pt and reused while its settings are the
    same), evaluated once per threshold in snaps (1 = no snap) from the same memory matrices."""
    keep = Path(cfg["out"]) / f"seed{seed}" / "tune_alpha.pt"
    if keep.exists() and (ck := wfnet.load_checkpoint(keep))["meta"].get("settings") == settings:
        wf = wfnet.WFNet(model, data["spec"]["classes"], cfg["granularity"], cfg["combine"])
        wf.alpha.load_state_dict(ck["state_dict"])
        seconds = ck["meta"]["untrain_s"]
        print(f"seed {seed}: the untrained alpha read back from {keep}", flush=True)
    else:
        wf, seconds = untrain_only(cfg, data, model)
        wfnet.save_checkpoint(keep, dict(settings=settings, untrain_s=seconds), wf.alpha.state_dict())
    untrained = [a.detach().clone() for a in wf.alpha]
    out = {}
    for s in snaps:
        with torch.no_grad():
            for a, u in zip(wf.alpha, untrained):
                a.copy_(u)
        snap_alpha(wf, s)
        t0 = time.time()
        out[s] = evaluate_wf(cfg, data, model, wf, seconds, more)
        print(f"seed {seed}, snap {s}: evaluated in {time.time() - t0:.0f} s", flush=True)
    return out


def load_original(cfg, data, seed):
    path = Path(cfg["out"]) / f"seed{seed}" / "original.pt"
    ckpt = wfnet.reusable(path, wfnet.made_by({**cfg, "seed": seed}, data))
    if ckpt is None:
        raise wfnet.WFError(f"{path}: no original model made with these flags; run `python wfnet.py --seeds ...` "
                            "with the same --out and flags first")
    return wfnet.load_model(ckpt, data["train"][0].device, path)


def main(argv=None):
    p = argparse.ArgumentParser(description="untraining settings side by side", add_help=False)
    p.add_argument("--try", dest="tries", action="append", default=[], metavar="NAME=V1,V2",
                   help="values of one untraining setting; repeat for a grid")
    p.add_argument("--more", action="store_true", help="also pairs and the backbone's deletion curves")
    p.add_argument("--snap", type=lambda v: [float(t) for t in v.split(",")], default=None,
                   metavar="S1,S2", help="after the untraining, set every alpha entry >= S back to 1; "
                   "one untraining per seed evaluated at each S (1 = no snap)")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = wfnet.parse_args(rest)
        if cfg["checkpoint"]:
            raise wfnet.WFError("tune.py starts from <out>/seed<k>/original.pt: drop --checkpoint")
        combos = grid(args.tries)
        return tune(cfg, [(c, config(rest, c)) for c in combos], cfg["seeds"] or [cfg["seed"]], args.more,
                    args.snap)
    except wfnet.WFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _read_runs(path):
    if not path.exists():
        return []
    try:
        runs = json.loads(path.read_text())["runs"]
        if all(isinstance(r["seed"], int) and isinstance(r["settings"], dict) for r in runs):
            return runs
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise wfnet.WFError(f"{path} is not a tune.py result file: move it away or delete it")


def tune(cfg, combos, seeds, more=False, snaps=None):
    """combos: [(the --try values, that combination's full cfg)]. Returns [(values, runs)].
    snaps: thresholds; each combination then becomes one row per threshold (combo + snap=S)."""
    path = Path(cfg["out"]) / "tune.json"
    done = _read_runs(path)
    data = wfnet.load_dataset(cfg["dataset"], cfg["data_dir"], torch.device(cfg["device"]))
    fixed = {k: v for k, v in common.config(cfg).items()
             if k not in common.NOT_SETTINGS + ("seed", "checkpoint", "explain_samples")}
    figures = FIGURES + (MORE if more else ())
    table = []
    for combo, combo_cfg in combos:
        settings = {k: combo_cfg[k] for k in fixed}
        rows = {s: [] for s in snaps} if snaps else {None: []}
        for seed in seeds:
            want = {s: (settings if s is None else {**settings, "snap": s}) for s in rows}
            old = {s: [r for r in done if r["seed"] == seed and r["settings"] == want[s]
                       and all(k in r for k in figures)] for s in rows}
            if all(old.values()):
                for s in rows:
                    rows[s].append(old[s][0])
                continue
            model = load_original(cfg, data, seed)
            t0 = time.time()
            if snaps:
                new = snapped({**combo_cfg, "seed": seed}, data, model, seed, settings, snaps, more)
            else:
                new = {None: untrain_and_evaluate({**combo_cfg, "seed": seed}, data, model, more)}
            for s in rows:
                rows[s].append(dict(seed=seed, settings=want[s], **new[s]))
                done = [r for r in done if r["seed"] != seed or r["settings"] != want[s]]
                done.append(rows[s][-1])
                print(f"seed {seed}, {combo}, snap {s}: " + ", ".join(f"{k} {rows[s][-1][k]:.2f}" for k in figures),
                      flush=True)
            wfnet.write_json(path, dict(runs=done))
            print(f"seed {seed}: {time.time() - t0:.0f} s in all", flush=True)
        for s, runs in rows.items():
            table.append((combo if s is None else {**combo, "snap": s}, runs))
    print(f"over seeds {seeds}: mean +- sample std [the worst seed]; Acc in %, drop = the original's "
          f"Acc_r minus the filtered model's on the same samples (train: {cfg['eval_train'] or 'all'} "
          "samples); worst_acc_f: the least forgotten class; *_off = 100 * mean(1 - alpha)")
    for combo, runs in table:
        print(" ".join(f"{k}={v}" for k, v in combo.items()) or "(wfnet.py's settings)")
        for k in figures:
            v = [r[k] for r in runs]
            std = f"{statistics.stdev(v):.2f}" if len(v) > 1 else "n/a"
            worst = min(v) if k in HIGHER_IS_BETTER else max(v)
            print(f"  {k:>24} {statistics.mean(v):8.2f} +- {std:>5} [{worst:.2f}]")
        print("    per seed: " + "; ".join(f"{k} " + ", ".join(f"{r[k]:.2f}" for r in runs)
                                          for k in figures if k != "untrain_s"))
    return table


if __name__ == "__main__":
    main()
