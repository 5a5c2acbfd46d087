"""The medium scale (notebooks/experiments/medium.py): image folders, torchvision's models, the
memory check, torchrun (gloo, CPU)."""
import json, os, subprocess, sys
import urllib.error

import pytest
import torch
import torchvision
from PIL import Image

from conftest import ROOT, randomize, synthetic_images
import medium
import wfnet


def write_image_folder(root, classes=("ant", "bee", "cat"), per_class=(8, 4), size=40):
    """root/train/<class>/*.png and root/val/<class>/*.png: RGB images, a class-coloured square."""
    g = torch.Generator().manual_seed(0)
    for split, n in zip(("train", "val"), per_class):
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = torch.rand(size, size, 3, generator=g) * 80
                img[8 * k:8 * k + 16, 8:24, k % 3] += 170
                Image.fromarray(img.clamp(0, 255).byte().numpy()).save(root / split / name / f"{i}.png")
    return root


def flags(data, out, *more):
    return ["--data-dir", str(data), "--arch", "resnet18", "--image-size", "32", "--epochs", "2", "--batch-size",
            "8", "--untrain-steps", "4", "--untrain-batch-size", "8", "--explain-samples", "2", "--no-progress",
            "--out", str(out), *more]


def test_the_whole_pipeline_on_an_image_folder_with_a_torchvision_resnet(tmp_path, capsys):
    data = write_image_folder(tmp_path / "folder")
    res = medium.main(flags(data, tmp_path / "o"))
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["class_names"] == ["ant", "bee", "cat"] and len(saved["per_class"]) == 3
    assert saved["eval_train_samples"] == 24 and saved["mean"] == pytest.approx(res["mean"])
    assert len(saved["explain"]["alpha"]) == 21           # torchvision's ResNet-18: 20 convs + fc
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(tmp_path / "o" / "original.pt", weights_only=True)["state_dict"])
    capsys.readouterr()
    res = medium.main(flags(data, tmp_path / "o", "--eval-classes", "1"))   # both checkpoints reused
    printed = capsys.readouterr().out
    assert "reusing the original model" in printed and "reusing the memory matrices" in printed
    assert [r["cls"] for r in res["per_class"]] == [1] and len(res["explain"]["curves"]) == 1
    matrix = torch.tensor(res["matrix_test"])
    assert matrix[1].isfinite().all() and matrix[[0, 2]].isnan().all()   # rows of the evaluated class only
    assert not list((tmp_path / "o").glob("*.tmp"))


def test_many_classes_are_sampled_and_the_output_says_so(tmp_path, monkeypatch, capsys):
    data = write_image_folder(tmp_path / "folder", classes=("a", "b", "c", "d"), per_class=(4, 2))
    monkeypatch.setattr(medium, "MAX_CLASSES", 2)         # 4 classes count as many
    res = medium.main(flags(data, tmp_path / "o"))
    assert len(res["per_class"]) == 2 and res["explain"]["samples"] == 4 * 2   # 2 test images per class
    assert "2 of 4 classes evaluated, 2 explained" in capsys.readouterr().out


def test_image_folder_errors_are_one_line(tmp_path, capsys, monkeypatch):
    data = write_image_folder(tmp_path / "folder", per_class=(2, 1))

    def fails(args, message):
        with pytest.raises(SystemExit) as e:
            medium.main(["--data-dir", str(data), "--out", str(tmp_path / "o"), "--no-progress", *args])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err

    fails(["--arch", "resnet9000"], "not one of torchvision's classification models")
    fails(["--arch", "resnet18", "--pretrained"], "weights know 1000 classes, the image folder has 3")
    fails(["--arch", "resnet18", "--untrain-batch-size", "7"], "even")
    (data / "val" / "cat").rename(data / "val" / "dog")
    fails(["--arch", "resnet18"], "different class folders")
    fails(["--arch", "resnet18", "--data-dir", str(tmp_path / "nothing")], "needs train/ and val/")

    def offline(*args, **kwargs):                         # what torchvision raises without internet
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(wfnet.WFError, match="put that file in"):
        medium.make_model("resnet18", 1000, "cpu", pretrained=True)
    with pytest.raises(urllib.error.URLError):            # no weights asked for: the error itself, no url
        medium.make_model("resnet18", 3, "cpu")


def test_memory_matrices_that_would_not_fit_are_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(medium, "free_memory", lambda device: 64 * 2**30)   # a 64 GiB GPU
    with pytest.raises(wfnet.WFError, match=r"25,\d{3},\d{3} weights x 1000 classes\) would need 3\d\d\.\d GiB"):
        medium.check_memory("resnet50", 1000, "weight", torch.device("cpu"))
    need = medium.check_memory("resnet50", 1000, "channel", torch.device("cpu"))
    wf = wfnet.WFNet(torchvision.models.resnet50(num_classes=1000), 1000)   # WFNet itself never refuses
    assert need == 16 * sum(a.numel() for a in wf.alpha)


def test_a_folder_is_datasets_wfnet_reads_in_order(tmp_path):
    data = medium.load_folder(write_image_folder(tmp_path / "folder"), 32)
    x, y = data["train"], wfnet.labels(data["train"])
    sub = wfnet._subset(x, torch.tensor([5, 0, 17]))
    (xb, yb), = wfnet.batches(sub, y, None, [torch.tensor([2, 0])])
    (xa, ya), = wfnet.batches(x, y, None, [torch.tensor([17, 5])])
    assert torch.equal(yb, y[[17, 5]]) and torch.equal(xb, xa) and torch.equal(yb, ya)
    assert xb.shape == (2, 3, 32, 32) and len(sub) == 3 and len(wfnet.predict(lambda t: t.mean((2, 3)), sub)) == 3
    assert data["augmented"].samples is data["train"].samples       # one scan of the folder, two transforms
    assert not torch.equal(*(data["augmented"][3][0] for _ in range(2))) and torch.equal(*(x[3][0] for _ in range(2)))


WORKER = """
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}, {experiments!r}]
import torch.distributed as dist
import medium, wfnet
from conftest import randomize, synthetic_images
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
x, y = synthetic_images(64, nc=4)
wf = randomize(wfnet.WFNet(wfnet.ResNet18(4, 1, width=8).eval(), 4))
start = [a.detach().clone() for a in wf.alpha]
loss = wfnet.wfnet_loss
def nan_on_rank_1_step_2(*args, calls=[0], **kw):
    calls[0] += 1
    out = loss(*args, **kw)
    return (out[0] * float("nan"),) + out[1:] if rank == 1 and calls[0] == 2 else out
wfnet.wfnet_loss = nan_on_rank_1_step_2
info = wfnet.untrain(wf, x, y, dict(wfnet.DATASETS["mnist"]), steps=4, batch_size=8, seed=rank,
                     progress=False, average=medium.average)
torch.save(dict(alpha=wf.alpha.state_dict(), start=start, skipped=info["skipped_steps"]), {out!r} + str(rank))
dist.destroy_process_group()
"""


def torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(str(p) for p in (ROOT, ROOT / "tests", ROOT / "notebooks" / "experiments"))}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_hold_the_same_alpha_and_skip_a_non_finite_step_together(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"),
                                    experiments=str(ROOT / "notebooks" / "experiments"), out=str(tmp_path / "alpha")))
    done = torchrun([str(script)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    zero, one = (torch.load(tmp_path / f"alpha{r}", weights_only=True) for r in (0, 1))
    assert zero["skipped"] == one["skipped"] == 1         # process 1's NaN skipped the step on both
    for k, a0 in zero["alpha"].items():
        assert torch.equal(a0, one["alpha"][k]), k        # the same alpha on every process
    moved = torch.cat([(a - s).abs().flatten() for a, s in zip(zero["alpha"].values(), zero["start"])])
    assert (moved > 1e-3).float().mean() > 0.9            # random starting alpha: the entries moved


def test_the_pipeline_under_torchrun(tmp_path):
    data = write_image_folder(tmp_path / "folder", per_class=(16, 4))
    done = torchrun([str(ROOT / "notebooks" / "experiments" / "medium.py"), *flags(data, tmp_path / "o")], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("trained the original model") == 1   # process 0 prints, the other computes
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["cls"] for r in res["per_class"]] == [0, 1, 2] and res["processes"] == 2   # both shares gathered
    assert not list((tmp_path / "o").glob("*.tmp"))
