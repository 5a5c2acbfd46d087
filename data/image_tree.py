"""
image_tree.py: a tree of images of one size, `train/<class>/*` and `test/<class>/*` (a folder, or a
.tar, .tar.gz, .tar.xz of one), decoded once into the tensor file wfnet.py reads for a dataset:

    python data/image_tree.py ../shared/data/cifar10-jpeg.tar.xz     # -> data/CIFAR10/tensors.pt
    python data/image_tree.py TREE --dataset cifar100 --root DIR      # -> DIR/CIFAR100/tensors.pt

Classes are the folder names in sorted order (CIFAR-10's folders sort into torchvision's order);
`test/` must hold the same classes. The file records where it came from: every run's results.json
names its data source. torchvision's own files need no step: wfnet.py caches them the same way.
"""
import argparse, sys, tarfile, tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
import wfnet  # noqa: E402  (the dataset's folder name, the write-then-rename)

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}


def read_split(folder, classes=None):
    """(x uint8 (N,C,H,W), y int64 (N,), class names) of folder/<class>/* in sorted order."""
    classes = classes or sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise wfnet.WFError(f"{folder} holds no class folders")
    images, labels = [], []
    for k, name in enumerate(classes):
        files = sorted(p for p in (folder / name).glob("*") if p.suffix.lower() in SUFFIXES)
        if not files:
            raise wfnet.WFError(f"{folder / name} holds no images")
        for f in files:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB" if im.mode not in ("L", "1") else "L")))
            labels.append(k)
    sizes = {a.shape for a in images}
    if len(sizes) != 1:
        raise wfnet.WFError(f"{folder}: images of {len(sizes)} shapes ({sorted(sizes)[:3]}...), one is needed")
    x = torch.from_numpy(np.stack(images))                # (N, H, W) or (N, H, W, C)
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.tensor(labels), classes


def convert(tree, dataset="cifar10", root=ROOT):
    """Decode `tree` (a folder or a tar archive of one) into <root>/<dataset's folder>/tensors.pt."""
    tree = Path(tree)
    with tempfile.TemporaryDirectory() as tmp:
        if tree.is_file():                                # an archive: unpacked to a temporary folder
            try:
                with tarfile.open(tree) as tar:
                    tar.extractall(tmp, filter="data")
            except tarfile.TarError as e:
                raise wfnet.WFError(f"{tree} is not a readable tar archive ({type(e).__name__})") from None
            found = [p.parent for p in Path(tmp).rglob("train") if (p.parent / "test").is_dir()]
            if not found:
                raise wfnet.WFError(f"{tree} holds no train/ and test/ folders")
            folder = found[0]
        elif (tree / "train").is_dir() and (tree / "test").is_dir():
            folder = tree
        else:
            raise wfnet.WFError(f"{tree} is neither a tar archive nor a folder with train/ and test/")
        x_tr, y_tr, classes = read_split(folder / "train")
        x_te, y_te, _ = read_split(folder / "test", classes)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise wfnet.WFError(f"train images are {tuple(x_tr.shape[1:])}, test images {tuple(x_te.shape[1:])}")
    out = Path(root) / wfnet.DATASETS[dataset]["tv"] / "tensors.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = dict(train=(x_tr, y_tr), test=(x_te, y_te), names=classes,
                 source=f"{tree.name} (a tree of images, decoded by data/image_tree.py)")
    wfnet._write(out, lambda tmp: torch.save(saved, tmp))
    return out, saved


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="decode a tree of images into the tensors wfnet.py reads")
    p.add_argument("tree", help="a folder with train/<class>/ and test/<class>/, or a tar archive of one")
    p.add_argument("--dataset", default="cifar10", choices=wfnet.DATASETS, help="the dataset it is (its mean, std)")
    p.add_argument("--root", default=ROOT, help="the data folder (default: data/)")
    args = p.parse_args()
    try:
        out, saved = convert(args.tree, args.dataset, args.root)
    except wfnet.WFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    (x, y), (xt, yt) = saved["train"], saved["test"]
    print(f"{out}: train {tuple(x.shape)}, test {tuple(xt.shape)}, {len(saved['names'])} classes "
          f"({', '.join(saved['names'])}); per class train {torch.bincount(y).tolist()}, test {torch.bincount(yt).tolist()}")
