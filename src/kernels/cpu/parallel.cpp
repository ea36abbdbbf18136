#include "kernels/cpu/parallel.hpp"

#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <algorithm>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "chaingrad/error.hpp"

namespace chaingrad::kernels {
namespace {

// A thread that waits on the pool (a worker between jobs, the caller for its workers) spins this
// long before it sleeps on a futex. Waking a sleeping worker took 65-115 µs on average on this
// project's 2-vCPU machine, and a worker that checks in late keeps the caller waiting for its
// share. Most gaps between the jobs of a training step are under 60 µs, and hundreds per epoch
// last 60-600 µs. A longer spin covers more of them but costs under contention: a thread that
// spins takes CPU time from another process on its core, and the OS then wakes it later (a 1 ms
// spin made two threads 1.3-1.6x slower beside a busy loop). BENCHMARKS.md, "The pool's spin", has
// the figures. Time, not a count of pauses: a pause takes 10 to 140 cycles depending on the CPU.
constexpr std::chrono::microseconds kSpinTime{250};
// A pool with more threads than the CPUs it may run on: its spinning threads would take CPU time
// from the ones with work.
constexpr std::chrono::microseconds kOversubscribedSpinTime{50};

inline void cpu_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until done() or until `spin` has passed; returns done(). The clock is read once every 64
// pauses, so spinning costs no system calls.
template <class Pred>
bool spin_until(std::chrono::microseconds spin, Pred done) {
  const auto deadline = std::chrono::steady_clock::now() + spin;
  for (unsigned i = 1;; ++i) {
    if (done()) return true;
    cpu_pause();
    if (i % 64 == 0 && std::chrono::steady_clock::now() >= deadline) return done();
  }
}

int available_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

int default_threads() {
  if (const char* env = std::getenv("CHAINGRAD_NUM_THREADS")) {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    CG_CHECK(end != env && *end == '\0' && n >= 1 && n <= 1024, ValueError,
             "CHAINGRAD_NUM_THREADS: expected a whole number of threads from 1 to 1024; got '", env, "'");
    return static_cast<int>(n);
  }
  return available_cpus();
}

// A job is open from its publication until the caller has run out of tasks. A worker takes part
// only if it checks in while the job is open, and the caller then waits for the workers that checked
// in, not for every worker: a worker the OS has not scheduled yet (another process on its core)
// costs the caller nothing, where waiting for it would cost a time slice per job.
class Pool {
 public:
  explicit Pool(int threads) : spin_(threads <= available_cpus() ? kSpinTime : kOversubscribedSpinTime) {
    workers_.reserve(static_cast<std::size_t>(threads - 1));
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;
  ~Pool() {
    stop_.store(true, std::memory_order_relaxed);  // (publish() orders it before the wake-up)
    publish();
    for (auto& w : workers_) w.join();
  }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // The caller holds the pool's busy lock.
  void run(int tasks, const std::function<void(int)>& fn) {
    fn_ = &fn;
    tasks_ = tasks;
    error_ = nullptr;
    next_.store(0, std::memory_order_relaxed);
    publish();
    run_tasks();
    // Close the job; from here on only the workers already checked in remain to wait for.
    const std::uint64_t before = control_.fetch_or(kClosed, std::memory_order_acq_rel);
    const auto all_left = [&] { return checked_in(control_.load(std::memory_order_acquire)) == 0; };
    if (checked_in(before) != 0 && !spin_until(spin_, all_left)) {
      std::unique_lock lock(sleep_mu_);
      done_cv_.wait(lock, all_left);
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // control_ = generation << 32 | closed bit | number of workers checked in to the open job.
  static constexpr std::uint64_t kClosed = std::uint64_t{1} << 31;
  static constexpr std::uint64_t kCountMask = kClosed - 1;
  static std::uint32_t generation(std::uint64_t c) { return static_cast<std::uint32_t>(c >> 32); }
  static std::uint64_t checked_in(std::uint64_t c) { return c & kCountMask; }

  void worker_loop() {
    std::uint32_t seen = 0;  // the generation at construction; a job may be published before this line runs
    for (;;) {
      const auto published = [&] { return generation(control_.load(std::memory_order_acquire)) != seen; };
      if (!spin_until(spin_, published)) {
        std::unique_lock lock(sleep_mu_);
        wake_cv_.wait(lock, published);
      }
      const std::uint64_t c = control_.load(std::memory_order_acquire);
      seen = generation(c);
      if (stop_.load(std::memory_order_relaxed)) return;
      if (!check_in(c, seen)) continue;  // the caller finished this job without us
      run_tasks();
      const std::uint64_t after = control_.fetch_sub(1, std::memory_order_acq_rel) - 1;
      if (checked_in(after) == 0 && (after & kClosed)) {
        std::lock_guard lock(sleep_mu_);  // so the notify cannot fall between the caller's check and its wait
        done_cv_.notify_one();
      }
    }
  }

  // Joins job `gen` if it is still open. Only then may the worker read the job's fields: the caller
  // does not touch them again until every checked-in worker has left.
  bool check_in(std::uint64_t c, std::uint32_t gen) {
    while (generation(c) == gen && !(c & kClosed)) {
      if (control_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire)) return true;
    }
    return false;
  }

  // Sleepers re-check the generation under sleep_mu_, so bumping it under the lock loses no
  // wake-up. The new job starts open, with nobody checked in.
  void publish() {
    {
      std::lock_guard lock(sleep_mu_);
      const std::uint32_t g = generation(control_.load(std::memory_order_relaxed)) + 1;
      control_.store(static_cast<std::uint64_t>(g) << 32, std::memory_order_release);
    }
    wake_cv_.notify_all();
  }

  void run_tasks() {
    for (int i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < tasks_;) {
      try {
        (*fn_)(i);
      } catch (...) {
        std::lock_guard lock(error_mu_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  const std::chrono::microseconds spin_;
  std::vector<std::thread> workers_;
  std::atomic<std::uint64_t> control_{0};
  std::atomic<int> next_{0};
  const std::function<void(int)>* fn_ = nullptr;
  int tasks_ = 0;
  // Atomic because a worker that skipped the last job read it with no check-in to order that read
  // before the destructor's write (ThreadSanitizer, test_sgemm's thread-count changes).
  std::atomic<bool> stop_{false};
  std::mutex sleep_mu_;
  std::condition_variable wake_cv_, done_cv_;
  std::mutex error_mu_;
  std::exception_ptr error_;
};

// Set for the whole of a parallel_for, and by set_num_threads while it swaps the pool. A flag, not
// a mutex: a nested parallel_for from the same thread must see "busy", and try_lock on a mutex the
// thread already owns is undefined.
std::atomic<bool> g_busy{false};

bool try_acquire() { return !g_busy.exchange(true, std::memory_order_acquire); }
void acquire() {
  while (!try_acquire()) std::this_thread::yield();
}
void release() { g_busy.store(false, std::memory_order_release); }

struct BusyGuard {
  BusyGuard() { acquire(); }
  ~BusyGuard() { release(); }
  BusyGuard(const BusyGuard&) = delete;
  BusyGuard& operator=(const BusyGuard&) = delete;
};

// Never destroyed: worker threads must not be joined during static destruction, when other
// libraries' state (the BLAS's) may already be gone.
Pool*& pool_slot() {
  static Pool* p = nullptr;
  return p;
}

// The configured size, readable without the busy flag: a task running inside a parallel_for (which
// holds the flag) may ask it, e.g. to cut a product it then runs inline. 0: not decided yet.
std::atomic<int> g_threads{0};

Pool& pool_locked() {
  Pool*& p = pool_slot();
  if (!p) p = new Pool(num_threads());
  return *p;
}

}  // namespace

int num_threads() {
  int n = g_threads.load(std::memory_order_acquire);
  if (n == 0) {
    int expected = 0;
    g_threads.compare_exchange_strong(expected, default_threads(), std::memory_order_acq_rel);
    n = g_threads.load(std::memory_order_acquire);
  }
  return n;
}

void set_num_threads(int n) {
  CG_CHECK(n >= 1 && n <= 1024, ValueError, "set_num_threads: expected 1 to 1024 threads; got ", n);
  BusyGuard guard;
  g_threads.store(n, std::memory_order_release);
  Pool*& p = pool_slot();
  if (p && p->size() == n) return;
  delete p;
  p = new Pool(n);
}

void parallel_for(int tasks, const std::function<void(int)>& fn) {
  if (tasks <= 0) return;
  if (tasks > 1 && try_acquire()) {
    struct Release {
      ~Release() { release(); }
    } on_exit;
    Pool& p = pool_locked();
    if (p.size() > 1) {
      p.run(tasks, fn);
      return;
    }
  }
  for (int i = 0; i < tasks; ++i) fn(i);
}

}  // namespace chaingrad::kernels
