// A minimal test harness: CHECK(cond) records a failure with file:line; main returns the failure count.
#pragma once

#include <cstdio>

namespace molm_test {
inline int& failures() {
  static int n = 0;
  return n;
}
}  // namespace molm_test

#define CHECK(cond)                                                         \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++molm_test::failures();                                              \
    }                                                                       \
  } while (0)

#define TEST_MAIN_RETURN()                                                  \
  do {                                                                      \
    if (molm_test::failures()) std::fprintf(stderr, "%d failure(s)\n", molm_test::failures()); \
    else std::printf("ok\n");                                               \
    return molm_test::failures() ? 1 : 0;                                   \
  } while (0)
