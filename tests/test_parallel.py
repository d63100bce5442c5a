"""Sequence parallelism: merge_attention, and the sharded attention schemes on 2, 3 and 4
gloo processes (CPU): Ulysses, all-gather, ring, cross-attention, and Ulysses x ring (USP).

merge_attention: keys of every segment are cut into 2-3 parts at random points (some
parts empty for some segments, one segment without keys at all); the merged partial
results must equal attention over all keys, values and gradients.

Ulysses: one spawn of 2 CPU processes (gloo, a file store in tmp) runs every case and
saves each rank's shard results; the tests gather them and compare with single-process
varlen_attention(backend="reference") on the whole pack. The pack has N = 39 tokens (a
padding row on rank 1) and the shard boundary (token 20) cuts video 1. Reference cases
run in float64 (tolerance of the table), Triton cases (the interpreter on CPU, in the
workers) in float32 against the float32 reference, 1e-4 as in test_attention_triton.
"""
import contextlib
import os
import warnings
from datetime import timedelta
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TOLERANCES, assert_verbose_close, device_for

import vdit_kernels as vk
from vdit_kernels import reference as ref
from vdit_kernels.ops import attention as attn_ops

# -- merge_attention ---------------------------------------------------------------------

LENS_Q = [7, 12, 1, 5]
LENS_K = [9, 16, 3, 0]  # segment 3 has no keys: every part is empty there


def _cu(lengths, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _split_keys(k, v, lens_k, parts, seed):
    """Cut each key segment into `parts` pieces at random points; part 0 of segment 0 is
    empty. Returns per part (k, v, cu_seqlens_k, max_seqlen_k)."""
    g = torch.Generator().manual_seed(seed)
    cuts = []
    for i, n in enumerate(lens_k):
        c = sorted(torch.randint(0, n + 1, (parts - 1,), generator=g).tolist())
        if i == 0:
            c[0] = 0
        cuts.append([0] + c + [n])
    starts = _cu(lens_k).tolist()
    out = []
    for j in range(parts):
        rows = [torch.arange(starts[i] + cuts[i][j], starts[i] + cuts[i][j + 1])
                for i in range(len(lens_k))]
        lens = [len(r) for r in rows]
        idx = torch.cat(rows).to(k.device)
        out.append((k[idx], v[idx], _cu(lens, k.device), max(max(lens), 1)))
    return out


def _merge_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, hk, d = 4, 2, 16
    q = torch.randn(sum(LENS_Q), h, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(sum(LENS_K), hk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(sum(LENS_K), hk, d, generator=g, dtype=torch.float64).to(dtype)
    do = torch.randn(sum(LENS_Q), h, d, generator=g, dtype=torch.float64).to(dtype)
    dlse = torch.randn(h, sum(LENS_Q), generator=g, dtype=torch.float64)
    return q, k, v, do, dlse


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_merge_attention_matches_full(dtype, parts):
    q, k, v, _, _ = _merge_inputs(dtype, seed=parts)
    cu_q = _cu(LENS_Q)
    exp_out, exp_lse = vk.varlen_attention(q, k, v, cu_q, _cu(LENS_K), max(LENS_Q), max(LENS_K),
                                           return_lse=True, backend="reference")
    results = [vk.varlen_attention(q, kp, vp, cu_q, cu_k, max(LENS_Q), mk, return_lse=True,
                                   backend="reference")
               for kp, vp, cu_k, mk in _split_keys(k, v, LENS_K, parts, seed=parts)]
    out, lse = vk.merge_attention([r[0] for r in results], [r[1] for r in results])
    assert out.dtype == dtype and lse.dtype == exp_lse.dtype
    assert_verbose_close(out, exp_out, name="out")
    assert_verbose_close(lse, exp_lse, name="lse")
    empty = slice(sum(LENS_Q[:3]), sum(LENS_Q))  # the segment without keys
    assert torch.all(out[empty] == 0) and torch.all(lse[:, empty] == float("-inf"))


def _loss(out, lse, do, dlse):
    # lse enters the loss too (finite rows only), so the merge's lse path is checked
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out * do).sum() + (lse * dlse.to(lse.dtype)).sum()


@pytest.mark.parametrize("parts", [2, 3])
def test_merge_attention_gradients(parts):
    # float64; the partial results come from reference.varlen_attention, which is
    q, k, v, do, dlse = _merge_inputs(torch.float64, seed=10 + parts)
    cu_q = _cu(LENS_Q)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = ref.varlen_attention(*leaves, cu_q, _cu(LENS_K), max(LENS_Q), max(LENS_K),
                                    return_lse=True)
    expected = torch.autograd.grad(_loss(out, lse, do, dlse), leaves)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    qq, kk, vv = leaves
    results = [ref.varlen_attention(qq, kp, vp, cu_q, cu_k, max(LENS_Q), mk, return_lse=True)
               for kp, vp, cu_k, mk in _split_keys(kk, vv, LENS_K, parts, seed=parts)]
    out, lse = vk.merge_attention([r[0] for r in results], [r[1] for r in results])
    grads = torch.autograd.grad(_loss(out, lse, do, dlse), leaves)
    for name, a, e in zip(("dq", "dk", "dv"), grads, expected):
        assert torch.isfinite(a).all(), name
        assert_verbose_close(a, e, name=name)


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float64), ("triton", torch.float32)])
def test_merge_attention_gradients_through_varlen_attention(backend, dtype):
    # varlen_attention is differentiable through its lse: merged partials have exact grads
    device = device_for(backend)
    q, k, v, do, dlse = (t.to(device) for t in _merge_inputs(dtype))
    cu_q = _cu(LENS_Q, device)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = vk.varlen_attention(*leaves, cu_q, _cu(LENS_K, device), max(LENS_Q), max(LENS_K),
                                   return_lse=True, backend="reference")
    expected = torch.autograd.grad(_loss(out, lse, do, dlse), leaves)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    results = [vk.varlen_attention(leaves[0], kp, vp, cu_q, cu_k, max(LENS_Q), mk,
                                   return_lse=True, backend=backend)
               for kp, vp, cu_k, mk in _split_keys(leaves[1], leaves[2], LENS_K, 3, seed=0)]
    out, lse = vk.merge_attention([r[0] for r in results], [r[1] for r in results])
    grads = torch.autograd.grad(_loss(out, lse, do, dlse), leaves)
    # lse is float32 in every dtype, and the backward recomputes P from it
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    for name, a, e in zip(("dq", "dk", "dv"), grads, expected):
        assert_verbose_close(a, e, name=name, **tol)


def test_merge_attention_empty_rows_and_dtypes():
    # every part empty for every row: out 0, lse -inf, finite (zero) gradients
    o = torch.randn(3, 2, 4, dtype=torch.bfloat16, requires_grad=True)
    lse = torch.full((2, 3), float("-inf"), requires_grad=True)
    out, merged = vk.merge_attention([o, o], [lse, lse])
    assert out.dtype == torch.bfloat16 and merged.dtype == torch.float32
    assert torch.all(out == 0) and torch.all(merged == float("-inf"))
    out.float().sum().backward()
    assert torch.all(o.grad == 0) and torch.all(lse.grad == 0)
    with pytest.raises(ValueError, match=r"lses\[1\]"):
        vk.merge_attention([o, o], [lse, lse.t()])
    # parts of other dtypes or devices are named, never rounded to the first's dtype
    o64, lse64 = o.detach().double(), lse.detach().double()
    with pytest.raises(ValueError, match=r"outs\[1\] has dtype torch.float64"):
        vk.merge_attention([o, o64], [lse, lse])
    with pytest.raises(ValueError, match=r"lses\[1\] has dtype torch.float64"):
        vk.merge_attention([o, o], [lse, lse64])
    meta_o, meta_lse = o.detach().to("meta"), lse.detach().to("meta")
    with pytest.raises(ValueError, match=r"outs\[1\] is on meta"):
        vk.merge_attention([o, meta_o], [lse, meta_lse])
    with pytest.raises(ValueError, match=r"lses\[0\] is on cpu but lses\[1\] is on meta"):
        vk.merge_attention([o, o], [lse, meta_lse])
    with pytest.raises(ValueError, match=r"lses\[0\] is on meta but outs\[0\] is on cpu"):
        vk.merge_attention([o, o], [meta_lse, meta_lse])


# -- Ulysses on 2 processes --------------------------------------------------------------

WORLD = 2
SHAPES = [(3, 4, 6), (1, 6, 4), (5, 2, 6)]  # 18 + 6 + 15 = 39 tokens, patch (1, 2, 2)
TEXT = [5, 0, 7]                            # video 1 has no text tokens
D = 16
# (name, backend, dtype, q heads, kv heads, rope)
CASES = [
    ("reference-mha", "reference", torch.float64, 4, 4, False),
    ("reference-gqa-rope", "reference", torch.float64, 4, 2, True),
    ("triton-gqa", "triton", torch.float32, 4, 2, False),
    ("triton-mha-rope", "triton", torch.float32, 4, 4, True),
    # 3 heads: not divisible by the world size, all-gather only (Ulysses rejects it)
    ("reference-3heads-rope", "reference", torch.float64, 3, 3, True),
    # one kv head for 2 ranks: Ulysses replicates it (GQA with fewer kv heads than ranks)
    ("reference-1kv-rope", "reference", torch.float64, 4, 1, True),
]


def _ulysses_ok(index, size=WORLD):
    _, _, _, h, hk, _ = CASES[index]
    return h % size == 0 and (hk % size == 0 or size % hk == 0)


def _pack():
    return vk.VideoPack.from_shapes(SHAPES, patch_size=(1, 2, 2), text_lengths=TEXT)


def _case_inputs(index):
    """Whole-pack tensors of one case, identical on every process."""
    _, _, dtype, h, hk, use_rope = CASES[index]
    pack = _pack()
    g = torch.Generator().manual_seed(100 + index)
    n, nt = pack.num_tokens, pack.num_text_tokens
    sizes = dict(q=(n, h, D), k=(n, hk, D), v=(n, hk, D), do=(n, h, D),
                 kt=(nt, hk, D), vt=(nt, hk, D), dlse_t=(n, h))  # dlse_t: d loss / d lse^T
    x = {name: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
         for name, s in sizes.items()}
    x["dlse_t"] = x["dlse_t"].float()
    rope = vk.Rope3D.from_pack(pack, dims=(4, 6, 6), theta=500.0) if use_rope else None
    return pack, x, rope


def _run_cases(rank):
    """Every case on this rank: each scheme's shard results and gradients, and the
    cross-attention's."""
    results = {}
    for index, (name, backend, *_) in enumerate(CASES):
        pack, x, rope = _case_inputs(index)
        local = {k: vk.shard_pack(t, WORLD, rank) for k, t in x.items() if k not in ("kt", "vt")}
        r = {}
        for prefix, attention in (("", vk.ulysses_varlen_attention),
                                  ("ag_", vk.allgather_varlen_attention),
                                  ("ring_", vk.ring_varlen_attention)):
            if prefix == "" and not _ulysses_ok(index):
                continue
            q, k, v = (local[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
            out, lse = attention(q, k, v, pack.cu_seqlens, pack.max_seqlen, rope=rope,
                                 return_lse=True, backend=backend)
            # the loss reads lse too, so its gradient path through the collectives is checked
            ((out * local["do"]).sum() + (lse * local["dlse_t"].t()).sum()).backward()
            r.update({prefix + "out": out.detach(), prefix + "lse": lse.detach(),
                      prefix + "dq": q.grad, prefix + "dk": k.grad, prefix + "dv": v.grad,
                      prefix + "gathered": vk.gather_pack(out, pack.num_tokens)})
        # cross-attention from the query shard to all (replicated) text tokens
        q = local["q"].clone().requires_grad_(True)
        kt, vt = (x[n].clone().requires_grad_(True) for n in ("kt", "vt"))
        out, lse = vk.local_cross_attention(q, kt, vt, pack.cu_seqlens, pack.cu_seqlens_k,
                                            pack.max_seqlen, pack.max_seqlen_k,
                                            return_lse=True, backend=backend)
        out.backward(local["do"])
        r.update(x_out=out.detach(), x_lse=lse.detach(), x_dq=q.grad, x_dk=kt.grad,
                 x_dv=vt.grad)
        results[name] = r
    return results


def _worker(rank, store, out_dir):
    # the workers run CPU tensors on gloo (one GPU cannot host two NCCL ranks), so their
    # Triton kernels run under the interpreter: _spawn sets TRITON_INTERPRET=1 in the
    # environment the workers start with, before they import triton
    torch.set_num_threads(1)
    # an exception here reaches the parent with its traceback (mp.spawn, below)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    # deprecation warnings of torch.distributed (a user would see them on every call)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        results = _run_cases(rank)
    results["warnings"] = sorted({str(w.message) for w in records
                                  if issubclass(w.category, (FutureWarning, DeprecationWarning))
                                  and "torch.distributed" in str(w.message)})
    pack = _pack()
    results["errors"] = _value_errors(
        [lambda h=h, hk=hk: vk.ulysses_varlen_attention(torch.zeros(20, h, D), torch.zeros(20, hk, D),
                                                        torch.zeros(20, hk, D), pack.cu_seqlens, pack.max_seqlen)
         for h, hk in ((3, 3), (6, 3))])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _value_errors(calls) -> list:
    """Per call: None where it returned, the message of the ValueError it raised."""
    errors = []
    for call in calls:
        try:
            call()
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def _spawn(worker, tmp, nprocs):
    """mp.spawn with TRITON_INTERPRET=1 in the workers' environment from their start (also
    on a GPU host, where this process runs Triton compiled and must keep doing so): set
    inside a worker, after its imports, it came too late on the H100 machine (Triton's own
    jit helpers, e.g. tl.zeros, were already compiled-mode functions). Gloo connects the
    ranks over loopback (GLOO_SOCKET_IFNAME=lo unless set): by default it binds the
    address the host name resolves to, which a sandboxed machine may not route (a
    suspect for the fixture errors of the second H100 run)."""
    env = {"TRITON_INTERPRET": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    with mock.patch.dict(os.environ, env):
        mp.spawn(worker, args=(str(tmp / "store"), str(tmp)), nprocs=nprocs, join=True)


def _spawned_runs(tmp_path_factory, name: str, worker, nprocs: int) -> list:
    """Each rank's saved results of one spawn of `worker` on `nprocs` processes. (join=True
    raises ProcessRaisedException with the worker's traceback and stops the other workers,
    so a failure cannot hang in a collective.)"""
    tmp = tmp_path_factory.mktemp(name)
    _spawn(worker, tmp, nprocs)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(nprocs)]


@pytest.fixture(scope="module")
def ulysses_runs(tmp_path_factory):
    return _spawned_runs(tmp_path_factory, "ulysses", _worker, WORLD)


def _gather(runs, key, n, dim=0):
    return torch.cat([run[key] for run in runs], dim=dim).narrow(dim, 0, n)


def _tol(index):
    return (1e-4, 1e-4) if CASES[index][1] == "triton" else TOLERANCES[CASES[index][2]]


def _assert_gathered_match(runs, index, atol, rtol):
    """The ranks' shards of out, lse, dq, dk, dv gathered equal single-process attention
    (_expected) on case `index`; returns the pack's token count."""
    pack, out, lse, dq, dk, dv = _expected(index)
    n = pack.num_tokens
    assert_verbose_close(_gather(runs, "lse", n, dim=1), lse.to(runs[0]["lse"].dtype), atol, rtol, name="lse")
    for key, e in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert_verbose_close(_gather(runs, key, n), e, atol, rtol, name=key)
    return n


def _expected(index, cross=False):
    """Single-process reference attention on the whole pack: out, lse, dq, dk, dv."""
    backend = "reference"
    pack, x, rope = _case_inputs(index)
    q = x["q"].clone().requires_grad_(True)
    k, v = (x["kt"], x["vt"]) if cross else (x["k"], x["v"])
    k, v = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
    if cross:
        out, lse = vk.varlen_attention(q, k, v, pack.cu_seqlens, pack.cu_seqlens_k,
                                       pack.max_seqlen, pack.max_seqlen_k, return_lse=True,
                                       backend=backend)
    else:
        out, lse = vk.varlen_attention(q, k, v, pack.cu_seqlens, pack.cu_seqlens,
                                       pack.max_seqlen, pack.max_seqlen, rope=rope,
                                       return_lse=True, backend=backend)
    loss = (out * x["do"]).sum()
    if not cross:  # the Ulysses workers' loss reads lse as well
        loss = loss + (lse * x["dlse_t"].t()).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return pack, out.detach(), lse.detach(), dq, dk, dv


@pytest.mark.parametrize("scheme", ["ulysses", "allgather", "ring"])
@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_sequence_parallel_matches_single_process(ulysses_runs, index, scheme):
    name, _, dtype, *_ = CASES[index]
    if scheme == "ulysses" and not _ulysses_ok(index):
        pytest.skip("Ulysses needs heads divisible by the world size (see the next test)")
    prefix = {"ulysses": "", "allgather": "ag_", "ring": "ring_"}[scheme]
    runs = [{key[len(prefix):]: val for key, val in run[name].items() if key.startswith(prefix)}
            for run in ulysses_runs]
    h = CASES[index][3]
    assert runs[0]["out"].shape == (20, h, D) and runs[0]["lse"].shape == (h, 20)
    assert runs[0]["out"].dtype == dtype
    n = _assert_gathered_match(runs, index, *_tol(index))
    for run in runs:  # gather_pack: the whole output on every rank
        assert torch.equal(run["gathered"], _gather(runs, "out", n))
    # the padding row (token 39, on rank 1) gets no gradient from the zero upstream gradient
    assert torch.all(runs[1]["dq"][n - 20:] == 0)


def test_collectives_raise_no_deprecation_warning(ulysses_runs):
    # torch 2.14 deprecates all_gather_into_tensor and reduce_scatter_tensor (a FutureWarning
    # on every call); the schemes use all_gather_single / reduce_scatter_single where torch
    # has them
    for run in ulysses_runs:
        assert run["warnings"] == []


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_local_cross_attention(ulysses_runs, index):
    name = CASES[index][0]
    runs = [run[name] for run in ulysses_runs]
    pack, out, lse, dq, dk, dv = _expected(index, cross=True)
    n = pack.num_tokens
    atol, rtol = _tol(index)
    assert_verbose_close(_gather(runs, "x_out", n), out, atol, rtol, name="out")
    assert_verbose_close(_gather(runs, "x_lse", n, dim=1), lse.to(runs[0]["x_lse"].dtype),
                         atol, rtol, name="lse")
    assert_verbose_close(_gather(runs, "x_dq", n), dq, atol, rtol, name="dq")
    # replicated text keys: each rank holds its share of their gradients; the sum is exact
    assert_verbose_close(runs[0]["x_dk"] + runs[1]["x_dk"], dk, atol, rtol, name="dk")
    assert_verbose_close(runs[0]["x_dv"] + runs[1]["x_dv"], dv, atol, rtol, name="dv")
    # the padding row and video 1 (no text) get out 0 and lse -inf
    assert torch.all(runs[1]["x_out"][n - 20:] == 0)
    assert torch.all(runs[1]["x_lse"][:, n - 20:] == float("-inf"))


def test_ulysses_heads_not_divisible(ulysses_runs):
    for run in ulysses_runs:
        q_error, k_error = run["errors"]
        assert q_error is not None and "q_local has 3 heads" in q_error
        assert "world size 2" in q_error
        assert k_error is not None and "k_local has 3 heads" in k_error


def test_single_process_is_plain_attention():
    # torch.distributed not initialized: P = 1, the same as varlen_attention
    pack, x, rope = _case_inputs(1)
    for call, message in ((lambda: vk.shard_pack([1, 2], 2, 0), "x must be a tensor"),
                          (lambda: vk.gather_pack([1], 1), "x_local must be a tensor")):
        with pytest.raises(TypeError, match=message):
            call()
    out = vk.ulysses_varlen_attention(x["q"], x["k"], x["v"], pack.cu_seqlens, pack.max_seqlen,
                                      rope=rope, backend="reference")
    exp = vk.varlen_attention(x["q"], x["k"], x["v"], pack.cu_seqlens, pack.cu_seqlens,
                              pack.max_seqlen, pack.max_seqlen, rope=rope, backend="reference")
    assert_verbose_close(out, exp, name="out")
    assert torch.equal(vk.shard_pack(x["q"], 1, 0), x["q"])
    assert vk.shard_pack(x["q"], 4, 3).shape[0] == 10  # ceil(39 / 4), the last row is padding
    assert torch.all(vk.shard_pack(x["q"], 4, 3)[-1] == 0)
    masks = [vk.shard_mask(39, 4, r) for r in range(4)]
    assert [m.tolist() for m in masks[2:]] == [[True] * 10, [True] * 9 + [False]]
    assert torch.equal(torch.cat(masks)[:39], torch.ones(39, dtype=torch.bool))
    assert not vk.shard_mask(5, 4, 3).any()  # ceil(5 / 4) = 2 rows a rank: rank 3 holds only padding


SP_SCHEMES = {"ulysses": vk.ulysses_varlen_attention, "allgather": vk.allgather_varlen_attention,
              "ring": vk.ring_varlen_attention, "usp": vk.usp_varlen_attention}


@pytest.mark.parametrize("scheme", list(SP_SCHEMES))
def test_sequence_parallel_checks_its_arguments(scheme):
    # as varlen_attention: the ring and USP once called the op directly and accepted a
    # too-small max_seqlen (a wrong result on the GPU kernels), decreasing offsets, int64
    # or mixed dtypes; every scheme accepted offsets covering only part of the tokens
    attention = SP_SCHEMES[scheme]
    pack = vk.VideoPack.from_shapes([(4, 4, 8)])  # one video of 32 tokens
    n, cu, m = pack.num_tokens, pack.cu_seqlens, pack.max_seqlen
    q, k, v = (torch.randn(n, 2, 16) for _ in range(3))
    bad = {"max_seqlen 1 is smaller": (q, k, v, cu, 1),
           "must be non-decreasing": (q, k, v, torch.tensor([0, 20, 10, n], dtype=torch.int32), n),
           "ends at 5 but there are 32 tokens": (q, k, v, torch.tensor([0, 5], dtype=torch.int32), m),
           "cu_seqlens must be int32": (q, k, v, cu.long(), m),
           "max_seqlen \\(for cu_seqlens\\) must be a non-negative int": (q, k, v, cu, 1.5),
           "q_local must be float16": (q.long(), k.long(), v.long(), cu, m),
           "k_local has dtype torch.float64": (q, k.double(), v.double(), cu, m),
           r"k_local/v_local heads \(3\) must divide q_local heads \(2\)":
               (q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu, m)}
    for message, args in bad.items():
        with pytest.raises(ValueError, match=message):
            attention(*args, backend="reference")
    with pytest.raises(ValueError, match="softmax_scale"):
        attention(q, k, v, cu, m, softmax_scale=-1.0, backend="reference")
    # objects not of their kind: TypeError, as varlen_attention's
    with pytest.raises(TypeError, match="rope must be a Rope3D, got str"):
        attention(q, k, v, cu, m, rope="r", backend="reference")
    # a Rope3D passed positionally lands in the group's place: named, not an AttributeError
    # from inside torch.distributed
    rope = vk.Rope3D.from_pack(pack, (4, 6, 6))
    group_name = "ulysses_group" if scheme == "usp" else "group"
    with pytest.raises(TypeError, match=f"{group_name} must be a torch.distributed ProcessGroup or None, "
                                        "got Rope3D"):
        attention(q, k, v, cu, m, rope, backend="reference")


def test_sharding_helpers_check_their_arguments():
    x = torch.randn(7, 2)
    for call, message in ((lambda: vk.shard_mask(-3, 2, 0), "num_tokens must be a non-negative int"),
                          (lambda: vk.shard_pack(x, 2.0, 0), "world_size must be a positive int"),
                          (lambda: vk.shard_pack(x, 2, 2), r"rank 2 is not an int in \[0, world_size=2\)"),
                          (lambda: vk.shard_mask(7, 2, True), "rank True"),
                          (lambda: vk.shard_pack(x.tolist(), 2, 0), "x must be a tensor"),
                          (lambda: vk.merge_attention([None], [None]), "outs.0. must be a tensor"),
                          # one process: the shard is the pack, no rows to drop or padding to keep
                          (lambda: vk.gather_pack(x, -1), "num_tokens must be the pack's token count"),
                          (lambda: vk.gather_pack(x, 6), r"between 7 and 7, got 6"),
                          (lambda: vk.gather_pack(x, 8), r"between 7 and 7, got 8"),
                          (lambda: vk.gather_pack(x, 7.0), "got 7.0"),
                          (lambda: vk.gather_pack(x, 7, 2), "group must be a torch.distributed ProcessGroup"),
                          (lambda: vk.SequenceParallel("ring", 2), "group must be a torch.distributed"),
                          (lambda: vk.SequenceParallel("usp", None, 4), "ring_group must be a torch.distributed"),
                          (lambda: vk.usp_shard(None, 4), "ring_group must be a torch.distributed")):
        with pytest.raises((ValueError, TypeError), match=message):
            call()
    assert vk.shard_mask(7, 2, 1).tolist() == [True, True, True, False]
    assert torch.equal(vk.gather_pack(x, 7), x)


def test_sequence_parallel_offsets_may_stop_short_by_the_padding():
    # P shards of n rows hold N tokens with P*n - P < N <= P*n: the rest is shard_pack's padding
    from vdit_kernels.parallel import _checked_shards
    q = torch.randn(10, 2, 16)  # this rank's 10 rows, 4 shards: 40 rows, 37 to 40 tokens
    for tokens in (37, 40):
        _checked_shards(q, q, q, torch.tensor([0, 30, tokens], dtype=torch.int32), 30, 4)
    for tokens in (36, 41):
        with pytest.raises(ValueError, match="between 37 and 40 tokens"):
            _checked_shards(q, q, q, torch.tensor([0, 30, tokens], dtype=torch.int32), 30, 4)


def test_local_cross_attention_checks_its_offsets():
    pack = vk.VideoPack.from_shapes([(1, 4, 4), (1, 2, 4)], text_lengths=[3, 5])
    q = torch.randn(pack.num_tokens, 2, 8)
    kv = torch.randn(8, 2, 8)
    cu, cu_k = pack.cu_seqlens, pack.cu_seqlens_k
    args = (pack.max_seqlen, pack.max_seqlen_k)
    with pytest.raises(TypeError, match="cu_seqlens_q must be an int32 tensor"):
        vk.local_cross_attention(q, kv, kv, cu.tolist(), cu_k, *args)
    with pytest.raises(ValueError, match="cu_seqlens_k ends at 8 but there are 7 tokens"):
        vk.local_cross_attention(q, kv[:7], kv[:7], cu, cu_k, *args)
    with pytest.raises(ValueError, match="one segment per video"):
        vk.local_cross_attention(q, kv, kv, cu, torch.tensor([0, 8], dtype=torch.int32), pack.max_seqlen, 8)


# -- 3 processes: the ring's direction and the accumulators' way home ---------------------
# (with 2 ranks "previous" and "next" are the same rank, so only 3 can tell them apart)

def _worker3(rank, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3,
                            timeout=timedelta(seconds=60))
    results = {}
    for index in (0, 4):  # reference: 4 heads, and 3 heads with rope
        pack, x, rope = _case_inputs(index)
        local = {k: vk.shard_pack(t, 3, rank) for k, t in x.items() if k not in ("kt", "vt")}
        for scheme, attention in (("ring", vk.ring_varlen_attention),
                                  ("allgather", vk.allgather_varlen_attention)):
            q, k, v = (local[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
            out, lse = attention(q, k, v, pack.cu_seqlens, pack.max_seqlen, rope=rope,
                                 return_lse=True, backend="reference")
            ((out * local["do"]).sum() + (lse * local["dlse_t"].t()).sum()).backward()
            results[(index, scheme)] = dict(out=out.detach(), lse=lse.detach(), dq=q.grad,
                                            dk=k.grad, dv=v.grad)
    # an explicit group of ranks 1 and 2: group ranks differ from global ranks
    sub = dist.new_group([1, 2])
    if rank in (1, 2):
        pack, x, rope = _case_inputs(0)
        local = {k: vk.shard_pack(t, 2, rank - 1) for k, t in x.items() if k not in ("kt", "vt")}
        for scheme, attention in (("ring", vk.ring_varlen_attention),
                                  ("allgather", vk.allgather_varlen_attention),
                                  ("ulysses", vk.ulysses_varlen_attention)):
            q, k, v = (local[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
            out = attention(q, k, v, pack.cu_seqlens, pack.max_seqlen, group=sub, backend="reference")
            (out * local["do"]).sum().backward()
            results[("subgroup", scheme)] = dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def three_rank_runs(tmp_path_factory):
    return _spawned_runs(tmp_path_factory, "three_ranks", _worker3, 3)


@pytest.mark.parametrize("scheme", ["ring", "allgather"])
@pytest.mark.parametrize("index", [0, 4], ids=[CASES[0][0], CASES[4][0]])
def test_three_ranks(three_rank_runs, index, scheme):
    runs = [run[(index, scheme)] for run in three_rank_runs]
    assert runs[0]["out"].shape[0] == 13  # 39 = 3 x 13: no padding
    _assert_gathered_match(runs, index, 1e-6, 1e-6)


@pytest.mark.parametrize("scheme", ["ring", "allgather", "ulysses"])
def test_explicit_subgroup(three_rank_runs, scheme):
    # ranks 1 and 2 of 3 form the group: shards and peers follow the group's ranks
    runs = [run[("subgroup", scheme)] for run in three_rank_runs[1:]]
    pack, x, _ = _case_inputs(0)
    q, k, v = (x[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
    out = vk.varlen_attention(q, k, v, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen,
                              pack.max_seqlen, backend="reference")
    grads = torch.autograd.grad(out, (q, k, v), x["do"])
    n = pack.num_tokens
    for key, e in zip(("out", "dq", "dk", "dv"), (out.detach(), *grads)):
        assert_verbose_close(_gather(runs, key, n), e, 1e-6, 1e-6, name=key)


# -- 4 processes: Ulysses x ring (USP) ----------------------------------------------------
# U x R = 2 x 2 (both halves at work), 4 x 1 and 1 x 4 (each alone), on the pack of the
# 2-process cases (N = 39: n = 10, one padding row) and on a pack of five 1-token videos
# (N = 5: n = 2, three padding rows, more than a video's length and than R - 1: the ring
# over 2 super-shards must still bound the padding segment by P - 1)

TINY_SHAPES = [(1, 2, 2)] * 5
USP_LAYOUTS = [(2, 2), (4, 1), (1, 4)]  # (U, R)
# (case index, U x R layouts): kv heads fewer than U are replicated, case 1's 2 of 4 heads
# at U = 4 (each kv head twice, its q heads' own: the order of the replicas matters), case
# 5's one kv head at U = 2 and 4
USP_CASES = [(0, USP_LAYOUTS), (1, USP_LAYOUTS), (3, [(2, 2)]), (5, [(2, 2), (4, 1)])]


def _tiny_inputs():
    pack = vk.VideoPack.from_shapes(TINY_SHAPES, patch_size=(1, 2, 2))
    g = torch.Generator().manual_seed(7)
    x = {name: torch.randn(pack.num_tokens, 4, D, generator=g, dtype=torch.float64)
         for name in ("q", "k", "v", "do")}
    return pack, x


@contextlib.contextmanager
def _max_seqlen_audit():
    """Records every attention op call (forward or backward, from any scheme) whose
    max_seqlen is smaller than a segment of its cu_seqlens. The reference computes such a
    call correctly anyway; the GPU kernels size their grids by max_seqlen and would leave
    rows unwritten, so a scheme must pass a true bound. The public varlen_attention checks
    that on CPU tensors; the ring calls the ops directly."""
    too_long = []

    def audited(name, first):  # cu_q, cu_k, max_q, max_k at args[first:first + 4]
        op = getattr(attn_ops, name)

        def call(*args):
            for cu, bound in zip(args[first:first + 2], args[first + 2:first + 4]):
                longest = int((cu[1:] - cu[:-1]).max())
                if longest > bound:
                    too_long.append((name, longest, bound))
            return op(*args)
        return call

    with mock.patch.object(attn_ops, "varlen_attention_op", audited("varlen_attention_op", 3)), \
            mock.patch.object(attn_ops, "varlen_attention_backward_op", audited("varlen_attention_backward_op", 7)):
        yield too_long


def _dit():
    """The tiny video DiT with 4 heads (Ulysses over 4 ranks), float64, random weights, and
    its inputs: 19 tokens in 3 videos, so 4 shards of 5 with one padding row."""
    from vdit_kernels.model import DiTConfig, VideoDiT

    cfg = DiTConfig.from_name("tiny", heads=4, head_dim=12)
    g = torch.Generator().manual_seed(3)
    model = VideoDiT(cfg).init_weights(zero_init=False, generator=g).to(torch.float64)
    shapes = [(2, 4, 6), (1, 4, 4), (3, 2, 2)]
    pack = vk.VideoPack.from_shapes(shapes, cfg.patch_size, text_lengths=[3, 5, 0])
    latents = [torch.randn(cfg.in_channels, *sh, generator=g, dtype=torch.float64) for sh in shapes]
    text = torch.randn(pack.num_text_tokens, cfg.text_dim, generator=g, dtype=torch.float64)
    return model, (latents, pack, torch.tensor([10.0, 500.0, 999.0], dtype=torch.float64), text)


def _dit_step(model, inputs, sp=None):
    """Outputs, parameter gradients and latent gradients of one forward + backward of
    sum_i <out_i, w_i> (w: fixed random cotangents, the same loss on every rank)."""
    latents, pack, t, text = inputs
    latents = [x.clone().requires_grad_(True) for x in latents]
    model.zero_grad(set_to_none=True)
    out = model(latents, pack, t, text, backend="reference", sp=sp)
    g = torch.Generator().manual_seed(11)
    sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in out).backward()
    return ([o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters()},
            [x.grad for x in latents])


def _dit_layouts(groups):
    """(name, SequenceParallel, fused_rope) run by the 4 ranks."""
    usp = vk.SequenceParallel("usp", *groups[(2, 2)])
    return [("ulysses", vk.SequenceParallel("ulysses"), True),
            ("ulysses-unfused-rope", vk.SequenceParallel("ulysses"), False),
            ("allgather", vk.SequenceParallel("allgather"), True),
            ("ring", vk.SequenceParallel("ring"), True),
            ("usp-2x2", usp, True),
            ("usp-2x2-unfused-rope", usp, False),
            # blocks recomputed in the backward: their all-to-alls and ring passes run again
            ("usp-2x2-checkpointed", usp, True)]


def _worker4(rank, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=4,
                            timeout=timedelta(seconds=60))
    groups = {layout: vk.usp_groups(layout[0]) for layout in USP_LAYOUTS}  # every rank, same order
    results = {}
    for index, layouts in USP_CASES:
        backend = CASES[index][1]
        pack, x, rope = _case_inputs(index)
        local = {k: vk.shard_pack(t, 4, rank) for k, t in x.items() if k not in ("kt", "vt")}
        for layout in layouts:
            q, k, v = (local[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
            out, lse = vk.usp_varlen_attention(q, k, v, pack.cu_seqlens, pack.max_seqlen, *groups[layout],
                                               rope=rope, return_lse=True, backend=backend)
            ((out * local["do"]).sum() + (lse * local["dlse_t"].t()).sum()).backward()
            results[(index, layout)] = dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad,
                                            dv=v.grad)
    pack, x = _tiny_inputs()
    local = {k: vk.shard_pack(t, 4, rank) for k, t in x.items()}
    schemes = [("usp", lambda *a: vk.usp_varlen_attention(*a, *groups[(2, 2)], backend="reference")),
               ("ulysses", lambda *a: vk.ulysses_varlen_attention(*a, backend="reference")),
               ("ring", lambda *a: vk.ring_varlen_attention(*a, backend="reference")),
               ("allgather", lambda *a: vk.allgather_varlen_attention(*a, backend="reference"))]
    for scheme, attention in schemes:
        q, k, v = (local[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
        with _max_seqlen_audit() as too_long:
            out = attention(q, k, v, pack.cu_seqlens, pack.max_seqlen)
            (out * local["do"]).sum().backward()
        results[("tiny", scheme)] = dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad,
                                         too_long=too_long)
    # cross-attention from the shards to replicated keys (each video's own tokens here):
    # rank 3 holds padding rows only
    q = local["q"].clone().requires_grad_(True)
    with _max_seqlen_audit() as too_long:
        out = vk.local_cross_attention(q, x["k"], x["v"], pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen,
                                       pack.max_seqlen, backend="reference")
        (out * local["do"]).sum().backward()
    results[("tiny", "local-cross")] = dict(out=out.detach(), dq=q.grad, too_long=too_long)
    results["shards"] = {layout: vk.usp_shard(*groups[layout]) for layout in USP_LAYOUTS}
    q, k, v = (vk.shard_pack(t, 4, rank) for t in _bf16_ring_inputs()[1])
    results["ring_bf16"] = vk.ring_varlen_attention(q, k, v, *_bf16_ring_inputs()[0], backend="reference")
    model, inputs = _dit()
    for name, sp, fused in _dit_layouts(groups):
        model.config.fused_rope = fused
        model.config.gradient_checkpointing = "checkpointed" in name
        results[("dit", name)] = _dit_step(model, inputs, sp)
    model.config.gradient_checkpointing = False
    # gather_pack's backward: this rank's rows of its own gradient. 19 rows: 4 shards of 5,
    # one padding row; 17: three, more than one ring-level gather of a 2 x 2 or 4 x 1 USP
    # layout holds (R - 1)
    gathers = [("world", vk.gather_pack)] + [
        (f"usp-{u}x{r}", vk.SequenceParallel("usp", *groups[(u, r)]).gather_pack) for u, r in USP_LAYOUTS]
    for num in (19, 17):
        x = vk.shard_pack(torch.arange(float(num)).view(num, 1), 4, rank).requires_grad_(True)
        for name, gather in gathers:
            x.grad = None
            weights = torch.linspace(1.0, 2.0, num).view(num, 1)
            gathered = gather(x, num)
            (gathered * weights).sum().backward()
            results[("gather", name, num)] = (gathered.detach(), x.grad.clone())
    usp_gather = dict(gathers)["usp-2x2"]
    results["gather_errors"] = _value_errors([lambda: usp_gather(x, 16), lambda: usp_gather(x, 21)])
    q = torch.zeros(2, 3, D)  # 3 heads over U = 2
    pairs = vk.usp_groups(2)[0]  # {0, 1} and {2, 3}: as both groups, not a grid
    results["errors"] = _value_errors(
        [lambda: vk.usp_varlen_attention(q, q, q, pack.cu_seqlens, pack.max_seqlen, *groups[(2, 2)]),
         lambda: vk.usp_varlen_attention(q, q, q, pack.cu_seqlens, pack.max_seqlen),
         lambda: vk.usp_groups(3),
         lambda: vk.usp_shard(pairs, pairs)])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _bf16_ring_inputs():
    """((cu_seqlens, max_seqlen), (q, k, v)): one 256-token segment in bfloat16, v off zero
    (out's rounding then shows)."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(256, 2, D, generator=g) for _ in range(3))
    return (torch.tensor([0, 256], dtype=torch.int32), 256), (q.bfloat16(), k.bfloat16(), (v + 3).bfloat16())


def test_ring_keeps_its_running_result_in_float32(four_rank_runs):
    # merged in bfloat16, the running result was rounded at each of the P - 1 merges (its
    # max error against float64, 4 ranks: 2.7x a single process's; on 16 ranks 5x). Each
    # step's partial result still comes rounded from the kernel: the ring is as close as
    # those 4 partials merged in float32 (here 1.7x), and closer than merged in bfloat16
    (cu, m), (q, k, v) = _bf16_ring_inputs()
    exact = vk.varlen_attention(q.double(), k.double(), v.double(), cu, cu, m, m, backend="reference")
    shard_cu = torch.tensor([0, 64], dtype=torch.int32)
    parts = [vk.varlen_attention(q, k[j * 64:(j + 1) * 64], v[j * 64:(j + 1) * 64], cu, shard_cu, m, 64,
                                 return_lse=True, backend="reference") for j in range(4)]

    def merged(dtype):
        out, lse = parts[0][0].to(dtype), parts[0][1]
        for o, l in parts[1:]:
            out, lse = vk.merge_attention([out, o.to(dtype)], [lse, l])
        return out.bfloat16()

    ring = torch.cat([run["ring_bf16"] for run in four_rank_runs])
    err = lambda out: (out.double() - exact).abs().mean().item()
    assert err(ring) <= 1.05 * err(merged(torch.float32)) < err(merged(torch.bfloat16)), \
        (err(ring), err(merged(torch.float32)), err(merged(torch.bfloat16)))


@pytest.fixture(scope="module")
def four_rank_runs(tmp_path_factory):
    return _spawned_runs(tmp_path_factory, "four_ranks", _worker4, 4)


@pytest.mark.parametrize("index,layout", [(i, lay) for i, lays in USP_CASES for lay in lays],
                         ids=[f"{CASES[i][0]}-{u}x{r}" for i, lays in USP_CASES for u, r in lays])
def test_usp_matches_single_process(four_rank_runs, index, layout):
    runs = [run[(index, layout)] for run in four_rank_runs]
    h = CASES[index][3]
    assert runs[0]["out"].shape == (10, h, D) and runs[0]["lse"].shape == (h, 10)
    n = _assert_gathered_match(runs, index, *_tol(index))  # 39: shards of 10
    assert torch.all(runs[3]["dq"][n - 30:] == 0)  # the padding row, rank 3's last


@pytest.mark.parametrize("scheme", ["usp", "ulysses", "ring", "allgather"])
def test_padding_longer_than_videos(four_rank_runs, scheme):
    # five 1-token videos on 4 ranks: rows 5..7 are padding, a segment longer than max_seqlen
    runs = [run[("tiny", scheme)] for run in four_rank_runs]
    pack, x = _tiny_inputs()
    q, k, v = (x[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
    out = vk.varlen_attention(q, k, v, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen,
                              pack.max_seqlen, backend="reference")
    grads = torch.autograd.grad(out, (q, k, v), x["do"])
    for key, e in zip(("out", "dq", "dk", "dv"), (out.detach(), *grads)):
        assert_verbose_close(_gather(runs, key, pack.num_tokens), e, 1e-6, 1e-6, name=key)
    for run in runs:  # (op, longest segment, max_seqlen given) of each call that understated it
        assert run["too_long"] == []
    # 1-token videos attend to themselves only: out = v
    assert_verbose_close(out.detach(), x["v"], 1e-12, 1e-12, name="out = v")


def test_local_cross_attention_over_padding_shards(four_rank_runs):
    # the same five 1-token videos, as cross-attention to replicated keys: the shards'
    # padding rows make a segment longer than max_seqlen, which the bound passed on must
    # cover (the GPU kernels size their grids by it and would leave rows unwritten)
    runs = [run[("tiny", "local-cross")] for run in four_rank_runs]
    pack, x = _tiny_inputs()
    q = x["q"].clone().requires_grad_(True)
    out = vk.varlen_attention(q, x["k"], x["v"], pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen,
                              pack.max_seqlen, backend="reference")
    (dq,) = torch.autograd.grad(out, (q,), x["do"])
    for key, e in (("out", out.detach()), ("dq", dq)):
        assert_verbose_close(_gather(runs, key, pack.num_tokens), e, 1e-12, 1e-12, name=key)
    assert all(run["too_long"] == [] for run in runs)


@pytest.mark.parametrize("layout", [name for name, _, _ in _dit_layouts({(2, 2): (None, None)})])
def test_dit_sequence_parallel(four_rank_runs, layout):
    # the whole model on 4 ranks: every rank's output equals the single process's, and the
    # parameter and latent gradients summed over the ranks equal its gradients
    model, inputs = _dit()
    model.config.fused_rope = "unfused" not in layout
    out, grads, latent_grads = _dit_step(model, inputs)
    runs = [run[("dit", layout)] for run in four_rank_runs]
    for run_out, _, _ in runs:
        for got, exp in zip(run_out, out):
            assert_verbose_close(got, exp, 1e-10, 1e-10, name=f"{layout} out")
    for name, exp in grads.items():
        assert_verbose_close(sum(run[1][name] for run in runs), exp, 1e-10, 1e-10, name=f"{layout} d{name}")
    for i, exp in enumerate(latent_grads):
        assert_verbose_close(sum(run[2][i] for run in runs), exp, 1e-10, 1e-10, name=f"{layout} dlatents[{i}]")
    # each rank holds a share, not the whole: the shares differ
    assert not torch.equal(runs[0][1]["final_proj.weight"], runs[1][1]["final_proj.weight"])


@pytest.mark.parametrize("num", [19, 17])
@pytest.mark.parametrize("name", ["world"] + [f"usp-{u}x{r}" for u, r in USP_LAYOUTS])
def test_gather_pack_backward_keeps_this_ranks_rows(four_rank_runs, name, num):
    weights = torch.linspace(1.0, 2.0, num).view(num, 1)
    for rank, run in enumerate(four_rank_runs):
        gathered, grad = run[("gather", name, num)]
        assert torch.equal(gathered, torch.arange(float(num)).view(num, 1))
        # rows 5r .. 5r+4, the padding rows (rank 3's last) get no gradient
        assert torch.equal(grad, vk.shard_pack(weights, 4, rank))


def test_gather_pack_checks_the_count_against_every_shard(four_rank_runs):
    # a USP layout's count is checked against all 4 shards of 5 rows (17 to 20), not one level's
    for run in four_rank_runs:
        assert [msg for msg in run["gather_errors"]] == [
            f"num_tokens must be the pack's token count N, with 4 shards of 5 rows between 17 and 20, got {n}"
            for n in (16, 21)]


_FSDP2_MIXED_PRECISION = """
import tempfile
import torch, torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
import vdit_kernels as vk
from vdit_kernels.model import DiTConfig, VideoDiT

torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
g = torch.Generator().manual_seed(0)
pack = vk.VideoPack.from_shapes([(2, 4, 4), (1, 2, 600)], (1, 2, 2), text_lengths=[3, 2])
cfg = DiTConfig.from_name("tiny")
latents = [torch.randn(cfg.in_channels, *s, generator=g) for s in pack.shapes]
t, text = torch.tensor([10.0, 700.0]), torch.randn(5, cfg.text_dim, generator=g)
cot = [torch.randn(cfg.in_channels, *s, generator=g) for s in pack.shapes]

def step(model):
    out = model(latents, pack, t, text, backend="reference")
    sum((o.float() * c).sum() for o, c in zip(out, cot)).backward()
    return {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            for n, p in model.named_parameters()}

def model():
    return VideoDiT(cfg).init_weights(zero_init=False, generator=torch.Generator().manual_seed(1))

exact = step(model())
sharded = model()
policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)  # casts the inputs
for block in sharded.blocks:
    fully_shard(block, mp_policy=policy)
fully_shard(sharded, mp_policy=policy)
grads = step(sharded)
worst = max(((grads[n].float() - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() for n, e in exact.items())
print(f"worst relative gradient difference {worst:.3g}")
assert worst < 0.1, worst  # bfloat16 compute (2^-8 a rounding) against float32
dist.destroy_process_group()
"""


def test_fsdp2_mixed_precision_runs_the_model():
    # the usual FSDP2 bfloat16 recipe casts every wrapped module's floating inputs,
    # rebuilding dataclasses (the pack, the Rope3D) with dataclasses.replace: the pack's
    # cache field made the forward fail, and float32 RoPE positions would have come back
    # bfloat16 (coordinates past 256 off); the video of 300 tokens a row needs them exact
    pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP")
    from torch.distributed import fsdp
    if not hasattr(fsdp, "fully_shard") or not dist.is_available():
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _FSDP2_MIXED_PRECISION], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "VDIT_BACKEND": "reference"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "worst relative gradient difference" in done.stdout


def _unjoined_group():
    """A ProcessGroup object of one rank over a local store, outside torch.distributed's
    default group (which stays uninitialized)."""
    return dist.ProcessGroup(dist.HashStore(), 0, 1)


def test_dit_sequence_parallel_single_process():
    with pytest.raises(ValueError, match="scheme must be one of"):
        vk.SequenceParallel("zigzag")
    with pytest.raises(ValueError, match="ring_group is for scheme='usp'"):
        vk.SequenceParallel("ring", ring_group=_unjoined_group())
    model, inputs = _dit()  # P = 1 without torch.distributed: the plain model
    for got, exp in zip(_dit_step(model, inputs, vk.SequenceParallel("usp")), _dit_step(model, inputs)):
        for name, g in (got.items() if isinstance(got, dict) else enumerate(got)):
            assert_verbose_close(g, exp[name], 1e-12, 1e-12, name=f"P = 1: {name}")


def test_usp_shard_is_the_global_rank(four_rank_runs):
    # usp_groups numbers the shards by global rank, whatever the layout
    for rank, run in enumerate(four_rank_runs):
        assert run["shards"] == {layout: (4, rank) for layout in USP_LAYOUTS}


def test_usp_errors(four_rank_runs):
    for run in four_rank_runs:
        heads, no_groups, bad_size, not_grid = run["errors"]
        assert heads is not None and "q_local has 3 heads" in heads and "Ulysses group's size 2" in heads
        assert no_groups is not None and "needs both process groups" in no_groups
        assert bad_size is not None and "ulysses_size 3 does not divide the world size 4" in bad_size
        assert not_grid is not None and "do not form a grid" in not_grid


def test_usp_single_process_is_plain_attention():
    pack, x, rope = _case_inputs(1)
    assert vk.usp_groups(1) == (None, None) and vk.usp_shard(None, None) == (1, 0)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        vk.usp_shard(_unjoined_group(), None)
    with pytest.raises(ValueError, match="ulysses_size 2 does not divide the world size 1"):
        vk.usp_groups(2)
    out = vk.usp_varlen_attention(x["q"], x["k"], x["v"], pack.cu_seqlens, pack.max_seqlen,
                                  rope=rope, backend="reference")
    exp = vk.varlen_attention(x["q"], x["k"], x["v"], pack.cu_seqlens, pack.cu_seqlens,
                              pack.max_seqlen, pack.max_seqlen, rope=rope, backend="reference")
    assert_verbose_close(out, exp, name="out")
