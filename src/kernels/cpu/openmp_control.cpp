#include "kernels/cpu/openmp_control.hpp"

#include <dlfcn.h>

namespace chaingrad::kernels {
namespace {

struct OpenMpControl {
  int (*get_max_threads)() = nullptr;
  void (*set_num_threads)(int) = nullptr;
};

const OpenMpControl& openmp() {
  static const OpenMpControl c = [] {
    OpenMpControl r;
    r.get_max_threads = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "omp_get_max_threads"));
    r.set_num_threads = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
    if (!r.get_max_threads || !r.set_num_threads) r = {};
    return r;
  }();
  return c;
}

}  // namespace

SingleThreadedOpenMp::SingleThreadedOpenMp() {
  if (openmp().get_max_threads) {
    saved_ = openmp().get_max_threads();
    if (saved_ != 1) openmp().set_num_threads(1);
  }
}

SingleThreadedOpenMp::~SingleThreadedOpenMp() {
  if (saved_ > 1) openmp().set_num_threads(saved_);
}

}  // namespace chaingrad::kernels
