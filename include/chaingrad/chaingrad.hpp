#pragma once
// The whole public API.
#include "chaingrad/autograd.hpp"
#include "chaingrad/dtype.hpp"
#include "chaingrad/error.hpp"
#include "chaingrad/ops.hpp"
#include "chaingrad/shape.hpp"
#include "chaingrad/storage.hpp"
#include "chaingrad/tensor.hpp"
