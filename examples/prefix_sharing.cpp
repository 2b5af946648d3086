// Many requests that start with the same system prompt share its pages.
//
// 20 requests, each a 512-token system prompt followed by 40 tokens of its
// own, with and without naming the prefix. Prints the pages each way and
// what sharing saved; then frees everything and shows that the prefix stays
// cached for the next request.
#include <cstdio>
#include <string>

import kvcache;

int main() {
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
  std::printf("without sharing: %llu pages; with sharing: %llu pages (%llu saved, %llu hits)\n",
              static_cast<unsigned long long>(a.used_pages.count()),
              static_cast<unsigned long long>(b.used_pages.count()),
              static_cast<unsigned long long>(b.prefix.pages_saved),
              static_cast<unsigned long long>(b.prefix_hits));
  for (int i = 0; i < 20; ++i) shared.free("user" + std::to_string(i));
  std::printf("all freed: %llu pages stay cached for the prefix\n",
              static_cast<unsigned long long>(shared.stats().cached_pages.count()));
  if (!shared.allocate_paged("late", prompt, "system-prompt-v1", system)) return 1;
  std::printf("a later request reuses them: hits = %llu, cached = %llu\n",
              static_cast<unsigned long long>(shared.stats().prefix_hits),
              static_cast<unsigned long long>(shared.stats().cached_pages.count()));
  // 32 layers * 35 pages = 1,120 per request alone; the 32 prefix pages per
  // layer are stored once: 1,120 + 19 * 3 * 32 = 2,944 instead of 22,400.
  return a.used_pages == Pages{22400} && b.used_pages == Pages{2944} &&
                 shared.check_invariants()
             ? 0
             : 1;
}
