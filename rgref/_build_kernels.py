"""Build the compiled kernels, the extension module `rgref._kernels`, with cffi.

cffi's out-of-line API mode compiles the kernel sources in csrc/ (SOURCES) with
the generated wrapper code into one extension module. Two ways to run it:

  python rgref/_build_kernels.py    compile in place (what `make build` runs), so the
                                    source tree and an editable install find it;
                                    --probe only reports compiler and OpenMP
  pip install [-e] .                setup.py builds it through `cffi_modules`

Environment:
  CC                  the C compiler (default: the one Python was built with)
  RGREF_NO_OPENMP=1   build without OpenMP: the kernels then run on one thread

OpenMP is probed by compiling a small program with `-fopenmp`. When that fails,
the build goes on without it. The flags keep IEEE arithmetic: -O3, never
-ffast-math, and -ffp-contract=off so that the compiler fuses no multiply-add
that the source does not ask for. There is no -march=native: the AVX2 code is
chosen at run time, so a module built on x86-64 runs on any x86-64 CPU.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from cffi import FFI

SOURCE_DIR = pathlib.Path(__file__).resolve().parent.parent / "csrc"
HEADER = SOURCE_DIR / "rgref_kernels.h"
# The kernel sources, one per kernel family. csrc/check_*.c are stand-alone programs
# that measure the error of the vectorised exp and tanh, not part of the module.
SOURCES = [SOURCE_DIR / name for name in (
    "threads.c", "rg_lru.c", "linear.c", "block_diagonal.c", "attention.c", "conv1d.c",
    "elementwise.c", "rms_norm.c",
)]
INTERNAL_HEADERS = [SOURCE_DIR / "kernels_common.h"]

MODULE_NAME = "rgref._kernels"
# NOTE: GCC and Clang flags. The build has been run with GCC 12 on Linux x86-64 only.
# Apple's clang needs `-Xpreprocessor -fopenmp -lomp` and libomp, so there the probe
# fails and the module is built without OpenMP; MSVC would need /O2 /openmp instead.
COMPILE_ARGS = ["-O3", "-std=gnu11", "-ffp-contract=off"]
OPENMP_FLAG = "-fopenmp"

OPENMP_PROBE = """\
#include <omp.h>
int main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }
"""


def compiler_command() -> list[str]:
    """Return the C compiler command the build uses: $CC, else Python's own."""
    command = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(command)


def openmp_disabled() -> bool:
    return os.environ.get("RGREF_NO_OPENMP", "").strip().lower() not in ("", "0", "false", "no")


def probe_openmp(compiler: list[str]) -> bool:
    """Return whether `compiler` compiles and links an OpenMP program with -fopenmp."""
    with tempfile.TemporaryDirectory(prefix="rgref-openmp-probe-") as directory:
        source = pathlib.Path(directory) / "probe.c"
        source.write_text(OPENMP_PROBE)
        command = [*compiler, OPENMP_FLAG, str(source), "-o", str(pathlib.Path(directory) / "probe")]
        try:
            result = subprocess.run(command, capture_output=True, cwd=directory)
        except OSError:
            return False
    return result.returncode == 0


def describe_compiler(compiler: list[str]) -> str:
    """Return the first line of `compiler --version`, or why it could not run."""
    try:
        result = subprocess.run([*compiler, "--version"], capture_output=True, text=True)
    except OSError as error:
        return f"not runnable: {error}"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else f"exit status {result.returncode}"


def openmp_status() -> tuple[bool, str]:
    """Return whether to build with OpenMP and a one-line report of the choice."""
    compiler = compiler_command()
    version = describe_compiler(compiler)
    if openmp_disabled():
        return False, f"compiler: {shlex.join(compiler)} ({version}); OpenMP: off (RGREF_NO_OPENMP)"
    if probe_openmp(compiler):
        return True, f"compiler: {shlex.join(compiler)} ({version}); OpenMP: found ({OPENMP_FLAG})"
    return False, (
        f"compiler: {shlex.join(compiler)} ({version}); OpenMP: not found, "
        "building a single-threaded module"
    )


def declarations() -> str:
    """Return the header without preprocessor lines: the cdef cffi needs."""
    lines = HEADER.read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def make_ffibuilder(use_openmp: bool, absolute_paths: bool = False) -> FFI:
    """Return the cffi builder for `rgref._kernels`.

    setuptools wants source paths relative to the directory it runs in, but
    `FFI.compile` changes into its build directory first, so it needs absolute ones.
    """
    def path(file: pathlib.Path) -> str:
        return str(file) if absolute_paths else os.path.relpath(file, os.getcwd())

    builder = FFI()
    builder.cdef(declarations())
    openmp_args = [OPENMP_FLAG] if use_openmp else []
    options = {}
    if absolute_paths:
        # cffi's setuptools integration picks the stable ABI on its own, except on debug
        # and free-threaded builds of Python. FFI.compile needs the option set.
        options["py_limited_api"] = not (
            hasattr(sys, "gettotalrefcount") or sysconfig.get_config_var("Py_GIL_DISABLED")
        )
    builder.set_source(
        MODULE_NAME,
        '#include "rgref_kernels.h"',
        sources=[path(source) for source in SOURCES],
        include_dirs=[path(SOURCE_DIR)],
        depends=[path(header) for header in [HEADER, *INTERNAL_HEADERS]],
        extra_compile_args=COMPILE_ARGS + openmp_args,
        extra_link_args=openmp_args,
        **options,
    )
    return builder


USE_OPENMP, BUILD_REPORT = openmp_status()
ffibuilder = make_ffibuilder(USE_OPENMP)

if __name__ != "__main__":
    # setup.py loads this file through `cffi_modules`: report what the build uses.
    print(f"rgref kernels: {BUILD_REPORT}", file=sys.stderr)


def build_in_place() -> pathlib.Path:
    """Compile the module under build/cffi and copy it next to this file; return its path.

    The module uses the stable ABI (`_kernels.abi3.so`), as cffi's setuptools
    integration builds it, so `make build` and `pip install -e .` write the same file.
    Any other build of the module in the package is deleted: Python would import a
    version-tagged `_kernels.cpython-*.so` before the `.abi3.so`.
    """
    package_dir = pathlib.Path(__file__).resolve().parent
    build_dir = package_dir.parent / "build" / "cffi"
    builder = make_ffibuilder(USE_OPENMP, absolute_paths=True)
    built = pathlib.Path(builder.compile(tmpdir=str(build_dir), verbose=False))
    target = package_dir / built.name
    for stale in package_dir.glob("_kernels.*"):
        if stale.suffix in (".so", ".pyd") and stale.name != built.name:
            stale.unlink()
    # Write a new file and rename it over the old one: a running process that has the
    # old module loaded keeps its copy, where overwriting it in place could crash it.
    temporary = target.with_name(target.name + ".tmp")
    shutil.copyfile(built, temporary)
    os.replace(temporary, target)
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Compile rgref._kernels in place.")
    parser.add_argument(
        "--probe", action="store_true",
        help="only report the compiler and whether it supports OpenMP",
    )
    args = parser.parse_args(argv)
    if args.probe:
        print(f"rgref kernels: {BUILD_REPORT}", file=sys.stderr)
        return 0
    target = build_in_place()
    openmp = "with OpenMP" if USE_OPENMP else "without OpenMP"
    print(f"rgref kernels: built {target} ({openmp})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
