"""Forward+backward throughput and memory of every registered cell, against torch.nn.LSTM.

    python scripts/bench.py                       # every cell, the three standard shapes
    python scripts/bench.py --device cuda --json bench-cuda.json
    python scripts/bench.py --cells fast_weights --shapes 128x11x100x100

Each measurement runs in a fresh subprocess (``--in-process``: all in this one, where starting
processes costs more than measuring; CUDA memory peaks are still per case), on each available
path:

- ``eager``: the module as written;
- ``graph`` (CUDA): forward and backward captured once as a CUDA graph and replayed, which
  removes the per-kernel launch cost of the Python time loop (static shapes only);
- ``fused`` (cells with a kernel for the device, where the case's settings allow it: not
  fast weights' matrix form): on CUDA the cell's Triton kernel, the whole time loop in one
  launch each way, inside a captured graph as training runs it; on the CPU its C kernel
  (``kernel=c``), the whole time loop in one call each way. ``eager`` and ``graph`` run such
  cells with ``kernel=torch``, their PyTorch reference.

Float32 products follow ``--matmul-precision`` (torch's setting; default ``high``, fwlab's
default for runs), for torch's products and the fused kernels alike; cuDNN's LSTM uses TF32
unless ``torch.backends.cudnn.allow_tf32`` is off (each row records both).

Memory, in MiB: on CUDA the peak of ``torch.cuda.max_memory_allocated`` during forward+backward
(for ``graph``, the graph's memory pool included); on the CPU, where the allocator keeps no such
count, the activations saved for the backward pass (each storage counted once, through
``torch.autograd.graph.saved_tensors_hooks``), which is what grows with B and T.
Throughput is sequences per second of one forward and backward pass (sum of the outputs as the
loss), after warm-up, timed over at least ``--min-time`` seconds; with ``--rounds N`` every
case is measured N times, the rounds interleaved, and keeps its best. ``ratio_vs_lstm`` divides a
row's throughput by the better of ``torch.nn.LSTM``'s eager and graph paths on the same device
in the same run (above 1: faster than the LSTM). ``--json PATH`` writes the list of rows.

``--paired`` also measures each case against ``torch.nn.LSTM`` (eager) in the same process, in
alternating slices of about 0.1 s (LSTM, case, LSTM): ``ratio_vs_lstm_paired`` is the median
over slices of the LSTM's time over the case's, with its quartiles. On a machine whose speed
drifts between minutes (shared CPUs), where cases measured a minute apart are not comparable,
this ratio holds still; the throughput columns do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from fwlab.config import MatmulPrecision

# Shapes (B, T, I, H): retrieval (Ba et al.), glimpses-sized inputs, pixel-by-pixel MNIST.
DEFAULT_SHAPES = ["128x11x100x100", "16x50x405x200", "64x784x1x100"]
REFERENCE = "torch.nn.LSTM"
# Extra rows: the two fast-weights forms, besides the `auto` default.
DEFAULT_VARIANTS = [
    "fast_weights:form=matrix",
    "fast_weights:form=memory",
    "fast_weights:form=matrix,checkpoint_every=28",  # memory-lean: √784 steps per chunk
]
PATHS = ("eager", "graph", "fused")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    batch, steps, inputs, hidden = (int(v) for v in text.lower().split("x"))
    return batch, steps, inputs, hidden


def build(case: str, input_size: int, hidden_size: int, path: str = "eager", device: str = "cpu"):
    import torch

    if case == REFERENCE:
        lstm = torch.nn.LSTM(input_size, hidden_size, batch_first=True)
        return lambda x: lstm(x)[0], lstm
    from fwlab.registry import Registry

    name, _, assignments = case.partition(":")
    cell_cls = Registry().get("cell", name)
    import yaml

    pairs = (a.split("=", 1) for a in assignments.split(",") if a)
    overrides = {key: yaml.safe_load(value) for key, value in pairs}  # "28" -> 28
    if _has_kernel_option(cell_cls):
        fused = "triton" if device.startswith("cuda") else "c"
        overrides.setdefault("kernel", fused if path == "fused" else "torch")
    elif path == "fused":
        raise SystemExit(f"{name} has no fused kernel")
    config = cell_cls.Config(hidden_size=hidden_size, **overrides)
    cell = cell_cls(input_size, config)
    return lambda x: cell(x)[0], cell


def saved_for_backward_mib(run, x) -> float:
    """MiB of the distinct storages autograd saves for the backward pass of ``run(x)``."""
    from fwlab.saved_memory import saved_for_backward_bytes

    return saved_for_backward_bytes(lambda: run(x).sum().backward()) / 2**20


def measure(
    case: str,
    shape: str,
    device: str,
    path: str,
    min_time: float,
    precision: str = "high",
    paired: bool = False,
) -> dict:
    """One case on one path in this process (the child side)."""
    import torch

    torch.set_float32_matmul_precision(precision)
    batch, steps, inputs, hidden = parse_shape(shape)
    torch.manual_seed(0)
    run, module = build(case, inputs, hidden, path, device)
    module.to(device)
    x = torch.randn(batch, steps, inputs, device=device)
    cuda = device.startswith("cuda")

    def training_pass(run, module) -> Callable[[], None]:
        def one_pass() -> None:
            module.zero_grad(set_to_none=True)
            run(x).sum().backward()

        return one_pass

    eager = training_pass(run, module)

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline_cuda = torch.cuda.memory_allocated()
    if path == "graph" and not cuda:
        raise SystemExit("the graph path needs CUDA")
    if cuda and path in ("graph", "fused"):  # on the CPU, fused is the C kernel, run eagerly
        once = capture_forward_backward(run, module, x)
    else:
        once = eager
    if cuda:
        once()  # warm-up, and the memory pass
        synchronize()
        memory_mib = (torch.cuda.max_memory_allocated() - baseline_cuda) / 2**20
        once()
        synchronize()
    else:
        memory_mib = saved_for_backward_mib(run, x)

    def timed(function, iterations: int) -> float:
        started = time.perf_counter()
        for _ in range(iterations):
            function()
        synchronize()
        return time.perf_counter() - started

    extra = {}
    if paired:
        reference_run, reference_module = build(REFERENCE, inputs, hidden)
        reference = training_pass(reference_run, reference_module.to(device))
        timed(reference, 2)  # warm-up
        per_slice = max(1, round(0.1 / max(timed(once, 1), 1e-6)))
        ratios, iterations, elapsed = [], 0, 0.0
        while elapsed < min_time or len(ratios) < 3:
            before = timed(reference, per_slice)
            own = timed(once, per_slice)
            after = timed(reference, per_slice)
            ratios.append((before + after) / 2 / own)
            iterations, elapsed = iterations + per_slice, elapsed + own
        quartiles = statistics.quantiles(ratios, n=4)
        extra = {
            "ratio_vs_lstm_paired": quartiles[1],
            "ratio_vs_lstm_paired_quartiles": [quartiles[0], quartiles[2]],
            "paired_slices": len(ratios),
        }
    else:
        iterations, elapsed = 0, 0.0
        while elapsed < min_time or iterations < 2:
            elapsed += timed(once, 1)
            iterations += 1
    return {
        **extra,
        "cell": case,
        "shape": shape,
        "device": device,
        "path": path,
        "seq_per_s": batch * iterations / elapsed,
        "ms_per_iteration": 1000 * elapsed / iterations,
        "peak_mib": memory_mib,
        "memory_kind": "peak allocated" if cuda else "saved for backward",
        "matmul_precision": precision,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


def capture_forward_backward(run, module, x):
    """A CUDA graph of zeroing the gradients, the forward and the backward pass on ``x``
    (static shapes); returns its replay. Warm-up runs on a side stream, as capture requires."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            module.zero_grad(set_to_none=False)
            run(x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for parameter in module.parameters():
            if parameter.grad is not None:
                parameter.grad.zero_()
        run(x).sum().backward()
    return graph.replay


def run_case(
    case: str,
    shape: str,
    device: str,
    path: str,
    min_time: float,
    precision: str,
    paired: bool,
    in_process: bool = False,
) -> dict:
    if in_process:
        import gc

        try:
            return measure(case, shape, device, path, min_time, precision, paired)
        except (Exception, SystemExit) as error:  # a row that says why, as a child's does
            return {"cell": case, "shape": shape, "device": device, "path": path,
                    "error": f"{type(error).__name__}: {error}"[-500:]}  # fmt: skip
        finally:
            gc.collect()  # the case's CUDA graph and its memory pool go before the next case
    command = [sys.executable, __file__, "--child", case, shape, path, "--device", device,
               "--min-time", str(min_time), "--matmul-precision", precision]  # fmt: skip
    if paired:
        command.append("--paired")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"cell": case, "shape": shape, "device": device, "path": path,
                "error": done.stderr[-500:] or done.stdout[-500:]}  # fmt: skip
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
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="sweeps over all cases, interleaved; each case keeps its best (noisy machines)",
    )
    parser.add_argument(
        "--matmul-precision",
        default="high",
        choices=[precision.value for precision in MatmulPrecision],
        help="torch.set_float32_matmul_precision in every measurement",
    )
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    parser.add_argument(
        "--paths",
        nargs="*",
        choices=PATHS,
        help="eager, graph, fused (default: eager and fused; all three on CUDA)",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="also time each case against torch.nn.LSTM in alternating slices in its process "
        "(ratio_vs_lstm_paired: robust to a machine's drift)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure every case in this process, not one subprocess each: for a GPU lease, "
        "where a subprocess's start (imports, CUDA context) costs more than its measurement",
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("CASE", "SHAPE", "PATH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    if args.child:
        case, shape, path = args.child
        row = measure(
            case, shape, args.device, path, args.min_time, args.matmul_precision, args.paired
        )
        print(json.dumps(row))
        return

    from fwlab.registry import Registry

    check_arguments(parser, args)
    cuda = args.device.startswith("cuda")
    paths = args.paths or (list(PATHS) if cuda else ["eager", "fused"])
    registry = Registry()
    cells = args.cells or registry.names("cell")
    cases = [REFERENCE, *cells, *[v for v in args.variants if v.split(":")[0] in cells]]
    fused_cells = {name for name in cells if _has_kernel_option(registry.get("cell", name))}
    fused_cases = set()  # the cases whose settings the cell's kernel takes
    if "fused" in paths:
        fused_cases = {
            c for c in cases if c.split(":")[0] in fused_cells and _fused_applies(c, args.device)
        }
    device_name = _device_name(args.device)
    results = []
    for shape in args.shapes:
        runs = [(case, path) for case in cases for path in paths
                if path != "fused" or case in fused_cases]  # fmt: skip
        best: dict[tuple[str, str], dict] = {}
        for _ in range(args.rounds):  # interleaved rounds: a machine's slow spell hits all cases
            for case, path in runs:
                row = run_case(case, shape, args.device, path, args.min_time,
                               args.matmul_precision, args.paired, args.in_process)  # fmt: skip
                kept = best.get((case, path))
                if kept is None or row.get("seq_per_s", -1) > kept.get("seq_per_s", -1):
                    best[(case, path)] = row
                print(_progress(row), file=sys.stderr, flush=True)
                # after every case: a run cut off (a time limit) keeps the rows it measured
                _write(args.json, results + _with_ratios(best, runs, device_name))
        results += _with_ratios(best, runs, device_name)
        _write(args.json, results)
    _print_table(results)
    print(f"\n{device_name}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"wrote {args.json}")


def _with_ratios(
    best: dict[tuple[str, str], dict], runs: list[tuple[str, str]], device_name: str
) -> list[dict]:
    """One shape's rows measured so far, in run order, with ``ratio_vs_lstm`` where the
    reference (measured first) has a row."""
    rows = [best[run] for run in runs if run in best]
    best_lstm = max(
        (r["seq_per_s"] for r in rows if r["cell"] == REFERENCE and "seq_per_s" in r),
        default=None,
    )
    for row in rows:
        row["device_name"] = device_name
        if best_lstm and "seq_per_s" in row:
            row["ratio_vs_lstm"] = row["seq_per_s"] / best_lstm
    return rows


def _write(path: str, rows: list[dict]) -> None:
    with open(path, "w") as file:
        json.dump(rows, file, indent=2)


def _progress(row: dict) -> str:
    """A case's line as it is measured (stderr; the table comes at the end)."""
    what = f"{row['shape']} {row['cell']} {row['path']}"
    if "error" in row:
        return f"{what}: error"
    return f"{what}: {row['ms_per_iteration']:.3f} ms/iter, {row['seq_per_s']:.1f} seq/s"


def _print_table(results: list[dict]) -> None:
    paired = any("ratio_vs_lstm_paired" in row for row in results)
    header = (
        f"{'shape BxTxIxH':<16} {'cell':<44} {'path':<6} {'seq/s':>10} {'ms/iter':>9} "
        f"{'MiB':>9} {'vs LSTM':>8}" + (f" {'paired (q1-q3)':>20}" if paired else "")
    )
    print(header)
    print("-" * len(header))
    for row in results:
        if "error" in row:
            last = (row["error"].strip().splitlines() or ["?"])[-1]
            print(f"{row['shape']:<16} {row['cell']:<44} {row['path']:<6} error: {last}")
            continue
        line = (
            f"{row['shape']:<16} {row['cell']:<44} {row['path']:<6} {row['seq_per_s']:>10.1f} "
            f"{row['ms_per_iteration']:>9.2f} {row['peak_mib']:>9.1f} "
            f"{row.get('ratio_vs_lstm', float('nan')):>8.3f}"
        )
        if "ratio_vs_lstm_paired" in row:
            low, high = row["ratio_vs_lstm_paired_quartiles"]
            line += f" {row['ratio_vs_lstm_paired']:>7.3f} ({low:.2f}-{high:.2f})"
        print(line)


def _fused_applies(case: str, device: str) -> bool:
    """Whether a case's cell has a kernel for ``device`` and can take it with the case's
    settings (a variant that forces, say, fast weights' matrix form cannot); says why not on
    stderr."""
    try:
        build(case, 1, 8, path="fused", device=device)
    except ValueError as error:
        print(f"{case}: no fused path ({error})", file=sys.stderr)
        return False
    return True


def _has_kernel_option(cell_cls) -> bool:
    """Whether a cell's config has ``kernel`` (fused paths besides its PyTorch code)."""
    import dataclasses

    return "kernel" in {field.name for field in dataclasses.fields(cell_cls.Config)}


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with argparse's usage error, naming the option and the value, before anything is
    measured: a shape that is not BxTxIxH, a device torch cannot use, a cell that is not
    registered, or a variant whose settings its cell refuses (each variant is built once, tiny)."""
    from fwlab.registry import Registry

    for shape in args.shapes:
        try:
            parse_shape(shape)
        except ValueError:
            parser.error(f"--shapes {shape}: expected BxTxIxH, four integers (128x11x100x100)")
    if args.device.startswith("cuda") and not _cuda_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    known = Registry().names("cell")
    for cell in args.cells or []:
        if cell not in known:
            parser.error(f"--cells {cell}: not a registered cell ({', '.join(known)})")
    for variant in args.variants:
        if variant.split(":")[0] not in known:
            parser.error(f"--variants {variant}: not a registered cell ({', '.join(known)})")
        try:
            build(variant, 2, 2)
        except Exception as error:  # noqa: BLE001 - whatever the cell's config refuses
            parser.error(f"--variants {variant}: {type(error).__name__}: {error}")


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
