// An engine-style scheduler loop on PagedKVCache: admit requests first come
// first served while the cache allows, decode one token per running request
// per step, free finished requests, and preempt the newest running request
// when a decode step cannot get a page (it is re-queued and recomputed, as
// vLLM does). A request that can never fit is rejected, not queued forever.
#include <cstdint>
#include <deque>
#include <iostream>
#include <string>
#include <vector>

import kvcache;

namespace {
struct Request {
  std::string id;
  kvcache::Tokens prompt;
  std::uint64_t output = 0;     // tokens to generate
  std::uint64_t generated = 0;
};
}  // namespace

int main() {
  using namespace kvcache;
  // A small cache: 1 layer, 64 pages of 16 tokens.
  PagedKVCache cache({1, 8, 128, 2}, Bytes{64 * 65536}, Tokens{16}, Storage::none);
  std::deque<Request> waiting;
  for (int i = 0; i < 24; ++i) {
    waiting.push_back({"r" + std::to_string(i), Tokens{40 + (i * 37) % 200},
                       static_cast<std::uint64_t>(20 + (i * 53) % 300), 0});
  }
  waiting.push_back({"too-long", Tokens{2000}, 10, 0});  // 125 pages > 64: never fits
  std::vector<Request> running;
  int finished = 0, preempted = 0, rejected = 0;
  for (int step = 0; step < 100000 && (!waiting.empty() || !running.empty()); ++step) {
    // Admit, first come first served.
    while (!waiting.empty()) {
      Request& r = waiting.front();
      const Admission a = cache.admission(r.prompt);
      if (a == Admission::never) {
        ++rejected;
        waiting.pop_front();
        continue;
      }
      if (a == Admission::later || !cache.allocate_paged(r.id, r.prompt)) break;
      running.push_back(r);
      waiting.pop_front();
    }
    // Decode one token each; preempt the newest when out of pages.
    for (std::size_t i = 0; i < running.size();) {
      if (cache.append_token_all_layers(running[i].id)) {
        if (++running[i].generated == running[i].output) {
          cache.free(running[i].id);
          running.erase(running.begin() + static_cast<std::ptrdiff_t>(i));
          ++finished;
        } else {
          ++i;
        }
        continue;
      }
      Request victim = running.back();
      running.pop_back();
      cache.free(victim.id);
      victim.generated = 0;  // recompute from the prompt
      waiting.push_front(victim);
      ++preempted;
      // Retry the same request (unless it was the victim).
    }
  }
  std::cout << "finished " << finished << ", preempted " << preempted << ", rejected " << rejected
            << ", pages free " << cache.stats().free_pages.count() << " of "
            << cache.stats().total_pages.count() << "\n";
  return finished == 24 && rejected == 1 && cache.stats().free_pages == Pages{64} &&
                 cache.check_invariants()
             ? 0
             : 1;
}
