// Tests of the kvcache_plan module: the value parsers, the presets, the
// command line, the report's numbers (against hand-computed values), the
// renderers and run()'s exit codes. The executable itself is exercised by the
// plan.cli.* tests (CMakeLists.txt).
#include <gtest/gtest.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

import kvcache;
import kvcache_plan;

using kvcache::Bytes;
using kvcache::ModelConfig;
using kvcache::Pages;
using kvcache::Tokens;
using namespace kvcache_plan;

namespace {

constexpr std::uint64_t GiB = std::uint64_t{1} << 30;

Options parse(std::initializer_list<std::string_view> args) {
  const std::vector<std::string_view> v(args);
  return parse_args(v);
}

struct RunResult {
  int code;
  std::string out;
  std::string err;
};

RunResult run_with(std::initializer_list<std::string_view> args,
                   std::uint64_t limit = kDefaultSimulateLimit) {
  const std::vector<std::string_view> v(args);
  std::ostringstream out;
  std::ostringstream err;
  const int code = run(v, out, err, limit);
  return {code, out.str(), err.str()};
}

// The value of an optional the test needs engaged. An empty one throws, and
// the test fails there rather than read it (a check that
// bugprone-unchecked-optional-access sees; it counts optional::value() as
// unchecked).
template <class T>
T engaged(const std::optional<T>& o) {
  if (!o) throw std::logic_error("expected a value, got std::nullopt");
  return *o;
}

// The message of the UsageError that parse() throws, or "" when it does not.
std::string usage_error(std::initializer_list<std::string_view> args) {
  try {
    static_cast<void>(parse(args));
  } catch (const UsageError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

// ---- Presets -------------------------------------------------------------

TEST(Presets, PublishedShapes) {
  const Preset* p = find_preset("Llama-3.1-8B");
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->layers, 32u);
  EXPECT_EQ(p->q_heads, 32u);
  EXPECT_EQ(p->kv_heads, 8u);
  EXPECT_EQ(p->head_dim, 128u);
  p = find_preset("Llama-3.1-70B");
  ASSERT_NE(p, nullptr);
  EXPECT_EQ((std::vector<std::uint32_t>{p->layers, p->q_heads, p->kv_heads, p->head_dim}),
            (std::vector<std::uint32_t>{80, 64, 8, 128}));
  p = find_preset("Mistral-7B-v0.3");
  ASSERT_NE(p, nullptr);
  EXPECT_EQ((std::vector<std::uint32_t>{p->layers, p->q_heads, p->kv_heads, p->head_dim}),
            (std::vector<std::uint32_t>{32, 32, 8, 128}));
  p = find_preset("Qwen2.5-7B");
  ASSERT_NE(p, nullptr);
  EXPECT_EQ((std::vector<std::uint32_t>{p->layers, p->q_heads, p->kv_heads, p->head_dim}),
            (std::vector<std::uint32_t>{28, 28, 4, 128}));
  p = find_preset("Llama-2-7B");
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->q_heads, p->kv_heads);  // the MHA baseline
}

TEST(Presets, EveryPresetIsAValidGqaShape) {
  EXPECT_GE(presets().size(), 6u);
  for (const Preset& p : presets()) {
    SCOPED_TRACE(std::string(p.name));
    EXPECT_TRUE((ModelConfig{p.layers, p.kv_heads, p.head_dim, 2}.valid()));
    EXPECT_EQ(p.q_heads % p.kv_heads, 0u);
    EXPECT_EQ(find_preset(p.name), &p);
  }
}

TEST(Presets, LookupIsCaseInsensitiveAndExact) {
  EXPECT_EQ(find_preset("llama-3.1-8b"), find_preset("Llama-3.1-8B"));
  EXPECT_EQ(find_preset("Llama-3.1"), nullptr);
  EXPECT_EQ(find_preset(""), nullptr);
}

TEST(Dtypes, Sizes) {
  EXPECT_EQ(engaged(find_dtype("bf16")).bytes, 2u);
  EXPECT_EQ(engaged(find_dtype("FP16")).bytes, 2u);
  EXPECT_EQ(engaged(find_dtype("fp32")).bytes, 4u);
  EXPECT_EQ(engaged(find_dtype("fp8")).bytes, 1u);
  EXPECT_EQ(engaged(find_dtype("int8")).bytes, 1u);
  EXPECT_FALSE(find_dtype("fp4").has_value());
  EXPECT_FALSE(dtypes().empty());
}

// ---- Value parsers -------------------------------------------------------

TEST(ParseSize, BinaryAndDecimalUnits) {
  EXPECT_EQ(parse_size("--budget", "24GiB"), Bytes{24 * GiB});
  EXPECT_EQ(parse_size("--budget", "24gib"), Bytes{24 * GiB});
  EXPECT_EQ(parse_size("--budget", "24 GiB"), Bytes{24 * GiB});
  EXPECT_EQ(parse_size("--budget", "512MiB"), Bytes{512u << 20});
  EXPECT_EQ(parse_size("--budget", "3KiB"), Bytes{3072u});
  EXPECT_EQ(parse_size("--budget", "2TiB"), Bytes{std::uint64_t{2} << 40});
  EXPECT_EQ(parse_size("--budget", "1000"), Bytes{1000u});
  EXPECT_EQ(parse_size("--budget", "1000B"), Bytes{1000u});
  EXPECT_EQ(parse_size("--budget", "80GB"), Bytes{80'000'000'000u});
  EXPECT_EQ(parse_size("--budget", "2KB"), Bytes{2000u});
  EXPECT_EQ(parse_size("--budget", "5MB"), Bytes{5'000'000u});
  EXPECT_EQ(parse_size("--budget", "1TB"), Bytes{1'000'000'000'000u});
  EXPECT_EQ(parse_size("--budget", "18446744073709551615"),
            Bytes{std::numeric_limits<std::uint64_t>::max()});
  EXPECT_EQ(parse_size("--budget", "16777215TiB"),
            Bytes{std::uint64_t{16777215} << 40});
}

TEST(ParseSize, Rejects) {
  const auto message = [](std::string_view text) {
    try {
      static_cast<void>(parse_size("--budget", text));
    } catch (const UsageError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(message("").find("empty value"), std::string::npos);
  EXPECT_NE(message("-1GiB").find("is negative"), std::string::npos);
  EXPECT_NE(message("1.5GiB").find("integers only"), std::string::npos);
  EXPECT_NE(message("24G").find("ambiguous"), std::string::npos);
  EXPECT_NE(message("24g").find("ambiguous"), std::string::npos);
  EXPECT_NE(message("24XB").find("unknown unit 'XB'"), std::string::npos);
  EXPECT_NE(message("GiB").find("is not a size"), std::string::npos);
  EXPECT_NE(message("+5GiB").find("is not a size"), std::string::npos);
  EXPECT_NE(message("16777216TiB").find("does not fit in 64 bits"), std::string::npos);
  EXPECT_NE(message("18446744073709551616").find("does not fit in 64 bits"), std::string::npos);
  EXPECT_EQ(message("24GiB"), "");
}

TEST(ParseTokens, PlainAndK) {
  EXPECT_EQ(parse_tokens("--context", "8192"), Tokens{8192u});
  EXPECT_EQ(parse_tokens("--context", "8k"), Tokens{8192u});
  EXPECT_EQ(parse_tokens("--context", "128K"), Tokens{131072u});
  EXPECT_EQ(parse_tokens("--context", "0"), Tokens{0u});  // parse_args rejects it
  EXPECT_THROW(static_cast<void>(parse_tokens("--context", "k")), UsageError);
  try {
    static_cast<void>(parse_tokens("--context", "1M"));
    ADD_FAILURE() << "1M accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("unknown suffix in '1M'"), std::string::npos);
  }
  EXPECT_THROW(static_cast<void>(parse_tokens("--context", "-8")), UsageError);
  EXPECT_THROW(static_cast<void>(parse_tokens("--context", "8.5k")), UsageError);
  EXPECT_THROW(static_cast<void>(parse_tokens("--context", "18014398509481984k")), UsageError);
}

TEST(ParseCount, Bounds) {
  EXPECT_EQ(parse_u32("--layers", "4294967295"), 4294967295u);
  EXPECT_THROW(static_cast<void>(parse_u32("--layers", "4294967296")), UsageError);
  EXPECT_THROW(static_cast<void>(parse_u32("--layers", "12abc")), UsageError);
  EXPECT_THROW(static_cast<void>(parse_u32("--layers", " 12")), UsageError);
  EXPECT_EQ(parse_count("--x", "18446744073709551615"),
            std::numeric_limits<std::uint64_t>::max());
}

// ---- Command line --------------------------------------------------------

TEST(ParseArgs, Preset) {
  const Options o = parse({"--model", "llama-3.1-70b", "--budget", "80GiB", "--context", "32k"});
  EXPECT_EQ(o.action, Action::report);
  EXPECT_EQ(o.model_name, "Llama-3.1-70B");
  EXPECT_EQ(o.config, (ModelConfig{80, 8, 128, 2}));
  EXPECT_EQ(o.q_heads, 64u);
  EXPECT_EQ(o.dtype_name, "bf16");
  EXPECT_EQ(o.budget, Bytes{80 * GiB});
  EXPECT_EQ(o.context, Tokens{32768u});
  EXPECT_FALSE(o.page_size.has_value());
  EXPECT_FALSE(o.json);
}

TEST(ParseArgs, ExplicitDimsAndEqualsSyntax) {
  const Options o = parse({"--layers=40", "--kv-heads", "10", "--head-dim=64", "--q-heads",
                           "40", "--dtype-bytes", "4", "--budget=1GB", "--context=100",
                           "--page-size", "32", "--json"});
  EXPECT_EQ(o.model_name, "custom");
  EXPECT_EQ(o.config, (ModelConfig{40, 10, 64, 4}));
  EXPECT_EQ(o.q_heads, 40u);
  EXPECT_EQ(o.dtype_name, "4-byte");
  EXPECT_EQ(o.budget, Bytes{1'000'000'000u});
  EXPECT_EQ(o.page_size, Tokens{32u});
  EXPECT_TRUE(o.json);
}

TEST(ParseArgs, DtypeOverridesPresetElementSize) {
  const Options o =
      parse({"--model", "Qwen2.5-7B", "--dtype", "fp8", "--budget", "1GiB", "--context", "1"});
  EXPECT_EQ(o.config, (ModelConfig{28, 4, 128, 1}));
  EXPECT_EQ(o.dtype_name, "fp8");
}

TEST(ParseArgs, HelpAndListWinOverMissingArguments) {
  EXPECT_EQ(parse({"--help"}).action, Action::help);
  EXPECT_EQ(parse({"-h", "--model", "x"}).action, Action::help);
  EXPECT_EQ(parse({"--list-models"}).action, Action::list_models);
}

TEST(ParseArgs, UsageErrors) {
  EXPECT_NE(usage_error({}).find("no model given"), std::string::npos);
  EXPECT_NE(usage_error({"--model", "Llama-3.1-8B", "--frobnicate"}).find("unknown option"),
            std::string::npos);
  EXPECT_NE(usage_error({"--model"}).find("missing value for --model"), std::string::npos);
  EXPECT_NE(usage_error({"--model=", "x"}).find("missing value for --model"), std::string::npos);
  EXPECT_NE(usage_error({"--model", "--budget", "1GiB"}).find("missing value for --model"),
            std::string::npos);
  EXPECT_NE(usage_error({"--json=yes"}).find("--json takes no value"), std::string::npos);
  EXPECT_NE(usage_error({"extra"}).find("unexpected argument 'extra'"), std::string::npos);
  EXPECT_NE(usage_error({"--model", "a", "--model", "b"}).find("--model given twice"),
            std::string::npos);
  const std::string unknown = usage_error({"--model", "GPT-4", "--budget", "1GiB"});
  EXPECT_NE(unknown.find("unknown model 'GPT-4'"), std::string::npos);
  for (const Preset& p : presets()) EXPECT_NE(unknown.find(p.name), std::string::npos);
  EXPECT_NE(usage_error({"--layers", "32", "--kv-heads", "8"}).find("missing --head-dim"),
            std::string::npos);
  EXPECT_NE(usage_error({"--model", "Llama-3.1-8B", "--q-heads", "64"})
                .find("--q-heads cannot be combined with --model"),
            std::string::npos);
  EXPECT_NE(usage_error({"--model", "Llama-3.1-8B", "--dtype", "bf16", "--dtype-bytes", "2"})
                .find("not both"),
            std::string::npos);
  EXPECT_NE(usage_error({"--model", "Llama-3.1-8B", "--dtype", "int4"}).find("unknown --dtype"),
            std::string::npos);
  EXPECT_NE(usage_error({"--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--q-heads",
                         "0"})
                .find("--q-heads must be at least 1"),
            std::string::npos);
  EXPECT_NE(usage_error({"--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--q-heads",
                         "4"})
                .find("not a multiple of --kv-heads 8"),
            std::string::npos);
  EXPECT_NE(usage_error({"--model", "Llama-3.1-8B", "--context", "1"}).find("missing --budget"),
            std::string::npos);
  EXPECT_NE(usage_error({"--model", "Llama-3.1-8B", "--budget", "1GiB"}).find("missing --context"),
            std::string::npos);
  EXPECT_NE(usage_error({"--model", "Llama-3.1-8B", "--budget", "0", "--context", "1"})
                .find("--budget must be more than 0 B"),
            std::string::npos);
  EXPECT_NE(usage_error({"--model", "Llama-3.1-8B", "--budget", "1GiB", "--context", "0k"})
                .find("--context must be at least 1 token"),
            std::string::npos);
  EXPECT_NE(usage_error({"--model", "Llama-3.1-8B", "--budget", "1GiB", "--context", "1",
                         "--page-size", "0"})
                .find("--page-size must be at least 1 token"),
            std::string::npos);
}

TEST(ParseArgs, InvalidConfigIsTheLibrarysInvalidArgument) {
  try {
    static_cast<void>(parse({"--layers", "32", "--kv-heads", "0", "--head-dim", "128",
                             "--budget", "1GiB", "--context", "1"}));
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("num_kv_heads"), std::string::npos);
  }
  EXPECT_THROW(static_cast<void>(parse({"--layers", "4294967295", "--kv-heads", "4294967295",
                                        "--head-dim", "4294967295", "--budget", "1GiB",
                                        "--context", "1"})),
               std::invalid_argument);
}

// ---- The report ----------------------------------------------------------

TEST(Report, Llama31_8B_24GiB_8k) {
  const Report r =
      make_report(parse({"--model", "Llama-3.1-8B", "--budget", "24GiB", "--context", "8192"}));
  EXPECT_EQ(r.kv_bytes_per_token_per_layer, Bytes{8u * 128 * 2});
  EXPECT_EQ(r.bytes_per_token_per_layer, Bytes{2u * 8 * 128 * 2});
  EXPECT_EQ(r.bytes_per_token, Bytes{131072u});  // 32 * 2 * 8 * 128 * 2
  EXPECT_EQ(r.tokens_fit, Tokens{196608u});      // 24 GiB / 128 KiB
  EXPECT_EQ(r.request_bytes, Bytes{GiB});
  EXPECT_EQ(r.requests_fit, 24u);
  EXPECT_EQ(r.reserved, Bytes{24 * GiB});
  EXPECT_EQ(r.leftover, Bytes{0u});
  EXPECT_EQ(r.simulation.status, SimStatus::verified);
  EXPECT_EQ(r.simulation.allocated, 24u);
  ASSERT_TRUE(r.gqa.has_value());
  const GqaComparison gqa = engaged(r.gqa);
  EXPECT_EQ(gqa.group, 4u);
  EXPECT_EQ(gqa.mha_bytes_per_token, Bytes{524288u});
  EXPECT_EQ(gqa.mha_tokens_fit, Tokens{49152u});
  EXPECT_EQ(gqa.mha_requests_fit, 6u);
  EXPECT_DOUBLE_EQ(gqa.ratio, 4.0);
  EXPECT_FALSE(r.paged.has_value());
}

TEST(Report, LeftoverAndRoundingDown) {
  // Qwen2.5-7B: 28 * 2 * 4 * 128 * 2 = 57,344 B per token.
  const Report r =
      make_report(parse({"--model", "Qwen2.5-7B", "--budget", "10GB", "--context", "32k"}));
  EXPECT_EQ(r.bytes_per_token, Bytes{57344u});
  EXPECT_EQ(r.tokens_fit, Tokens{10'000'000'000u / 57344});
  EXPECT_EQ(r.requests_fit, (10'000'000'000u / 57344) / 32768);
  EXPECT_EQ(r.request_bytes, Bytes{std::uint64_t{57344} * 32768});
  EXPECT_EQ(r.leftover.count(), 10'000'000'000u - r.requests_fit * 57344u * 32768u);
  EXPECT_EQ(r.simulation.status, SimStatus::verified);
  EXPECT_EQ(r.simulation.allocated, r.requests_fit);
  ASSERT_TRUE(r.gqa.has_value());
  EXPECT_DOUBLE_EQ(engaged(r.gqa).ratio, 7.0);  // 28 query heads over 4 KV heads
}

TEST(Report, ContextLargerThanBudget) {
  const Report r =
      make_report(parse({"--model", "Llama-3.1-70B", "--budget", "1GiB", "--context", "128k"}));
  EXPECT_EQ(r.requests_fit, 0u);
  EXPECT_EQ(r.leftover, Bytes{GiB});
  EXPECT_EQ(r.simulation.status, SimStatus::verified);
  EXPECT_EQ(r.simulation.allocated, 0u);
  EXPECT_NE(render_text(r).find("the context does not fit"), std::string::npos);
}

TEST(Report, SimulationCapFallsBackToArithmetic) {
  const Options o = parse({"--model", "Llama-3.1-8B", "--budget", "24GiB", "--context", "8192"});
  const Report capped = make_report(o, 23);
  EXPECT_EQ(capped.requests_fit, 24u);
  EXPECT_EQ(capped.simulation.status, SimStatus::skipped_cap);
  EXPECT_EQ(capped.simulation.limit, 23u);
  EXPECT_NE(render_text(capped).find("not checked with BasicKVCache"), std::string::npos);
  EXPECT_NE(render_json(capped).find("\"status\": \"skipped_cap\""), std::string::npos);
  EXPECT_EQ(make_report(o, 24).simulation.status, SimStatus::verified);
}

TEST(Report, NoQueryHeadsMeansUnknownSaving) {
  const Report r = make_report(parse({"--layers", "32", "--kv-heads", "8", "--head-dim", "128",
                                      "--budget", "1GiB", "--context", "1024"}));
  EXPECT_FALSE(r.gqa.has_value());
  EXPECT_NE(render_text(r).find("unknown: give --q-heads"), std::string::npos);
  EXPECT_NE(render_json(r).find("\"gqa\": null"), std::string::npos);
}

TEST(Report, MhaModelHasNoSaving) {
  const Report r =
      make_report(parse({"--model", "Llama-2-7B", "--budget", "24GiB", "--context", "4096"}));
  ASSERT_TRUE(r.gqa.has_value());
  const GqaComparison gqa = engaged(r.gqa);
  EXPECT_EQ(gqa.group, 1u);
  EXPECT_EQ(gqa.mha_bytes_per_token, r.bytes_per_token);
  EXPECT_EQ(r.bytes_per_token, Bytes{524288u});
  EXPECT_EQ(r.requests_fit, 12u);  // 24 GiB / (4096 * 512 KiB)
  EXPECT_NE(render_text(r).find("none: Llama-2-7B"), std::string::npos);
}

TEST(Report, MhaComparisonOverflowNamesTheComparison) {
  // One KV head keeps the GQA sizes in 64 bits; 2^32 - 1 of them (the MHA
  // comparison) overflow, and the message says it was the comparison.
  try {
    static_cast<void>(make_report(parse({"--layers", "4294967295", "--kv-heads", "1",
                                         "--head-dim", "1", "--dtype-bytes", "1", "--q-heads",
                                         "4294967295", "--budget", "1GiB", "--context", "1"})));
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("multi-head comparison"), std::string::npos);
  }
}

TEST(Report, PagedPool) {
  const Report r = make_report(parse({"--model", "Llama-3.1-8B", "--budget", "24GiB",
                                      "--context", "8000", "--page-size", "16"}));
  ASSERT_TRUE(r.paged.has_value());
  const PagedPlan p = engaged(r.paged);
  EXPECT_EQ(p.bytes_per_page, Bytes{65536u});  // 16 * 2 * 8 * 128 * 2
  EXPECT_EQ(p.bytes_per_page, (ModelConfig{32, 8, 128, 2}.bytes_per_page(Tokens{16u})));
  EXPECT_EQ(p.pool_pages, Pages{393216u});
  EXPECT_EQ(p.pages_per_layer, Pages{12288u});
  EXPECT_EQ(p.tokens_per_layer, Tokens{196608u});
  EXPECT_EQ(p.request_pages_per_layer, Pages{500u});
  EXPECT_EQ(p.request_pages, Pages{16000u});
  EXPECT_EQ(p.requests_fit, 24u);  // 393,216 / 16,000
  EXPECT_EQ(p.last_page_slack, Tokens{0u});
  EXPECT_FALSE(p.exceeds_page_ids);

  const Report odd = make_report(parse({"--model", "Llama-3.1-8B", "--budget", "24GiB",
                                        "--context", "8001", "--page-size", "16"}));
  const PagedPlan odd_plan = engaged(odd.paged);
  EXPECT_EQ(odd_plan.request_pages_per_layer, Pages{501u});
  EXPECT_EQ(odd_plan.last_page_slack, Tokens{15u});
}

TEST(Report, PageIdLimit) {
  const Report r = make_report(parse({"--layers", "1", "--kv-heads", "1", "--head-dim", "1",
                                      "--dtype-bytes", "1", "--budget", "16GiB", "--context",
                                      "1k", "--page-size", "1"}),
                               0);
  ASSERT_TRUE(r.paged.has_value());
  const PagedPlan plan = engaged(r.paged);
  EXPECT_EQ(plan.pool_pages, Pages{8 * GiB});
  EXPECT_TRUE(plan.exceeds_page_ids);
}

TEST(Report, PageSizeOverflowIsAUsageError) {
  EXPECT_THROW(static_cast<void>(make_report(
                   parse({"--model", "Llama-3.1-8B", "--budget", "1GiB", "--context", "1k",
                          "--page-size", "18014398509481984"}))),
               UsageError);
}

// ---- Rendering -----------------------------------------------------------

TEST(Format, GroupDigits) {
  EXPECT_EQ(group_digits(0), "0");
  EXPECT_EQ(group_digits(999), "999");
  EXPECT_EQ(group_digits(1000), "1,000");
  EXPECT_EQ(group_digits(131072), "131,072");
  EXPECT_EQ(group_digits(1234567), "1,234,567");
  EXPECT_EQ(group_digits(std::numeric_limits<std::uint64_t>::max()),
            "18,446,744,073,709,551,615");
}

TEST(Format, Bytes) {
  EXPECT_EQ(format_bytes(Bytes{0u}), "0 B");
  EXPECT_EQ(format_bytes(Bytes{1023u}), "1,023 B");
  EXPECT_EQ(format_bytes(Bytes{1024u}), "1.0 KiB (1,024 B)");
  EXPECT_EQ(format_bytes(Bytes{131072u}), "128.0 KiB (131,072 B)");
  EXPECT_EQ(format_bytes(Bytes{1536u}), "1.5 KiB (1,536 B)");
  EXPECT_EQ(format_bytes(Bytes{GiB - 1}), "1023.9 MiB (1,073,741,823 B)");  // truncated
  EXPECT_EQ(format_bytes(Bytes{24 * GiB}), "24.0 GiB (25,769,803,776 B)");
  EXPECT_EQ(format_bytes(Bytes{std::numeric_limits<std::uint64_t>::max()}),
            "15.9 EiB (18,446,744,073,709,551,615 B)");
}

TEST(Render, TextReport) {
  const Report r = make_report(parse({"--model", "Llama-3.1-8B", "--budget", "24GiB",
                                      "--context", "8k", "--page-size", "16"}));
  const std::string text = render_text(r);
  for (const char* needle :
       {"kvcache-plan: Llama-3.1-8B in bf16, 24.0 GiB (25,769,803,776 B) budget",
        "32 query, 8 KV (grouped-query attention: 4 query heads per KV head)",
        "all 32 layers", "128.0 KiB (131,072 B)", "tokens that fit", "196,608",
        "24 (contiguous reservation", "24 requests allocated, request 25 refused",
        "4.0x smaller per token", "196,608 vs 49,152 with MHA (+147,456)",
        "24 vs 6 with MHA (+18)", "pages in the budget", "393,216"}) {
    EXPECT_NE(text.find(needle), std::string::npos) << needle << "\n" << text;
  }
}

TEST(Render, Json) {
  const Report r = make_report(parse({"--model", "Llama-3.1-8B", "--budget", "24GiB",
                                      "--context", "8192", "--page-size", "16", "--json"}));
  const std::string json = render_json(r);
  for (const char* needle :
       {"\"name\": \"Llama-3.1-8B\"", "\"q_heads\": 32", "\"bytes_per_token\": 131072",
        "\"tokens_fit\": 196608", "\"requests_fit\": 24,", "\"status\": \"verified\"",
        "\"allocated\": 24", "\"mha_requests_fit\": 6", "\"ratio\": 4.000",
        "\"pool_pages\": 393216"}) {
    EXPECT_NE(json.find(needle), std::string::npos) << needle << "\n" << json;
  }
  EXPECT_EQ(json.front(), '{');
  EXPECT_EQ(json.substr(json.size() - 2), "}\n");
}

TEST(Render, ModelsListAndHelp) {
  const std::string text = models_text(false);
  const std::string json = models_text(true);
  for (const Preset& p : presets()) {
    EXPECT_NE(text.find(p.name), std::string::npos);
    EXPECT_NE(json.find("\"name\": \"" + std::string(p.name) + "\""), std::string::npos);
  }
  EXPECT_NE(json.find("\"bf16_bytes_per_token\": 131072"), std::string::npos);
  EXPECT_NE(help_text().find("--budget"), std::string::npos);
  EXPECT_NE(help_text().find("--q-heads"), std::string::npos);
}

// ---- run(): exit codes and the one error line ----------------------------

TEST(Run, Success) {
  const RunResult r = run_with({"--model", "Llama-3.1-8B", "--budget", "24GiB", "--context", "8192"});
  EXPECT_EQ(r.code, kExitOk);
  EXPECT_EQ(r.err, "");
  EXPECT_NE(r.out.find("requests that fit"), std::string::npos);
  EXPECT_EQ(run_with({"--help"}).code, kExitOk);
  EXPECT_EQ(run_with({"--list-models", "--json"}).code, kExitOk);
}

TEST(Run, ErrorsAreOneLineAndExitTwo) {
  for (const auto& args : std::vector<std::vector<std::string_view>>{
           {},
           {"--nope"},
           {"--model"},
           {"--model", "gpt-5", "--budget", "1GiB", "--context", "1"},
           {"--model", "Llama-3.1-8B", "--budget", "lots", "--context", "1"},
           {"--model", "Llama-3.1-8B", "--budget", "-1GiB", "--context", "1"},
           {"--model", "Llama-3.1-8B", "--budget", "1GiB", "--context", "0"},
           {"--model", "Llama-3.1-8B", "--budget", "99999999999999999999", "--context", "1"},
           {"--layers", "0", "--kv-heads", "8", "--head-dim", "128", "--budget", "1GiB",
            "--context", "1"},
           {"--layers", "4294967295", "--kv-heads", "4294967295", "--head-dim", "4294967295",
            "--budget", "1GiB", "--context", "1"},
           {"--model", "Llama-3.1-8B", "--budget", "1GiB", "--context", "17592186044416k"},
       }) {
    std::ostringstream out;
    std::ostringstream err;
    const int code = run(args, out, err);
    std::string joined;
    for (const std::string_view a : args) joined += std::string(a) + " ";
    SCOPED_TRACE(joined);
    EXPECT_EQ(code, kExitUsage);
    EXPECT_EQ(out.str(), "");
    const std::string e = err.str();
    EXPECT_EQ(e.rfind("kvcache-plan: error: ", 0), 0u) << e;
    EXPECT_EQ(e.find('\n'), e.size() - 1) << e;
  }
}

TEST(Run, LibraryMessageIsPrinted) {
  const RunResult r = run_with({"--layers", "32", "--kv-heads", "8", "--head-dim", "0",
                                "--budget", "1GiB", "--context", "1"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_NE(r.err.find("invalid model configuration: kvcache: ModelConfig: head_dim is 0"),
            std::string::npos)
      << r.err;
}
