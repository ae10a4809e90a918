#!/usr/bin/env bash
# kernel.py on the oldest supported stack: torch 2.4.1, numpy 1.26.4, scipy 1.11.4, pillow 9.5.0.
#
#   scripts/old_stack.sh [VENV]        (default /tmp/dogkernel-old-stack; an existing one is reused)
#
# Builds the venv with pip (PyPI's torch 2.4.1 wheel is the CUDA 12.1 build: ~800 MB, and pip adds ~2.5 GB of
# nvidia-* libraries it imports even on a CPU), then runs from the repository root, on the CPU:
#   1. kernel.py --demo                                   the embedded default, one process
#   2. kernel.py --demo --gpus 2                          two gloo ranks the kernel forks itself (DDP)
#   3. torchrun --nproc_per_node=2 kernel.py --demo       the same two ranks started by torchrun
# Each must exit 0 and write a valid images.zip. Prints the versions, the venv's size and each step's time.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/tmp/dogkernel-old-stack}"
OUT="$VENV-runs"
PINS=(torch==2.4.1 numpy==1.26.4 scipy==1.11.4 pillow==9.5.0)

step() { echo; echo "== $*"; }
seconds_since() { echo $(( $(date +%s) - $1 )); }

if [ ! -x "$VENV/bin/python" ]; then
    step "building $VENV: ${PINS[*]}"
    started=$(date +%s)
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
    echo "installed in $(seconds_since "$started")s"
fi
"$VENV/bin/python" - <<'EOF'
import sys, numpy, scipy, PIL, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}, "
      f"scipy {scipy.__version__}, pillow {PIL.__version__}")
EOF
echo "venv size: $(du -sh "$VENV" | cut -f1)"

rm -rf "$OUT"
mkdir -p "$OUT"
cd "$REPO"

check_zip() {  # OUT_DIR N: images.zip holds N valid 64x64 RGB PNGs
    "$VENV/bin/python" - "$1/images.zip" "$2" <<'EOF'
import io, sys, zipfile
from PIL import Image
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert len(names) == int(sys.argv[2]), (len(names), sys.argv[2])
for name in names[::97]:
    img = Image.open(io.BytesIO(zipfile.ZipFile(sys.argv[1]).read(name)))
    assert (img.format, img.mode, img.size) == ("PNG", "RGB", (64, 64)), (name, img.format, img.mode, img.size)
print(f"{sys.argv[1]}: {len(names)} valid PNG 64x64")
EOF
}

run() {  # NAME N_IMAGES COMMAND...: run, show the end of its log, check its zip
    local name="$1" n_images="$2"
    shift 2
    step "$name: $*"
    local started=$(date +%s)
    if ! timeout 300 "$@" > "$OUT/$name.log" 2>&1; then  # a hung run fails instead of waiting for good
        tail -n 30 "$OUT/$name.log"
        echo "FAILED: $name (log: $OUT/$name.log)"
        exit 1
    fi
    grep -E '^\[(launch|distributed)\]|training stopped|wrote .*images.zip|^\[main\] done' "$OUT/$name.log" || true
    check_zip "$OUT/$name" "$n_images"
    echo "$name took $(seconds_since "$started")s"
}

run demo 10000 "$VENV/bin/python" kernel.py --demo --out "$OUT/demo"
run ddp_forked 2000 "$VENV/bin/python" kernel.py --demo --gpus 2 --time-budget 30s --n-images 2000 \
    --out "$OUT/ddp_forked"
grep -q '\[launch\] exit codes: rank 0 exited with code 0, rank 1 exited with code 0' "$OUT/ddp_forked.log"
run ddp_torchrun 2000 "$VENV/bin/python" -m torch.distributed.run --standalone --nproc_per_node=2 kernel.py --demo \
    --time-budget 30s --n-images 2000 --out "$OUT/ddp_torchrun"
grep -q '\[distributed\] 2 processes, backend gloo' "$OUT/ddp_torchrun.log"
step "the oldest supported stack runs the demo, and DDP forked and under torchrun"
