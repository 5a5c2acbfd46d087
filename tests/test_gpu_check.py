"""notebooks/experiments/gpu_check.sh, the prepared check for a lent GPU, run on the CPU in a tiny
setting so that it cannot rot: both runs, a summary whose numbers are the results files', and only
what a lent machine sends back (at most 8 files, 2 folders down) under $OUT."""
import json, os, subprocess, sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

SCRIPT = ROOT / "notebooks" / "experiments" / "gpu_check.sh"
CLASSES = [f"class{k}" for k in range(10)]               # cifar10's entry: 3 x 32 x 32, any class names
# the smallest run wfnet.py takes: 60 images make 3 steps of batch 16; untraining batch 8 <= 60
TINY = ("--preset quick --width 4 --epochs 1 --batch-size 16 --untrain-steps 4 --untrain-batch-size 8 "
        "--eval-train 100 --explain-samples 2")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """train/<class>/*.png (6 a class) and test/<class>/*.png (4), 32 x 32 RGB; and a data folder
    that the first test decodes the tree into and the next reuses."""
    root, g = tmp_path_factory.mktemp("gpu_check"), np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        for k, name in enumerate(CLASSES):
            (root / "tree" / split / name).mkdir(parents=True)
            for i in range(n):
                a = g.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(a).save(root / "tree" / split / name / f"{i}.png")
    return root / "tree", root / "data"


KNOBS = {"PYTHON", "TREE", "DATA_DIR", "DEVICE", "RUNS", "WORK", "EXTRA", "COMPILE", "EAGER_EPOCHS", "RUN_LIMIT",
         "EAGER_LIMIT", "TOTAL_LIMIT", "OUT"}          # the script's: none comes from the caller's environment


def gpu_check(tmp_path, tree, **env):
    # COMPILE=0: on a CPU, compiling the training took 105 s at width 8, and at width 4 it crashed
    env = dict(PYTHON=sys.executable, TREE=str(tree[0]), DATA_DIR=str(tree[1]), OUT=str(tmp_path / "out"),
               WORK=str(tmp_path / "work"), DEVICE="cpu", COMPILE="0", EXTRA=TINY, OMP_NUM_THREADS="1", **env)
    base = {k: v for k, v in os.environ.items() if k not in KNOBS}
    return subprocess.run(["bash", str(SCRIPT)], env={**base, **env}, capture_output=True, text=True, timeout=600)


def test_both_runs_and_a_summary_of_their_results(tmp_path, tree):
    r = gpu_check(tmp_path, tree, EAGER_EPOCHS="2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = tmp_path / "out" / "gpu_check"
    res = {name: json.loads((runs / name / "results.json").read_text()) for name in ("compiled", "eager")}
    epochs = {name: x["original_made_by"]["epochs"] for name, x in res.items()}
    assert epochs == {"compiled": 1, "eager": 2}           # EAGER_EPOCHS wins over EXTRA's --epochs
    assert res["compiled"]["config"]["device"] == "cpu" and res["compiled"]["class_names"] == CLASSES
    summary = (runs / "summary.txt").read_text()
    assert summary.strip() in r.stdout and summary.startswith("GPU: ")
    for name, x in res.items():                           # every number printed is the run's own
        for row in x["per_class"]:
            assert (f"forget {CLASSES[row['cls']]:>12}: Acc_f test {row['acc_f_test']:6.2f}%, "
                    f"train {row['acc_f_train']:6.2f}%") in summary
        m = x["mean"]
        assert (f"mean Acc_r drop: test {m['acc_r_drop_test']:.2f}, "
                f"train {m['acc_r_drop_train']:.2f} points") in summary
        assert f"original model: test accuracy {x['original']['test_acc']:.2f}%" in summary
        assert "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in x["times_s"].items()) in summary
    per_epoch = {name: x["times_s"]["pretrain"] / epochs[name] for name, x in res.items()}
    ratio = per_epoch["compiled"] / per_epoch["eager"]
    assert f"compiled / eager seconds per training epoch: {ratio:.3f}" in summary
    out = tmp_path / "out"
    back = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert back == sorted(["gpu_check/log.txt", "gpu_check/summary.txt", *[
        f"gpu_check/{name}/{f}" for name in res for f in ("alpha.png", "matrix.png", "results.json")]])
    assert (tmp_path / "work" / "compiled" / "original.pt").is_file()   # the checkpoints stay out of $OUT


def test_a_run_stopped_at_its_limit_is_reported_and_the_exit_status_is_1(tmp_path, tree):
    r = gpu_check(tmp_path, tree, RUN_LIMIT="2", EAGER_LIMIT="2")   # stopped while python starts
    assert r.returncode == 1
    summary = (tmp_path / "out" / "gpu_check" / "summary.txt").read_text()
    for name in ("compiled", "eager"):
        assert f"run {name}: stopped at its time limit" in summary
        assert f"== run {name}: stopped at its limit of 2 s" in r.stdout
    assert "no results" in summary and "seconds per training epoch: not measured" in summary


def test_no_tree_is_one_clear_line_and_nothing_runs(tmp_path):
    r = gpu_check(tmp_path, (tmp_path / "no-tree.tar.xz", tmp_path / "data"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"gpu_check.sh: no CIFAR-10 image tree at TREE={tmp_path / 'no-tree.tar.xz'}")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
