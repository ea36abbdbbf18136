#include <gtest/gtest.h>

#include <cmath>
#include <thread>
#include <vector>

#include "chaingrad/chaingrad.hpp"

namespace cg = chaingrad;
using cg::Tensor;

TEST(Tensor, CreationAndItem) {
  EXPECT_EQ(cg::zeros({2, 3}).shape(), (cg::Dims{2, 3}));
  EXPECT_DOUBLE_EQ(cg::full({2}, 1.5).at({1}), 1.5);
  EXPECT_DOUBLE_EQ(cg::arange(0, 5).at({4}), 4.0);
  EXPECT_EQ(cg::arange(0, 1, 0.25).numel(), 4);
  EXPECT_DOUBLE_EQ(cg::linspace(0, 1, 5).at({4}), 1.0);
  EXPECT_DOUBLE_EQ(cg::eye(3).at({1, 1}), 1.0);
  EXPECT_DOUBLE_EQ(cg::eye(3).at({1, 2}), 0.0);
  EXPECT_DOUBLE_EQ(cg::tensor({{1, 2}, {3, 4}}).at({1, 0}), 3.0);
  EXPECT_DOUBLE_EQ(cg::scalar(2.5).item(), 2.5);
  EXPECT_THROW(cg::zeros({2}).item(), cg::ValueError);
  EXPECT_THROW(cg::zeros({2}).at({2}), cg::ShapeError);
}

TEST(Tensor, SeededRandomIsReproducible) {
  cg::Generator g1(7), g2(7);
  EXPECT_TRUE(cg::allclose(cg::randn({10}, {}, &g1), cg::randn({10}, {}, &g2), 0, 0));
  Tensor u = cg::rand({1000}, {.dtype = cg::DType::Float64}, &g1);
  EXPECT_NEAR(cg::mean(u).item(), 0.5, 0.05);
  Tensor n = cg::randn({4000}, {.dtype = cg::DType::Float64}, &g1);
  EXPECT_NEAR(cg::std(n).item(), 1.0, 0.05);
  Tensor r = cg::randint(3, 7, {100}, &g1);
  for (auto v : r.to_vector<std::int64_t>()) {
    EXPECT_GE(v, 3);
    EXPECT_LT(v, 7);
  }
  auto p = cg::randperm(10, &g1).to_vector<std::int64_t>();
  std::sort(p.begin(), p.end());
  for (int i = 0; i < 10; ++i) EXPECT_EQ(p[i], i);
}

TEST(Views, ShareStorage) {
  Tensor a = cg::arange(0, 12, 1, {.dtype = cg::DType::Float64}).reshape({3, 4});
  Tensor t = a.transpose(0, 1);
  EXPECT_EQ(t.storage(), a.storage());
  EXPECT_FALSE(t.is_contiguous());
  EXPECT_DOUBLE_EQ(t.at({3, 2}), 11.0);
  Tensor s = a.slice(1, 1, 4, 2);
  EXPECT_EQ(s.shape(), (cg::Dims{3, 2}));
  EXPECT_DOUBLE_EQ(s.at({2, 1}), 11.0);
  Tensor row = a.select(0, 1);
  EXPECT_DOUBLE_EQ(row.at({0}), 4.0);
  {
    cg::NoGradGuard ng;
    row.fill_(-1);
  }
  EXPECT_DOUBLE_EQ(a.at({1, 3}), -1.0);
  EXPECT_EQ(a.unsqueeze(0).shape(), (cg::Dims{1, 3, 4}));
  EXPECT_EQ(a.unsqueeze(0).squeeze().shape(), (cg::Dims{3, 4}));
  EXPECT_EQ(a.flatten().shape(), (cg::Dims{12}));
  EXPECT_EQ(cg::expand(cg::zeros({3, 1}), {2, 3, 4}).strides()[0], 0);
  EXPECT_EQ(a.permute({1, 0}).shape(), (cg::Dims{4, 3}));
  EXPECT_THROW(t.view({12}), cg::ShapeError);  // non-contiguous: view impossible
  EXPECT_EQ(t.reshape({12}).shape(), (cg::Dims{12}));
}

// reshape (and so view, select, squeeze, unsqueeze and flatten) gives a view wherever the strides
// allow, as in PyTorch, not only of contiguous tensors; where they do not, it copies.
TEST(Views, ReshapeOfAStridedTensorIsAViewWhereStridesAllow) {
  cg::NoGradGuard ng;
  Tensor a = cg::arange(0, 12, 1, {.dtype = cg::DType::Float64}).reshape({3, 4});
  Tensor col = a.t().select(0, 2);  // column 2: stride 4
  EXPECT_EQ(col.storage(), a.storage());
  EXPECT_EQ(col.strides(), (cg::Dims{4}));
  EXPECT_EQ(col.to_vector<double>(), (std::vector<double>{2, 6, 10}));
  col.fill_(-1);
  EXPECT_EQ(a.select(1, 2).to_vector<double>(), (std::vector<double>{-1, -1, -1}));

  Tensor even = a.slice(1, 0, 4, 2);  // [3, 2], strides (4, 2): one even run of 6 elements
  Tensor flat = even.view({6});
  EXPECT_EQ(flat.storage(), a.storage());
  EXPECT_EQ(flat.strides(), (cg::Dims{2}));
  EXPECT_EQ(flat.to_vector<double>(), (std::vector<double>{0, -1, 4, -1, 8, -1}));
  Tensor u = a.t().unsqueeze(1).unsqueeze(0);  // [1, 4, 1, 3]
  EXPECT_EQ(u.storage(), a.storage());
  EXPECT_EQ(u.squeeze().strides(), (cg::Dims{1, 4}));
  Tensor e = cg::expand(cg::arange(0, 4, 1, {.dtype = cg::DType::Float64}), {3, 4});  // stride 0 rows
  EXPECT_EQ(e.reshape({3, 2, 2}).storage(), e.storage());
  EXPECT_EQ(e.reshape({3, 2, 2}).strides(), (cg::Dims{0, 2, 1}));

  // No strides can show a transposed matrix's rows as one run: a copy, in row-major order.
  Tensor t = a.t().reshape({12});
  EXPECT_NE(t.storage(), a.storage());
  EXPECT_EQ(t.to_vector<double>(), a.t().contiguous().reshape({12}).to_vector<double>());
  EXPECT_THROW(a.t().view({12}), cg::ShapeError);
  EXPECT_NE(e.reshape({12}).storage(), e.storage());
}

// Every reshape of permuted, sliced and expanded tensors reads the elements of the contiguous
// copy's reshape, whether it is a view or a copy.
TEST(Views, ReshapeOfPermutedSlicedAndExpandedTensorsReadsInRowMajorOrder) {
  cg::NoGradGuard ng;
  const Tensor base = cg::arange(0, 2 * 3 * 4 * 6, 1, {.dtype = cg::DType::Float64}).reshape({2, 3, 4, 6});
  const std::vector<Tensor> sources = {base.permute({1, 0, 2, 3}), base.permute({0, 1, 3, 2}),
                                       base.slice(3, 0, 6, 2),      base.slice(2, 1, 3),
                                       base.permute({3, 2, 1, 0}),  base.select(1, 1),
                                       cg::expand(base.slice(0, 0, 1), {3, 3, 4, 6}).slice(3, 1, 4)};
  int views = 0, copies = 0;
  for (const Tensor& x : sources) {
    // Targets: the shape with neighbours merged, split and padded with 1s.
    std::vector<cg::Dims> targets = {{x.numel()}, {1, x.numel(), 1}};
    const cg::Dims s = x.shape();
    for (int d = 0; d + 1 < s.size(); ++d) {
      cg::Dims merged;
      for (int i = 0; i < s.size(); ++i) {
        if (i == d + 1) continue;
        merged.push_back(i == d ? s[d] * s[d + 1] : s[i]);
      }
      targets.push_back(merged);
      if (s[d] % 2 == 0) {
        cg::Dims split;
        for (int i = 0; i < s.size(); ++i) {
          if (i == d) {
            split.push_back(2);
            split.push_back(s[d] / 2);
          } else {
            split.push_back(s[i]);
          }
        }
        targets.push_back(split);
      }
    }
    for (const cg::Dims& target : targets) {
      const Tensor r = x.reshape(target);
      ASSERT_EQ(r.shape(), target);
      EXPECT_EQ(r.to_vector<double>(), x.contiguous().reshape(target).to_vector<double>())
          << x.shape() << " " << x.strides() << " as " << target;
      (r.storage() == x.storage() ? views : copies)++;
    }
  }
  EXPECT_GT(views, 10);
  EXPECT_GT(copies, 5);
}

// Heads, storages and nodes are counted in place, and a sole owner frees without an atomic. Many
// threads copying and dropping handles to the same tensors and nodes must leave every count where
// it started (a lost update would show here, a double free under AddressSanitizer).
TEST(Ownership, CountsStayExactUnderThreads) {
  Tensor small = cg::scalar(1.0);          // head, storage and data in one block
  Tensor big = cg::zeros({1000});          // a storage of its own
  Tensor w = cg::scalar(0.5, {.dtype = cg::DType::Float64, .requires_grad = true});
  Tensor y = w * 2.0;                      // makes w's accumulator, shared by every graph below
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 5000; ++i) {
        Tensor a = small, v = small.reshape({1}), b = big.slice(0, 1, 10);
        Tensor z = w * 3.0 + y;            // nodes with edges to w's accumulator and y's node
        ASSERT_EQ(v.item(), 1.0);
        ASSERT_EQ(z.grad_fn()->next_edges().size(), 2u);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(small.impl_ptr().use_count(), 1);
  EXPECT_EQ(small.storage().use_count(), 1);
  EXPECT_EQ(big.storage().use_count(), 1);
  EXPECT_EQ(w.impl()->grad_accumulator.use_count(), 2);  // w and y's node
  EXPECT_EQ(y.grad_fn().use_count(), 1);
  y.backward();
  EXPECT_DOUBLE_EQ(w.grad().item(), 2.0);
}

TEST(Views, CatStackSplit) {
  Tensor a = cg::ones({2, 2}), b = cg::zeros({1, 2});
  Tensor c = cg::cat({a, b}, 0);
  EXPECT_EQ(c.shape(), (cg::Dims{3, 2}));
  EXPECT_DOUBLE_EQ(c.at({2, 0}), 0.0);
  EXPECT_EQ(cg::stack({a, a}, 0).shape(), (cg::Dims{2, 2, 2}));
  auto parts = cg::split(cg::arange(0, 5), 2);
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[2].numel(), 1);
  EXPECT_DOUBLE_EQ(parts[2].item(), 4.0);
  EXPECT_THROW(cg::cat({a, cg::zeros({2, 3})}, 0), cg::ShapeError);
  EXPECT_THROW(cg::split(cg::scalar(1.0), 2), cg::ShapeError);  // (not an empty list: 0-d has no dim 0)
}

// A 0-d tensor has no dimension to take apart: each op that indexes one says so (found by the op
// registry's 0-d pass, where these read past the end of the shape).
TEST(Views, OpsThatIndexADimensionRefuse0d) {
  const Tensor s = cg::scalar(2.0);
  const Tensor index = cg::tensor({0.0}).to(cg::DType::Int64);
  EXPECT_THROW(cg::select(s, 0, 0), cg::ShapeError);
  EXPECT_THROW(cg::index_select(s, 0, index), cg::ShapeError);
  EXPECT_THROW(cg::index_add(s, 0, index, cg::scalar(1.0)), cg::ShapeError);
  EXPECT_THROW(cg::slice_backward(s, {5, 3}, 0, 1, 2), cg::ShapeError);
  // slice_backward takes a negative dim like slice does
  const Tensor g = cg::slice_backward(cg::ones({2, 3}), {2, 6}, -1, 1, 2);
  EXPECT_EQ(g.to_vector<double>(), (std::vector<double>{0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1}));
}

TEST(Tensor, PrintsLikeNumpy) {
  const std::string s = cg::tensor({{1, 2}, {3, 4}}).to_string();
  EXPECT_NE(s.find("tensor([[1.0000, 2.0000],"), std::string::npos) << s;
  EXPECT_NE(s.find("dtype=float64"), std::string::npos) << s;
  Tensor a = cg::scalar(2.0, {.dtype = cg::DType::Float64, .requires_grad = true});
  EXPECT_NE((a * a).to_string().find("grad_fn=<mul>"), std::string::npos);
  EXPECT_NE(cg::arange(0, 100).to_string().find("..."), std::string::npos);
}

TEST(Allocator, WarmStepAllocatesNothingFromTheOs) {
  Tensor w = cg::randn({64, 32}, {.requires_grad = true});
  Tensor x = cg::randn({16, 32});
  auto step = [&] {
    Tensor L = cg::sum(cg::relu(cg::linear(x, w)));
    L.backward();
    w.zero_grad();
  };
  step();
  step();
  const auto before = cg::allocator::stats().os_allocations;
  for (int i = 0; i < 10; ++i) step();
  EXPECT_EQ(cg::allocator::stats().os_allocations, before);
  EXPECT_GT(cg::allocator::stats().cache_hits, 0u);
}

TEST(Allocator, LargeBuffersStartOnAHugePageBoundary) {
  constexpr std::uintptr_t kHugePage = std::uintptr_t{2} << 20;
  for (const std::int64_t n : {std::int64_t{1} << 20, (std::int64_t{5} << 20) / 4 + 3, std::int64_t{47040000} / 4}) {
    Tensor t = cg::zeros({n}, {.dtype = cg::DType::Float32});
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.raw_data()) % kHugePage, 0u) << n << " floats";
    t.fill_(1.0);  // every byte is writable
    EXPECT_EQ(t.to_vector<float>().back(), 1.0f);
  }
  Tensor small = cg::zeros({1000});
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(small.raw_data()) % 64, 0u);
}

TEST(Tensor, InPlaceOpsAndConversion) {
  Tensor a = cg::ones({2, 2});
  a.add_(cg::tensor({1.0, 2.0}, false, cg::DType::Float32), 2.0);
  EXPECT_DOUBLE_EQ(a.at({1, 1}), 5.0);
  a.mul_(0.5);
  EXPECT_DOUBLE_EQ(a.at({0, 0}), 1.5);
  EXPECT_EQ(a.to(cg::DType::Float64).dtype(), cg::DType::Float64);
  const auto v = cg::arange(0, 4).reshape({2, 2}).transpose(0, 1).to_vector<float>();
  EXPECT_EQ(v, (std::vector<float>{0, 2, 1, 3}));
  EXPECT_THROW(a.data<double>(), cg::TypeError);
  EXPECT_THROW(cg::ones({2}, {.dtype = cg::DType::Int64}).requires_grad_(), cg::TypeError);
}

// Large in-place updates are split across the pool; every element must come out as on one thread,
// and a source that overlaps the destination at an offset keeps the serial left-to-right result.
TEST(Tensor, InPlaceOpsOnLargeTensorsMatchOneThread) {
  const int saved = cg::get_num_threads();
  const std::int64_t n = (std::int64_t{1} << 17) + 5;  // above the split threshold, not a multiple of 16
  for (const int threads : {1, 2}) {
    cg::set_num_threads(threads);
    const cg::TensorOptions f64{.dtype = cg::DType::Float64};
    Tensor p = cg::arange(0, static_cast<double>(n), 1.0, f64), g = cg::arange(0, 2.0 * n, 2.0, f64);
    p.add_(g, 0.5);  // 2i
    p.mul_(0.25);    // i / 2
    Tensor q = cg::zeros({n}, f64).fill_(3.0);
    const auto pv = p.to_vector<double>(), qv = q.to_vector<double>();
    for (std::int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(pv[i], 0.5 * static_cast<double>(i)) << "threads " << threads << ", element " << i;
      ASSERT_EQ(qv[i], 3.0) << "threads " << threads << ", element " << i;
    }
    // t[1:] += t[:-1], read as it is written: prefix sums, t[i] = i (i + 1) / 2.
    Tensor t = cg::arange(0, static_cast<double>(n), 1.0, f64);
    Tensor tail = t.slice(0, 1, n);
    tail.add_(t.slice(0, 0, n - 1));
    const auto tv = t.to_vector<double>();
    for (std::int64_t i = 0; i < n; ++i)
      ASSERT_EQ(tv[i], static_cast<double>(i) * static_cast<double>(i + 1) / 2)
          << "threads " << threads << ", element " << i;
  }
  cg::set_num_threads(saved);
}

TEST(Reductions, ValuesAndArgmax) {
  Tensor a = cg::tensor({{1, 5, 3}, {7, 2, 9}});
  EXPECT_DOUBLE_EQ(cg::sum(a).item(), 27.0);
  EXPECT_DOUBLE_EQ(cg::sum(a, {0}).at({2}), 12.0);
  EXPECT_EQ(cg::sum(a, {1}, true).shape(), (cg::Dims{2, 1}));
  EXPECT_DOUBLE_EQ(cg::amax(a, {1}).at({0}), 5.0);
  EXPECT_DOUBLE_EQ(cg::amin(a).item(), 1.0);
  EXPECT_EQ(cg::argmax(a, 1).to_vector<std::int64_t>(), (std::vector<std::int64_t>{1, 2}));
  EXPECT_NEAR(cg::var(a, {1}).at({0}), 4.0, 1e-12);
  EXPECT_NEAR(cg::sum(cg::softmax(a, 1), {1}).at({1}), 1.0, 1e-12);
}

TEST(Matmul, MatchesNaiveProduct) {
  cg::Generator g(3);
  Tensor a = cg::randn({5, 7}, {.dtype = cg::DType::Float64}, &g), b = cg::randn({7, 4}, {.dtype = cg::DType::Float64}, &g);
  Tensor c = cg::matmul(a, b);
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 4; ++j) {
      double acc = 0;
      for (int k = 0; k < 7; ++k) acc += a.at({i, k}) * b.at({k, j});
      EXPECT_NEAR(c.at({i, j}), acc, 1e-12);
    }
  // Transposed operands go straight to the BLAS with transpose flags.
  EXPECT_TRUE(cg::allclose(cg::matmul(b.t(), a.t()), c.t(), 1e-12, 1e-12));
  EXPECT_EQ(cg::matmul(cg::zeros({3, 2, 5, 7}), cg::zeros({7, 4})).shape(), (cg::Dims{3, 2, 5, 4}));
}

// uint8 holds bytes: made, converted, gathered, copied and printed.
TEST(UInt8, HoldsBytesThatConvertGatherAndPrint) {
  const std::vector<double> v{0, 1, 254.6, 255, 300, -4, NAN};
  const Tensor u = cg::from_vector(v, {7}, {.dtype = cg::DType::UInt8});
  EXPECT_EQ(u.dtype(), cg::DType::UInt8);
  EXPECT_EQ(cg::element_size(cg::DType::UInt8), 1u);
  EXPECT_FALSE(cg::is_floating(cg::DType::UInt8));
  // Into uint8 a float saturates, NaN gives 0 (a plain cast would be undefined).
  EXPECT_EQ(u.to_vector<std::int64_t>(), (std::vector<std::int64_t>{0, 1, 254, 255, 255, 0, 0}));
  EXPECT_DOUBLE_EQ(u.at({3}), 255.0);
  EXPECT_EQ(u.to(cg::DType::Float32).to_vector<float>(), (std::vector<float>{0, 1, 254, 255, 255, 0, 0}));
  EXPECT_EQ(cg::full({2}, 1e9, {.dtype = cg::DType::UInt8}).to_vector<std::int64_t>(), (std::vector<std::int64_t>{255, 255}));
  EXPECT_EQ(u.to_string(), "tensor([0, 1, 254, 255, 255, 0, 0], dtype=uint8)");
  EXPECT_EQ(cg::promote(cg::DType::UInt8, cg::DType::Float32), cg::DType::Float32);
  EXPECT_EQ(cg::promote(cg::DType::UInt8, cg::DType::Int64), cg::DType::Int64);

  const Tensor img = cg::arange(0, 12, 1, {.dtype = cg::DType::UInt8}).reshape({3, 4});
  const Tensor rows = cg::index_select(img, 0, cg::from_vector(std::vector<std::int64_t>{2, 0}, {2}));
  EXPECT_EQ(rows.to_vector<std::int64_t>(), (std::vector<std::int64_t>{8, 9, 10, 11, 0, 1, 2, 3}));
  EXPECT_EQ(img.t().contiguous().to_vector<std::int64_t>(),
            (std::vector<std::int64_t>{0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11}));

  // Arithmetic on integers computes in float32, as for int64.
  const Tensor sum = cg::add(img, img);
  EXPECT_EQ(sum.dtype(), cg::DType::Float32);
  EXPECT_DOUBLE_EQ(sum.at({2, 3}), 22.0);
  try {
    cg::matmul(img, img.t());
    FAIL() << "expected a TypeError";
  } catch (const cg::TypeError& e) {
    EXPECT_NE(std::string(e.what()).find("uint8"), std::string::npos) << e.what();
  }
  EXPECT_THROW(cg::zeros({2}, {.dtype = cg::DType::UInt8, .requires_grad = true}), cg::TypeError);
}

