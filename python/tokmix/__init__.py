"""tokmix for PyTorch: generalized linear token mixing  Y = (I - B)^{-1} A X.

The ops are the C++ library's own (registered with the PyTorch dispatcher by libtokmix_torch.so
and reachable as torch.ops.tokmix.*): the same kernels, autograd and error messages as the
C++ API. Tensors follow flash-linear-attention's conventions: [B, T, H, D] ("batch, time,
heads, head width"), and packed variable-length sequences as B == 1 with ``cu_seqlens``.

    import torch, tokmix
    q = torch.randn(2, 64, 4, 16, requires_grad=True)
    y = tokmix.mix(q, q, q, "pow2")            # [2, 64, 4, 16]
    tokmix.analyze("pow2-lattice", 4096)["shortest_path"]["max"]
"""
import json

import torch

from . import _library

library_path = _library.load()
ops = torch.ops.tokmix

__all__ = ["mix", "MixCache", "analyze", "pattern_info", "ops", "library_path", "has_cuda_backend"]


def mix(q, k, v, pattern, *, mode="softmax", bias=None, gate_weight=None, cu_seqlens=None, scale=None, gamma=1.0):
    r"""Generalized linear token mixing  ``y = (I - B)^{-1} A v``  over the pattern's supports.

    Row i of the output is ``y_i = sum_{j in SA(i)} p_ij v_j + gamma * sum_{j in SB(i)} p_ij y_j``
    where p_i is a softmax over SA(i) and SB(i) together of the scores
    ``s_ij = scale * q_i . k_j + bias[h, level(i, j)]`` (mode "softmax") or
    ``s_ij = q_i . gate_weight[h, level(i, j)] + bias[h, level(i, j)]`` (mode "gate").

    Args:
        q (torch.Tensor): queries of shape ``[B, T, H, K]``.
        k (torch.Tensor or None): keys of shape ``[B, T, H, K]``; not read in gate mode (None).
        v (torch.Tensor): values of shape ``[B, T, H, V]``.
        pattern (str): the supports, e.g. ``"attention"``, ``"local:64"``, ``"first-order"``,
            ``"recurrence:4"``, ``"dense"``, ``"pow2"``, ``"sq1"``, ``"pow2-lattice"``,
            ``"f:1,3,9,27"``, ``"A=local:64;B=pow2"``.
        mode (str): ``"softmax"`` (scores from q.k) or ``"gate"`` (scores from q and a learned
            vector per level).
        bias (torch.Tensor, optional): ``[H, L]`` score bias per head and distance level,
            ``L >= pattern_info(pattern, T)["levels"]``.
        gate_weight (torch.Tensor, optional): ``[H, L, K]``, gate mode only.
        cu_seqlens (torch.LongTensor, optional): cumulative sequence lengths ``[N + 1]`` of
            ``N`` sequences packed along T, as in FlashAttention / FLA varlen APIs; requires B == 1.
        scale (float, optional): score scale; ``1 / sqrt(K)`` by default.
        gamma (float): damping of B, in (0, 1].

    Returns:
        torch.Tensor: ``[B, T, H, V]``. Differentiable in q, k, v, bias and gate_weight.

    Raises:
        RuntimeError / ValueError: with the C++ message, naming the bad value and what is expected.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"tokmix.mix: pattern must be a str such as 'pow2', got {type(pattern).__name__}")
    return ops.mix(q, k, v, pattern, mode=mode, bias=bias, gate_weight=gate_weight, cu_seqlens=cu_seqlens,
                   scale=-1.0 if scale is None else float(scale), gamma=float(gamma))


class MixCache:
    """Decoding cache of one mixing layer (C++ tokmix::MixCache): holds, per sequence and head,
    exactly the past keys, inputs and outputs the pattern's future rows read.

    ``prefill`` runs the parallel form over prompts (``[batch, T, H, D]``, or packed
    ``[1, total, H, D]`` with ``cu_seqlens``) and fills the cache; ``step`` then mixes one token
    per sequence: q, k ``[batch, H, K]``, v ``[batch, H, V]`` -> ``[batch, H, V]``.
    """

    def __init__(self, pattern, batch, heads, d_key, d_value, max_context, *, dtype=torch.float32, device="cpu"):
        like = torch.empty(0, dtype=dtype, device=device)
        self._handle = None
        self._handle = int(ops.cache_new(pattern, batch, heads, d_key, d_value, max_context, like))
        self.pattern = pattern
        self.max_context = max_context

    def __del__(self):
        if getattr(self, "_handle", None) is not None:
            try:
                ops.cache_free(self._handle)
            except Exception:  # interpreter shutdown
                pass
            self._handle = None

    def prefill(self, q, k, v, *, mode="softmax", bias=None, gate_weight=None, cu_seqlens=None, scale=None, gamma=1.0):
        return ops.cache_prefill(self._handle, q, k, v, mode=mode, bias=bias, gate_weight=gate_weight, cu_seqlens=cu_seqlens,
                                 scale=-1.0 if scale is None else float(scale), gamma=float(gamma))

    def step(self, q, k, v, *, mode="softmax", bias=None, gate_weight=None, scale=None, gamma=1.0):
        return ops.mix_step(self._handle, q, k, v, mode=mode, bias=bias, gate_weight=gate_weight,
                            scale=-1.0 if scale is None else float(scale), gamma=float(gamma))

    def reset(self):
        ops.cache_reset(self._handle)

    def info(self):
        """{"positions": tokens seen per sequence, "entries": past positions held, "bytes", ...}"""
        return json.loads(ops.cache_info(self._handle))

    @property
    def positions(self):
        return self.info()["positions"]

    @property
    def bytes(self):
        return self.info()["bytes"]


def analyze(pattern, n, *, copy_shift=0, exact_max_n=16384, samples=2048, seed=1):
    """Cost, decode cache, shortest paths and copy-task congestion of a pattern at length n (the
    figures of ``tokmix analyze --json``), as a dict: keys "pattern", "n", "cost" (mean, max,
    total entries per row), "cache_entries", "shortest_path" (max, mean, histogram, ...),
    "congestion" (upper_bound, lower_bound, ...), "seconds"."""
    return json.loads(ops.analyze(pattern, int(n), copy_shift=int(copy_shift), exact_max_n=int(exact_max_n),
                                  samples=int(samples), seed=int(seed)))


def pattern_info(pattern, n):
    """Levels (the width L of bias / gate tables), cache sizes and kinds of a pattern at length n."""
    return json.loads(ops.pattern_info(pattern, int(n)))


def set_finite_check(mode):
    """When CUDA calls report NaN or Inf in q, k, v or the upstream gradient. "at_call" (the
    default): each call waits for its kernels and raises. "deferred": the report is queued behind
    the kernels and the call returns at once (no stream sync); it raises, naming the input, at
    the next mix call whose GPU work has finished or at check_finite_pending(). Call that where
    the step waits anyway (after loss.item(), after clipping the gradients). CPU calls always
    check at the call."""
    ops.set_finite_check(str(mode))


def finite_check():
    """The current mode: "at_call" or "deferred"."""
    return ops.finite_check()


def check_finite_pending():
    """Waits for the GPU work of every deferred report and raises the first bad one."""
    ops.check_finite_pending()


def has_cuda_backend():
    """True when the library was built with the CUDA backend (TOKMIX_CUDA)."""
    return bool(ops.has_cuda_backend())


from . import nn  # noqa: E402  (needs the ops above)
