"""
tune.py: untraining settings side by side, untrained from the same original models.

    python wfnet.py --seeds 0 1 2 --out runs/quick       # first: one original model per seed
    python tune.py --seeds 0 1 2 --out runs/quick --try lambda0=3,10 --try lambda2=1,100

Every combination of the --try values (any of untrain_epochs, untrain_batch_size, untrain_lr,
T, lambda0, lambda1, lambda2) is untrained once per seed from <out>/seed<k>/original.pt (the
other settings are wfnet.py's flags) and evaluated on every class with wfnet.evaluate, without
explanations. Printed per combination, as mean and sample std over the seeds: Acc_f and the
Acc_r drop on the training subset (choose on these, so that the test set stays for reporting)
and on the test set; how much of alpha is turned off, 100 * mean(1 - alpha), in the backbone
(every filtered layer but the last) and in the classifier head (the last); the untraining time.
A filter that lives only in the head is logit masking with extra steps: the backbone figure
tells the two apart. Results go to <out>/tune.json; a combination
already there for a seed, with the same settings, is read back, not run again.
"""
import argparse, itertools, json, statistics, sys, time
from pathlib import Path

import torch

import wfnet

TUNABLE = ("untrain_epochs", "untrain_batch_size", "untrain_lr", "T", "lambda0", "lambda1",
           "lambda2")
FIGURES = ("acc_f_train", "acc_r_drop_train", "acc_f_test", "acc_r_drop_test", "backbone_off",
           "head_off", "untrain_s")


def grid(tries, cfg):
    """["lambda0=3,10", "T=2"] -> [{"lambda0": 3.0, "T": 2}, {"lambda0": 10.0, "T": 2}]."""
    axes = {}
    for t in tries:
        key, _, values = t.partition("=")
        if key not in TUNABLE or not values:
            raise wfnet.WFError(f"--try {t!r}: write NAME=V1,V2,... with NAME one of "
                                + ", ".join(TUNABLE))
        try:
            axes[key] = [type(cfg[key])(v) for v in values.split(",")]
        except ValueError:
            raise wfnet.WFError(f"--try {t!r}: {key} takes {type(cfg[key]).__name__} values") from None
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def untrain_and_evaluate(cfg, data, model):
    """One untraining of every class with cfg's settings; the mean figures over the classes."""
    wf = wfnet.WFNet(model, data["spec"]["classes"], cfg["granularity"], cfg["combine"])
    t0 = time.time()
    wfnet.untrain(wf, *data["train"], data["spec"], cfg["untrain_epochs"],
                  cfg["untrain_batch_size"], cfg["T"], cfg["untrain_lr"], cfg["lambda0"],
                  cfg["lambda1"], cfg["lambda2"], cfg["seed"],
                  wfnet.autocast_for(data["train"][0].device), cfg["progress"])
    seconds = time.time() - t0
    m = wfnet.evaluate(wf, data, None, cfg["eval_train"], cfg["seed"])["mean"]
    off = lambda alphas: 100 * torch.cat([(1 - a).flatten() for a in alphas]).mean().item()
    return dict(acc_f_train=m["acc_f_train"], acc_r_drop_train=m["acc_r_drop_train"],
                acc_f_test=m["acc_f_test"], acc_r_drop_test=m["acc_r_drop_test"],
                backbone_off=off(wf.alpha[:-1]), head_off=off(wf.alpha[-1:]), untrain_s=seconds)


def load_original(cfg, data, seed):
    path = Path(cfg["out"]) / f"seed{seed}" / "original.pt"
    if not path.exists():
        raise wfnet.WFError(f"{path} not found: run `python wfnet.py --seeds ...` with the same "
                            "--out and flags first")
    ckpt = wfnet.load_checkpoint(path)
    other = {k: v for k, v in ckpt["meta"].items() if k in cfg and k != "seed" and v != cfg[k]}
    if other:                                             # the settings recorded must be true
        raise wfnet.WFError(f"{path} was trained with " + ", ".join(
            f"{k}={v}" for k, v in other.items()) + ": pass the flags it was made with")
    x = data["train"][0]
    model = wfnet.model_from_config(cfg, data["spec"], x.shape[1:], x.device)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise wfnet.WFError(f"{path} does not fit these flags (arch, width, stem stride?)") from None
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description="untraining settings side by side", add_help=False)
    p.add_argument("--try", dest="tries", action="append", default=[], metavar="NAME=V1,V2",
                   help="values of one untraining setting; repeat for a grid")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = wfnet.parse_args(rest)
        return tune(cfg, grid(args.tries, cfg), cfg["seeds"] or [cfg["seed"]])
    except wfnet.WFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def tune(cfg, combos, seeds):
    path = Path(cfg["out"]) / "tune.json"
    try:
        done = json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError):
        done = []
    data = wfnet.load_dataset(cfg["dataset"], cfg["data_dir"], torch.device(cfg["device"]))
    fixed = {k: v for k, v in wfnet._settings(wfnet._config(cfg)).items()
             if k not in ("seed", "seeds", "forget", "checkpoint", "explain_samples")}
    table = []
    for combo in combos:
        settings = {**fixed, **combo}
        runs = []
        for seed in seeds:
            old = [r for r in done if r["seed"] == seed and r["settings"] == settings
                   and all(k in r for k in FIGURES)]
            if old:
                runs.append(old[0])
                continue
            model = load_original(cfg, data, seed)
            runs.append(dict(seed=seed, settings=settings, **untrain_and_evaluate(
                {**cfg, **combo, "seed": seed}, data, model)))
            done = [r for r in done if r["seed"] != seed or r["settings"] != settings]
            done.append(runs[-1])
            wfnet._write_json(path, dict(runs=done))
            print(f"seed {seed}, {combo}: " + ", ".join(f"{k} {runs[-1][k]:.2f}" for k in FIGURES),
                  flush=True)
        table.append((combo, runs))
    print(f"over seeds {seeds}, mean +- sample std; Acc in %, drop = original's Acc_r minus "
          f"the filtered model's on the same samples (train: {cfg['eval_train'] or 'all'} samples); "
          "*_off = 100 * mean(1 - alpha)")
    print(f"{'settings':>40} " + " ".join(f"{k:>16}" for k in FIGURES))
    for combo, runs in table:
        cells = []
        for k in FIGURES:
            v = [r[k] for r in runs]
            std = f"{statistics.stdev(v):.2f}" if len(v) > 1 else "n/a"
            cells.append(f"{statistics.mean(v):8.2f} +- {std:>4}")
        name = " ".join(f"{k}={v}" for k, v in combo.items()) or "(wfnet.py's settings)"
        print(f"{name:>40} " + " ".join(f"{c:>16}" for c in cells))
    return table


if __name__ == "__main__":
    main()
