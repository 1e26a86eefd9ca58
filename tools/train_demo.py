#!/usr/bin/env python3
"""Train the small demo Mamba-1 model that ships in `models/mamba-demo/`.

Corpus: the King James Bible as dumped by `tools/get_kjv.sh` (Debian's `bible-kjv-text`, read with
the `bible` program of `bible-kjv`): one verse per line, `Ge1:1 In the beginning ...`.

Subcommands (run from the repository root; see tools/README.md):

    python tools/train_demo.py train  --corpus data/kjv/kjv.txt --work /tmp/mamba-demo-work [--budget-min 40]
    python tools/train_demo.py export --corpus data/kjv/kjv.txt --work /tmp/mamba-demo-work --out models/mamba-demo
    python tools/train_demo.py kernel-test

`train` builds the byte-level BPE tokenizer, trains `transformers.MambaForCausalLM` in float32 for
a wall-clock budget and writes a float32 checkpoint plus `train_log.json` to --work. `export` writes
the shipped folder: bf16 `model.safetensors`, `config.json` (every key explicit),
`generation_config.json`, `tokenizer.json`, `heldout.txt`, `eval.json` and the model card.

Only the training speed trick is not stock transformers: the HF "slow path" selective scan
(`mamba_selective_scan`, the python fallback used when `mamba_ssm` is not installed) is replaced,
during training only, by a fused C++ CPU kernel (forward + backward, compiled at run time with
torch.utils.cpp_extension; needs g++ and the Python headers). `kernel-test` checks it against the
HF function in float64. All numbers in eval.json/the model card are computed with the unpatched
transformers code.
"""

import argparse
import json
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

VOCAB_SIZE = 1024
EOS = "<|endoftext|>"
VAL_EVERY = 50  # chapter i (0-based, canonical order) is held out when i % 50 == 49
HELDOUT_CHAPTER = ("John", 3)  # a held-out chapter (chapter index 999), 4005 bytes
PROMPT = "And God said"
GEN_TOKENS = 48


# ----------------------------------------------------------------------------------------------
# corpus


def load_chapters(path):
    """Return a list of (book, chapter, text) in canonical order; text = verses joined by '\n' + '\n'."""
    pat = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
    chapters = []
    key = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            m = pat.match(line)
            if not m:
                raise ValueError(f"unexpected corpus line: {line[:80]!r}")
            book, ch, verse = m.group(1), int(m.group(2)), m.group(4).strip()
            if (book, ch) != key:
                key = (book, ch)
                chapters.append([book, ch, []])
            chapters[-1][2].append(verse)
    if len(chapters) != 1189:
        print(f"warning: expected 1189 chapters, got {len(chapters)}", file=sys.stderr)
    return [(b, c, "\n".join(v) + "\n") for b, c, v in chapters]


def split_chapters(chapters):
    train = [c for i, c in enumerate(chapters) if i % VAL_EVERY != VAL_EVERY - 1]
    val = [c for i, c in enumerate(chapters) if i % VAL_EVERY == VAL_EVERY - 1]
    return train, val


def heldout_text(val):
    """heldout.txt: one whole held-out chapter (John 3, 4005 bytes), one verse per line."""
    for book, ch, text in val:
        if (book, ch) == HELDOUT_CHAPTER:
            return text
    raise ValueError(f"{HELDOUT_CHAPTER} is not a validation chapter")


# ----------------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer(texts, vocab_size=VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.token_to_id(EOS) == 0
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


# ----------------------------------------------------------------------------------------------
# fused CPU selective scan (training speed only)

_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// u, dl: (b, E, L); A: (E, N); Bm, Cm: (b, L, N). h_t = exp(dl_t*A) h_{t-1} + dl_t*u_t*B_t; y_t = C_t.h_t
template <typename T>
static void fwd_impl(const T* u, const T* dl, const T* A, const T* Bm, const T* Cm, T* y, T* H, T* last,
                     int64_t b, int64_t E, int64_t L, int64_t N) {
  at::parallel_for(0, b * E, 1, [&](int64_t s, int64_t e_) {
    std::vector<T> h(N);
    for (int64_t be = s; be < e_; ++be) {
      const int64_t bi = be / E, ei = be % E;
      const T* ub = u + be * L; const T* db = dl + be * L; T* yb = y + be * L;
      const T* Ae = A + ei * N; const T* Bb = Bm + bi * L * N; const T* Cb = Cm + bi * L * N;
      std::fill(h.begin(), h.end(), T(0));
      for (int64_t t = 0; t < L; ++t) {
        const T d = db[t], dx = d * ub[t];
        const T* Bt = Bb + t * N; const T* Ct = Cb + t * N;
        T acc = 0;
        for (int64_t n = 0; n < N; ++n) {
          h[n] = std::exp(d * Ae[n]) * h[n] + dx * Bt[n];
          acc += Ct[n] * h[n];
        }
        yb[t] = acc;
        if (H) std::copy(h.begin(), h.end(), H + (be * L + t) * N);
      }
      if (last) std::copy(h.begin(), h.end(), last + be * N);
    }
  });
}

template <typename T>
static void bwd_impl(const T* u, const T* dl, const T* A, const T* Bm, const T* Cm, const T* H, const T* gy,
                     T* du, T* ddl, T* dAb, T* dB, T* dC, int64_t b, int64_t E, int64_t L, int64_t N) {
  // one batch row per task: dB/dC rows are owned by one thread; dA is reduced over b by the caller
  at::parallel_for(0, b, 1, [&](int64_t s, int64_t e_) {
    std::vector<T> dh(N), zeros(N, T(0));
    for (int64_t bi = s; bi < e_; ++bi) {
      const T* Bb = Bm + bi * L * N; const T* Cb = Cm + bi * L * N;
      T* dBb = dB + bi * L * N; T* dCb = dC + bi * L * N;
      for (int64_t ei = 0; ei < E; ++ei) {
        const int64_t be = bi * E + ei;
        const T* ub = u + be * L; const T* db = dl + be * L; const T* gb = gy + be * L;
        T* dub = du + be * L; T* ddb = ddl + be * L;
        const T* Ae = A + ei * N; T* dAe = dAb + be * N;
        std::fill(dh.begin(), dh.end(), T(0));
        for (int64_t t = L - 1; t >= 0; --t) {
          const T d = db[t], x = ub[t], g = gb[t];
          const T* __restrict__ Bt = Bb + t * N; const T* __restrict__ Ct = Cb + t * N;
          T* __restrict__ dBt = dBb + t * N; T* __restrict__ dCt = dCb + t * N;
          const T* __restrict__ ht = H + (be * L + t) * N;
          const T* __restrict__ hp = t > 0 ? H + (be * L + t - 1) * N : zeros.data();
          T* __restrict__ dhp = dh.data(); T* __restrict__ dAp = dAe; const T* __restrict__ Ap = Ae;
          T dd = 0, dx = 0;
          for (int64_t n = 0; n < N; ++n) {
            const T a = std::exp(d * Ap[n]);
            const T gh = dhp[n] + g * Ct[n];
            dCt[n] += g * ht[n];
            const T ah = a * hp[n];
            dAp[n] += gh * ah * d;
            dd += gh * (ah * Ap[n] + Bt[n] * x);
            dBt[n] += gh * d * x;
            dx += gh * d * Bt[n];
            dhp[n] = gh * a;
          }
          ddb[t] = dd;
          dub[t] = dx;
        }
      }
    }
  });
}

std::vector<torch::Tensor> scan_fwd(torch::Tensor u, torch::Tensor dl, torch::Tensor A, torch::Tensor Bm,
                                    torch::Tensor Cm, bool save_states) {
  const int64_t b = u.size(0), E = u.size(1), L = u.size(2), N = A.size(1);
  auto y = torch::empty_like(u);
  auto H = save_states ? torch::empty({b, E, L, N}, u.options()) : torch::empty({0}, u.options());
  auto last = torch::empty({b, E, N}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "scan_fwd", [&] {
    fwd_impl<scalar_t>(u.data_ptr<scalar_t>(), dl.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                       Bm.data_ptr<scalar_t>(), Cm.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                       save_states ? H.data_ptr<scalar_t>() : nullptr, last.data_ptr<scalar_t>(), b, E, L, N);
  });
  return {y, H, last};
}

std::vector<torch::Tensor> scan_bwd(torch::Tensor u, torch::Tensor dl, torch::Tensor A, torch::Tensor Bm,
                                    torch::Tensor Cm, torch::Tensor H, torch::Tensor gy) {
  const int64_t b = u.size(0), E = u.size(1), L = u.size(2), N = A.size(1);
  auto du = torch::empty_like(u);
  auto ddl = torch::empty_like(u);
  auto dAb = torch::zeros({b, E, N}, u.options());
  auto dB = torch::zeros_like(Bm);
  auto dC = torch::zeros_like(Cm);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "scan_bwd", [&] {
    bwd_impl<scalar_t>(u.data_ptr<scalar_t>(), dl.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                       Bm.data_ptr<scalar_t>(), Cm.data_ptr<scalar_t>(), H.data_ptr<scalar_t>(),
                       gy.data_ptr<scalar_t>(), du.data_ptr<scalar_t>(), ddl.data_ptr<scalar_t>(),
                       dAb.data_ptr<scalar_t>(), dB.data_ptr<scalar_t>(), dC.data_ptr<scalar_t>(), b, E, L, N);
  });
  return {du, ddl, dAb.sum(0), dB, dC};
}
"""

_EXT = None


def scan_ext():
    global _EXT
    if _EXT is None:
        from torch.utils.cpp_extension import load_inline

        build = os.environ.get("DEMO_SCAN_BUILD_DIR", "/tmp/mamba_demo_scan_ext")
        os.makedirs(build, exist_ok=True)
        _EXT = load_inline(
            name="mamba_demo_scan",
            cpp_sources=_CPP,
            functions=["scan_fwd", "scan_bwd"],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=build,
            verbose=False,
        )
    return _EXT


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dl, A, Bm, Cm):
        u, dl, A, Bm, Cm = (t.contiguous() for t in (u, dl, A, Bm, Cm))
        y, H, _ = scan_ext().scan_fwd(u, dl, A, Bm, Cm, True)
        ctx.save_for_backward(u, dl, A, Bm, Cm, H)
        return y

    @staticmethod
    def backward(ctx, gy):
        u, dl, A, Bm, Cm, H = ctx.saved_tensors
        return tuple(scan_ext().scan_bwd(u, dl, A, Bm, Cm, H, gy.contiguous()))


_HF_SCAN = None


def fused_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, **kwargs):
    """Drop-in for transformers' mamba_selective_scan (same arguments, same maths), no state output."""
    if return_last_state:
        return _HF_SCAN(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                        delta_softplus=delta_softplus, return_last_state=True, **kwargs)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    cdt = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    y = _Scan.apply(hidden_states.to(cdt), dt.to(cdt), A.to(cdt), B.transpose(1, 2).to(cdt),
                    C.transpose(1, 2).to(cdt))
    if D is not None:
        y = y + hidden_states * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def patch_scan(enable):
    global _HF_SCAN
    from transformers.models.mamba import modeling_mamba as mm

    if _HF_SCAN is None:
        _HF_SCAN = mm.mamba_selective_scan
    mm.mamba_selective_scan = fused_selective_scan if enable else _HF_SCAN


def cmd_kernel_test(args):
    torch.manual_seed(0)
    patch_scan(False)
    b, E, L, N = 2, 6, 37, 5
    dd = torch.float64
    inputs = dict(
        hidden_states=torch.randn(b, E, L, dtype=dd),
        dt=torch.randn(b, E, L, dtype=dd),
        A=-torch.rand(E, N, dtype=dd) * 3 - 0.1,
        B=torch.randn(b, N, L, dtype=dd),
        C=torch.randn(b, N, L, dtype=dd),
        D=torch.randn(E, dtype=dd),
        z=torch.randn(b, E, L, dtype=dd),
        delta_bias=torch.randn(E, dtype=dd) * 0.5,
    )
    gout = torch.randn(b, E, L, dtype=dd)
    def ref64(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus):
        # plain float64 recurrence (the HF fallback casts B and u to float32, so it is only ~1e-7 exact)
        dt = F.softplus(dt + delta_bias[..., None])
        h = torch.zeros(b, E, N, dtype=dd)
        ys = []
        for t in range(L):
            h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * hidden_states[:, :, t])[..., None] * B[:, None, :, t]
            ys.append((h * C[:, None, :, t]).sum(-1))
        y = torch.stack(ys, -1) + hidden_states * D[None, :, None]
        return y * F.silu(z)

    res = []
    for fn in (ref64, fused_selective_scan, _HF_SCAN):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        y = fn(**leaves, delta_softplus=True)
        (y * gout).sum().backward()
        res.append((y.detach(), {k: v.grad for k, v in leaves.items()}))
    ok = True
    for j, name, tol in ((1, "fused kernel", 1e-12), (2, "HF fallback", 1e-5)):
        err = (res[0][0] - res[j][0]).abs().max().item() / res[0][0].abs().max().item()
        print(f"{name} vs float64 reference: y max rel diff {err:.3e}")
        ok = ok and err < tol
        for k in inputs:
            e = (res[0][1][k] - res[j][1][k]).abs().max().item() / (res[0][1][k].abs().max().item() + 1e-30)
            print(f"  grad {k:14s} max rel diff {e:.3e}")
            ok = ok and e < tol
    # float32 timing / agreement at training size
    u = torch.randn(16, 384, 256)
    dl = F.softplus(torch.randn(16, 384, 256) - 3)
    A = -torch.arange(1, 17, dtype=torch.float32).expand(384, 16).contiguous()
    Bm = torch.randn(16, 256, 16)
    Cm = torch.randn(16, 256, 16)
    t = time.time()
    y, H, _ = scan_ext().scan_fwd(u, dl, A, Bm, Cm, True)
    t1 = time.time()
    scan_ext().scan_bwd(u, dl, A, Bm, Cm, H, torch.randn_like(y))
    t2 = time.time()
    print(f"float32 16x384x256x16: fwd {t1 - t:.3f}s bwd {t2 - t1:.3f}s")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------
# model


def make_config(args, vocab_size):
    from transformers import MambaConfig

    return MambaConfig(
        vocab_size=vocab_size,
        hidden_size=args.d_model,
        intermediate_size=args.d_model * 2,
        state_size=16,
        num_hidden_layers=args.n_layer,
        conv_kernel=4,
        expand=2,
        time_step_rank=math.ceil(args.d_model / 16),
        layer_norm_epsilon=1e-5,
        use_bias=False,
        use_conv_bias=True,
        residual_in_fp32=True,
        tie_word_embeddings=True,
        hidden_act="silu",
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        use_mambapy=False,
    )


@torch.no_grad()
def eval_chapters(model, tok, chapters):
    """Each chapter from a fresh state, preceded by the eos token (as in training). Returns (nats, bytes, tokens)."""
    model.eval()
    nats = 0.0
    nbytes = 0
    ntok = 0
    for _, _, text in chapters:
        ids = [0] + tok.encode(text).ids
        x = torch.tensor([ids])
        logits = model(input_ids=x[:, :-1]).logits.float()
        nats += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
        nbytes += len(text.encode("utf-8"))
        ntok += len(ids) - 1
    model.train()
    return nats, nbytes, ntok


def cmd_train(args):
    from transformers import MambaForCausalLM

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    os.makedirs(args.work, exist_ok=True)
    log_path = os.path.join(args.work, "train.log")
    logf = open(log_path, "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    chapters = load_chapters(args.corpus)
    train_ch, val_ch = split_chapters(chapters)
    tbytes = sum(len(c[2].encode()) for c in train_ch)
    vbytes = sum(len(c[2].encode()) for c in val_ch)
    log(f"corpus {args.corpus}: {len(chapters)} chapters; train {len(train_ch)} ({tbytes} B), "
        f"val {len(val_ch)} ({vbytes} B, {100 * vbytes / (tbytes + vbytes):.2f}%)")

    tok = build_tokenizer([c[2] for c in train_ch], args.vocab)
    tok.save(os.path.join(args.work, "tokenizer.json"))
    enc = tok.encode_batch([c[2] for c in train_ch])
    stream = []
    for e in enc:
        stream.append(0)
        stream.extend(e.ids)
    data = torch.tensor(stream, dtype=torch.long)
    log(f"tokenizer: vocab {tok.get_vocab_size()}; train tokens {len(data)} ({tbytes / len(data):.3f} bytes/token)")

    cfg = make_config(args, tok.get_vocab_size())
    model = MambaForCausalLM(cfg)
    model.train()
    nparams = sum(p.numel() for p in model.parameters())
    log(f"model d={args.d_model} layers={args.n_layer} params={nparams} ({nparams / 1e6:.3f}M)")

    if not args.no_fused_scan:
        patch_scan(True)
        scan_ext()

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim >= 2 and "A_log" not in n and "embeddings" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    gen = torch.Generator().manual_seed(args.seed)
    B, T = args.batch, args.seq_len
    budget = args.budget_min * 60.0

    def lr_at(progress, step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = min(max(progress, 0.0), 1.0)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    hist = []
    t0 = time.time()
    train_time = 0.0
    eval_time = 0.0
    next_eval = args.eval_every_min * 60.0
    step = 0
    ema = None
    while True:
        elapsed = train_time
        if args.steps:
            if step >= args.steps:
                break
            progress = step / args.steps
        else:
            if elapsed >= budget:
                break
            progress = elapsed / budget
        ts = time.time()
        lr = lr_at(progress, step)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
        batch = torch.stack([data[i:i + T + 1] for i in idx.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        step += 1
        train_time += time.time() - ts
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % args.log_every == 0 or step == 1:
            tokens = step * B * T
            log(f"step {step} loss {loss.item():.4f} ema {ema:.4f} lr {lr:.2e} gnorm {gn:.2f} "
                f"tokens {tokens} train_time {train_time:.0f}s tok/s {tokens / train_time:.0f}")
        if train_time >= next_eval and not args.steps:
            te = time.time()
            nats, nb, nt = eval_chapters(model, tok, val_ch)
            eval_time += time.time() - te
            bpb = nats / math.log(2) / nb
            hist.append({"step": step, "train_time_s": round(train_time, 1), "val_bpb": bpb})
            log(f"eval step {step}: val loss/token {nats / nt:.4f} nats, val bpb {bpb:.4f} ({time.time() - te:.0f}s)")
            next_eval += args.eval_every_min * 60.0
            save_ckpt(model, args.work)

    tokens = step * B * T
    log(f"done: {step} steps, {tokens} tokens, train time {train_time:.0f}s (wall {time.time() - t0:.0f}s)")
    patch_scan(False)  # final validation with the stock transformers code
    te = time.time()
    nats, nb, nt = eval_chapters(model, tok, val_ch)
    bpb = nats / math.log(2) / nb
    log(f"final val (stock HF path, fp32): loss/token {nats / nt:.4f} nats, ppl/token {math.exp(nats / nt):.3f}, "
        f"bits/byte {bpb:.4f} over {nb} bytes / {nt} tokens ({time.time() - te:.0f}s)")
    hist.append({"step": step, "train_time_s": round(train_time, 1), "val_bpb": bpb})
    save_ckpt(model, args.work)
    info = {
        "seed": args.seed,
        "d_model": args.d_model,
        "n_layer": args.n_layer,
        "vocab": tok.get_vocab_size(),
        "params": nparams,
        "batch": B,
        "seq_len": T,
        "lr": args.lr,
        "min_lr_frac": args.min_lr_frac,
        "warmup": args.warmup,
        "weight_decay": args.wd,
        "budget_min": args.budget_min,
        "steps": step,
        "tokens_seen": tokens,
        "train_time_s": round(train_time, 1),
        "train_tokens_per_epoch": len(data),
        "epochs": tokens / len(data),
        "val_chapters": len(val_ch),
        "val_bytes": nb,
        "val_tokens": nt,
        "val_nats": nats,
        "val_bits_per_byte_fp32": bpb,
        "val_history": hist,
        "threads": args.threads,
        "fused_scan": not args.no_fused_scan,
        "torch": torch.__version__,
    }
    import transformers

    info["transformers"] = transformers.__version__
    with open(os.path.join(args.work, "train_log.json"), "w") as f:
        json.dump(info, f, indent=2)
    log(f"wrote {args.work}/train_log.json")
    return 0


def save_ckpt(model, work):
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, os.path.join(work, "model_fp32.safetensors"))


# ----------------------------------------------------------------------------------------------
# export


def explicit_config(info):
    """config.json with every key written out (transformers 5's save_pretrained drops defaults)."""
    import transformers

    d = info["d_model"]
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": info["vocab"],
        "hidden_size": d,
        "intermediate_size": 2 * d,
        "state_size": 16,
        "num_hidden_layers": info["n_layer"],
        "conv_kernel": 4,
        "expand": 2,
        "time_step_rank": math.ceil(d / 16),
        "layer_norm_epsilon": 1e-05,
        "use_bias": False,
        "use_conv_bias": True,
        "residual_in_fp32": True,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "initializer_range": 0.1,
        "rescale_prenorm_residual": False,
        "time_step_scale": 1.0,
        "time_step_min": 0.001,
        "time_step_max": 0.1,
        "time_step_init_scheme": "random",
        "time_step_floor": 0.0001,
        "use_cache": True,
        "use_mambapy": False,
        "use_associative_scan": False,
        "dtype": "bfloat16",
        "transformers_version": transformers.__version__,
    }


def score_sequence(model, ids):
    """One sequence from a fresh state; returns (nats over predictions of ids[1:], per-position argmax margin)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()[0]
    return F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()


def greedy(model, ids, n):
    """Greedy decoding with transformers' generate (cache path); also the smallest top1-top2 logit margin."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, max_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, eos_token_id=0, pad_token_id=0)
    gen = out.sequences[0, len(ids):].tolist()
    margins = []
    for sc in out.scores:
        top = torch.topk(sc[0].float(), 2).values
        margins.append((top[0] - top[1]).item())
    return gen, min(margins)


def cmd_export(args):
    import shutil

    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import MambaConfig, MambaForCausalLM

    torch.set_num_threads(args.threads)
    patch_scan(False)
    with open(os.path.join(args.work, "train_log.json")) as f:
        info = json.load(f)
    out = args.out
    os.makedirs(out, exist_ok=True)
    cfg_dict = explicit_config(info)

    # 1. weights: fp32 checkpoint -> bf16 via the HF model's own save_pretrained
    cfg = MambaConfig(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type", "dtype",
                                                                       "transformers_version")})
    model = MambaForCausalLM(cfg)
    sd = load_file(os.path.join(args.work, "model_fp32.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    os.chmod(os.path.join(out, "model.safetensors"), 0o644)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "do_sample": False,
                   "transformers_version": cfg_dict["transformers_version"]}, f, indent=2)
        f.write("\n")
    shutil.copyfile(os.path.join(args.work, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
                   "pad_token": EOS, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
                   "clean_up_tokenization_spaces": False, "model_max_length": 1000000}, f, indent=2)
        f.write("\n")

    # 2. held-out text
    chapters = load_chapters(args.corpus)
    _, val_ch = split_chapters(chapters)
    held = heldout_text(val_ch)
    with open(os.path.join(out, "heldout.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(held)

    # 3. evaluate the shipped files: bf16 weights, float32 compute, stock transformers code
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    m = MambaForCausalLM.from_pretrained(out, dtype=torch.float32)
    m.eval()
    assert m.lm_head.weight.data_ptr() == m.backbone.embeddings.weight.data_ptr()
    nparams = sum(p.numel() for p in m.parameters())

    ids = tok.encode(held, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == held
    nats = score_sequence(m, ids)
    first_bytes = len(tok.decode(ids[:1]).encode("utf-8"))
    held_bytes = len(held.encode("utf-8"))
    scored_bytes = held_bytes - first_bytes

    vnats, vbytes, vtok = eval_chapters(m, tok, val_ch)

    p_ids = tok.encode(PROMPT, add_special_tokens=False).ids
    gen, margin = greedy(m, p_ids, GEN_TOKENS)
    gen_text = tok.decode(gen, skip_special_tokens=False)

    ev = {
        "model": "models/mamba-demo",
        "weights": "bfloat16 (model.safetensors)",
        "compute": "float32 (transformers MambaForCausalLM.from_pretrained(..., dtype=torch.float32), "
                   "stock slow path, CPU)",
        "transformers": cfg_dict["transformers_version"],
        "torch": torch.__version__,
        "parameters": nparams,
        "heldout": {
            "file": "heldout.txt",
            "bytes": held_bytes,
            "tokens": len(ids),
            "scoring": "whole file tokenized with tokenizer.json (no special tokens) and scored as ONE sequence "
                       "from a fresh (all-zero) state; token 0 is context only, the loss is summed over the "
                       "predictions of tokens 1..n-1",
            "scored_tokens": len(ids) - 1,
            "scored_bytes": scored_bytes,
            "nats": nats,
            "nats_per_token": nats / (len(ids) - 1),
            "perplexity_per_token": math.exp(nats / (len(ids) - 1)),
            "bits_per_byte": nats / math.log(2) / scored_bytes,
        },
        "validation": {
            "text": f"all {len(val_ch)} held-out chapters (every {VAL_EVERY}th chapter), {vbytes} bytes",
            "scoring": "each chapter from a fresh state, preceded by <|endoftext|> (id 0) as in training; "
                       "every token of the chapter is scored",
            "tokens": vtok,
            "nats_per_token": vnats / vtok,
            "perplexity_per_token": math.exp(vnats / vtok),
            "bits_per_byte": vnats / math.log(2) / vbytes,
        },
        "greedy": {
            "prompt": PROMPT,
            "prompt_ids": p_ids,
            "max_new_tokens": GEN_TOKENS,
            "method": "model.generate(do_sample=False, eos_token_id=0) (recurrent cache path)",
            "generated_ids": gen,
            "text": gen_text,
            "min_top1_top2_logit_margin": margin,
        },
    }
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(ev, f, indent=2)
        f.write("\n")

    samples = {}
    for prompt in args.card_prompts:
        sg, _ = greedy(m, tok.encode(prompt, add_special_tokens=False).ids, 64)
        samples[prompt] = tok.decode(sg, skip_special_tokens=False)

    # 4. model card
    card = model_card(info, cfg_dict, ev, samples)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(card)
    total = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(json.dumps(ev, indent=2))
    print(f"wrote {out}: {sorted(os.listdir(out))}, {total} bytes")
    assert total < 8 * 1024 * 1024
    return 0


def model_card(info, cfg, ev, samples):
    h = ev["heldout"]
    v = ev["validation"]
    g = ev["greedy"]
    copyright_path = "/usr/share/doc/bible-kjv-text/copyright"
    bpb_hist = "\n".join(
        f"| {r['step']} | {r['train_time_s'] / 60:.1f} | {r['val_bpb']:.4f} |"
        for i, r in enumerate(info["val_history"]) if i == 0 or r["step"] != info["val_history"][i - 1]["step"])
    sample_md = ""
    for prompt, text in samples.items():
        sample_md += f"\n```text\n{prompt}{text}\n```\n"
    return f"""# mamba-demo: a 1.2M-parameter Mamba-1 trained on the King James Bible

A tiny Mamba-1 language model (Hugging Face `MambaForCausalLM` layout) that ships with this
repository as a realistic demo and test model for the Rust engine. It writes English in the style of
the King James Bible. It is a toy: it knows nothing beyond the KJV text, and it is not a useful
language model.

| | |
|---|---|
| architecture | Mamba-1 (`model_type: mamba`), {cfg['num_hidden_layers']} layers, hidden size {cfg['hidden_size']}, intermediate size {cfg['intermediate_size']}, state size {cfg['state_size']}, conv kernel {cfg['conv_kernel']}, time-step rank {cfg['time_step_rank']}, no linear biases, conv bias, tied embeddings, RMSNorm eps 1e-5, residual in fp32 |
| parameters | {ev['parameters']:,} (embedding {cfg['vocab_size'] * cfg['hidden_size']:,}, shared with the LM head) |
| vocabulary | {cfg['vocab_size']} byte-level BPE tokens (`tokenizer.json`): id 0 `<|endoftext|>` (bos = eos = pad), 256 byte tokens, {cfg['vocab_size'] - 257} merges; ByteLevel pre-tokenizer and decoder, so decoding is exact |
| weights | `model.safetensors`, bfloat16 |
| training data | King James Bible from Debian's `bible-kjv-text` package, 1166 of 1189 chapters (~4.05 MB, {info['train_tokens_per_epoch']:,} tokens) |
| training | {info['steps']} steps x {info['batch']} x {info['seq_len']} tokens = {info['tokens_seen']:,} tokens ({info['epochs']:.2f} epochs), {info['train_time_s'] / 60:.1f} min on 2 shared CPU cores |
| validation | {v['bits_per_byte']:.4f} bits per byte ({v['perplexity_per_token']:.3f} perplexity per token) on the {info['val_chapters']} held-out chapters (bf16 weights, fp32 compute) |
| heldout.txt | {h['bits_per_byte']:.4f} bits per byte, {h['perplexity_per_token']:.3f} perplexity per token (see `eval.json`) |

## Files

- `config.json`: every configuration key written out explicitly; `generation_config.json` (eos id 0).
- `model.safetensors`: bf16 weights, written by `save_pretrained` (the LM head is tied to
  `backbone.embeddings.weight` and not stored).
- `tokenizer.json` (+ a minimal `tokenizer_config.json` so that `AutoTokenizer` works).
- `heldout.txt`: {h['bytes']:,} bytes of held-out text: the whole chapter John 3, one verse per
  line, as the training script formats chapters. The model never saw it in training.
- `eval.json`: the reference numbers below, computed with `transformers` from these files.

## Training corpus and licence

The text is the Authorized (King James) Version as packaged by Debian in `bible-kjv-text` (version
4.38), read with the `bible` program from `bible-kjv`: `bible -f Gen1:1-Rev22:21` prints every
verse, one per line, with its reference. `tools/get_kjv.sh` installs the packages and writes that
dump (31,102 verses, 4,404,412 bytes) to `data/kjv/kjv.txt`, which is not committed. The training
script drops the references and joins each chapter's verses with newlines; at run time every chapter
is preceded by `<|endoftext|>`.

The KJV text itself is in the public domain. Debian's copyright file for the package
(`{copyright_path}`) says:

> The copyright for the King James Version text of the Bible is expired since
> the translation was done in 1611 under King James the first of Great
> Britain.

and, about the package's data files (the compressed text and concordance): "This file is provided
for unrestricted use provided that this legend is included on all tape media and as a part of the
software program in whole or part. Users may copy, modify or distribute this file at will."
(Chip Chapin, Hewlett Packard Company, Bible Retrieval System, 1989). The `bible` program
itself (package `bible-kjv`, GPL-2+ for the Debian work) is only used to read the text; nothing
of it is distributed here. (In the United Kingdom, printing the KJV is still governed by the
Crown's letters patent; elsewhere the text is in the public domain.)

Validation split: chapter *i* of the 1189 chapters (0-based, canonical order Genesis 1 ...
Revelation 22) is held out when *i* mod {VAL_EVERY} = {VAL_EVERY - 1}, i.e. {info['val_chapters']} chapters,
{info['val_bytes']:,} bytes ({100 * info['val_bytes'] / (info['val_bytes'] + 4051726):.1f}% of the text). The tokenizer was also trained on
the training chapters only.

## Training

`tools/train_demo.py train`: `transformers` `MambaForCausalLM` (random init from the config, seed
{info['seed']}), float32, AdamW (betas 0.9/0.95, weight decay {info['weight_decay']} on weight matrices, not on the
embedding, `A_log`, `D`, norms or biases), peak learning rate {info['lr']}, {info['warmup']} warm-up steps then cosine decay to
{info['min_lr_frac']:.0%} of the peak over the wall-clock budget ({info['budget_min']:.0f} min), gradient clipping 1.0, random
{info['seq_len']}-token windows of the training stream, batch {info['batch']}, `torch.set_num_threads({info['threads']})`,
torch {info['torch']}, transformers {info['transformers']}.

transformers' CPU fallback for the selective scan is far too slow to train on (its sequential
scan did not finish 4 steps of 4096 tokens in 15 minutes on this shared machine), so during
training only, the script swaps `mamba_selective_scan` for a fused C++
CPU kernel (same maths, checked against a float64 reference to 1e-15 by `train_demo.py
kernel-test`). Everything else, and all evaluation, is stock transformers.

Validation bits per byte during training (fp32 weights; each held-out chapter from a fresh
state):

| step | training minutes | val bits/byte |
|---|---|---|
{bpb_hist}

## Reference outputs (`eval.json`)

Computed with transformers {ev['transformers']} / torch {ev['torch']} on CPU from the bf16 weights in
float32 (`MambaForCausalLM.from_pretrained("models/mamba-demo", dtype=torch.float32)`):

- `heldout.txt` ({h['bytes']:,} bytes, {h['tokens']} tokens) tokenized whole without special
  tokens and scored as **one sequence from a fresh state** (the first token is context only):
  {h['nats_per_token']:.4f} nats per token, **perplexity {h['perplexity_per_token']:.4f} per token**,
  **{h['bits_per_byte']:.4f} bits per byte** ({h['nats']:.2f} nats over the {h['scored_bytes']:,}
  bytes of the {h['scored_tokens']} predicted tokens).
- All validation chapters: {v['bits_per_byte']:.4f} bits per byte, perplexity {v['perplexity_per_token']:.4f}
  per token.

Greedy continuation of `{g['prompt']}` (prompt ids `{g['prompt_ids']}`), {g['max_new_tokens']} new tokens
(`generate(do_sample=False)`; the smallest top-1/top-2 logit gap along the way is
{g['min_top1_top2_logit_margin']:.3f}):

```text
{g['prompt']}{g['text']}
```

ids: `{g['generated_ids']}`

More greedy samples (same setup, 64 new tokens each):
{sample_md}
## Use

```python
import torch
from transformers import AutoTokenizer, MambaForCausalLM

tok = AutoTokenizer.from_pretrained("models/mamba-demo")
model = MambaForCausalLM.from_pretrained("models/mamba-demo", dtype=torch.float32)
ids = tok("And God said", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=48, do_sample=False)[0]))
```

With the Rust engine:

```sh
cargo run --release -p mamba-runtime -- generate --model models/mamba-demo \\
    --prompt "And God said" --temperature 0 --max-tokens 48 --json
```

## Reproduce

```sh
tools/get_kjv.sh                                   # apt-get install bible-kjv bible-kjv-text; dump to data/kjv/kjv.txt
python tools/train_demo.py kernel-test             # optional: check the fused training scan
python tools/train_demo.py train --corpus data/kjv/kjv.txt --work /tmp/mamba-demo-work --budget-min {info['budget_min']:.0f}
python tools/train_demo.py export --corpus data/kjv/kjv.txt --work /tmp/mamba-demo-work --out models/mamba-demo
```

Needs torch, transformers, safetensors, tokenizers, numpy, plus g++, ninja and the Python headers
for the training kernel. Seeds are fixed (data order, initialisation, tokenizer), but the
learning-rate schedule follows the wall clock, so a rerun on another machine (or under another
load) takes a different number of steps. To repeat this run's schedule by step count instead,
pass `--steps {info['steps']}`; expect close, not bit-identical, results.
"""



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--corpus", default="data/kjv/kjv.txt")
    t.add_argument("--work", default="/tmp/mamba-demo-work")
    t.add_argument("--budget-min", type=float, default=40.0, help="training wall-clock budget (minutes)")
    t.add_argument("--steps", type=int, default=0, help="fixed step count (step-based cosine) instead of a time budget")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--vocab", type=int, default=VOCAB_SIZE)
    t.add_argument("--d-model", type=int, default=192)
    t.add_argument("--n-layer", type=int, default=4)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--min-lr-frac", type=float, default=0.1)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--wd", type=float, default=0.1)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--eval-every-min", type=float, default=10.0)
    t.add_argument("--no-fused-scan", action="store_true", help="use the stock (slow) HF scan for training")
    k = sub.add_parser("kernel-test")
    e = sub.add_parser("export")
    e.add_argument("--corpus", default="data/kjv/kjv.txt")
    e.add_argument("--work", default="/tmp/mamba-demo-work")
    e.add_argument("--out", default="models/mamba-demo")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--card-prompts", nargs="*",
                   default=["In the beginning", "Jesus said unto them", "The LORD is my shepherd"])
    a = ap.parse_args()
    if a.cmd == "export":
        return cmd_export(a)
    if a.cmd == "train":
        return cmd_train(a)
    if a.cmd == "kernel-test":
        return cmd_kernel_test(a)


if __name__ == "__main__":
    sys.exit(main())
