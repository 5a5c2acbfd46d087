"""Tests for bench.py: every ratio is printed and consistent (timings are never asserted)."""
import inspect, json

import pytest
import torch

import bench
import wfnet
from conftest import FAST, write_mnist_like


def test_benchmark_prints_every_ratio(tmp_path, capsys):
    write_mnist_like(tmp_path / "data", "MNIST", 300, 50)
    out = tmp_path / "b"
    res = bench.main(FAST + ["--width", "8", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"over channels_last: {res['memory_format']:.2f}" in printed   # width 8: the format is timed
    for words in ("plain training", "untraining (channel)", "untraining (weight)",
                  "mixed forget classes over plain", "exported over plain", "vs retrain",
                  "vs finetune", "vs neggrad", "vs random_label", "torch"):
        assert words in printed
    s = res["step_seconds"]
    T = wfnet.parse_args(FAST)["T"]
    assert res["untrain_over_train_throughput"] == pytest.approx(
        (16 + T * 16) / s["channel"] / (32 / s["train"]))   # B = 32: 16 forget + T x 16 retain samples
    steps = 9                                             # FAST's --untrain-steps
    assert res["untrain_seconds_estimate"] == pytest.approx(s["channel"] * steps)
    assert res["economy_estimate"]["finetune"] == pytest.approx(10 * s["finetune"] / s["channel"])
    retrain_steps = 8                                     # 270 samples without class c, batch 32
    assert res["economy_estimate"]["retrain"] == pytest.approx(
        10 * s["train"] * retrain_steps / (s["channel"] * steps))
    assert json.loads((out / "benchmark.json").read_text())["machine"]["torch"] == torch.__version__
    assert not (out / "original.pt").exists() and res["measured"] == {}   # nothing trained, kept


def test_each_untraining_timing_runs_the_steps_it_is_divided_by(tmp_path, monkeypatch, capsys):
    """The time of `steps` untraining steps is divided by `steps`: each timed call runs that many."""
    calls, untrain = [], wfnet.untrain

    def record(wf, x, y, spec, steps, *args, **kw):
        calls.append(steps)
        return untrain(wf, x, y, spec, steps, *args, **kw)
    monkeypatch.setattr(wfnet, "untrain", record)
    write_mnist_like(tmp_path / "data", "MNIST", 300, 50)
    bench.main(FAST + ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "b")])
    assert calls and set(calls) == {inspect.signature(bench.benchmark).parameters["steps"].default}


def test_measured_economy_reads_the_runs(tmp_path):
    wfnet.save_checkpoint(tmp_path / "wfnet.pt", dict(untrain_seconds=20.0), {})
    assert bench.measured_economy(tmp_path, 10) == {}      # no baseline has run
    wfnet.write_json(tmp_path / "baseline_retrain.json", dict(mean=dict(seconds=50.0)))
    wfnet.write_json(tmp_path / "baseline_finetune.json", dict(mean=dict(seconds=4.0)))
    assert bench.measured_economy(tmp_path, 10) == dict(
        untrain_seconds=20.0, economy=dict(retrain=25.0, finetune=2.0))


@pytest.mark.parametrize("flags", [["--seeds", "0", "1"], ["--checkpoint", "x.pt"]])
def test_flags_it_does_not_use_are_an_error(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(FAST + flags + ["--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "do not apply" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_unreadable_baseline_result_is_one_line(tmp_path):
    wfnet.save_checkpoint(tmp_path / "wfnet.pt", dict(untrain_seconds=20.0), {})
    (tmp_path / "baseline_neggrad.json").write_text("{ truncated")
    with pytest.raises(wfnet.WFError, match="not a readable baselines.py result"):
        bench.measured_economy(tmp_path, 10)


def test_memory_format_ratio_times_the_same_untraining_in_both_formats(tmp_path, monkeypatch):
    """On CPU the default memory format is timed against channels_last, the same steps each; not
    for convolutions narrower than 8 channels (channels_last training corrupted the heap there)."""
    formats, untrain = [], wfnet.untrain

    def record(wf, x, y, spec, steps, *args, **kw):
        last = [m for m in wf.model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        formats.append((last.weight.is_contiguous(memory_format=torch.channels_last), steps))
        return untrain(wf, x, y, spec, steps, *args, **kw)
    write_mnist_like(tmp_path / "data", "MNIST", 300, 50)
    cfg = wfnet.parse_args(FAST + ["--width", "8", "--data-dir", str(tmp_path / "data")])
    data = wfnet.load_dataset(cfg["dataset"], cfg["data_dir"])
    model = wfnet.model_from_config(wfnet.made_by(cfg, data), "cpu")
    monkeypatch.setattr(wfnet, "untrain", record)
    ratio = bench.memory_format_ratio(cfg, data, model, steps=2, repeat=1)
    assert ratio > 0 and sorted(formats) == [(False, 2)] * 2 + [(True, 2)] * 2   # warm-up + 1 round each
    assert all(p.is_contiguous() for p in model.parameters())   # the caller's model is left as it was
    narrow = wfnet.model_from_config(wfnet.made_by(wfnet.parse_args(FAST), data), "cpu")
    assert bench.memory_format_ratio(cfg, data, narrow) is None
