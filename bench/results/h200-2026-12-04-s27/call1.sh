#!/bin/bash
# GPU diagnostics, session 27 call 1 (not committed)
export PYTHONUNBUFFERED=1
W=/tmp/w; mkdir -p $W
T0=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - T0 )) s" | tee -a $OUT/stamps.txt; }
python -c "from bench import e2e_inputs as e; e.make_image_dataset('$W/data.zip', 5000, 32)" > $OUT/data.log 2>&1
COMMON="--data=$W/data.zip --nosubdir --arch=ddpmpp --cond=1 --device=cuda --snapshot=1G --checkpoint=1G --seed=0 --batch=512 --status=5Ki --duration=30Ki"
stamp fp16
( time timeout 120 python -m cProfile -o $OUT/fp16.prof train.py $COMMON --outdir=$W/fp16 --fp16=1 ) > $OUT/fp16.log 2>&1
stamp fast-cold
export TORCHINDUCTOR_CACHE_DIR=$W/ind
( time timeout 240 python -m bench.compile_report --out=$OUT/fast-cold.json train.py $COMMON --outdir=$W/fast --fast ) > $OUT/fast-cold.log 2>&1
stamp fast-warm
( time timeout 150 python -m bench.compile_report --out=$OUT/fast-warm.json train.py $COMMON --outdir=$W/fast2 --fast ) > $OUT/fast-warm.log 2>&1
stamp prof-full
timeout 120 python -m bench.sweep_train --inline --variants=bf16+full --profile --steps=5 > $OUT/prof-full.json 2> $OUT/prof-full.err
stamp prof-fp16
timeout 60 python -m bench.sweep_train --inline --variants=fp16 --profile --steps=5 > $OUT/prof-fp16.json 2> $OUT/prof-fp16.err
stamp prof-sample
timeout 100 python -m bench.sweep_train --inline --task=sample --variants=bf16+full --profile --steps=3 > $OUT/prof-sample.json 2> $OUT/prof-sample.err
stamp done
tail -3 $OUT/*.log
