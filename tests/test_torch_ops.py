"""cuparing.torch: the torch.library custom ops on CPU tensors (the NumPy backend).

opcheck (schema, fake implementations, autograd registration, AOT dispatch), gradients against
the dense float64 reference, a ring of simulated CPU ranks through autograd, and a small
Linear -> attention -> Linear step compiled with ``torch.compile(fullgraph=True)``: no graph break
and the same loss and gradients as eager execution and as PyTorch's own SDPA.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from conftest import record_deterministic_flags
from numerics import ARITHMETIC_FACTOR, UNIT_ROUNDOFF, check_backward, check_forward, gamma

import cuparing as cr

torch = pytest.importorskip("torch")
crt = pytest.importorskip("cuparing.torch")


def _tensors(seed, shapes, dtype=None, grad=False):
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float64
    return [torch.randn(*s, generator=gen, dtype=dtype, requires_grad=grad) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    q, k, v = _tensors(0, [(2, 9, 4, 8), (2, 11, 2, 8), (2, 11, 2, 8)], dtype, grad=True)
    # causal, scale, window (3, None), no documents, not deterministic
    mask = (True, 0.35, 3, None, True, None, crt.NONDETERMINISTIC)
    torch.library.opcheck(crt.attention_forward, (q, k, v, *mask))
    out, lse = crt.attention_forward(q.detach(), k.detach(), v.detach(), *mask)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    tensors = (q.detach(), k.detach(), v.detach(), out, lse)
    for grad_lse in (None, dlse):
        args = (dout, *tensors, grad_lse, *mask, crt.ONE_DEVICE, "contiguous")
        torch.library.opcheck(crt.attention_backward, args)


def test_ring_forward_opcheck():
    q, k, v = _tensors(1, [(1, 8, 2, 4)] * 3, grad=True)
    ring = cr.comm.local.SoloRing()  # handles hold rings weakly: keep it alive
    handle = crt.ring_handle(ring)
    mask = (False, 0.5, None, None, False, [0, 3, 8], crt.DETERMINISTIC)
    torch.library.opcheck(crt.ring_attention_forward, (q, k, v, *mask, handle, "zigzag"))


def test_ring_handles_are_per_ring_and_compiled_code_reads_them():
    import copy

    ring = cr.comm.local.SoloRing()
    handle = crt.ring_handle(ring)
    assert crt.ring_handle(ring) == handle
    twin = copy.copy(ring)  # carries the attribute, but is another ring: its own handle
    assert crt.ring_handle(twin) not in (None, handle) and crt.ring_handle(ring) == handle
    fresh = cr.comm.local.SoloRing()
    q = k = v = torch.randn(1, 8, 2, 4)

    def step(q, k, v, ring):
        return crt.ring_attention(q, k, v, ring, causal=True)

    with pytest.raises(Exception, match="ring_handle\\(ring\\) once before compiling"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, fresh)
    torch._dynamo.reset()
    crt.ring_handle(fresh)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, fresh)
    assert torch.equal(compiled, step(q, k, v, fresh))
    with pytest.raises(TypeError, match="ring"):
        crt.ring_handle(object())


def test_ring_handle_registers_while_another_thread_compiles(monkeypatch):
    """Ranks simulated in threads build their models (registering their rings) while a
    neighbour compiles, and torch's is_compiling() reads one process-wide flag that is then True
    in every thread: registering outside a trace must still work (it used to raise, at random,
    in the threaded training example)."""
    import threading

    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True, raising=False)
    ring = cr.comm.local.SoloRing()
    handles = []
    worker = threading.Thread(target=lambda: handles.append(crt.ring_handle(ring)))
    worker.start()
    worker.join()
    assert handles == [crt.ring_handle(ring)] and handles[0] is not None


@pytest.mark.parametrize(
    "causal,window,sq,sk,heads",
    [(False, None, 13, 13, (4, 4)), (True, None, 7, 12, (6, 2)), (True, (4, 0), 10, 10, (2, 1)),
     (False, (2, 3), 9, 5, (4, 2))],
)  # fmt: skip
def test_gradients_match_the_dense_reference(causal, window, sq, sk, heads):
    h, hkv = heads
    q, k, v = _tensors(2, [(2, sq, h, 16), (2, sk, hkv, 16), (2, sk, hkv, 16)], grad=True)
    dout = _tensors(3, [(2, sq, h, 16)])[0]
    out = crt.attention(q, k, v, causal=causal, window=window)
    out.backward(dout)
    host = [x.detach().numpy() for x in (q, k, v)]
    check_forward(out.detach().numpy(), None, *host, causal=causal, window=window)
    grads = [x.grad.numpy() for x in (q, k, v)]
    check_backward(grads, *(x.detach().numpy() for x in (dout, q, k, v)), causal=causal,
                   window=window)  # fmt: skip


def test_ring_of_simulated_ranks_through_autograd():
    seqlen, world = 24, 3
    q, k, v, dout = (x.numpy() for x in _tensors(4, [(1, seqlen, 4, 8), *[(1, seqlen, 2, 8)] * 2,
                                                       (1, seqlen, 4, 8)]))  # fmt: skip

    def rank_fn(ring):
        local = [
            torch.tensor(cr.shard(x, ring.rank, ring.size, layout="zigzag"), requires_grad=True)
            for x in (q, k, v)
        ]
        out = crt.ring_attention(*local, ring, causal=True, layout="zigzag")
        out.backward(torch.tensor(cr.shard(dout, ring.rank, ring.size, layout="zigzag")))
        return [out.detach().numpy()] + [x.grad.numpy() for x in local]

    results = cr.simulate(world, rank_fn)
    parts = [cr.unshard([r[i] for r in results], layout="zigzag") for i in range(4)]
    check_forward(parts[0], None, q, k, v, causal=True)
    check_backward(parts[1:], dout, q, k, v, causal=True)


def test_bad_options_are_refused_at_trace_time():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(TypeError, match="causal must be a bool"):
        crt.attention(q, q, q, causal="yes")
    with pytest.raises(ValueError, match="window"):
        crt.attention(q, q, q, window=(1, 2, 3))
    with pytest.raises(TypeError, match="4-D torch.Tensor"):
        crt.attention(np.zeros((1, 4, 2, 8)), q, q)
    with pytest.raises(TypeError, match="Ring"):
        crt.ring_attention(q, q, q, ring="not a ring")
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        crt.attention(q, q, q, deterministic=1)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        crt.ring_attention(q, q, q, cr.comm.local.SoloRing(), deterministic="yes")


def test_gradient_through_lse():
    """d lse_i / d s_ij = P_ij: a loss on lse as well as on out, against float64 autograd of a
    dense torch implementation."""
    q, k, v = _tensors(5, [(1, 7, 2, 4), (1, 9, 2, 4), (1, 9, 2, 4)], grad=True)
    w_out, w_lse = _tensors(8, [(1, 7, 2, 4), (1, 2, 7)])
    out, lse = crt.attention_forward(q, k, v, True, 0.5, None, None, False, None, 0)
    ((out * w_out).sum() + (lse * w_lse).sum()).backward()
    ours = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    s = torch.einsum("bihd,bjhd->bhij", q, k) * 0.5
    s = s.masked_fill(~torch.ones(7, 9, dtype=torch.bool).tril(2), float("-inf"))
    dense_lse = torch.logsumexp(s, dim=-1)
    dense_out = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, dim=-1), v)
    ((dense_out * w_out).sum() + (dense_lse * w_lse).sum()).backward()
    for got, x in zip(ours, (q, k, v), strict=True):
        assert torch.allclose(got, x.grad, rtol=1e-12, atol=1e-12)


class _Block(torch.nn.Module):
    def __init__(self, attend):
        super().__init__()
        gen = torch.Generator().manual_seed(6)
        self.qkv = torch.nn.Linear(32, 3 * 32, dtype=torch.float64)
        self.proj = torch.nn.Linear(32, 32, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2)
        self.attend = attend

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).unbind(2)
        return self.proj(self.attend(q, k, v).reshape(b, s, 32))


def _ours(q, k, v):
    return crt.attention(q, k, v, causal=True)


def _sdpa(q, k, v):
    out = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True
    )
    return out.transpose(1, 2)


def _step(model, x, run=None):
    """Loss and parameter gradients of one step; ``run``: the callable to apply (default the
    model itself; a compiled wrapper of it)."""
    model.zero_grad()
    loss = (model if run is None else run)(x).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


# float64 step of _Block: the longest chain of reductions any loss or gradient element goes
# through, forward and back: qkv Linear (32) + scores (D=8) + softmax sum (S=12) + P V (S=12) +
# proj Linear (32), twice, + the loss's mean over B*S*32 = 768 elements. Elementwise first-order
# bound gamma_n * magnitude, times the table's factor, taken against each tensor's largest entry
# (the weights are small, 0.2 sigma, so no layer amplifies it).
_STEP_BOUND = ARITHMETIC_FACTOR * gamma(2 * (32 + 8 + 12 + 12 + 32) + 768, UNIT_ROUNDOFF["float64"])


def _close(got, want):
    return (got - want).abs().max().item() <= _STEP_BOUND * max(want.abs().max().item(), 1e-300)


def test_compiled_training_step_matches_eager_and_sdpa():
    x = _tensors(7, [(2, 12, 32)])[0]
    eager = _step(_Block(_ours), x)
    sdpa = _step(_Block(_sdpa), x)
    torch._dynamo.reset()
    model = _Block(_ours)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a break would raise
    got = _step(model, x, run=compiled)
    for want in (eager, sdpa):
        assert _close(got[0], want[0])
        for g, w in zip(got[1], want[1], strict=True):
            assert _close(g, w)


def test_packed_documents_through_the_ops():
    cu = [0, 4, 5, 12]
    q, k, v = _tensors(9, [(1, 12, 2, 8)] * 3, grad=True)
    dout = _tensors(10, [(1, 12, 2, 8)])[0]
    out = crt.attention(q, k, v, causal=True, cu_seqlens=torch.tensor(cu))
    out.backward(dout)
    host = [x.detach().numpy() for x in (q, k, v)]
    check_forward(out.detach().numpy(), None, *host, causal=True, cu_seqlens=cu)
    grads = [x.grad.numpy() for x in (q, k, v)]
    check_backward(grads, dout.numpy(), *host, causal=True, cu_seqlens=cu)


def test_packed_documents_compile_without_graph_breaks():
    cu = [0, 3, 10, 12]

    def step(q, k, v):
        return crt.attention(q, k, v, causal=True, cu_seqlens=cu).square().sum()

    q, k, v = _tensors(11, [(1, 12, 2, 8)] * 3, grad=True)
    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    loss.backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    step(q, k, v).backward()
    for g, x in zip(got, (q, k, v), strict=True):
        assert _close(g, x.grad)


# torch.use_deterministic_algorithms settings: (mode, warn_only)
_TORCH_SETTINGS = {"off": (False, False), "on": (True, False), "warn-only": (True, True)}


@contextlib.contextmanager
def _torch_determinism(setting: str):
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())  # fmt: skip
    mode, warn_only = _TORCH_SETTINGS[setting]
    torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("torch_setting", list(_TORCH_SETTINGS))
@pytest.mark.parametrize("asked", [None, False, True])
def test_deterministic_reaches_the_backward(asked, torch_setting, monkeypatch):
    """``deterministic`` travels from the autograd entry points to cuparing's backward: as given,
    or (None) as ``torch.use_deterministic_algorithms`` says (warn-only asks for the ordered
    backward too), eager and compiled, one device and ring. (What the flag does to the kernels:
    the GPU tests; the CPU backend is ordered anyway.)"""
    seen = record_deterministic_flags(monkeypatch)
    want = _TORCH_SETTINGS[torch_setting][0] if asked is None else asked
    ring = cr.comm.local.SoloRing()
    crt.ring_handle(ring)
    q, k, v = _tensors(12, [(1, 9, 2, 8)] * 3, grad=True)

    def one_device(q, k, v):
        return crt.attention(q, k, v, causal=True, deterministic=asked).sum()

    def on_ring(q, k, v):
        return crt.ring_attention(q, k, v, ring, deterministic=asked).sum()

    with _torch_determinism(torch_setting):
        for fn in (one_device, on_ring):
            torch._dynamo.reset()
            for run in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
                seen.clear()
                run(q, k, v).backward()
                assert seen == [want]
        seen.clear()
        cr.ring_attention_torch(q, k, v, ring, deterministic=asked).sum().backward()
        assert seen == [want]


@pytest.mark.parametrize("torch_setting", ["on", "warn-only"])
@pytest.mark.parametrize("asked", [None, True])
def test_backward_without_an_ordered_kernel(asked, torch_setting, monkeypatch):
    """Where the backward kernels have no deterministic mode (stood in for by a backward that
    refuses ``deterministic=True`` as the mma.sync kernels do): an explicit request or torch's
    strict mode raise NotImplementedError from ``.backward()``; torch's warn-only mode warns and
    gives the (right) unordered gradients."""
    real = cr.api.attention_backward

    def without_ordered_kernels(*args, **kwargs):
        if kwargs["deterministic"]:
            raise NotImplementedError("deterministic=True needs the Hopper backward kernels")
        return real(*args, **kwargs)

    monkeypatch.setattr(cr.api, "attention_backward", without_ordered_kernels)
    seen = record_deterministic_flags(monkeypatch)  # (around the refusing backward)
    q, k, v = _tensors(13, [(1, 7, 2, 8)] * 3, grad=True)
    dout = _tensors(14, [(1, 7, 2, 8)])[0]
    with _torch_determinism(torch_setting):
        out = crt.attention(q, k, v, causal=True, deterministic=asked)
        if asked is None and torch_setting == "warn-only":
            with pytest.warns(UserWarning, match="warn_only=True"):
                out.backward(dout)
            assert seen == [True, False]
            host = [x.detach().numpy() for x in (q, k, v)]
            grads = [x.grad.numpy() for x in (q, k, v)]
            check_backward(grads, dout.numpy(), *host, causal=True)
        else:
            with pytest.raises(NotImplementedError, match="Hopper backward"):
                out.backward(dout)
