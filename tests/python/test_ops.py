"""torch.ops.tokmix against references: gradcheck (float64) on every pattern family and both
modes, the conformance vectors the C++ tests also check, decoding against the parallel form,
the analysis against the CLI, and the C++ error messages."""
import json
import os
import random
import subprocess

import pytest
import torch

import tokmix

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTDATA = os.environ.get("TOKMIX_TESTDATA", os.path.join(ROOT, "tests", "data"))

# one instance per family: attention, local, first-order, recurrence:K, dense, pow2, sq1,
# lattices, f lists (and a list lattice), hybrids
PATTERNS = ["attention", "local:3", "first-order", "recurrence:2", "dense", "pow2", "sq1", "pow2-lattice", "sq1-lattice",
            "f:1,3,9", "f:1,3,9,27-lattice", "A=local:3;B=pow2", "A=attention;B=sq1-lattice"]
MODES = ["softmax", "gate"]


def fresh_generator():
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    return g, seed


def inputs(pattern, mode, B=2, T=9, H=2, Dk=3, Dv=2, dtype=torch.float64, g=None):
    L = tokmix.pattern_info(pattern, T)["levels"]
    r = lambda *s: torch.randn(*s, dtype=dtype, generator=g)  # noqa: E731
    q, k, v = r(B, T, H, Dk), r(B, T, H, Dk), r(B, T, H, Dv)
    bias = 0.5 * r(H, L)
    gw = r(H, L, Dk) if mode == "gate" else None
    return q, (None if mode == "gate" else k), v, bias, gw


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gradcheck_every_family_and_mode(pattern, mode):
    g, seed = fresh_generator()
    q, k, v, bias, gw = inputs(pattern, mode, g=g)
    tensors = [t.requires_grad_() for t in (q, k, v, bias, gw) if t is not None]

    def f(*ts):
        it = iter(ts)
        qq = next(it)
        kk = next(it) if k is not None else None
        vv, bb = next(it), next(it)
        gg = next(it) if gw is not None else None
        return tokmix.mix(qq, kk, vv, pattern, mode=mode, bias=bb, gate_weight=gg, gamma=0.9, scale=0.8)

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-6, rtol=1e-4), f"seed {seed}"


@pytest.mark.parametrize("pattern", ["pow2", "attention", "sq1-lattice", "A=local:3;B=pow2"])
def test_gradcheck_packed_sequences(pattern):
    g, seed = fresh_generator()
    q, k, v, bias, _ = inputs(pattern, "softmax", B=1, T=11, g=g)
    cu = torch.tensor([0, 1, 5, 11], dtype=torch.int64)
    ts = [t.requires_grad_() for t in (q, k, v, bias)]
    f = lambda qq, kk, vv, bb: tokmix.mix(qq, kk, vv, pattern, bias=bb, cu_seqlens=cu)  # noqa: E731
    assert torch.autograd.gradcheck(f, ts, eps=1e-6, atol=1e-6, rtol=1e-4), f"seed {seed}"


def test_conformance_vectors():
    """The shared float64 vectors (what tests/ops checks in C++): y and the gradients."""
    with open(os.path.join(TESTDATA, "mix_vectors.json")) as f:
        doc = json.load(f)
    assert len(doc["cases"]) == 11
    for c in doc["cases"]:
        t = lambda key: torch.tensor(c[key], dtype=torch.float64)  # noqa: E731
        q, k, v = t("q").requires_grad_(), t("k").requires_grad_(), t("v").requires_grad_()
        y = tokmix.mix(q, k, v, c["pattern"], scale=c["scale"])
        y.backward(t("dy"))
        for name, got in [("y", y), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)]:
            want = t(name)
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-10), f"{c['pattern']}: {name} max error {(got - want).abs().max()}"


def test_torch_ops_and_wrapper_and_inference_mode_agree():
    """tokmix.mix is torch.ops.tokmix.mix; below autograd (inference mode) the CPU kernel gives the same."""
    g, _ = fresh_generator()
    q, k, v, bias, _ = inputs("pow2", "softmax", T=33, dtype=torch.float32, g=g)
    a = tokmix.mix(q, k, v, "pow2", bias=bias)
    b = torch.ops.tokmix.mix(q, k, v, "pow2", bias=bias)
    with torch.inference_mode():
        c = tokmix.mix(q, k, v, "pow2", bias=bias)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert "tokmix::mix(Tensor q, Tensor? k, Tensor v, str pattern" in str(torch.ops.tokmix.mix.default._schema)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_step_after_prefill_equals_parallel(pattern, mode):
    g, seed = fresh_generator()
    B, T, H, Dk, Dv, P = 2, 13, 2, 3, 4, 5
    q, k, v, bias, gw = inputs(pattern, mode, B=B, T=T, H=H, Dk=Dk, Dv=Dv, g=g)
    # tables sized for the cache's context
    kw = dict(mode=mode, bias=bias, gate_weight=gw, gamma=0.8)
    full = tokmix.mix(q, k, v, pattern, **kw)
    cache = tokmix.MixCache(pattern, B, H, Dk, Dv, T, dtype=torch.float64)
    kp = k[:, :P] if k is not None else None
    head = cache.prefill(q[:, :P], kp, v[:, :P], **kw)
    assert torch.allclose(head, full[:, :P], atol=1e-12), f"seed {seed}"
    for t in range(P, T):
        y = cache.step(q[:, t], k[:, t] if k is not None else None, v[:, t], **kw)
        assert torch.allclose(y, full[:, t], atol=1e-10), f"{pattern} {mode} position {t}, seed {seed}"
    assert cache.positions == [T, T]


def test_packed_prefill_of_different_lengths_then_steps():
    g, seed = fresh_generator()
    H, Dk, Dv, T = 2, 4, 3, 12
    lens = [3, 7]
    q, k, v, _, _ = inputs("pow2-lattice", "softmax", B=1, T=sum(lens), H=H, Dk=Dk, Dv=Dv, g=g)
    bias = torch.randn(H, tokmix.pattern_info("pow2-lattice", T)["levels"], dtype=torch.float64, generator=g)
    cu = torch.tensor([0, 3, 10])
    cache = tokmix.MixCache("pow2-lattice", 2, H, Dk, Dv, T, dtype=torch.float64)
    cache.prefill(q, k, v, bias=bias, cu_seqlens=cu)
    assert cache.positions == lens
    qs = torch.randn(2, H, Dk, dtype=torch.float64, generator=g)
    ks = torch.randn(2, H, Dk, dtype=torch.float64, generator=g)
    vs = torch.randn(2, H, Dv, dtype=torch.float64, generator=g)
    y = cache.step(qs, ks, vs, bias=bias)
    for b, (t0, t1) in enumerate([(0, 3), (3, 10)]):
        qq = torch.cat([q[:, t0:t1], qs[b].view(1, 1, H, Dk)], 1)
        kk = torch.cat([k[:, t0:t1], ks[b].view(1, 1, H, Dk)], 1)
        vv = torch.cat([v[:, t0:t1], vs[b].view(1, 1, H, Dv)], 1)
        want = tokmix.mix(qq, kk, vv, "pow2-lattice", bias=bias)[0, -1]
        assert torch.allclose(y[b], want, atol=1e-10), f"sequence {b}, seed {seed}"


def test_analyze_returns_the_cli_figures():
    a = tokmix.analyze("pow2", 256)
    assert a["pattern"] == "pow2" and a["n"] == 256
    # pow2: every distance below 256 is a sum of at most 8 distinct powers of two, 255 needs 8
    assert a["shortest_path"]["max"] == 8
    assert a["shortest_path"]["exact"] is True
    cli = os.environ.get("TOKMIX_CLI")
    if cli and os.path.exists(cli):
        out = json.loads(subprocess.run([cli, "analyze", "pow2", "sq1-lattice", "--n", "256", "--json"], check=True,
                                        capture_output=True, text=True).stdout)
        for rec in out["records"]:
            mine = tokmix.analyze(rec["pattern"], 256)
            for key in ("cost", "cache_entries", "shortest_path", "congestion"):
                assert mine[key] == rec[key], f"{rec['pattern']}: {key}"


def test_pattern_info():
    info = tokmix.pattern_info("pow2-lattice", 65536)
    assert info["B_kind"] == "lattice"
    assert info["cache_A"] + info["cache_B"] <= 17  # what the C++ decode test asserts


def err(fn):
    with pytest.raises((RuntimeError, ValueError)) as e:
        fn()
    return str(e.value)


def test_bad_arguments_carry_the_cpp_messages():
    q = torch.randn(1, 4, 1, 2)
    assert "tokmix::mix: q has shape [2, 3]; expected [B, T, H, Dk]" in err(lambda: tokmix.mix(torch.randn(2, 3), q, q, "pow2"))
    assert "mode 'soft' is not known; expected 'softmax' or 'gate'" in err(lambda: tokmix.mix(q, q, q, "pow2", mode="soft"))
    assert "gamma = 1.500000; expected 0 < gamma <= 1" in err(lambda: tokmix.mix(q, q, q, "pow2", gamma=1.5))
    assert "k must be a defined tensor in softmax mode" in err(lambda: tokmix.mix(q, None, q, "pow2"))
    assert "gate mode needs gate_weight [H, L, Dk]" in err(lambda: tokmix.mix(q, None, q, "pow2", mode="gate"))
    assert "cu_seqlens ends at 3; expected T = 4" in err(lambda: tokmix.mix(q, q, q, "pow2", cu_seqlens=torch.tensor([0, 3])))
    bad = q.clone()
    bad[0, 1, 0, 0] = float("nan")
    assert "q contains NaN or Inf; expected finite values" in err(lambda: tokmix.mix(bad, q, q, "pow2"))
    assert "tokmix::mix:" in err(lambda: tokmix.mix(q, q, q, "nonsense"))
    assert "bias has shape [2, 1]; expected [H = 1, L]" in err(lambda: tokmix.mix(q, q, q, "pow2", bias=torch.zeros(2, 1)))
    cache = tokmix.MixCache("pow2", 1, 1, 2, 2, 3)
    cache.prefill(q[:, :3], q[:, :3], q[:, :3])
    assert "tokmix::MixCache::step: sequence 0 is at position 3; the cache was made for max_context = 3" in err(
        lambda: cache.step(q[:, 0], q[:, 0], q[:, 0]))
    assert "no decoding cache with handle -5" in err(lambda: torch.ops.tokmix.mix_step(-5, q[:, 0], q[:, 0], q[:, 0]))
    assert "analyze: n = 1; expected n >= 2" in err(lambda: tokmix.analyze("pow2", 1))
    with pytest.raises(TypeError):
        tokmix.mix(q, q, q, 5)


def test_finite_check_modes():
    """Deferred reports are a CUDA mode: CPU calls still raise at the call, nothing is left
    pending, and a bad mode name is refused with the accepted ones."""
    assert tokmix.finite_check() == "at_call"
    q = torch.randn(1, 9, 2, 4, dtype=torch.float64)
    q[0, 3, 1, 2] = float("nan")
    tokmix.set_finite_check("deferred")
    try:
        assert tokmix.finite_check() == "deferred"
        with pytest.raises((RuntimeError, ValueError), match="q contains NaN or Inf"):
            tokmix.mix(q, q.clone(), q.clone(), "pow2")
        tokmix.check_finite_pending()
    finally:
        tokmix.set_finite_check("at_call")
    with pytest.raises((RuntimeError, ValueError), match="expected .at_call. or .deferred."):
        tokmix.set_finite_check("later")


cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and tokmix.has_cuda_backend()),
                               reason="needs a CUDA device and a library built with TOKMIX_CUDA")


@cuda_only
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cuda_matches_cpu_float64(pattern, mode):
    """The CUDA kernels through the CUDA dispatch key, float32, against the CPU in float64."""
    g, seed = fresh_generator()
    q, k, v, bias, gw = inputs(pattern, mode, B=2, T=37, H=2, Dk=8, Dv=6, g=g)
    dy = torch.randn(2, 37, 2, 6, dtype=torch.float64, generator=g)

    def run(device, dtype):
        ts = [None if t is None else t.to(device, dtype).requires_grad_() for t in (q, k, v, bias, gw)]
        y = tokmix.mix(ts[0], ts[1], ts[2], pattern, mode=mode, bias=ts[3], gate_weight=ts[4], gamma=0.9)
        y.backward(dy.to(device, dtype))
        return [y] + [t.grad for t in ts if t is not None]

    for got, want in zip(run("cuda", torch.float32), run("cpu", torch.float64)):
        assert torch.allclose(got.double().cpu(), want, atol=2e-4, rtol=2e-3), f"{pattern} {mode}, seed {seed}"


@cuda_only
def test_cuda_deferred_finite_reports():
    """A NaN in v with deferred reports: the call returns, check_finite_pending() raises with
    the input's name, and a clean call afterwards reports nothing."""
    q, k, v = (torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    v[0, 17, 1, 5] = float("nan")
    tokmix.set_finite_check("deferred")
    try:
        tokmix.mix(q, k, v, "pow2")
        with pytest.raises((RuntimeError, ValueError), match="v contains NaN or Inf"):
            tokmix.check_finite_pending()
        tokmix.mix(q, k, k.clone(), "pow2")
        tokmix.check_finite_pending()
    finally:
        tokmix.set_finite_check("at_call")


@cuda_only
@pytest.mark.parametrize("pattern", ["pow2", "sq1-lattice", "attention", "A=local:3;B=pow2"])
def test_cuda_step_after_prefill_equals_parallel(pattern):
    g, seed = fresh_generator()
    B, T, H, Dk, Dv, P = 2, 21, 2, 8, 4, 9
    q, k, v, bias, _ = inputs(pattern, "softmax", B=B, T=T, H=H, Dk=Dk, Dv=Dv, dtype=torch.float32, g=g)
    q, k, v, bias = (t.cuda() for t in (q, k, v, bias))
    full = tokmix.mix(q, k, v, pattern, bias=bias)
    cache = tokmix.MixCache(pattern, B, H, Dk, Dv, T, dtype=torch.float32, device="cuda")
    cache.prefill(q[:, :P], k[:, :P], v[:, :P], bias=bias)
    for t in range(P, T):
        y = cache.step(q[:, t], k[:, t], v[:, t], bias=bias)
        assert torch.allclose(y, full[:, t], atol=1e-4), f"position {t}, seed {seed}"
