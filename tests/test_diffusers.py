"""diffusers' video transformers on vdit_kernels' processors equal their own processors.

Tiny randomly initialised models (no weights downloaded), float32: on CPU, where the Triton
backend runs under the interpreter (float32 only: bfloat16 dot is wrong there), and the
Triton cases on the GPU where there is one. Each
test runs the model with diffusers' processor, then with ours, on the same inputs.
"""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel,  # noqa: E402
                       WanTransformer3DModel)
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

import vdit_kernels.integrations.diffusers as vkd  # noqa: E402
from vdit_kernels.integrations.diffusers import use_vdit_attention  # noqa: E402
from vdit_kernels import BackendUnavailable, Rope3D  # noqa: E402

from conftest import assert_verbose_close, device_for  # noqa: E402

# float32 end to end through a whole (tiny) model: a little above the elementwise 1e-5
ATOL = RTOL = 1e-4
BACKENDS = ["reference", "triton"]


def on_device_for(backend, model, latents, kw):
    """model, latents and kw moved where `backend` runs (conftest.device_for)."""
    device = device_for(backend)
    move = lambda x: x.to(device) if torch.is_tensor(x) else tuple(map(move, x)) if isinstance(x, tuple) else x
    return model.to(device), latents.to(device), {k: move(v) for k, v in kw.items()}


def weighted(out):
    """A fixed random weighting of the output (drawn on CPU: the same numbers on any device)."""
    return out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device)


def tiny_wan(**extra):
    # head_dim 12 -> Wan's rope split (4, 4, 4); 2 layers, 2 heads, 4 latent channels
    torch.manual_seed(0)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
               out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    return WanTransformer3DModel(**{**cfg, **extra}).eval()


def wan_inputs(text_len=7, image_tokens=0, image_dim=8):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 3, 6, 8, generator=g)  # grid (3, 3, 4): 36 tokens per video
    kw = dict(timestep=torch.tensor([10.0, 700.0]),
              encoder_hidden_states=torch.randn(2, text_len, 16, generator=g))
    if image_tokens:
        kw["encoder_hidden_states_image"] = torch.randn(2, image_tokens, image_dim, generator=g)
    return latents, kw


def run(model, latents, kw, grad=True):
    """Output, and with grad the gradients of a weighted sum w.r.t. latents and one weight."""
    x = latents.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = model(x, **kw).sample
        if not grad:
            return out, None
        model.zero_grad()
        weighted(out).sum().backward()
    w = model.blocks[0].attn1.to_q.weight.grad.clone()
    return out.detach(), (x.grad, w)


def assert_same(ours, theirs, name):
    (out, grads), (out_ref, grads_ref) = ours, theirs
    assert_verbose_close(out, out_ref, ATOL, RTOL, name=f"{name} output")
    if grads_ref is not None:
        assert_verbose_close(grads[0], grads_ref[0], ATOL, RTOL, name=f"{name} grad latents")
        assert_verbose_close(grads[1], grads_ref[1], ATOL, RTOL, name=f"{name} grad attn1.to_q")


@pytest.mark.parametrize("backend", BACKENDS)
def test_wan_matches_diffusers(backend):
    model, latents, kw = on_device_for(backend, tiny_wan(), *wan_inputs())
    expected = run(model, latents, kw)
    assert use_vdit_attention(model, backend=backend) is model
    assert all(isinstance(p, vkd.WanVarlenAttnProcessor) for p in model.attn_processors.values())
    assert_same(run(model, latents, kw), expected, f"wan/{backend}")


def test_wan_rope_is_fused(monkeypatch):
    """Self-attention gets Rope3D(grid positions, Wan's split, 10000, interleaved); cross-attention none."""
    calls = []
    real = vkd.varlen_attention

    def spy(q, k, v, *args, rope=None, **kwargs):
        calls.append((q.shape, k.shape, rope))
        return real(q, k, v, *args, rope=rope, **kwargs)

    monkeypatch.setattr(vkd, "varlen_attention", spy)
    model = use_vdit_attention(tiny_wan(), backend="reference")
    latents, kw = wan_inputs()
    with torch.no_grad():
        model(latents, **kw)
    assert len(calls) == 4  # 2 layers x (self, cross)
    grid = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(3.0), torch.arange(4.0),
                                      indexing="ij"), -1).reshape(-1, 3)
    for i, (q_shape, k_shape, rope) in enumerate(calls):
        if i % 2 == 0:
            assert isinstance(rope, Rope3D) and rope.dims == (4, 4, 4) and rope.interleaved
            assert rope.theta == 10000.0
            torch.testing.assert_close(rope.positions, grid.repeat(2, 1), rtol=0, atol=0)
        else:
            assert rope is None and k_shape[0] == 2 * 7  # text keys: 7 per sample
    assert calls[0][2] is calls[2][2]  # one Rope3D per forward, shared by the layers


def test_wan_processor_set_by_hand_rotates_in_pytorch():
    """No hook on model.rope: plain (cos, sin) reach the processor; it rotates in PyTorch."""
    model = tiny_wan()
    latents, kw = wan_inputs()
    expected = run(model, latents, kw)
    model.set_attn_processor(vkd.WanVarlenAttnProcessor(backend="reference"))
    assert_same(run(model, latents, kw), expected, "wan/unfused")


def test_wan_rope_table_mismatch_warns_and_stays_exact():
    """A rope table that is not Rope3D's formula is not fused: a warning, then the PyTorch rotation."""
    model = tiny_wan()
    model.rope.freqs_cos[:, :4] = 1.0  # no rotation on the time chunk
    model.rope.freqs_sin[:, :4] = 0.0
    latents, kw = wan_inputs()
    expected = run(model, latents, kw, grad=False)
    with pytest.warns(UserWarning, match="not fused"):
        use_vdit_attention(model, backend="reference")
    assert_same(run(model, latents, kw, grad=False), expected, "wan/mismatch")


def test_wan_rope_table_changed_after_install():
    """A table edited after use_vdit_attention (a RoPE-scaling patch) is checked again at the
    next eager call (it was fused with the old formula regardless: 0.07 off diffusers)."""
    model = use_vdit_attention(tiny_wan(), backend="reference")
    latents, kw = wan_inputs()
    model.rope.freqs_cos[:, :4] = 1.0  # in place: the buffers' version counters move
    model.rope.freqs_sin[:, :4] = 0.0
    with pytest.warns(UserWarning, match="changed after use_vdit_attention"):
        ours = run(model, latents, kw, grad=False)
    model.set_attn_processor(WanAttnProcessor())
    assert_same(ours, run(model, latents, kw, grad=False), "wan/table changed")
    # a table put back to the formula (new tensors) is fused again
    fresh = tiny_wan()
    model.rope.freqs_cos, model.rope.freqs_sin = fresh.rope.freqs_cos.clone(), fresh.rope.freqs_sin.clone()
    assert vkd._wan_table_mismatch(model.rope) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_wan_image_to_video(backend):
    """Wan 2.1 I2V layout: image tokens as extra keys in cross-attention (512 text tokens, hardcoded)."""
    model, latents, kw = on_device_for(backend, tiny_wan(image_dim=8, added_kv_proj_dim=24),
                                       *wan_inputs(text_len=512, image_tokens=5))
    expected = run(model, latents, kw, grad=False)
    use_vdit_attention(model, backend=backend)
    assert_same(run(model, latents, kw, grad=False), expected, f"wan-i2v/{backend}")


def test_wan_fused_projections():
    model = tiny_wan()
    latents, kw = wan_inputs()
    model.fuse_qkv_projections()
    expected = run(model, latents, kw, grad=False)
    use_vdit_attention(model, backend="reference")
    assert_same(run(model, latents, kw, grad=False), expected, "wan/fused-qkv")


def test_attention_mask_raises():
    model = use_vdit_attention(tiny_wan(), backend="reference")
    attn = model.blocks[0].attn1
    x = torch.randn(2, 5, 24)
    with pytest.raises(ValueError, match="attention_mask"):
        attn(x, None, torch.ones(2, 1, 5, 5, dtype=torch.bool))
    attn.processor._attention_backend = "flash"  # as diffusers' set_attention_backend does
    with pytest.raises(ValueError, match="attention backend"):
        attn(x)


def tiny_hunyuan(**extra):
    torch.manual_seed(0)
    # head_dim 16 -> rope split (4, 6, 6); 2 dual-stream and 2 single-stream blocks
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), **extra).eval()


def hunyuan_inputs(valid_text=(7, 4)):
    """Two samples, grid (3, 3, 4) = 36 video tokens; 9 prompt slots, the first valid_text[b] real."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 3, 6, 8, generator=g)
    mask = torch.stack([torch.arange(9) < n for n in valid_text]).long()
    kw = dict(timestep=torch.tensor([10, 700]), encoder_hidden_states=torch.randn(2, 9, 16, generator=g),
              encoder_attention_mask=mask, pooled_projections=torch.randn(2, 8, generator=g),
              guidance=torch.tensor([3000.0, 3000.0]))
    return latents, kw


def run_hunyuan(model, latents, kw):
    x = latents.clone().requires_grad_(True)
    out = model(x, **kw).sample
    model.zero_grad()
    weighted(out).sum().backward()
    grads = (x.grad, model.transformer_blocks[0].attn.to_q.weight.grad.clone(),
             model.single_transformer_blocks[1].attn.to_k.weight.grad.clone())
    return out.detach(), grads


def assert_hunyuan_same(ours, theirs, name):
    assert_verbose_close(ours[0], theirs[0], ATOL, RTOL, name=f"{name} output")
    for what, a, b in zip(("latents", "dual to_q", "single to_k"), ours[1], theirs[1]):
        assert_verbose_close(a, b, ATOL, RTOL, name=f"{name} grad {what}")


@pytest.mark.parametrize("condition", [None, "token_replace"])  # text-to-video, image-to-video blocks
@pytest.mark.parametrize("backend", BACKENDS)
def test_hunyuan_matches_diffusers(backend, condition):
    """Padded prompts (7 and 4 of 9 tokens real): the key-padding mask as segment offsets."""
    model, latents, kw = on_device_for(backend, tiny_hunyuan(image_condition_type=condition),
                                       *hunyuan_inputs())
    expected = run_hunyuan(model, latents, kw)
    use_vdit_attention(model, backend=backend)
    procs = model.attn_processors
    assert isinstance(procs["transformer_blocks.0.attn.processor"], vkd.HunyuanVideoVarlenAttnProcessor)
    assert isinstance(procs["single_transformer_blocks.1.attn.processor"],
                      vkd.HunyuanVideoVarlenAttnProcessor)
    # the prompt refiner (text only, query-and-key mask) keeps diffusers' processor
    assert not isinstance(procs["context_embedder.token_refiner.refiner_blocks.0.attn.processor"],
                          vkd.HunyuanVideoVarlenAttnProcessor)
    assert_hunyuan_same(run_hunyuan(model, latents, kw), expected, f"hunyuan/{backend}")


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
def test_matches_diffusers_under_inference_mode(name):
    # a serving pipeline's usual mode: its tensors have no version counter, which the
    # HunyuanVideo processor's mask cache read (RuntimeError before)
    model, (latents, kw) = (tiny_wan(), wan_inputs()) if name == "wan" else (tiny_hunyuan(), hunyuan_inputs())
    with torch.inference_mode():
        theirs = model(latents, **kw).sample
        use_vdit_attention(model, backend="reference")
        ours = model(latents, **kw).sample
        again = model(latents, **kw).sample  # the mask cached by identity
    assert_verbose_close(ours, theirs, ATOL, RTOL, name=f"{name} under inference_mode")
    assert torch.equal(again, ours)


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
def test_matches_diffusers_under_autocast(name):
    # under autocast diffusers' RMSNorm returns float32 q/k beside bfloat16 v, and
    # scaled_dot_product_attention casts all three; varlen_attention casts them the same way.
    # Both runs round differently in bfloat16: ours may be at most 2x as far from the float32
    # output as theirs (theirs: about 1e-2 here)
    model, (latents, kw) = (tiny_wan(), wan_inputs()) if name == "wan" else (tiny_hunyuan(), hunyuan_inputs())
    with torch.no_grad():
        exact = model(latents, **kw).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = model(latents, **kw).sample
            use_vdit_attention(model, backend="reference")
            ours = model(latents, **kw).sample
    err = lambda out: (out.double() - exact.double()).abs().max().item()
    assert 0 < err(theirs) and err(ours) <= 2 * err(theirs), (err(ours), err(theirs))


def test_hunyuan_rope_fused_and_mask_as_segments(monkeypatch):
    """Each layer: one call, 2B segments (sample b's 45 queries vs its 36 + n_b keys, then its
    padding keys with no queries), Rope3D over [grid; text at 0] with HunyuanVideo's theta 256."""
    calls = []
    real = vkd.varlen_attention

    def spy(q, k, v, cu_q, cu_k, *args, rope=None, **kwargs):
        calls.append((cu_q.tolist(), cu_k.tolist(), rope))
        return real(q, k, v, cu_q, cu_k, *args, rope=rope, **kwargs)

    monkeypatch.setattr(vkd, "varlen_attention", spy)
    model = use_vdit_attention(tiny_hunyuan(), backend="reference")
    latents, kw = hunyuan_inputs()
    with torch.no_grad():
        model(latents, **kw)
    assert len(calls) == 4  # 2 dual + 2 single blocks; the refiner is not ours
    assert all(rope is calls[0][2] for _, _, rope in calls)  # built once per forward, not per layer
    grid = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(3.0), torch.arange(4.0),
                                      indexing="ij"), -1).reshape(-1, 3)
    positions = torch.cat([grid, torch.zeros(9, 3)]).repeat(2, 1)
    for cu_q, cu_k, rope in calls:
        assert cu_q == [0, 45, 45, 90, 90]
        assert cu_k == [0, 36 + 7, 45, 45 + 36 + 4, 90]
        assert isinstance(rope, Rope3D) and rope.dims == (4, 6, 6) and rope.theta == 256.0
        assert rope.interleaved
        torch.testing.assert_close(rope.positions, positions, rtol=0, atol=0)


def test_hunyuan_unhooked_rotates_in_pytorch():
    """Processors set by hand (no rope hook): diffusers' rotation of the video tokens, same output."""
    model = tiny_hunyuan()
    latents, kw = hunyuan_inputs(valid_text=(9, 1))
    expected = run_hunyuan(model, latents, kw)
    processor = vkd.HunyuanVideoVarlenAttnProcessor(backend="reference")
    for block in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        block.attn.set_processor(processor)
    assert_hunyuan_same(run_hunyuan(model, latents, kw), expected, "hunyuan/unfused")


def test_hunyuan_mask_must_be_a_key_prefix():
    model = use_vdit_attention(tiny_hunyuan(), backend="reference")
    attn = model.single_transformer_blocks[0].attn
    x, text = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    gaps = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    gaps[0, ..., 2] = False
    with pytest.raises(ValueError, match="prefix"):
        attn(x, text, gaps)
    with pytest.raises(ValueError, match="key-padding mask"):
        attn(x, text, torch.ones(2, 1, 8, 8, dtype=torch.bool))
    prefix = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    prefix[1, ..., 6:] = False
    attn(x, text, prefix)  # a prefix is accepted; its segments are cached for the next layer
    cu_q, cu_k = attn.processor._mask_cache[2]
    assert cu_q.tolist() == [0, 8, 8, 16, 16] and cu_k.tolist() == [0, 8, 8, 14, 16]
    # the cached mask passed with other (batch, tokens): its shape is checked first (16 query
    # rows were once split into two cached "samples" of 8 without an error)
    with pytest.raises(ValueError, match=r"key-padding mask of shape \(1, 1, 1, 16\)"):
        attn(torch.randn(1, 13, 32), torch.randn(1, 3, 32), prefix)
    prefix[1, ..., 3] = False  # edited in place: the cache sees the new version and re-checks
    with pytest.raises(ValueError, match="prefix"):
        attn(x, text, prefix)


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
def test_model_compiles_fullgraph(name):
    """The whole model, RoPE hook and mask segments included, in one graph (the README's claim;
    HunyuanVideo's mask check once broke it with a data-dependent torch.equal)."""
    model, (latents, kw) = (tiny_wan(), wan_inputs()) if name == "wan" else (tiny_hunyuan(), hunyuan_inputs())
    with torch.no_grad():
        expected = model(latents, **kw).sample
        use_vdit_attention(model, backend="reference")
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(latents, **kw).sample
    assert_verbose_close(out, expected, ATOL, RTOL, name=f"{name} compiled")


def test_hunyuan_compiles_fullgraph_and_pickles(tmp_path):
    """The mask's check traces (a device assert in the graph: torch.equal is data-dependent)
    and the model pickles after a forward (the mask cache held a weakref)."""
    model = use_vdit_attention(tiny_hunyuan(), backend="reference")
    attn = model.single_transformer_blocks[0].attn
    x, text = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    prefix = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    prefix[1, ..., 6:] = False
    with torch.no_grad():
        eager = attn(x, text, prefix)
        compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
        assert_verbose_close(compiled(x, text, prefix)[0], eager[0], ATOL, RTOL, name="compiled")
        gaps = prefix.clone()
        gaps[0, ..., 2] = False
        with pytest.raises(RuntimeError, match="prefix"):
            compiled(x, text, gaps)
    torch.save(model, tmp_path / "model.pt")  # after a forward: the cache is dropped, not pickled
    assert attn.processor._mask_cache is not None


def test_hunyuan_rope_formula_check():
    model = tiny_hunyuan()
    assert vkd.hunyuan_rope_mismatch(model.rope) is None
    model.rope.theta = 10000.0  # the module computes with 10000; the check compares with it
    assert vkd.hunyuan_rope_mismatch(model.rope) is None
    grid = torch.zeros(24, 3)
    cos, sin = model.rope(torch.empty(1, 1, 2, 6, 8))
    assert "differs" in vkd.rope_table_mismatch(cos, sin, grid, (4, 6, 6), 10000.0)


def tiny_cogvideox():
    torch.manual_seed(0)
    # head_dim 16 -> CogVideoX's rope split (4, 6, 6)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=6, sample_frames=9, patch_size=2,
        max_text_seq_length=7, use_rotary_positional_embeddings=True).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cogvideox_matches_diffusers(backend):
    model = tiny_cogvideox()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 3, 4, 6, 8, generator=g)  # (B, F, C, H, W): grid 3 x 3 x 4
    # the pipeline's table for CogVideoX 1.0: crop region of a grid, fractional positions
    rotary = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (3, 4)), grid_size=(3, 4),
                                     temporal_size=3)
    kw = dict(encoder_hidden_states=torch.randn(2, 7, 16, generator=g),
              timestep=torch.tensor([10, 700]), image_rotary_emb=rotary)
    model, latents, kw = on_device_for(backend, model, latents, kw)

    def run_cog():
        x = latents.clone().requires_grad_(True)
        out = model(x, **kw).sample
        weighted(out).sum().backward()
        return out.detach(), (x.grad, None)

    assert isinstance(model.transformer_blocks[0].attn1.processor, CogVideoXAttnProcessor2_0)
    expected = run_cog()
    use_vdit_attention(model, backend=backend)
    assert isinstance(model.transformer_blocks[0].attn1.processor, vkd.CogVideoXVarlenAttnProcessor)
    out, (gx, _) = run_cog()
    assert_verbose_close(out, expected[0], ATOL, RTOL, name=f"cogvideox/{backend} output")
    assert_verbose_close(gx, expected[1][0], ATOL, RTOL, name=f"cogvideox/{backend} grad latents")


def test_bad_backend_raises_when_installed():
    # at use_vdit_attention, not at the first forward
    with pytest.raises(ValueError, match="unknown backend 'refrence'"):
        use_vdit_attention(tiny_wan(), backend="refrence")
    with pytest.raises(BackendUnavailable, match="no attention kernels"):
        use_vdit_attention(tiny_wan(), backend="cuda")
    with pytest.raises(TypeError, match="nn.Module"):
        use_vdit_attention(object())


def test_unsupported_model_raises():
    with pytest.raises(TypeError, match="HunyuanVideoTransformer3DModel"):
        use_vdit_attention(torch.nn.Linear(2, 2))


def test_restoring_diffusers_processor():
    """The rope hook left behind is harmless for diffusers' own processor."""
    model = tiny_wan()
    latents, kw = wan_inputs()
    expected = run(model, latents, kw, grad=False)
    use_vdit_attention(model, backend="reference")
    model.set_attn_processor(WanAttnProcessor())
    assert_same(run(model, latents, kw, grad=False), expected, "wan/restored")


def test_import_does_not_need_diffusers():
    code = ("import sys, vdit_kernels, vdit_kernels.integrations.diffusers; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
