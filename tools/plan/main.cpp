// kvcache-plan: a command-line KV-cache calculator. Everything but argv
// handling lives in the kvcache_plan module (plan.cppm), where it is tested.
#include <cstdio>
#include <iostream>
#include <span>
#include <string_view>
#include <vector>

import kvcache_plan;

int main(int argc, char** argv) {
  try {
    const std::span<char*> raw(argv, static_cast<std::size_t>(argc));
    std::vector<std::string_view> args;
    for (std::size_t i = 1; i < raw.size(); ++i) args.emplace_back(raw[i]);
    return kvcache_plan::run(args, std::cout, std::cerr);
  } catch (...) {  // run() does not throw; this only guards the argv copy
    std::fputs("kvcache-plan: internal error: out of memory\n", stderr);
    return kvcache_plan::kExitInternal;
  }
}
