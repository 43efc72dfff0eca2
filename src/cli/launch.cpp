// `tokmix launch --nproc N [--master-addr A] [--master-port P] -- COMMAND...`: starts N copies of
// a command with the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
// MASTER_ADDR, MASTER_PORT), prefixes every line they print with "[rank r] ", and when one fails
// stops the others (SIGTERM, then SIGKILL after --grace seconds) and exits with its code.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "commands.h"
#include "tokmix/train/distributed.h"

namespace tokmix::cli {
namespace {

volatile std::sig_atomic_t g_signal = 0;
void on_signal(int sig) { g_signal = sig; }

struct Stream {
  int fd = -1;
  int to = 1;  // 1: our stdout, 2: our stderr
  std::string buf;
};

struct Child {
  int rank = 0;
  pid_t pid = -1;
  bool exited = false;
  int code = 0;  // exit code, or 128 + signal
  Stream out, err;
};

void write_all(int fd, const std::string& s) {
  const char* p = s.data();
  size_t n = s.size();
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;
    }
    p += w;
    n -= size_t(w);
  }
}

// Forwards whole lines with the rank prefix; `eof` flushes a last line without newline.
void forward(Stream& s, int rank, bool eof) {
  const std::string prefix = "[rank " + std::to_string(rank) + "] ";
  size_t start = 0, nl;
  std::string lines;
  while ((nl = s.buf.find('\n', start)) != std::string::npos) {
    lines += prefix + s.buf.substr(start, nl - start + 1);
    start = nl + 1;
  }
  s.buf.erase(0, start);
  if (eof && !s.buf.empty()) {
    lines += prefix + s.buf + "\n";
    s.buf.clear();
  }
  if (!lines.empty()) write_all(s.to, lines);
}

std::string self_exe() {
  char buf[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return "tokmix";
  buf[n] = 0;
  return buf;
}

int exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

std::string how_it_ended(int code) {
  if (code > 128) {
    const char* name = strsignal(code - 128);
    return "was killed by signal " + std::to_string(code - 128) + " (" + (name ? name : "?") + ")";
  }
  return "exited with code " + std::to_string(code);
}

int launch(int nproc, const std::string& addr, int port, double grace_s, std::vector<std::string> argv) {
  using Clock = std::chrono::steady_clock;
  if (argv.empty()) throw std::invalid_argument("launch: no command given (write it after --)");
  // `tokmix` means this very executable, wherever it is
  if (argv[0] == "tokmix") argv[0] = self_exe();
  if (port == 0) port = dist::free_port();
  std::vector<char*> cargv;
  for (auto& s : argv) cargv.push_back(s.data());
  cargv.push_back(nullptr);

  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  std::vector<Child> kids(nproc);
  for (int r = 0; r < nproc; ++r) {
    int po[2], pe[2];
    if (::pipe2(po, O_CLOEXEC) != 0 || ::pipe2(pe, O_CLOEXEC) != 0)
      throw std::runtime_error(std::string("launch: pipe: ") + std::strerror(errno));
    std::fflush(nullptr);
    pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error(std::string("launch: fork: ") + std::strerror(errno));
    if (pid == 0) {
      ::setpgid(0, 0);  // its own process group: stopping a rank stops what it started too
      ::dup2(po[1], 1);
      ::dup2(pe[1], 2);
      signal(SIGINT, SIG_DFL);
      signal(SIGTERM, SIG_DFL);
      signal(SIGPIPE, SIG_DFL);
      setenv("RANK", std::to_string(r).c_str(), 1);
      setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      setenv("MASTER_ADDR", addr.c_str(), 1);
      setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      ::execvp(cargv[0], cargv.data());
      std::fprintf(stderr, "launch: cannot run '%s': %s\n", cargv[0], std::strerror(errno));
      std::_Exit(127);
    }
    ::setpgid(pid, pid);
    ::close(po[1]);
    ::close(pe[1]);
    kids[r].rank = r;
    kids[r].pid = pid;
    kids[r].out = {po[0], 1, {}};
    kids[r].err = {pe[0], 2, {}};
  }
  std::fprintf(stderr, "launch: %d process(es), rendezvous %s:%d\n", nproc, addr.c_str(), port);

  int failure = 0, failed_rank = -1;
  bool stopping = false, killed = false;
  Clock::time_point kill_at{};
  auto stop_others = [&](int sig) {
    for (auto& k : kids)
      if (!k.exited || stopping) ::kill(-k.pid, sig);  // the whole group, leftovers of exited ranks too
  };
  Clock::time_point all_exited_at{};
  for (;;) {
    std::vector<pollfd> fds;
    std::vector<Stream*> owners;
    std::vector<int> ranks;
    for (auto& k : kids)
      for (Stream* s : {&k.out, &k.err})
        if (s->fd >= 0) {
          fds.push_back({s->fd, POLLIN, 0});
          owners.push_back(s);
          ranks.push_back(k.rank);
        }
    bool all_exited = true;
    for (auto& k : kids) all_exited = all_exited && k.exited;
    if (all_exited && fds.empty()) break;
    // output of what the ranks left running (their pipes stay open): at most 1 s more
    if (all_exited && all_exited_at == Clock::time_point{}) all_exited_at = Clock::now();
    if (all_exited && Clock::now() - all_exited_at > std::chrono::seconds(1)) {
      for (size_t i = 0; i < owners.size(); ++i) {
        forward(*owners[i], ranks[i], true);
        ::close(owners[i]->fd);
        owners[i]->fd = -1;
      }
      break;
    }
    if (!fds.empty()) {
      int n = ::poll(fds.data(), fds.size(), 100);
      if (n < 0 && errno != EINTR) throw std::runtime_error(std::string("launch: poll: ") + std::strerror(errno));
      for (size_t i = 0; n > 0 && i < fds.size(); ++i) {
        if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        char buf[65536];
        ssize_t got = ::read(fds[i].fd, buf, sizeof buf);
        if (got > 0) {
          owners[i]->buf.append(buf, size_t(got));
          forward(*owners[i], ranks[i], false);
        } else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
          forward(*owners[i], ranks[i], true);
          ::close(owners[i]->fd);
          owners[i]->fd = -1;
        }
      }
    } else {
      ::usleep(20000);
    }
    // reap
    for (auto& k : kids) {
      if (k.exited) continue;
      int status = 0;
      pid_t w = ::waitpid(k.pid, &status, WNOHANG);
      if (w == k.pid) {
        k.exited = true;
        k.code = exit_code(status);
        if (k.code != 0 && !stopping) {
          failure = k.code;
          failed_rank = k.rank;
          stopping = true;
          std::fprintf(stderr, "launch: rank %d %s; stopping the other ranks\n", k.rank, how_it_ended(k.code).c_str());
          stop_others(SIGTERM);
          kill_at = Clock::now() + std::chrono::milliseconds(int64_t(grace_s * 1000));
        }
      }
    }
    if (g_signal && !stopping) {
      std::fprintf(stderr, "launch: got signal %d; stopping every rank\n", int(g_signal));
      stopping = true;
      failure = 128 + int(g_signal);
      stop_others(SIGTERM);
      kill_at = Clock::now() + std::chrono::milliseconds(int64_t(grace_s * 1000));
    }
    if (stopping && !killed && Clock::now() >= kill_at) {
      bool any = false;
      for (auto& k : kids) any = any || !k.exited;
      if (any) std::fprintf(stderr, "launch: killing the ranks still running after %.1f s\n", grace_s);
      stop_others(SIGKILL);
      killed = true;
    }
  }
  if (failed_rank >= 0) std::fprintf(stderr, "launch: failed (rank %d %s)\n", failed_rank, how_it_ended(failure).c_str());
  return failure;
}

CommandRegistrar reg_launch([](CLI::App& app) {
  auto* cmd = app.add_subcommand("launch",
                                 "Run a command as N processes of a distributed job (as torchrun does): "
                                 "tokmix launch --nproc 2 -- tokmix train --config C --distributed");
  struct Args {
    int nproc = 1;
    std::string addr = "127.0.0.1";
    int port = 29500;
    double grace = 5;
    std::vector<std::string> argv;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--nproc", a->nproc, "processes (one per device)")->required()->check(CLI::Range(1, 4096));
  cmd->add_option("--master-addr", a->addr, "address of rank 0, which hosts the rendezvous (default 127.0.0.1)");
  cmd->add_option("--master-port", a->port, "port of the rendezvous (default 29500; 0: a free one)")->check(CLI::Range(0, 65535));
  cmd->add_option("--grace", a->grace, "seconds the other ranks get after SIGTERM before SIGKILL, when one fails (default 5)")
      ->check(CLI::Range(0.0, 3600.0));
  cmd->add_option("command", a->argv, "the command and its arguments, after --")->required();
  cmd->callback([a] {
    const int rc = launch(a->nproc, a->addr, a->port, a->grace, a->argv);
    std::fflush(nullptr);
    if (rc != 0) std::exit(rc);
  });
});

}  // namespace
}  // namespace tokmix::cli
