#!/usr/bin/env bash
# FID against images seen and wall-clock for a real CIFAR-10 run on one GPU (docs/training.md,
# "How good after how long"). Each phase is one device call; the run folder lives in $W between calls.
#
#   bench/quality_cifar10.sh prep PAYLOAD     # PAYLOAD/cifar-10-batches-py + PAYLOAD/default_1.pt (FID net)
#   bench/quality_cifar10.sh train NIMG       # train (or resume) the EDM cond DDPM++ run until NIMG images
#   bench/quality_cifar10.sh eval KIMG...     # 10k images of network-snapshot-KIMG.pkl, FID@10k vs train set
#   bench/quality_cifar10.sh collect DIR      # copy logs, stats and metrics to DIR
set -euo pipefail
W=${W:-/root/q}
RUN=$W/run
DETECTOR=$W/payload/default_1.pt
export PYTHONUNBUFFERED=1
mkdir -p "$W"
phase=$1; shift
case "$phase" in
prep)
    mv "$1" "$W/payload"
    tar cf - -C "$W/payload" cifar-10-batches-py | gzip -1 > "$W/cifar-10-python.tar.gz"
    python3 dataset_tool.py convert --source="$W/cifar-10-python.tar.gz" --dest="$W/cifar10-32x32.zip"
    time python3 fid.py ref --data="$W/cifar10-32x32.zip" --dest="$W/cifar10-train.npz" \
        --batch=500 --workers=8 --detector="$DETECTOR"
    ;;
train)
    # EDM's command line for the CIFAR-10 cond DDPM++ row (EDM hyper-parameters, batch 512) with the
    # reference fp16 path; --nosubdir keeps one run folder so that rerunning resumes.
    time python3 train.py --outdir="$RUN" --nosubdir --data="$W/cifar10-32x32.zip" --cond=1 --arch=ddpmpp \
        --batch=512 --fp16=1 --duration="$1" --status=50k --snapshot=250k --checkpoint=250k
    ;;
eval)
    for kimg in "$@"; do
        pkl=$(printf '%s/network-snapshot-%06d.pkl' "$RUN" "$kimg")
        rm -rf "$W/images"
        time python3 generate.py --network="$pkl" --outdir="$W/images" --subdirs --seeds=0-9999 --batch=1000
        time python3 fid.py calc --images="$W/images" --ref="$W/cifar10-train.npz" --num=10000 \
            --batch=500 --workers=8 --detector="$DETECTOR" --metrics-file="$RUN/fid10k.jsonl"
    done
    ;;
grid)
    python3 generate.py --network="$(ls "$RUN"/network-snapshot-*.pkl | tail -n 1)" --seeds=0-63 --batch=64 \
        --grid="$RUN/grid.png"
    ;;
collect)
    mkdir -p "$1"
    cp "$RUN"/{log.txt,stats.jsonl,training_options.json} "$1"/
    for f in fid10k.jsonl grid.png; do [ -e "$RUN/$f" ] && cp "$RUN/$f" "$1"/; done
    ls "$RUN" > "$1/run-files.txt"
    ;;
*)
    echo "unknown phase $phase" >&2; exit 2 ;;
esac
