// The smallest real user of an installed kvcache: find_package, link
// kvcache::kvcache, `import kvcache;`. Exits 0 when the library behaves as
// the contract says on a few calls, 1 otherwise.
#include <cstdio>

import kvcache;

int main() {
  using namespace kvcache;
  const ModelConfig cfg{32, 8, 128, 2};
  int failures = 0;
  const auto expect = [&](bool ok, const char* what) {
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    failures += ok ? 0 : 1;
  };
  expect(cfg.bytes_per_token() == Bytes{131072}, "bytes_per_token == 131072");
  expect(cfg.max_tokens(Bytes{8ULL << 30}) == Tokens{65536}, "8 GiB holds 65536 tokens");

  PagedKVCache paged({2, 1, 4, 1}, Bytes{32 * 100}, Tokens{4});
  expect(paged.allocate_paged("r", Tokens{5}), "allocate_paged");
  expect(paged.memory_efficiency() == 0.625, "memory_efficiency == 0.625");
  expect(paged.check_invariants(), "check_invariants");

  BasicKVCache basic(cfg, Bytes{8ULL << 30});
  expect(basic.allocate("r", Tokens{100}, Tokens{28}), "basic allocate");
  try {
    basic.free("missing");
    expect(false, "free of an unknown id throws UnknownRequest");
  } catch (const UnknownRequest&) {
    expect(true, "free of an unknown id throws UnknownRequest");
  }
  return failures == 0 ? 0 : 1;
}
