#pragma once
// oneDNN (built on OpenMP) sizes its work by the calling thread's OpenMP thread count, both when a
// primitive is created and when it runs. chaingrad splits products and convolutions over its own
// pool, so each oneDNN call is one block that must run on one thread: this holds the count at 1
// around a call and puts the caller's setting back afterwards. chaingrad is not built with OpenMP,
// so the functions are looked up at run time (and the guard does nothing without an OpenMP runtime).

namespace chaingrad::kernels {

class SingleThreadedOpenMp {
 public:
  SingleThreadedOpenMp();
  ~SingleThreadedOpenMp();
  SingleThreadedOpenMp(const SingleThreadedOpenMp&) = delete;
  SingleThreadedOpenMp& operator=(const SingleThreadedOpenMp&) = delete;

 private:
  int saved_ = 1;
};

}  // namespace chaingrad::kernels
