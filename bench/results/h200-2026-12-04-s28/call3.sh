#!/bin/bash
# GPU call 3, session 28: train.py --fast cold, then a warm start under bench.compile_report (is the network now an
# AOTAutograd cache hit after the np.sqrt -> math.sqrt fixes?), then generate.py --fast with the PNG thread.
export PYTHONUNBUFFERED=1
W=/tmp/e2e
T0=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - T0 )) s" >> $OUT/diag.err; }
stamp train
timeout 250 python -m bench --mode=e2e --rows=train-fast --time-limit=240 --workdir=$W \
    --out=$OUT/e2e-train.json --markdown > $OUT/e2e-train.md 2>> $OUT/diag.err
stamp report-warm
TORCHINDUCTOR_CACHE_DIR=$W/compile-cache/train-fast timeout 60 python -m bench.compile_report --out=$OUT/report-fast-warm.json \
    train.py --data=$W/data-32px-5000.zip --outdir=$W/runs/report-warm --nosubdir --arch=ddpmpp --cond=1 --device=cuda \
    --snapshot=1G --checkpoint=1G --seed=0 --batch=512 --status=5Ki --duration=5Ki --fast > $OUT/report-fast-warm.log 2>&1
stamp gen
timeout 130 python -m bench --mode=e2e --rows=gen-fast --time-limit=120 --workdir=$W \
    --out=$OUT/e2e-gen.json --markdown > $OUT/e2e-gen.md 2>> $OUT/diag.err
stamp done
tail -4 $OUT/e2e-train.md $OUT/e2e-gen.md
grep -E "^Status|time " $OUT/report-fast-warm.log | head -3
python -c "import json; d=json.load(open('$OUT/report-fast-warm.json')); print(d['process_s'], d['counters'].get('aot_autograd'), d['bypass_reasons'])"
