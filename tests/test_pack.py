import pytest
import torch

import vdit_kernels as vk
from conftest import DEVICE
from vdit_kernels import VideoPack


def test_mixed_shapes_metadata():
    # one regular clip, a one-frame video (an image) and a 1x1 spatial token grid
    pack = VideoPack.from_shapes([(4, 6, 8), (1, 4, 2), (3, 2, 2)], patch_size=(1, 2, 2),
                                 text_lengths=[5, 0, 3])
    assert pack.grid_sizes == ((4, 3, 4), (1, 2, 1), (3, 1, 1))
    assert pack.seqlens == (48, 2, 3)
    assert pack.num_tokens == 53 and pack.max_seqlen == 48 and pack.batch_size == 3
    assert pack.cu_seqlens.dtype == torch.int32
    assert pack.cu_seqlens.tolist() == [0, 48, 50, 53]
    assert pack.cu_seqlens_k.tolist() == [0, 5, 5, 8]
    assert pack.num_text_tokens == 8 and pack.max_seqlen_k == 5
    assert pack.segment_ids.tolist() == [0] * 48 + [1] * 2 + [2] * 3
    pos = pack.positions
    assert pos.dtype == torch.int32 and pos.shape == (53, 3)
    assert pos is pack.positions  # cached
    # raster order (t, h, w), w fastest
    assert pos[:5].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0]]
    assert pos[47].tolist() == [3, 2, 3]
    assert pos[48:50].tolist() == [[0, 0, 0], [0, 1, 0]]
    assert pos[50:].tolist() == [[0, 0, 0], [1, 0, 0], [2, 0, 0]]
    fpos = pack.float_positions  # what the RoPE ops read: converted once
    assert fpos.dtype == torch.float32 and fpos.is_contiguous() and torch.equal(fpos, pos.float())
    assert fpos is pack.float_positions


def test_float_positions_traced_by_compile_are_not_kept():
    # a compiled graph's output (possibly a CUDA-graph buffer) must not become the pack's
    # cache, and the trace must not break on the CUDA-graph capture query (it broke a
    # fullgraph model compile on the H100, 2026-11-27)
    pack = VideoPack.from_shapes([(2, 4, 6)], patch_size=(1, 2, 2))
    pack.positions  # (cached eagerly, as a model's first call does)
    scaled = torch.compile(lambda p: p.float_positions * 2, fullgraph=True)(pack)
    assert torch.equal(scaled, pack.positions.float() * 2)
    assert "float_positions" not in pack._cache


def test_positions_match_meshgrid_per_video():
    pack = VideoPack.from_shapes([(2, 4, 6), (3, 2, 8)], patch_size=(1, 2, 2))
    for (t, h, w), part in zip(pack.grid_sizes, pack.split(pack.positions)):
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w),
                                          indexing="ij"), -1).reshape(-1, 3)
        assert torch.equal(part, grid.int())


@pytest.mark.parametrize("shape, axis", [((3, 4, 4), "T"), ((2, 5, 4), "H"), ((2, 4, 7), "W")])
def test_indivisible_axis_names_video_and_axis(shape, axis):
    with pytest.raises(ValueError, match=rf"video 1: axis {axis}"):
        VideoPack.from_shapes([(2, 4, 4), shape], patch_size=(2, 2, 2))


def test_bad_pack_arguments():
    with pytest.raises(ValueError, match="shape must be"):
        VideoPack.from_shapes([(2, 4)], patch_size=(1, 2, 2))
    with pytest.raises(ValueError, match="patch_size"):
        VideoPack.from_shapes([(2, 4, 4)], patch_size=(1, 0, 2))
    with pytest.raises(ValueError, match="text_lengths has 1 entries for 2 videos"):
        VideoPack.from_shapes([(2, 4, 4), (2, 4, 4)], patch_size=(1, 2, 2), text_lengths=[3])
    with pytest.raises(ValueError, match="non-negative"):
        VideoPack.from_shapes([(2, 4, 4)], patch_size=(1, 2, 2), text_lengths=[-1])
    # ints, never bools (operator.index would take True as 1) nor floats
    for shapes, patch, text in (([(True, 2, 2)], (1, 2, 2), None), ([(1, 2, 2)], (True, 2, 2), None),
                                ([(1, 2, 2)], (1, 2, 2), [True]), ([(1.0, 2, 2)], (1, 2, 2), None)):
        with pytest.raises(ValueError, match="ints"):
            VideoPack.from_shapes(shapes, patch_size=patch, text_lengths=text)
    assert tuple(VideoPack.from_shapes([(torch.tensor(1), 2, 2)], patch_size=(1, 2, 2)).shapes) == ((1, 2, 2),)
    # a patch size given as an array or tensor of three ints is that sequence (every array
    # has __index__: it was taken as one int for all three axes, and refused as such)
    for patch in ((1, 2, 2), torch.tensor([1, 2, 2]), [torch.tensor(1), 2, 2]):
        assert VideoPack.from_shapes([(2, 4, 4)], patch_size=patch).patch_size == (1, 2, 2)
    assert VideoPack.from_shapes([(2, 4, 4)], patch_size=torch.tensor(2)).patch_size == (2, 2, 2)
    for patch in (True, 2.0, torch.tensor([[1, 2, 2]]), torch.tensor([1.0, 2.0, 2.0])):
        with pytest.raises(ValueError, match="patch_size must be"):
            VideoPack.from_shapes([(2, 4, 4)], patch_size=patch)
    # not a list of shapes, or no device: named, not torch's or Python's own message
    for shapes in (None, 5, "2x4x4"):
        with pytest.raises(TypeError, match="shapes must be a sequence of"):
            VideoPack.from_shapes(shapes)
    with pytest.raises(ValueError, match="device must name a torch device .*got 'gpu0'"):
        VideoPack.from_shapes([(2, 4, 4)], device="gpu0")
    assert VideoPack.from_shapes(s for s in [(2, 4, 4)]).num_tokens == 8  # any iterable


def test_pack_device_as_its_tensors_report_it():
    # "cuda" is stored as cuda:<current> and "cpu:0" as "cpu": torch.device("cuda") is not
    # torch.device("cuda:0"), and RoPE compares the pack's device with q's
    pack = VideoPack.from_shapes([(2, 4, 4)], patch_size=(1, 2, 2), device="cpu:0")
    assert pack.device == pack.cu_seqlens.device == torch.device("cpu")
    q = torch.randn(pack.num_tokens, 2, 12)
    vk.apply_rope_3d(q, q, pack, (4, 4, 4), backend="reference")
    vk.Rope3D.from_pack(pack, (4, 4, 4), positions=pack.positions)
    if torch.cuda.is_available():
        gpu = VideoPack.from_shapes([(2, 4, 4)], patch_size=(1, 2, 2), device="cuda")
        assert gpu.device == torch.device("cuda", torch.cuda.current_device()) == gpu.cu_seqlens.device


def test_a_pack_first_used_under_inference_mode_still_trains():
    # its offsets and lazily cached positions were inference tensors, which autograd cannot
    # save: every later training step with the pack failed
    with torch.inference_mode():
        pack = VideoPack.from_shapes([(2, 4, 4), (1, 2, 2)], patch_size=(1, 2, 2))
        rope = vk.Rope3D.from_pack(pack, (4, 4, 4))
        x = torch.randn(pack.num_tokens, 2, 12)
        vk.varlen_attention(x, x, x, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen, pack.max_seqlen,
                            rope=rope, backend="reference")
        pack.segment_ids
    assert not any(t.is_inference() for t in (pack.cu_seqlens, pack.positions, pack.float_positions,
                                                pack.segment_ids))
    q = torch.randn(pack.num_tokens, 2, 12, requires_grad=True)
    out = vk.varlen_attention(q, q, q, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen, pack.max_seqlen,
                              rope=rope, backend="reference")
    out.sum().backward()
    assert q.grad is not None


def test_explicit_rope_positions_made_under_inference_mode_still_train():
    # as the pack's own: Rope3D keeps its positions, and a call's inference-tensor
    # positions are copied where a backward would save them
    pack = VideoPack.from_shapes([(2, 4, 4), (1, 2, 2)], patch_size=(1, 2, 2))
    with torch.inference_mode():
        kept = vk.Rope3D.from_pack(pack, (4, 4, 4), positions=pack.positions.clone())
        made = pack.positions.float()
    assert not kept.positions.is_inference() and made.is_inference()
    q = torch.randn(pack.num_tokens, 2, 12, requires_grad=True)
    out = vk.varlen_attention(q, q, q, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen, pack.max_seqlen,
                              rope=kept, backend="reference")
    qr, kr = vk.apply_rope_3d(q, q, dims=(4, 4, 4), positions=made, backend="reference")
    # a Rope3D built directly (not from_pack) keeps what it is given: the attention copies it
    direct = vk.varlen_attention(q, q, q, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen, pack.max_seqlen,
                                 rope=vk.Rope3D(made, (4, 4, 4)), backend="reference")
    (out.sum() + qr.sum() + kr.sum() + direct.sum()).backward()
    assert q.grad is not None
    with torch.inference_mode():  # no copy where no backward can follow
        from vdit_kernels.ops.rope import float_positions
        assert float_positions(None, made, pack.num_tokens, made.device) is made


def test_replace_gives_a_pack_its_own_cache():
    import dataclasses

    pack = VideoPack.from_shapes([(2, 4, 4)], patch_size=(1, 2, 2))
    pack.positions
    assert dataclasses.replace(pack)._cache == {}
    # fields that disagree with the shapes are refused, not used to place tokens
    two = VideoPack.from_shapes([(1, 2, 2), (2, 4, 4)], patch_size=(1, 2, 2), text_lengths=[1, 2])
    for change, message in (({"shapes": ((1, 2, 2),)}, "grid_sizes"), ({"patch_size": (1, 1, 1)}, "seqlens"),
                            ({"cu_seqlens": two.cu_seqlens[:2]}, "cu_seqlens of shape"),
                            ({"text_lengths": None}, "text_lengths / cu_seqlens_k"),
                            ({"text_lengths": (1, 2, 3)}, "text_lengths / cu_seqlens_k"),
                            # the same count, the old offsets: video 0's text went to video 1
                            ({"text_lengths": (2, 1)}, r"cu_seqlens_k \[0, 1, 3\] \(the offsets of \[2, 1\]\)"),
                            ({"cu_seqlens": two.cu_seqlens.flip(0)}, "cu_seqlens .*the offsets of")):
        with pytest.raises(ValueError, match=f"VideoPack fields disagree .*{message}"):
            dataclasses.replace(two, **change)
    assert dataclasses.replace(two).seqlens == two.seqlens


def test_mixed_precision_input_casts_keep_packs_and_rope_exact():
    # FSDP's and DDP's mixed-precision casts of a module's floating inputs rebuild the
    # dataclasses among them with dataclasses.replace(obj, **every field): a pack (its lazy
    # cache a field(init=False)) made that fail; a Rope3D's float32 positions came back
    # bfloat16 (coordinate 299 as 300), and attention took them without a word
    import dataclasses

    from torch.distributed.utils import _apply_to_tensors

    pack = VideoPack.from_shapes([(1, 2, 600), (2, 4, 4)], patch_size=(1, 2, 2), text_lengths=[1, 2])
    pack.positions, pack.segment_ids, pack.float_positions  # a warm cache stays out of the fields
    fields = {f.name: getattr(pack, f.name) for f in dataclasses.fields(pack)}
    assert "_cache" not in fields and dataclasses.replace(pack, **fields).seqlens == pack.seqlens
    rope = vk.Rope3D.from_pack(pack, (8, 8, 8))
    to_bf16 = lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t  # noqa: E731
    cast_pack, cast_rope = _apply_to_tensors(to_bf16, (pack, rope))
    assert torch.equal(cast_pack.cu_seqlens, pack.cu_seqlens) and torch.equal(cast_pack.positions, pack.positions)
    assert torch.equal(cast_rope.positions, pack.positions) and cast_rope.positions.dtype == torch.int32
    q = torch.randn(pack.num_tokens, 2, 24)
    out = [vk.varlen_attention(q, q, q, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen, pack.max_seqlen,
                               rope=r, backend="reference") for r in (rope, cast_rope)]
    assert torch.equal(out[0], out[1])
    # float positions cast so are refused, by name, not used
    bf16_rope = _apply_to_tensors(to_bf16, vk.Rope3D.from_pack(pack, (8, 8, 8), positions=pack.float_positions))
    with pytest.raises(ValueError, match="positions are torch.bfloat16, which holds whole coordinates only up to 256"):
        vk.varlen_attention(q, q, q, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen, pack.max_seqlen,
                            rope=bf16_rope, backend="reference")
    with pytest.raises(ValueError, match="float16, which holds whole coordinates only up to 2048"):
        vk.apply_rope_3d(q, q, dims=(8, 8, 8), positions=pack.float_positions.half())


def test_split_and_to():
    pack = VideoPack.from_shapes([(1, 2, 2), (2, 2, 2)], patch_size=(1, 2, 2))
    parts = pack.split(torch.arange(3))
    assert [p.tolist() for p in parts] == [[0], [1, 2]]
    with pytest.raises(ValueError, match="rows"):
        pack.split(torch.arange(4))
    assert pack.to("cpu").cu_seqlens.tolist() == [0, 1, 3]
    texts = VideoPack.from_shapes(pack.shapes, patch_size=(1, 2, 2), text_lengths=[3, 4]).to("cpu")
    assert texts.text_lengths == (3, 4) and texts.cu_seqlens_k.tolist() == [0, 3, 7]


def test_device_tables_are_cached_by_content(monkeypatch):
    # launch tables: the same values reuse one tensor (no copy, and a CUDA graph replay
    # reads the buffer it captured); the cache is an LRU of TABLE_CACHE_SIZE entries
    from vdit_kernels import pack as P

    monkeypatch.setattr(P, "_TABLES", type(P._TABLES)())
    monkeypatch.setattr(P, "TABLE_CACHE_SIZE", 2)
    a = P.device_table([1, 2, 3], "cpu")
    assert P.device_table((1, 2, 3), "cpu") is a and a.tolist() == [1, 2, 3] and a.dtype == torch.int64
    b = P.device_table([1, 2, 4], "cpu")
    assert b is not a and b.tolist() == [1, 2, 4]
    assert P.device_table([1, 2, 3], "cpu", dtype=torch.int32) is not a
    assert len(P._TABLES) == 2 and P.device_table([1, 2, 4], "cpu") is b  # [1, 2, 3] int64 evicted
    assert P.device_table([1, 2, 3], "cpu") is not a
    # least recently used, not first in: a table used again outlives one made after it
    x, y = P.device_table([7], "cpu"), P.device_table([8], "cpu")
    assert P.device_table([7], "cpu") is x
    P.device_table([9], "cpu")  # evicts [8], the least recently used
    assert P.device_table([7], "cpu") is x and P.device_table([8], "cpu") is not y


def test_patch_ops_reuse_their_launch_table(monkeypatch):
    from vdit_kernels import pack as P

    monkeypatch.setattr(P, "_TABLES", type(P._TABLES)())
    pack = vk.VideoPack.from_shapes([(2, 4, 6), (1, 2, 2)], (1, 2, 2), device=DEVICE)
    videos = [torch.randn(4, *s, device=DEVICE) for s in pack.shapes]
    first = vk.patchify(videos, pack, backend="triton")
    tables = len(P._TABLES)
    assert tables >= 1
    assert torch.equal(vk.patchify(videos, pack, backend="triton"), first)
    assert len(P._TABLES) == tables  # same videos: the table was found, not rebuilt


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU (streams)")
def test_device_tables_are_per_stream_and_device_index():
    # a kernel on another stream must not read a table whose copy is queued on the first
    from vdit_kernels import pack as P

    a = P.device_table([5, 6, 7], "cuda")
    assert P.device_table([5, 6, 7], torch.device("cuda", torch.cuda.current_device())) is a
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        b = P.device_table([5, 6, 7], "cuda")
        assert b is not a and P.device_table([5, 6, 7], "cuda") is b
    torch.cuda.synchronize()
    assert b.tolist() == [5, 6, 7]
