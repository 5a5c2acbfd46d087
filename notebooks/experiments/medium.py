"""
medium.py: WF-Net at the paper's medium scale. It imports wfnet.py and adds to it: ImageNet-style
image folders read by DataLoader workers, torchvision's backbones (with their ImageNet weights:
--pretrained), the memory check before alpha is allocated, a sample of the classes evaluated
when there are many, and torchrun for training, untraining and evaluation.

    python notebooks/experiments/medium.py --data-dir imagenet --arch resnet50 --pretrained
    torchrun --nproc_per_node 8 notebooks/experiments/medium.py --data-dir imagenet --arch resnet50 --pretrained
    python notebooks/experiments/medium.py --bench     # the memory table, then untraining step times

<data-dir>/train/<class>/ and <data-dir>/val/<class>/ hold the images; --arch is any torchvision
classifier (resnet18, resnet50, vit_b_16, ...). Every other flag is wfnet.py's (--untrain-steps,
--seed, --out, --eval-classes, ...). The pipeline is wfnet.py's: the original model (pretrained,
reused from <out>/original.pt, or trained), one untraining of all classes, every class evaluated
(100 drawn by --seed beyond 100 classes; --eval-classes names them), 20 of them explained on 2
test images per class, results.json and the two plots.

Under torchrun (RANK in the environment; NCCL on CUDA, one GPU per LOCAL_RANK; gloo on CPU):
- the original trains through DistributedDataParallel, each process on its own share of the images;
- untraining: each process draws its own batches (seed + rank) of B / world images, and alpha's
  gradients, and the flag that skips a non-finite step, are averaged over the processes before
  every step, so every process holds the same alpha throughout;
- the evaluated classes are shared out and gathered; process 0 explains, prints and writes.

--bench prints alpha's size for torchvision's backbones (built on the meta device: nothing is
allocated) and times one untraining step on a generated folder of 224 px images.
"""
import argparse, copy, os, statistics, sys, tempfile, time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import wfnet  # noqa: E402

MAX_CLASSES = 100          # beyond: this many classes are evaluated, 20 explained on 2 images each
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

# -----------------------------------------------------------------------------
# image folders: torchvision's ImageFolder with the standard ImageNet transforms, Datasets that wfnet
# reads through a DataLoader (wfnet.LOADER: the workers, set in run()).


def load_folder(root, size):
    """wfnet's data dict for <root>/train and <root>/val: Datasets with the evaluation's transform
    (resize, center crop), and "augmented": the training images with the training's (crop, flip)."""
    root, out = Path(root), {}
    norm = [T.ToTensor(), T.Normalize(IMAGENET["mean"], IMAGENET["std"])]
    for split, folder in (("train", "train"), ("test", "val")):
        try:
            out[split] = torchvision.datasets.ImageFolder(root / folder, T.Compose([T.Resize(size * 8 // 7),
                                                                                  T.CenterCrop(size), *norm]))
        except (FileNotFoundError, OSError) as e:
            raise wfnet.WFError(f"{root / folder}: {str(e).splitlines()[0]} (--data-dir needs train/ and val/, "
                                "one folder of images per class)") from None
    if out["train"].classes != out["test"].classes:
        raise wfnet.WFError(f"{root}/train and {root}/val have different class folders")
    out["augmented"] = copy.copy(out["train"])            # the same samples, read with crop and flip
    out["augmented"].transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
    out["spec"] = dict(IMAGENET, classes=len(out["train"].classes), names=out["train"].classes, size=size)
    return out


def use_workers(device):
    """wfnet's DataLoaders: workers shared out over the processes, pinned memory on CUDA."""
    wfnet.LOADER.update(num_workers=min(8, (os.cpu_count() or 2) // rank_world()[1]),
                        pin_memory=torch.device(device).type == "cuda")

# -----------------------------------------------------------------------------
# torchvision's backbones, and the memory the untraining will need


def make_model(arch, num_classes, device, pretrained=False, image_size=224):
    weights = torchvision.models.get_model_weights(arch).DEFAULT if pretrained else None
    if weights is not None and len(weights.meta["categories"]) != num_classes:
        raise wfnet.WFError(f"--pretrained: {arch}'s weights know {len(weights.meta['categories'])} classes, "
                            f"the image folder has {num_classes}")
    size = dict(image_size=image_size) if arch.startswith("vit") and weights is None else {}
    try:
        model = torchvision.models.get_model(arch, weights=weights, num_classes=num_classes, **size)
    except (OSError, RuntimeError) as e:                  # no internet (urllib's URLError is an OSError)
        if weights is None:
            raise
        raise wfnet.WFError(f"could not fetch {weights.url} ({type(e).__name__}); put that file in "
                            f"{torch.hub.get_dir()}/checkpoints/") from None
    return model.to(device, memory_format=wfnet.memory_format(device))


def free_memory(device):
    """Bytes: free on a GPU, the machine's memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(model, num_classes, granularity, device):
    """Refuse, before anything is allocated, memory matrices whose untraining would not fit: alpha,
    its gradient and Adam's two moments, float32 (16 bytes per entry)."""
    with torch.device("meta"):
        meta_model = torchvision.models.get_model(model, num_classes=num_classes) if isinstance(model, str) else model
    entries = num_classes * sum(a.shape[1] for a in wfnet.WFNet(meta_model.to("meta"), 1, granularity).alpha)
    need, free = 16 * entries, free_memory(device)
    if need > free:
        raise wfnet.WFError(f"the memory matrices ({entries // num_classes:,} {granularity}s x {num_classes} classes)"
                            f" would need {need / 2**30:.1f} GiB to untrain, {free / 2**30:.1f} GiB is there: use "
                            "fewer classes" + (" or --granularity channel" if granularity == "weight" else ""))
    return need

# -----------------------------------------------------------------------------
# the pipeline: wfnet.run's steps, with torchrun's processes


def average(grads, found_inf):
    """untrain()'s hook: the global batch's gradient, and one skip decision, on every process."""
    world = dist.get_world_size()
    for g in grads:
        dist.all_reduce(g)
        g /= world
    dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)


def shared(row, classes):
    """evaluate()'s map over classes: each process its share, every process all the rows."""
    rank, world = rank_world()
    mine = [row(c) for c in classes[rank::world]]
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return sorted(sum(parts, []), key=lambda r: classes.index(r["cls"]))


def original_model(cfg, data, out, dev):
    """(model, its settings): pretrained, reused from <out>/original.pt, or trained (DDP) and saved."""
    rank, world = rank_world()
    spec, images = data["spec"], data["augmented" if cfg["augment"] else "train"]
    meta = dict(num_classes=spec["classes"], image_size=cfg["image_size"], pretrained=cfg["pretrained"],
                **{k: cfg[k] for k in wfnet.MADE_BY if k not in ("width", "stem_stride")})
    if cfg["pretrained"]:
        meta = {k: meta[k] for k in ("dataset", "arch", "num_classes", "image_size", "pretrained")}
        print(f"the original model: torchvision's {cfg['arch']} with its ImageNet weights")
        return make_model(cfg["arch"], spec["classes"], dev, True).eval().requires_grad_(False), meta
    model = make_model(cfg["arch"], spec["classes"], dev, image_size=cfg["image_size"])
    ckpt = wfnet.reusable(out / "original.pt", meta)
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        print(f"reusing the original model from {out / 'original.pt'}")
        return model.eval().requires_grad_(False), meta
    torch.manual_seed(cfg["seed"])                        # the same initial weights on every process
    model = make_model(cfg["arch"], spec["classes"], dev, image_size=cfg["image_size"])
    share = list(range(len(images)))[rank::world][:len(images) // world]   # equal shares: the same steps
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    t0 = time.time()
    wfnet.train_original(net, torch.utils.data.Subset(images, share), None, None, cfg["epochs"], cfg["batch_size"] // world,
                         cfg["lr"], cfg["weight_decay"], cfg["seed"] + rank, wfnet.autocast_for(dev),
                         cfg["progress"], cfg["optimizer"], cfg["augment"])
    if rank == 0:
        wfnet.save_checkpoint(out / "original.pt", {**meta, "train_seconds": time.time() - t0}, model.state_dict())
    print(f"trained the original model in {time.time() - t0:.0f} s -> {out / 'original.pt'}")
    return model.eval().requires_grad_(False), meta


def run(cfg):
    rank, world = rank_world()
    dev, out = torch.device(cfg["device"]), Path(cfg["out"])
    data = load_folder(cfg["data_dir"], cfg["image_size"])
    use_workers(dev)
    spec, nc = data["spec"], data["spec"]["classes"]
    if cfg["untrain_batch_size"] % (2 * world):
        raise wfnet.WFError(f"--untrain-batch-size {cfg['untrain_batch_size']} must split into {world} even shares")
    classes = cfg["eval_classes"] or list(range(nc))
    if not cfg["eval_classes"] and nc > MAX_CLASSES:
        pick = torch.randperm(nc, generator=torch.Generator().manual_seed(cfg["seed"]))[:MAX_CLASSES]
        classes = sorted(pick.tolist())
    if any(not 0 <= c < nc for c in classes):
        raise wfnet.WFError(f"--eval-classes must lie in 0..{nc - 1}")
    check_memory(cfg["arch"], nc, cfg["granularity"], dev)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = original_model(cfg, data, out, dev)

    wf = wfnet.WFNet(model, nc, cfg["granularity"], cfg["combine"])
    recipe = {v: cfg[k] for k, v in wfnet.UNTRAIN.items()}
    recipe.update(batch_size=cfg["untrain_batch_size"] // world)
    wf_meta = dict(original=wfnet.fingerprint(model), seed=cfg["seed"], world=world, **recipe)
    ckpt = wfnet.reusable(out / "wfnet.pt", wf_meta)
    if ckpt is not None:
        wf.alpha.load_state_dict(ckpt["state_dict"])
        seconds = ckpt["meta"]["untrain_seconds"]
        print(f"reusing the memory matrices from {out / 'wfnet.pt'}")
    else:
        t0 = time.time()
        wfnet.untrain(wf, data["train"], **recipe, seed=cfg["seed"] + rank, progress=cfg["progress"],
                      autocast=wfnet.autocast_for(dev), average=average if world > 1 else None)
        seconds = time.time() - t0
        if rank == 0:
            wfnet.save_checkpoint(out / "wfnet.pt", {**wf_meta, "untrain_seconds": seconds}, wf.alpha.state_dict())
        print(f"untrained all {nc} classes in {seconds:.0f} s -> {out / 'wfnet.pt'}")

    torch.manual_seed(cfg["seed"] + 1)                    # T_d for ZRF: same arch, random init
    random_model = make_model(cfg["arch"], nc, dev, image_size=cfg["image_size"]).eval()
    res = wfnet.evaluate(model, lambda c: partial(wf, forget=c), data, classes, random_model, cfg["eval_train"],
                         cfg["seed"], autocast=wfnet.autocast_for(dev), each=shared)
    many = nc > MAX_CLASSES
    if rank == 0:
        res["explain"] = wfnet.explain(wf, data, res["original"]["confusion_test"], 2 if many else cfg["explain_samples"],
                                       seed=cfg["seed"], classes=classes[:20] if many else classes)
        res.update(config={k: v for k, v in cfg.items() if k != "progress"}, original_made_by=meta,
                   class_names=spec["names"], untrain_seconds=seconds, processes=world)
        wfnet.write_json(out / "results.json", res)
        wfnet.save_plots(wf, res, out, spec["names"])
        m = res["mean"]
        print(f"{len(classes)} of {nc} classes evaluated, {len(res['explain']['curves'])} explained; original "
              f"test accuracy {res['original']['test_acc']:.2f}%\nmean over them: Acc_f test {m['acc_f_test']:.2f}%, "
              f"Acc_r test {m['acc_r_test']:.2f}% ({m['acc_r_drop_test']:.2f} points below the original), ZRF "
              f"{m['zrf']:.3f}, MIA-efficacy {m['mia_efficacy']:.3f} -> {out / 'results.json'}")
    if world > 1:
        dist.barrier()
    return res

# -----------------------------------------------------------------------------
# --bench: the memory table and step times (a random backbone costs the same per step as a trained one)


def memory_table(archs=("resnet18", "resnet50", "vit_b_16"), classes=(10, 1000)):
    print(f"{'backbone':>10} {'granularity':>11} {'components':>12} "
          + " ".join(f"{f'alpha, {c} classes':>18}" for c in classes))
    for arch in archs:
        with torch.device("meta"):                        # shapes only: nothing is allocated
            model = torchvision.models.get_model(arch)
        for granularity in ("channel", "weight"):
            k = sum(a.numel() for a in wfnet.WFNet(model, 1, granularity).alpha)   # one class's row
            print(f"{arch:>10} {granularity:>11} {k:>12,} " + " ".join(f"{human(4 * c * k):>18}" for c in classes))


def human(b):
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.1f} GiB"


def write_folder(root, classes=10, per_class=8, size=256):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for k in range(classes):
            (root / split / f"class{k}").mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
                Image.fromarray(img).save(root / split / f"class{k}" / f"{i}.png")


def step_time(arch, root, batch_size, steps, device):
    dev = torch.device(device)
    data = load_folder(root, 224)
    use_workers(dev)
    wf = wfnet.WFNet(make_model(arch, data["spec"]["classes"], dev), data["spec"]["classes"])
    times = []
    for n in (1, steps + 1):                              # one step alone: the warm-up and the loader's start
        t0 = time.perf_counter()
        wfnet.untrain(wf, data["train"], steps=n, batch_size=batch_size, progress=False,
                      autocast=wfnet.autocast_for(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) / steps


def bench(archs, batch_size, steps, device):
    memory_table()
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp))
        for arch in archs:
            s = step_time(arch, tmp, batch_size, steps, device)
            print(f"{arch}: {s:.2f} s per untraining step at batch {batch_size}, 224 px, on {device} "
                  f"({torch.get_num_threads()} threads)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), add_help=False)
    p.add_argument("--arch", default="resnet50", help="a torchvision classifier: resnet18, resnet50, vit_b_16, ...")
    p.add_argument("--pretrained", action="store_true", help="torchvision's ImageNet weights as the original")
    p.add_argument("--image-size", type=int, default=224, help="the training crop")
    p.add_argument("--eval-classes", type=int, nargs="+", help=f"the forget classes to evaluate (default: all; "
                   f"beyond {MAX_CLASSES} classes, {MAX_CLASSES} drawn by --seed)")
    p.add_argument("--bench", action="store_true", help="the memory table and step times, then exit")
    p.add_argument("--steps", type=int, default=5, help="--bench: untraining steps timed")
    args, rest = p.parse_known_args(argv)
    try:
        if args.arch not in torchvision.models.list_models(torchvision.models):
            raise wfnet.WFError(f"--arch {args.arch}: not one of torchvision's classification models")
        family = "vit" if args.arch.startswith("vit") else "resnet18"   # the original's optimizer and lr
        cfg = wfnet.parse_args(["--arch", family, *rest])
        if args.bench:
            return bench([args.arch], cfg["untrain_batch_size"], args.steps, cfg["device"])
        if "--data-dir" not in rest:
            raise wfnet.WFError("--data-dir: the image folder (train/ and val/, a folder of images per class)")
        if "RANK" in os.environ and not dist.is_initialized():   # launched by torchrun: join its processes
            if cfg["device"] != "cpu":
                cfg["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
                torch.cuda.set_device(cfg["device"])
            dist.init_process_group("nccl" if cfg["device"] != "cpu" else "gloo")
            if dist.get_rank() > 0:                       # process 0 prints; the others only compute
                sys.stdout, cfg["progress"] = open(os.devnull, "w"), False
        cfg.update(arch=args.arch, pretrained=args.pretrained, image_size=args.image_size, dataset="imagefolder",
                   eval_classes=args.eval_classes)
        if "--out" not in rest:
            cfg["out"] = f"runs/imagefolder-{args.arch}"
        return run(cfg)
    except wfnet.WFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
