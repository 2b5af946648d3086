// kvcache_sim: the continuous-batching loop and the four cache back ends (see
// sim.cppm for the loop, the modes and the figures).
module;

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

module kvcache_sim;

import kvcache;

namespace kvcache_sim {

using kvcache::Bytes;
using kvcache::Tokens;

namespace {

// The simulator's view of one request while it is queued or running.
struct Live {
  std::size_t index = 0;        // into the workload
  std::string id;               // the cache's request id
  std::uint64_t generated = 0;  // tokens generated so far (kept across preemption)
  std::uint64_t tokens = 0;     // tokens per layer in the cache now (0 while queued)
};

enum class Admit : std::uint8_t { now, later, never };

// One step's memory figures, in bytes (doubles: kv bytes of a shared-page
// cache come from memory_efficiency()).
struct Sample {
  double kv_bytes = 0;
  double reserved_bytes = 0;
  std::uint64_t table_entries = 0;
  double saved_bytes = 0;
};

// basic_max and basic_oracle: one BasicKVCache reservation per running
// request. Decode is modelled by the reservation only (sim.cppm says why):
// the simulator counts tokens and checks them against reservation(id).
class BasicBackend {
 public:
  BasicBackend(const SimParams& p, bool oracle)
      : cache_(p.model, p.budget),
        max_seq_(p.max_seq_len),
        bytes_per_token_(p.model.bytes_per_token()),
        oracle_(oracle) {}

  Admit admit(const Request& r, Live& l) {
    // Basic modes never preempt, so l.generated is 0 here; the formula
    // holds anyway.
    const Tokens prompt = r.prompt + Tokens{l.generated};
    const Tokens max_gen = oracle_ ? r.output - Tokens{l.generated} : max_seq_ - prompt;
    try {
      if (bytes_for(prompt + max_gen, bytes_per_token_) > cache_.budget()) return Admit::never;
    } catch (const std::overflow_error&) {
      return Admit::never;
    }
    if (!cache_.can_allocate(prompt, max_gen)) return Admit::later;
    if (!cache_.allocate(l.id, prompt, max_gen)) {
      throw std::logic_error("BasicKVCache refused " + l.id + " after can_allocate said yes");
    }
    l.tokens = prompt.count();
    return Admit::now;
  }

  bool append(const Live& l) const {
    if (Tokens{l.tokens + 1} > cache_.reservation(l.id)) {
      throw std::logic_error("request " + l.id + " outgrew its BasicKVCache reservation");
    }
    return true;
  }

  void free(const Live& l) { cache_.free(l.id); }

  [[nodiscard]] Sample sample(std::span<const Live> running) const {
    std::uint64_t tokens = 0;
    for (const Live& l : running) tokens += l.tokens;
    Sample s;
    s.kv_bytes = static_cast<double>(bytes_for(Tokens{tokens}, bytes_per_token_).count());
    s.reserved_bytes = static_cast<double>(cache_.stats().used_memory.count());
    return s;
  }

  void finish(ModeResult& /*result*/) const {}

 private:
  kvcache::BasicKVCache cache_;
  Tokens max_seq_;
  Bytes bytes_per_token_;
  bool oracle_;
};

// paged and paged_prefix: a bookkeeping-only PagedKVCache.
class PagedBackend {
 public:
  PagedBackend(const SimParams& p, bool prefix)
      : cache_(p.model, p.budget, p.page_size, kvcache::Storage::none), prefix_(prefix) {}

  Admit admit(const Request& r, Live& l) {
    const Tokens prompt = r.prompt + Tokens{l.generated};
    const Tokens remaining = r.output - Tokens{l.generated};
    // A request that cannot finish even alone in the empty cache would be
    // preempted forever: reject it (vLLM checks max_model_len against the
    // cache at start-up for the same reason).
    if (cache_.admission(prompt + remaining) == kvcache::Admission::never) return Admit::never;
    bool ok = false;
    if (prefix_ && !r.prefix_id.empty()) {
      // admission()/can_allocate() count the whole prompt; a prefix hit
      // needs fewer pages, so ask by trying (all-or-nothing).
      ok = cache_.allocate_paged(l.id, prompt, r.prefix_id, r.prefix_tokens);
    } else {
      if (cache_.admission(prompt) != kvcache::Admission::now) return Admit::later;
      ok = cache_.allocate_paged(l.id, prompt);
      if (!ok) {
        throw std::logic_error("PagedKVCache refused " + l.id + " after admission() said now");
      }
    }
    if (!ok) return Admit::later;
    l.tokens = prompt.count();
    return Admit::now;
  }

  bool append(const Live& l) { return cache_.append_token_all_layers(l.id); }

  void free(const Live& l) { cache_.free(l.id); }

  [[nodiscard]] Sample sample(std::span<const Live> running) const {
    const kvcache::PagedStats st = cache_.stats();
    Sample s;
    const auto used = static_cast<double>(st.used_memory.count());
    s.kv_bytes = cache_.memory_efficiency() * used;
    s.reserved_bytes = used;
    for (const Live& l : running) s.table_entries += cache_.pages_held(l.id).count();
    // Entries beyond the physical pages are pages that sharing saved.
    const std::uint64_t physical = st.used_pages.count();
    if (s.table_entries > physical) {
      s.saved_bytes = static_cast<double>(
          bytes_for(kvcache::Pages{s.table_entries - physical}, st.bytes_per_page).count());
    }
    return s;
  }

  void finish(ModeResult& result) const {
    const kvcache::PagedStats st = cache_.stats();
    result.total_pages = st.total_pages.count();
    result.prefix_hits = st.prefix_hits;
    result.prefix_misses = st.prefix_misses;
    const std::uint64_t lookups = st.prefix_hits + st.prefix_misses;
    result.prefix_hit_rate =
        lookups == 0 ? 0.0
                     : static_cast<double>(st.prefix_hits) / static_cast<double>(lookups);
    result.pages_saved = st.prefix.pages_saved;
    result.cow_copies = st.prefix.cow_copies;
    result.prefixes_evicted = st.prefix.prefixes_evicted;
  }

 private:
  kvcache::PagedKVCache cache_;
  bool prefix_;
};

template <class Backend>
ModeResult run_loop(Backend& backend, Mode mode, const SimParams& params,
                    std::span<const Request> w, const Progress& progress) {
  ModeResult res;
  res.mode = mode;
  if (is_paged(mode)) res.page_size = params.page_size;
  const std::uint64_t horizon =
      params.max_steps == 0 ? kMaxSteps : std::min(params.max_steps, kMaxSteps);
  const auto budget = static_cast<double>(params.budget.count());
  const std::uint64_t max_seq = params.max_seq_len.count();

  std::deque<Live> queue;
  std::vector<Live> running;
  std::size_t next = 0;  // the next request to arrive

  double sum_batch = 0;
  double sum_kv = 0;
  double sum_reserved = 0;
  double sum_entries = 0;
  double sum_saved = 0;
  double last_reported = -1;

  std::uint64_t step = 0;
  for (; step < horizon; ++step) {
    // 1. Arrivals.
    while (next < w.size() && w[next].arrival <= step) {
      Live l;
      l.index = next;
      l.id = "r" + std::to_string(next);
      queue.push_back(std::move(l));
      ++next;
      ++res.arrived;
    }

    // 2. Admission, first come first served.
    while (!queue.empty()) {
      Live& head = queue.front();
      const Request& r = w[head.index];
      if (r.prompt.count() + r.output.count() > max_seq) {  // longer than the model allows
        ++res.rejected;
        queue.pop_front();
        continue;
      }
      const Admit a = backend.admit(r, head);
      // "later" with nothing running cannot change by waiting: nothing will
      // be freed. Only a prefix hit whose shared pages cannot be evicted
      // gets here; reject it rather than stall the queue.
      if (a == Admit::never || (a == Admit::later && running.empty())) {
        ++res.rejected;
        queue.pop_front();
        continue;
      }
      if (a == Admit::later) break;
      ++res.admitted;
      running.push_back(std::move(head));
      queue.pop_front();
    }

    // 3. Decode: one token per running request, oldest first; preempt the
    // newest while the cache has no page for it.
    for (std::size_t i = 0; i < running.size();) {
      bool preempted_self = false;
      while (!backend.append(running[i])) {
        const bool self = running.size() - 1 == i;
        Live victim = std::move(running.back());
        running.pop_back();
        backend.free(victim);
        victim.tokens = 0;
        if (self && running.empty()) {
          // Alone and still no page: it can never progress.
          ++res.rejected;
        } else {
          ++res.preemptions;
          queue.push_front(std::move(victim));  // recomputed when admitted again
        }
        if (self) {
          preempted_self = true;
          break;
        }
      }
      if (preempted_self) break;  // it was the last one
      ++running[i].generated;
      ++running[i].tokens;
      ++res.generated_tokens;
      ++i;
    }

    // 4. Sample.
    const Sample s = backend.sample(running);
    StepSample ss;
    ss.kv_share = budget > 0 ? s.kv_bytes / budget : 0;
    ss.reserved_share = budget > 0 ? s.reserved_bytes / budget : 0;
    res.timeline.push_back(ss);
    sum_batch += static_cast<double>(running.size());
    res.peak_batch = std::max<std::uint64_t>(res.peak_batch, running.size());
    res.peak_kv_share = std::max(res.peak_kv_share, ss.kv_share);
    res.peak_reserved_share = std::max(res.peak_reserved_share, ss.reserved_share);
    sum_kv += s.kv_bytes;
    sum_reserved += s.reserved_bytes;
    sum_entries += static_cast<double>(s.table_entries);
    res.peak_page_table_entries = std::max(res.peak_page_table_entries, s.table_entries);
    sum_saved += s.saved_bytes;
    res.peak_saved_bytes =
        std::max(res.peak_saved_bytes, static_cast<std::uint64_t>(s.saved_bytes));

    // 5. Finish.
    std::size_t kept = 0;
    for (std::size_t i = 0; i < running.size(); ++i) {
      if (running[i].generated == w[running[i].index].output.count()) {
        backend.free(running[i]);
        ++res.finished;
      } else {
        if (kept != i) running[kept] = std::move(running[i]);
        ++kept;
      }
    }
    running.resize(kept);

    if (progress) {
      const double done =
          params.max_steps != 0
              ? static_cast<double>(step + 1) / static_cast<double>(horizon)
              : static_cast<double>(res.finished + res.rejected) / static_cast<double>(w.size());
      if (done - last_reported >= 0.005) {
        progress(std::min(done, 1.0));
        last_reported = done;
      }
    }
    if (next == w.size() && queue.empty() && running.empty()) {
      res.drained = true;
      ++step;
      break;
    }
  }

  res.steps = step;
  res.running_at_end = running.size();
  res.queued_at_end = queue.size();
  if (res.steps > 0) {
    const auto n = static_cast<double>(res.steps);
    res.mean_batch = sum_batch / n;
    res.mean_kv_share = sum_kv / n / budget;
    res.mean_reserved_share = sum_reserved / n / budget;
    res.mean_page_table_entries = sum_entries / n;
    res.mean_saved_bytes = sum_saved / n;
    res.mean_saved_share = sum_saved / n / budget;
  }
  res.peak_saved_share = static_cast<double>(res.peak_saved_bytes) / budget;
  res.internal_fragmentation = sum_reserved > 0 ? 1.0 - sum_kv / sum_reserved : 0.0;
  if (res.internal_fragmentation < 0) res.internal_fragmentation = 0;  // rounding
  backend.finish(res);
  if (progress) progress(1.0);
  return res;
}

}  // namespace

std::string_view mode_label(Mode mode) noexcept {
  switch (mode) {
    case Mode::basic_max: return "basic, max";
    case Mode::basic_oracle: return "basic, oracle";
    case Mode::paged: return "paged";
    case Mode::paged_prefix: return "paged + prefix";
  }
  return "?";
}

std::string_view mode_key(Mode mode) noexcept {
  switch (mode) {
    case Mode::basic_max: return "basic_max";
    case Mode::basic_oracle: return "basic_oracle";
    case Mode::paged: return "paged";
    case Mode::paged_prefix: return "paged_prefix";
  }
  return "?";
}

bool is_paged(Mode mode) noexcept { return mode == Mode::paged || mode == Mode::paged_prefix; }

ModeResult simulate(Mode mode, const SimParams& params, std::span<const Request> workload,
                    const Progress& progress) {
  if (!std::ranges::is_sorted(workload, {}, &Request::arrival)) {
    throw std::invalid_argument("the workload is not in arrival order");
  }
  if (params.budget.count() == 0) {
    throw std::invalid_argument("the budget must be more than 0 B");
  }
  switch (mode) {
    case Mode::basic_max:
    case Mode::basic_oracle: {
      BasicBackend b(params, mode == Mode::basic_oracle);
      return run_loop(b, mode, params, workload, progress);
    }
    case Mode::paged:
    case Mode::paged_prefix: {
      PagedBackend b(params, mode == Mode::paged_prefix);
      return run_loop(b, mode, params, workload, progress);
    }
  }
  throw std::logic_error("unknown mode");
}

std::vector<TimelinePoint> downsample(std::span<const StepSample> samples,
                                      std::size_t max_points) {
  std::vector<TimelinePoint> out;
  if (samples.empty() || max_points == 0) return out;
  const std::size_t bucket = (samples.size() + max_points - 1) / max_points;
  for (std::size_t start = 0; start < samples.size(); start += bucket) {
    const std::size_t end = std::min(samples.size(), start + bucket);
    TimelinePoint p;
    for (std::size_t i = start; i < end; ++i) {
      p.kv_share += samples[i].kv_share;
      p.reserved_share += samples[i].reserved_share;
    }
    const auto n = static_cast<double>(end - start);
    p.kv_share /= n;
    p.reserved_share /= n;
    p.step = static_cast<double>(start + end - 1) / 2.0;
    out.push_back(p);
  }
  return out;
}

}  // namespace kvcache_sim
