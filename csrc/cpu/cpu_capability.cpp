// Run-time selection of the per-capability CPU kernels, as ATen's DispatchStub does.
#include "cpu_capability.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>

namespace gradfuse::cpu {

// Defined by the builds of csrc/cpu/kernels/ (setup.py says which exist on this platform).
namespace DEFAULT {
extern const CpuKernels kKernels;
}
#ifdef GRADFUSE_CPU_KERNELS_AVX2
namespace AVX2 {
extern const CpuKernels kKernels;
}
#endif
#ifdef GRADFUSE_CPU_KERNELS_AVX512
namespace AVX512 {
extern const CpuKernels kKernels;
}
#endif

namespace {

enum Capability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kNumCapabilities = 3 };

constexpr const char* kNames[kNumCapabilities] = {"default", "avx2", "avx512"};

// The instructions each build was compiled for (setup.py's -m flags), checked with cpuid
// (which also checks that the OS saves the vector registers).
bool cpu_supports(Capability capability) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  switch (capability) {
    case kAvx2:
      return avx2;
    case kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    default:
      return true;
  }
#else
  return capability == kDefault;
#endif
}

const CpuKernels* kernels_of(Capability capability) {
  switch (capability) {
#ifdef GRADFUSE_CPU_KERNELS_AVX2
    case kAvx2:
      return &AVX2::kKernels;
#endif
#ifdef GRADFUSE_CPU_KERNELS_AVX512
    case kAvx512:
      return &AVX512::kKernels;
#endif
    case kDefault:
      return &DEFAULT::kKernels;
    default:
      return nullptr;  // not built for this platform
  }
}

bool usable(Capability capability) {
  return kernels_of(capability) != nullptr && cpu_supports(capability);
}

Capability best_usable() {
  for (int c = kNumCapabilities - 1; c > kDefault; --c) {
    if (usable(static_cast<Capability>(c))) {
      return static_cast<Capability>(c);
    }
  }
  return kDefault;
}

// -1 when `name` is none of kNames.
int parse(const std::string& name) {
  for (int c = 0; c < kNumCapabilities; ++c) {
    if (name == kNames[c]) {
      return c;
    }
  }
  return -1;
}

Capability checked(const std::string& name, const char* source) {
  const int parsed = parse(name);
  TORCH_CHECK(parsed >= 0, source, "='", name, "' is not a CPU capability; use default, avx2 or avx512");
  const Capability capability = static_cast<Capability>(parsed);
  TORCH_CHECK(usable(capability), source, "='", name, "' but ",
              kernels_of(capability) == nullptr ? "this build of gradfuse has no such kernels"
                                                : "this CPU lacks its instructions",
              "; the best available here is ", kNames[best_usable()]);
  return capability;
}

Capability initial_choice() {
  if (const char* forced = std::getenv("GRADFUSE_CPU_CAPABILITY"); forced != nullptr && *forced != '\0') {
    return checked(forced, "GRADFUSE_CPU_CAPABILITY");
  }
  const Capability best = best_usable();
  // torch's own setting caps ours (values it knows but we do not, e.g. "zvector", are ignored).
  if (const char* aten = std::getenv("ATEN_CPU_CAPABILITY"); aten != nullptr) {
    const int parsed = parse(aten);
    if (parsed >= 0 && parsed < best) {
      return static_cast<Capability>(parsed);
    }
  }
  return best;
}

std::atomic<int> active{-1};

Capability current() {
  int value = active.load(std::memory_order_acquire);
  if (value < 0) {
    static const int chosen = initial_choice();  // once; throws again on every call if invalid
    int expected = -1;
    active.compare_exchange_strong(expected, chosen, std::memory_order_acq_rel);
    value = active.load(std::memory_order_acquire);
  }
  return static_cast<Capability>(value);
}

}  // namespace

const CpuKernels& cpu_kernels() {
  return *kernels_of(current());
}

std::string active_cpu_capability() {
  return kNames[current()];
}

void set_cpu_capability(const std::string& name) {
  active.store(checked(name, "set_cpu_capability"), std::memory_order_release);
}

}  // namespace gradfuse::cpu
