#pragma once
#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string_view>
#include <type_traits>

#include "chaingrad/error.hpp"

namespace chaingrad {

// Float32 and Float64 carry gradients; Int64 holds indices and labels; UInt8 holds raw bytes (images
// as stored in their files). Arithmetic on integers computes in float32.
enum class DType : std::uint8_t { Float32, Float64, Int64, UInt8 };

constexpr std::size_t element_size(DType t) {
  switch (t) {
    case DType::Float32: return 4;
    case DType::UInt8: return 1;
    default: return 8;
  }
}
constexpr bool is_floating(DType t) { return t == DType::Float32 || t == DType::Float64; }
constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Int64: return "int64";
    case DType::UInt8: return "uint8";
  }
  return "?";
}
inline std::ostream& operator<<(std::ostream& os, DType t) { return os << dtype_name(t); }

// numpy/PyTorch promotion for the types we have: the wider float wins; integers yield to floats,
// and uint8 to int64.
constexpr DType promote(DType a, DType b) {
  if (a == b) return a;
  if (a == DType::Float64 || b == DType::Float64) return DType::Float64;
  if (a == DType::Float32 || b == DType::Float32) return DType::Float32;
  return DType::Int64;
}

template <class T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::Float32; };
template <> struct DTypeOf<double> { static constexpr DType value = DType::Float64; };
template <> struct DTypeOf<std::int64_t> { static constexpr DType value = DType::Int64; };
template <> struct DTypeOf<std::uint8_t> { static constexpr DType value = DType::UInt8; };

// A value converted to an element of type T. Into uint8 from a float it saturates (NaN gives 0),
// as a pixel does, where a plain cast of a value outside [0, 255] is undefined.
template <class T, class S>
constexpr T element_cast(S v) {
  if constexpr (std::is_same_v<T, std::uint8_t> && std::is_floating_point_v<S>) {
    if (!(v > S(0))) return 0;  // (NaN too)
    return v >= S(255) ? std::uint8_t{255} : static_cast<std::uint8_t>(v);
  } else {
    return static_cast<T>(v);
  }
}

// Calls f.template operator()<T>() with T the C++ type of `t`.
template <class F>
decltype(auto) dispatch(DType t, F&& f) {
  switch (t) {
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
    case DType::Int64: return f.template operator()<std::int64_t>();
    case DType::UInt8: return f.template operator()<std::uint8_t>();
  }
  throw InternalError("dispatch: bad dtype");
}

// Same, for the floating types only; an int64 tensor is a user error naming `op`.
template <class F>
decltype(auto) dispatch_float(DType t, std::string_view op, F&& f) {
  switch (t) {
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
    case DType::Int64:
    case DType::UInt8: break;
  }
  detail::throw_error<TypeError>(op, ": expected a float32 or float64 tensor; got ", dtype_name(t));
}

}  // namespace chaingrad
