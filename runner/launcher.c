/* runner/mcpm-run: a static aarch64 launcher for mcpm-run.bin.
 *
 * Android and HarmonyOS have no glibc, so the runner ships its own (in lib/, with the TVM runtime)
 * and this launcher starts it through the bundled dynamic loader:
 *     <dir>/lib/ld-linux-aarch64.so.1 --library-path <dir>/lib <dir>/mcpm-run.bin ARGS...
 * where <dir> is the directory of this executable. Being a static ELF it needs no loader, no
 * shell and no glibc on the device.
 *
 * Emulation only: when the kernel cannot execute aarch64 code (an x86 host running this launcher
 * under qemu-user, which does not intercept execve), the loader is started through
 * qemu-aarch64-static from PATH instead. On an aarch64 handset that branch is never taken.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char** argv) {
  char self[PATH_MAX], loader[PATH_MAX + 32], libdir[PATH_MAX + 32], bin[PATH_MAX + 32];
  ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) {
    fprintf(stderr, "mcpm-run: error: cannot resolve /proc/self/exe: %s\n", strerror(errno));
    return 1;
  }
  self[n] = '\0';
  char* slash = strrchr(self, '/');
  if (slash) *slash = '\0';
  snprintf(loader, sizeof(loader), "%s/lib/ld-linux-aarch64.so.1", self);
  snprintf(libdir, sizeof(libdir), "%s/lib", self);
  snprintf(bin, sizeof(bin), "%s/mcpm-run.bin", self);

  char** args = calloc((size_t)argc + 6, sizeof(char*));
  if (!args) return 1;
  args[0] = "qemu-aarch64-static"; /* only used by the emulation fallback */
  args[1] = loader;
  args[2] = "--library-path";
  args[3] = libdir;
  args[4] = bin;
  for (int i = 1; i < argc; ++i) args[4 + i] = argv[i];
  execv(loader, args + 1);
  int err = errno;
  if (err == EACCES && chmod(loader, 0755) == 0) { /* copied without its mode bits (zip, adb sync) */
    execv(loader, args + 1);
    err = errno;
  }
  if (err == ENOEXEC) execvp(args[0], args);
  fprintf(stderr, "mcpm-run: error: cannot start %s: %s\n", loader, strerror(err));
  return 1;
}
