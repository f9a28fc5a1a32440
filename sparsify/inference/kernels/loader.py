"""Build (once, cached) and load the C++ extension with ``torch.utils.cpp_extension.load``.

The build goes to ``$TORCH_EXTENSIONS_DIR`` when set, else to ``<repo>/.cache/torch_extensions``
(git-ignored) when running from a checkout, else torch's default (``~/.cache/torch_extensions``).
torch rebuilds only when a source changes and serializes concurrent builds with a lock file.

Anything that stops the build (no compiler, no ninja, a non-x86 compiler rejecting a flag) gives
one warning and ``None``: callers then use the pure-torch path, which computes the same numbers.

Environment switches (read once, at the first load):

* ``SPARSELLAMA_KERNELS=torch`` — never build; always the torch fallback.
* ``SPARSELLAMA_ISA=generic|avx2|avx512`` — cap the instruction set (for testing the portable paths).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

from sparsify.errors import ConfigError

logger = logging.getLogger(__name__)

NAME = "sparsellama_kernels"
SOURCES = ("sparse_gemv.cpp", "sparse_gemv_avx2.cpp", "sparse_gemv_avx512.cpp")
HEADERS = ("kernels.h", "generic.h", "outer.h", "attention.h")
ISA_NAMES = ("generic", "avx2", "avx512")

_HERE = Path(__file__).resolve().parent
_state: dict = {}  # "module": ModuleType | None once a load was tried


def build_directory() -> Path:
    """Where the extension is built and cached."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env) / NAME
    repo = _HERE.parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "torch_extensions" / NAME
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(NAME, verbose=False))


def _ninja_on_path() -> str | None:
    """A directory to add to PATH for ninja: the venv's bin (not on PATH without activation)."""
    if shutil.which("ninja"):
        return None
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # the PyPI wheel

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for d in candidates:
        if (d / "ninja").is_file():
            return str(d)
    return None


def compile_kernels(name: str, source_dir: Path, build_dir: Path, verbose: bool = False) -> ModuleType:
    """Compile the kernel sources in ``source_dir`` (SOURCES, HEADERS) into module ``name`` under
    ``build_dir`` and import it. Also used to build an older revision's kernels next to the current
    ones (benchmarks/kernel_ab.py)."""
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    extra_path = _ninja_on_path()
    old_path = os.environ.get("PATH", "")
    if extra_path:
        os.environ["PATH"] = extra_path + os.pathsep + old_path
    try:
        return load(
            name=name,
            sources=[str(source_dir / s) for s in SOURCES],
            extra_include_paths=[str(source_dir)],
            # -O3 for the auto-vectorized portable loops; OpenMP for threads. No -march: the AVX2 and
            # AVX-512 code is enabled per file by `#pragma GCC target` and chosen at run time.
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=verbose,
        )
    finally:
        if extra_path:
            os.environ["PATH"] = old_path


def _build(verbose: bool) -> ModuleType:
    return compile_kernels(NAME, _HERE, build_directory(), verbose)


def load_extension(verbose: bool = False) -> ModuleType | None:
    """The compiled extension, building it on first use; None (after one warning) if it cannot be built."""
    if "module" in _state:
        return _state["module"]
    module = None
    if os.environ.get("SPARSELLAMA_KERNELS", "").lower() == "torch":
        logger.info("SPARSELLAMA_KERNELS=torch: using the pure-torch sparse path")
    else:
        try:
            module = _build(verbose)
        except Exception as err:  # any build/load failure → the exact torch fallback
            warnings.warn(
                f"sparsellama: could not build the sparse CPU kernels ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}); using the slower "
                "pure-torch path, which gives the same results",
                RuntimeWarning,
                stacklevel=2,
            )
    _state["module"] = module
    return module


def available_isa() -> int:
    """The best instruction set the kernels may use here: 0 generic, 1 AVX2, 2 AVX-512; -1 no extension."""
    module = load_extension()
    if module is None:
        return -1
    isa = int(module.best_isa())  # cpuid + OS support, checked in C++
    # Respect torch's own dispatch cap too (ATEN_CPU_CAPABILITY=avx2/default lowers it).
    import torch

    torch_cap = torch.backends.cpu.get_cpu_capability()
    if torch_cap == "AVX2":
        isa = min(isa, 1)
    elif not torch_cap.startswith("AVX512"):
        isa = 0
    cap = os.environ.get("SPARSELLAMA_ISA", "").lower()
    if cap:
        if cap not in ISA_NAMES:
            raise ConfigError(f"SPARSELLAMA_ISA must be one of {ISA_NAMES}, got {cap!r}")
        isa = min(isa, ISA_NAMES.index(cap))
    return isa
