// replay_main.cpp: runs the fuzz target over files without libFuzzer, so that
// every build (the test preset included, which has no libFuzzer
// instrumentation) replays the seed corpus and the saved regressions.
//
//   kvcache_fuzz_replay <file or directory>...
//
// Each file is one input; a directory stands for its regular files, in name
// order. Exits 0 when every input ran (a broken check aborts, as under
// libFuzzer) and prints how many inputs and operations ran.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <span>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv);
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

std::vector<std::filesystem::path> inputs(const std::filesystem::path& arg) {
  std::vector<std::filesystem::path> out;
  if (std::filesystem::is_directory(arg)) {
    for (const auto& entry : std::filesystem::directory_iterator(arg)) {
      if (entry.is_regular_file()) out.push_back(entry.path());
    }
    std::sort(out.begin(), out.end());
  } else {
    out.push_back(arg);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  LLVMFuzzerInitialize(&argc, &argv);
  const std::span<char*> args(argv, static_cast<std::size_t>(argc));
  std::size_t files = 0;
  for (const char* arg : args.subspan(1)) {
    for (const std::filesystem::path& file : inputs(arg)) {
      std::ifstream in(file, std::ios::binary);
      if (!in) {
        std::cerr << "kvcache_fuzz_replay: cannot read " << file << '\n';
        return 1;
      }
      const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      std::vector<std::uint8_t> data(bytes.begin(), bytes.end());
      LLVMFuzzerTestOneInput(data.data(), data.size());
      ++files;
    }
  }
  std::cout << "kvcache_fuzz_replay: " << files << " inputs replayed\n";
  return files == 0 ? 1 : 0;
}
