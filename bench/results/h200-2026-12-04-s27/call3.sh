#!/bin/bash
# GPU call 3, session 27 (not committed): e2e generate, EDM2 and encode rows.
export PYTHONUNBUFFERED=1
W=/tmp/e2e
T0=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - T0 )) s" >> $OUT/diag.err; }
stamp gen
timeout 230 python -m bench --mode=e2e --rows=gen-fp32,gen-fast,gen-fast-rerun --time-limit=110 --workdir=$W --out=$OUT/e2e-gen.json --markdown > $OUT/e2e-gen.md 2>> $OUT/diag.err
stamp edm2
timeout 185 python -m bench --mode=e2e --rows=edm2-fp16,edm2-bf16-compile --time-limit=150 --workdir=$W --out=$OUT/e2e-edm2.json --markdown > $OUT/e2e-edm2.md 2>> $OUT/diag.err
stamp wheels
# diffusers for the encode rows: unpack only what the device's Python lacks (no pip needed)
python - >> $OUT/diag.err 2>&1 <<'PY'
import glob, importlib.util, os, sys, zipfile
dest = '/tmp/pylib'; os.makedirs(dest, exist_ok=True)
need = {'diffusers': 'diffusers', 'huggingface_hub': 'huggingface_hub', 'safetensors': 'safetensors', 'regex': 'regex',
        'yaml': 'pyyaml', 'importlib_metadata': 'importlib_metadata', 'zipp': 'zipp', 'filelock': 'filelock',
        'fsspec': 'fsspec', 'hf_xet': 'hf_xet', 'httpx2': 'httpx2', 'httpcore2': 'httpcore2', 'h11': 'h11',
        'anyio': 'anyio', 'idna': 'idna', 'packaging': 'packaging', 'typing_extensions': 'typing_extensions',
        'tqdm': 'tqdm', 'click': 'click', 'truststore': 'truststore', 'lazy_importer': 'lazy_importer',
        'requests': 'requests', 'urllib3': 'urllib3', 'certifi': 'certifi', 'charset_normalizer': 'charset_normalizer'}
for module, dist in need.items():
    if importlib.util.find_spec(module) is not None:
        continue
    for wheel in glob.glob(f'gpuwheels/{dist}-*.whl'):
        zipfile.ZipFile(wheel).extractall(dest)
    print('unpacked', dist, file=sys.stderr)
PY
export PYTHONPATH=/tmp/pylib
python -c "import diffusers; print('diffusers', diffusers.__version__)" >> $OUT/diag.err 2>&1
stamp encode
timeout 130 python -m bench --mode=e2e --rows=encode-b1,encode-b8,encode-b32-bf16 --time-limit=50 --workdir=$W --out=$OUT/e2e-encode.json --markdown > $OUT/e2e-encode.md 2>> $OUT/diag.err
stamp done
tail -12 $OUT/e2e-*.md
