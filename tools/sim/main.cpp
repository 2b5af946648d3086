// kvcache-sim: a discrete-step serving simulator on kvcache. Everything but
// argv handling and the terminal check lives in the kvcache_sim module
// (sim.cppm), where it is tested.
#include <unistd.h>  // isatty: the progress bar is for a terminal, not for logs

#include <cstdio>
#include <iostream>
#include <span>
#include <string_view>
#include <vector>

import kvcache_sim;

int main(int argc, char** argv) {
  try {
    const std::span<char*> raw(argv, static_cast<std::size_t>(argc));
    std::vector<std::string_view> args;
    for (std::size_t i = 1; i < raw.size(); ++i) args.emplace_back(raw[i]);
    return kvcache_sim::run(args, std::cout, std::cerr, isatty(STDERR_FILENO) == 1);
  } catch (...) {  // run() does not throw; this only guards the argv copy
    std::fputs("kvcache-sim: internal error: out of memory\n", stderr);
    return kvcache_sim::kExitInternal;
  }
}
