#!/usr/bin/env python3
"""Generate small random-weight Mamba-1 checkpoints plus float64 truth under tests/fixtures/<case>/.

Truth comes from transformers' MambaForCausalLM slow (pure torch) path run in float64 on the exact
weights that are stored (random f32 -> rounded to the storage dtype -> saved; truth model = those
rounded values converted to float64).  The HF slow path contains a few hard-coded f32 casts
(`.float()`, `.to(torch.float32)`: RMSNorm, residual_in_fp32, A, D, dt bias, logits); while computing
truth these are made no-ops for float64 tensors (see `keep_f64`), so every operation runs in f64.
An independent float64 re-implementation (`ref_forward`) cross-checks the result.

Rerun:  /opt/fixenv/bin/python tools/gen_fixtures.py      (from the repository root or anywhere)
Needs:  pip install torch transformers safetensors numpy tokenizers
"""

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import MambaConfig, MambaForCausalLM
from transformers.models.mamba import modeling_mamba

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")
N_GREEDY = 12
MIN_MARGIN = 1e-3  # greedy top1 - top2 gap (over the real vocab) must exceed this at every step
EPS = 1e-5
OUT_GAIN = 5.0  # out_proj std = OUT_GAIN / sqrt(d_inner): a strong mixer keeps greedy decoding from looping

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TORCH_DTYPE_NAME = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}

torch.set_num_threads(1)  # keep CPU reductions deterministic

# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
CASES = [
    dict(case="hf_f32_tied", layout="hf", dtype="f32", n_layer=2, d_model=16, expand=2, d_state=8,
         d_conv=4, dt_rank="auto", vocab=50, tied=True, use_bias=False, conv_bias=True, rif32=True,
         prompt_lens=[1, 3, 7, 40, 1100], tokenizer=True, generation_config=True, seed=1000),
    dict(case="hf_bf16_untied_sharded", layout="hf", dtype="bf16", n_layer=2, d_model=24, expand=2,
         d_state=16, d_conv=3, dt_rank=5, vocab=61, tied=False, use_bias=True, conv_bias=False,
         rif32=True, prompt_lens=[2, 9, 33], shards=2, seed=2000),
    dict(case="hf_f16_k2", layout="hf", dtype="f16", n_layer=3, d_model=32, expand=2, d_state=4,
         d_conv=2, dt_rank="auto", vocab=37, tied=True, use_bias=False, conv_bias=True, rif32=False,
         prompt_lens=[1, 5, 20], seed=3000),
    # original state-spaces layout; ssm_cfg {} -> defaults d_state 16, d_conv 4, expand 2, dt_rank auto
    dict(case="orig_bin", layout="original", dtype="f32", n_layer=2, d_model=20, ssm_cfg={}, vocab=50,
         pad_multiple=8, tied=True, store_lm_head=True, prompt_lens=[4, 17], fmt="bin", seed=4000),
    dict(case="orig_st_bf16", layout="original", dtype="bf16", n_layer=2, d_model=16,
         ssm_cfg={"d_state": 8, "d_conv": 3, "expand": 2}, vocab=45, pad_multiple=8, tied=True,
         store_lm_head=False, prompt_lens=[3, 12], fmt="safetensors", seed=5000),
]


def resolve(c):
    """Fill in derived dims (original layout defaults: d_state 16, d_conv 4, expand 2, dt_rank auto)."""
    c = dict(c)
    if c["layout"] == "original":
        s = c["ssm_cfg"]
        c["d_state"] = s.get("d_state", 16)
        c["d_conv"] = s.get("d_conv", 4)
        c["expand"] = s.get("expand", 2)
        c["dt_rank"] = s.get("dt_rank", "auto")
        c["use_bias"] = s.get("bias", False)
        c["conv_bias"] = s.get("conv_bias", True)
        c["rif32"] = True
        m = c["pad_multiple"]
        c["padded_vocab"] = (c["vocab"] + m - 1) // m * m
    else:
        c["padded_vocab"] = c["vocab"]
    c["d_inner"] = c["expand"] * c["d_model"]
    c["R"] = math.ceil(c["d_model"] / 16) if c["dt_rank"] == "auto" else int(c["dt_rank"])
    return c


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------
def make_weights(c, seed):
    """Random f32 weights (HF names), rounded to the storage dtype. Returns {name: tensor(storage dtype)}."""
    g = torch.Generator().manual_seed(seed)
    D, DI, N, K, R, V = c["d_model"], c["d_inner"], c["d_state"], c["d_conv"], c["R"], c["padded_vocab"]

    def randn(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std + mean

    def rand(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g, dtype=torch.float32) * (hi - lo) + lo

    w = {}
    emb = randn(V, D, std=2.5 / math.sqrt(D))
    if V > c["vocab"]:
        # padded rows never sampled: make them attractive so an unmasked argmax would pick them
        emb[c["vocab"]:] *= 1.6
    w["backbone.embeddings.weight"] = emb
    for i in range(c["n_layer"]):
        p = f"backbone.layers.{i}."
        w[p + "norm.weight"] = randn(D, std=0.1, mean=1.0)
        m = p + "mixer."
        w[m + "in_proj.weight"] = randn(2 * DI, D, std=1.0 / math.sqrt(D))
        if c["use_bias"]:
            w[m + "in_proj.bias"] = randn(2 * DI, std=0.1)
        w[m + "conv1d.weight"] = randn(DI, 1, K, std=0.6)
        if c["conv_bias"]:
            w[m + "conv1d.bias"] = randn(DI, std=0.2)
        w[m + "x_proj.weight"] = randn(R + 2 * N, DI, std=1.0 / math.sqrt(DI))
        dt_std = R ** -0.5
        w[m + "dt_proj.weight"] = rand(DI, R, lo=-dt_std, hi=dt_std)
        dt = torch.exp(rand(DI) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        w[m + "dt_proj.bias"] = dt + torch.log(-torch.expm1(-dt))  # inverse softplus, as HF init
        A = torch.arange(1, N + 1, dtype=torch.float32)[None, :].expand(DI, N)
        w[m + "A_log"] = torch.log(A) + randn(DI, N, std=0.05)
        w[m + "D"] = randn(DI, std=0.1, mean=1.0)
        w[m + "out_proj.weight"] = randn(D, DI, std=OUT_GAIN / math.sqrt(DI))
        if c["use_bias"]:
            w[m + "out_proj.bias"] = randn(D, std=0.1)
    w["backbone.norm_f.weight"] = randn(D, std=0.1, mean=1.0)
    if not c["tied"]:
        w["lm_head.weight"] = randn(V, D, std=2.5 / math.sqrt(D))
    sd = DTYPES[c["dtype"]]
    out = {k: v.to(sd).contiguous() for k, v in w.items()}
    for k, v in out.items():
        assert torch.isfinite(v.float()).all(), k
        assert (v != 0).any(), f"{k} is all zero"
    return out


# ----------------------------------------------------------------------------------------------
# float64 truth helpers
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def keep_f64():
    """Make the HF slow path's hard-coded f32 casts no-ops on float64 tensors (so all math is f64)."""
    orig_float, orig_to = torch.Tensor.float, torch.Tensor.to

    def _float(self, *a, **k):
        if self.dtype == torch.float64:
            return self
        return orig_float(self, *a, **k)

    def _to(self, *a, **k):
        if self.dtype == torch.float64:
            a = tuple(torch.float64 if x is torch.float32 else x for x in a)
            if k.get("dtype") is torch.float32:
                k["dtype"] = torch.float64
        return orig_to(self, *a, **k)

    torch.Tensor.float, torch.Tensor.to = _float, _to
    try:
        yield
    finally:
        torch.Tensor.float, torch.Tensor.to = orig_float, orig_to


def hf_config(c):
    return MambaConfig(
        vocab_size=c["padded_vocab"], hidden_size=c["d_model"], state_size=c["d_state"],
        num_hidden_layers=c["n_layer"], layer_norm_epsilon=EPS, expand=c["expand"],
        conv_kernel=c["d_conv"], use_bias=c["use_bias"], use_conv_bias=c["conv_bias"],
        residual_in_fp32=c["rif32"], time_step_rank=c["dt_rank"], tie_word_embeddings=c["tied"],
        bos_token_id=0, eos_token_id=0, pad_token_id=0, use_mambapy=False,
    )


def truth_model(c, weights):
    """HF model holding exactly the stored (rounded) weights, in float64."""
    model = MambaForCausalLM(hf_config(c))
    sd = {k: v.to(torch.float64) for k, v in weights.items()}
    model = model.to(torch.float64)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"} and (not missing or c["tied"]), missing
    model.tie_weights()
    model.eval()
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float64, k
    if c["tied"]:
        assert torch.equal(model.lm_head.weight, sd["backbone.embeddings.weight"])
    else:
        assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])
    return model


@torch.no_grad()
def hf_run(model, ids, use_cache=True):
    with keep_f64():
        out = model(torch.tensor([ids]), use_cache=use_cache)
    assert out.logits.dtype == torch.float64
    return out


def cache_states(cache, n_layer):
    conv = torch.stack([cache.layers[i].conv_states[0][0] for i in range(n_layer)])
    ssm = torch.stack([cache.layers[i].recurrent_states[0][0] for i in range(n_layer)])
    assert conv.dtype == torch.float64 and ssm.dtype == torch.float64
    return conv, ssm


@torch.no_grad()
def ref_forward(c, weights, ids):
    """Independent straightforward float64 Mamba-1 forward. Returns logits [T,V], conv [L,DI,K], ssm [L,DI,N]."""
    W = {k: v.to(torch.float64) for k, v in weights.items()}
    D, DI, N, K, R = c["d_model"], c["d_inner"], c["d_state"], c["d_conv"], c["R"]
    T = len(ids)

    def rms(x, w):
        return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + EPS))

    h = W["backbone.embeddings.weight"][torch.tensor(ids)]
    convs, ssms = [], []
    for i in range(c["n_layer"]):
        m = f"backbone.layers.{i}.mixer."
        x = rms(h, W[f"backbone.layers.{i}.norm.weight"])
        xz = x @ W[m + "in_proj.weight"].T
        if c["use_bias"]:
            xz = xz + W[m + "in_proj.bias"]
        xs, z = xz[:, :DI], xz[:, DI:]
        xp = torch.cat([torch.zeros(K - 1, DI, dtype=torch.float64), xs])  # [T+K-1, DI]
        cw = W[m + "conv1d.weight"][:, 0, :]  # [DI, K], tap K-1 = newest
        u = torch.stack([(xp[t:t + K].T * cw).sum(-1) for t in range(T)])
        if c["conv_bias"]:
            u = u + W[m + "conv1d.bias"]
        u = u * torch.sigmoid(u)
        dbc = u @ W[m + "x_proj.weight"].T
        dt = F.softplus(dbc[:, :R] @ W[m + "dt_proj.weight"].T + W[m + "dt_proj.bias"])
        Bm, Cm = dbc[:, R:R + N], dbc[:, R + N:]
        A = -torch.exp(W[m + "A_log"])
        s = torch.zeros(DI, N, dtype=torch.float64)
        ys = []
        for t in range(T):
            s = torch.exp(dt[t, :, None] * A) * s + dt[t, :, None] * Bm[t][None, :] * u[t, :, None]
            ys.append(s @ Cm[t] + W[m + "D"] * u[t])
        y = torch.stack(ys) * (z * torch.sigmoid(z))
        o = y @ W[m + "out_proj.weight"].T
        if c["use_bias"]:
            o = o + W[m + "out_proj.bias"]
        h = h + o
        convs.append(xp[-K:].T.clone())
        ssms.append(s)
    hn = rms(h, W["backbone.norm_f.weight"])
    head = W["backbone.embeddings.weight"] if c["tied"] else W["lm_head.weight"]
    return hn @ head.T, torch.stack(convs), torch.stack(ssms)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


def greedy(c, model, ids):
    """12 greedy tokens by repeated full float64 forwards; argmax over the real vocab only."""
    V = c["vocab"]
    seq, toks, margins, padded_wins = list(ids), [], [], 0
    for _ in range(N_GREEDY):
        lg = hf_run(model, seq, use_cache=False).logits[0, -1]
        top2 = torch.topk(lg[:V], 2)
        tok = int(top2.indices[0])
        margins.append(float(top2.values[0] - top2.values[1]))
        if int(lg.argmax()) >= V:
            padded_wins += 1
        toks.append(tok)
        seq.append(tok)
    return toks, min(margins), padded_wins


@torch.no_grad()
def greedy_cached(c, model, ids):
    V = c["vocab"]
    with keep_f64():
        out = model(torch.tensor([ids]), use_cache=True)
        cache, toks = out.cache, []
        for _ in range(N_GREEDY):
            tok = int(out.logits[0, -1, :V].argmax())
            toks.append(tok)
            out = model(torch.tensor([[tok]]), cache=cache, use_cache=True)
            cache = out.cache
    return toks


# ----------------------------------------------------------------------------------------------
# Checkpoint writers
# ----------------------------------------------------------------------------------------------
def write_json(path, obj):
    text = json.dumps(obj, indent=2)
    # keep lists of plain numbers on one line (token ids)
    text = re.sub(r"\[\s+([-0-9.e, \n]+?)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    assert json.loads(text) == obj
    with open(path, "w") as f:
        f.write(text + "\n")


def hf_config_json(c):
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "conv_kernel": c["d_conv"],
        "expand": c["expand"],
        "hidden_act": "silu",
        "hidden_size": c["d_model"],
        "initializer_range": 0.1,
        "intermediate_size": c["d_inner"],
        "layer_norm_epsilon": EPS,
        "num_hidden_layers": c["n_layer"],
        "rescale_prenorm_residual": False,
        "residual_in_fp32": c["rif32"],
        "state_size": c["d_state"],
        "tie_word_embeddings": c["tied"],
        "time_step_floor": 0.0001,
        "time_step_init_scheme": "random",
        "time_step_max": 0.1,
        "time_step_min": 0.001,
        "time_step_rank": c["dt_rank"],  # "auto" stays the string "auto"
        "time_step_scale": 1.0,
        "torch_dtype": TORCH_DTYPE_NAME[c["dtype"]],
        "use_bias": c["use_bias"],
        "use_cache": True,
        "use_conv_bias": c["conv_bias"],
        "vocab_size": c["vocab"],
    }


def save_st(tensors, path):
    save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)


def write_hf(c, d, weights):
    write_json(os.path.join(d, "config.json"), hf_config_json(c))
    names = list(weights)
    n_sh = c.get("shards", 1)
    if n_sh == 1:
        save_st(weights, os.path.join(d, "model.safetensors"))
        return ["config.json", "model.safetensors"]
    # split in order into n_sh groups of roughly equal byte size (a layer's tensors may straddle shards)
    sizes = [weights[k].numel() * weights[k].element_size() for k in names]
    total, groups, acc = sum(sizes), [[] for _ in range(n_sh)], 0
    for k, s in zip(names, sizes):
        groups[min(n_sh - 1, acc * n_sh // total)].append(k)
        acc += s
    wmap, files = {}, []
    for j, grp in enumerate(groups):
        assert grp
        fn = f"model-{j + 1:05d}-of-{n_sh:05d}.safetensors"
        save_st({k: weights[k] for k in grp}, os.path.join(d, fn))
        files.append(fn)
        for k in grp:
            wmap[k] = fn
    write_json(os.path.join(d, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))})
    return ["config.json", "model.safetensors.index.json"] + files


def write_original(c, d, weights):
    cfg = {
        "d_model": c["d_model"],
        "n_layer": c["n_layer"],
        "vocab_size": c["vocab"],
        "ssm_cfg": c["ssm_cfg"],
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": c["pad_multiple"],
        "tie_embeddings": c["tied"],
    }
    write_json(os.path.join(d, "config.json"), cfg)
    sd = {}
    for k, v in weights.items():
        sd[k.replace("backbone.embeddings.", "backbone.embedding.")] = v
    if c["store_lm_head"]:
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]  # shares storage, as a tied state_dict does
    if c["fmt"] == "bin":
        torch.save(sd, os.path.join(d, "pytorch_model.bin"))
        return ["config.json", "pytorch_model.bin"]
    save_st(sd, os.path.join(d, "model.safetensors"))
    return ["config.json", "model.safetensors"]


def read_original(c, d):
    if c["fmt"] == "bin":
        sd = torch.load(os.path.join(d, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        sd = load_file(os.path.join(d, "model.safetensors"))
    assert ("lm_head.weight" in sd) == c["store_lm_head"]
    if "lm_head.weight" in sd:
        assert torch.equal(sd.pop("lm_head.weight"), sd["backbone.embedding.weight"])
    return {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------
# Tokenizer (case 1)
# ----------------------------------------------------------------------------------------------
CORPUS = [
    "the cat sat on the warm mat",
    "a dog ran to the big red house",
    "she saw the small bird in a green tree",
    "we like to read old books at night",
    "the sun is bright and the sky is blue",
    "he ate bread with cold milk",
    "they walk by the river every day",
    "my old car is fast",
]
SPECIALS = ["<|endoftext|>", "[UNK]"]
ROUNDTRIP = "the cat sat on the warm mat"


def build_tokenizer(vocab_size):
    cnt = Counter(w for s in CORPUS for w in s.split())
    words = sorted(cnt, key=lambda w: (-cnt[w], w))
    assert len(words) == vocab_size - len(SPECIALS), f"corpus has {len(cnt)} distinct words"
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() == vocab_size
    enc = tok.encode(ROUNDTRIP)
    assert 1 not in enc.ids and tok.decode(enc.ids) == ROUNDTRIP, (enc.ids, tok.decode(enc.ids))
    assert tok.encode("the zebra").ids[1] == 1  # unknown word -> [UNK]
    return tok, enc.ids


# ----------------------------------------------------------------------------------------------
# Per-case generation
# ----------------------------------------------------------------------------------------------
def f64_file(d, name, t):
    arr = np.ascontiguousarray(t.detach().numpy().astype("<f8"))
    arr.tofile(os.path.join(d, name))
    return name


def make_prompts(c, seed, text_ids):
    g = torch.Generator().manual_seed(seed + 7)
    prompts = []
    for n in c["prompt_lens"]:
        if text_ids is not None and n == len(text_ids):
            prompts.append((list(text_ids), ROUNDTRIP))
        else:
            # ids in [1, vocab): avoid the bos/eos/pad id 0 inside prompts
            prompts.append((torch.randint(1, c["vocab"], (n,), generator=g).tolist(), None))
    return prompts


def check_conv_state(c, model, ids, conv):
    """Conv state == left-padded in_proj x-half of the last K mixer inputs, per layer."""
    captured = {}
    hooks = [layer.mixer.register_forward_hook(
        lambda mod, args, kwargs, out, i=i: captured.__setitem__(i, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for i, layer in enumerate(model.backbone.layers)]
    try:
        hf_run(model, ids, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    K, DI = c["d_conv"], c["d_inner"]
    for i, layer in enumerate(model.backbone.layers):
        with keep_f64():
            xs = layer.mixer.in_proj(captured[i])[0, :, :DI]  # [T, DI]
        exp = torch.cat([torch.zeros(K, DI, dtype=torch.float64), xs])[-K:].T
        assert torch.equal(exp, conv[i]), f"conv state mismatch layer {i}"


def attempt(c, seed, d, text_ids):
    weights = make_weights(c, seed)
    model = truth_model(c, weights)
    prompts = make_prompts(c, seed, text_ids)
    results = []
    for ids, text in prompts:
        out = hf_run(model, ids)
        logits = out.logits[0]
        conv, ssm = cache_states(out.cache, c["n_layer"])
        assert logits.shape == (len(ids), c["padded_vocab"])
        assert conv.shape == (c["n_layer"], c["d_inner"], c["d_conv"])
        assert ssm.shape == (c["n_layer"], c["d_inner"], c["d_state"])
        # independent f64 implementation must agree to ~f64 rounding
        rl, rc, rs = ref_forward(c, weights, ids)
        errs = (rel_err(logits, rl), rel_err(conv, rc), rel_err(ssm, rs))
        assert max(errs) < 1e-11, f"HF slow path vs reference: {errs}"
        if len(ids) <= 8:
            check_conv_state(c, model, ids, conv)
        toks, margin, padded_wins = greedy(c, model, ids)
        results.append(dict(ids=ids, text=text, logits=logits, conv=conv, ssm=ssm, greedy=toks,
                            margin=margin, padded_wins=padded_wins, ref_err=max(errs)))
    # acceptance: informative logits, non-degenerate greedy with clear margins, no eos (id 0) in greedy
    stds = [r["logits"][:, : c["vocab"]].std().item() for r in results]
    ok = all(1.0 <= s <= 5.0 for s in stds)
    ok &= all(len(set(r["greedy"])) >= 4 for r in results)
    ok &= all(r["margin"] > MIN_MARGIN for r in results)
    ok &= all(0 not in r["greedy"] for r in results)
    if c["padded_vocab"] > c["vocab"]:
        ok &= sum(r["padded_wins"] for r in results) > 0
    return ok, weights, model, results, stds


def gen_case(c0):
    c = resolve(c0)
    d = os.path.join(OUT, c["case"])
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    tok, text_ids = (build_tokenizer(c["vocab"]) if c.get("tokenizer") else (None, None))

    for seed in range(c["seed"], c["seed"] + 50):
        ok, weights, model, results, stds = attempt(c, seed, d, text_ids)
        if ok:
            break
        print(f"  {c['case']}: seed {seed} rejected (logit stds {[round(s, 2) for s in stds]}, "
              f"greedy {[r['greedy'] for r in results]}, margins {[round(r['margin'], 4) for r in results]})")
    else:
        raise RuntimeError(f"no acceptable seed for {c['case']}")

    # greedy with the cache must give the same tokens
    for r in results:
        assert greedy_cached(c, model, r["ids"]) == r["greedy"], "cached greedy differs"

    files = write_hf(c, d, weights) if c["layout"] == "hf" else write_original(c, d, weights)
    if tok is not None:
        tok.save(os.path.join(d, "tokenizer.json"))
        files.append("tokenizer.json")
    if c.get("generation_config"):
        write_json(os.path.join(d, "generation_config.json"),
                   {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0})
        files.append("generation_config.json")

    prompts = []
    for j, r in enumerate(results):
        p = {
            "ids": r["ids"],
            "logits": f64_file(d, f"p{j}_logits.f64", r["logits"]),
            "conv_state": f64_file(d, f"p{j}_conv.f64", r["conv"]),
            "ssm_state": f64_file(d, f"p{j}_ssm.f64", r["ssm"]),
            "greedy": r["greedy"],
            "greedy_min_margin": r["margin"],
        }
        if r["text"] is not None:
            p["text"] = r["text"]
        prompts.append(p)
    truth = {
        "case": c["case"],
        "layout": c["layout"],
        "storage_dtype": c["dtype"],
        "n_layer": c["n_layer"],
        "d_model": c["d_model"],
        "d_inner": c["d_inner"],
        "d_state": c["d_state"],
        "d_conv": c["d_conv"],
        "dt_rank": c["R"],
        "vocab_size": c["vocab"],
        "padded_vocab_size": c["padded_vocab"],
        "tied": c["tied"],
        "use_bias": c["use_bias"],
        "use_conv_bias": c["conv_bias"],
        "residual_in_fp32": c["rif32"],
        "layer_norm_epsilon": EPS,
        "seed": seed,
        "files": files,
        "prompts": prompts,
    }
    write_json(os.path.join(d, "truth.json"), truth)
    verify_reload(c, d, truth)
    return c, truth, stds, results


def verify_reload(c, d, truth):
    """Reload the files as a user would and reproduce the stored truth exactly (max abs diff 0)."""
    if c["layout"] == "hf":
        model = MambaForCausalLM.from_pretrained(d).to(torch.float64).eval()
        cfg = model.config
        assert cfg.vocab_size == c["vocab"] and cfg.time_step_rank == c["R"] and cfg.layer_norm_epsilon == EPS
        raw = json.load(open(os.path.join(d, "config.json")))
        assert raw["time_step_rank"] == c["dt_rank"]
        # stored tensors are in the storage dtype, with the right names and shapes
        if c.get("shards", 1) > 1:
            idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
            st = {}
            for fn in sorted(set(idx["weight_map"].values())):
                st.update(load_file(os.path.join(d, fn)))
            assert set(st) == set(idx["weight_map"])
            assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in st.values())
        else:
            st = load_file(os.path.join(d, "model.safetensors"))
        assert ("lm_head.weight" in st) == (not c["tied"])
    else:
        st = read_original(c, d)
        model = truth_model(c, st)
    assert all(v.dtype == DTYPES[c["dtype"]] for v in st.values())
    check_shapes(c, st)
    for p in truth["prompts"]:
        out = hf_run(model, p["ids"])
        conv, ssm = cache_states(out.cache, c["n_layer"])
        for key, t in (("logits", out.logits[0]), ("conv_state", conv), ("ssm_state", ssm)):
            stored = torch.from_numpy(np.fromfile(os.path.join(d, p[key]), dtype="<f8")).reshape(t.shape)
            assert torch.equal(stored, t), f"{c['case']} {key}: max abs diff {(stored - t).abs().max()}"


def check_shapes(c, st):
    D, DI, N, K, R, V = c["d_model"], c["d_inner"], c["d_state"], c["d_conv"], c["R"], c["padded_vocab"]
    exp = {"backbone.embeddings.weight": (V, D), "backbone.norm_f.weight": (D,)}
    if "lm_head.weight" in st:
        exp["lm_head.weight"] = (V, D)
    for i in range(c["n_layer"]):
        m = f"backbone.layers.{i}.mixer."
        exp[f"backbone.layers.{i}.norm.weight"] = (D,)
        exp.update({m + "in_proj.weight": (2 * DI, D), m + "conv1d.weight": (DI, 1, K),
                    m + "x_proj.weight": (R + 2 * N, DI), m + "dt_proj.weight": (DI, R),
                    m + "dt_proj.bias": (DI,), m + "A_log": (DI, N), m + "D": (DI,),
                    m + "out_proj.weight": (D, DI)})
        if c["conv_bias"]:
            exp[m + "conv1d.bias"] = (DI,)
        if c["use_bias"]:
            exp[m + "in_proj.bias"] = (2 * DI,)
            exp[m + "out_proj.bias"] = (D,)
    assert {k: tuple(v.shape) for k, v in st.items()} == exp


def check_slow_path():
    for mod in ("mamba_ssm", "causal_conv1d", "mambapy", "kernels"):
        assert importlib.util.find_spec(mod) is None, f"{mod} is installed: truth would not be the slow path"
    assert not getattr(modeling_mamba, "is_fast_path_available", False)


def main():
    check_slow_path()
    os.makedirs(OUT, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}")
    summary = []
    for c0 in CASES:
        c, truth, stds, results = gen_case(c0)
        d = os.path.join(OUT, c["case"])
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        summary.append((c, truth, stds, results, size))
    total = 0
    print("\ncase                     layout   dtype L  D   DI  N  K R  V(pad)  prompts            size")
    for c, truth, stds, results, size in summary:
        total += size
        print(f"{c['case']:24s} {c['layout']:8s} {c['dtype']:5s} {c['n_layer']} {c['d_model']:<3d} "
              f"{c['d_inner']:<3d} {c['d_state']:<2d} {c['d_conv']} {c['R']} {c['vocab']}({c['padded_vocab']})"
              f"  {str(c['prompt_lens']):18s} {size / 1024:7.1f} KiB  seed {truth['seed']}")
        for r, s in zip(results, stds):
            print(f"    len {len(r['ids']):5d}: logit std {s:5.2f}  greedy {r['greedy']}  min margin "
                  f"{r['margin']:.4f}  padded-argmax steps {r['padded_wins']}  hf-vs-ref rel {r['ref_err']:.1e}")
    grand = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"\ntotal under tests/fixtures: {grand / 1e6:.3f} MB ({grand} bytes)")
    assert grand < 6e6, "fixtures too large"
    h = hashlib.sha256()
    for dp, _, fs in sorted(os.walk(OUT)):
        for f in sorted(fs):
            if f.endswith((".f64", ".json")):
                h.update(open(os.path.join(dp, f), "rb").read())
    print(f"sha256 of truth files (*.f64, *.json): {h.hexdigest()}")


if __name__ == "__main__":
    sys.exit(main())
