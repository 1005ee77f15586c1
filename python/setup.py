"""setup.py — builds libmoegen from this repository with CMake and the moegen._C extension over it.

`pip install ./python` (or `pip install .` from the repository root) runs CMake on the repository
(Release, no tests, no benchmarks), bundles libmoegen.so, the `moegen` command and the shipped
tuning databases into the package (moegen/lib, moegen/bin, moegen/share/moegen), and links the
extension to the bundled library (rpath $ORIGIN/lib). Needs cmake, a C compiler, Lua 5.4 and
libyaml (scripts/setup.sh installs them).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the repository: CMakeLists.txt, include/, runtime/, ...


class BuildWithLibmoegen(build_ext):
    """Build libmoegen with CMake first, then the extension against it."""

    def run(self):
        if not (ROOT / "CMakeLists.txt").is_file():
            sys.exit(f"moegen: {ROOT} is not the moegen repository (no CMakeLists.txt)")
        cmake_build = Path(self.build_temp).resolve() / "libmoegen"
        jobs = str(os.cpu_count() or 2)
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(cmake_build), "-DCMAKE_BUILD_TYPE=Release",
                               "-DMOEGEN_BUILD_TESTS=OFF", "-DMOEGEN_BUILD_BENCH=OFF", "-DMOEGEN_MPI=OFF"])
        subprocess.check_call(["cmake", "--build", str(cmake_build), "-j", jobs, "--target", "moegen_shared",
                               "moegen"])
        package = Path(self.build_lib) / "moegen"
        (package / "lib").mkdir(parents=True, exist_ok=True)
        (package / "bin").mkdir(parents=True, exist_ok=True)
        real = (cmake_build / "libmoegen.so").resolve()  # libmoegen.so.X.Y.Z
        soname = "libmoegen.so.0"
        shutil.copy2(real, package / "lib" / soname)
        shutil.copy2(cmake_build / "moegen", package / "bin" / "moegen")
        data = package / "share" / "moegen"
        if data.exists():
            shutil.rmtree(data)
        shutil.copytree(ROOT / "tuning", data / "tuning")
        for ext in self.extensions:
            ext.include_dirs.append(str(ROOT / "include" / "moegen"))
            ext.library_dirs.append(str(package / "lib"))
            ext.extra_link_args += [f"-l:{soname}", "-Wl,-rpath,$ORIGIN/lib"]
        super().run()
        if self.inplace:  # `pip install -e`: the bundled files next to the sources too
            for part in ("lib", "bin", "share"):
                target = HERE / "moegen" / part
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(package / part, target)


setup(
    ext_modules=[Extension("moegen._C", sources=["moegen/_C.c"], extra_compile_args=["-std=c11", "-Wall"])],
    cmdclass={"build_ext": BuildWithLibmoegen},
    package_data={"moegen": ["lib/*", "bin/*", "share/moegen/tuning/*", "py.typed"]},
)
