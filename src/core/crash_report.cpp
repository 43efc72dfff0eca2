// Crash reports without a debugger (see include/tokmix/crash_report.h).
#include "tokmix/crash_report.h"

#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>

namespace tokmix {
namespace {
long main_thread = 0;
// A crash prints where it happened, then dies of the same signal, so a failing run on a machine
// without a debugger still says why: the faulting address and instruction (with the module it
// lies in), the unwound stack (symbol names: the executable links with -rdynamic), and, because
// unwinding stops at code without unwind tables (a jump through a bad pointer, driver code), the
// words on the stack that point into loaded code: a rough call chain that needs no unwinding.
// Besides write and process_vm_readv it calls dladdr and backtrace, which are not async-signal-
// safe in general; the unwinder is loaded at install time so that backtrace does not allocate.
// The handler runs on an alternate stack in the thread that installed it (a stack overflow
// there is reported too); other threads report on their own stacks.
void put(const char* s) { (void)!write(2, s, strlen(s)); }
void put_hex(uintptr_t v) {
  char b[2 + 16 + 1];
  b[0] = '0';
  b[1] = 'x';
  for (int i = 0; i < 16; ++i) b[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 15];
  b[18] = 0;
  put(b);
}
void put_dec(long v) {
  char b[24];
  int n = 0;
  if (v < 0) { put("-"); v = -v; }
  do b[n++] = char('0' + v % 10); while ((v /= 10) && n < 23);
  char r[24];
  for (int i = 0; i < n; ++i) r[i] = b[n - 1 - i];
  r[n] = 0;
  put(r);
}
// "module+0xoffset (symbol+0xoffset)" when addr lies in a loaded module; false otherwise
bool put_where(uintptr_t addr) {
  Dl_info info{};
  if (addr < 4096 || !dladdr(reinterpret_cast<void*>(addr), &info) || !info.dli_fname) return false;
  put(info.dli_fname);
  put("+");
  put_hex(addr - reinterpret_cast<uintptr_t>(info.dli_fbase));
  if (info.dli_sname) {
    put(" (");
    put(info.dli_sname);
    put("+");
    put_hex(addr - reinterpret_cast<uintptr_t>(info.dli_saddr));
    put(")");
  }
  return true;
}

std::atomic<int> reporting{0};

void on_fatal_signal(int sig, siginfo_t* si, void* uctx) {
  // one report: a second thread faulting meanwhile waits for the first to end the process
  if (reporting.exchange(1))
    for (;;) pause();
  put("tokmix: fatal signal ");
  put_dec(sig);
  put(" (code ");
  put_dec(si->si_code);
  put(") at address ");
  put_hex(reinterpret_cast<uintptr_t>(si->si_addr));
  put(", thread ");
  put_dec(long(syscall(SYS_gettid)));
  put(main_thread == long(syscall(SYS_gettid)) ? " (main)\n" : " (not main)\n");
#if defined(__x86_64__)
  const auto* uc = static_cast<const ucontext_t*>(uctx);
  const uintptr_t pc = uintptr_t(uc->uc_mcontext.gregs[REG_RIP]), sp = uintptr_t(uc->uc_mcontext.gregs[REG_RSP]);
  put("  instruction ");
  put_hex(pc);
  put(" ");
  if (!put_where(pc)) put("(in no loaded module: a jump through a bad pointer?)");
  put("\n  stack unwound:\n");
#else
  (void)uctx;
#endif
  void* frames[64];
  const int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, 2);
#if defined(__x86_64__)
  put("  code addresses found on the stack above the fault (a rough call chain):\n");
  int shown = 0;
  // read through process_vm_readv: past the top of the stack it fails instead of faulting
  static uintptr_t w[4096];
  struct iovec local {w, sizeof w}, remote {reinterpret_cast<void*>(sp), sizeof w};
  long got = syscall(SYS_process_vm_readv, long(getpid()), &local, 1ul, &remote, 1ul, 0ul);
  for (size_t chunk = sizeof w / 2; got < 0 && chunk >= 512; chunk /= 2) {
    local.iov_len = remote.iov_len = chunk;
    got = syscall(SYS_process_vm_readv, long(getpid()), &local, 1ul, &remote, 1ul, 0ul);
  }
  for (long i = 0; i < got / 8 && shown < 40; ++i) {
    const uintptr_t a = w[i];
    Dl_info info{};
    if (a < 4096 || !dladdr(reinterpret_cast<void*>(a), &info) || !info.dli_sname) continue;  // code with a symbol only
    put("    [sp+");
    put_dec(long(i * 8));
    put("] ");
    put_where(a);
    put("\n");
    ++shown;
  }
#endif
  signal(sig, SIG_DFL);
  raise(sig);
}

}  // namespace

void install_crash_report() {
  main_thread = long(syscall(SYS_gettid));
  // backtrace() loads the unwinder (libgcc_s) on first use, which allocates: do it now, not in
  // a handler that may run inside a broken malloc
  void* warm[2];
  (void)backtrace(warm, 2);
  static char alt[1 << 16];
  stack_t ss{};
  ss.ss_sp = alt;
  ss.ss_size = sizeof alt;
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_sigaction = on_fatal_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT}) sigaction(sig, &sa, nullptr);
}

}  // namespace tokmix
