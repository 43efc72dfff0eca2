// A crash (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) prints where it happened before the process
// dies of the same signal: the faulting address and instruction with the module they lie in,
// the unwound stack, and the code addresses found on the stack (a rough call chain when
// unwinding stops, as it does at a jump through a bad pointer or in driver code). The tokmix
// executable installs it at start; libtokmix_torch.so installs it when TOKMIX_CRASH_REPORT=1.
#pragma once

namespace tokmix {
void install_crash_report();
}  // namespace tokmix
