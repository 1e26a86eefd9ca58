#!/usr/bin/env python3
"""Generate the tiny torch.save fixtures used by std-runtime/src/torch_bin.rs tests.

Usage: /opt/fixenv/bin/python tools/make_torch_bin_fixtures.py

Writes into std-runtime/tests/data/torch_bin/:
  state_dict.bin   - plain dict state dict with f32/f16/bf16 tensors, a
                     transposed (non-contiguous) view, two tensors sharing one
                     storage at different offsets, a [1] tensor, and a
                     tensor carrying a Python attribute (_rebuild_from_type_v2).
  state_dict.json  - expected values: {name: {"dtype", "shape", "values"}},
                     values flattened in row-major (contiguous) order as f32.
  ordered.bin      - torch.save of a collections.OrderedDict (as returned by
                     nn.Module.state_dict()), including an nn.Parameter.
  ordered.json     - expected values for ordered.bin.
  protocol4.bin    - torch.save(..., pickle_protocol=4): exercises FRAME,
                     SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL, BININT2; also a
                     0-d tensor and an empty [0, 3] tensor.
  protocol4.json   - expected values for protocol4.bin.
"""
import collections
import json
import os

import torch

OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "std-runtime",
    "tests",
    "data",
    "torch_bin",
)

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def expected(sd):
    out = {}
    for name, t in sd.items():
        t = t.detach()
        out[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "values": [float(v) for v in t.float().contiguous().reshape(-1).tolist()],
        }
    return out


def save(sd, stem, **kwargs):
    torch.save(sd, os.path.join(OUT, stem + ".bin"), **kwargs)
    with open(os.path.join(OUT, stem + ".json"), "w") as f:
        json.dump(expected(sd), f, sort_keys=True, separators=(",", ":"))
        f.write("\n")


def main():
    os.makedirs(OUT, exist_ok=True)

    # Plain dict.
    f32_2d = torch.arange(6, dtype=torch.float32).reshape(2, 3) * 0.5 - 1.25
    f16_1d = torch.tensor([1.5, -2.0, 0.099975586, 65504.0, -0.0], dtype=torch.float16)
    bf16_3d = (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) - 7.0).to(torch.bfloat16) / 4
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) + 100.0
    transposed = base.t()  # shape [4, 3], stride (1, 4): non-contiguous view
    shared = torch.arange(10, dtype=torch.float32) * -1.0 - 0.5
    shared_a = shared[1:4]  # offset 1
    shared_b = shared[5:10].view(5)  # offset 5, same storage
    scalar1 = torch.tensor([3.25], dtype=torch.float32)
    # Strided view inside a larger storage with nonzero offset and step 2.
    stepped = (torch.arange(20, dtype=torch.float16)).reshape(4, 5)[1:, ::2]
    # A tensor with a Python attribute is pickled through
    # torch._tensor._rebuild_from_type_v2(_rebuild_tensor_v2, torch.Tensor, args, state).
    tagged = torch.tensor([0.25, -0.75], dtype=torch.float32)
    tagged.tag = "x"

    sd = {
        "layer.weight": f32_2d,
        "layer.bias_f16": f16_1d,
        "block.bf16_3d": bf16_3d,
        "base": base,
        "transposed": transposed,
        "shared_a": shared_a,
        "shared_b": shared_b,
        "scalar1": scalar1,
        "stepped_f16": stepped,
        "tagged": tagged,
    }
    assert not transposed.is_contiguous()
    assert not stepped.is_contiguous()
    assert shared_a.untyped_storage().data_ptr() == shared_b.untyped_storage().data_ptr()
    save(sd, "state_dict")

    # OrderedDict from a real module (contains nn.Parameter-derived tensors).
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    od = m.state_dict()
    assert isinstance(od, collections.OrderedDict)
    od["extra_param"] = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))
    save(od, "ordered")

    # Protocol 4 pickle.
    p4 = {
        "long_f16": (torch.arange(300, dtype=torch.float32) / 8 - 10).to(torch.float16),
        "scalar0": torch.tensor(-7.5, dtype=torch.float32),
        "empty": torch.zeros(0, 3, dtype=torch.float32),
        "bf16_t": (torch.arange(6, dtype=torch.float32).reshape(2, 3) * 1.5).to(torch.bfloat16).t(),
    }
    save(p4, "protocol4", pickle_protocol=4)


if __name__ == "__main__":
    main()
