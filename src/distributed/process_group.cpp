// The process group: MPI initialization and finalization, rank and size, collectives on tensors
// and the job-wide abort. Without MPI (CHAINGRAD_HAVE_MPI undefined) the same functions describe
// a world of one, and Session refuses to start with a message saying how to get MPI.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <thread>

#include "chaingrad/autograd.hpp"
#include "chaingrad/distributed.hpp"
#include "chaingrad/error.hpp"
#include "distributed/mpi_util.hpp"

namespace chaingrad::distributed {
namespace {

// Where error messages go: the process's stderr as it was before quiet_non_root silenced it.
int& error_fd() {
  static int fd = STDERR_FILENO;
  return fd;
}

void write_error(const std::string& text) {
  std::fflush(stdout);
  std::fflush(stderr);
  const char* p = text.data();
  std::size_t left = text.size();
  while (left > 0) {
    const ssize_t n = ::write(error_fd(), p, left);
    if (n <= 0) break;
    p += n;
    left -= static_cast<std::size_t>(n);
  }
}

}  // namespace

#ifdef CHAINGRAD_HAVE_MPI

namespace {

struct Global {
  int depth = 0;             // live Sessions
  bool we_initialized = false;
  int rank = 0, size = 1;
  int local_rank = 0, local_size = 1;
};
Global& global() {
  static Global g;
  return g;
}

bool mpi_initialized() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

// A process that leaves through std::exit (an interrupted training run saves and exits) while a
// Session we initialized is alive still finalizes MPI, so mpirun sees a normal exit.
void finalize_at_exit() {
  if (global().we_initialized && mpi_initialized()) MPI_Finalize();
}

void silence_output() {
  error_fd() = ::dup(STDERR_FILENO);
  if (error_fd() < 0) error_fd() = STDERR_FILENO;
  std::fflush(stdout);
  std::fflush(stderr);
  const int null = ::open("/dev/null", O_WRONLY);
  if (null < 0) return;
  ::dup2(null, STDOUT_FILENO);
  ::dup2(null, STDERR_FILENO);
  ::close(null);
}

}  // namespace

bool available() noexcept { return true; }

Session::Session(SessionOptions options) {
  Global& g = global();
  if (g.depth++ > 0) return;
  if (!mpi_initialized()) {
    int provided = 0;
    const int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
    if (rc != MPI_SUCCESS) {
      --g.depth;
      throw ValueError("distributed: MPI_Init_thread failed (error " + std::to_string(rc) + ")");
    }
    g.we_initialized = true;
    static bool registered = false;
    if (!registered) {
      std::atexit(finalize_at_exit);
      registered = true;
    }
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &g.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g.size);
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g.rank, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &g.local_rank);
  MPI_Comm_size(local, &g.local_size);
  MPI_Comm_free(&local);
  if (options.quiet_non_root && g.rank != 0) silence_output();
}

Session::~Session() {
  Global& g = global();
  if (--g.depth > 0) return;
  if (std::uncaught_exceptions() > 0) {
    // A peer may be blocked in a collective waiting for this rank: finalizing (itself collective)
    // would hang. run() normally catches first; this is the fallback for code outside it.
    abort_all("an exception left the distributed session");
  }
  if (g.we_initialized && mpi_initialized()) MPI_Finalize();
  g.we_initialized = false;
  g.rank = 0;
  g.size = 1;
  g.local_rank = 0;
  g.local_size = 1;
}

int Session::rank() const { return global().rank; }
int Session::world_size() const { return global().size; }

bool is_initialized() { return global().depth > 0 && mpi_initialized(); }
int rank() { return is_initialized() ? global().rank : 0; }
int world_size() { return is_initialized() ? global().size : 1; }
int local_rank() { return is_initialized() ? global().local_rank : 0; }
int local_size() { return is_initialized() ? global().local_size : 1; }

std::string processor_name() {
  if (is_initialized()) {
    char name[MPI_MAX_PROCESSOR_NAME];
    int len = 0;
    if (MPI_Get_processor_name(name, &len) == MPI_SUCCESS) return std::string(name, static_cast<std::size_t>(len));
  }
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  return host;
}

void barrier() {
  if (is_initialized()) MPI_Barrier(MPI_COMM_WORLD);
}

void abort_all(const std::string& message, int exit_code) {
  if (is_initialized() && world_size() > 1) {
    write_error("error: rank " + std::to_string(rank()) + " of " + std::to_string(world_size()) + " (host " +
                processor_name() + ", pid " + std::to_string(::getpid()) + "): " + message +
                "\nerror: rank " + std::to_string(rank()) + " is ending all " + std::to_string(world_size()) +
                " ranks\n");
    // An error every rank hits at once (a missing file) would make every rank call MPI_Abort
    // together; ranks other than 0 give rank 0 a moment to abort first (which ends them too), so
    // that mpirun reports one abort. (Open MPI 4.1.4 sometimes replaces its MPI_ABORT banner by
    // "ORTE_ERROR_LOG: Data unpack ... show_help.c", even for a single abort: harmless noise.)
    if (rank() != 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
    MPI_Abort(MPI_COMM_WORLD, exit_code);
  } else {
    write_error("error: " + message + "\n");
  }
  std::_Exit(exit_code);
}

#else  // !CHAINGRAD_HAVE_MPI

bool available() noexcept { return false; }

Session::Session(SessionOptions) {
  throw ValueError(
      "distributed: this chaingrad was built without MPI (CMake did not find it, or CHAINGRAD_WITH_MPI=OFF); "
      "install openmpi-bin and libopenmpi-dev (scripts/deps.sh does) and rebuild");
}
Session::~Session() = default;
int Session::rank() const { return 0; }
int Session::world_size() const { return 1; }
bool is_initialized() { return false; }
int rank() { return 0; }
int world_size() { return 1; }
int local_rank() { return 0; }
int local_size() { return 1; }
std::string processor_name() {
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  return host;
}
void barrier() {}
void abort_all(const std::string& message, int exit_code) {
  write_error("error: " + message + "\n");
  std::_Exit(exit_code);
}

#endif  // CHAINGRAD_HAVE_MPI

void Session::run(const std::function<void()>& f) const {
  try {
    f();
  } catch (const std::bad_alloc&) {
    abort_all("out of memory");
  } catch (const std::exception& e) {
    abort_all(e.what(), dynamic_cast<const Error*>(&e) ? 1 : 2);
  } catch (...) {
    abort_all("unknown exception", 2);
  }
}

int default_threads_per_rank() {
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::max(1, hw / std::max(1, local_size()));
}

// ---------------------------------------------------------------- collectives

namespace {

void check_tensor(const Tensor& t, const char* op) {
  CG_CHECK(t.defined(), ValueError, op, ": expected a defined tensor");
}

}  // namespace

#ifdef CHAINGRAD_HAVE_MPI

namespace detail {

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::Float32: return MPI_FLOAT;
    case DType::Float64: return MPI_DOUBLE;
    case DType::Int64: return MPI_INT64_T;
    case DType::UInt8: return MPI_UINT8_T;
  }
  throw InternalError("mpi_type: bad dtype");
}

MPI_Op mpi_op(Op op) {
  switch (op) {
    case Op::Sum:
    case Op::Average: return MPI_SUM;
    case Op::Max: return MPI_MAX;
    case Op::Min: return MPI_MIN;
  }
  throw InternalError("mpi_op: bad op");
}

void allreduce_raw(void* data, std::int64_t count, DType dtype, Op op) {
  auto* p = static_cast<char*>(data);
  const std::size_t es = element_size(dtype);
  for (std::int64_t done = 0; done < count;) {
    const std::int64_t n = std::min(count - done, kMaxElementsPerCall);
    const int rc = MPI_Allreduce(MPI_IN_PLACE, p + static_cast<std::size_t>(done) * es, static_cast<int>(n),
                                 mpi_type(dtype), mpi_op(op), MPI_COMM_WORLD);
    CG_CHECK(rc == MPI_SUCCESS, ValueError, "allreduce_: MPI_Allreduce failed (error ", rc, ")");
    done += n;
  }
}

}  // namespace detail

namespace {

template <class T>
void divide(T* p, std::int64_t n, int world) {
  for (std::int64_t i = 0; i < n; ++i) p[i] /= static_cast<T>(world);
}

}  // namespace

void allreduce_(Tensor& t, Op op) {
  check_tensor(t, "allreduce_");
  CG_CHECK(!(op == Op::Average && t.dtype() == DType::Int64), TypeError,
           "allreduce_: Average needs a float32 or float64 tensor; got int64");
  if (!is_initialized() || world_size() == 1) return;
  NoGradGuard no_grad;
  Tensor buf = t.is_contiguous() ? t : t.detach().contiguous().clone();
  detail::allreduce_raw(buf.raw_data(), buf.numel(), buf.dtype(), op);
  if (op == Op::Average) {
    dispatch_float(buf.dtype(), "allreduce_", [&]<class T>() { divide(buf.data<T>(), buf.numel(), world_size()); });
  }
  if (!buf.same(t)) t.copy_(buf);
  t.bump_version();
}

void allreduce_(std::span<double> values, Op op) {
  if (!is_initialized() || world_size() == 1 || values.empty()) return;
  detail::allreduce_raw(values.data(), static_cast<std::int64_t>(values.size()), DType::Float64, op);
  if (op == Op::Average) divide(values.data(), static_cast<std::int64_t>(values.size()), world_size());
}

void allreduce_(std::span<std::int64_t> values, Op op) {
  CG_CHECK(op != Op::Average, TypeError, "allreduce_: Average needs floating-point values; got int64");
  if (!is_initialized() || world_size() == 1 || values.empty()) return;
  detail::allreduce_raw(values.data(), static_cast<std::int64_t>(values.size()), DType::Int64, op);
}

void broadcast_(Tensor& t, int root) {
  check_tensor(t, "broadcast_");
  if (!is_initialized() || world_size() == 1) return;
  CG_CHECK(root >= 0 && root < world_size(), ValueError, "broadcast_: root must be in [0, ", world_size(), "); got ",
           root);
  NoGradGuard no_grad;
  Tensor buf = t.is_contiguous() ? t : t.detach().contiguous().clone();
  auto* p = static_cast<char*>(buf.raw_data());
  const std::size_t es = element_size(buf.dtype());
  for (std::int64_t done = 0, count = buf.numel(); done < count;) {
    const std::int64_t n = std::min(count - done, detail::kMaxElementsPerCall);
    const int rc = MPI_Bcast(p + static_cast<std::size_t>(done) * es, static_cast<int>(n), detail::mpi_type(buf.dtype()),
                             root, MPI_COMM_WORLD);
    CG_CHECK(rc == MPI_SUCCESS, ValueError, "broadcast_: MPI_Bcast failed (error ", rc, ")");
    done += n;
  }
  if (!buf.same(t)) t.copy_(buf);
  t.bump_version();
}

void broadcast_(std::span<double> values, int root) {
  if (!is_initialized() || world_size() == 1 || values.empty()) return;
  CG_CHECK(root >= 0 && root < world_size(), ValueError, "broadcast_: root must be in [0, ", world_size(), "); got ",
           root);
  CG_CHECK(values.size() <= static_cast<std::size_t>(INT_MAX), ValueError, "broadcast_: at most ", INT_MAX,
           " values per call; got ", values.size());
  MPI_Bcast(values.data(), static_cast<int>(values.size()), MPI_DOUBLE, root, MPI_COMM_WORLD);
}

#else  // !CHAINGRAD_HAVE_MPI: a world of one, where every collective is the identity

void allreduce_(Tensor& t, Op op) {
  check_tensor(t, "allreduce_");
  CG_CHECK(!(op == Op::Average && t.dtype() == DType::Int64), TypeError,
           "allreduce_: Average needs a float32 or float64 tensor; got int64");
}
void allreduce_(std::span<double>, Op) {}
void allreduce_(std::span<std::int64_t>, Op op) {
  CG_CHECK(op != Op::Average, TypeError, "allreduce_: Average needs floating-point values; got int64");
}
void broadcast_(Tensor& t, int) { check_tensor(t, "broadcast_"); }
void broadcast_(std::span<double>, int) {}

#endif  // CHAINGRAD_HAVE_MPI

}  // namespace chaingrad::distributed
