// Many requests that start with the same system prompt share its pages.
//
// 20 requests, each a 512-token system prompt followed by 40 tokens of its
// own, with and without naming the prefix. Prints the pages each way and
// what sharing saved; then frees everything and shows that the prefix stays
// cached for the next request.
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>

import kvcache;

namespace {

int run() {
  using namespace kvcache;
  const ModelConfig cfg{32, 8, 128, 2};
  const Bytes budget{4ULL << 30};
  const Tokens page{16};
  const Tokens system{512};
  const Tokens prompt = system + Tokens{40};

  PagedKVCache plain(cfg, budget, page, Storage::none);
  PagedKVCache shared(cfg, budget, page, Storage::none);
  for (int i = 0; i < 20; ++i) {
    const std::string id = "user" + std::to_string(i);
    if (!plain.allocate_paged(id, prompt)) return 1;
    if (!shared.allocate_paged(id, prompt, "system-prompt-v1", system)) return 1;
  }
  const PagedStats a = plain.stats();
  const PagedStats b = shared.stats();
  std::cout << "without sharing: " << a.used_pages.count() << " pages; with sharing: "
            << b.used_pages.count() << " pages (" << b.prefix.pages_saved << " saved, "
            << b.prefix_hits << " hits)\n";
  for (int i = 0; i < 20; ++i) shared.free("user" + std::to_string(i));
  std::cout << "all freed: " << shared.stats().cached_pages.count()
            << " pages stay cached for the prefix\n";
  if (!shared.allocate_paged("late", prompt, "system-prompt-v1", system)) return 1;
  std::cout << "a later request reuses them: hits = " << shared.stats().prefix_hits
            << ", cached = " << shared.stats().cached_pages.count() << "\n";
  // 32 layers * 35 pages = 1,120 per request alone; the 32 prefix pages per
  // layer are stored once: 1,120 + 19 * 3 * 32 = 2,944 instead of 22,400.
  return a.used_pages == Pages{22400} && b.used_pages == Pages{2944} &&
                 shared.check_invariants()
             ? 0
             : 1;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (const std::exception& e) {
    std::fputs("prefix_sharing: ", stderr);
    std::fputs(e.what(), stderr);
    std::fputs("\n", stderr);
    return 1;
  } catch (...) {
    std::fputs("prefix_sharing: unknown exception\n", stderr);
    return 1;
  }
}
