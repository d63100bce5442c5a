"""The eager shortcut (vdit_kernels.ops.direct): the same results and gradients as the
registered ops, taken only where nothing could tell the difference."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vdit_kernels as vk
from vdit_kernels.ops import direct

from conftest import CUDA_BACKEND, device_for

SHAPES = [(2, 4, 6), (1, 2, 2), (3, 2, 4)]


def _calls(backend):
    """name -> (fn() -> outputs, leaves): each differentiable public function on a small
    pack, float32, inputs freshly made (same seed) at each call."""
    dev = device_for(backend)
    torch.manual_seed(0)
    pack = vk.VideoPack.from_shapes(SHAPES, (1, 2, 2), device=dev)
    n = pack.num_tokens
    videos = [torch.randn(3, *s, device=dev, requires_grad=True) for s in SHAPES]
    tokens = torch.randn(n, 12, device=dev, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(8, 3, 1, 2, 2, device=dev))
    bias = torch.randn(8, device=dev, requires_grad=True)
    x = torch.randn(n, 8, device=dev, requires_grad=True)
    out_w, out_b = torch.randn(12, 8, device=dev, requires_grad=True), torch.randn(12, device=dev, requires_grad=True)
    q, k, v = (torch.randn(n, 2, 16, device=dev, requires_grad=True) for _ in range(3))
    rope = vk.Rope3D.from_pack(pack, (4, 6, 6))
    return {
        "patchify": (lambda: vk.patchify(videos, pack, backend=backend), videos),
        "unpatchify": (lambda: vk.unpatchify(tokens, pack, 3, backend=backend), [tokens]),
        "patch_embed": (lambda: vk.patch_embed(videos, pack, weight, bias, backend=backend), [*videos, weight, bias]),
        "linear_unpatchify": (lambda: vk.linear_unpatchify(x, pack, out_w, out_b, 3, backend=backend),
                              [x, out_w, out_b]),
        "rope": (lambda: vk.apply_rope_3d(q, k, pack, (4, 6, 6), backend=backend), [q, k]),
        "attention": (lambda: vk.varlen_attention(q, k, v, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen,
                                                  pack.max_seqlen, rope=rope, return_lse=True, backend=backend),
                      [q, k, v]),
    }


def _run(fn, leaves):
    """(outputs, gradients of the leaves) for a loss touching every output."""
    out = fn()
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    torch.manual_seed(1)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], grads, out


# what runs the direct route's backward: our autograd.Function, or, for the ops the CUDA
# backend offers with a C++ autograd formula (ops/direct.py's `native`), that formula's node
NATIVE_NODES = {("cuda", "patch_embed"): "PatchEmbedFunction", ("cuda", "linear_unpatchify"): "LinearUnpatchifyFunction"}


@pytest.mark.parametrize("backend", ["reference", "triton", CUDA_BACKEND])
@pytest.mark.parametrize("name", ["patchify", "unpatchify", "patch_embed", "linear_unpatchify", "rope", "attention"])
def test_direct_route_matches_the_registered_op(backend, name, monkeypatch):
    if backend not in vk.available_backends({"rope": "rope", "attention": "attention"}.get(name, "patch"),
                                            device_for(backend).type):
        pytest.skip(f"{backend} unavailable here")
    fn, leaves = _calls(backend)[name]
    outs_direct, grads_direct, out = _run(fn, leaves)
    first = out if isinstance(out, torch.Tensor) else out[0]
    native = NATIVE_NODES.get((backend, name))
    if native:
        assert native in first.grad_fn.name()  # the C++ formula ran
    else:
        assert type(first.grad_fn).__name__ == "_DirectBackward"  # the shortcut ran
    monkeypatch.setattr(direct, "ENABLED", False)
    fn, leaves = _calls(backend)[name]
    outs_op, grads_op, out = _run(fn, leaves)
    first = out if isinstance(out, torch.Tensor) else out[0]
    assert type(first.grad_fn).__name__ != "_DirectBackward"  # the registered op's autograd
    assert not native or native not in first.grad_fn.name()
    # the same functions run either way: bit for bit
    for a, b in zip(outs_direct + list(grads_direct), outs_op + list(grads_op)):
        assert torch.equal(a, b)


def test_no_grad_calls_skip_autograd_and_match(monkeypatch):
    fn, _ = _calls("reference")["patch_embed"]
    applied = []
    apply = direct._Direct.apply
    monkeypatch.setattr(direct._Direct, "apply", lambda *a: applied.append(1) or apply(*a))
    with torch.no_grad():
        out = fn()
    # not through the autograd Function at all (it would save tensors no backward reads)
    assert out.grad_fn is None and not out.requires_grad and applied == []
    assert torch.equal(out, fn().detach()) and applied == [1]


def test_fake_tensors_go_through_the_op():
    # a dispatch mode is active: the shortcut would run real code on fake tensors
    pack = vk.VideoPack.from_shapes(SHAPES, (1, 2, 2))
    with FakeTensorMode():
        videos = [torch.empty(3, *s) for s in SHAPES]
        assert not direct.direct_ok(videos)
        out = vk.patchify(videos, pack, backend="reference")
    assert out.shape == (pack.num_tokens, 12)


def test_direct_ok_refuses_subclasses_and_transforms():
    t = torch.randn(3)
    assert direct.direct_ok([t, torch.nn.Parameter(torch.randn(2))])

    class Sub(torch.Tensor):
        pass
    assert not direct.direct_ok([t, t.as_subclass(Sub)])
    seen = []
    torch.func.vmap(lambda r: seen.append(direct.direct_ok([r])) or r)(torch.randn(2, 3))
    assert seen == [False]
    # torch.jit.trace records ops: the direct route would leave the op out of the trace
    torch.jit.trace(lambda r: seen.append(direct.direct_ok([r])) or r * 2, (t,), check_trace=False)
    assert seen == [False, False]


def test_traced_patchify_records_the_op():
    pack = vk.VideoPack.from_shapes(SHAPES, (1, 2, 2))
    videos = [torch.randn(2, *s) for s in pack.shapes]
    traced = torch.jit.trace(lambda *v: vk.patchify(list(v), pack, backend="reference"), tuple(videos))
    assert "vdit::patchify" in str(traced.graph)
    other = [torch.randn(2, *s) for s in pack.shapes]
    assert torch.equal(traced(*other), vk.patchify(other, pack, backend="reference"))


@pytest.mark.parametrize("direct_route", [True, False])
def test_forward_mode_ad_is_refused_on_both_routes(direct_route, monkeypatch):
    # no forward-mode formula: the registered op gave a dual input's tangent as None
    # without a word, the direct route the right one on the reference backend only
    from torch.autograd import forward_ad as fwad

    monkeypatch.setattr(direct, "ENABLED", direct_route)
    pack = vk.VideoPack.from_shapes(SHAPES, (1, 2, 2))
    q = torch.randn(pack.num_tokens, 2, 12)
    with fwad.dual_level():
        dual = fwad.make_dual(q, torch.randn_like(q))
        with pytest.raises(NotImplementedError, match="vdit::rope_3d: forward-mode AD"):
            vk.apply_rope_3d(dual, q, pack, (4, 4, 4), backend="reference")
        vk.apply_rope_3d(q, q, pack, (4, 4, 4), backend="reference")  # no dual input: fine


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("direct_route", [True, False])
def test_inplace_rope_still_bumps_the_version_counter(backend, direct_route, monkeypatch):
    # q is saved by the matmul for w's gradient; rotating it in place must make that
    # backward fail loudly (as the registered op's mutates_args do), not use the rotated
    # q; the Triton kernel writes through pointers, which alone bump nothing
    # (on a GPU the triton case runs CUDA tensors, device_for: it was skipped there on CPU ones)
    dev = device_for(backend)
    if backend not in vk.available_backends("rope", dev.type):
        pytest.skip(f"{backend} unavailable here")
    monkeypatch.setattr(direct, "ENABLED", direct_route)
    pack = vk.VideoPack.from_shapes(SHAPES, (1, 2, 2), device=dev)
    n = pack.num_tokens
    w = torch.randn(16, 16, device=dev, requires_grad=True)
    q = torch.randn(n, 2, 16, device=dev)
    k = torch.randn(n, 2, 16, device=dev)
    expected = vk.apply_rope_3d(q, k, pack, (4, 6, 6), backend="reference")
    loss = (q @ w).sum()
    versions = q._version, k._version
    vk.apply_rope_3d(q, k, pack, (4, 6, 6), inplace=True, backend=backend)
    assert q._version > versions[0] and k._version > versions[1]
    torch.testing.assert_close((q, k), expected)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_mutating_ops_direct_call_bumps_what_it_mutates(monkeypatch):
    # an op whose body writes through .data (as a kernel writes through pointers: no
    # version bump of its own): call() runs the body directly and bumps x's version, not y's
    def add_one_(x: torch.Tensor, y: torch.Tensor) -> None:
        x.data.add_(y)
    op = direct.define_mutating("vdit_test::add_one_", add_one_, mutates_args=("x",))
    x, y = torch.zeros(3), torch.ones(3)
    versions = x._version, y._version
    for enabled in (True, False):
        monkeypatch.setattr(direct, "ENABLED", enabled)
        assert direct.call(op, x, y) is None
    assert x.tolist() == [2.0, 2.0, 2.0]
    assert x._version >= versions[0] + 2 and y._version == versions[1]


def test_inplace_rope_takes_the_direct_route_in_eager_code(monkeypatch):
    # eager in-place RoPE skips the custom op's dispatch (half its host time), and still
    # refuses q and k that share an element
    from vdit_kernels.ops import rope as rope_ops

    pack = vk.VideoPack.from_shapes(SHAPES, (1, 2, 2))
    n = pack.num_tokens
    q, k = torch.randn(n, 2, 16), torch.randn(n, 2, 16)
    called = []
    op = rope_ops.rope_3d_inplace_op
    spy = lambda *a: called.append(a) or op(*a)  # noqa: E731  (the op, counted)
    monkeypatch.setattr(rope_ops, "rope_3d_inplace_op", spy)
    monkeypatch.setitem(direct._MUTATING, spy, direct._MUTATING[op])
    vk.apply_rope_3d(q, k, pack, (4, 6, 6), inplace=True, backend="reference")
    assert not called
    monkeypatch.setattr(direct, "ENABLED", False)
    vk.apply_rope_3d(q, k, pack, (4, 6, 6), inplace=True, backend="reference")
    assert len(called) == 1
    monkeypatch.setattr(direct, "ENABLED", True)
    with pytest.raises(ValueError, match="inplace RoPE: q and k may share elements"):
        vk.apply_rope_3d(q, q, pack, (4, 6, 6), inplace=True, backend="reference")


def _cuda_build() -> bool:
    from vdit_kernels import backend as B
    return B.extension() is not None and B.extension_has_cuda()


@pytest.mark.skipif(not _cuda_build(), reason="vdit_kernels._C was built without CUDA")
@pytest.mark.parametrize("name", ["patch_embed", "linear_unpatchify"])
def test_native_route_matches_the_registered_op_on_cpu(name, monkeypatch):
    # The CUDA backend's C++ ops also take CPU tensors (ATen copies for the gather), so the
    # native route is checked here without a GPU: call() with backend "cuda" (what
    # resolve() picks on a GPU) runs the C++ autograd formula, and the registered op, its
    # Python formula over the same C++ functions, gives the same bits
    from vdit_kernels.ops import patch as patch_ops
    torch.manual_seed(0)
    pack = vk.VideoPack.from_shapes(SHAPES, (1, 2, 2))
    shapes = [s for shape in SHAPES for s in shape]

    def inputs():
        g = torch.Generator().manual_seed(0)
        leaf = lambda *shape: torch.randn(*shape, generator=g).requires_grad_(True)
        if name == "patch_embed":
            videos = [leaf(3, *s) for s in SHAPES]
            weight, bias = leaf(8, 3, 1, 2, 2), leaf(8)
            return (videos, weight, bias, "cuda"), [*videos, weight, bias]
        x, weight, bias = leaf(pack.num_tokens, 8), leaf(12, 8), leaf(12)
        return (x, weight, bias, shapes, [1, 2, 2], 3, "cuda"), [x, weight, bias]
    op = {"patch_embed": patch_ops.patch_embed_op, "linear_unpatchify": patch_ops.linear_unpatchify_op}[name]
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(direct, "ENABLED", enabled)
        args, leaves = inputs()
        outs, grads, out = _run(lambda: direct.call(op, *args), leaves)
        first = out if isinstance(out, torch.Tensor) else out[0]
        node = NATIVE_NODES[("cuda", name)]
        assert (node in first.grad_fn.name()) == enabled
        results.append(outs + list(grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)
