"""The medium scale: image folders, torchvision's models, the memory check, torchrun (gloo, CPU)."""
import json, os, subprocess, sys
import urllib.error

import pytest
import torch
import torchvision
from PIL import Image

from conftest import ROOT, randomize, synthetic_images
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


def test_the_whole_pipeline_on_an_image_folder_with_a_torchvision_resnet(tmp_path):
    data = write_image_folder(tmp_path / "folder")
    args = ["--dataset", "imagefolder", "--data-dir", str(data), "--arch", "resnet18", "--image-size", "32",
            "--epochs", "2", "--batch-size", "8", "--untrain-steps", "4", "--untrain-batch-size", "8",
            "--explain-samples", "2", "--no-progress", "--out", str(tmp_path / "o"), "--forget", "2"]
    res = wfnet.main(args)
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["class_names"] == ["ant", "bee", "cat"] and len(saved["per_class"]) == 3
    assert saved["eval_train_samples"] == 24 and saved["mean"] == pytest.approx(res["mean"])
    assert len(saved["explain"]["alpha"]) == 21           # torchvision's ResNet-18: 20 convs + fc
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(tmp_path / "o" / "forget_2.pt", weights_only=True)["state_dict"])
    res = wfnet.main(args + ["--eval-classes", "1"])      # the checkpoints are reused
    assert [r["cls"] for r in res["per_class"]] == [1] and len(res["explain"]["curves"]) == 1
    matrix = torch.tensor(res["matrix_test"])
    assert matrix[1].isfinite().all() and matrix[[0, 2]].isnan().all()   # rows of the evaluated class only


def test_many_classes_are_sampled_and_the_output_says_so(tmp_path, monkeypatch, capsys):
    data = write_image_folder(tmp_path / "folder", classes=("a", "b", "c", "d"), per_class=(4, 2))
    monkeypatch.setattr(wfnet, "MAX_CLASSES", 2)          # 4 classes count as many
    res = wfnet.main(["--dataset", "imagefolder", "--data-dir", str(data), "--arch", "resnet18", "--image-size",
                      "32", "--epochs", "1", "--batch-size", "8", "--untrain-steps", "2", "--untrain-batch-size", "8",
                      "--no-progress", "--out", str(tmp_path / "o")])
    assert len(res["per_class"]) == 2 and res["explain"]["samples"] == 4 * 2   # 2 test images per class
    assert "2 of 4 classes evaluated, 2 explained" in capsys.readouterr().out


def test_image_folder_errors_are_one_line(tmp_path, capsys, monkeypatch):
    data = write_image_folder(tmp_path / "folder", per_class=(2, 1))
    base = ["--dataset", "imagefolder", "--data-dir", str(data), "--out", str(tmp_path / "o"), "--no-progress"]

    def fails(args, message):
        with pytest.raises(SystemExit) as e:
            wfnet.main(base + args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1

    fails(["--arch", "resnet9000"], "not one of torchvision's classification models")
    fails(["--pretrained"], "weights know 1000 classes, the image folder has 3")
    (data / "val" / "cat").rename(data / "val" / "dog")
    fails([], "different class folders")
    fails(["--data-dir", str(tmp_path / "nothing")], "needs train/ and val/")
    def offline(*args, **kwargs):                         # what torchvision raises without internet
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    monkeypatch.setattr(wfnet, "_image_folder", lambda root, spec, device, size: dict(   # ImageNet's 1000 classes
        spec={**spec, "classes": 1000, "names": list(map(str, range(1000))), "size": size, "device": device},
        train=([], torch.zeros(0, dtype=torch.long)), test=([], torch.zeros(0, dtype=torch.long))))
    fails(["--pretrained"], "put that file in")


def test_small_datasets_keep_their_own_backbones(capsys):
    for args, message in ((["--arch", "resnet50"], "resnet18 or vit"), (["--pretrained"], "--dataset imagefolder")):
        with pytest.raises(SystemExit):
            wfnet.main(args)
        assert message in capsys.readouterr().err


def test_memory_matrices_that_would_not_fit_are_refused_before_allocating(monkeypatch):
    model = torchvision.models.resnet50()
    monkeypatch.setattr(wfnet, "_free_memory", lambda device: 64 * 2**30)   # a 64 GiB GPU
    with pytest.raises(wfnet.WFError, match=r"1000 x 25,\d{3},\d{3} weights\) would need 3\d\d\.\d GiB"):
        wfnet.WFNet(model, 1000, granularity="weight")
    wf = wfnet.WFNet(model, 1000)                         # the channel granularity: 26,560 x 1000
    assert sum(a.numel() for a in wf.alpha) == 1000 * sum(w.shape[0] for w in wf.weights)


WORKER = """
import sys, torch
sys.path.insert(0, {root!r})
import torch.distributed as dist
import wfnet
from conftest import randomize, synthetic_images
dist.init_process_group("gloo")
torch.manual_seed(0)
x, y = synthetic_images(64, nc=4)
wf = randomize(wfnet.WFNet(wfnet.ResNet18(4, 1, width=4).eval(), 4))
spec = dict(wfnet.DATASETS["mnist"])
wfnet.untrain(wf, x, y, spec, steps=4, batch_size=16, progress=False)
if dist.get_rank() == 0:
    torch.save(wf.alpha.state_dict(), {out!r})
dist.destroy_process_group()
"""


def torchrun(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_untrain_as_one_on_the_same_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT / "tests"), out=str(tmp_path / "alpha.pt")))
    done = torchrun([str(script)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.manual_seed(0)
    x, y = synthetic_images(64, nc=4)
    wf = randomize(wfnet.WFNet(wfnet.ResNet18(4, 1, width=4).eval(), 4))   # random alpha: every entry moves
    start = [a.detach().clone() for a in wf.alpha]
    wfnet.untrain(wf, x, y, dict(wfnet.DATASETS["mnist"]), steps=4, batch_size=16, progress=False)
    two = torch.load(tmp_path / "alpha.pt", weights_only=True)
    for (k, a), a0 in zip(wf.alpha.state_dict().items(), start):
        assert torch.allclose(two[k], a, atol=1e-5), k
        assert ((a - a0).abs() > 1e-3).float().mean() > 0.9   # they moved: the comparison is not of idle ones


def test_the_command_line_under_torchrun(tmp_path, mnist):
    flags = mnist(256, 100) + ["--explain-samples", "2", "--untrain-steps", "4", "--eval-train", "64"]
    done = torchrun([str(ROOT / "wfnet.py"), *flags], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("trained the original model") == 1   # process 0 prints, the other computes
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["cls"] for r in res["per_class"]] == list(range(10))   # both processes' classes gathered
    assert not list((tmp_path / "o").glob("*.tmp"))


def test_each_process_gets_its_share_of_both_halves_from_memory_and_from_disk(monkeypatch):
    x, y = synthetic_images(16, nc=4)
    spec = dict(wfnet.DATASETS["mnist"], device=torch.device("cpu"))
    on_disk = torch.utils.data.TensorDataset(wfnet.transform(x, spec), y)   # read through a DataLoader
    idx = torch.tensor([3, 1, 4, 15, 9, 2, 6, 5])          # forget half 3 1 4 15, retain half 9 2 6 5
    for rank, mine in ((0, [3, 1, 9, 2]), (1, [4, 15, 6, 5])):   # its part of each half
        monkeypatch.setattr(wfnet, "_rank", lambda: (rank, 2))
        (xm, ym), = wfnet.batches(x, y, spec, [idx], parts=2)
        (xd, yd), = wfnet.batches(on_disk, y, spec, [idx], parts=2)
        assert torch.equal(ym, y[mine]) and torch.equal(yd, y[mine])
        assert torch.equal(xm, wfnet.transform(x[mine], spec)) and torch.allclose(xd, xm)
