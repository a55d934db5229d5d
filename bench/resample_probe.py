"""What one resampling event costs on the device: K members' scores, masks and selections.

K members of ``--rows`` dendrites (12 x 6 = 72 by default) over ``--inputs`` inputs, each row
using ``--k`` of them and swapping ``--m``: the population's draw (``core._population._Group``'s
steps) timed part by part with CUDA events (``_baseline.cuda_seconds``: the median of
``--repeat`` runs after three warm-up calls). For comparison: the scores by PyTorch's integer
ops instead of the Triton kernel, and the top ``k + m`` that the CPU-drawn plans used to select.

    python bench/resample_probe.py [--members 1024] [--rows 72] [--inputs 784] [--k 96] [--m 24]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _baseline import cuda_seconds  # noqa: E402

from core import _kernels  # noqa: E402
from core._layers import (  # noqa: E402
    _FRESH,
    _SCORES,
    _column_hash,
    _mix_,
    draw_rows,
    fresh_weights,
    input_scores,
    key_bits,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=72)
    ap.add_argument("--inputs", type=int, default=784)
    ap.add_argument("--k", type=int, default=96)
    ap.add_argument("--m", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    dev = torch.device("cuda")
    n = a.members * a.rows
    member = torch.arange(a.members, device=dev).repeat_interleave(a.rows)
    own = torch.arange(a.rows, device=dev).repeat(a.members)
    seeds = torch.randint(0, 2**62, (a.members,), device=dev)[member]
    events = torch.full((n,), 3, dtype=torch.long, device=dev)
    used = torch.rand(n, a.inputs, device=dev).topk(a.k, dim=1).indices
    keys = draw_rows(seeds, events, own, _SCORES)
    scores = input_scores(keys, a.inputs)
    bound = torch.full((n, 1), a.k ** -0.5, device=dev)

    def torch_scores() -> torch.Tensor:
        cb = key_bits(a.inputs)
        h = _mix_(keys.unsqueeze(-1) ^ _column_hash(a.inputs, dev))
        return (((h >> (cb + 1)) << cb) | torch.arange(a.inputs, device=dev)).to(torch.int32)

    rows = {
        "row keys (draw_rows)": lambda: draw_rows(seeds, events, own, _SCORES),
        "scores, Triton kernel": lambda: _kernels.input_scores(keys, a.inputs),
        "scores, PyTorch int64 ops": torch_scores,
        "mask the inputs in use (scatter -1)": lambda: scores.clone().scatter_(1, used, -1),
        f"topk(m={a.m})": lambda: scores.topk(a.m, dim=1),
        f"topk(k+m={a.k + a.m}) (as the CPU plans selected)": lambda: scores.topk(a.k + a.m, dim=1),
        "fresh weights": lambda: fresh_weights(draw_rows(seeds, events, own, _FRESH), a.m, bound),
    }
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}: {a.members} members x {a.rows} rows "
          f"x {a.inputs} inputs, k={a.k}, m={a.m}; median of {a.repeat}, ms")
    for name, fn in rows.items():
        print(f"{name:52s} {cuda_seconds(fn, a.repeat) * 1e3:8.3f}")

    def event() -> None:
        s = input_scores(draw_rows(seeds, events, own, _SCORES), a.inputs)
        s.scatter_(1, used, -1)
        s.topk(a.m, dim=1)
        fresh_weights(draw_rows(seeds, events, own, _FRESH), a.m, bound)

    print(f"{'one event, all of the above (Triton scores, topk(m))':52s} {cuda_seconds(event, a.repeat) * 1e3:8.3f}")


if __name__ == "__main__":
    main()
