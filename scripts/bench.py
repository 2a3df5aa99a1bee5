"""Forward+backward throughput and memory of every registered cell, against torch.nn.LSTM.

    python scripts/bench.py                       # every cell, the three standard shapes
    python scripts/bench.py --device cuda --json bench-cuda.json
    python scripts/bench.py --cells fast_weights --shapes 128x11x100x100

Each measurement runs in a fresh subprocess. Memory, in MiB: on CUDA the peak of
``torch.cuda.max_memory_allocated`` during one forward+backward pass; on the CPU, where the
allocator keeps no such count, the activations saved for the backward pass (each storage counted
once, through ``torch.autograd.graph.saved_tensors_hooks``), which is what grows with B and T.
Throughput is sequences per second of one forward and backward pass (sum of the outputs as the
loss), after warm-up, timed over at least ``--min-time`` seconds. The ratio column is the cell's
throughput divided by that of a bare ``torch.nn.LSTM`` of the same shape measured in the same run
(above 1: faster than the LSTM).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

# Shapes (B, T, I, H): retrieval (Ba et al.), glimpses-sized inputs, pixel-by-pixel MNIST.
DEFAULT_SHAPES = ["128x11x100x100", "16x50x405x200", "64x784x1x100"]
REFERENCE = "torch.nn.LSTM"
# Extra rows: the two fast-weights forms, besides the `auto` default.
DEFAULT_VARIANTS = ["fast_weights:form=matrix", "fast_weights:form=memory"]


def parse_shape(text: str) -> tuple[int, int, int, int]:
    batch, steps, inputs, hidden = (int(v) for v in text.lower().split("x"))
    return batch, steps, inputs, hidden


def build(case: str, input_size: int, hidden_size: int):
    import torch

    if case == REFERENCE:
        lstm = torch.nn.LSTM(input_size, hidden_size, batch_first=True)
        return lambda x: lstm(x)[0], lstm
    from fwlab.registry import Registry

    name, _, assignments = case.partition(":")
    cell_cls = Registry().get("cell", name)
    overrides = dict(a.split("=", 1) for a in assignments.split(",") if a)
    config = cell_cls.Config(hidden_size=hidden_size, **overrides)
    cell = cell_cls(input_size, config)
    return lambda x: cell(x)[0], cell


def saved_for_backward_mib(run, x) -> float:
    """MiB of the distinct storages autograd saves for the backward pass of ``run(x)``."""
    import torch

    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run(x).sum().backward()
    return sum(storages.values()) / 2**20


def measure(case: str, shape: str, device: str, min_time: float) -> dict:
    """One case in this process (the child side)."""
    import torch

    batch, steps, inputs, hidden = parse_shape(shape)
    torch.manual_seed(0)
    run, module = build(case, inputs, hidden)
    module.to(device)
    x = torch.randn(batch, steps, inputs, device=device)

    def once() -> None:
        module.zero_grad(set_to_none=True)
        run(x).sum().backward()

    def synchronize() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        baseline_cuda = torch.cuda.memory_allocated()
        once()  # warm-up, and the memory pass
        synchronize()
        memory_mib = (torch.cuda.max_memory_allocated() - baseline_cuda) / 2**20
    else:
        memory_mib = saved_for_backward_mib(run, x)
    if device.startswith("cuda"):
        once()  # warm-up (on the CPU the memory pass above was one)
        synchronize()
    iterations, started = 0, time.perf_counter()
    while True:
        once()
        iterations += 1
        synchronize()
        elapsed = time.perf_counter() - started
        if elapsed >= min_time and iterations >= 2:
            break
    return {
        "case": case,
        "shape": shape,
        "device": device,
        "sequences_per_s": batch * iterations / elapsed,
        "ms_per_iteration": 1000 * elapsed / iterations,
        "memory_mib": memory_mib,
        "memory_kind": "peak allocated" if device.startswith("cuda") else "saved for backward",
    }


def run_case(case: str, shape: str, device: str, min_time: float) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        case,
        shape,
        "--device",
        device,
        "--min-time",
        str(min_time),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"case": case, "shape": shape, "device": device, "error": done.stderr[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="*", help="registered cells (default: all)")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=DEFAULT_VARIANTS,
        help="extra rows as cell:key=value[,key=value]",
    )
    parser.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="BxTxIxH")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds timed per case")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure(*args.child, args.device, args.min_time)))
        return

    from fwlab.registry import Registry

    cells = args.cells or Registry().names("cell")
    cases = [REFERENCE, *cells, *[v for v in args.variants if v.split(":")[0] in cells]]
    results = []
    for shape in args.shapes:
        rows = {case: run_case(case, shape, args.device, args.min_time) for case in cases}
        reference = rows[REFERENCE].get("sequences_per_s")
        for row in rows.values():
            if reference and "sequences_per_s" in row:
                row["ratio_to_torch_lstm"] = row["sequences_per_s"] / reference
            results.append(row)
    _print_table(results)
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "device": args.device,
            "device_name": _device_name(args.device),
        },
        "results": results,
    }
    with open(args.json, "w") as file:
        json.dump(report, file, indent=2)
    print(f"\nwrote {args.json}")


def _print_table(results: list[dict]) -> None:
    header = (
        f"{'shape BxTxIxH':<16} {'cell':<26} {'seq/s':>10} {'ms/iter':>9} {'MiB':>9} {'vs LSTM':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        if "error" in row:
            print(f"{row['shape']:<16} {row['case']:<26} error: {row['error'].splitlines()[-1]}")
            continue
        print(
            f"{row['shape']:<16} {row['case']:<26} {row['sequences_per_s']:>10.1f} "
            f"{row['ms_per_iteration']:>9.2f} {row['memory_mib']:>9.1f} "
            f"{row.get('ratio_to_torch_lstm', float('nan')):>8.3f}"
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
