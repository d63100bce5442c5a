"""The video DiT (vdit_kernels.model): packing, backend parity, torch.compile.

Tiny config, float32 unless said otherwise; on CPU the Triton backend runs under the
interpreter (conftest) where the model's ops have Triton kernels, else the test skips
with the backend's own reason.
"""
import pytest
import torch

import vdit_kernels as vk
from vdit_kernels.model import DiTConfig, VideoDiT, why_not

from conftest import DEVICE, assert_verbose_close

SHAPES = [(2, 4, 6), (1, 4, 4), (3, 2, 2)]  # latent (T, H, W); patch (1, 2, 2) -> 12, 4, 3 tokens
TEXT = [3, 5, 0]                             # per-video text tokens (the last video has none)


def _model(dtype=torch.float32, **overrides):
    cfg = DiTConfig.from_name("tiny", **overrides)
    g = torch.Generator().manual_seed(0)
    return VideoDiT(cfg).init_weights(zero_init=False, generator=g).to(DEVICE, dtype), cfg


def _inputs(cfg, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    pack = vk.VideoPack.from_shapes(SHAPES, cfg.patch_size, device=DEVICE, text_lengths=TEXT)
    latents = [torch.randn(cfg.in_channels, *s, generator=g) for s in SHAPES]
    text = torch.randn(pack.num_text_tokens, cfg.text_dim, generator=g)
    t = torch.tensor([10.0, 500.0, 999.0])
    cot = [torch.randn(cfg.in_channels, *s, generator=g) for s in SHAPES]  # d loss / d output
    to = lambda x: x.to(DEVICE, dtype)
    return pack, [to(x) for x in latents], to(t), to(text), [to(x) for x in cot]


def _run(model, pack, latents, t, text, cot, backend="reference"):
    """Forward + backward of sum_i <out_i, cot_i>: outputs, latent grads, parameter grads."""
    model.zero_grad(set_to_none=True)
    latents = [x.detach().clone().requires_grad_(True) for x in latents]
    out = model(latents, pack, t, text, backend=backend)
    sum((o * c).sum() for o, c in zip(out, cot)).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return [o.detach() for o in out], [x.grad for x in latents], grads


def test_config_presets():
    for name in ("tiny", "small", "wan-1.3b-like", "hunyuan-like"):
        cfg = DiTConfig.from_name(name)
        assert cfg.hidden == cfg.heads * cfg.head_dim and sum(cfg.rope_dims) == cfg.head_dim
    assert DiTConfig.from_name("wan-1.3b-like").rope_dims == (44, 42, 42)
    assert DiTConfig.from_name("wan-1.3b-like").mlp_hidden == 8960
    assert DiTConfig.from_name("tiny").rope_dims == (8, 8, 8)
    with pytest.raises(ValueError, match="heads"):
        DiTConfig(hidden=100, heads=3, head_dim=32)
    with pytest.raises(ValueError, match="rope_dims"):
        DiTConfig(hidden=96, heads=4, head_dim=24, rope_dims=(7, 9, 8))
    # at construction, not as an IndexError or an empty model later
    for bad, message in (({"depth": 0}, "depth must be a positive int"), ({"depth": -1}, "depth"),
                         ({"patch_size": (0, 2, 2)}, "patch_size must be three positive ints"),
                         ({"patch_size": (1, 2)}, "patch_size"), ({"rope_dims": (12, 12)}, "rope_dims"),
                         ({"rope_dims": (-2, 14, 12)}, "rope_dims"), ({"mlp_ratio": 0}, "mlp_ratio"),
                         ({"mlp_ratio": 0.001}, "no hidden units"), ({"mlp_ratio": "4"}, "mlp_ratio"),
                         ({"rope_theta": "1e4"}, "theta"), ({"rope_theta": float("inf")}, "theta"),
                         ({"eps": float("nan")}, "eps")):
        with pytest.raises(ValueError, match=message):
            DiTConfig.from_name("tiny", **bad)
    for flag in ("qk_norm", "fused_rope", "gradient_checkpointing"):  # "no" would switch it on
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            DiTConfig.from_name("tiny", **{flag: "no"})
    # a one-element tensor theta (a config buffer) is kept as its float
    theta = DiTConfig.from_name("tiny", rope_theta=torch.tensor(500.0)).rope_theta
    assert type(theta) is float and theta == 500.0
    # a model keeps its own copy: switching its flag leaves the preset and other models alone
    from vdit_kernels.model.dit import PRESETS

    first, second = VideoDiT(PRESETS["tiny"]), VideoDiT(PRESETS["tiny"])
    first.config.fused_rope = False
    assert PRESETS["tiny"].fused_rope and second.config.fused_rope and DiTConfig.from_name("tiny").fused_rope
    assert all(block.attn.cfg is first.config for block in first.blocks)
    with pytest.raises(TypeError, match="config must be a DiTConfig"):
        VideoDiT("tiny")
    # the fields read at every forward are only the RoPE ones; eps is fixed with the layers
    # (the output layer once read it live while the blocks' norms kept theirs)
    model, cfg = _model()
    pack, latents, t, text, _ = _inputs(cfg)
    before = model(latents, pack, t, text, backend="reference")
    model.config.eps = 0.5
    after = model(latents, pack, t, text, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_backend_choice_of_the_model():
    from vdit_kernels.model import family_backends

    cfg = DiTConfig.from_name("tiny")
    # a list once read as op families ("unknown op families ['triton']"), an int as a TypeError
    # from set(); now the argument is named
    for bad in (["triton"], ("reference",), 3):
        with pytest.raises(TypeError, match="backend must be None, a backend name or a dict"):
            family_backends(bad)
    # the dtype counts: the Triton and CUDA attention kernels take no float64 (the demo once
    # crashed with --dtype float64 where it should have skipped them)
    assert why_not(cfg, "reference", DEVICE, torch.float64) is None
    for backend in ("triton", "cuda"):
        assert why_not(cfg, backend, DEVICE, torch.float64) is not None


def test_demo_arguments(capsys):
    import contextlib
    import io
    import subprocess
    import sys

    from vdit_kernels.model import demo

    for argv, message in ((["--ulysses-size", "2"], "--ulysses-size is for --sp usp"),
                          (["--sp", "usp", "--ulysses-size", "0"], "must be a positive int")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
            demo.main(argv)
        assert message in err.getvalue()
    # a dtype a backend cannot take skips that backend with its reason (was a traceback)
    assert demo.main(["--config", "tiny", "--depth", "1", "--iters", "1", "--dtype", "float64"]) in (None, 0)
    out = capsys.readouterr().out
    assert "skipped triton: " in out and "float64" in out and "\nreference " in out
    # python -OO strips docstrings; --help read the first line of one
    help_ = subprocess.run([sys.executable, "-OO", "-m", "vdit_kernels.model.demo", "--help"],
                           capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0 and "--dtype" in help_.stdout, help_.stderr[-2000:]


def test_layers_against_their_formulas():
    # the model's tests compare it with itself (packed vs one video, backends, dtypes) and
    # with model/padded.py, which imports these same helpers: each is checked here against
    # its formula written out (DiT's adaLN modulation, the sinusoidal timestep features, RMSNorm)
    from vdit_kernels.model.dit import RMSNorm, modulate, timestep_embedding

    g = torch.Generator().manual_seed(0)
    x, shift, scale = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale) + shift)
    t = torch.tensor([0.0, 3.0, 999.0], dtype=torch.float64)
    emb = timestep_embedding(t, 7)  # odd width: a zero column at the end
    j = torch.arange(3, dtype=torch.float64)
    angle = t[:, None] * 10000.0 ** (-j / 3)
    torch.testing.assert_close(emb, torch.cat([angle.cos(), angle.sin(), torch.zeros(3, 1, dtype=t.dtype)], 1))
    norm = RMSNorm(8, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
    torch.testing.assert_close(norm(x), x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * norm.weight)


def test_fused_and_unfused_rope_agree():
    # RoPE inside varlen_attention or apply_rope_3d before it: the same model, also at a
    # theta that is not the default (an argument one path dropped would go unseen at 10000)
    model, cfg = _model(torch.float64, rope_theta=256.0)
    pack, latents, t, text, _ = _inputs(cfg, torch.float64)
    fused = model(latents, pack, t, text, backend="reference")
    model.config.fused_rope = False
    unfused = model(latents, pack, t, text, backend="reference")
    for a, b in zip(unfused, fused):
        assert_verbose_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradient_checkpointing_recomputes_the_blocks(backend):
    # same outputs and gradients; the graph keeps a block's inputs, not its activations:
    # far fewer tensors saved for the backward (counted by a saved-tensors hook)
    model, cfg = _model()
    if why_not(cfg, backend, DEVICE) is not None:
        pytest.skip(why_not(cfg, backend, DEVICE))
    pack, latents, t, text, cot = _inputs(cfg)

    def run():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            result = _run(model, pack, latents, t, text, cot, backend=backend)
        return result, len(saved)

    (kept, kept_saved) = run()
    model.config.gradient_checkpointing = True
    (recomputed, recomputed_saved) = run()
    for a, b in zip(recomputed[0] + recomputed[1], kept[0] + kept[1]):
        assert_verbose_close(a, b, atol=1e-6, rtol=1e-6)
    for name in kept[2]:
        assert_verbose_close(recomputed[2][name], kept[2][name], atol=1e-6, rtol=1e-6, name=name)
    assert recomputed_saved < kept_saved / 2, (recomputed_saved, kept_saved)
    # without a backward to come (no_grad), nothing is checkpointed
    from vdit_kernels.model import dit
    calls = []
    real = dit.checkpoint
    dit.checkpoint = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
    try:
        with torch.no_grad():
            out = model(latents, pack, t, text, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(out, kept[0])) and not calls
        _run(model, pack, latents, t, text, cot, backend=backend)
        assert len(calls) == cfg.depth  # (the counter counts)
    finally:
        dit.checkpoint = real
    model.config.gradient_checkpointing = "yes"
    with pytest.raises(TypeError, match="gradient_checkpointing"):
        model(latents, pack, t, text)


def test_zero_init_outputs_zero():
    cfg = DiTConfig.from_name("tiny")
    model = VideoDiT(cfg).to(DEVICE)  # adaLN-Zero: the output layer starts at zero
    pack, latents, t, text, _ = _inputs(cfg)
    out = model(latents, pack, t, text, backend="reference")
    assert all(torch.count_nonzero(o) == 0 for o in out)


def test_bad_inputs():
    model, cfg = _model()
    pack, latents, t, text, _ = _inputs(cfg)
    with pytest.raises(ValueError, match="text must be"):
        model(latents, pack, t, text[:-1], backend="reference")
    with pytest.raises(ValueError, match="timesteps"):
        model(latents, pack, t[:2], text, backend="reference")
    with pytest.raises(ValueError, match="latents are torch.float64 but the model's parameters are"):
        model([x.double() for x in latents], pack, t, text, backend="reference")
    with pytest.raises(ValueError, match="timesteps must be a real number tensor"):
        model(latents, pack, t.to(torch.complex64), text, backend="reference")
    with pytest.raises(TypeError, match="sp must be a vk.SequenceParallel"):
        model(latents, pack, t, text, backend="reference", sp="ulysses")
    no_text = vk.VideoPack.from_shapes(SHAPES, cfg.patch_size, device=DEVICE)
    with pytest.raises(ValueError, match="text lengths"):
        model(latents, no_text, t, text, backend="reference")
    # the plain-PyTorch baseline checks the same (it once took latents out of order and cut
    # the outputs to the pack's shapes from the wrong videos)
    from vdit_kernels.model.padded import padded_forward
    pack = vk.VideoPack.from_shapes(SHAPES, cfg.patch_size, device=DEVICE, text_lengths=[3, 5, 1])
    text = torch.randn(pack.num_text_tokens, cfg.text_dim, device=DEVICE)  # (padded: >= 1 token a video)
    for forward in (model, lambda *a: padded_forward(model, *a)):
        with pytest.raises(ValueError, match=r"video 0 has \(T, H, W\)"):
            forward(latents[::-1], pack, t, text)
        with pytest.raises(ValueError, match="channels, the model takes"):
            forward([x[:-1] for x in latents], pack, t, text)
        with pytest.raises(ValueError, match="timesteps"):
            forward(latents, pack, t[:2], text)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("fused_rope", [True, False])
def test_packing_equals_one_video_at_a_time(fused_rope, backend):
    """No leakage through attention, cross-attention, modulation or RoPE: the pack's
    outputs and gradients equal those of each video run alone as a pack of one."""
    model, cfg = _model(fused_rope=fused_rope)
    reason = why_not(cfg, backend, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    pack, latents, t, text, cot = _inputs(cfg)
    out, dlat, grads = _run(model, pack, latents, t, text, cot, backend)

    texts = text.split(list(TEXT))
    summed = {n: torch.zeros_like(g) for n, g in grads.items()}
    for i, shape in enumerate(SHAPES):
        one = vk.VideoPack.from_shapes([shape], cfg.patch_size, device=DEVICE, text_lengths=[TEXT[i]])
        o, d, g = _run(model, one, [latents[i]], t[i:i + 1], texts[i], [cot[i]], backend)
        assert_verbose_close(out[i], o[0], 1e-5, 1e-5, name=f"output of video {i}")
        assert_verbose_close(dlat[i], d[0], 1e-5, 1e-5, name=f"latent grad of video {i}")
        for n in summed:
            summed[n] += g[n]
    for n, g in grads.items():
        assert_verbose_close(g, summed[n], 1e-5, 1e-5, name=f"grad of {n}")
    assert any(g.abs().max() > 0 for n, g in grads.items() if "adaLN" in n)


def _max_err(actual, expected):
    return max((a.double() - e.double()).abs().max().item() for a, e in zip(actual, expected))


def _rel_err(actual, expected):
    return max(((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-30)).item()
               for a, e in zip(actual, expected))


_CACHE = {}


def _float64_oracle(fused_rope):
    """float64 reference run (the oracle) and float32 reference run, cached per config."""
    if fused_rope not in _CACHE:
        model, cfg = _model(fused_rope=fused_rope)
        args32 = _inputs(cfg)
        r32 = _run(model, *args32)
        model64 = _model(torch.float64, fused_rope=fused_rope)[0]
        r64 = _run(model64, *_inputs(cfg, torch.float64))
        _CACHE[fused_rope] = (model, cfg, args32, r32, r64)
    return _CACHE[fused_rope]


def test_float32_reference_matches_float64():
    model, cfg, args, (o32, d32, g32), (o64, d64, g64) = _float64_oracle(True)
    # float32 rounding through a 2-block model: relative to each tensor's scale
    assert _rel_err(o32, o64) < 1e-5, _rel_err(o32, o64)
    assert _rel_err(d32, d64) < 1e-5, _rel_err(d32, d64)
    assert _rel_err(list(g32.values()), list(g64.values())) < 1e-4


# backend= values to compare with the reference: whole backends, and per-family mixes that
# run whatever Triton kernels exist today (RoPE unfused, so the rope family is exercised)
BACKENDS = [
    pytest.param("triton", True, id="triton"),
    pytest.param({"patch": "triton", "rope": "triton", "attention": "triton"}, False, id="triton-unfused-rope"),
    pytest.param({"patch": "reference", "rope": "triton", "attention": "reference"}, False,
                 id="triton-rope-only"),
    # the CUDA kernels cover patchify/unpatchify and RoPE, not patch_embed, linear_unpatchify
    # or attention (which the model calls): its RoPE is what the model can take from them
    pytest.param({"patch": "triton", "rope": "cuda", "attention": "triton"}, False, id="cuda-rope",
                 marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("backend,fused_rope", BACKENDS)
def test_backend_matches_reference(backend, fused_rope):
    """flash-attention's rule end to end, per tensor (each output, each latent and each
    parameter gradient): a backend's float32 error against the float64 oracle is at most
    2x the float32 reference's own error, plus 1e-6 of that tensor's scale (gradients
    range over 4 decades here: one max over all would let the small ones be far off)."""
    cfg = DiTConfig.from_name("tiny", fused_rope=fused_rope)
    reason = why_not(cfg, backend, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    model, cfg, args, (o32, d32, g32), (o64, d64, g64) = _float64_oracle(fused_rope)
    ob, db, gb = _run(model, *args, backend=backend)
    named = [(f"output {i}", ob[i], o32[i], o64[i]) for i in range(len(ob))]
    named += [(f"latent grad {i}", db[i], d32[i], d64[i]) for i in range(len(db))]
    named += [(f"grad of {n}", gb[n], g32[n], g64[n]) for n in g64]
    for name, got, ref32, ref64 in named:
        err, base = _max_err([got], [ref64]), _max_err([ref32], [ref64])
        floor = 1e-6 * ref64.abs().max().item()
        assert err <= 2 * base + floor, f"{name}: {backend} error {err:.3e} > 2 x reference's {base:.3e} + {floor:.1e}"


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model, cfg = _model()
    pack, latents, t, text, cot = _inputs(cfg)

    def step(latents, pack, t, text):
        return model(latents, pack, t, text, backend="reference")

    # compiled first: the fresh pack's per-token tensors are built inside the graph
    compiled = torch.compile(step, fullgraph=True)(latents, pack, t, text)
    eager = step(latents, pack, t, text)
    for a, e in zip(compiled, eager):
        assert_verbose_close(a, e, 1e-5, 1e-5, name="compiled output")
    params = list(model.parameters())
    loss = lambda outs: sum((o * c).sum() for o, c in zip(outs, cot))  # noqa: E731
    expect = torch.autograd.grad(loss(eager), params)
    for (name, _), a, e in zip(model.named_parameters(), torch.autograd.grad(loss(compiled), params), expect):
        assert_verbose_close(a, e, 1e-5, 1e-5, name=f"compiled gradient of {name}")


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU (realistic config in bfloat16)")
@pytest.mark.parametrize("backend,fused_rope", [
    pytest.param("triton", True, id="triton"),
    pytest.param({"patch": "triton", "rope": "cuda", "attention": "triton"}, False, id="cuda-rope",
                 marks=pytest.mark.gpu),
])
def test_realistic_config_bf16_gpu(backend, fused_rope):
    """Wan-1.3B-wide blocks (hidden 1536, 12 heads of 128, 2 of them) over a mixed pack in
    bfloat16: the backend's error against the float32 reference is at most 2x the
    reference path's own bfloat16 error (plus a floor), outputs and latent gradients."""
    cfg = DiTConfig.from_name("wan-1.3b-like", depth=2, text_dim=512, fused_rope=fused_rope)
    reason = why_not(cfg, backend, DEVICE, torch.bfloat16)
    if reason is not None:
        pytest.skip(reason)
    shapes, text_lengths = [(5, 30, 52), (1, 60, 104), (3, 16, 16)], [77, 20, 0]
    g = torch.Generator().manual_seed(0)
    model = VideoDiT(cfg).init_weights(zero_init=False, generator=g).to(DEVICE)
    pack = vk.VideoPack.from_shapes(shapes, cfg.patch_size, device=DEVICE, text_lengths=text_lengths)
    latents = [torch.randn(cfg.in_channels, *s, generator=g).to(DEVICE) for s in shapes]
    text = torch.randn(pack.num_text_tokens, cfg.text_dim, generator=g).to(DEVICE)
    t = torch.tensor([10.0, 500.0, 999.0], device=DEVICE)
    cot = [torch.randn_like(x) for x in latents]
    o32, d32, _ = _run(model, pack, latents, t, text, cot)
    bf = lambda xs: [x.bfloat16() for x in xs]
    model = model.bfloat16()
    args = (pack, bf(latents), t.bfloat16(), text.bfloat16(), bf(cot))
    oref, dref, _ = _run(model, *args)
    ob, db, _ = _run(model, *args, backend=backend)
    for name, got, base, exp in (("outputs", ob, oref, o32), ("latent grads", db, dref, d32)):
        err, base_err = _max_err(got, exp), _max_err(base, exp)
        assert err <= 2 * base_err + 1e-3, f"{name}: {backend} error {err:.3e} > 2 x reference bf16's {base_err:.3e}"


@pytest.mark.parametrize("equal", [False, True], ids=["mixed", "equal"])
@pytest.mark.parametrize("pad", ["grid", "tokens"])
def test_padded_plain_pytorch_baseline_matches_the_packed_model(pad, equal, monkeypatch):
    # benchmarks/bench_dit.py times model.padded.padded_forward as "the same model without
    # packing": it must compute the same outputs and gradients on the real tokens
    import vdit_kernels.model.padded as padded
    from vdit_kernels.model.padded import padded_forward

    # eps and theta not the defaults: a layer that ignored them would still agree
    model, cfg = _model(torch.float64, eps=1e-2, rope_theta=256.0)
    pack, latents, t, text, cot = _inputs(cfg, torch.float64)
    shapes, text_lengths = ([SHAPES[0]] * 3, [4, 4, 4]) if equal else (SHAPES, [3, 5, 1])
    if equal:  # nothing padded: the baseline must pass SDPA no mask (its FlashAttention takes none)
        g = torch.Generator().manual_seed(3)
        latents, cot = ([torch.randn(cfg.in_channels, *s, generator=g, dtype=torch.float64).to(DEVICE)
                         for s in shapes] for _ in range(2))
    pack = vk.VideoPack.from_shapes(shapes, cfg.patch_size, device=DEVICE, text_lengths=text_lengths)
    text = torch.randn(pack.num_text_tokens, cfg.text_dim, dtype=torch.float64, device=DEVICE)
    masks = []
    sdpa = padded.F.scaled_dot_product_attention
    monkeypatch.setattr(padded.F, "scaled_dot_product_attention",
                        lambda *a, attn_mask=None, **k: masks.append(attn_mask) or sdpa(*a, attn_mask=attn_mask, **k))
    results = []
    for forward in (lambda x: model(x, pack, t, text, backend="reference"),
                    lambda x: padded_forward(model, x, pack, t, text, pad=pad)):
        model.zero_grad(set_to_none=True)
        leaves = [x.detach().clone().requires_grad_(True) for x in latents]
        out = forward(leaves)
        sum((o * c).sum() for o, c in zip(out, cot)).backward()
        results.append(([o.detach() for o in out], [x.grad for x in leaves],
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_p, gx_p, gw_p), (out_b, gx_b, gw_b) = results
    for a, e in zip(out_b + gx_b, out_p + gx_p):
        assert_verbose_close(a, e, atol=1e-10, rtol=1e-9)
    assert gw_b.keys() == gw_p.keys()
    for name in gw_p:
        assert_verbose_close(gw_b[name], gw_p[name], atol=1e-10, rtol=1e-9, name=name)
    # self- then cross-attention per block: masked where keys are padded, else no mask
    assert [m is None for m in masks] == ([True, True] if equal else [False, False]) * cfg.depth
    # (inputs the model takes, with a video of no text tokens: the padded SDPA's NaN rows)
    no_text = vk.VideoPack.from_shapes(SHAPES, cfg.patch_size, device=DEVICE, text_lengths=TEXT)
    with pytest.raises(ValueError, match="text token"):
        padded_forward(model, _inputs(cfg, torch.float64)[1], no_text, t, text[:no_text.num_text_tokens])


def test_per_token_gradient_is_a_segment_sum():
    # per_token gathers per-video modulation rows to tokens; its backward sums each
    # video's rows with a one-hot GEMM (float32 accumulation, no atomics)
    from vdit_kernels.model.dit import per_token

    g = torch.Generator().manual_seed(0)
    seg = torch.tensor([0] * 7 + [1] * 2 + [2] * 11)
    mod = torch.randn(3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: per_token(m, seg), (mod,))
    grad = torch.randn(20, 2, 5, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad(per_token(mod, seg), mod, grad)
    (native,) = torch.autograd.grad(mod.index_select(0, seg), mod, grad)
    assert torch.allclose(ours, native, atol=1e-12, rtol=0)


def test_demo_sequence_parallel_command():
    # the README's command: the demo's model sharded over 2 processes (gloo, CPU; USP as
    # 1 x 2 there) against the whole model on each: outputs and summed latent gradients
    import os
    import re
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
               CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vdit_kernels.model.demo", "--sp", "usp", "--depth", "1", "--iters", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"rel\. diff to the whole model: out (\S+), d latents \(summed over ranks\) (\S+)", done.stdout)
    assert found, done.stdout
    assert "usp, 1 x 2 (Ulysses x ring)" in done.stdout
    assert float(found.group(1)) < 1e-5 and float(found.group(2)) < 1e-5, done.stdout
    # without torchrun: a clear message, not a hang
    alone = subprocess.run([sys.executable, "-m", "vdit_kernels.model.demo", "--sp", "ring"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode != 0 and "--sp runs under torchrun" in alone.stderr
