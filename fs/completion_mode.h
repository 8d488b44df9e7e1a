// CompletionMode: who runs an async DIO's completion work (mount option
// completion=). The table in DESIGN.md ("Kiocb and the completion decision")
// is the contract; dio_done() is the one place that applies it.
#pragma once

#include <optional>
#include <string_view>

namespace deferfs {

enum class CompletionMode {
  kInline,     // the poller runs everything (work in "IRQ" context: a baseline)
  kWorkqueue,  // writes go to a completion thread (Linux <= 6.5)
  kDefer,      // writes go back to the issuing worker via dio_complete (Linux 6.6, the seed)
  kAuto,       // pure overwrites in the poller, the rest deferred to the issuer
  kSync,       // the issuing worker waits for its own IO (synchronous DIO)
};

inline constexpr std::string_view kCompletionModeNames = "inline|workqueue|defer|auto|sync";

inline std::string_view CompletionModeName(CompletionMode m) {
  switch (m) {
    case CompletionMode::kInline: return "inline";
    case CompletionMode::kWorkqueue: return "workqueue";
    case CompletionMode::kDefer: return "defer";
    case CompletionMode::kAuto: return "auto";
    case CompletionMode::kSync: return "sync";
  }
  return "?";
}

inline std::optional<CompletionMode> ParseCompletionMode(std::string_view s) {
  for (auto m : {CompletionMode::kInline, CompletionMode::kWorkqueue, CompletionMode::kDefer, CompletionMode::kAuto,
                 CompletionMode::kSync}) {
    if (s == CompletionModeName(m)) return m;
  }
  return std::nullopt;
}

}  // namespace deferfs
