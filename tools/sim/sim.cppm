// kvcache_sim: the testable part of the kvcache-sim command-line program.
//
// kvcache-sim is a discrete-step serving simulator built on kvcache. It
// replays a workload (requests with an arrival step, a prompt length and an
// output length, optionally a shared prefix) through a continuous-batching
// loop, once per memory-management mode, on the same model, budget and
// workload, and reports how much of the KV budget holds real tokens.
//
// The loop (simulate(), one call per mode), at every step t:
//   1. requests arriving at t join the back of the waiting queue;
//   2. admission, first come first served: the queue's head is admitted while
//      the cache takes it; a request that can never fit (larger than the
//      whole budget) is rejected, not queued forever; the first one that
//      does not fit *now* stops admission for this step (no overtaking);
//   3. decode: every running request, oldest first, generates one token
//      (one KV slot in every layer). When the paged cache has no page for
//      it, the newest running request is preempted (freed, put back at the
//      head of the queue, to be recomputed: its prompt plus the tokens it
//      had generated become its prompt when it is admitted again), as vLLM
//      does, until the append succeeds or the request preempted itself. (A
//      request that fails to append while running alone can never progress:
//      it is rejected instead; likewise one that cannot be admitted while
//      nothing runs, which only a prefix hit at the edge of the pool can.)
//   4. the step is sampled (batch size, memory holding tokens, reserved);
//   5. requests that have generated their output length finish and are
//      freed.
// Admission's prefill produces the first output token in the same step, so
// a request of output length L runs for L steps and holds prompt + L tokens
// when it finishes: exactly the basic-oracle reservation.
// The run stops at the horizon (max_steps) or when the workload is drained
// (everything arrived, nothing queued or running), whichever comes first.
//
// The four modes, every one on the real library:
//   basic_max     BasicKVCache::allocate(id, prompt, max_seq_len - prompt):
//                 a contiguous reservation of the model's whole maximum
//                 sequence length (a server that does not know the output
//                 length must reserve this);
//   basic_oracle  BasicKVCache::allocate(id, prompt, output): exactly
//                 prompt + output (the unreachable best case of contiguous
//                 reservation);
//   paged         PagedKVCache(Storage::none): allocate_paged(id, prompt),
//                 append_token_all_layers per decoded token;
//   paged_prefix  the same, with allocate_paged(id, prompt, prefix_id,
//                 prefix_tokens) for requests that carry a prefix.
// Decode in the basic modes: BasicKVCache stores bytes (a token of
// Llama-3.1-8B's shape is 128 KiB over 32 layers), and appending them would
// make the simulator a memcpy benchmark whose resident memory grows to the
// budget. A reservation never changes after allocate, and it is all that
// matters for admission and for the comparison, so the basic modes do not
// append: the simulator counts each request's tokens itself and checks them
// against BasicKVCache::reservation(id). The paged modes run entirely on the
// library's bookkeeping (Storage::none keeps no KV bytes).
//
// Figures, sampled after every step's decode (before finished requests are
// freed, so a step's peak is seen):
//   kv_share        bytes of real token KV held by running requests / budget.
//                   Basic: tokens * bytes_per_token. Paged: memory_efficiency()
//                   * used_memory, i.e. the filled slots of the pages that
//                   requests hold, each physical page once (a shared prefix
//                   counts once).
//   reserved_share  basic: used_memory (the reservations) / budget;
//                   paged: used_memory (pages held by requests) / budget.
//   internal fragmentation = 1 - sum(kv bytes) / sum(reserved bytes) over
//                   all steps: for paged, 1 - memory_efficiency() weighted by
//                   the pages in use; for basic, the reserved-but-unused share.
//   sharing saved   (block-table entries - physical pages held) * page bytes:
//                   what the same block tables would take without sharing.
//   page-table entries = sum of pages_held() over running requests.
// Time averages are over the steps the mode ran.
//
// The embedded workload (generate_workload) draws lengths from log-normal
// distributions whose means are those published for ShareGPT (161 prompt,
// 338 output tokens) and Alpaca (19 and 58), with the project's own
// splitmix64 generator and no std::*_distribution, so a seed gives the same
// workload with every standard library. See docs/simulator.md.
//
// The pipeline, each step tested on its own (tools/sim/tests/):
//   parse_args(args)                -> Options
//   generate_workload / load_trace  -> std::vector<Request>
//   make_report(options, workload)  -> Report   (runs the simulations)
//   render_text / render_json / render_timeline_svg / render_sweep_svg
// and run() strings them together, turning every error into one line on
// `err` ("kvcache-sim: error: ...") and an exit code.
//
// Exit codes: 0 success, 2 bad arguments, an invalid model configuration or a
// malformed or unreadable trace, 1 an output file that cannot be written or
// an internal error.
//
// Thread safety: free functions over values; no shared state.
module;

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <ostream>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

export module kvcache_sim;

import kvcache;

export namespace kvcache_sim {

// A command-line mistake: printed after "kvcache-sim: error: ", exit 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A malformed trace: the message starts with "FILE:LINE: ", exit 2.
class TraceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An output file that cannot be written: exit 1.
class OutputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr int kExitOk = 0;
inline constexpr int kExitInternal = 1;
inline constexpr int kExitUsage = 2;

// The longest run: a horizon or a trace's arrival step beyond this is an
// error (the per-step samples of a run are kept in memory).
inline constexpr std::uint64_t kMaxSteps = 1'000'000;

// ---- Random numbers -------------------------------------------------------

// splitmix64 (Steele, Lea, Flood 2014; the generator Java's SplittableRandom
// and xoshiro's seeding use): 64 bits per call, fully specified, so a seed
// gives the same sequence everywhere.
class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) noexcept : state_(seed) {}
  [[nodiscard]] std::uint64_t next() noexcept;
  // Uniform in [0, 1), from the top 53 bits.
  [[nodiscard]] double uniform() noexcept;

 private:
  std::uint64_t state_;
};

// ---- Workload --------------------------------------------------------------

struct Request {
  std::uint64_t arrival = 0;      // the step it arrives at
  kvcache::Tokens prompt;         // prompt tokens, the prefix included
  kvcache::Tokens output;         // tokens to generate, >= 1
  std::string prefix_id;          // empty: no shared prefix
  kvcache::Tokens prefix_tokens;  // the first prefix_tokens of the prompt (0 without a prefix)
  std::string source;             // where it comes from: "sharegpt", "alpaca", "trace"
};

// A log-normal length distribution, parameterised by its mean (before
// clamping) and the standard deviation of the underlying normal.
struct LengthModel {
  double mean = 1;
  double sigma = 1;
};

struct Dataset {
  std::string_view name;
  LengthModel prompt;
  LengthModel output;
};

// ShareGPT: mean prompt 161.3, output 338.0 tokens; Alpaca: 19.3 and 58.5
// (the means the PagedAttention paper, Kwon et al. SOSP 2023, reports).
[[nodiscard]] const Dataset& sharegpt() noexcept;
[[nodiscard]] const Dataset& alpaca() noexcept;

enum class WorkloadKind : std::uint8_t { mixed, sharegpt, alpaca };
[[nodiscard]] std::string_view workload_name(WorkloadKind kind) noexcept;

struct WorkloadSpec {
  WorkloadKind kind = WorkloadKind::mixed;  // mixed: each request ShareGPT or Alpaca, 50/50
  std::uint64_t requests = 2000;
  double rate = 1.0;                        // mean arrivals per step (Poisson)
  std::uint64_t seed = 42;
  std::uint32_t system_prompt_pct = 50;     // share of requests with the system prompt
  kvcache::Tokens system_prompt{200};       // its length (prepended to the drawn prompt)
  kvcache::Tokens max_seq_len{4096};        // prompt + output never exceed it
};

// The embedded synthetic workload: deterministic for a spec. Each request
// draws (in this order) its dataset, whether it carries the system prompt,
// its user prompt length (clamped to [1, max_seq_len - system prompt - 1])
// and its output length (clamped to [1, max_seq_len - prompt]). Arrivals:
// a Poisson(rate) number of new requests per step, from step 0.
// Throws std::invalid_argument for a spec that cannot be drawn (no requests,
// a rate <= 0, a system prompt leaving no room for a prompt and an output).
[[nodiscard]] std::vector<Request> generate_workload(const WorkloadSpec& spec);

// Draws a log-normal length with the given mean, rounded and clamped to
// [lo, hi]. Exposed for tests.
[[nodiscard]] std::uint64_t draw_length(SplitMix64& rng, const LengthModel& m, std::uint64_t lo,
                                        std::uint64_t hi);
// Draws a Poisson(rate) count. Exposed for tests.
[[nodiscard]] std::uint64_t draw_poisson(SplitMix64& rng, double rate);

struct DatasetSummary {
  std::string name;
  std::uint64_t requests = 0;
  double mean_prompt = 0;       // without the system prompt
  double mean_output = 0;
};

struct WorkloadSummary {
  std::uint64_t requests = 0;
  std::uint64_t with_prefix = 0;
  std::uint64_t prefixes = 0;          // distinct prefix ids
  double mean_prompt = 0;              // prefix included
  double mean_output = 0;
  std::uint64_t max_prompt = 0;
  std::uint64_t max_output = 0;
  std::uint64_t first_arrival = 0;
  std::uint64_t last_arrival = 0;
  std::vector<DatasetSummary> datasets;  // per source, in order of first appearance
};

[[nodiscard]] WorkloadSummary summarize(std::span<const Request> workload);

// ---- Traces ----------------------------------------------------------------

enum class TraceFormat : std::uint8_t { csv, jsonl };

// By extension (.csv; .jsonl, .ndjson, .json), else by content (a first
// non-blank character '{' means JSONL), else CSV.
[[nodiscard]] TraceFormat detect_format(std::string_view name, std::string_view text) noexcept;

// Parses a trace. One request per line; blank lines and lines starting with
// '#' are skipped.
//   CSV:   arrival,prompt_tokens,output_tokens[,prefix_id,prefix_tokens]
//          (an optional header line whose first field starts with "arrival";
//          the prefix fields are both given or both empty)
//   JSONL: {"arrival": 0, "prompt_tokens": 161, "output_tokens": 338,
//           "prefix_id": "sys", "prefix_tokens": 200}  (other keys ignored)
// Prompt and output are at least 1 token; a prefix is 1..prompt tokens and
// one prefix id always has the same length; arrival < kMaxSteps.
// Requests are returned in arrival order (stable). Throws TraceError
// "NAME:LINE: what is wrong" for the first malformed row, and
// "NAME: no requests" for an empty trace.
[[nodiscard]] std::vector<Request> parse_trace(std::string_view text, std::string_view name,
                                               TraceFormat format);

// Reads and parses a file. Throws TraceError when it cannot be read.
[[nodiscard]] std::vector<Request> load_trace(const std::string& path);

// ---- Simulation ------------------------------------------------------------

enum class Mode : std::uint8_t { basic_max, basic_oracle, paged, paged_prefix };
inline constexpr std::array kModes{Mode::basic_max, Mode::basic_oracle, Mode::paged,
                                   Mode::paged_prefix};

[[nodiscard]] std::string_view mode_label(Mode mode) noexcept;  // "basic, max", ...
[[nodiscard]] std::string_view mode_key(Mode mode) noexcept;    // "basic_max", ...
[[nodiscard]] bool is_paged(Mode mode) noexcept;

struct SimParams {
  kvcache::ModelConfig model{32, 8, 128, 2};
  kvcache::Bytes budget{std::uint64_t{4} << 30};
  kvcache::Tokens max_seq_len{4096};
  kvcache::Tokens page_size{16};  // paged modes
  std::uint64_t max_steps = 0;    // the horizon; 0: until drained (at most kMaxSteps)
};

struct StepSample {
  double kv_share = 0;        // real token KV / budget
  double reserved_share = 0;  // reserved or page-held memory / budget
};

struct ModeResult {
  Mode mode = Mode::basic_max;
  kvcache::Tokens page_size;           // paged modes; 0 for basic
  std::uint64_t steps = 0;             // steps simulated
  bool drained = false;                // stopped because everything was done

  std::uint64_t arrived = 0;           // requests that arrived within the run
  std::uint64_t admitted = 0;          // admissions, re-admissions after preemption included
  std::uint64_t finished = 0;
  std::uint64_t rejected = 0;          // could never fit (or longer than max_seq_len)
  std::uint64_t preemptions = 0;
  std::uint64_t running_at_end = 0;
  std::uint64_t queued_at_end = 0;     // arrived, waiting
  std::uint64_t generated_tokens = 0;  // decode steps done (recomputed ones count again)

  double mean_batch = 0;               // running requests per step
  std::uint64_t peak_batch = 0;
  double mean_kv_share = 0;
  double peak_kv_share = 0;
  double mean_reserved_share = 0;
  double peak_reserved_share = 0;
  double internal_fragmentation = 0;   // 1 - sum kv / sum reserved

  // Paged modes.
  double mean_page_table_entries = 0;  // sum of pages_held over running requests
  std::uint64_t peak_page_table_entries = 0;
  std::uint64_t total_pages = 0;

  // Prefix sharing (paged_prefix; zero elsewhere).
  std::uint64_t prefix_hits = 0;
  std::uint64_t prefix_misses = 0;
  double prefix_hit_rate = 0;          // hits / (hits + misses); 0 without lookups
  double mean_saved_share = 0;         // sharing saved / budget
  double peak_saved_share = 0;
  double mean_saved_bytes = 0;
  std::uint64_t peak_saved_bytes = 0;
  std::uint64_t pages_saved = 0;       // library counter: pages shared instead of allocated
  std::uint64_t cow_copies = 0;
  std::uint64_t prefixes_evicted = 0;

  std::vector<StepSample> timeline;    // one sample per step
};

// Called with the fraction of the run done, in [0, 1].
using Progress = std::function<void(double)>;

// Runs one mode over `workload`. Throws std::invalid_argument for a workload
// not in arrival order, a zero budget, or (from the library) an invalid
// model configuration or page size.
[[nodiscard]] ModeResult simulate(Mode mode, const SimParams& params,
                                  std::span<const Request> workload,
                                  const Progress& progress = {});

// Averages of consecutive samples: at most `max_points` points of
// (middle step, kv share, reserved share), for charts and JSON.
struct TimelinePoint {
  double step = 0;
  double kv_share = 0;
  double reserved_share = 0;
};
[[nodiscard]] std::vector<TimelinePoint> downsample(std::span<const StepSample> samples,
                                                    std::size_t max_points);

// ---- Command line ------------------------------------------------------------

enum class Action : std::uint8_t { run, help };

struct Options {
  Action action = Action::run;
  std::string model_name = "Llama-3.1-8B";  // a kvcache-plan preset, or "custom"
  SimParams sim;                            // sim.page_size = page_sizes.front()
  std::vector<kvcache::Tokens> page_sizes{kvcache::Tokens{16}};  // several: a sweep
  WorkloadSpec workload;
  std::optional<std::string> trace;         // replay this file instead
  std::string json_path;                    // empty: no JSON file
  std::string svg_path;                     // empty: no timeline chart
  std::string sweep_svg_path;               // empty: no sweep chart
  bool quiet = false;
};

inline constexpr std::uint64_t kDefaultSteps = 2000;  // the embedded workload's horizon

// Parses the arguments after the program name. Throws UsageError.
[[nodiscard]] Options parse_args(std::span<const std::string_view> args);

// ---- The report ----------------------------------------------------------------

struct Report {
  Options options;
  std::string workload_source;  // "embedded mixed (seed 42)" or the trace path
  WorkloadSummary workload;
  std::vector<ModeResult> modes;  // the four modes at the first page size
  std::vector<ModeResult> sweep;  // paged and paged_prefix per page size (several sizes only)
};

// Runs every mode (and the page-size sweep). `progress` gets the fraction of
// all runs done and what runs now. Throws UsageError for a page size the
// library rejects (checked before anything runs).
[[nodiscard]] Report make_report(const Options& options, std::span<const Request> workload,
                                 const std::function<void(double, std::string_view)>& progress = {});

[[nodiscard]] std::string render_text(const Report& report);
[[nodiscard]] std::string render_json(const Report& report);
// Memory holding tokens (solid) and reserved (dashed) over simulated time,
// one colour per mode.
[[nodiscard]] std::string render_timeline_svg(const Report& report);
// Internal fragmentation against page-table size, one point per page size.
[[nodiscard]] std::string render_sweep_svg(const Report& report);
[[nodiscard]] std::string help_text();

// The whole program: parses `args`, loads or generates the workload, runs,
// prints the table to `out`, writes the files, or prints one error line to
// `err`. A progress bar goes to `err` when `progress_bar` is true and
// --quiet is not given (main passes isatty(stderr)). Never throws.
[[nodiscard]] int run(std::span<const std::string_view> args, std::ostream& out,
                      std::ostream& err, bool progress_bar = false);

}  // namespace kvcache_sim
