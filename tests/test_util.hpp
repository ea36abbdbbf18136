#pragma once
// Small helpers shared by the test files.
#include <gtest/gtest.h>

#include <initializer_list>
#include <string>
#include <string_view>

#include "chaingrad/error.hpp"

namespace chaingrad::testing {

// Expects f() to throw E whose message contains every one of `words`.
template <class E = Error, class F>
void expect_error(F&& f, std::initializer_list<std::string_view> words) {
  try {
    f();
    ADD_FAILURE() << "expected an exception; none was thrown";
  } catch (const E& e) {
    const std::string msg = e.what();
    for (std::string_view w : words)
      EXPECT_NE(msg.find(w), std::string::npos) << "message: " << msg << "\n   lacks: " << w;
  }
}

}  // namespace chaingrad::testing
