// The workload generators and drivers of benchmarks/workloads.hpp against
// every reference fact of WORKLOADS.md, and the library backends of the
// benchmarks (runners.hpp) against the reference models.
//
// The facts are derived twice: from a reference model that uses no kvcache
// type (workloads.hpp), at the standard sizes, and from the real backends
// (PagePool, PagedKVCache none / host), whose own count of pages in use is
// compared with the workload's after every step. The backends run at the
// standard sizes too, except in builds with audited contracts (the `test`
// preset), where every library call checks O(pages) invariants: there they
// run the same generator and drivers at the `smoke` sizes and must agree with
// the model at those sizes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "kvcache/build_config.hpp"
#include "runners.hpp"
#include "workloads.hpp"

namespace kvcache::bench {
namespace {

constexpr bool audited = KVCACHE_CONTRACT_LEVEL >= 2;

std::uint64_t sum(std::span<const std::uint32_t> v) {
  return std::accumulate(v.begin(), v.end(), std::uint64_t{0});
}

// Test names: Levels/W1Backend.AgreesWithTheModelAtEveryStep/paged_none, ...
std::string name_of(const testing::TestParamInfo<Variant>& info) {
  const Variant& v = info.param;
  std::string n = v.level == Level::pool         ? "pool"
                  : v.level == Level::paged_none ? "paged_none"
                                                 : "paged_host";
  if (v.api == Api::all_layers) n += "_all_layers";
  if (v.api == Api::token_ids) n += "_token_ids";
  if (v.ids == Ids::long_ids) n += "_long_ids";
  return n;
}

const Variant pool{Level::pool};
const Variant paged_none{Level::paged_none};
const Variant paged_host{Level::paged_host};
// Caching on: allocate_paged with token ids (and append_token_ids in W2).
const Variant content_none{Level::paged_none, Api::token_ids};
const Variant content_host{Level::paged_host, Api::token_ids};

// ---- the generator --------------------------------------------------------------

TEST(SplitMix64, TestVectorsOfSeed42) {
  SplitMix64 rng;
  EXPECT_EQ(rng.next(), 0xbdd732262feb6e95ULL);
  EXPECT_EQ(rng.next(), 0x28efe333b266f103ULL);
  EXPECT_EQ(rng.next(), 0x47526757130f9f52ULL);
  EXPECT_EQ(SplitMix64{}.next(), 13679457532755275413ULL);
  static_assert(SplitMix64{}.next() == 0xbdd732262feb6e95ULL);  // usable at compile time
}

// ---- W1 -----------------------------------------------------------------------

TEST(W1, Parameters) {
  EXPECT_EQ(w1::standard.ops, 200000U);
  EXPECT_EQ(w1::standard.max_blocks, 64U);
  EXPECT_EQ(w1::standard.pool, 65536U);
  EXPECT_EQ(w1::standard.high_water, 58982U);  // floor(0.9 * 65536)
}

TEST(W1, Sizes) {
  const auto sizes = w1::make_sizes(w1::standard);
  ASSERT_EQ(sizes.size(), 200000U);
  EXPECT_EQ(sum(sizes), 6509162U);
  const std::vector<std::uint32_t> first{22, 4, 19, 21, 51, 7, 30, 37, 22, 47};
  EXPECT_TRUE(std::equal(first.begin(), first.end(), sizes.begin()));
  EXPECT_EQ(*std::min_element(sizes.begin(), sizes.end()), 1U);
  EXPECT_EQ(*std::max_element(sizes.begin(), sizes.end()), 64U);
}

TEST(W1, ReferenceFactsOfTheModel) {
  const w1::Facts f = w1::model_facts(w1::standard);
  EXPECT_EQ(f.blocks, 6509162U);
  EXPECT_EQ(f.freed_in_loop, 198209U);
  EXPECT_EQ(f.left_for_drain, 1791U);
  EXPECT_EQ(f.blocks_left_for_drain, 58964U);
  EXPECT_EQ(f.max_used, 58982U);
  EXPECT_EQ(f.max_live, 1890U);
  EXPECT_LE(f.max_live, w1::ring);
  EXPECT_EQ(f.backend_in_use_mismatches, 0U);
  EXPECT_EQ(f.backend_in_use_at_end, 0U);
}

void expect_same(const w1::Facts& got, const w1::Facts& model) {
  EXPECT_EQ(got.blocks, model.blocks);
  EXPECT_EQ(got.freed_in_loop, model.freed_in_loop);
  EXPECT_EQ(got.left_for_drain, model.left_for_drain);
  EXPECT_EQ(got.blocks_left_for_drain, model.blocks_left_for_drain);
  EXPECT_EQ(got.max_used, model.max_used);
  EXPECT_EQ(got.max_live, model.max_live);
  EXPECT_EQ(got.backend_in_use_mismatches, 0U) << "the backend's pages in use left the model's";
  EXPECT_EQ(got.backend_in_use_at_end, 0U);
}

class W1Backend : public testing::TestWithParam<Variant> {};

TEST_P(W1Backend, AgreesWithTheModelAtEveryStep) {
  const w1::Params p = audited ? w1::smoke : w1::standard;
  expect_same(observe_w1(GetParam(), p), w1::model_facts(p));
}

TEST_P(W1Backend, TimedRunCoversEveryBlock) {
  const w1::Params p = w1::smoke;
  const auto sizes = w1::make_sizes(p);
  const w1::Content content = w1::make_content(p);  // used by Api::token_ids only
  const W1Timing t = time_w1(GetParam(), p, sizes, &content);
  EXPECT_EQ(t.blocks, sum(sizes));
  EXPECT_GT(t.ns, 0U);
}

INSTANTIATE_TEST_SUITE_P(Levels, W1Backend,
                         testing::Values(pool, paged_none, paged_host, content_none, content_host),
                         name_of);

// Caching on: the token ids continue the sizes' generator (the benchmark's
// choice; WORKLOADS.md gives W1 none).
TEST(W1, ContentContinuesTheGenerator) {
  const w1::Params p = w1::smoke;
  const w1::Content c = w1::make_content(p);
  EXPECT_EQ(c.sizes, w1::make_sizes(p));
  ASSERT_EQ(c.tokens.size(), block_size * sum(c.sizes));
  SplitMix64 rng;
  for (std::size_t i = 0; i < p.ops; ++i) static_cast<void>(rng.next());
  EXPECT_EQ(c.tokens_of(0).size(), block_size * c.sizes[0]);
  EXPECT_EQ(c.tokens_of(0)[0], rng.token());
  EXPECT_EQ(c.tokens_of(0)[1], rng.token());
  EXPECT_EQ(c.tokens_of(p.ops - 1).data() + c.tokens_of(p.ops - 1).size(),
            c.tokens.data() + c.tokens.size());
}

// Random content shares nothing: every full page is keyed and stored once,
// and once the pool is full of cached pages every page taken evicts one.
TEST(W1, CachingOnStoresEveryPageAndEvictsTheOverflow) {
  const w1::Params p = audited ? w1::smoke : w1::standard;
  const w1::Content c = w1::make_content(p);
  const W1Timing t = time_w1(content_none, p, c.sizes, &c);
  const std::uint64_t blocks = sum(c.sizes);
  EXPECT_EQ(t.content.prompt_tokens, block_size * blocks);
  EXPECT_EQ(t.content.hit_tokens, 0U);
  EXPECT_EQ(t.content.blocks_duplicate, 0U);
  EXPECT_EQ(t.content.blocks_stored, blocks);
  EXPECT_EQ(t.content.cached_pages, p.pool);  // after the drain every page is a cached block
  EXPECT_EQ(t.content.blocks_evicted, blocks - p.pool);
  EXPECT_GT(t.hash_ns, 0U);
  if (!audited) EXPECT_EQ(t.content.blocks_evicted, 6509162U - 65536U);
}

// ---- W2 -----------------------------------------------------------------------

TEST(W2, Tokens) {
  const w2::Input in = w2::make_input(w2::standard);
  ASSERT_EQ(in.prompt.size(), 256U * 512U);
  ASSERT_EQ(in.decode.size(), 1024U * 256U);
  EXPECT_EQ(sum(in.prompt), 2096659488U);
  EXPECT_EQ(sum(in.decode), 4184765213U);
  const std::vector<std::uint32_t> prompt0{11413, 12291, 11858, 15764, 11250};
  const std::vector<std::uint32_t> decode0{6995, 30635, 789, 6833, 17868};
  EXPECT_TRUE(std::equal(prompt0.begin(), prompt0.end(), in.prompt_of(0).begin()));
  for (std::size_t r = 0; r < decode0.size(); ++r) EXPECT_EQ(in.decode_at(0, r), decode0[r]);
  EXPECT_LT(*std::max_element(in.decode.begin(), in.decode.end()), 32000U);
}

TEST(W2, ReferenceFactsOfTheModel) {
  const w2::Input in = w2::make_input(w2::standard);
  w2::Model m(in.params);
  const w2::Facts f = w2::observe(in, m);
  EXPECT_EQ(f.min_tokens, 1536U);
  EXPECT_EQ(f.max_tokens, 1536U);
  EXPECT_EQ(f.min_blocks, 96U);
  EXPECT_EQ(f.max_blocks, 96U);
  EXPECT_EQ(f.blocks_after_prefill, 256U * 32U);
  EXPECT_EQ(f.blocks_after_decode - f.blocks_after_prefill, 16384U);  // 64 per request
  EXPECT_EQ(f.max_in_use, 24576U);
  EXPECT_EQ(f.sum_blocks, f.blocks_after_decode);  // nothing shared
  EXPECT_EQ(f.in_use_at_end, 0U);
}

void expect_same(const w2::Facts& got, const w2::Facts& model) {
  EXPECT_EQ(got.min_tokens, model.min_tokens);
  EXPECT_EQ(got.max_tokens, model.max_tokens);
  EXPECT_EQ(got.min_blocks, model.min_blocks);
  EXPECT_EQ(got.max_blocks, model.max_blocks);
  EXPECT_EQ(got.blocks_after_prefill, model.blocks_after_prefill);
  EXPECT_EQ(got.blocks_after_decode, model.blocks_after_decode);
  EXPECT_EQ(got.max_in_use, model.max_in_use);
  EXPECT_EQ(got.sum_blocks, got.blocks_after_decode) << "a block is shared";
  EXPECT_EQ(got.in_use_at_end, 0U);
}

class W2Backend : public testing::TestWithParam<Variant> {};

TEST_P(W2Backend, AgreesWithTheModel) {
  const w2::Input in = w2::make_input(audited ? w2::smoke : w2::standard);
  w2::Model m(in.params);
  expect_same(observe_w2(GetParam(), in), w2::observe(in, m));
}

TEST_P(W2Backend, TimedRunCountsEveryToken) {
  const w2::Input in = w2::make_input(w2::smoke);
  const W2Timing t = time_w2(GetParam(), in);
  EXPECT_EQ(t.tokens, in.params.reqs * in.params.steps);
  EXPECT_GT(t.decode_ns, 0U);
}

INSTANTIATE_TEST_SUITE_P(Levels, W2Backend,
                         testing::Values(pool, paged_none, paged_host,
                                         Variant{Level::paged_none, Api::all_layers},
                                         Variant{Level::paged_none, Api::token_paged,
                                                 Ids::long_ids},
                                         content_none, content_host),
                         name_of);

// Caching on: the prompts' pages and every page the decode fills are keyed
// (random content: nothing shared, nothing evicted); after free-all they all
// stay cached.
TEST(W2, CachingOnKeysEveryFullPage) {
  const w2::Input in = w2::make_input(audited ? w2::smoke : w2::standard);
  const W2Timing t = time_w2(content_none, in);
  const std::uint64_t pages =
      in.params.reqs * blocks_for(in.params.prompt + in.params.steps);  // 256 * 96
  EXPECT_EQ(t.content.prompt_tokens, in.params.reqs * in.params.prompt);
  EXPECT_EQ(t.content.hit_tokens, 0U);
  EXPECT_EQ(t.content.blocks_stored, pages);
  EXPECT_EQ(t.content.blocks_duplicate, 0U);
  EXPECT_EQ(t.content.blocks_evicted, 0U);
  EXPECT_EQ(t.content.cached_pages, pages);
  EXPECT_GT(t.hash_ns, 0U);
  if (!audited) EXPECT_EQ(pages, 24576U);
}

// ---- W3 -----------------------------------------------------------------------

TEST(W3, Inputs) {
  const w3::Input in = w3::make_input(w3::standard);
  EXPECT_EQ(in.request_tokens(), 1124U);
  EXPECT_EQ(in.full_blocks(), 70U);
  EXPECT_EQ(in.request_blocks(), 71U);
  EXPECT_EQ(in.prefix_blocks(), 64U);
  EXPECT_EQ(w3::max_hit_blocks(in), 70U);
  const std::vector<std::uint32_t> sys0{11413, 12291, 11858, 15764, 11250};
  EXPECT_TRUE(std::equal(sys0.begin(), sys0.end(), in.sys.begin()));
  EXPECT_EQ(in.prompt_of[0], 3U);
  EXPECT_EQ(in.prompt_of[999], 1U);
  std::vector<std::uint32_t> uses(10, 0);
  std::vector<std::size_t> first_use;
  for (std::size_t q = 0; q < in.params.reqs; ++q) {
    if (uses[in.prompt_of[q]]++ == 0) first_use.push_back(q);
  }
  EXPECT_EQ(uses, (std::vector<std::uint32_t>{95, 104, 108, 97, 85, 98, 84, 122, 108, 99}));
  EXPECT_EQ(first_use, (std::vector<std::size_t>{0, 1, 2, 3, 4, 5, 7, 11, 12, 22}));
  // tokens(q) = sys[p[q]] ++ uniq[q]
  const auto t999 = in.tokens_of(999);
  EXPECT_TRUE(std::equal(t999.begin(), t999.begin() + 1024, in.sys.begin() + 1024));
  EXPECT_TRUE(std::equal(t999.begin() + 1024, t999.end(), in.uniq.begin() + (std::ptrdiff_t{999} * 100)));
}

TEST(W3, BlockHashIsChainedOverContent) {
  const w3::Input in = w3::make_input(w3::standard);
  std::vector<std::uint64_t> h;
  w3::hash_all(in, h);
  ASSERT_EQ(h.size(), 1000U * 70U);
  // Requests 0 and 999 share no prompt (p = 3 and 1); two requests with the
  // same prompt share the first 64 hashes exactly, and not the 65th.
  std::size_t a = 0, b = 0;
  for (std::size_t q = 1; q < 1000; ++q) {
    if (in.prompt_of[q] == in.prompt_of[0]) {
      b = q;
      break;
    }
  }
  ASSERT_NE(b, 0U);
  EXPECT_TRUE(std::equal(h.begin() + static_cast<std::ptrdiff_t>(a * 70),
                         h.begin() + static_cast<std::ptrdiff_t>(a * 70 + 64),
                         h.begin() + static_cast<std::ptrdiff_t>(b * 70)));
  EXPECT_NE(h[(a * 70) + 64], h[(b * 70) + 64]);
  EXPECT_NE(h[0], h[std::size_t{999} * 70]);
  // One token changed changes that block's hash and every later one.
  std::vector<std::uint32_t> tokens(in.tokens_of(0).begin(), in.tokens_of(0).end());
  tokens[40] ^= 1;  // block 2
  std::vector<std::uint64_t> g(70);
  w3::block_hashes(tokens, g);
  EXPECT_EQ(g[1], h[1]);
  for (std::size_t k = 2; k < 70; ++k) EXPECT_NE(g[k], h[k]) << k;
  // The parent matters.
  EXPECT_NE(w3::block_hash(1, tokens.data()), w3::block_hash(2, tokens.data()));
}

TEST(W3, ReferenceFactsOfTheModel) {
  const w3::Input in = w3::make_input(w3::standard);
  w3::Model m(in);
  const w3::Facts f = w3::observe(in, m);
  EXPECT_EQ(m.collisions(), 0U);
  EXPECT_EQ(m.distinct_hashes(), (10U * 64U) + (1000U * 6U));
  ASSERT_EQ(f.hits.size(), 1000U);
  std::vector<std::size_t> misses;
  for (std::size_t q = 0; q < f.hits.size(); ++q) {
    if (f.hits[q] == 0) {
      misses.push_back(q);
    } else {
      EXPECT_EQ(f.hits[q], 64U) << "request " << q;  // 1,024 tokens
    }
  }
  EXPECT_EQ(misses, (std::vector<std::size_t>{0, 1, 2, 3, 4, 5, 7, 11, 12, 22}));
  EXPECT_EQ(f.hit_blocks, 63360U);
  const std::uint64_t hit_tokens = f.hit_blocks * 16;
  EXPECT_EQ(hit_tokens, 1013760U);
  EXPECT_EQ(1000U * in.request_tokens(), 1124000U);
  EXPECT_NEAR(static_cast<double>(hit_tokens) / 1124000.0, 0.90192, 0.000005);
  // WORKLOADS.md's 0.905 is 63,360 / 70,000 = 0.905142... to three places.
  EXPECT_NEAR(static_cast<double>(f.hit_blocks) / 70000.0, 0.905, 0.0005);
  EXPECT_EQ(f.max_in_use, 7640U);  // 640 shared + 7,000 private
  EXPECT_EQ(f.in_use_at_end, 0U);
}

class W3Backend : public testing::TestWithParam<Variant> {};

TEST_P(W3Backend, AgreesWithTheModel) {
  const w3::Input in = w3::make_input(audited ? w3::smoke : w3::standard);
  w3::Model m(in);
  const w3::Facts model = w3::observe(in, m);
  const W3Observed got = observe_w3(GetParam(), in);
  EXPECT_EQ(got.facts.hits, model.hits);
  EXPECT_EQ(got.facts.hit_blocks, model.hit_blocks);
  EXPECT_EQ(got.facts.max_in_use, model.max_in_use);
  EXPECT_EQ(got.facts.in_use_at_end, 0U);
  EXPECT_EQ(got.counters.hit_tokens, model.hit_blocks * 16);
  EXPECT_EQ(got.counters.evicted, 0U) << "W3 never evicts";
  if (GetParam().level != Level::pool) {
    const auto misses = static_cast<std::uint64_t>(
        std::count(model.hits.begin(), model.hits.end(), 0U));
    EXPECT_EQ(got.counters.prefix_misses, misses);
    EXPECT_EQ(got.counters.prefix_hits, in.params.reqs - misses);
  }
  if (!audited) {
    EXPECT_EQ(got.counters.hit_tokens, 1013760U);
    EXPECT_EQ(got.facts.max_in_use, 7640U);
  }
}

TEST_P(W3Backend, TimedRunReportsTheHitRate) {
  const w3::Input in = w3::make_input(w3::smoke);
  w3::Model m(in);
  const w3::Facts model = w3::observe(in, m);
  const W3Timing t = time_w3(GetParam(), in);
  EXPECT_EQ(t.requests, in.params.reqs);
  EXPECT_EQ(t.hit_blocks, model.hit_blocks);
  EXPECT_EQ(t.hit_tokens, model.hit_blocks * 16);
  EXPECT_EQ(t.prompt_tokens, in.params.reqs * in.request_tokens());
  EXPECT_EQ(t.full_blocks, in.params.reqs * in.full_blocks());
}

INSTANTIATE_TEST_SUITE_P(Levels, W3Backend,
                         testing::Values(pool, paged_none, paged_host, content_none, content_host),
                         name_of);

// Caching on: the library finds the shared pages by content itself;
// cached_tokens(id) of every request gives WORKLOADS.md's facts.
TEST(W3, CachingOnCachedTokensGiveTheReferenceFacts) {
  const w3::Input in = w3::make_input(audited ? w3::smoke : w3::standard);
  const W3Observed o = observe_w3(content_none, in);
  ASSERT_EQ(o.cached_tokens.size(), in.params.reqs);
  std::vector<std::size_t> misses;
  std::uint64_t hit_tokens = 0;
  for (std::size_t q = 0; q < o.cached_tokens.size(); ++q) {
    hit_tokens += o.cached_tokens[q];
    if (o.cached_tokens[q] == 0) {
      misses.push_back(q);
    } else {
      EXPECT_EQ(o.cached_tokens[q], 1024U) << "request " << q;  // 64 blocks
    }
  }
  // The smoke size keeps the first 30 requests: the same ten misses.
  EXPECT_EQ(misses, (std::vector<std::size_t>{0, 1, 2, 3, 4, 5, 7, 11, 12, 22}));
  EXPECT_EQ(o.content.hit_tokens, hit_tokens);
  EXPECT_EQ(o.content.prompt_tokens, in.params.reqs * in.request_tokens());
  // Stored: all 70 full pages of each miss, the 6 unique ones of each hit.
  EXPECT_EQ(o.content.blocks_stored, (misses.size() * 70) + ((in.params.reqs - misses.size()) * 6));
  EXPECT_EQ(o.content.blocks_duplicate, 0U);
  EXPECT_EQ(o.content.blocks_evicted, 0U);
  if (!audited) {
    EXPECT_EQ(hit_tokens, 1013760U);
    EXPECT_EQ(o.content.prompt_tokens, 1124000U);
    EXPECT_NEAR(static_cast<double>(hit_tokens) / 1124000.0, 0.90192, 0.000005);
    EXPECT_EQ(o.content.blocks_stored, 6640U);
  }
}

TEST(Ids, ShortIdsFitTheSmallStringBufferLongOnesDoNot) {
  const auto s = make_ids(200000, Ids::short_ids);
  EXPECT_EQ(s[199999], "req-199999");
  EXPECT_EQ(std::set<std::string>(s.begin(), s.end()).size(), s.size());
  const auto l = make_ids(3, Ids::long_ids);
  EXPECT_EQ(l[0].size(), 39U);
  EXPECT_EQ(l[0].substr(0, 5), "cmpl-");
}

}  // namespace
}  // namespace kvcache::bench
