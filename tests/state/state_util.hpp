// state_util.hpp: the driver shared by kvcache's RapidCheck state machines.
//
// Each machine must execute at least `kBaseCommands * KVCACHE_STATE_SCALE`
// commands per ctest run. RapidCheck's own knobs (max_success, max_size) fix
// the number of test cases, not the number of commands, and a process-wide
// seed makes repeated `rc::check` calls run the same cases. So `drive` runs
// the property in rounds: each round is one full RapidCheck check with the
// RC_PARAMS parameters (max_success cases, sizes up to max_size) and its own
// seed (round 0 uses RC_PARAMS' seed, round k that seed plus k times a large
// odd constant), until the machine's command counter reaches the target.
//
// On a failure RapidCheck shrinks the command sequence as usual; `drive`
// reports the minimal sequence through ADD_FAILURE (so the GTest test fails)
// and RapidCheck's global listener prints, when the process exits,
//     RC_PARAMS="reproduce=..."
// which replays exactly that minimal case. With a `reproduce` entry in
// RC_PARAMS, `drive` runs one round only (the replay) and skips the volume
// check.
//
// The one non-public piece of RapidCheck used here is
// `rc::detail::checkTestable(property, metadata, params)`: it is what
// RC_GTEST_PROP itself expands to (through `rc::detail::checkGTest`), with the
// parameters passed explicitly instead of read from the global configuration.
// Checked against the Debian package librapidcheck-dev 0~1033-08b5058.
//
// Kept free of kvcache types, so that it can be #included before
// `import kvcache;` (STYLE.md, "Tests": includes come first).
#ifndef KVCACHE_TESTS_STATE_STATE_UTIL_HPP
#define KVCACHE_TESTS_STATE_STATE_UTIL_HPP

#include <cxxabi.h>
#include <gtest/gtest.h>
#include <rapidcheck.h>
#include <rapidcheck/detail/Configuration.h>
#include <rapidcheck/detail/TestMetadata.h>
#include <rapidcheck/detail/TestParams.h>
#include <rapidcheck/state.h>

#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <typeinfo>
#include <vector>

namespace kvcache_state {

// Commands each machine executes per ctest run, before scaling.
inline constexpr std::uint64_t kBaseCommands = 10'000;

// KVCACHE_STATE_SCALE: a positive integer, 1 when unset or empty.
inline std::uint64_t scale() {
  const char* text = std::getenv("KVCACHE_STATE_SCALE");
  if (text == nullptr || *text == '\0') return 1;
  const std::string_view s(text);
  std::uint64_t value = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc{} || end != s.data() + s.size() || value == 0 || value > 1'000'000) {
    throw std::invalid_argument("KVCACHE_STATE_SCALE must be an integer in [1, 1000000], not \"" +
                                std::string(s) + "\"");
  }
  return value;
}

inline std::uint64_t command_target() { return kBaseCommands * scale(); }

// A machine's command types, repeated to weight them: `generator()` is the
// command generator for rc::state::check, `kinds` the number of distinct types.
template <class... Ts>
struct Distinct {
  static constexpr std::size_t value = 0;
};
template <class T, class... Ts>
struct Distinct<T, Ts...> {
  static constexpr std::size_t value =
      Distinct<Ts...>::value + ((std::is_same_v<T, Ts> || ...) ? 0 : 1);
};

template <class... Commands>
struct CommandList {
  static auto generator() { return rc::state::gen::execOneOfWithArgs<Commands...>(); }
  static constexpr std::size_t kinds = Distinct<Commands...>::value;
};

// Commands run, in total and per command type: the total drives the volume,
// the mix is printed and checked so that every command of a machine (every
// failure path included) really ran.
class Tally {
 public:
  // Called once per command run (from Command::run).
  void record(const std::type_info& type) {
    ++executed_;
    ++counts_[type.name()];
  }

  [[nodiscard]] std::uint64_t executed() const { return executed_; }
  [[nodiscard]] std::size_t kinds() const { return counts_.size(); }

  // One line per command type, by name: "  <count>  <unqualified type name>".
  void print(std::ostream& os) const {
    std::map<std::string, std::uint64_t> by_name;
    for (const auto& [mangled, n] : counts_) {
      int status = 0;
      const std::unique_ptr<char, void (*)(void*)> name(
          abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status), &std::free);
      const std::string shown = status == 0 ? std::string(name.get()) : mangled;
      by_name[shown.substr(shown.rfind(':') + 1)] = n;  // npos + 1 == 0: no scope
    }
    for (const auto& [name, n] : by_name) os << "  " << n << "\t" << name << "\n";
  }

 private:
  std::uint64_t executed_ = 0;
  std::map<std::string, std::uint64_t> counts_;
};

// Runs `property` (a nullary callable that runs one state machine whose
// commands record themselves in `tally`) in rounds until the tally reaches
// `target` commands, or once when RC_PARAMS asks to reproduce a failure.
// Then checks that `kinds` distinct command types ran. `id` is the RapidCheck
// test id, the key of the reproduce string.
template <class Property>
void drive(const std::string& id, const Property& property, const Tally& tally,
           std::uint64_t target, std::size_t kinds) {
  const rc::detail::Configuration& config = rc::detail::configuration();
  rc::detail::TestMetadata metadata;
  metadata.id = id;
  metadata.description = id;

  const auto report = [&](const rc::detail::TestResult& result, const std::string& where) {
    if (result.template is<rc::detail::SuccessResult>()) return true;
    std::ostringstream message;
    rc::detail::printResultMessage(result, message);
    ADD_FAILURE() << id << ": " << where << "\n"
                  << message.str()
                  << "\nRapidCheck prints RC_PARAMS=\"reproduce=...\" for this failure when the "
                     "test program exits.";
    return false;
  };

  if (!config.reproduce.empty()) {  // replaying one case: one round, no volume check
    static_cast<void>(
        report(rc::detail::checkTestable(property, metadata, config.testParams), "reproduce"));
    return;
  }

  rc::detail::TestParams params = config.testParams;
  constexpr std::uint64_t kSeedStep = 0x9E37'79B9'7F4A'7C15;  // odd: distinct seeds per round
  for (std::uint64_t round = 0; tally.executed() < target; ++round) {
    params.seed = config.testParams.seed + round * kSeedStep;
    const std::uint64_t before = tally.executed();
    const rc::detail::TestResult result = rc::detail::checkTestable(property, metadata, params);
    if (!report(result,
                "round " + std::to_string(round) + " (seed " + std::to_string(params.seed) + ")")) {
      return;
    }
    if (tally.executed() == before) {
      ADD_FAILURE() << id << ": a round ran no command (RC_PARAMS max_success=0?)";
      return;
    }
  }
  std::cout << id << ": " << tally.executed() << " commands executed (target " << target
            << ", KVCACHE_STATE_SCALE=" << scale() << "):\n";
  tally.print(std::cout);
  EXPECT_GE(tally.executed(), target);
  EXPECT_EQ(tally.kinds(), kinds) << "some command type never ran";
}

// Bytes drawn at random, `n` of them, shown by RapidCheck as numbers.
inline rc::Gen<std::vector<std::uint8_t>> bytes(std::size_t n) {
  return rc::gen::container<std::vector<std::uint8_t>>(n, rc::gen::arbitrary<std::uint8_t>());
}

// A string for show(): quotes, and escapes for non-printable characters.
inline std::string quoted(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u >= 0x7f || c == '"' || c == '\\') {
      constexpr const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[u >> 4U];
      out += hex[u & 0xfU];
    } else {
      out += c;
    }
  }
  out += '"';
  return out;
}

}  // namespace kvcache_state

#endif  // KVCACHE_TESTS_STATE_STATE_UTIL_HPP
