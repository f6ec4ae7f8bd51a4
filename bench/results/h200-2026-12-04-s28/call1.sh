#!/bin/bash
# GPU call 1, session 28: does inductor's forced channels-last layout (nhwc) remove the 20% of cuDNN transposes,
# and what do per-block compiles cost cold and warm now that the AOTAutograd cache works?
# Each variant runs inline under bench.compile_report, with its own inductor cache (cold unless @warm).
export PYTHONUNBUFFERED=1
W=/tmp/s28
T0=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - T0 )) s" >> $OUT/diag.err; }
one() {  # one(name, variant, cache, timeout, extra...)
    stamp "$1"
    TORCHINDUCTOR_CACHE_DIR=$W/cache-$3 timeout $4 python -m bench.compile_report --out=$OUT/report-$1.json \
        bench/sweep_train.py --inline --variants=$2 "${@:5}" >> $OUT/sweep.jsonl 2>> $OUT/diag.err
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >> $OUT/diag.err
one full-nhwc    bf16+full+nhwc      full-nhwc   170 --profile
one blocks       bf16+blocks         blocks      170 --profile
one blocks-warm  bf16+blocks@warm    blocks       60
one blocks-nhwc  bf16+blocks+nhwc    blocks-nhwc 150 --profile
stamp done
cut -c1-400 $OUT/sweep.jsonl
