#pragma once
// MPI plumbing shared by the files of src/distributed (only when built with MPI).
#ifdef CHAINGRAD_HAVE_MPI
#include <mpi.h>

#include <cstdint>

#include "chaingrad/distributed.hpp"
#include "chaingrad/dtype.hpp"

namespace chaingrad::distributed::detail {

// MPI counts are int: larger buffers go in chunks of this many elements.
inline constexpr std::int64_t kMaxElementsPerCall = std::int64_t{1} << 30;

MPI_Datatype mpi_type(DType t);
MPI_Op mpi_op(Op op);
// Blocking in-place allreduce over MPI_COMM_WORLD of `count` elements at `data` (no Average division).
void allreduce_raw(void* data, std::int64_t count, DType dtype, Op op);

}  // namespace chaingrad::distributed::detail
#endif
