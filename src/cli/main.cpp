// tokmix: define a token mixer by its structure, run it, decode it, measure it.


#include <cstdio>
#include <iostream>
#include <set>

#include "commands.h"
#include "tokmix/crash_report.h"
#include "tokmix/pattern.h"

namespace tokmix::cli {

std::vector<CommandSetup>& command_registry() {
  static std::vector<CommandSetup> r;
  return r;
}

CLI::App* reproduce_command(CLI::App& app) {
  for (auto* s : app.get_subcommands([](CLI::App*) { return true; }))
    if (s->get_name() == "reproduce") return s;
  auto* rep = app.add_subcommand("reproduce", "Reproduce the paper's results");
  rep->require_subcommand(1);
  return rep;
}

namespace {

std::string join_1idx(const std::vector<Entry>& es) {
  std::set<int64_t> s;
  for (auto& e : es) s.insert(e.pos + 1);
  std::string out = "{";
  for (auto p : s) out += (out.size() > 1 ? ", " : "") + std::to_string(p);
  return out + "}";
}

std::string human(int64_t v) {
  if (v >= 1000000) return std::to_string(v / 1000000) + "." + std::to_string((v / 100000) % 10) + "M";
  if (v >= 10000) return std::to_string(v / 1000) + "K";
  return std::to_string(v);
}

// The instances of spec section 2, one per row of the table.
const std::vector<std::string>& table_specs() {
  static const std::vector<std::string> s = {"attention", "local:64", "first-order", "recurrence:4", "dense", "pow2",
                                             "sq1", "pow2-lattice", "sq1-lattice", "f:3^k", "A=local:64;B=pow2"};
  return s;
}

void print_pattern_table(const std::vector<int64_t>& ns) {
  std::printf("%-22s %-10s %-22s", "pattern", "A", "B");
  for (auto n : ns) std::printf(" | n=%-7s row max  cache", human(n).c_str());
  std::printf("\n");
  auto kind = [](const Side& s) -> std::string {
    switch (s.kind) {
      case SupportKind::None: return "-";
      case SupportKind::Self: return "{i}";
      case SupportKind::Window: return s.window ? "window " + std::to_string(s.window) : "[1, i]";
      case SupportKind::Offsets: return "i - f(k), f=" + s.seq.text;
      case SupportKind::Lattice: return "lattice f=" + s.seq.text;
    }
    return "?";
  };
  for (const auto& spec : table_specs()) {
    Pattern p = Pattern::parse(spec);
    std::string b = kind(p.B());
    if (b.size() > 22) b = b.substr(0, 21) + "~";
    std::printf("%-22s %-10s %-22s", spec.c_str(), kind(p.A()).c_str(), b.c_str());
    for (auto n : ns) std::printf(" |   %15s %6s", human(p.max_row_size(n)).c_str(), human(p.cache_entries(n)).c_str());
    std::printf("\n");
  }
}

CommandRegistrar reg_pattern([](CLI::App& app) {
  auto* cmd = app.add_subcommand("pattern", "Print the supports SA(i), SB(i) of a pattern (1-indexed positions)");
  auto spec = std::make_shared<std::string>();
  auto rows = std::make_shared<std::vector<int64_t>>();
  auto n = std::make_shared<int64_t>(4096);
  cmd->add_option("spec", *spec, Pattern::accepted_forms())->required();
  cmd->add_option("--row", *rows, "1-indexed row(s) to print")->check(positive_integer());
  cmd->add_option("--n", *n, "sequence length for the size and cache figures")->check(positive_integer());
  cmd->callback([=] {
    Pattern p = Pattern::parse(*spec);
    std::printf("pattern %s: A levels %d, B levels %d at n=%lld, max row size %lld, decode cache %lld entries (A %lld + B %lld)\n",
                p.spec().c_str(), p.num_A_levels(), p.num_B_levels(*n), (long long)*n, (long long)p.max_row_size(*n),
                (long long)p.cache_entries(*n), (long long)p.cache_A(*n), (long long)p.cache_B(*n));
    for (int64_t r : *rows) {
      std::printf("row %lld\n  SA = %s\n  SB = %s\n", (long long)r, join_1idx(p.row_A(r - 1)).c_str(), join_1idx(p.row_B(r - 1)).c_str());
    }
  });
  auto* tbl = app.add_subcommand("patterns", "Table of the framework's instances: row size and decode cache against n");
  auto ns = std::make_shared<std::vector<int64_t>>(std::vector<int64_t>{1024, 65536, 1048576});
  tbl->add_option("--n", *ns, "lengths")->check(positive_integer());
  tbl->callback([=] { print_pattern_table(*ns); });
});

}  // namespace

}  // namespace tokmix::cli

int main(int argc, char** argv) {
  tokmix::install_crash_report();
  CLI::App app{"tokmix: generalized linear token mixing, Y = (I - B)^{-1} A X"};
  app.require_subcommand(1);
  for (auto& setup : tokmix::cli::command_registry()) setup(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
