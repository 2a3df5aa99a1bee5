/* What the C kernels share, included once per dtype like the kernel that includes it (REAL is
 * float or double, NAME(x) suffixes a symbol with it):
 *
 * - NAME(vec), a 32-byte vector of LANES REALs (GCC's and Clang's vector extension: an AVX
 *   register on x86, two NEON registers on ARM), with NAME(load) and NAME(store), unaligned;
 * - THREAD_INDEX and THREAD_COUNT, the calling thread of an OpenMP parallel region and the
 *   region's threads (0 and 1 in a library built without OpenMP).
 */
#ifndef THREAD_INDEX
#ifdef _OPENMP
#include <omp.h>
#define THREAD_INDEX omp_get_thread_num()
#define THREAD_COUNT omp_get_num_threads()
#else
#define THREAD_INDEX 0
#define THREAD_COUNT 1
#endif
#endif
#include <stdint.h>
#include <string.h>

typedef REAL NAME(vec) __attribute__((vector_size(32)));
#define LANES ((int64_t)(32 / sizeof(REAL)))

static inline NAME(vec) NAME(load)(const REAL *from) {
    NAME(vec) v;
    memcpy(&v, from, sizeof v); /* an unaligned vector load */
    return v;
}

static inline void NAME(store)(REAL *to, NAME(vec) v) { memcpy(to, &v, sizeof v); }
