"""C kernels for the CPU: compiled from source with the system's C compiler on first use, cached
on disk, and called through ``ctypes``.

A C kernel runs a cell's whole time loop in one call each way: a step's element-wise work in a
few passes, where ATen would make a pass over the step's tensors per operation, and the per-step
products with its own small-product code (``step_products.h``: at a batch of 16 a BLAS call per
step is slow). The products over all steps (weight gradients) stay with torch (MKL/oneDNN).
The source is compiled once per dtype (``REAL`` is ``float`` or ``double``; ``NAME(f)`` gives
``f_float`` or ``f_double``), with ``-ffast-math`` so that the compiler vectorises ``exp``
through glibc's vector math library. The object is linked without it, so that the library does
not switch the whole process to flush-to-zero when it is loaded. Where the compiler has OpenMP
the library is built with it, and a kernel's parallel region runs on torch's threads.

The compiled library is cached under ``$FWLAB_KERNEL_CACHE`` (default
``~/.cache/fwlab/kernels``), keyed by the source (with the files it includes from its own
folder, ``#include "name.h"``), the compiler and the CPU's vector extension,
so a node of a cluster with another CPU builds its own. Without a compiler the cells run their
PyTorch code, and ``auto`` says why once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

_DTYPES = {torch.float32: "float", torch.float64: "double"}


class NativeKernelUnavailable(RuntimeError):
    """The C kernel cannot be built or loaded here; the message says why."""


def dtype_suffix(dtype: torch.dtype) -> str | None:
    """``float`` or ``double``: the suffix of a kernel's symbols for tensors of ``dtype``, or
    ``None`` for a dtype the kernels do not take."""
    return _DTYPES.get(dtype)


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$FWLAB_KERNEL_CACHE``, else the user's cache folder."""
    configured = os.environ.get("FWLAB_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fwlab" / "kernels"


def _compiler() -> str:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise NativeKernelUnavailable(f"no C compiler ({compiler!r} is not on PATH; set CC)")
    return compiler


def compiler_missing() -> str | None:
    """Why no C kernel can be built here, found without building one (no compiler on PATH), or
    ``None``. A compiler that is there but fails is found only by building."""
    try:
        _compiler()
    except NativeKernelUnavailable as error:
        return str(error)
    return None


def _vector_flags() -> list[str]:
    """The widest vector extension torch itself uses on this CPU (x86 only; elsewhere the
    compiler's default target)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"]
    if capability == "AVX2":
        return ["-mavx2", "-mfma"]
    return []


def _wrapper(source: Path) -> str:
    """The source included once per dtype."""
    parts = []
    for real in _DTYPES.values():
        parts += [
            f"#define REAL {real}",
            f"#define NAME(x) x##_{real}",
            f'#include "{source.resolve()}"',
            "#undef REAL",
            "#undef NAME",
        ]
    return "\n".join(parts) + "\n"


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def _source_text(source: Path) -> str:
    """The text of ``source`` and of the files it includes with quotes from beside it (or by a
    path, relative to it or absolute), in order: what a build depends on, so an edit to any of
    them makes a new library. (A quoted name not found there is left to the compiler, which says
    so if it is nowhere.)"""
    text = source.read_text()
    beside = [source.parent / name for name in _LOCAL_INCLUDE.findall(text)]
    return "\0".join([text, *[_source_text(path) for path in beside if path.is_file()]])


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()[-2000:]
        raise NativeKernelUnavailable(f"{' '.join(command[:2])} … failed:\n{message}")


@functools.cache
def load(source: Path) -> ctypes.CDLL:
    """The compiled library of C file ``source``, built (into the cache) if it is not yet:
    with OpenMP where the compiler has it, else without (one thread).

    Raises :class:`NativeKernelUnavailable` with the compiler's message if it cannot be built."""
    compiler = _compiler()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    for threading in (["-fopenmp"], []):
        flags = ["-O3", "-std=c11", "-fPIC", "-ffast-math", *threading, *_vector_flags()]
        key = hashlib.sha256(
            "\0".join([_source_text(source), compiler, version, *flags]).encode()
        ).hexdigest()[:16]
        library = cache_dir() / f"{source.stem}-{key}.so"
        if library.exists():
            break
        try:
            _build(source, library, compiler, flags, threading)
            break
        except NativeKernelUnavailable as error:
            failure = error  # the build without OpenMP says why a build fails altogether
    else:
        raise failure
    try:
        return ctypes.CDLL(str(library))
    except OSError as error:
        raise NativeKernelUnavailable(f"cannot load {library}: {error}") from error


def _build(
    source: Path, library: Path, compiler: str, flags: list[str], link_flags: list[str]
) -> None:
    """Compiles ``source`` (once per dtype) into the shared library ``library``.

    OpenMP (``-fopenmp``) links ``libgomp.so.1``: in a process where torch has loaded its own
    (PyTorch's wheels bundle it, under that soname) the loader reuses that one, so a kernel's
    parallel loops run on torch's OpenMP threads, ``torch.get_num_threads()`` of them, rather
    than on a second pool competing for the same cores."""
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as build:
            wrapper, obj = Path(build, "kernel.c"), Path(build, "kernel.o")
            wrapper.write_text(_wrapper(source))
            _run([compiler, *flags, "-c", str(wrapper), "-o", str(obj)])
            built = Path(build, library.name)
            _run([compiler, "-shared", *link_flags, str(obj), "-o", str(built), "-lm"])
            os.replace(built, library)  # atomic: processes building at once (DDP ranks) agree
    except OSError as error:
        raise NativeKernelUnavailable(
            f"cannot build in the kernel cache {library.parent} ({error}); "
            "set FWLAB_KERNEL_CACHE to a writable folder"
        ) from error


@functools.cache
def unavailable_reason(source: Path) -> str | None:
    """Why ``source``'s kernel cannot run here, or ``None`` if it can (building it if needed)."""
    try:
        load(source)
    except NativeKernelUnavailable as error:
        return str(error)  # with the compiler's message, if it failed
    return None


def structure(
    name: str, ints: Sequence[str], doubles: Sequence[str], pointers: Sequence[str]
) -> type[ctypes.Structure]:
    """The ctypes twin of a kernel's argument struct, whose C declaration lists ``int64_t``
    fields, then ``double`` ones, then pointers, in these orders."""
    fields = [(field, ctypes.c_int64) for field in ints]
    fields += [(field, ctypes.c_double) for field in doubles]
    fields += [(field, ctypes.c_void_p) for field in pointers]
    return type(name, (ctypes.Structure,), {"_fields_": fields})


def fill(
    struct: type[ctypes.Structure],
    settings: Sequence[int | float],
    tensors: dict[str, torch.Tensor],
) -> ctypes.Structure:
    """An argument struct of type ``struct``: its numbers from ``settings`` in order, its
    pointers the addresses of ``tensors`` by field name (NULL for a field not given)."""
    pointers = [field for field, kind in struct._fields_ if kind is ctypes.c_void_p]
    return struct(*settings, *[pointer(tensors.get(field)) for field in pointers])


def run_pass(source: Path, function: str, buffers: ctypes.Structure, steps: int) -> None:
    """Calls ``function`` of ``source``'s library, a kernel's pass over ``steps`` steps, on its
    argument struct ``buffers``. A pass returns 0, or −1 (having computed nothing) when it
    cannot allocate its working memory (the packed weights of its per-step products and its
    scratch): a ``MemoryError`` here."""
    if getattr(load(source), function)(ctypes.byref(buffers), steps) != 0:
        raise MemoryError(
            f"{function}: cannot allocate the packed weights of the step products and its scratch"
        )


def cannot_run(source: Path, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``source``'s kernel cannot run on ``device`` in ``dtype``, or ``None`` (building it
    on first use)."""
    if device.type != "cpu":
        return f"the C kernel runs on the CPU, not {device.type}"
    if dtype_suffix(dtype) is None:
        return f"the C kernel takes float32 or float64, not {dtype}"
    return unavailable_reason(source)


def pointer(tensor: torch.Tensor | None) -> int | None:
    """The address of a contiguous CPU tensor's data, for a C kernel's argument struct."""
    if tensor is None:
        return None
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("a C kernel takes contiguous CPU tensors")
    return tensor.data_ptr()
