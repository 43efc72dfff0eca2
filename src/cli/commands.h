// Subcommands of the `tokmix` CLI. Each command file registers itself with one
// `CommandRegistrar` at static-initialisation time, so adding a command never edits main.cpp.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <vector>

namespace tokmix::cli {

using CommandSetup = std::function<void(CLI::App& app)>;
std::vector<CommandSetup>& command_registry();

// `tokmix reproduce`, shared by the command files that add a reproduction under it (table1, lm):
// created by the first caller, found by the others.
CLI::App* reproduce_command(CLI::App& app);

struct CommandRegistrar {
  explicit CommandRegistrar(CommandSetup f) { command_registry().push_back(std::move(f)); }
};

}  // namespace tokmix::cli
