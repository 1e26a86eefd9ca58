#!/usr/bin/env bash
# Fail when the release CLI calls a core::arch intrinsic out of line.
#
# An intrinsic is inlined only into code that enables its target feature. A
# closure inside a #[target_feature] function does not inherit the feature,
# nor does a helper that LLVM inlines late. An AVX-512 DQ intrinsic in a
# function that enables only F/BW/VL is not inlined either. Each of these
# compiles and gives the right bits, but every vector operation becomes a
# call: it once cost batch-16 decode 40%, and it cost the conv a call per
# token and block for several builds before anyone saw it.
#
# Needs objdump (binutils); installs nothing itself.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
(cd "$root" && cargo build --release -q -p mamba-runtime)
cli="${CARGO_TARGET_DIR:-$root/target}/release/mamba-rs"
calls=$(objdump -d --no-show-raw-insn "$cli" \
    | awk '/^[0-9a-f]+ <.*>:$/ { fn = $2 } /call.*core_arch.*_mm/ { print fn " calls " $NF }' | sort | uniq -c)
if [ -n "$calls" ]; then
    echo "check-intrinsics: intrinsics called out of line (the caller lacks their target feature):"
    echo "$calls"
    exit 1
fi
echo "check-intrinsics: every core::arch SIMD intrinsic (_mm*) in $cli is inlined"
