// main() of the two test programs (tests/CMakeLists.txt).
//
// Beyond GoogleTest's own main: a filter that selects no test is an error (a suite renamed
// under tests/CMakeLists.txt's lists would otherwise run nothing and pass), and the CUDA
// program without a GPU reports its tests as skipped as a whole (exit 77, ctest's
// SKIP_RETURN_CODE) instead of passing.
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <cstdio>

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::UnitTest& unit = *::testing::UnitTest::GetInstance();
#ifdef QLORA_CUDA_TEST_PROGRAM
  if (!torch::cuda::is_available()) {
    std::printf("no CUDA device visible to torch: the %d cuda tests are skipped\n", unit.total_test_count());
    return 77;
  }
#endif
  const int failed = RUN_ALL_TESTS();
  if (unit.test_to_run_count() == 0) {
    std::fprintf(stderr, "the filter '%s' selects no test: a suite in tests/CMakeLists.txt was renamed?\n",
                 ::testing::GTEST_FLAG(filter).c_str());
    return 1;
  }
  return failed;
}
