#!/bin/bash
# GPU call 2, session 28: train.py --fast end to end with inductor's channels-last convolutions and the einsum
# attention back in the AOTAutograd cache; what a warm start still compiles; generate.py with the PNG thread.
export PYTHONUNBUFFERED=1
W=/tmp/e2e
T0=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - T0 )) s" >> $OUT/diag.err; }
stamp train
timeout 300 python -m bench --mode=e2e --rows=train-fp16,train-fast,train-fast-rerun --time-limit=250 --workdir=$W \
    --out=$OUT/e2e-train.json --markdown > $OUT/e2e-train.md 2>> $OUT/diag.err
stamp report-warm
TORCHINDUCTOR_CACHE_DIR=$W/compile-cache/train-fast timeout 80 python -m bench.compile_report --out=$OUT/report-fast-warm.json \
    train.py --data=$W/data-32px-5000.zip --outdir=$W/runs/report-warm --nosubdir --arch=ddpmpp --cond=1 --device=cuda \
    --snapshot=1G --checkpoint=1G --seed=0 --batch=512 --status=5Ki --duration=10Ki --fast > $OUT/report-fast-warm.log 2>&1
stamp gen
timeout 200 python -m bench --mode=e2e --rows=gen-fp32,gen-fast --time-limit=110 --workdir=$W \
    --out=$OUT/e2e-gen.json --markdown > $OUT/e2e-gen.md 2>> $OUT/diag.err
stamp done
tail -6 $OUT/e2e-train.md $OUT/e2e-gen.md
python -c "import json; d=json.load(open('$OUT/report-fast-warm.json')); print(d['process_s'], d['counters'].get('aot_autograd'), d['bypass_reasons'])"
