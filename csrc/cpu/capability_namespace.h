// The namespace every CPU-kernel inline function and template lives in. csrc/cpu/kernels/ is
// compiled once per instruction set (DEFAULT, AVX2, AVX512, named by CPU_CAPABILITY as in ATen):
// without a namespace per set, the linker would keep one copy of e.g. sgd_update<float> from any
// of them, and an AVX-512 copy reached from baseline code dies with SIGILL on an AVX2 CPU.
#pragma once

#if defined(CPU_CAPABILITY) && !defined(__CUDACC__)
#define GRADFUSE_CAPABILITY_NAMESPACE_BEGIN inline namespace CPU_CAPABILITY {
#define GRADFUSE_CAPABILITY_NAMESPACE_END }
#else  // nvcc and other builds without CPU_CAPABILITY: one namespace, as before
#define GRADFUSE_CAPABILITY_NAMESPACE_BEGIN
#define GRADFUSE_CAPABILITY_NAMESPACE_END
#endif
