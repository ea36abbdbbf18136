#pragma once
#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string_view>

#include "chaingrad/error.hpp"

namespace chaingrad {

// Float32 and Float64 carry gradients; Int64 holds indices and labels only.
enum class DType : std::uint8_t { Float32, Float64, Int64 };

constexpr std::size_t element_size(DType t) { return t == DType::Float32 ? 4 : 8; }
constexpr bool is_floating(DType t) { return t != DType::Int64; }
constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Int64: return "int64";
  }
  return "?";
}
inline std::ostream& operator<<(std::ostream& os, DType t) { return os << dtype_name(t); }

// numpy/PyTorch promotion for the types we have: the wider float wins; int64 yields to floats.
constexpr DType promote(DType a, DType b) {
  if (a == b) return a;
  if (a == DType::Float64 || b == DType::Float64) return DType::Float64;
  return DType::Float32;
}

template <class T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::Float32; };
template <> struct DTypeOf<double> { static constexpr DType value = DType::Float64; };
template <> struct DTypeOf<std::int64_t> { static constexpr DType value = DType::Int64; };

// Calls f.template operator()<T>() with T the C++ type of `t`.
template <class F>
decltype(auto) dispatch(DType t, F&& f) {
  switch (t) {
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
    case DType::Int64: return f.template operator()<std::int64_t>();
  }
  throw InternalError("dispatch: bad dtype");
}

// Same, for the floating types only; an int64 tensor is a user error naming `op`.
template <class F>
decltype(auto) dispatch_float(DType t, std::string_view op, F&& f) {
  switch (t) {
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
    case DType::Int64: break;
  }
  detail::throw_error<TypeError>(op, ": expected a float32 or float64 tensor; got int64");
}

}  // namespace chaingrad
