#!/usr/bin/env bash
# gpu_check.sh: the whole pipeline on CIFAR-10 (the JPEG copy in ../shared/data) on one lent GPU,
# in one command that ends inside the machine's 10 minutes, and one summary of what it measured.
#
#   run A  wfnet.py --dataset cifar10 --compile: the full CUDA preset (ResNet-18 of width 64, stem
#          stride 1, 30 epochs, 4,875 untraining steps), the original model's training compiled.
#   run B  the same without --compile and with only EAGER_EPOCHS epochs: it is there to compare the
#          training's seconds per epoch with and without torch.compile, in the time that is left.
#
#     bash notebooks/experiments/gpu_check.sh          # on the lent GPU machine, from anywhere
#
# Where ../shared does not travel with the checkout, copy the archive into shared/data/ inside it.
# Expected: about 7 to 8 minutes on one H100 (an estimate, not yet measured): decoding the images
# under a minute, run A 4 to 5 minutes, run B about 2. Every step gets at most what is left of
# TOTAL_LIMIT; a run stopped at its limit is reported as such, and what it left is summarized.
# A run B stopped after its training still gives its seconds per epoch (from its checkpoint).
#
# The summary (the GPU; per run: the original model's test accuracy, every class's Acc_f on test
# and train, the mean Acc_r drop, the seconds of every stage and per training epoch; compiled over
# eager seconds per epoch) is printed and written to $RUNS/summary.txt, beside log.txt (both runs'
# output) and each run's results.json, matrix.png and alpha.png: 8 files, what a lent machine sends
# back from $OUT. The checkpoints (tens of MB) stay in $WORK. Exit status 0 when both runs finished.
#
# Knobs (environment variables; relative paths are from the repository root):
#   PYTHON        python3                    the interpreter
#   TREE          ../shared/data/cifar10-jpeg.tar.xz, else shared/data/cifar10-jpeg.tar.xz:
#                 a folder or tar archive of train/<class>/*, test/<class>/* (data/image_tree.py)
#   DATA_DIR      /tmp/wfnet-data            decoded once into DATA_DIR/CIFAR10/tensors.pt, then reused
#   DEVICE        cuda                       wfnet.py's --device
#   RUNS          ${OUT:-/tmp}/gpu_check     what is kept (see above)
#   WORK          /tmp/wfnet-gpu-check       the runs' --out folders (wfnet.py reuses a checkpoint
#                                            there that the same settings made)
#   EXTRA         (none)                     more wfnet.py flags for both runs (the test: tiny ones)
#   COMPILE       1                          0: run A without --compile (the CPU test)
#   EAGER_EPOCHS  5                          run B's epochs
#   RUN_LIMIT     420                        seconds for run A
#   EAGER_LIMIT   180                        seconds for run B
#   TOTAL_LIMIT   570                        seconds for the whole script (a lent machine's command: 600)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."                 # the repository root

START=$(date +%s)
PY=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-/tmp/wfnet-data}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-${OUT:-/tmp}/gpu_check}
WORK=${WORK:-/tmp/wfnet-gpu-check}
EXTRA=${EXTRA:-}
COMPILE=${COMPILE:-1}
EAGER_EPOCHS=${EAGER_EPOCHS:-5}
RUN_LIMIT=${RUN_LIMIT:-420}
EAGER_LIMIT=${EAGER_LIMIT:-180}
TOTAL_LIMIT=${TOTAL_LIMIT:-570}
if [ -z "${TREE:-}" ]; then                               # ../shared beside the checkout, or a copy inside it
    TREE=../shared/data/cifar10-jpeg.tar.xz
    [ -e "$TREE" ] || [ ! -e shared/data/cifar10-jpeg.tar.xz ] || TREE=shared/data/cifar10-jpeg.tar.xz
fi
export PYTHONUNBUFFERED=1                                 # the log shows each line when it is printed

log() { echo "$*" | tee -a "$RUNS/log.txt"; }             # printed, and kept in log.txt
budget() {   # budget WANT: WANT seconds, or fewer: what is left of TOTAL_LIMIT, 20 s kept for the summary
    local left=$(( TOTAL_LIMIT - ($(date +%s) - START) - 20 ))
    echo $(( left < $1 ? left : $1 ))
}

# -----------------------------------------------------------------------------
# the data: decoded once, checked before anything slow starts

if [ ! -f "$DATA_DIR/CIFAR10/tensors.pt" ] && [ ! -e "$TREE" ]; then
    echo "gpu_check.sh: no CIFAR-10 image tree at TREE=$TREE and no $DATA_DIR/CIFAR10/tensors.pt;" \
         "set TREE to a folder or tar archive of train/<class>/ and test/<class>/" >&2
    exit 2
fi
mkdir -p "$RUNS" "$WORK"
rm -f "$RUNS/log.txt" "$RUNS/summary.txt"

INFO=$("$PY" -c "import torch; print(torch.__version__)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')")
TORCH=$(echo "$INFO" | sed -n 1p)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
[ -n "$GPU" ] || GPU=$(echo "$INFO" | sed -n 2p)
log "gpu_check.sh: GPU $GPU, torch $TORCH, $(date -u '+%Y-%m-%d %H:%M UTC'), device $DEVICE"

if [ ! -f "$DATA_DIR/CIFAR10/tensors.pt" ]; then
    t0=$(date +%s)
    if ! timeout -k 10 "$(budget 300)" "$PY" data/image_tree.py "$TREE" --root "$DATA_DIR" | tee -a "$RUNS/log.txt"
    then
        echo "gpu_check.sh: decoding $TREE failed or ran out of time" >&2
        exit 2
    fi
    log "decoded $TREE in $(( $(date +%s) - t0 )) s"
fi

# -----------------------------------------------------------------------------
# the two runs: each into $WORK/<name>, its output into log.txt, its status as name:rc:seconds

STATES=()
run() {   # run NAME SECONDS FLAGS...: at most SECONDS, or what is left of TOTAL_LIMIT
    local name=$1 limit t0 rc
    limit=$(budget "$2")
    rm -f "$WORK/$name/results.json" "$WORK/$name.log" "$RUNS/$name"/*
    if [ "$limit" -lt 30 ] && [ "$limit" -lt "$2" ]; then
        log "== run $name: skipped, $limit s left of TOTAL_LIMIT"
        STATES+=("$name:skipped:0")
        return
    fi
    shift 2
    log "== run $name (at most $limit s): $PY wfnet.py $* --out $WORK/$name"
    t0=$(date +%s)
    set +e                                                # a failed run is reported, not fatal
    timeout -k 10 "$limit" "$PY" wfnet.py "$@" --out "$WORK/$name" 2>&1 \
        | tee -a "$RUNS/log.txt" "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || log "== run $name: stopped at its limit of $limit s"
    STATES+=("$name:$rc:$(( $(date +%s) - t0 ))")
    mkdir -p "$RUNS/$name"
    for f in results.json matrix.png alpha.png; do
        [ ! -f "$WORK/$name/$f" ] || cp "$WORK/$name/$f" "$RUNS/$name/"
    done
}

COMMON=(--dataset cifar10 --device "$DEVICE" --data-dir "$DATA_DIR" --no-progress)
COMPILED=(--compile)
[ "$COMPILE" = 1 ] || COMPILED=()
# shellcheck disable=SC2086  # EXTRA is a list of flags: split on purpose
run compiled "$RUN_LIMIT" "${COMMON[@]}" "${COMPILED[@]}" $EXTRA
# shellcheck disable=SC2086
run eager "$EAGER_LIMIT" "${COMMON[@]}" $EXTRA --epochs "$EAGER_EPOCHS"

# -----------------------------------------------------------------------------
# the summary, from what the runs left

"$PY" - "$RUNS" "$WORK" "$GPU" "${STATES[@]}" <<'EOF'
import json, sys
from pathlib import Path

runs, work, gpu, states = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
lines, per_epoch = [f"GPU: {gpu}"], {}
for state in states:
    name, rc, wall = state.split(":")
    how = {"0": "finished", "124": "stopped at its time limit", "137": "killed at its time limit",
           "skipped": "skipped: no time left"}.get(rc, f"failed (exit status {rc})")
    lines.append(f"\nrun {name}: {how}, {wall} s wall")
    log = (work / f"{name}.log").read_text() if (work / f"{name}.log").is_file() else ""
    reused = " (reused: the earlier training's time)" if "reusing the original model" in log else ""
    if (work / name / "results.json").is_file():
        r = json.loads((work / name / "results.json").read_text())
        made, m, t = r["original_made_by"], r["mean"], r["times_s"]
        cfg = r["config"]
        lines.append(f"  {r['device']} ({r['gpu'] or 'no GPU'}), torch {r['torch']}, compile {cfg['compile']}, "
                     f"width {made['width']}, epochs {made['epochs']}, "
                     f"untraining steps {cfg['untrain_steps']}")
        lines.append(f"  original model: test accuracy {r['original']['test_acc']:.2f}%")
        for row in r["per_class"]:
            name_c = r["class_names"][row["cls"]]
            lines.append(f"  forget {name_c:>12}: Acc_f test {row['acc_f_test']:6.2f}%, "
                         f"train {row['acc_f_train']:6.2f}%")
        lines.append(f"  mean Acc_r drop: test {m['acc_r_drop_test']:.2f}, "
                     f"train {m['acc_r_drop_train']:.2f} points")
        lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
        seconds, epochs = t["pretrain"], made["epochs"]
    elif "trained the original model in" in log or reused:   # stopped later: the checkpoint has the time
        import torch
        meta = torch.load(work / name / "original.pt", map_location="cpu", weights_only=True)["meta"]
        seconds, epochs = meta["train_seconds"], meta["epochs"]
        lines.append("  no results.json: stopped after the original model's training")
    else:
        lines.append("  no results")
        continue
    per_epoch[name] = seconds / epochs
    lines.append(f"  training: {seconds / epochs:.2f} s per epoch ({seconds:.1f} s over {epochs} "
                 f"{'epoch' if epochs == 1 else 'epochs'}){reused}")
if len(per_epoch) == 2:
    a, b = per_epoch["compiled"], per_epoch["eager"]
    lines.append(f"\ncompiled / eager seconds per training epoch: {a / b:.3f} "
                 f"(compile speed-up {b / a:.2f}x; run A's first epoch includes the compilation)")
else:
    lines.append("\ncompiled / eager seconds per training epoch: not measured (a run has no training time)")
text = "\n".join(lines)
print(f"\n{'=' * 30} summary {'=' * 30}\n{text}")
(runs / "summary.txt").write_text(text + "\n")
EOF

for state in "${STATES[@]}"; do
    [ "$(echo "$state" | cut -d: -f2)" = 0 ] || exit 1
done
