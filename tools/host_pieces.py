"""Host microseconds of each piece of a one-device repeat of ``cr.attention`` (torch bf16 CUDA
tensors, causal, Hkv = H/4): the whole call (plain, ``out=``), SDPA on the same tensors for
scale, then every step the kept launch (``call_plans.CallPlan``) takes, each timed alone in a
loop (median of five loops).

    python tools/host_pieces.py [--shape B,S,H,D] [--calls 3000]

Pick a shape small enough that the GPU keeps up with the host (the default): at larger ones the
rows that launch measure the GPU, as the launch queue fills.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import host_us  # noqa: E402


def median_us(fn, calls: int) -> float:
    """The median of five :func:`timing.host_us` loops of ``calls`` calls."""
    return statistics.median(host_us(fn, calls=calls, warmup=1) for _ in range(5))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="1,128,8,64", help="B,S,H,D")
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args(argv)

    import torch

    import cuparing as cr
    from cuparing import call_plans, interop
    from cuparing.backends import ring_graphs
    from cuparing.kernels import loader

    b, s, h, d = (int(x) for x in args.shape.split(","))
    device = torch.device("cuda", 0)
    q = torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(b, s, h // 4, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    out, lse = torch.empty_like(q), torch.empty(b, h, s, device=device)
    for _ in range(20):
        cr.attention(q, k, v, causal=True)
    torch.cuda.synchronize()
    key = call_plans.signature("attention", (q, k, v), (True, None, None), (None, None),
                               documents=())  # fmt: skip
    plan = call_plans.find(key)
    if not isinstance(plan, call_plans.CallPlan):
        print(f"no kept launch for this shape ({type(plan).__name__})")
        return 1
    qt = q.transpose(1, 2)
    pointers = (out.data_ptr(), lse.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                plan._q_pos, plan._k_pos, 0)  # fmt: skip
    stream = interop.torch_current_stream(0)

    def on_device():
        with ring_graphs.on_device(0):
            pass

    pieces = {
        "whole call": lambda: cr.attention(q, k, v, causal=True),
        "whole call out=, lse=": lambda: cr.attention(q, k, v, causal=True, out=out, lse=lse),
        "SDPA (default backend)": lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, qt, qt, is_causal=True),
        "signature": lambda: call_plans.signature("attention", (q, k, v), (True, None, None),
                                                  (None, None), documents=()),
        "kernel switches": loader.kernel_switches,
        "plan lookup": lambda: call_plans.find(key),
        "guard": lambda: plan._guard.passes((q, k, v), (None, None)),
        "torch.empty (out)": lambda: torch.empty((b, s, h, d), dtype=torch.bfloat16,
                                                 device=device),
        "torch's stream handle": lambda: interop.torch_current_stream(0),
        "device entered": on_device,
        "argument pack": lambda: plan._launch._pack(pointers),
        "launch": lambda: plan._launch.launch(*pointers, stream=stream),
    }  # fmt: skip
    if "want_lse" in inspect.signature(plan.run).parameters:  # (trees before it: a fresh lse)
        pieces["CallPlan.run (lse dropped)"] = lambda: plan.run(q, k, v, want_lse=False)
    else:
        pieces["CallPlan.run"] = lambda: plan.run(q, k, v)
    print(f"# {torch.cuda.get_device_name()}, B,S,H,D = {args.shape}, causal, bf16; host us "
          f"per call, median of 5 loops of {args.calls}")  # fmt: skip
    for name, fn in pieces.items():
        print(f"{name:<28}{median_us(fn, args.calls):>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
