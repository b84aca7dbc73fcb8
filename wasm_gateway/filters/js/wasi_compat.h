/* Included before every QuickJS source when building for wasm32-wasi (build.py passes -include). */
#include <stddef.h>

/* wasi-libc's dlmalloc has it; QuickJS declares it only for Linux and macOS. */
size_t malloc_usable_size(const void *ptr);

/* wasi-libc has no rounding-mode control and so no FE_UPWARD/FE_DOWNWARD; QuickJS passes them to
 * fesetround() while choosing between two candidate digit strings of an exact tie in toFixed/toPrecision.
 * There fesetround() fails and printf rounds to nearest-even, so such a tie may round down (rare). */
#ifndef FE_UPWARD
#define FE_UPWARD 0x800
#endif
#ifndef FE_DOWNWARD
#define FE_DOWNWARD 0x400
#endif
