"""PyTorch modules of tokmix's layers: the same parameters, names and computations as the C++
layers (src/nn/layers.cpp, src/nn/model.cpp), so weights exported by the C++ side
(safetensors) load here and give the same outputs, and the other way round.

Configs are resolved and validated by the C++ config code (tokmix::nn::ModelConfig): the
defaults, the pattern of each mixer type and the error messages are the C++ ones.
Every pattern mixes through torch.ops.tokmix.mix (the C++ "fused" attention path, LibTorch's
attention, is a speed alternative of the same function and is not used here).
"""
import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import MixCache, mix, ops, pattern_info
from . import safetensors as _st

__all__ = ["RMSNorm", "SwiGLU", "TokenMixer", "MixerState", "Block", "LanguageModel", "DecodeState", "resolve_config",
           "positions_from_cu_seqlens"]


def resolve_config(config):
    """A model config (dict or JSON text, as configs/models/*.json) in its canonical, fully
    resolved form, validated by the C++ code (its errors are raised as they are), and the
    pattern spec of each layer: returns (config, specs)."""
    text = config if isinstance(config, str) else json.dumps(config)
    r = json.loads(ops.model_config(text))
    return r["config"], r["specs"]


def positions_from_cu_seqlens(cu_seqlens, total):
    """Position of each packed token inside its own sequence: [total] int64."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    return torch.arange(total, device=cu.device) - cu[seq]


def apply_rotary(x, pos, theta):
    """Rotary positions on x [..., H, D] with pos of shape x.shape[:-2] (D even; halves rotated)."""
    d = x.shape[-1]
    half = d // 2
    inv_freq = torch.pow(torch.tensor(theta, dtype=torch.float64, device=x.device),
                         -torch.arange(half, dtype=torch.float64, device=x.device) * (2.0 / d))
    ang = pos.to(torch.float64).unsqueeze(-1) * inv_freq
    c = torch.cos(ang).to(x.dtype).unsqueeze(-2)
    s = torch.sin(ang).to(x.dtype).unsqueeze(-2)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """w_down(silu(w_gate x) * w_up x)"""

    def __init__(self, d_model, hidden):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MixerState:
    """Decode state of one TokenMixer for `batch` sequences: the pattern's cache (MixCache), the
    short convolution's last inputs, and the tokens each sequence has seen."""

    def __init__(self, cache, conv, batch):
        self.cache = cache
        self.conv = conv  # [batch, conv - 1, channels] or None
        self.positions = torch.zeros(batch, dtype=torch.int64)

    @property
    def bytes(self):
        return self.cache.bytes


class TokenMixer(nn.Module):
    """The token mixer of a tokmix model: input projection, short causal convolution, q/k
    normalisation and rotary positions (optional), mixing over the pattern, output gate and
    projection. Options and defaults are those of a "mixer" entry of a C++ model config:

        TokenMixer(d_model, "pow2", heads=4, conv=4, output_gate=True, max_context=2048)
        TokenMixer(d_model, "local", window=64)          TokenMixer(d_model, "recurrence", order=3)
        TokenMixer(d_model, "f", f="1,3,9,27")           TokenMixer(d_model, "hybrid", a="local:8", b="pow2")

    Keys: mode ("softmax" | "gate"), heads, d_key, d_value, conv, output_gate, level_bias, qk_norm,
    gamma, rotary, plus the type's own (window, order, f, lattice, a, b, spec).
    Model-level settings: max_context (longest sequence; sizes the per-level tables), positions
    ("rotary" | "learned" | "none"; whether rotary may be used), rope_theta, init_std, n_layers.

    forward(x [B, T, d_model], cu_seqlens=None) -> [B, T, d_model]; packed sequences: B == 1 and
    cu_seqlens [N + 1]. Decoding: ``s = m.new_state(batch)``, ``m.prefill(x, s)``, ``m.step(x_t, s)``.
    """

    def __init__(self, d_model, type="pow2", *, max_context=2048, positions="rotary", rope_theta=10000.0, init_std=0.02,
                 n_layers=1, config=None, spec=None, **options):
        super().__init__()
        if config is None:
            if spec is not None:  # type "pattern": any spec
                options["spec"] = spec
            model = {"vocab_size": 2, "d_model": d_model, "n_layers": 1, "max_context": max_context, "positions": positions,
                     "rope_theta": rope_theta, "mlp": False, "init_std": init_std, "mixer": dict(type=type, **options)}
            resolved, specs = resolve_config(model)
            config, spec = resolved["layers"][0], specs[0]
        if spec is None:
            raise ValueError("TokenMixer: a resolved config needs its pattern spec (resolve_config gives both)")
        self.config = dict(config)
        c = self.config
        self.d_model, self.max_context, self.rope_theta = d_model, max_context, rope_theta
        self.pattern = spec
        self.mode = c["mode"]
        self.heads, self.d_key, self.d_value = c["heads"], c["d_key"], c["d_value"]
        self.gamma = float(c["gamma"])
        info = pattern_info(spec, max_context)
        self.levels = info["levels"]
        gate = self.mode == "gate"
        H, Dk, Dv = self.heads, self.d_key, self.d_value
        self.channels = H * Dk * (1 if gate else 2) + H * Dv
        self.in_proj = nn.Linear(d_model, self.channels, bias=False)
        self.out_proj = nn.Linear(H * Dv, d_model, bias=False)
        self.gate_proj = nn.Linear(d_model, H * Dv, bias=False) if c["output_gate"] else None
        with torch.no_grad():
            self.in_proj.weight.normal_(0.0, init_std)
            self.out_proj.weight.normal_(0.0, init_std / math.sqrt(2.0 * n_layers))
            if self.gate_proj is not None:
                self.gate_proj.weight.normal_(0.0, init_std)
        self.conv = c["conv"]
        if self.conv > 0:
            # near the identity: the current token passes through, earlier taps start small
            b = 1.0 / math.sqrt(self.conv)
            w = torch.empty(self.channels, self.conv).uniform_(-b, b)
            w[:, self.conv - 1] += 1.0
            self.conv_weight = nn.Parameter(w)
        else:
            self.conv_weight = None
        self.bias = nn.Parameter(torch.zeros(H, self.levels)) if c["level_bias"] else None
        self.gate_weight = nn.Parameter(torch.randn(H, self.levels, Dk) / math.sqrt(Dk)) if gate else None
        if c["qk_norm"]:
            self.q_norm = RMSNorm(Dk, 1e-6)
            self.k_norm = None if gate else RMSNorm(Dk, 1e-6)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = bool(c["rotary"])

    def extra_repr(self):
        return f"pattern={self.pattern!r}, mode={self.mode}, heads={self.heads}, d_key={self.d_key}, d_value={self.d_value}, conv={self.conv}"

    # --- pieces shared by the parallel and the decoding forms (same order of operations as C++)
    def _conv_parallel(self, u, pos):
        w, T = self.conv, u.shape[1]
        out = u * self.conv_weight[:, w - 1]
        for j in range(1, min(w, T)):
            shifted = F.pad(u[:, :T - j], (0, 0, j, 0))
            keep = pos.ge(j).unsqueeze(-1).to(u.dtype)
            out = out + shifted * keep * self.conv_weight[:, w - 1 - j]
        return out

    def _qkv(self, u, pos):
        H, Dk, Dv = self.heads, self.d_key, self.d_value
        heads = lambda t, d: t.reshape(*t.shape[:-1], H, d)  # noqa: E731
        off = 0
        q = heads(u[..., off:off + H * Dk], Dk)
        off += H * Dk
        k = None
        if self.mode != "gate":
            k = heads(u[..., off:off + H * Dk], Dk)
            off += H * Dk
        v = heads(u[..., off:off + H * Dv], Dv)
        if self.q_norm is not None:
            q = self.q_norm(q)
            if k is not None:
                k = self.k_norm(k)
        if self.rotary:
            q = apply_rotary(q, pos, self.rope_theta)
            k = apply_rotary(k, pos, self.rope_theta)
        return q, k, v

    def _finish(self, y, x):
        o = y.flatten(-2)
        if self.gate_proj is not None:
            o = o * F.silu(self.gate_proj(x))
        return self.out_proj(o)

    def _mix_kwargs(self):
        return dict(mode=self.mode, bias=self.bias, gate_weight=self.gate_weight, gamma=self.gamma)

    @staticmethod
    def _positions(x, cu_seqlens):
        B, T = x.shape[0], x.shape[1]
        if cu_seqlens is None:
            return torch.arange(T, device=x.device).unsqueeze(0).expand(B, T)
        if B != 1:
            raise ValueError(f"TokenMixer: with cu_seqlens the batch must be 1 (packed sequences); got B = {B}")
        return positions_from_cu_seqlens(cu_seqlens.to(x.device), T).unsqueeze(0)

    def forward(self, x, cu_seqlens=None):
        """x [B, T, d_model] -> [B, T, d_model] (parallel form; packed sequences with cu_seqlens)."""
        pos = self._positions(x, cu_seqlens)
        u = self.in_proj(x)
        if self.conv > 0:
            u = self._conv_parallel(u, pos)
        q, k, v = self._qkv(u, pos)
        y = mix(q, k, v, self.pattern, cu_seqlens=cu_seqlens, **self._mix_kwargs())
        return self._finish(y, x)

    # --- decoding
    def new_state(self, batch, max_context=None, *, dtype=None, device=None):
        """A fresh decode state for `batch` sequences of up to max_context tokens (default: the layer's)."""
        w = self.in_proj.weight
        dtype = dtype or w.dtype
        device = device or w.device
        max_context = max_context or self.max_context
        cache = MixCache(self.pattern, batch, self.heads, self.d_key, self.d_value, max_context, dtype=dtype, device=device)
        conv = torch.zeros(batch, self.conv - 1, self.channels, dtype=dtype, device=device) if self.conv > 0 else None
        return MixerState(cache, conv, batch)

    def prefill(self, x, state, cu_seqlens=None):
        """Parallel form over the prompts, filling `state` (fresh or reset): x [batch, T, d_model]
        (prompts of one length) or packed [1, total, d_model] with cu_seqlens of batch + 1 entries."""
        pos = self._positions(x, cu_seqlens)
        u = self.in_proj(x)
        if cu_seqlens is None:
            lengths = [x.shape[1]] * x.shape[0]
            rows = [u[b] for b in range(x.shape[0])]
        else:
            cu = cu_seqlens.to("cpu", torch.int64).tolist()
            lengths = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
            rows = [u[0, cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]
        if self.conv > 0:
            keep = self.conv - 1
            if keep > 0:
                # the last conv-1 inputs of each prompt (zeros before a short prompt's start)
                tails = [F.pad(r[r.shape[0] - min(keep, r.shape[0]):].detach(), (0, 0, keep - min(keep, r.shape[0]), 0)) for r in rows]
                state.conv = torch.stack(tails, 0)
            u = self._conv_parallel(u, pos)
        q, k, v = self._qkv(u, pos)
        y = state.cache.prefill(q, k, v, cu_seqlens=cu_seqlens, **self._mix_kwargs())
        state.positions = torch.tensor(lengths, dtype=torch.int64)
        return self._finish(y, x)

    def step(self, x, state):
        """One token per sequence: x [batch, d_model] -> [batch, d_model]. Inference only."""
        pos = state.positions.to(x.device)
        u = self.in_proj(x)
        if self.conv > 0:
            w = self.conv
            win = torch.cat([state.conv, u.unsqueeze(1)], 1) if w > 1 else u.unsqueeze(1)  # oldest .. current
            out = win[:, w - 1] * self.conv_weight[:, w - 1]
            for j in range(1, w):
                out = out + win[:, w - 1 - j] * self.conv_weight[:, w - 1 - j]
            if w > 1:
                state.conv = win[:, 1:].detach()
            u = out
        q, k, v = self._qkv(u, pos)
        y = state.cache.step(q, k, v, **self._mix_kwargs())
        state.positions = state.positions + 1
        return self._finish(y, x)


class Block(nn.Module):
    def __init__(self, cfg, layer, spec):
        super().__init__()
        self.norm1 = RMSNorm(cfg["d_model"], cfg["norm_eps"])
        self.mixer = TokenMixer(cfg["d_model"], max_context=cfg["max_context"], rope_theta=cfg["rope_theta"],
                                init_std=cfg["init_std"], n_layers=cfg["n_layers"], config=cfg["layers"][layer], spec=spec)
        if cfg["mlp"]:
            self.norm2 = RMSNorm(cfg["d_model"], cfg["norm_eps"])
            self.mlp = SwiGLU(cfg["d_model"], cfg["mlp_hidden"])
            with torch.no_grad():
                self.mlp.w_gate.weight.normal_(0.0, cfg["init_std"])
                self.mlp.w_up.weight.normal_(0.0, cfg["init_std"])
                self.mlp.w_down.weight.normal_(0.0, cfg["init_std"] / math.sqrt(2.0 * cfg["n_layers"]))
        else:
            self.norm2 = self.mlp = None

    def _mlp(self, x):
        return x + self.mlp(self.norm2(x)) if self.mlp is not None else x

    def forward(self, h, cu_seqlens=None):
        return self._mlp(h + self.mixer(self.norm1(h), cu_seqlens))

    def prefill(self, h, state, cu_seqlens=None):
        return self._mlp(h + self.mixer.prefill(self.norm1(h), state, cu_seqlens))

    def step(self, h, state):
        return self._mlp(h + self.mixer.step(self.norm1(h), state))


class DecodeState:
    def __init__(self, layers, batch, max_context):
        self.layers = layers
        self.batch = batch
        self.max_context = max_context
        self.positions = torch.zeros(batch, dtype=torch.int64)


class LanguageModel(nn.Module):
    """The tokmix backbone (C++ tokmix::nn::LanguageModel): token embedding (+ learned positions),
    pre-norm blocks (RMSNorm, TokenMixer, optional SwiGLU), final norm, head tied to the embedding.
    Parameter names are the C++ ones: a C++ export loads with ``LanguageModel.from_safetensors``."""

    def __init__(self, config):
        super().__init__()
        cfg, specs = resolve_config(config)
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["d_model"])
        self.pos_emb = nn.Embedding(cfg["max_context"], cfg["d_model"]) if cfg["positions"] == "learned" else None
        self.blocks = nn.ModuleList([Block(cfg, i, specs[i]) for i in range(cfg["n_layers"])])
        self.final_norm = RMSNorm(cfg["d_model"], cfg["norm_eps"])
        with torch.no_grad():
            self.tok_emb.weight.normal_(0.0, cfg["init_std"])
            if self.pos_emb is not None:
                self.pos_emb.weight.normal_(0.0, cfg["init_std"])

    @classmethod
    def from_safetensors(cls, path):
        """A model from a C++ export (tokmix::nn::export_safetensors: weights + tokmix_config)."""
        tensors, meta = _st.load_file(path)
        if "tokmix_config" not in meta:
            raise ValueError(f"{path}: no tokmix_config in the safetensors metadata; expected a file from export_safetensors")
        m = cls(json.loads(meta["tokmix_config"]))
        m.load_state_dict(tensors, strict=True)
        return m

    def save_safetensors(self, path):
        """Writes the weights and config as tokmix::nn::export_safetensors does (readable by C++)."""
        _st.save_file(dict(self.named_parameters()), path, {"format": "pt", "tokmix_config": json.dumps(self.config)})

    def _embed(self, tokens, pos):
        h = self.tok_emb(tokens)
        return h + self.pos_emb(pos) if self.pos_emb is not None else h

    def _head(self, h):
        return torch.matmul(self.final_norm(h), self.tok_emb.weight.t())

    def forward(self, tokens, cu_seqlens=None):
        """tokens [B, T] int64 -> logits [B, T, vocab]; packed sequences: B == 1 with cu_seqlens."""
        pos = TokenMixer._positions(tokens, cu_seqlens)
        h = self._embed(tokens, pos)
        for b in self.blocks:
            h = b(h, cu_seqlens)
        return self._head(h)

    def new_decode_state(self, batch, max_context=None):
        max_context = max_context or self.config["max_context"]
        return DecodeState([b.mixer.new_state(batch, max_context) for b in self.blocks], batch, max_context)

    def prefill(self, state, prompts):
        """Runs the prompts and fills `state` (fresh): prompts [batch, P] int64, or a list of batch
        1-D token sequences of any lengths (packed into one pass, as the C++ model does).
        Returns the logits of each prompt's last token [batch, vocab]."""
        if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
            h = self._embed(prompts, TokenMixer._positions(prompts, None))
            for b, s in zip(self.blocks, state.layers):
                h = b.prefill(h, s)
            state.positions = torch.full((prompts.shape[0],), prompts.shape[1], dtype=torch.int64)
            return self._head(h[:, -1])
        seqs = [torch.as_tensor(p, dtype=torch.int64, device=self.tok_emb.weight.device).view(-1) for p in prompts]
        if any(p.numel() == 0 for p in seqs):
            raise ValueError("LanguageModel.prefill: every prompt needs at least one token")
        lengths = torch.tensor([p.numel() for p in seqs], dtype=torch.int64)
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        tokens = torch.cat(seqs).unsqueeze(0)
        h = self._embed(tokens, TokenMixer._positions(tokens, cu))
        for b, s in zip(self.blocks, state.layers):
            h = b.prefill(h, s, cu)
        state.positions = lengths
        return self._head(h[0, cu[1:] - 1])

    def step(self, state, tokens):
        """tokens [batch] int64 -> logits [batch, vocab]."""
        h = self._embed(tokens, state.positions.to(tokens.device))
        for b, s in zip(self.blocks, state.layers):
            h = b.step(h, s)
        state.positions = state.positions + 1
        return self._head(h)
