"""The data step: data/image_tree.py decodes a tree of images into the tensor file that
wfnet.load_dataset reads, and torchvision's own files are cached the same way."""
import subprocess, sys, tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import wfnet
from conftest import ROOT, write_mnist_like

sys.path.insert(0, str(ROOT / "data"))
import image_tree  # noqa: E402  (data/image_tree.py)

SHARED = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
CLASSES = ["airplane", "bird", "cat"]                    # any names; sorted, they are the labels


def write_tree(root, per_class=(4, 2), size=(32, 32), seed=0):
    """train/<class>/*.png and test/<class>/*.png (lossless: pixels compare exactly); returns the
    (x, y) each split should decode to, classes in sorted order."""
    g, out = np.random.default_rng(seed), {}
    for split, n in zip(("train", "test"), per_class):
        xs, ys = [], []
        for k, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                a = g.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(a).save(root / split / name / f"{i:04d}.png")
                xs.append(torch.from_numpy(a).permute(2, 0, 1))
                ys.append(k)
        out[split] = (torch.stack(xs), torch.tensor(ys))
    return out


def test_a_tree_decodes_into_what_load_dataset_reads(tmp_path, monkeypatch):
    ref = write_tree(tmp_path / "tree")
    out, _ = image_tree.convert(tmp_path / "tree", "cifar10", tmp_path / "data")
    assert out == tmp_path / "data" / "CIFAR10" / "tensors.pt"
    import torchvision                                    # the tensor file is read, never torchvision's
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", None)
    d = wfnet.load_dataset("cifar10", tmp_path / "data")
    for split in ("train", "test"):
        assert torch.equal(d[split][0], ref[split][0]) and torch.equal(d[split][1], ref[split][1])
        assert d[split][0].dtype == torch.uint8 and d[split][1].dtype == torch.long
    assert d["spec"]["names"] == CLASSES and d["spec"]["classes"] == 3
    assert "tree" in d["spec"]["source"] and "image_tree.py" in d["spec"]["source"]


def test_a_tar_archive_of_the_tree_decodes_the_same(tmp_path):
    ref = write_tree(tmp_path / "top" / "tree")           # one folder above train/ and test/, as tars often have
    with tarfile.open(tmp_path / "tree.tar.xz", "w:xz") as tar:
        tar.add(tmp_path / "top" / "tree", arcname="tree")
    image_tree.convert(tmp_path / "tree.tar.xz", "cifar10", tmp_path / "data")
    d = wfnet.load_dataset("cifar10", tmp_path / "data")
    assert torch.equal(d["test"][0], ref["test"][0]) and torch.equal(d["train"][1], ref["train"][1])
    assert d["spec"]["source"].startswith("tree.tar.xz")


@pytest.mark.parametrize("damage, message", [
    ("sizes", "images of 2 shapes"),
    ("no test", "neither a tar archive nor a folder with train/ and test/"),
    ("empty class", "holds no images"),
    ("not a tar", "not a readable tar archive"),
])
def test_a_bad_tree_is_one_line_and_exit_status_2(tmp_path, damage, message):
    write_tree(tmp_path / "tree")
    target = tmp_path / "tree"
    if damage == "sizes":
        Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "tree" / "train" / "cat" / "odd.png")
    elif damage == "no test":
        for f in (tmp_path / "tree" / "test").rglob("*.png"):
            f.unlink()
        for d in sorted((tmp_path / "tree" / "test").iterdir()):
            d.rmdir()
        (tmp_path / "tree" / "test").rmdir()
    elif damage == "empty class":
        for f in (tmp_path / "tree" / "test" / "bird").iterdir():
            f.unlink()
    else:
        target = tmp_path / "tree.tar.xz"
        target.write_bytes(b"not an archive")
    r = subprocess.run([sys.executable, str(ROOT / "data" / "image_tree.py"), str(target), "--root",
                        str(tmp_path / "data")], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data" / "CIFAR10").exists()   # nothing half-written


def test_torchvision_files_are_decoded_once_then_read_from_the_tensor_file(tmp_path):
    ref = write_mnist_like(tmp_path, "MNIST", 30, 20)
    first = wfnet.load_dataset("mnist", tmp_path)
    assert (tmp_path / "MNIST" / "tensors.pt").is_file() and first["spec"]["source"] == "torchvision's MNIST files"
    for f in (tmp_path / "MNIST" / "raw").iterdir():      # torchvision's files gone: the cache is enough
        f.unlink()
    again = wfnet.load_dataset("mnist", tmp_path)
    for split in ("train", "test"):
        assert torch.equal(again[split][0], ref[split][0]) and torch.equal(again[split][1], ref[split][1])
    assert again["spec"]["names"] == first["spec"]["names"] and again["spec"]["classes"] == 10


def test_an_unreadable_tensor_file_is_a_clear_error(tmp_path):
    (tmp_path / "CIFAR10").mkdir()
    (tmp_path / "CIFAR10" / "tensors.pt").write_bytes(b"truncated")
    with pytest.raises(wfnet.WFError, match="tensors.pt is not readable: delete it"):
        wfnet.load_dataset("cifar10", tmp_path)


@pytest.mark.skipif(not SHARED.is_file(), reason="the shared CIFAR-10 copy is not on this machine")
def test_the_shared_cifar10_copy_decodes_whole(tmp_path):
    image_tree.convert(SHARED, "cifar10", tmp_path)
    d = wfnet.load_dataset("cifar10", tmp_path)
    assert d["train"][0].shape == (50000, 3, 32, 32) and d["test"][0].shape == (10000, 3, 32, 32)
    assert torch.bincount(d["train"][1]).tolist() == [5000] * 10
    assert torch.bincount(d["test"][1]).tolist() == [1000] * 10
    assert d["spec"]["names"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                  "ship", "truck"]               # torchvision's order
    mean = d["train"][0].float().div(255).mean((0, 2, 3))
    assert torch.allclose(mean, torch.tensor(wfnet.DATASETS["cifar10"]["mean"]), atol=0.005)
