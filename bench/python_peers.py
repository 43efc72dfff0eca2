#!/usr/bin/env python3
"""Times torch.ops.tokmix.mix beside PyTorch's scaled_dot_product_attention (causal) and, when
importable, flash-linear-attention's ops, in one run on the same inputs; prints a table with
each time as a ratio to the causal-attention baseline of the same T. What is absent is skipped
and said so.

    /usr/bin/python3 bench/python_peers.py [--T 256,1024] [--device cpu|cuda] [--dtype float32]
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
import tokmix  # noqa: E402


def timeit(fn, reps, device):
    """Median of reps timed calls after one warm-up call, in milliseconds."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def causal_attention_manual(q, k, v):
    # [B, H, T, D]; PyTorch < 2.0 has no scaled_dot_product_attention
    T = q.shape[-2]
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return torch.matmul(torch.softmax(s.masked_fill(~mask, float("-inf")), -1), v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="256,1024", help="sequence lengths")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=32)
    ap.add_argument("--patterns", default="attention,local:64,first-order,pow2,sq1,pow2-lattice,sq1-lattice")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-backward", action="store_true", help="time the forward only")
    a = ap.parse_args()
    dev, dtype = a.device, getattr(torch, a.dtype)
    if dev == "cuda" and not tokmix.has_cuda_backend():
        print("note: this libtokmix_torch.so has no CUDA backend; tokmix rows will fail on cuda")
    print(f"torch {torch.__version__}, device {dev}, dtype {a.dtype}, B={a.B} H={a.H} D={a.D}, threads {torch.get_num_threads()}, "
          f"median of {a.reps}; library {tokmix.library_path}")

    have_sdpa = hasattr(F, "scaled_dot_product_attention")
    if not have_sdpa:
        print(f"skipped: torch.nn.functional.scaled_dot_product_attention (absent in torch {torch.__version__}); "
              "baseline = causal softmax attention written with matmul/softmax")
    try:
        import fla.ops as fla_ops  # noqa: F401
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
        fla_ok = dev == "cuda"
        if not fla_ok:
            print("skipped: flash-linear-attention ops (Triton kernels; need a CUDA device)")
    except Exception as e:  # ImportError, or a broken install
        fla_ok = False
        print(f"skipped: flash-linear-attention (not importable: {type(e).__name__}: {e})")

    rows = []
    for T in [int(t) for t in a.T.split(",")]:
        g = torch.Generator(device="cpu").manual_seed(T)
        mk = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)  # noqa: E731
        q, k, v = mk(a.B, T, a.H, a.D), mk(a.B, T, a.H, a.D), mk(a.B, T, a.H, a.D)
        dy = mk(a.B, T, a.H, a.D)

        def bench(name, f, inputs):
            leaves = [t.detach().clone().requires_grad_(not a.no_backward) for t in inputs]

            def run():
                y = f(*leaves)
                if not a.no_backward:
                    y.backward(dy if y.shape == dy.shape else dy.transpose(1, 2))
                    for t in leaves:
                        t.grad = None
            try:
                rows.append((T, name, timeit(run, a.reps, dev)))
            except Exception as e:
                print(f"skipped: {name} at T={T} ({type(e).__name__}: {str(e).splitlines()[0]})")

        qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        if have_sdpa:
            bench("sdpa causal", lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True), (qh, kh, vh))
        else:
            bench("attention (matmul)", causal_attention_manual, (qh, kh, vh))
        for p in a.patterns.split(","):
            bench(f"tokmix {p}", lambda q_, k_, v_, p=p: tokmix.mix(q_, k_, v_, p), (q, k, v))
        if fla_ok:
            gk = F.logsigmoid(mk(a.B, T, a.H, a.D))
            gs = F.logsigmoid(mk(a.B, T, a.H))
            bench("fla chunk_gla", lambda q_, k_, v_: chunk_gla(q_, k_, v_, g=gk)[0], (q, k, v))
            bench("fla chunk_simple_gla", lambda q_, k_, v_: chunk_simple_gla(q_, k_, v_, g=gs)[0], (q, k, v))

    what = "forward" if a.no_backward else "forward+backward"
    print(f"\n{'T':>6}  {'op':<24} {what + ' ms':>20}  {'vs attention':>12}")
    base = {T: ms for T, name, ms in rows if name in ("sdpa causal", "attention (matmul)")}
    for T, name, ms in rows:
        ratio = f"{ms / base[T]:.2f}x" if T in base else "-"
        print(f"{T:>6}  {name:<24} {ms:>20.3f}  {ratio:>12}")


if __name__ == "__main__":
    main()
