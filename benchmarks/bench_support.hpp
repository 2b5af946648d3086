// benchmarks/bench_support.hpp: what every kvcache benchmark program shares
// (bench_main.cpp implements it).
//
// Each program defines register_benchmarks(); the shared main() parses two
// options of its own before Google Benchmark's:
//   --smoke          tiny sizes and 2 repetitions of 1-2 iterations: keeps the
//                    programs compiling and correct under ctest (ASan, audited
//                    contracts), measures nothing
//   --table=FILE     write this program's rows of scripts/bench's table to
//                    FILE (tab-separated: workload, variant, median, min, max,
//                    unit, peer figure)
// and runs the benchmarks with a console reporter that also collects the
// median / min / max aggregates of each benchmark's headline figures.
//
// Figures: every benchmark runs `runs` (5) repetitions and reports the
// median and the min-max over them. A whole-workload benchmark (W1-W3) does
// one run per repetition on a fresh pool or cache; its manual time is the
// run's timed region as WORKLOADS.md defines it, and its figures are counters.
#ifndef KVCACHE_BENCH_SUPPORT_HPP
#define KVCACHE_BENCH_SUPPORT_HPP

#include <benchmark/benchmark.h>

#include <functional>
#include <string>

namespace kvcache::bench {

struct Options {
  bool smoke = false;
};

// Defined by each benchmark program.
void register_benchmarks(const Options& options);

// One row of the table: the aggregate of benchmark `benchmark`'s `counter`
// (or of its real time per iteration when counter is "real_time"), times
// `scale`, in `unit`; `peer` is the vLLM figure to print next to it, if any.
struct Row {
  std::string workload;
  std::string variant;
  std::string counter;
  std::string unit;
  double scale = 1.0;
  std::string peer;
};
void table_row(const std::string& benchmark, Row row);

using Body = std::function<void(benchmark::State&)>;

// A whole-workload benchmark: each repetition is one iteration (one run);
// `body` must call state.SetIterationTime with the run's timed region.
benchmark::internal::Benchmark* register_run(const Options& options, const std::string& name,
                                             Body body);

// A micro-benchmark: Google Benchmark picks the iteration count (2 in smoke
// mode); 5 repetitions, real time.
benchmark::internal::Benchmark* register_micro(const Options& options, const std::string& name,
                                               Body body);

}  // namespace kvcache::bench

#endif  // KVCACHE_BENCH_SUPPORT_HPP
