#!/bin/bash
# The next H200 measurements of issue 24, as five device calls (docs/performance.md, "Session 31"), in order of
# what they decide; the five together need more than one session's 30 minutes of device time.
#
#   bash bench/gpu_plan.sh call1            # on the device, in the repository root; results go to $OUT
#   OUT=/tmp/plan DEVICE=cpu bash bench/gpu_plan.sh call2   # a dry run on a CPU: tiny sizes, a few steps
#
# Each call fits one `run` (10 minutes) on a fresh machine and writes at most 8 files to $OUT: the JSON and markdown
# of each benchmark and diag.err, which stamps the seconds at which each part started. call3 and call5 need diffusers:
# run them with carry ["gpuwheels"] (the wheels of diffusers and its dependencies for the device's Python), unpacked
# below. Make gpuwheels/ once on the development machine (it is in .git/info/exclude there, so only carry moves it):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d gpuwheels diffusers==0.42.1 \
#     huggingface_hub==2.4.0 safetensors==0.8.0 regex==2026.11.19 PyYAML==6.0.4 importlib_metadata==10.2.0 zipp==4.1.2 \
#     filelock==4.3.2 fsspec==2026.9.0 hf-xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 \
#     idna==3.20 truststore==0.10.5 lazy-importer==0.1.0 requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 \
#     charset-normalizer==3.5.3
# Expected time on an H200, from sessions 27-28: call1 about 410 s, call2 about 550 s, call3 about 300 s,
# call4 about 460 s, call5 about 500 s; each part has its own timeout so that a slow one fails alone.
set -u
CALL=${1:?usage: bash bench/gpu_plan.sh call1|call2|call3|call4|call5}
OUT=${OUT:?set OUT to the folder for the results}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
W=/tmp/e2e
T0=$(date +%s)
mkdir -p "$OUT"
stamp() { echo "== $1 at $(( $(date +%s) - T0 )) s" >> "$OUT/diag.err"; }

# Sizes: the issue's on CUDA, tiny ones for a dry run on a CPU.
if [ "$DEVICE" = cuda ]; then
    SIZE=full; BATCH=512; EDM2_TRAIN='--batch 256 --batch-gpu 32'; EDM2_SAMPLE='--batch 32'; STEPS=3; E2E=()
else
    SIZE=quick; BATCH=2; EDM2_TRAIN='--batch 4 --batch-gpu 2'; EDM2_SAMPLE='--batch 2'; STEPS=1; E2E=(--device=cpu)
fi

e2e() {  # e2e ROWS NAME TIMEOUT: python -m bench --mode=e2e, JSON and markdown to $OUT
    stamp "$2"
    timeout "$3" python -m bench --mode=e2e --rows="$1" --time-limit=$(( $3 - 10 )) --workdir=$W "${E2E[@]}" \
        --out="$OUT/e2e-$2.json" --markdown > "$OUT/e2e-$2.md" 2>> "$OUT/diag.err"
}

sweep() {  # sweep NAME TIMEOUT MODULE ARGS...: one JSON line per variant, appended to $OUT/sweep-NAME.jsonl
    local name=$1 limit=$2 module=$3
    shift 3
    stamp "$name"
    timeout "$limit" python -m "$module" --size=$SIZE --device=$DEVICE --out="$OUT/sweep-$name.jsonl" "$@" \
        > /dev/null 2>> "$OUT/diag.err"
}

wheels() {  # diffusers and its dependencies from the carried gpuwheels/, unpacked where the device's Python lacks them
    stamp wheels
    python - >> "$OUT/diag.err" 2>&1 <<'PY'
import glob, importlib.util, os, sys, zipfile
dest = '/tmp/pylib'
os.makedirs(dest, exist_ok=True)
need = {'diffusers': 'diffusers', 'huggingface_hub': 'huggingface_hub', 'safetensors': 'safetensors', 'regex': 'regex',
        'yaml': 'PyYAML', 'importlib_metadata': 'importlib_metadata', 'zipp': 'zipp', 'filelock': 'filelock',
        'fsspec': 'fsspec', 'hf_xet': 'hf_xet', 'httpx2': 'httpx2', 'httpcore2': 'httpcore2', 'h11': 'h11',
        'anyio': 'anyio', 'idna': 'idna', 'truststore': 'truststore', 'lazy_importer': 'lazy_importer',
        'requests': 'requests', 'urllib3': 'urllib3', 'certifi': 'certifi', 'charset_normalizer': 'charset_normalizer'}
for module, dist in need.items():
    if importlib.util.find_spec(module) is None:
        for wheel in glob.glob(f'gpuwheels/{dist}-*.whl') + glob.glob(f'gpuwheels/{dist.lower()}-*.whl'):
            zipfile.ZipFile(wheel).extractall(dest)
        print('unpacked', dist, file=sys.stderr)
PY
    export PYTHONPATH=/tmp/pylib
}

case "$CALL" in
call1)  # DDPM++ targets end to end: train.py --fast against --fp16=1 (2,600 img/s, 1.6x), generate.py --fast (240)
    e2e train-fp16,train-fast train 280
    e2e gen-fp32,gen-fast gen 200
    ;;
call2)  # EDM2-S: the training step in rounds of 32 (880 img/s), the reference's fp16 against ours compiled
    sweep edm2-train 320 bench.sweep_train --net=edm2-s $EDM2_TRAIN --variants=fp16,bf16+full --steps=$STEPS
    sweep edm2-train-nhwc 230 bench.sweep_train --net=edm2-s $EDM2_TRAIN --variants=bf16+full+nhwc --steps=$STEPS
    ;;
call3)  # the VAE: decoder (generate.py's fp32 = tf32 against --precision=bf16), encoder switches, encode end to end
    wheels
    sweep vae-decode 90 bench.sweep_encode --task=decode --variants=tf32,bf16,bf16+cl
    sweep vae-encode 150 bench.sweep_encode --variants=tf32+b1,tf32,bf16,bf16+cl,bf16+gn+cl
    e2e encode-b1-tf32,encode-b8,encode-b32-bf16 encode 200
    ;;
call4)  # box-filter resampling (pooling) against the reference's depthwise convolutions, compiled, train and sample
    sweep resample-train 330 bench.sweep_train --batch=$BATCH --variants=bf16+full+nhwc,bf16+full+nhwc+convresample \
        --profile
    sweep resample-sample 240 bench.sweep_train --task=sample --batch=$BATCH --variants=bf16+full,bf16+full+convresample \
        --steps=$STEPS
    ;;
call5)  # EDM2-S guided by XS (2x the reference): the sampler alone, then generate.py end to end with the VAE decoder
    sweep edm2-sample 240 bench.sweep_train --net=edm2-s --task=sample $EDM2_SAMPLE --variants=fp16,bf16+full \
        --steps=$STEPS
    wheels
    e2e edm2-gen-ref,edm2-gen-ours,edm2-gen-fast edm2-gen 320
    ;;
*)
    echo "unknown call $CALL: call1 ... call5" >&2
    exit 2
    ;;
esac
stamp done
tail -n 6 "$OUT"/*.md 2>/dev/null
cut -c1-200 "$OUT"/*.jsonl 2>/dev/null
true
