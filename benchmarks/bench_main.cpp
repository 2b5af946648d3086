// benchmarks/bench_main.cpp: main() of every kvcache benchmark program, and
// the reporter that collects the table rows (see bench_support.hpp).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "bench_support.hpp"
#include "workloads.hpp"

namespace kvcache::bench {

namespace {

struct Registered {
  std::string benchmark;
  Row row;
};

std::vector<Registered>& rows() {
  static std::vector<Registered> r;
  return r;
}

double min_of(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }
double max_of(const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); }

// Console output as usual, and the median / min / max aggregates of every
// row's figure, keyed by benchmark name and aggregate name.
class TableReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Aggregate || run.error_occurred) continue;
      for (std::size_t i = 0; i < rows().size(); ++i) {
        const Registered& r = rows()[i];
        if (r.benchmark != run.run_name.function_name) continue;
        double value = 0;
        if (r.row.counter == "real_time") {
          value = run.GetAdjustedRealTime();
        } else {
          const auto it = run.counters.find(r.row.counter);
          if (it == run.counters.end()) continue;
          value = it->second.value;
        }
        values_[i][run.aggregate_name] = value * r.row.scale;
      }
    }
    ConsoleReporter::ReportRuns(runs);
  }

  [[nodiscard]] const std::map<std::string, double>* values(std::size_t row) const {
    const auto it = values_.find(row);
    return it == values_.end() ? nullptr : &it->second;
  }

 private:
  std::map<std::size_t, std::map<std::string, double>> values_;
};

// Three significant figures or so: 1234, 56.7, 8.90; ratios with 5 decimals.
std::string format(double v, const std::string& unit) {
  const int decimals = unit == "ratio" ? 5 : std::fabs(v) >= 100 ? 0 : std::fabs(v) >= 10 ? 1 : 2;
  std::ostringstream s;
  s << std::fixed << std::setprecision(decimals) << v;
  return s.str();
}

bool write_table(const TableReporter& reporter, const std::string& path) {
  std::ofstream f(path);
  if (!f) {
    std::cerr << "kvcache bench: cannot open " << path << " for writing\n";
    return false;
  }
  for (std::size_t i = 0; i < rows().size(); ++i) {
    const Row& row = rows()[i].row;
    const auto* v = reporter.values(i);
    if (v == nullptr) continue;  // not run (--benchmark_filter)
    std::string median = "-", lo = "-", hi = "-";
    if (v->count("median") != 0 && v->count("min") != 0 && v->count("max") != 0) {
      median = format(v->at("median"), row.unit);
      lo = format(v->at("min"), row.unit);
      hi = format(v->at("max"), row.unit);
    }
    f << row.workload << '\t' << row.variant << '\t' << median << '\t' << lo << '\t' << hi << '\t'
      << row.unit << '\t' << (row.peer.empty() ? "-" : row.peer) << '\n';
  }
  f.close();
  return static_cast<bool>(f);
}

benchmark::internal::Benchmark* with_statistics(benchmark::internal::Benchmark* b,
                                                const Options& options) {
  return b->Repetitions(options.smoke ? 2 : runs)
      ->ComputeStatistics("min", min_of)
      ->ComputeStatistics("max", max_of)
      ->DisplayAggregatesOnly(true)
      ->Unit(benchmark::kNanosecond);
}

}  // namespace

void table_row(const std::string& benchmark, Row row) {
  rows().push_back(Registered{benchmark, std::move(row)});
}

benchmark::internal::Benchmark* register_run(const Options& options, const std::string& name,
                                             Body body) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), std::move(body));
  return with_statistics(b->Iterations(1)->UseManualTime(), options);
}

benchmark::internal::Benchmark* register_micro(const Options& options, const std::string& name,
                                               Body body) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), std::move(body));
  if (options.smoke) b->Iterations(2);
  return with_statistics(b->UseRealTime(), options);
}

}  // namespace kvcache::bench

int main(int argc, char** argv) {
  kvcache::bench::Options options;
  std::string table;
  // Take our options out of argv before Google Benchmark sees it.
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--smoke") == 0) {
      options.smoke = true;
    } else if (std::strncmp(argv[i], "--table=", 8) == 0) {
      table = argv[i] + 8;
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  try {
    kvcache::bench::register_benchmarks(options);
    kvcache::bench::TableReporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    benchmark::Shutdown();
    if (!table.empty() && !kvcache::bench::write_table(reporter, table)) return 1;
  } catch (const std::exception& e) {
    std::cerr << "kvcache bench: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
