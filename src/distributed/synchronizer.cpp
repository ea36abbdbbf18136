// GradientSynchronizer: averages gradients over the ranks in buckets.
//
// Note [gradient buckets]: parameters are taken in reverse registration order (the order backward
// produces their gradients) and packed, per dtype, into flat buffers of about bucket_bytes. A
// bucket is [gradients of its parameters | one flag per parameter]; a rank writes its gradient
// times its weight (its share of the global batch) and a flag 1 where it has a gradient, 0 and
// zeros where it has none. One MPI_SUM allreduce per bucket then yields the weighted mean, and a
// flag sum of 0 says that no rank had a gradient, so .grad stays undefined as in a single
// process. Buckets are always launched in index order, on every rank, because MPI requires the
// collectives on a communicator to be started in the same order everywhere; in overlap mode a
// bucket that fills up early waits for its predecessors.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <string>
#include <utility>

#include "chaingrad/autograd.hpp"
#include "chaingrad/distributed.hpp"
#include "chaingrad/error.hpp"
#include "distributed/mpi_util.hpp"

namespace chaingrad::distributed {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// dst[0, n) = w * g (or += with `add`), g converted to T; g has n elements in any layout.
template <class T>
void write_scaled(T* dst, const Tensor& g_in, double w, bool add) {
  NoGradGuard no_grad;
  Tensor g = g_in.detach();
  if (g.dtype() != DTypeOf<T>::value) g = g.to(DTypeOf<T>::value);
  g = g.contiguous();
  const T* src = g.data<T>();
  const std::int64_t n = g.numel();
  const T tw = static_cast<T>(w);
  if (add) {
    if (w == 1.0)
      for (std::int64_t i = 0; i < n; ++i) dst[i] += src[i];
    else
      for (std::int64_t i = 0; i < n; ++i) dst[i] += tw * src[i];
  } else if (w == 1.0) {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
  } else {
    for (std::int64_t i = 0; i < n; ++i) dst[i] = tw * src[i];
  }
}

}  // namespace

struct GradientSynchronizer::State {
  struct Slot {
    Tensor param;
    std::size_t bucket = 0;
    std::size_t index = 0;      // position within its bucket (its flag's index)
    std::int64_t offset = 0;    // first element within the bucket buffer
    std::int64_t numel = 0;
    int expected = 1;           // contributions per backward, learned in the first step
    int hits = 0;               // contributions seen in this step
  };
  struct Bucket {
    DType dtype = DType::Float32;
    Tensor buffer;              // 1-D: grad_elems gradients, then one flag per slot
    std::int64_t grad_elems = 0;
    std::vector<std::size_t> slots;
    std::size_t complete = 0;   // slots with all their contributions (overlap mode)
    bool launched = false;
#ifdef CHAINGRAD_HAVE_MPI
    std::vector<MPI_Request> requests;
#endif
  };

  GradientSynchronizerOptions options;
  std::vector<Slot> slots;
  std::vector<Bucket> buckets;
  std::size_t next_launch = 0;
  double weight = 1.0;
  bool in_step = false;
  bool learned = false;       // overlap: expected contributions known
  bool hooks_active = false;  // overlap: this step's buckets are filled from hooks
  SynchronizerStats stats;

  template <class F>
  decltype(auto) with_type(DType t, F&& f) {
    return dispatch_float(t, "GradientSynchronizer", std::forward<F>(f));
  }

  void zero_slot(Bucket& b, const Slot& s) {
    with_type(b.dtype, [&]<class T>() { std::fill_n(b.buffer.data<T>() + s.offset, s.numel, T(0)); });
  }
  void set_flag(Bucket& b, const Slot& s, bool on) {
    with_type(b.dtype, [&]<class T>() { b.buffer.data<T>()[b.grad_elems + static_cast<std::int64_t>(s.index)] = T(on); });
  }
  bool flag(const Bucket& b, const Slot& s) {
    return with_type(b.dtype, [&]<class T>() {
      return b.buffer.data<T>()[b.grad_elems + static_cast<std::int64_t>(s.index)] > T(0.5);
    });
  }

  // Starts the bucket's reduction: blocking (MPI_Allreduce, done on return) or not (MPI_Iallreduce,
  // completed by wait()). The blocking path matters over TCP, where Open MPI progresses
  // non-blocking collectives only now and then: a 1 MB MPI_Iallreduce over TCP loopback took
  // 12-16 ms against 0.2 ms for MPI_Allreduce (docs/distributed.md).
  void launch(Bucket& b, bool blocking) {
    CG_ASSERT(!b.launched);
    b.launched = true;
    stats.bytes += b.buffer.numel() * static_cast<std::int64_t>(element_size(b.dtype));
#ifdef CHAINGRAD_HAVE_MPI
    if (blocking) {
      detail::allreduce_raw(b.buffer.raw_data(), b.buffer.numel(), b.dtype, Op::Sum);
      stats.allreduces += (b.buffer.numel() + detail::kMaxElementsPerCall - 1) / detail::kMaxElementsPerCall;
      return;
    }
    auto* p = static_cast<char*>(b.buffer.raw_data());
    const std::size_t es = element_size(b.dtype);
    b.requests.clear();
    for (std::int64_t done = 0, count = b.buffer.numel(); done < count;) {
      const std::int64_t n = std::min(count - done, detail::kMaxElementsPerCall);
      MPI_Request r;
      const int rc = MPI_Iallreduce(MPI_IN_PLACE, p + static_cast<std::size_t>(done) * es, static_cast<int>(n),
                                    detail::mpi_type(b.dtype), MPI_SUM, MPI_COMM_WORLD, &r);
      CG_CHECK(rc == MPI_SUCCESS, ValueError, "GradientSynchronizer: MPI_Iallreduce failed (error ", rc, ")");
      b.requests.push_back(r);
      ++stats.allreduces;
      done += n;
    }
#else
    (void)blocking;
#endif
  }

  // Launches, in index order, every bucket that is ready (all = every remaining one).
  void launch_ready(bool all) {
    while (next_launch < buckets.size()) {
      Bucket& b = buckets[next_launch];
      if (!all && b.complete < b.slots.size()) break;
      if (all) {
        // Slots without a contribution this step: zeros and flag 0.
        for (std::size_t si : b.slots)
          if (slots[si].hits == 0) {
            zero_slot(b, slots[si]);
            set_flag(b, slots[si], false);
          }
      }
      launch(b, /*blocking=*/false);
      ++next_launch;
    }
  }

  // Lets MPI advance the launched non-blocking reductions (MPI progresses only inside MPI calls).
  void progress() {
#ifdef CHAINGRAD_HAVE_MPI
    for (std::size_t i = 0; i < next_launch; ++i) {
      Bucket& b = buckets[i];
      if (b.requests.empty()) continue;
      int done = 0;
      MPI_Testall(static_cast<int>(b.requests.size()), b.requests.data(), &done, MPI_STATUSES_IGNORE);
      if (done) b.requests.clear();
    }
#endif
  }

  void wait(Bucket& b) {
#ifdef CHAINGRAD_HAVE_MPI
    if (!b.requests.empty()) {
      const int rc = MPI_Waitall(static_cast<int>(b.requests.size()), b.requests.data(), MPI_STATUSES_IGNORE);
      CG_CHECK(rc == MPI_SUCCESS, ValueError, "GradientSynchronizer: MPI_Waitall failed (error ", rc, ")");
      b.requests.clear();
    }
#else
    (void)b;
#endif
  }

  // Gradient hook (overlap mode): `g` is one contribution to parameter i's gradient.
  void on_grad(std::size_t i, const Tensor& g) {
    if (!in_step) return;
    Slot& s = slots[i];
    ++s.hits;
    if (!hooks_active) return;  // the learning step or a blocking step: count only
    const auto t0 = Clock::now();
    Bucket& b = buckets[s.bucket];
    CG_CHECK(!b.launched, AutogradError, "GradientSynchronizer: parameter ", i, " (shape ", s.param.shape(),
             ") received gradient contribution ", s.hits, " after its bucket's allreduce had started (it received ",
             s.expected, " in the first step); use overlap = false for models whose parameters are used a varying "
             "number of times per step");
    with_type(b.dtype, [&]<class T>() { write_scaled(b.buffer.data<T>() + s.offset, g, weight, s.hits > 1); });
    if (s.hits == 1) set_flag(b, s, true);
    if (s.hits == s.expected && ++b.complete == b.slots.size()) launch_ready(false);
    progress();
    stats.hook_seconds += seconds_since(t0);
  }

  // Blocking path: every bucket from the parameters' .grad.
  void fill_from_grads(Bucket& b) {
    for (std::size_t si : b.slots) {
      Slot& s = slots[si];
      const Tensor g = s.param.grad();
      if (g.defined()) {
        CG_CHECK(g.numel() == s.numel, ShapeError, "GradientSynchronizer: parameter ", si, " has shape ",
                 s.param.shape(), " but its gradient has shape ", g.shape());
        with_type(b.dtype, [&]<class T>() { write_scaled(b.buffer.data<T>() + s.offset, g, weight, false); });
        set_flag(b, s, true);
      } else {
        zero_slot(b, s);
        set_flag(b, s, false);
      }
    }
  }

  void copy_back(Bucket& b) {
    NoGradGuard no_grad;
    for (std::size_t si : b.slots) {
      Slot& s = slots[si];
      if (!flag(b, s)) {
        s.param.set_grad(Tensor());
        continue;
      }
      const void* src = static_cast<const char*>(b.buffer.raw_data()) +
                        static_cast<std::size_t>(s.offset) * element_size(b.dtype);
      const std::size_t bytes = static_cast<std::size_t>(s.numel) * element_size(b.dtype);
      Tensor g = s.param.grad();
      if (g.defined() && g.is_contiguous() && g.dtype() == b.dtype && !g.requires_grad()) {
        std::memcpy(g.raw_data(), src, bytes);
        g.bump_version();
      } else {
        Tensor fresh = empty(s.param.shape(), b.dtype);
        std::memcpy(fresh.raw_data(), src, bytes);
        s.param.set_grad(fresh);
      }
    }
  }

  void begin(double w) {
    weight = w < 0 ? 1.0 / world_size() : w;
    in_step = true;
    next_launch = 0;
    for (Slot& s : slots) s.hits = 0;
    for (Bucket& b : buckets) {
      b.complete = 0;
      b.launched = false;
    }
    hooks_active = options.overlap && learned && world_size() > 1 &&
                   std::none_of(slots.begin(), slots.end(), [](const Slot& s) { return s.param.grad().defined(); });
  }

  void end() {
    if (!in_step) begin(-1);
    ++stats.steps;
    if (world_size() == 1) {
      // A world of one: the weighted mean of one gradient is the gradient times its weight.
      if (weight != 1.0) {
        NoGradGuard no_grad;
        for (Slot& s : slots)
          if (Tensor g = s.param.grad(); g.defined()) s.param.set_grad(g.detach().clone().mul_(weight));
      }
    } else {
      const auto t0 = Clock::now();
      const double copies_before = stats.copy_seconds;
      if (!hooks_active) {
        for (Bucket& b : buckets) {
          const auto c0 = Clock::now();
          fill_from_grads(b);
          stats.copy_seconds += seconds_since(c0);
          // Blocking and non-blocking collectives do not match each other in MPI: in overlap mode
          // every rank uses MPI_Iallreduce, whichever path it takes in this step.
          launch(b, /*blocking=*/!options.overlap);
        }
        next_launch = buckets.size();
      } else {
        launch_ready(true);
      }
      for (Bucket& b : buckets) {
        wait(b);
        const auto c0 = Clock::now();
        copy_back(b);
        stats.copy_seconds += seconds_since(c0);
      }
      stats.wait_seconds += seconds_since(t0) - (stats.copy_seconds - copies_before);
    }
    if (options.overlap && !learned) {
      for (Slot& s : slots) s.expected = std::max(1, s.hits);
      learned = true;
    }
    in_step = false;
  }
};

GradientSynchronizer::GradientSynchronizer(std::vector<Tensor> parameters, GradientSynchronizerOptions options)
    : state_(std::make_shared<State>()) {
  State& st = *state_;
  st.options = options;
  CG_CHECK(options.bucket_bytes > 0, ValueError, "GradientSynchronizer: bucket_bytes must be positive");
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    const Tensor& p = parameters[i];
    CG_CHECK(p.defined() && is_floating(p.dtype()), TypeError, "GradientSynchronizer: parameter ", i,
             " must be a defined float32 or float64 tensor");
  }
  // Reverse registration order, a bucket per dtype open at a time (Note [gradient buckets]).
  std::map<DType, std::size_t> open;
  std::vector<std::int64_t> fill;
  for (std::size_t k = parameters.size(); k-- > 0;) {
    const Tensor& p = parameters[k];
    const std::int64_t n = p.numel();
    const std::size_t bytes = static_cast<std::size_t>(n) * element_size(p.dtype());
    auto it = open.find(p.dtype());
    if (it == open.end() || (fill[it->second] > 0 && static_cast<std::size_t>(fill[it->second]) * element_size(p.dtype()) +
                                                            bytes > options.bucket_bytes)) {
      st.buckets.push_back({});
      st.buckets.back().dtype = p.dtype();
      fill.push_back(0);
      open[p.dtype()] = st.buckets.size() - 1;
      it = open.find(p.dtype());
    }
    const std::size_t bi = it->second;
    State::Slot s;
    s.param = p;
    s.bucket = bi;
    s.index = st.buckets[bi].slots.size();
    s.offset = fill[bi];
    s.numel = n;
    fill[bi] += n;
    st.buckets[bi].slots.push_back(st.slots.size());
    st.slots.push_back(std::move(s));
  }
  for (std::size_t bi = 0; bi < st.buckets.size(); ++bi) {
    State::Bucket& b = st.buckets[bi];
    b.grad_elems = fill[bi];
    b.buffer = zeros({b.grad_elems + static_cast<std::int64_t>(b.slots.size())}, {.dtype = b.dtype});
  }
  if (options.broadcast_parameters && world_size() > 1) {
    for (Tensor& p : parameters) broadcast_(p, 0);
  }
  if (options.overlap && world_size() > 1) {
    std::weak_ptr<State> weak = state_;
    for (std::size_t i = 0; i < st.slots.size(); ++i) {
      st.slots[i].param.register_hook([weak, i](const Tensor& g) {
        if (auto s = weak.lock()) s->on_grad(i, g);
        return Tensor();
      });
    }
  }
}

GradientSynchronizer::~GradientSynchronizer() = default;

void GradientSynchronizer::prepare(double weight) {
  CG_CHECK(!state_->in_step, ValueError, "GradientSynchronizer::prepare: called twice without finish() in between");
  CG_CHECK(weight <= 1.0, ValueError, "GradientSynchronizer::prepare: weight must be at most 1; got ", weight);
  state_->begin(weight);
}

void GradientSynchronizer::finish() { state_->end(); }

std::size_t GradientSynchronizer::num_buckets() const { return state_->buckets.size(); }

std::vector<std::size_t> GradientSynchronizer::bucket_bytes() const {
  std::vector<std::size_t> out;
  for (const auto& b : state_->buckets)
    out.push_back(static_cast<std::size_t>(b.grad_elems) * element_size(b.dtype));
  return out;
}

const SynchronizerStats& GradientSynchronizer::stats() const { return state_->stats; }
void GradientSynchronizer::reset_stats() { state_->stats = {}; }

}  // namespace chaingrad::distributed
