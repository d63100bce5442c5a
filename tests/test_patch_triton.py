"""Triton patchify / unpatchify against the reference backend: exact equality.

Runs on a GPU when there is one, else under the Triton interpreter on CPU tensors
(conftest sets TRITON_INTERPRET=1). Spatial sizes stay tiny to keep the interpreter fast.
"""
import random

import pytest
import torch

import vdit_kernels as vk
from conftest import ALL_DTYPES, DEVICE, random_videos

PACKS = {
    "mixed": [(2, 4, 6), (1, 2, 2), (4, 2, 4)],
    "one_video": [(2, 4, 4)],
    "one_frame": [(2, 2, 4), (1, 4, 2)],      # the second video has T == pt when pt == 1
    "grid_1x1": [(2, 2, 2), (2, 4, 6)],       # a 1x1 spatial token grid for ph = pw = 2
    "sixteen": [(2, 2, 2) if i % 3 else (2, 2, 4) for i in range(16)],
}


def _pack(shapes, patch_size):
    pt = patch_size[0]
    shapes = [(max(pt, t - t % pt), h, w) for t, h, w in shapes]  # T divisible by pt
    return vk.VideoPack.from_shapes(shapes, patch_size, device=DEVICE)


def _check(videos, pack, channels):
    tok = vk.patchify(videos, pack, backend="triton")
    expected = vk.patchify(videos, pack, backend="reference")
    assert tok.dtype == expected.dtype and torch.equal(tok, expected)
    outs = vk.unpatchify(expected, pack, channels, backend="triton")
    refs = vk.unpatchify(expected, pack, channels, backend="reference")
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.is_contiguous() and o.shape == r.shape and torch.equal(o, r)
        assert o.untyped_storage().data_ptr() != expected.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("patch_size", [(1, 2, 2), (2, 2, 2), (1, 1, 1)])
def test_dtypes_and_patch_sizes(dtype, patch_size):
    pack = _pack(PACKS["mixed"], patch_size)
    _check(random_videos(pack, 4, dtype), pack, 4)


@pytest.mark.parametrize("channels", [4, 16, 48])
@pytest.mark.parametrize("name", sorted(PACKS))
def test_channels_and_packs(channels, name):
    pack = _pack(PACKS[name], (1, 2, 2))
    _check(random_videos(pack, channels, torch.float16, seed=channels), pack, channels)


def test_wide_features_split_over_programs():
    # F = 48 * 8 = 384 > 128: several feature blocks per token block
    pack = _pack(PACKS["mixed"], (2, 2, 2))
    _check(random_videos(pack, 48, torch.bfloat16), pack, 48)


def test_batch_tensor_input():
    pack = vk.VideoPack.from_shapes([(2, 4, 6)] * 3, (1, 2, 2), device=DEVICE)
    batch = torch.randn(3, 4, 2, 4, 6, device=DEVICE)
    tok = vk.patchify(batch, pack, backend="triton")
    assert torch.equal(tok, vk.patchify(batch, pack, backend="reference"))


def test_non_contiguous_videos():
    pack = vk.VideoPack.from_shapes([(2, 4, 6), (3, 2, 2), (1, 4, 4)], (1, 2, 2), device=DEVICE)
    g = torch.Generator().manual_seed(1)
    big = torch.randn(4, 2, 4, 12, generator=g).to(DEVICE)
    a = big[:, :, :, ::2]                                                  # strided slice
    b = torch.randn(2, 2, 3, 4, generator=g).to(DEVICE).permute(3, 2, 1, 0)  # (4, 3, 2, 2) view
    c = torch.randn(4, 1, 4, 8, generator=g).to(DEVICE)[..., 2:6]          # offset slice
    videos = [a, b, c]
    assert not any(v.is_contiguous() for v in videos)
    tok = vk.patchify(videos, pack, backend="triton")
    assert torch.equal(tok, vk.patchify([v.contiguous() for v in videos], pack, backend="reference"))
    # non-contiguous tokens into unpatchify
    wide = torch.randn(pack.num_tokens, 32, generator=g).to(DEVICE)[:, ::2]
    for o, r in zip(vk.unpatchify(wide, pack, 4, backend="triton"),
                    vk.unpatchify(wide, pack, 4, backend="reference")):
        assert torch.equal(o, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_matches_reference(dtype):
    pack = _pack(PACKS["mixed"], (1, 2, 2))
    grads = {}
    for backend in ("triton", "reference"):
        videos = [v.requires_grad_() for v in random_videos(pack, 4, dtype)]
        tok = vk.patchify(videos, pack, backend=backend)
        w = torch.arange(tok.numel(), device=DEVICE).reshape(tok.shape).to(dtype)
        (tok * w).sum().backward()
        grads[backend] = [v.grad for v in videos]
        tokens = tok.detach().requires_grad_()
        outs = vk.unpatchify(tokens, pack, 4, backend=backend)
        g = torch.Generator().manual_seed(1)  # (a constant per video would hide a permuted backward)
        sum((o * torch.randn(o.shape, generator=g).to(o)).sum() for o in outs).backward()
        grads[backend].append(tokens.grad)
    for a, b in zip(grads["triton"], grads["reference"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("channels,patch_size", [(16, (1, 2, 2)), (48, (2, 2, 2)), (4, (1, 1, 1))])
def test_several_token_blocks_per_video(channels, patch_size):
    # videos longer than one token block (BLOCK_T = 16, 8, 256 here), next to short ones
    pack = _pack([(2, 8, 8), (1, 6, 4), (4, 10, 14), (2, 2, 2)], patch_size)
    _check(random_videos(pack, channels, torch.float32, seed=3), pack, channels)


@pytest.mark.parametrize("patch_size", [(1, 2, 2), (2, 1, 4), (1, 2, 1)])
def test_lines_split_into_several_programs(monkeypatch, patch_size):
    # the line kernels: a token row longer than one line program (and a partial last one),
    # forced with a tiny tile; videos with 1, 3 and 5 tokens per row
    from vdit_kernels.triton import patch as P

    monkeypatch.setattr(P, "_LINE_TILE", 2 * 4 * patch_size[0] * patch_size[1] * patch_size[2])
    pt, ph, pw = patch_size
    pack = _pack([(2 * pt, 2 * ph, 3 * pw), (pt, ph, pw), (2 * pt, 3 * ph, 5 * pw)], patch_size)
    videos = random_videos(pack, 4, torch.float32, seed=5)
    assert P._line_tiles(videos, patch_size, 4 * pt * ph * pw)[0] == 2  # BLOCK_W
    _check(videos, pack, 4)


def test_patch_width_not_a_power_of_two_uses_the_gather_kernels():
    from vdit_kernels.triton import patch as P

    pack = _pack([(2, 3, 6), (1, 6, 3)], (1, 3, 3))
    videos = random_videos(pack, 4, torch.float32, seed=6)
    assert P._line_tiles(videos, (1, 3, 3), 36) is None
    _check(videos, pack, 4)
    # a program per line: with rows one token wide, 2^31 programs or more would overflow the
    # grid's x (CUDA refuses the launch); such packs take the gather kernels (expanded
    # views: no memory)
    rows = 2**30 + 8
    videos = [torch.zeros(1, 1, 1, 1).expand(1, 1, rows, 2) for _ in range(2)]
    assert P._line_tiles(videos[:1], (1, 1, 2), 2) == (1, 1) and P._line_tiles(videos, (1, 1, 2), 2) is None


def test_videos_past_the_32_bit_token_index_are_refused():
    # the gather kernels divide a video's token index in 32 bits: a video of 2^31 tokens
    # (a 12.9 GB bfloat16 latent at patch 1x1x3, C = 1) would come back unwritten, with no
    # error; the line kernels index in 64 bits. (An expanded tensor: _tables reads shapes,
    # strides and the data pointer only.)
    from vdit_kernels.triton.patch import _tables

    huge = torch.empty(1, 1, 1, 1).expand(1, 2, 2**15, 3 * 2**15)  # 2 * 2^15 * 2^15 = 2^31 tokens
    with pytest.raises(vk.BackendUnavailable, match="video 1 has 2147483648 tokens"):
        _tables([torch.empty(1, 1, 1, 3), huge], (1, 1, 3), 64, "cpu")
    _tables([huge], (1, 1, 3), 64, "cpu", lines=True)
    _tables([huge[:, :, :, :-3]], (1, 1, 3), 64, "cpu")  # 2^31 - 2^15 tokens


def test_line_alignment_claims_only_what_holds():
    # the line kernels tell the compiler every row of a tile starts ALIGN-byte aligned
    # (16-byte vector accesses on a GPU); the interpreter ignores the hint, so the host
    # computation that backs it is checked here: a wrong claim would be a misaligned access
    from vdit_kernels.triton.patch import _line_align

    def video(c, t, h, w, dtype=torch.bfloat16, offset=0):
        storage = torch.zeros(c * t * h * w + offset, dtype=dtype)
        return storage[offset:].view(c, t, h, w)

    assert _line_align([video(4, 2, 6, 104)], 128) == 16       # rows of 208 B
    assert _line_align([video(4, 2, 6, 52)], 128) == 8         # rows of 104 B
    assert _line_align([video(4, 2, 6, 104), video(4, 1, 2, 52)], 128) == 8
    assert _line_align([video(4, 2, 6, 104)], 2) == 4          # lines of 2 elements
    assert _line_align([video(4, 2, 6, 104, offset=1)], 128) == 0   # base 2 B off
    assert _line_align([video(4, 2, 6, 104)[..., ::2]], 64) == 0    # w stride 2: generic path
    assert _line_align([video(4, 2, 6, 26, dtype=torch.float32)], 64) == 8
    assert _line_align([video(4, 2, 6, 3, dtype=torch.float32)], 4) == 0  # 12 B rows: 4 B = 1 element


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU (CUDA graph capture)")
def test_cuda_graph_capture_and_replay():
    # the launch table comes from pack.device_table: during a capture a fresh copy from
    # pinned memory (capturable), kept for good, whether or not the table was cached
    from vdit_kernels import pack as P

    pack = vk.VideoPack.from_shapes([(2, 4, 6), (1, 2, 2)], (1, 2, 2), device=DEVICE)
    videos = random_videos(pack, 4, torch.float32, seed=7)
    vk.patchify(videos, pack, backend="triton")  # compile outside the capture
    fresh = [v.clone() for v in videos]          # new pointers: a table first seen in capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        warm = vk.patchify(videos, pack, backend="triton")
        cold = vk.patchify(fresh, pack, backend="triton")
    # before any replay, an eager call with the table first seen in capture must not read
    # the captured copy (filled only by a replay)
    assert torch.equal(vk.patchify(fresh, pack, backend="triton"), vk.patchify(fresh, pack, backend="reference"))
    for i in range(P.TABLE_CACHE_SIZE + 1):  # evict every eager table: the graph keeps its own
        P.device_table([i], DEVICE)
    for v, f in zip(videos, fresh):
        v.normal_()
        f.copy_(v * 2)
    graph.replay()
    expected = vk.patchify(videos, pack, backend="reference")
    assert torch.equal(warm, expected) and torch.equal(cold, expected * 2)


def _relayout(v, how):
    """The same values in another storage: a slice of a larger buffer, (T, H, W, C) memory,
    or every other element along W."""
    if how == "slice":
        big = torch.zeros(v.shape[0] + 2, *v.shape[1:], dtype=v.dtype, device=v.device)
        big[1:-1] = v
        return big[1:-1]
    if how == "channels_last":
        return v.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    if how == "strided_w":
        big = torch.zeros(*v.shape[:3], 2 * v.shape[3], dtype=v.dtype, device=v.device)
        big[..., ::2] = v
        return big[..., ::2]
    return v


@pytest.mark.parametrize("seed", range(16))
def test_random_combinations(seed):
    # seeded draws of patch size, pack, channels, dtype and each video's storage at once
    rng = random.Random(seed)
    patch = rng.choice([(1, 2, 2), (2, 2, 2), (1, 1, 1), (2, 1, 3), (1, 3, 1)])
    shapes = [tuple(p * rng.randint(1, 4) for p in patch) for _ in range(rng.randint(1, 5))]
    channels, dtype = rng.choice([1, 3, 4, 5, 16]), rng.choice(ALL_DTYPES)
    pack = vk.VideoPack.from_shapes(shapes, patch, device=DEVICE)
    videos = [_relayout(v, rng.choice(["none", "slice", "channels_last", "strided_w"]))
              for v in random_videos(pack, channels, dtype, seed=seed)]
    _check(videos, pack, channels)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_line_kernels_find_each_video_both_ways(count, monkeypatch):
    # packs of up to _FEW videos load every table row at once and pick by selects, larger
    # ones search (_line_video): each way, every program must find its own video, the
    # videos of different widths (16 channels: 64-token lines, so 1 or 2 lines a token
    # row) and token counts
    from vdit_kernels.triton import patch as P

    grids = [(2, 4, 6), (1, 2, 2), (3, 6, 130), (1, 4, 8), (2, 2, 4)]
    pack = vk.VideoPack.from_shapes(grids[:count], (1, 2, 2), device=DEVICE)
    videos = random_videos(pack, 16, torch.float32, seed=count)
    assert P._line_tiles(videos, (1, 2, 2), 64)[0] == (64 if count >= 3 else 4)
    _check(videos, pack, 16)
    monkeypatch.setattr(P, "_FEW", 0)  # the search, whatever the count
    _check(videos, pack, 16)


def test_line_kernels_drop_the_register_cap_where_it_spilled(monkeypatch):
    # launched capped (more programs resident on an SM); a configuration whose capped build
    # spilled (the compiled kernel's n_spills) is launched uncapped from then on, and only it
    import types

    from vdit_kernels.triton import patch as P

    caps = []

    class Compiled:  # stands for the JIT function: records the launch's cap, reports spills
        def __init__(self, spills):
            self.spills = spills

        def __getitem__(self, grid):
            def launch(*args, **options):
                caps.append(options.get("maxnreg"))
                return types.SimpleNamespace(n_spills=self.spills if options.get("maxnreg") else 0)
            return launch

    monkeypatch.setattr(P, "_LINE_CAP_SPILLED", set())
    monkeypatch.setattr(P, "_patchify_lines_kernel", Compiled(spills=3))
    monkeypatch.setattr(P, "_unpatchify_lines_kernel", Compiled(spills=0))
    pack = vk.VideoPack.from_shapes([(2, 4, 6)], (1, 2, 2))
    videos = random_videos(pack, 16, torch.float32, seed=0)
    for _ in range(3):
        P.patchify(videos, (1, 2, 2))
    assert caps == [P._LINE_MAXNREG, None, None]
    caps.clear()
    tokens = torch.zeros(pack.num_tokens, 64, device=DEVICE)
    for _ in range(2):
        P.unpatchify(tokens, [2, 4, 6], (1, 2, 2), 16)
    assert caps == [P._LINE_MAXNREG, P._LINE_MAXNREG]


def test_host_grid_arithmetic_matches_triton():
    # the launchers' plain-int cdiv / next_pow2 (triton's are ConstexprFunctions: ~2 us a
    # call on the host) give triton's values
    import triton

    from vdit_kernels.triton import cdiv, next_pow2

    assert all(next_pow2(x) == triton.next_power_of_2(x) for x in range(0, 5000))
    assert next_pow2(2**40 + 1) == triton.next_power_of_2(2**40 + 1) == 2**41
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 200) for b in range(1, 70))
