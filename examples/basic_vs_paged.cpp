// Contiguous reservation against paging, on the same budget and requests.
//
// Twelve requests of a 256-token prompt that will generate 64 tokens, on a
// server that must reserve the model's 2,048-token maximum for each
// (BasicKVCache), and the same requests with pages taken as tokens arrive
// (PagedKVCache). Prints how many are admitted and how much of the memory
// they hold is real token KV.
#include <cstdio>
#include <exception>
#include <iomanip>
#include <iostream>
#include <string>

import kvcache;

namespace {

int run() {
  using namespace kvcache;
  const ModelConfig cfg{32, 8, 128, 2};  // Llama-3.1-8B: 128 KiB per token
  const Bytes budget{2ULL << 30};        // 2 GiB: 16,384 tokens
  const Tokens prompt{256};
  const Tokens generate{64};
  const Tokens max_seq{2048};

  BasicKVCache basic(cfg, budget);
  PagedKVCache paged(cfg, budget, Tokens{16}, Storage::none);  // bookkeeping only
  int admitted_basic = 0;
  int admitted_paged = 0;
  for (int i = 0; i < 12; ++i) {
    const std::string id = "req" + std::to_string(i);
    if (basic.allocate(id, prompt, max_seq - prompt)) ++admitted_basic;
    if (paged.allocate_paged(id, prompt)) ++admitted_paged;
  }
  // Decode: every admitted paged request generates its tokens.
  for (Tokens t{0}; t < generate; ++t) {
    for (int i = 0; i < admitted_paged; ++i) {
      if (!paged.append_token_all_layers("req" + std::to_string(i))) return 1;
    }
  }
  const BasicStats b = basic.stats();
  const PagedStats p = paged.stats();
  const double tokens_basic = static_cast<double>(admitted_basic) *
                              static_cast<double>((prompt + generate).count());
  std::cout << std::fixed << std::setprecision(1);  // the percentages
  std::cout << "budget " << (budget.count() >> 20) << " MiB, " << 12 << " requests of "
            << prompt.count() << " + " << generate.count() << " tokens\n";
  std::cout << "basic (reserve " << max_seq.count() << "): " << admitted_basic << " admitted, "
            << 100.0 * tokens_basic * static_cast<double>(cfg.bytes_per_token().count()) /
                   static_cast<double>(b.used_memory.count())
            << "% of the reserved memory is token KV\n";
  std::cout << "paged (16-token pages): " << admitted_paged << " admitted, memory efficiency "
            << 100.0 * paged.memory_efficiency() << "%, " << p.used_pages.count() << " of "
            << p.total_pages.count() << " pages used\n";
  // 2 GiB / 256 MiB per reservation = 8; paged fits all 12 (320 tokens each).
  return admitted_basic == 8 && admitted_paged == 12 && paged.check_invariants() ? 0 : 1;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (const std::exception& e) {
    std::fputs("basic_vs_paged: ", stderr);
    std::fputs(e.what(), stderr);
    std::fputs("\n", stderr);
    return 1;
  } catch (...) {
    std::fputs("basic_vs_paged: unknown exception\n", stderr);
    return 1;
  }
}
