// kvcache_plan: the testable part of the kvcache-plan command-line program.
//
// kvcache-plan is a KV-cache calculator: given a model (a built-in preset or
// explicit dimensions), a memory budget and a context length, it reports the
// bytes per token, the tokens that fit, the requests that fit at that context
// with a contiguous reservation each, and what grouped-query attention saves
// against full multi-head attention. main.cpp only forwards argv to `run()`.
//
// The pipeline is three pure steps, each tested on its own
// (tools/plan/tests/):
//   parse_args(args)           -> Options   (throws UsageError on bad input)
//   make_report(options, cap)  -> Report    (every number, from the library)
//   render_text / render_json  -> std::string
// and `run()` strings them together, turning every error into one line on
// `err` ("kvcache-plan: error: ...") and an exit code.
//
// All accounting goes through kvcache: ModelConfig::bytes_per_token(),
// max_tokens(), bytes_per_page(), the checked Bytes/Tokens/Pages arithmetic,
// and a real BasicKVCache that allocates requests of `context` tokens until it
// refuses one, to check the arithmetic. Doubles appear only in the printed
// ratio and in human-readable sizes, never in a count.
//
// Exit codes: 0 success, 2 bad arguments or an invalid model configuration,
// 1 an internal error (a bug: the BasicKVCache check disagreeing with the
// arithmetic, or an unexpected exception).
//
// Thread safety: free functions over values; no shared state.
module;

#include <cstdint>
#include <optional>
#include <ostream>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>

export module kvcache_plan;

import kvcache;

export namespace kvcache_plan {

// A command-line mistake: the message is printed after "kvcache-plan: error: "
// and the program exits with kExitUsage.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr int kExitOk = 0;
inline constexpr int kExitInternal = 1;
inline constexpr int kExitUsage = 2;

// Requests the BasicKVCache check allocates at most. Each basic request is one
// anonymous mapping, and Linux allows 65,530 mappings per process by default
// (vm.max_map_count), so the check stays well below that; above the cap the
// report gives the arithmetic alone and says so.
inline constexpr std::uint64_t kDefaultSimulateLimit = 10'000;

// ---- Presets -------------------------------------------------------------

// A model's published attention shape, from its Hugging Face config.json:
// num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim
// (hidden_size / num_attention_heads where the config has no head_dim).
struct Preset {
  std::string_view name;
  std::uint32_t layers;
  std::uint32_t q_heads;
  std::uint32_t kv_heads;
  std::uint32_t head_dim;
};

[[nodiscard]] std::span<const Preset> presets() noexcept;
// Case-insensitive exact match on the name; nullptr when there is none.
[[nodiscard]] const Preset* find_preset(std::string_view name) noexcept;

// ---- Element types -------------------------------------------------------

struct Dtype {
  std::string_view name;
  std::uint32_t bytes;
};

// fp32, fp16, bf16, fp8 (and their aliases), int8; case-insensitive.
[[nodiscard]] std::span<const Dtype> dtypes() noexcept;
[[nodiscard]] std::optional<Dtype> find_dtype(std::string_view name) noexcept;

// ---- Value parsers (each throws UsageError naming `flag`) ----------------

// A whole decimal number: digits only, no sign, no fraction.
[[nodiscard]] std::uint64_t parse_count(std::string_view flag, std::string_view text);
// parse_count, at most UINT32_MAX.
[[nodiscard]] std::uint32_t parse_u32(std::string_view flag, std::string_view text);
// A byte size: an integer and an optional unit, case-insensitive:
// B (or none), KiB MiB GiB TiB (powers of 2), KB MB GB TB (powers of 10).
// A bare K/M/G/T is rejected as ambiguous; fractions and overflow are errors.
[[nodiscard]] kvcache::Bytes parse_size(std::string_view flag, std::string_view text);
// A token count: an integer with an optional k/K suffix meaning 1024 (8k = 8192).
[[nodiscard]] kvcache::Tokens parse_tokens(std::string_view flag, std::string_view text);

// ---- Command line --------------------------------------------------------

enum class Action { report, help, list_models };

struct Options {
  Action action = Action::report;
  std::string model_name;                  // the preset's name, or "custom"
  kvcache::ModelConfig config;             // validated by parse_args
  std::optional<std::uint32_t> q_heads;    // for the GQA comparison
  std::string dtype_name;                  // "bf16", or "4-byte" for --dtype-bytes 4
  kvcache::Bytes budget;
  kvcache::Tokens context;
  std::optional<kvcache::Tokens> page_size;
  bool json = false;
};

// Parses the arguments after the program name. Throws UsageError for a
// command-line mistake and std::invalid_argument (the library's, naming the
// field) for a model configuration kvcache rejects.
[[nodiscard]] Options parse_args(std::span<const std::string_view> args);

// ---- The report ----------------------------------------------------------

// How the BasicKVCache check went.
enum class SimStatus {
  verified,         // allocated exactly `requests_fit` requests, then was refused
  skipped_cap,      // more requests than the cap: arithmetic only
  skipped_no_space  // the host could not map the address space: arithmetic only
};

struct Simulation {
  SimStatus status = SimStatus::verified;
  std::uint64_t allocated = 0;  // requests BasicKVCache accepted (when verified)
  std::uint64_t limit = 0;      // the cap in force
};

// Grouped-query attention against full multi-head attention (one KV head per
// query head), at the same budget and context.
struct GqaComparison {
  std::uint32_t q_heads = 0;
  std::uint32_t group = 0;             // query heads per KV head
  kvcache::Bytes mha_bytes_per_token;
  kvcache::Tokens mha_tokens_fit;
  std::uint64_t mha_requests_fit = 0;
  double ratio = 0;                    // mha / gqa bytes per token (display only)
};

// The same budget as a page pool (what PagedKVCache would build).
struct PagedPlan {
  kvcache::Tokens page_size;
  kvcache::Bytes bytes_per_page;         // one page of ONE layer
  kvcache::Pages pool_pages;             // budget / bytes_per_page, shared by all layers
  kvcache::Pages pages_per_layer;        // pool_pages / layers
  kvcache::Tokens tokens_per_layer;      // pages_per_layer * page_size
  kvcache::Pages request_pages_per_layer;  // ceil(context / page_size)
  kvcache::Pages request_pages;          // that, times the layers
  std::uint64_t requests_fit = 0;        // pool_pages / request_pages
  kvcache::Tokens last_page_slack;       // unused slots of a request's last page, per layer
  bool exceeds_page_ids = false;         // more pages than a 32-bit PageId can name
};

struct Report {
  Options options;
  kvcache::Bytes kv_bytes_per_token_per_layer;  // K or V, one layer
  kvcache::Bytes bytes_per_token_per_layer;     // K and V, one layer
  kvcache::Bytes bytes_per_token;               // K and V, all layers
  kvcache::Tokens tokens_fit;                   // budget / bytes_per_token
  kvcache::Bytes request_bytes;                 // context * bytes_per_token
  std::uint64_t requests_fit = 0;               // tokens_fit / context
  kvcache::Bytes reserved;                      // requests_fit * request_bytes
  kvcache::Bytes leftover;                      // budget - reserved
  Simulation simulation;
  std::optional<GqaComparison> gqa;             // empty without a query-head count
  std::optional<PagedPlan> paged;               // empty without --page-size
};

// Computes every number of the report from `options` (a parse_args result
// with action == report). Throws UsageError when the context's reservation
// overflows 64 bits, std::invalid_argument when the multi-head comparison's
// configuration does, and std::logic_error if BasicKVCache disagrees with
// the arithmetic (a bug).
[[nodiscard]] Report make_report(const Options& options,
                                 std::uint64_t simulate_limit = kDefaultSimulateLimit);

[[nodiscard]] std::string render_text(const Report& report);
[[nodiscard]] std::string render_json(const Report& report);
[[nodiscard]] std::string help_text();
[[nodiscard]] std::string models_text(bool json);

// ---- Formatting helpers --------------------------------------------------

// 1234567 -> "1,234,567".
[[nodiscard]] std::string group_digits(std::uint64_t n);

// `s` as a JSON string literal: quotes, backslashes and control characters
// escaped. Shared with kvcache-sim's JSON writer.
[[nodiscard]] std::string json_string(std::string_view s);
// Bytes{131072} -> "128.0 KiB (131,072 B)"; below 1 KiB just "1,000 B".
// The one decimal is truncated, never rounded up (1 GiB - 1 B is "1023.9 MiB").
[[nodiscard]] std::string format_bytes(kvcache::Bytes b);

// The whole program: parses `args` (without the program name), writes the
// report, help or model list to `out`, or one error line to `err`, and
// returns the exit code. Never throws.
[[nodiscard]] int run(std::span<const std::string_view> args, std::ostream& out,
                      std::ostream& err, std::uint64_t simulate_limit = kDefaultSimulateLimit);

}  // namespace kvcache_plan
