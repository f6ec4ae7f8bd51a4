#!/bin/bash
# GPU call 2, session 27 (not committed): e2e train rows after the compile-cache fixes, then step profiles.
export PYTHONUNBUFFERED=1
W=/tmp/e2e
T0=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - T0 )) s" >> $OUT/diag.err; }
stamp e2e
timeout 330 python -m bench --mode=e2e --rows=train-fp16,train-fast,train-fast-rerun --time-limit=250 --workdir=$W --out=$OUT/e2e-train.json --markdown > $OUT/e2e-train.md 2>> $OUT/diag.err
stamp prof-full
TORCHINDUCTOR_CACHE_DIR=$W/compile-cache/train-fast timeout 130 python -m bench.sweep_train --inline --variants=bf16+full --profile --steps=5 >> $OUT/prof.jsonl 2>> $OUT/diag.err
stamp prof-fp16
timeout 45 python -m bench.sweep_train --inline --variants=fp16 --profile --steps=5 >> $OUT/prof.jsonl 2>> $OUT/diag.err
stamp prof-sample
TORCHINDUCTOR_CACHE_DIR=$W/compile-cache/sample timeout 85 python -m bench.sweep_train --inline --task=sample --variants=bf16+full --profile --steps=3 >> $OUT/prof.jsonl 2>> $OUT/diag.err
stamp done
cat $OUT/e2e-train.md | tail -20
