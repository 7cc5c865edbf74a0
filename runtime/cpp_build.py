"""Build the C++ runner (``runtime/cpp``: libtadsr + ``tadsr-cpp``) against the installed executorch wheel.

Used by the tests and the benchmark; an app builds ``runtime/cpp`` with its own CMake (see README). No
downloads: CMake finds the ExecuTorch package that the executorch wheel ships (``executorch/share/cmake``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from tadsr.errors import ConfigError

__all__ = ["CPP_SOURCE", "build_cpp_runner", "executorch_cmake_dir", "toolchain_problem"]

logger = logging.getLogger(__name__)

CPP_SOURCE = Path(__file__).resolve().parent / "cpp"


def executorch_cmake_dir() -> Path | None:
    """The executorch wheel's CMake package folder, or None when executorch (or its package) is not installed."""
    try:
        import executorch
    except ImportError:
        return None
    for root in getattr(executorch, "__path__", []):
        d = Path(root) / "share" / "cmake"
        if (d / "executorch-config.cmake").is_file():
            return d
    return None


def toolchain_problem(env: Mapping[str, str] | None = None) -> str | None:
    """Why the runner cannot be built here (missing cmake, C++ compiler, ExecuTorch package), or None."""
    path = (env or os.environ).get("PATH")
    if shutil.which("cmake", path=path) is None:
        return "cmake is not installed (apt-get install cmake)"
    if not any(shutil.which(c, path=path) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler (c++, g++ or clang++) on PATH"
    if executorch_cmake_dir() is None:
        return "the executorch wheel with its CMake package (executorch/share/cmake) is not installed"
    if not (CPP_SOURCE / "CMakeLists.txt").is_file():
        return f"the C++ sources are not in this installation ({CPP_SOURCE})"
    return None


def build_cpp_runner(build_dir: Path, *, jobs: int = 2, build_type: str = "Release") -> Path:
    """Configure and build ``runtime/cpp`` into ``build_dir``; returns it (holding libtadsr.so and tadsr-cpp).

    Raises:
        ConfigError: the toolchain is missing (see :func:`toolchain_problem`) or the build failed (the message
            carries the end of the compiler output).
    """
    problem = toolchain_problem()
    if problem:
        raise ConfigError(f"cannot build the C++ runner: {problem}")
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    steps = [
        ["cmake", "-S", str(CPP_SOURCE), "-B", str(build_dir), f"-DCMAKE_BUILD_TYPE={build_type}",
         f"-DCMAKE_PREFIX_PATH={executorch_cmake_dir()}"],
        ["cmake", "--build", str(build_dir), "-j", str(jobs)],
    ]  # fmt: skip
    for cmd in steps:
        run = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            tail = (run.stdout + run.stderr)[-3000:]
            raise ConfigError(f"building the C++ runner failed ({' '.join(cmd[:2])}):\n{tail}")
    logger.info("built the C++ runner in %s", build_dir)
    return build_dir
