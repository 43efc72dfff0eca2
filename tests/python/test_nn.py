"""tokmix.nn against the C++ layers: a model built and exported (safetensors) by C++ loads into
the Python modules and gives the same logits, in the parallel form and when decoding; step after
prefill equals the parallel form; packed sequences; configs validated with the C++ messages."""
import os
import random
import re

import pytest
import torch

import tokmix
import tokmix.nn as tnn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# small models covering the mixer types, both modes, the optional pieces and position kinds
CONFIGS = {
    "pow2": {"mixer": {"type": "pow2", "heads": 2, "conv": 4, "output_gate": True}},
    "attention-rotary": {"positions": "rotary", "mixer": {"type": "attention", "heads": 2, "conv": 0}},
    "local-qknorm": {"mixer": {"type": "local", "window": 5, "heads": 2, "qk_norm": True}},
    "gate-lattice": {"positions": "none", "mlp": False,
                     "mixer": {"type": "pow2-lattice", "mode": "gate", "heads": 2, "conv": 3, "gamma": 0.9}},
    "mixed-learned": {"positions": "learned", "n_layers": 4,
                      "layers": [{"type": "sq1"}, {"type": "recurrence", "order": 2},
                                 {"type": "hybrid", "a": "local:4", "b": "pow2"}, {"type": "f", "f": "1,3,9", "lattice": True}],
                      "mixer": {"heads": 2, "d_key": 6, "d_value": 4}},
    "first-order-dense": {"n_layers": 2, "layers": [{"type": "first-order"}, {"type": "dense", "level_bias": False}],
                          "mixer": {"heads": 1}},
}


def model_config(name):
    c = {"vocab_size": 37, "d_model": 16, "n_layers": 2, "max_context": 40, "positions": "none"}
    c.update(CONFIGS[name])
    return c


def fresh_seed():
    return random.SystemRandom().randrange(2**31)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> path of a safetensors file written by the C++ side (fresh seed per run)."""
    d = tmp_path_factory.mktemp("exports")
    out = {}
    for name in CONFIGS:
        path = str(d / f"{name}.safetensors")
        tokmix.ops.model_export(tnn.json.dumps(model_config(name)), fresh_seed(), path)
        out[name] = path
    return out


def loaded(exported, name):
    """(path, the Python model of the C++ export, a freshly seeded generator)"""
    path = exported[name]
    return path, tnn.LanguageModel.from_safetensors(path), torch.Generator().manual_seed(fresh_seed())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cpp_export_loads_and_gives_the_same_logits(exported, name):
    path, m, g = loaded(exported, name)
    tokens = torch.randint(0, 37, (2, 23), generator=g)
    want = tokmix.ops.model_forward(path, tokens)
    with torch.no_grad():
        got = m(tokens)
    # identical ops in the same order, except where C++ takes its fused attention path
    # (LibTorch's attention: same function, other rounding)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), f"max error {(got - want).abs().max()}"
    if all(layer["impl"] != "fused" for layer in m.config["layers"]):
        assert torch.equal(got, want), f"max error {(got - want).abs().max()}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoding_matches_cpp_and_the_parallel_form(exported, name):
    path, m, g = loaded(exported, name)
    prompts = torch.randint(0, 37, (3, 6), generator=g)
    cont = torch.randint(0, 37, (3, 5), generator=g)
    want = tokmix.ops.model_decode(path, prompts, cont)  # [3, 6, vocab]
    with torch.no_grad():
        s = m.new_decode_state(3)
        got = [m.prefill(s, prompts)]
        for t in range(cont.shape[1]):
            got.append(m.step(s, cont[:, t]))
        got = torch.stack(got, 1)
        parallel = m(torch.cat([prompts, cont], 1))[:, prompts.shape[1] - 1:]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), f"vs C++: max error {(got - want).abs().max()}"
    assert torch.allclose(got, parallel, rtol=1e-4, atol=1e-5), f"vs parallel: max error {(got - parallel).abs().max()}"


def test_prompts_of_different_lengths_then_steps_together(exported):
    m = tnn.LanguageModel.from_safetensors(exported["mixed-learned"])
    g = torch.Generator().manual_seed(fresh_seed())
    prompts = [torch.randint(0, 37, (n,), generator=g) for n in (1, 9, 4)]
    nxt = torch.randint(0, 37, (3,), generator=g)
    with torch.no_grad():
        s = m.new_decode_state(3)
        last = m.prefill(s, prompts)
        step = m.step(s, nxt)
        for b, p in enumerate(prompts):
            full = m(torch.cat([p, nxt[b:b + 1]]).unsqueeze(0))[0]
            assert torch.allclose(last[b], full[-2], atol=1e-5), f"prompt {b}"
            assert torch.allclose(step[b], full[-1], atol=1e-5), f"step {b}"


def test_python_weights_load_in_cpp(tmp_path):
    m = tnn.LanguageModel(model_config("mixed-learned"))
    path = str(tmp_path / "py.safetensors")
    m.save_safetensors(path)
    tokens = torch.randint(0, 37, (1, 17))
    with torch.no_grad():
        assert torch.equal(m(tokens), tokmix.ops.model_forward(path, tokens))


MIXERS = [dict(type="pow2", conv=4, output_gate=True), dict(type="attention", conv=0), dict(type="local", window=3, qk_norm=True),
          dict(type="first-order"), dict(type="recurrence", order=3), dict(type="dense"), dict(type="sq1-lattice", conv=2),
          dict(type="f", f="1,2,5"), dict(type="hybrid", a="local:4", b="pow2-lattice"), dict(type="pow2", mode="gate"),
          dict(type="pattern", spec="A=attention;B=sq1")]


@pytest.mark.parametrize("opts", MIXERS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_token_mixer_step_after_prefill_equals_parallel(opts):
    torch.manual_seed(fresh_seed())
    m = tnn.TokenMixer(12, heads=2, max_context=24, positions="rotary", **opts).double()
    with torch.no_grad():
        if m.bias is not None:
            m.bias.normal_()  # nonzero level biases
        x = torch.randn(3, 19, 12, dtype=torch.float64)
        full = m(x)
        s = m.new_state(3)
        head = m.prefill(x[:, :7], s)
        assert torch.allclose(head, full[:, :7], atol=1e-12)
        for t in range(7, 19):
            y = m.step(x[:, t], s)
            assert torch.allclose(y, full[:, t], atol=1e-10), f"position {t}"
        assert s.cache.positions == [19, 19, 19]


def test_token_mixer_packed_equals_one_by_one_and_packed_prefill():
    torch.manual_seed(fresh_seed())
    m = tnn.TokenMixer(8, "pow2", heads=2, conv=3, max_context=16).double()
    lens = [2, 9, 5]
    xs = [torch.randn(1, n, 8, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, 2, 11, 16])
    with torch.no_grad():
        packed = m(torch.cat(xs, 1), cu_seqlens=cu)
        alone = torch.cat([m(x) for x in xs], 1)
        assert torch.allclose(packed, alone, atol=1e-12)
        s = m.new_state(3)
        pre = m.prefill(torch.cat(xs, 1), s, cu_seqlens=cu)
        assert torch.allclose(pre, packed, atol=1e-12)
        nxt = torch.randn(3, 8, dtype=torch.float64)
        y = m.step(nxt, s)
        for b, x in enumerate(xs):
            want = m(torch.cat([x, nxt[b].view(1, 1, 8)], 1))[0, -1]
            assert torch.allclose(y[b], want, atol=1e-10), f"sequence {b}"


def test_token_mixer_trains_with_gradients_everywhere():
    torch.manual_seed(fresh_seed())
    m = tnn.TokenMixer(8, "sq1", heads=2, output_gate=True, qk_norm=True, max_context=16)
    m(torch.randn(2, 16, 8)).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def err(fn):
    with pytest.raises((RuntimeError, ValueError)) as e:
        fn()
    return str(e.value)


def test_configs_are_checked_by_the_cpp_code():
    assert "mixer.type: mixer type 'pow3' is not known; expected one of: attention | local" in err(lambda: tnn.TokenMixer(8, "pow3"))
    assert "mixer.window: missing; mixer type 'local' needs: window" in err(lambda: tnn.TokenMixer(8, "local"))
    assert "heads = 3 does not divide d_model = 8" in err(lambda: tnn.TokenMixer(8, heads=3))
    assert "mixer.order: does not apply to mixer type 'pow2'" in err(lambda: tnn.TokenMixer(8, "pow2", order=2))
    assert "mixer.gamma: value 2" in err(lambda: tnn.TokenMixer(8, gamma=2))


def test_readme_python_example_runs():
    """The README's Python section trains a TokenMixer inside a PyTorch model: run it as written."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    env = {}
    exec(compile(blocks[0], "README.md", "exec"), env)
    assert env["losses"][-1] < env["losses"][0] - 0.1, env["losses"]
