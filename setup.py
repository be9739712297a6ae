"""Builds gradfuse._C: the CPU ops always, the CUDA ops when torch is a CUDA build and a
matching CUDA toolkit is installed (no GPU needed). GRADFUSE_CUDA=0/1 forces the choice."""
import glob
import os
import platform
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(message):
    print(f"[gradfuse setup] {message}", file=sys.stderr)


def is_real_toolkit(root):
    nvcc = os.path.join(root, "bin", "nvcc")
    return os.path.isfile(nvcc) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The toolkit root holding the real nvcc and headers; `which nvcc` may be a wrapper
    script outside the toolkit, so follow it instead of taking its parent folder."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script names the real binary: take the first absolute path ending in bin/nvcc
            with open(real, "r", errors="ignore") as handle:
                for token in handle.read(4096).split():
                    if token.startswith("/") and token.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if root and is_real_toolkit(root):
            return os.path.realpath(root)
    return None


def toolkit_version(cuda_home):
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    for token in out.stdout.replace(",", " ").split():
        if token.startswith("V") and token[1:2].isdigit():
            return token[1:]
    return None


def decide_cuda():
    """Returns the toolkit root to build the CUDA sources with, or None for a CPU-only build."""
    forced = os.environ.get("GRADFUSE_CUDA")
    import torch

    def refuse(reason):
        if forced == "1":
            raise RuntimeError(f"GRADFUSE_CUDA=1 but the CUDA sources cannot be built: {reason}")
        log(f"building CPU-only: {reason}")
        return None

    if forced == "0":
        log("building CPU-only: GRADFUSE_CUDA=0")
        return None
    if torch.version.cuda is None:
        return refuse(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return refuse("no CUDA toolkit (bin/nvcc + include/cuda_runtime.h) found; set CUDA_HOME")
    version = toolkit_version(cuda_home)
    if version is None or version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return refuse(f"toolkit {cuda_home} is CUDA {version}, torch was built with CUDA {torch.version.cuda}")
    log(f"building with CUDA: toolkit {cuda_home} (CUDA {version}), torch {torch.__version__}")
    return cuda_home


def default_arch_list():
    """Targets for a machine with no visible GPU: Ampere and Hopper, PTX for newer cards."""
    return "8.0;9.0+PTX"


# The CPU hot loops (csrc/cpu/kernels/) are compiled once per instruction set, each with its own
# CPU_CAPABILITY namespace as in ATen; csrc/cpu/cpu_capability.cpp picks one at run time. Everything
# else is baseline code, so the extension runs on any CPU of its architecture, whatever built it.
KERNEL_SOURCES = sorted(glob.glob(os.path.join("csrc", "cpu", "kernels", "*.cpp")))
CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    # -Wno-maybe-uninitialized: ATen's AVX-512 half conversions hand GCC an undefined vector.
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-Wno-maybe-uninitialized"],
}


def cpu_capabilities():
    """The kernel builds for the target architecture (x86-64: all three; elsewhere the portable one)."""
    if platform.machine() in ("x86_64", "AMD64"):
        return list(CAPABILITY_FLAGS)
    return ["DEFAULT"]


def capability_defines(capability):
    return [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]


def with_cpu_kernels(build_ext_base):
    """build_ext that compiles KERNEL_SOURCES once per capability and links the objects in."""

    class BuildWithCpuKernels(build_ext_base):
        def build_extension(self, ext):
            baseline_only = ("-DCPU_CAPABILITY", "-DGRADFUSE_CPU_KERNELS_")
            common = [f for f in ext.extra_compile_args["cxx"] if not f.startswith(baseline_only)]
            objects = []
            for capability in cpu_capabilities():
                flags = common + capability_defines(capability) + CAPABILITY_FLAGS[capability]
                objects += self.compiler.compile(
                    KERNEL_SOURCES, output_dir=os.path.join(self.build_temp, f"cpu-{capability.lower()}"),
                    macros=ext.define_macros, include_dirs=ext.include_dirs, extra_postargs={"cxx": flags},
                    depends=ext.depends)
            ext.extra_objects = [o for o in ext.extra_objects if o not in objects] + objects
            super().build_extension(ext)

    return BuildWithCpuKernels


def build_extension():
    cuda_home = decide_cuda()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it
        os.environ["PATH"] = os.path.join(cuda_home, "bin") + os.pathsep + os.environ.get("PATH", "")
        import torch

        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list()
        log(f"CUDA arch targets: {os.environ.get('TORCH_CUDA_ARCH_LIST', 'those of the visible GPUs')}")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -ffp-contract=off / -fmad=false: no implicit fused multiply-adds, so the CPU vector loops, their
    # scalar tails and the CUDA kernels all round every product and sum the same way; the fused ones
    # the math needs are explicit (element_math.h: fused_multiply_add) and fused in every build.
    cxx_flags = ["-O3", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas"]
    cxx_flags += capability_defines("DEFAULT")
    cxx_flags += [f"-DGRADFUSE_CPU_KERNELS_{c}" for c in cpu_capabilities() if c != "DEFAULT"]
    # at::parallel_for is an inline OpenMP loop: without -fopenmp every CPU kernel runs on one thread.
    cxx_flags.append("-fopenmp")
    link_flags = ["-fopenmp"]
    # setuptools relinks only when one of these is newer than the built module.
    depends = KERNEL_SOURCES + sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True) +
                                      glob.glob(os.path.join("csrc", "**", "*.cuh"), recursive=True))
    if cuda_home is None:
        extension = CppExtension("gradfuse._C", sources, extra_compile_args={"cxx": cxx_flags},
                                 extra_link_args=link_flags, depends=depends)
        return extension, BuildExtension
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    # No --use_fast_math: CUDA must round (and keep subnormals) exactly like the CPU path.
    nvcc_flags = ["-O3", "-fmad=false", "-lineinfo", "-DGRADFUSE_WITH_CUDA"]
    if os.environ.get("GRADFUSE_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")  # register / spill report per kernel
    cxx_flags.append("-DGRADFUSE_WITH_CUDA")
    extension = CUDAExtension("gradfuse._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                              extra_link_args=link_flags, depends=depends)
    return extension, BuildExtension


extension, build_ext = build_extension()
setup(
    ext_modules=[extension],
    cmdclass={"build_ext": with_cpu_kernels(build_ext).with_options(use_ninja=True)},
)
