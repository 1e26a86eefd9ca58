#!/usr/bin/env bash
# Run the no_std firmware (examples/firmware) on an emulated Cortex-M4F and
# check its greedy tokens against the host CLI, token for token.
#
# Needs qemu-system-arm (apt-get install -y qemu-system-arm), the rustup
# target thumbv7em-none-eabihf and python3; installs nothing itself.
#
# The same environment as the firmware's build.rs:
#   MAMBA_FIRMWARE_MODEL       model directory (default models/mamba-demo if
#                              present, else tests/fixtures/hf_f32_tied);
#                              a relative path is taken from the current directory
#   MAMBA_FIRMWARE_PROMPT_IDS  prompt ids, 1,2,3 (default: "And God said" through
#                              the model's tokenizer.json, else examples/firmware/prompt_ids.txt)
#   MAMBA_FIRMWARE_TOKENS      tokens to generate (default 16)
# and MAMBA_FIRMWARE_STACK_MAX, the most stack bytes the run may use
# (default 16384: the demo model's forward pass takes about 10 KB; a
# product that kept 4 KB of thread shares in its frame had doubled it).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fw="$root/examples/firmware"

die() {
    echo "firmware-check: $*" >&2
    exit 1
}

command -v qemu-system-arm >/dev/null || die "qemu-system-arm not found (apt-get install -y qemu-system-arm)"
command -v python3 >/dev/null || die "python3 not found"

if [ -n "${MAMBA_FIRMWARE_MODEL:-}" ]; then
    model=$(cd "$MAMBA_FIRMWARE_MODEL" && pwd) || die "no model directory $MAMBA_FIRMWARE_MODEL"
elif [ -f "$root/models/mamba-demo/config.json" ] && [ -f "$root/models/mamba-demo/model.safetensors" ]; then
    model="$root/models/mamba-demo"
else
    model="$root/tests/fixtures/hf_f32_tied"
fi
export MAMBA_FIRMWARE_MODEL="$model"
echo "firmware-check: model $model"

echo "firmware-check: building the host CLI"
(cd "$root" && cargo build --release -p mamba-runtime)
cli="${CARGO_TARGET_DIR:-$root/target}/release/mamba-rs"

echo "firmware-check: building the firmware"
(cd "$fw" && cargo build --release)
elf="${CARGO_TARGET_DIR:-$fw/target}/thumbv7em-none-eabihf/release/mamba-firmware"
if command -v arm-none-eabi-size >/dev/null; then
    arm-none-eabi-size -A "$elf" | grep -E '^(section|\.vector_table|\.text|\.rodata|\.weights|\.data|\.bss|\.uninit)'
fi

echo "firmware-check: running it on qemu-system-arm (mps2-an386)"
set +e
# cargo run execs the runner (.cargo/config.toml), so the timeout reaches QEMU itself.
out=$(cd "$fw" && timeout 120 cargo run --release -q)
rc=$?
set -e
echo "$out"
[ "$rc" -eq 124 ] && die "the firmware did not finish within 120 s"
[ "$rc" -ne 0 ] && die "the firmware exited with status $rc"

field() {
    echo "$out" | sed -n "s/^$1: //p" | head -n1
}
tokens=$(field tokens)
prompt=$(field prompt_ids)
[ -n "$tokens" ] || die "no 'tokens:' line in the firmware's output"
[ -n "$prompt" ] || die "no 'prompt_ids:' line in the firmware's output"
n=$(echo "$tokens" | tr ',' '\n' | grep -c .)
stack=$(field stack_bytes_used)
stack_max=${MAMBA_FIRMWARE_STACK_MAX:-16384}
[ -n "$stack" ] || die "no 'stack_bytes_used:' line in the firmware's output"
if [ "$stack" -gt "$stack_max" ]; then
    die "the firmware used $stack bytes of stack, more than MAMBA_FIRMWARE_STACK_MAX=$stack_max"
fi

# json_field FIELD: FIELD of the first JSON object line on stdin, as comma-separated ids.
json_field() {
    python3 -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{"):
        print(",".join(str(i) for i in json.loads(line)[sys.argv[1]]))
        break
else:
    sys.exit("no JSON line in the host CLI output")
' "$1"
}

if [ -z "${MAMBA_FIRMWARE_PROMPT_IDS:-}" ] && [ -f "$model/tokenizer.json" ]; then
    host_prompt=$("$cli" generate --model "$model" --prompt "And God said" --max-tokens 0 --json | json_field prompt_ids)
    if [ "$host_prompt" != "$prompt" ]; then
        die "prompt ids differ: the firmware's build.rs made $prompt, the host tokenizer $host_prompt"
    fi
fi

# The portable kernels, as on the M4: the same arithmetic on both sides.
host=$(MAMBA_SIMD=0 "$cli" generate --model "$model" --ids "$prompt" --temperature 0 --max-tokens "$n" --ignore-eos --json |
    json_field generated_ids)
if [ "$host" != "$tokens" ]; then
    echo "firmware-check: MISMATCH for prompt $prompt" >&2
    echo "  firmware: $tokens" >&2
    echo "  host:     $host" >&2
    die "the firmware's greedy tokens differ from mamba-rs generate"
fi
echo "firmware-check: OK, $n tokens equal to the host CLI's"
