#!/usr/bin/env bash
# Build, on a machine without a GPU, everything tools/gpu-check.sh runs, into
# .gpu-bin/ (git-ignored), for a device machine that has no Rust toolchain:
#   bash tools/gpu-prep.sh [--baseline REV]
# With --baseline, mamba-rs is also built at REV (in a temporary worktree)
# as .gpu-bin/mamba-rs-base, and gpu-check.sh benchmarks it beside the
# current build, shape by shape in the same minutes, and prints the ratios.
# then, with the device tool: run(command="bash tools/gpu-check.sh",
# carry=[".gpu-bin"], timeout_s=540). gpu-check.sh builds with cargo itself
# when cargo is there and .gpu-bin/ is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=.gpu-bin
base=
if [ "${1:-}" = --baseline ]; then
    base=$(git rev-parse --verify "${2:?--baseline needs a revision}^{commit}")
fi
rm -rf "$out"
mkdir -p "$out"

echo "== release build of mamba-rs and the GPU test binaries"
cargo build --release -p mamba-runtime --bin mamba-rs
cargo test --release -p mamba-cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' > "$out/tests.txt"
target=${CARGO_TARGET_DIR:-target}
cp "$target/release/mamba-rs" "$out/mamba-rs"
while read -r name exe; do cp "$exe" "$out/test-$name"; done < "$out/tests.txt"
rm "$out/tests.txt"
if [ -n "$base" ]; then
    echo "== mamba-rs at the baseline $base"
    wt=$(mktemp -d)
    git worktree add --detach "$wt" "$base" >/dev/null
    # Its own target folder beside ours (CARGO_TARGET_DIR may be relative or absolute).
    base_target=$target/baseline
    case $base_target in /*) ;; *) base_target=$root/$base_target ;; esac
    (cd "$wt" && cargo build --release -p mamba-runtime --bin mamba-rs --target-dir "$base_target")
    cp "$base_target/release/mamba-rs" "$out/mamba-rs-base"
    git worktree remove --force "$wt"
    echo "$base" > "$out/BASE_COMMIT"
fi
strip "$out"/* 2>/dev/null || true
# The test binaries find tests/fixtures through the path they were built at.
echo "$root" > "$out/ROOT"
git rev-parse HEAD > "$out/COMMIT" 2>/dev/null || true
ls -la "$out"
du -sh "$out"
