#!/usr/bin/env bash
# Per-kernel device time of a few bench runs under Nsight Compute (ncu, one
# metric: gpu__time_duration), summed by kernel and grid size, on a machine
# with a GPU, after tools/gpu-prep.sh (uses .gpu-bin/mamba-rs):
#   run(command="bash tools/gpu-profile.sh", carry=[".gpu-bin"], timeout_s=300)
# Writes profile-*.csv (every launch) and prints the costliest kernels of each run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-/tmp/gpu-profile}
mkdir -p "$OUTDIR"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MAMBA_CUDA_INCLUDE=${MAMBA_CUDA_INCLUDE:-/usr/local/cuda/include}
export MAMBA_CUDA_CACHE=${MAMBA_CUDA_CACHE:-/tmp/mamba-cuda-cache}
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -z "$NCU" ]; then echo "ncu not found"; exit 1; fi
MRS=.gpu-bin/mamba-rs
profile() { # name, then the bench arguments
    local name=$1; shift
    echo "== ncu: $name: $*"
    timeout -k 5 "${PROFILE_TIMEOUT_S:-150}" "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
        --print-units base --page raw "$MRS" bench --device cuda "$@" > "$OUTDIR/profile-$name.csv" 2> "/tmp/profile-$name.err"
    local rc=$?
    echo "exit $rc"
    # The device tool brings back at most 8 files from $OUT: ncu's stderr only when it failed.
    [ "$rc" = 0 ] || { tail -5 "/tmp/profile-$name.err"; cp "/tmp/profile-$name.err" "$OUTDIR/"; }
    python3 tools/ncu-summary.py "$OUTDIR/profile-$name.csv" 12
}
profile 130m-b1 --shape 130m --dtype bf16 --batch 1 --prompt-len 64 --gen-len 2 --repeat 1
profile 2.8b --shape 2.8b --dtype bf16 --batch 1,256 --prompt-len 512 --gen-len 1 --repeat 1
