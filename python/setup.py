"""Builds libfedcdd with cargo and puts it inside the package.

`pip install ./python` runs this on a machine with Rust: `cargo build --release -p fedcdd-ffi`
in the repository this directory belongs to (or in $FEDCDD_SOURCE), then the shared library is
copied next to fedcdd/__init__.py. The wheel is tagged py3-none-<platform>: the library is
loaded with ctypes, so one wheel serves every Python 3 version of a platform.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    from wheel.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover
    bdist_wheel = None

HERE = Path(__file__).resolve().parent
LIB_NAMES = {"linux": "libfedcdd.so", "darwin": "libfedcdd.dylib", "win32": "fedcdd.dll"}


def lib_name() -> str:
    for prefix, name in LIB_NAMES.items():
        if sys.platform.startswith(prefix):
            return name
    return "libfedcdd.so"


class BuildWithCargo(build_py):
    def run(self) -> None:
        source = Path(os.environ.get("FEDCDD_SOURCE", HERE.parent)).resolve()
        if not (source / "Cargo.toml").is_file():
            raise SystemExit(
                f"fedcdd: no Cargo workspace at {source}; set FEDCDD_SOURCE to the fedcdd source tree"
            )
        target = Path(os.environ.get("CARGO_TARGET_DIR", source / "target"))
        cmd = ["cargo", "build", "--release", "-p", "fedcdd-ffi"]
        print("fedcdd: building libfedcdd:", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=source, check=True)
        built = target / "release" / lib_name()
        if not built.is_file():
            raise SystemExit(f"fedcdd: cargo did not produce {built}")
        dst = HERE / "fedcdd" / lib_name()
        shutil.copy2(built, dst)
        super().run()


cmdclass = {"build_py": BuildWithCargo}

if bdist_wheel is not None:

    class PlatformWheel(bdist_wheel):
        def finalize_options(self) -> None:
            super().finalize_options()
            self.root_is_pure = False

        def get_tag(self):  # type: ignore[no-untyped-def]
            _, _, plat = super().get_tag()
            return "py3", "none", plat

    cmdclass["bdist_wheel"] = PlatformWheel

setup(cmdclass=cmdclass)
