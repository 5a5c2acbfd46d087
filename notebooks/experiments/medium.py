"""
medium.py: the medium scale's two numbers, computed here: how large the memory matrices are for
torchvision's backbones, and how long one untraining step takes at full resolution.

    python notebooks/experiments/medium.py                         # memory table, then step times
    python notebooks/experiments/medium.py --arch resnet50 --batch-size 8 --steps 5 --device cuda

The memory table counts the filtered weights of each backbone (built on the meta device: nothing
is allocated) and prints alpha's size at 10 and 1,000 classes for both granularities; untraining
holds four times that (alpha, its gradient, Adam's two moments). The step time untrains a
randomly initialized backbone (the step costs the same as a pretrained one) on a generated
ImageNet-style folder of 224 px images, read by wfnet's DataLoader path; the first step (warm-up)
is left out of the mean.
"""
import argparse, sys, tempfile, time
from pathlib import Path

import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import wfnet  # noqa: E402

ARCHS = ("resnet18", "resnet50", "vit_b_16")


def memory_table(archs=ARCHS, classes=(10, 1000)):
    print(f"{'backbone':>10} {'granularity':>11} {'components':>12} " + " ".join(f"{f'alpha, {c} classes':>18}" for c in classes))
    for arch in archs:
        with torch.device("meta"):                        # shapes only: nothing is allocated
            model = torchvision.models.get_model(arch)
        for granularity in ("channel", "weight"):
            k = sum(a.numel() for a in wfnet.WFNet(model, 1, granularity).alpha)   # one class's row
            print(f"{arch:>10} {granularity:>11} {k:>12,} " + " ".join(f"{human(4 * c * k):>18}" for c in classes))


def human(b):
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.1f} GiB"


def write_folder(root, classes=10, per_class=8, size=256):
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for k in range(classes):
            (root / split / f"class{k}").mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
                Image.fromarray(img).save(root / split / f"class{k}" / f"{i}.png")


def step_time(arch, root, batch_size, steps, device):
    dev = torch.device(device)
    data = wfnet.load_dataset("imagefolder", root, dev)
    spec, (x, y) = data["spec"], data["train"]
    model = torchvision.models.get_model(arch, num_classes=spec["classes"]).to(dev, memory_format=torch.channels_last)
    wf = wfnet.WFNet(model, spec["classes"])
    times = []
    for n in (1, steps + 1):                              # one step alone: the warm-up and the loader's start
        t0 = time.perf_counter()
        wfnet.untrain(wf, x, y, spec, steps=n, batch_size=batch_size, progress=False,
                      autocast=wfnet.autocast_for(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--arch", nargs="+", default=["resnet50", "vit_b_16"], choices=ARCHS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-steps", action="store_true", help="only the memory table")
    args = p.parse_args()
    memory_table()
    if args.no_steps:
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp))
        for arch in args.arch:
            s = step_time(arch, tmp, args.batch_size, args.steps, args.device)
            print(f"{arch}: {s:.2f} s per untraining step at batch {args.batch_size}, 224 px, on {args.device} "
                  f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
