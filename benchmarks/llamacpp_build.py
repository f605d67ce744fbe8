"""Build llama.cpp's `llama-bench` and `llama-quantize` once, from the source the PyPI sdist of
llama-cpp-python vendors, cached outside the repository.

    .venv/bin/python benchmarks/llamacpp_build.py [--version 0.3.36]   # prints the bin directory

Cache: ``$ACTSPARSE_BENCH_CACHE`` (default ``~/.cache/actsparse-bench``)/llama.cpp-<version>/, holding
the sdist, the unpacked source and the build; a finished build is re-used as it is. cmake + Ninja,
Release, ``GGML_NATIVE=ON``, curl and OpenSSL off; about 17 minutes on one core of the 2-core
benchmark machine (run it under ``nice``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

DEFAULT_VERSION = "0.3.36"
TARGETS = ("llama-bench", "llama-quantize")


def cache_root() -> Path:
    return Path(os.environ.get("ACTSPARSE_BENCH_CACHE") or Path.home() / ".cache" / "actsparse-bench")


def bin_dir(version: str) -> Path:
    return cache_root() / f"llama.cpp-{version}" / "build" / "bin"


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kw)


def _source(version: str) -> Path:
    home = cache_root() / f"llama.cpp-{version}"
    source = home / "source"
    if (source / "CMakeLists.txt").exists():
        return source
    sdist_dir = home / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    name = f"llama_cpp_python-{version}.tar.gz"
    if not (sdist_dir / name).exists():
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={version}", "-d", str(sdist_dir)])
    unpacked = home / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(sdist_dir / name) as tar:
        tar.extractall(unpacked, filter="data")
    vendored = unpacked / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (vendored / "CMakeLists.txt").exists():
        raise SystemExit(f"cpu_vs_llamacpp: error: {name} vendors no llama.cpp source at vendor/llama.cpp")
    vendored.rename(source)
    shutil.rmtree(unpacked)
    return source


def ensure_built(version: str = DEFAULT_VERSION) -> Path:
    """The directory holding `llama-bench` and `llama-quantize`, building them if not cached."""
    bins = bin_dir(version)
    if all((bins / t).exists() for t in TARGETS):
        return bins
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise SystemExit(f"cpu_vs_llamacpp: error: building llama.cpp needs {tool}; install the `bench` extra "
                             "(pip install -e '.[bench]') or the system package")
    source = _source(version)
    build = bins.parent
    _run(["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
          "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"])
    _run(["cmake", "--build", str(build), "--target", *TARGETS])
    return bins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python sdist version")
    print(ensure_built(parser.parse_args().version))


if __name__ == "__main__":
    main()
