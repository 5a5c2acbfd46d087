"""
bench.py: what WF-Net costs, as ratios measured in one run on one machine.

    python notebooks/experiments/bench.py                           # the quick preset, this machine
    python notebooks/experiments/bench.py --device cuda --compile   # a GPU: bf16 autocast

Every flag is wfnet.py's. Prints, and writes to <out>/benchmark.json with the machine, the
torch version and the device:
- untraining throughput (T-expanded samples per second) over plain training throughput;
- a batch with a different forget class per sample, and an exported model, over a plain forward;
- channel over weight granularity, per untraining step;
- on CPU, an untraining step in the default memory format over one with the backbone in
  channels_last (the format wfnet.py uses on CUDA only, see wfnet.memory_format), when every
  convolution has at least 8 output channels (below that, channels_last training corrupted the
  heap on CPU);
- the economy: N_c runs of each per-class method over ONE untraining of all N_c classes,
  estimated from step times (retrain: the original recipe; fine-tune, NegGrad, random label:
  baselines.py's budget), and, where <out> holds wfnet.pt and baseline_<method>.json from
  real runs, measured from their wall times.
The backbone keeps its random initialization (speed does not depend on the weights). Every
timing runs the real code path (train_original, untrain, WFNet.forward, export,
baselines._sgd_steps): once to warm up, then `repeat` times, interleaved, keeping the median.
"""
import copy, json, sys, time
from pathlib import Path

import torch

import baselines
import common
import wfnet

PER_CLASS = ("retrain", "finetune", "neggrad", "random_label")


def _median_seconds(fns, device, repeat=5):
    """{name: median wall time of fn()} over `repeat` interleaved rounds, after one warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in fns}
    for r in range(repeat + 1):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r:                                         # round 0 warms up (and compiles)
                times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def benchmark(cfg, data, model, autocast, steps=5, repeat=3):
    """Every ratio of the module docstring, from `steps` steps per timing."""
    spec, (x, y) = data["spec"], data["train"]
    nc, dev, B, Bu, T = spec["classes"], x.device, cfg["batch_size"], cfg["untrain_batch_size"], cfg["T"]
    net = torch.compile(model) if cfg["compile"] else model
    train = lambda: wfnet.train_original(net, x[:steps * B], y[:steps * B], spec, 1, B, cfg["lr"],
                                         cfg["weight_decay"], autocast=autocast, progress=False,
                                         optimizer=cfg["optimizer"], augment=cfg["augment"])
    wfs = {g: wfnet.WFNet(copy.deepcopy(model), nc, g) for g in ("channel", "weight")}
    untrain_with = lambda g: lambda: wfnet.untrain(wfs[g], x, y, spec, steps, Bu, T,
                                                   autocast=autocast, progress=False)
    sgd_with = lambda mode: lambda: baselines._sgd_steps(copy.deepcopy(model), x, y, spec, 0, steps,
                                                         mode, B, autocast=autocast)
    step = {k: t / steps for k, t in _median_seconds(
        dict(train=train, channel=untrain_with("channel"), weight=untrain_with("weight"),
             **{m: sgd_with(m) for m in PER_CLASS[1:]}), dev, repeat).items()}
    wf, n = wfs["channel"], min(len(x), 4 * B)
    xb = wfnet.transform(x[:n], spec)
    mixed = torch.randint(0, nc, (n,), device=dev)        # a different forget class per sample
    exported = wf.export(0).eval()
    with torch.no_grad(), autocast():
        fwd = _median_seconds(dict(plain=lambda: wf.model(xb), mixed=lambda: wf(xb, forget=mixed),
                                   exported=lambda: exported(xb)), dev, repeat * 3)
    n_untrain = cfg["untrain_steps"]
    train_steps = cfg["epochs"] * (len(x) * (nc - 1) // nc // B)   # the recipe without class c
    untrain_s = step["channel"] * n_untrain
    per_class_s = dict(retrain=step["train"] * train_steps,   # baselines: as many steps as untrain
                       **{m: step[m] * n_untrain for m in PER_CLASS[1:]})
    per_step = Bu // 2 + T * (Bu - Bu // 2)               # forget half + T-expanded retain half
    return dict(
        train_samples_per_s=B / step["train"], untrain_samples_per_s=per_step / step["channel"],
        untrain_over_train_throughput=(per_step / step["channel"]) / (B / step["train"]),
        step_seconds=step, channel_over_weight_step=step["channel"] / step["weight"],
        forward_seconds=fwd, forward_batch=n, mixed_over_plain_forward=fwd["mixed"] / fwd["plain"],
        exported_over_plain_forward=fwd["exported"] / fwd["plain"],
        untrain_seconds_estimate=untrain_s, per_class_seconds_estimate=per_class_s,
        economy_estimate={m: nc * s / untrain_s for m, s in per_class_s.items()},
        note=f"economy = {nc} runs of a per-class method over one untraining of all classes "
             f"({n_untrain} steps); retrain: {cfg['epochs']} epochs on {nc - 1}/{nc} of the data "
             f"({train_steps} steps); fine-tune, NegGrad, random label: {n_untrain} steps each")


def memory_format_ratio(cfg, data, model, steps=20, repeat=3):
    """On CPU: the untraining step in the default memory format over the same step with the
    backbone in channels_last, or None (CUDA already uses channels_last; narrow convolutions)."""
    spec, (x, y) = data["spec"], data["train"]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if x.device.type != "cpu" or not convs or min(m.out_channels for m in convs) < 8:
        return None
    wfs = dict(default=wfnet.WFNet(copy.deepcopy(model), spec["classes"]),
               channels_last=wfnet.WFNet(copy.deepcopy(model).to(memory_format=torch.channels_last),
                                         spec["classes"]))
    run = lambda k: lambda: wfnet.untrain(wfs[k], x, y, spec, steps, cfg["untrain_batch_size"], cfg["T"],
                                          progress=False)
    t = _median_seconds({k: run(k) for k in wfs}, x.device, repeat)
    return t["default"] / t["channels_last"]


def measured_economy(out, nc):
    """From real runs in `out`: N_c x the mean wall time per class of each baseline over the
    untraining time recorded in wfnet.pt. {} where there are none."""
    if not (out / "wfnet.pt").exists():
        return {}
    untrain_s = wfnet.load_checkpoint(out / "wfnet.pt")["meta"]["untrain_seconds"]
    found = {}
    for m in PER_CLASS:
        path = out / f"baseline_{m}.json"
        if path.exists():
            try:
                found[m] = nc * json.loads(path.read_text())["mean"]["seconds"] / untrain_s
            except (ValueError, KeyError, TypeError):
                raise wfnet.WFError(f"{path} is not a readable baselines.py result") from None
    return dict(untrain_seconds=untrain_s, economy=found) if found else {}


def _print(res):
    m, s = res["machine"], res["step_seconds"]
    print(f"machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, device {m['device']}"
          + (f" ({m['gpu']})" if m["gpu"] else ""))
    print(f"plain training: {s['train']:.3f} s/step, {res['train_samples_per_s']:.0f} samples/s")
    print(f"untraining (channel): {s['channel']:.3f} s/step, {res['untrain_samples_per_s']:.0f} "
          f"samples/s (T-expanded); over plain training: {res['untrain_over_train_throughput']:.2f}x")
    print(f"untraining (weight): {s['weight']:.3f} s/step; channel over weight per step: "
          f"{res['channel_over_weight_step']:.2f}")
    if res["memory_format"] is not None:
        print(f"untraining step, CPU's default memory format over channels_last: {res['memory_format']:.2f}")
    print(f"forward of {res['forward_batch']} samples: mixed forget classes over plain "
          f"{res['mixed_over_plain_forward']:.2f}, exported over plain "
          f"{res['exported_over_plain_forward']:.2f}")
    print(f"economy, estimated ({res['note']}; untraining ~{res['untrain_seconds_estimate']:.0f} s):")
    for k, v in res["economy_estimate"].items():
        print(f"  vs {k}: {v:.1f} (one run ~{res['per_class_seconds_estimate'][k]:.0f} s)")
    if res["measured"]:
        print(f"economy, measured from the runs in {res['config']['out']} (untraining "
              f"{res['measured']['untrain_seconds']:.0f} s): " + ", ".join(
                  f"vs {k} {v:.1f}" for k, v in res["measured"]["economy"].items()))
    print("logit masking trains nothing: its economy is not a ratio")


def main(argv=None):
    try:
        cfg = wfnet.parse_args(argv)
        if cfg["seeds"] or cfg["checkpoint"]:
            raise wfnet.WFError("bench.py times one configuration: --seeds and "
                                "--checkpoint do not apply (--out <run>/seed0 reads a seed's runs)")
        dev, out = torch.device(cfg["device"]), Path(cfg["out"])
        data = wfnet.load_dataset(cfg["dataset"], cfg["data_dir"], dev)
        measured = measured_economy(out, data["spec"]["classes"])
        model = wfnet.model_from_config(wfnet.made_by(cfg, data), dev)
        res = dict(benchmark(cfg, data, model, wfnet.autocast_for(dev)), measured=measured,
                   memory_format=memory_format_ratio(cfg, data, model),
                   machine=common.machine(dev), config=common.config(cfg))
        out.mkdir(parents=True, exist_ok=True)
        wfnet.write_json(out / "benchmark.json", res)
    except wfnet.WFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _print(res)
    return res


if __name__ == "__main__":
    main()
