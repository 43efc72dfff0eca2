// Subcommands of the `tokmix` CLI. Each command file registers itself with one
// `CommandRegistrar` at static-initialisation time, so adding a command never edits main.cpp.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

namespace tokmix::cli {

using CommandSetup = std::function<void(CLI::App& app)>;
std::vector<CommandSetup>& command_registry();

// `tokmix reproduce`, shared by the command files that add a reproduction under it (table1, lm):
// created by the first caller, found by the others.
CLI::App* reproduce_command(CLI::App& app);

// A check for counts and lengths. CLI11's PositiveNumber reports 0 as "not in range 0.000000 to
// 1.79...e308"; this one names the value and what was expected (CLI11 prefixes the option).
inline const CLI::Validator& positive_integer() {
  static const CLI::Validator check(
      [](std::string& s) -> std::string {
        size_t used = 0;
        long long v = 0;
        try {
          v = std::stoll(s, &used);
        } catch (...) {
          used = 0;
        }
        if (s.empty() || used != s.size()) return "'" + s + "' is not an integer; expected a positive integer";
        if (v < 1) return "value " + s + " is not positive; expected an integer >= 1";
        return std::string();
      },
      "POSITIVE", "positive_integer");
  return check;
}

struct CommandRegistrar {
  explicit CommandRegistrar(CommandSetup f) { command_registry().push_back(std::move(f)); }
};

}  // namespace tokmix::cli
