"""
explain.py: forgetting every pair of classes at once, and the explanation pictures, for finished
wfnet.py runs (their original.pt, wfnet.pt and results.json).

    python wfnet.py --seeds 0 1 2 --out runs/quick
    python notebooks/experiments/explain.py runs/quick/seed0 runs/quick/seed1 runs/quick/seed2
    python notebooks/experiments/explain.py --combine product runs/quick/seed0

For each run: every pair of classes forgotten at once, the rows combined by --combine (default: the
run's rule), on the test samples its explanations used (--explain-samples per class); written to
<run>/pairs_<rule>.json, with frac_off.png, similarity.png and curves.png from results.json. With
several runs, the mean and sample std over them.
"""
import argparse, json, sys
from pathlib import Path

import common
import wfnet


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("runs", nargs="+", help="output folders of wfnet.py runs")
    p.add_argument("--combine", choices=["min", "product"], help="how the two rows combine (default: the run's)")
    p.add_argument("--max-pairs", type=int, default=45, help="a random subset beyond this many pairs")
    args = p.parse_args(argv)
    try:
        found = []
        for out in args.runs:
            cfg, data, _, wf = common.load_run(out, **({"combine": args.combine} if args.combine else {}))
            res = common.pairs(wf, data, cfg["explain_samples"], args.max_pairs, cfg["seed"])
            wfnet.write_json(f"{out}/pairs_{wf.combine}.json", res)
            common.plot_explanations(json.loads(Path(out, "results.json").read_text()), out)
            worst = max(res["per_set"], key=lambda r: r["acc_f"])
            print(f"{out}: {len(res['per_set'])} pairs ({wf.combine} of the rows, {res['samples']} test samples): "
                  f"Acc_f {res['mean']['acc_f']:.2f}%, Acc_r {res['mean']['acc_r']:.2f}% "
                  f"({res['mean']['acc_r_drop']:.2f} points below the original); worst pair "
                  f"{[data['spec']['names'][c] for c in worst['classes']]}: Acc_f {worst['acc_f']:.1f}%")
            found.append(res["mean"])
    except wfnet.WFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if len(found) > 1:
        for k in ("acc_f", "acc_r_drop"):
            s = common.summarize([m[k] for m in found])
            print(f"pairs {k} over {len(found)} runs: {s['mean']:.2f} +- {s['std']:.2f} (worst "
                  f"{max(s['values']):.2f})")
    return found


if __name__ == "__main__":
    main()
