"""cuparing.call_plans on the CPU: the per-call Guard (autograd, destinations that overlap an
input) and when a call keeps a plan. The plans themselves run on GPUs (test_gpu_attention.py);
the Guard's decisions depend only on tensors' addresses, shapes and strides, which CPU tensors
have too."""

from __future__ import annotations

import pytest
from conftest import record_plan_reuse

from cuparing import call_plans
from cuparing.comm.local import SoloRing

torch = pytest.importorskip("torch")


def _guard(inputs, dests, untracked=True):
    return call_plans.Guard(inputs, dests, untracked=untracked)


def test_destinations_that_share_no_element_with_an_input_pass():
    qkv = torch.zeros(2, 16, 3, 4, 8)  # a packed buffer: q, k, v are slices of one tensor
    q, k, v = qkv.unbind(2)
    out = torch.zeros(2, 16, 4, 8)
    guard = _guard((q, k, v), (out, None))
    assert guard.passes((q, k, v), (out, None))
    # slices of one buffer meet by byte range but share no element: still a repeat
    packed = torch.zeros(2, 16, 4, 4, 8)
    a, b = packed[:, :, 0], packed[:, :, 3]
    guard = _guard((a,), (b,))
    assert guard.passes((a,), (b,))
    # ... while the same slice as input and destination shares every element
    assert not guard.passes((a,), (a,))


def test_a_destination_over_an_input_or_an_earlier_destination_is_refused():
    q = torch.zeros(1, 8, 2, 4)
    dq, dk = torch.zeros_like(q), torch.zeros_like(q)
    guard = _guard((q,), (dq, dk), untracked=False)
    assert guard.passes((q,), (dq, dk))
    assert not guard.passes((q,), (q, dk))  # dq is the input
    assert not guard.passes((q,), (dq, dq))  # dk is dq: written twice
    half = torch.zeros(1, 16, 2, 4)
    assert not guard.passes((half[:, :8],), (half[:, 4:12], dk))  # partial overlap


def test_tracked_tensors_are_left_to_the_full_path():
    q = torch.zeros(1, 8, 2, 4, requires_grad=True)
    out = torch.zeros(1, 8, 2, 4)
    forward = _guard((q,), (out,), untracked=True)
    assert not forward.passes((q,), (out,))  # the forward refuses tracked inputs
    with torch.no_grad():
        assert forward.passes((q,), (out,))  # ... outside grad mode it takes them
    backward = _guard((q,), (out,), untracked=False)
    assert backward.passes((q,), (out,))  # the backward reads tracked inputs
    tracked_out = torch.zeros(1, 8, 2, 4, requires_grad=True)
    assert not backward.passes((q,), (tracked_out,))  # a tracked destination never passes


def test_a_call_keeps_one_plan_per_key_and_ring():
    call_plans.clear()
    key = ("test", 1)
    ring = SoloRing()
    x = torch.zeros(1, 4, 1, 2)
    assert not call_plans.wanted(None)
    assert call_plans.wanted(key, ring)
    kept = call_plans.CheckedCall(("decided",), _guard((x,), ()), ring)
    call_plans.keep(key, kept)
    assert call_plans.find(key) is kept and kept.holds(ring)
    # a repeat that the per-call checks sent through the full path keeps the kept plan
    assert not call_plans.wanted(key, ring)
    # another ring object under the same key (its id reused after the first ring died): replaced
    assert call_plans.wanted(key, SoloRing())
    call_plans.clear()


def test_rings_that_cannot_be_referred_to_weakly_keep_no_plan():
    class SlottedRing:
        __slots__ = ("rank", "size")

        def exchange(self, arrays, shift=1, tag="kv"):
            raise AssertionError("not called")

        def agree(self, fields):
            pass

    assert not call_plans.wanted(("test", 2), SlottedRing())


def test_calls_on_cpu_tensors_have_no_signature():
    x = torch.zeros(1, 4, 1, 2)
    assert call_plans.signature("attention", (x, x, x), (True, None, None)) is None


def test_repeats_reuse_the_first_calls_decisions_through_the_api(monkeypatch):
    """The wiring of cuparing.api around call plans, on CPU tensors admitted as if they were on a
    GPU: repeats of ring forward / backward calls (two simulated ranks) and of one-device
    backward calls take the kept decisions and give exactly what the full path gives; a repeat
    with a destination over an input is still refused."""
    import numpy as np

    import cuparing as cr

    gen = torch.Generator().manual_seed(5)
    q, dout = (torch.randn(1, 16, 4, 8, generator=gen, dtype=torch.float64) for _ in "qd")
    k, v = (torch.randn(1, 16, 2, 8, generator=gen, dtype=torch.float64) for _ in "kv")
    out, lse = cr.attention(q, k, v, causal=True, return_lse=True)
    call_plans.clear()
    monkeypatch.setattr(call_plans, "_is_cuda_tensor", lambda x: isinstance(x, torch.Tensor))
    reused = record_plan_reuse(monkeypatch)
    opts = {"causal": True, "layout": "zigzag"}

    def rank_fn(ring):
        shards = [cr.shard(x, ring.rank, ring.size, layout="zigzag") for x in (q, k, v, dout)]
        runs = []
        for _ in range(2):  # the first call checks and keeps, the second repeats
            out, lse = cr.ring_attention(*shards[:3], ring, return_lse=True, **opts)
            grads = cr.ring_attention_backward(shards[3], *shards[:3], out, lse, ring, **opts)
            runs.append([out, lse, *grads])
        out, lse = runs[-1][:2]
        into = torch.empty_like(shards[0])
        cr.ring_attention_backward(shards[3], *shards[:3], out, lse, ring, dq=into, **opts)
        with pytest.raises(ValueError, match="dq shares memory with dout"):
            cr.ring_attention_backward(shards[3], *shards[:3], out, lse, ring, dq=shards[3],
                                       **opts)  # fmt: skip
        return runs

    results = cr.simulate(2, rank_fn)
    # each rank: the forward and the backward repeat reused; the dq=dout repeat was refused
    assert sorted(reused) == [False] * 2 + [True] * 4
    for first, repeat in results:
        assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(first, repeat, strict=True))
    reused.clear()
    grads = [cr.attention_backward(dout, q, k, v, out, lse, causal=True) for _ in range(2)]
    assert reused == [True]
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    call_plans.clear()


def test_documents_key_reads_host_boundaries_by_type_and_value():
    import numpy as np

    key = call_plans.documents_key
    assert key(None) == ()
    assert key([0, 3, 7]) == key([0, 3, 7]) != key((0, 3, 7))
    assert key([0, 3, 7]) != key([0, 3.0, 7])  # the checks refuse one, not the other
    assert key([0, 3, 7]) != key([0, 4, 7])
    assert key([0, 3, 2**70]) == key([0, 3, 2**70]) != key([0, 3, 2**70 + 1])  # (beyond int64)
    as_array = np.array([0, 3, 7])
    assert key(as_array) == key(np.array([0, 3, 7])) != key(as_array.astype(np.int32))
    assert key(as_array) != key(np.array([0, 4, 7]))
    assert key(np.array([0, 3, 7], dtype=object)) is None  # (its bytes are object addresses)
    as_tensor = torch.tensor([0, 3, 7])
    assert key(as_tensor) == key(torch.tensor([0, 3, 7])) != key(as_tensor.int())
    assert key(as_tensor) != key(torch.tensor([0, 4, 7]))
    assert key(torch.tensor([[0, 3, 7]])) != key(as_tensor)  # 2-D: the checks refuse it
    assert key("0,3,7") is None
    # the same bytes read in another byte order are other values
    little = np.array([0, 3, 7], dtype="<i4")
    assert key(little.view(">i4")) != key(little)
    # a masked array reads its masked entries as given, its bytes hold the fill value there:
    # only a plain ndarray is keyed, the rest keeps the full path
    assert key(np.ma.array([0, 9, 16], mask=[0, 1, 0], fill_value=5)) is None
    assert key(torch.tensor([0, 3, 7]).to_sparse()) is None  # (the full path says why not)
    for x in ([0, 3], (0, True), as_array, as_tensor):
        hash(key(x))  # (raises if a key could not be hashed: no signature could hold it)


def test_packed_document_repeats_reuse_the_first_calls_decisions(monkeypatch, fresh_rng):
    """Calls with ``cu_seqlens`` on the host keep plans by the boundaries' values: a repeat with
    the same boundaries reuses them and gives exactly what the full path gave, one with other
    boundaries (or the same ones as another type) does not, and every result matches the
    float64 reference (ring forward / backward on two simulated ranks, one-device backward; the
    one-device forward keeps a launch, which only GPUs have: test_gpu_attention.py)."""
    import numpy as np
    from numerics import check_backward, check_forward

    import cuparing as cr

    seqlen = 40
    cuts = np.sort(fresh_rng.choice(np.arange(1, seqlen), size=3, replace=False))
    first = [0, *map(int, cuts), seqlen]
    other = [0, *map(int, np.sort(fresh_rng.choice(np.arange(1, seqlen), 4, replace=False))),
             seqlen]  # fmt: skip
    gen = torch.Generator().manual_seed(int(fresh_rng.integers(2**31)))
    q, dout = (torch.randn(1, seqlen, 4, 8, generator=gen, dtype=torch.float64) for _ in "qd")
    k, v = (torch.randn(1, seqlen, 2, 8, generator=gen, dtype=torch.float64) for _ in "kv")
    out, lse = cr.attention(q, k, v, causal=True, cu_seqlens=first, return_lse=True)
    call_plans.clear()
    monkeypatch.setattr(call_plans, "_is_cuda_tensor", lambda x: isinstance(x, torch.Tensor))
    reused = record_plan_reuse(monkeypatch)
    layout = "zigzag"

    def rank_fn(ring, boundaries):
        results = []
        for cu in boundaries:  # on one ring: a kept plan is the ring's
            opts = {"causal": True, "layout": layout, "cu_seqlens": cu}
            shards = [cr.shard(x, ring.rank, ring.size, layout=layout, cu_seqlens=list(cu))
                      for x in (q, k, v, dout)]  # fmt: skip
            out, lse = cr.ring_attention(*shards[:3], ring, return_lse=True, **opts)
            grads = cr.ring_attention_backward(shards[3], *shards[:3], out, lse, ring, **opts)
            results.append([out, lse, *grads])
        return results

    def checked(results, cu):
        host = [x.numpy() for x in (q, k, v)]
        check_forward(results[0], results[1], *host, causal=True, cu_seqlens=cu)
        check_backward(results[2:], dout.numpy(), *host, causal=True, cu_seqlens=cu)

    # the same boundaries again, then as another type, then others of the same length
    boundaries = [first, first, np.array(first), other]
    per_rank = cr.simulate(2, lambda ring: rank_fn(ring, boundaries))
    calls = [
        [cr.unshard([r[n][i] for r in per_rank], layout=layout, axis=2 if i == 1 else 1,
                    cu_seqlens=list(cu)).numpy() for i in range(5)]
        for n, cu in enumerate(boundaries)
    ]  # fmt: skip
    # only the second call repeated (both ranks' forward and backward): the others had no plan
    assert sorted(reused) == [True] * 4
    assert all(np.array_equal(a, b) for a, b in zip(calls[0], calls[1], strict=True))
    for results, cu in zip(calls[1:], boundaries[1:], strict=True):
        checked(results, list(cu))

    reused.clear()
    grads = [cr.attention_backward(dout, q, k, v, out, lse, causal=True, cu_seqlens=first)
             for _ in range(2)]  # fmt: skip
    assert reused == [True]
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    host = [x.numpy() for x in (q, k, v)]
    check_backward([g.numpy() for g in grads[1]], dout.numpy(), *host, causal=True,
                   cu_seqlens=first)  # fmt: skip
    call_plans.clear()


def _recording_plan(monkeypatch, current_device: int):
    """A CallPlan for device 3 over recording stand-ins (CPU tensors stand for the caller's),
    with ``current_device`` the device CUDA calls current; (plan, seen, tensors)."""
    from types import SimpleNamespace

    from cuparing.backends import ring_graphs

    seen = []

    class Entered:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            seen.append(("enter", self.device))

        def __exit__(self, *exc):
            seen.append(("exit", self.device))

    monkeypatch.setattr(ring_graphs, "on_device", Entered)
    monkeypatch.setattr(call_plans, "torch_current_stream", lambda device: 0x5000 + device)
    runtime = SimpleNamespace(getDevice=lambda: current_device)
    monkeypatch.setattr(call_plans, "_cupy_runtime", lambda: runtime)
    launch = SimpleNamespace(launch=lambda *pointers, stream: seen.append((pointers, stream)))
    q = torch.zeros(1, 8, 2, 8)  # 16-byte aligned data, as the kernels need
    k = v = torch.zeros(1, 8, 1, 8)
    out, lse = torch.zeros_like(q), torch.zeros(1, 2, 8)
    plan = call_plans.CallPlan(
        launch, SimpleNamespace(data=SimpleNamespace(ptr=0x100)),
        SimpleNamespace(data=SimpleNamespace(ptr=0x200)), q.shape, lse.shape, q.dtype,
        SimpleNamespace(index=3, type="cuda"),  # (a CUDA device: its index is all run reads)
        call_plans.Guard((q, k, v), (out, lse), untracked=True),
    )  # fmt: skip
    return plan, seen, (q, k, v, out, lse)


@pytest.mark.parametrize("current", [3, 0])
def test_a_kept_launch_runs_on_torchs_stream_inside_its_device(monkeypatch, current):
    """``CallPlan.run`` (a one-device repeat) launches on the raw handle of torch's current
    stream of the plan's device, into the caller's destinations, with that device made current
    around the launch where another device is current (and nothing entered where it is the
    current one already): the launch and its pointers, seen through recording stand-ins."""
    plan, seen, (q, k, v, out, lse) = _recording_plan(monkeypatch, current)
    assert plan.run(q, k, v, out, lse) == (out, lse)
    pointers = (out.data_ptr(), lse.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), 0x100,
                0x200, 0)  # fmt: skip
    launched = (pointers, 0x5003)
    assert seen == ([launched] if current == 3 else [("enter", 3), launched, ("exit", 3)])


def test_a_dropped_lse_is_kept_per_stream_and_never_under_capture(monkeypatch):
    """A repeat whose caller drops the lse (``want_lse=False``, no ``lse=``) writes it into one
    lse the plan keeps, on the stream it was made on; on another stream, or while a CUDA graph
    is captured (a graph would write it after the plan let it go), or where it would take more
    than ``KEPT_LSE_MAX_BYTES``, into a fresh one. A caller that wants the lse always gets a
    fresh one."""
    plan, seen, (q, k, v, out, _) = _recording_plan(monkeypatch, 3)
    empties = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        kwargs.pop("device")  # (CPU stand-ins for the plan's CUDA device)
        made = real_empty(*args, **kwargs)
        empties.append(made)
        return made

    capturing = [False]
    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    stream = [0x5003]
    monkeypatch.setattr(call_plans, "torch_current_stream", lambda device: stream[0])

    def lse_of_call(want_lse=False):
        before = len(seen)
        result = plan.run(q, k, v, out, want_lse=want_lse)
        assert result[0] is out and len(seen) == before + 1
        assert seen[-1][0][1] == result[1].data_ptr()  # the launch writes the lse returned
        return result[1]

    kept = lse_of_call()
    assert lse_of_call() is kept and lse_of_call() is kept
    wanted = lse_of_call(want_lse=True)
    assert wanted is not kept and lse_of_call(want_lse=True) is not wanted
    stream[0] = 0x7000
    other = lse_of_call()
    assert other is not kept and lse_of_call() is not other  # (fresh every time there)
    stream[0] = 0x5003
    capturing[0] = True
    assert lse_of_call() is not kept
    capturing[0] = False
    assert lse_of_call() is kept
    assert all(x.shape == kept.shape and x.dtype == torch.float32 for x in empties)

    # an lse over the bound is never kept (plans of many signatures hold little memory)
    monkeypatch.setattr(call_plans, "KEPT_LSE_MAX_BYTES", kept.numel() * 4 - 1)
    plan._discarded_lse = None
    first = lse_of_call()
    assert lse_of_call() is not first and plan._discarded_lse is None


def test_a_signature_walks_the_documents_once(monkeypatch):
    """The boundaries enter a signature as :func:`documents_key` made them (typed already): the
    signature's own typing of the options does not walk them again, so a call with thousands
    of documents pays one pass over its boundaries per call, not several."""
    monkeypatch.setattr(call_plans, "_is_cuda_tensor", lambda x: True)  # (CPU tensors here)
    typed = []
    real = call_plans._typed
    monkeypatch.setattr(call_plans, "_typed", lambda option: typed.append(1) or real(option))
    x = torch.zeros(1, 8, 2, 4)
    counts = []
    for docs in (3, 3000):
        documents = call_plans.documents_key(list(range(docs)))
        typed.clear()
        key = call_plans.signature("attention", (x, x, x), (True, None, None), (None, None),
                                   documents=documents)  # fmt: skip
        assert documents in key
        counts.append(len(typed))
    assert counts[0] == counts[1]
    # and different boundaries make different keys, the same ones the same key
    keys = [call_plans.signature("attention", (x, x, x), (True, None, None),
                                 documents=call_plans.documents_key(cu))
            for cu in ([0, 4, 8], [0, 4, 8], [0, 5, 8], (0, 4, 8))]  # fmt: skip
    assert keys[0] == keys[1] and len({keys[0], keys[2], keys[3]}) == 3
