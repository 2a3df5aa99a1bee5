/* A time loop's small matrix products, out = add + A·B, for C kernels that run a whole sequence
 * in one OpenMP parallel region (included by such a kernel, once per dtype, like the kernel).
 *
 * Per step a recurrent cell multiplies a few rows (the batch: B = 16 in an Omniglot episode) by
 * the same weights, T times. A BLAS call per step re-packs the weights every call and its threads
 * meet for every call; at 16 × 360 · 360 × 800 MKL ran at ~35 GMAC/s on 2 cores where this code
 * runs at ~60. Here the weights are packed once per pass (pack_panels) into panels of PANEL
 * columns, each panel's K × PANEL values contiguous, and each thread takes the same panels at
 * every step, so its share of the weights stays in its core's L2 through the whole loop.
 *
 * The micro-kernel keeps a block of 4 rows × PANEL columns (12 vector registers) of the result
 * through the whole K loop: per k, 3 vector loads of the panel and 4 broadcasts of A feed 12
 * fused multiply-adds.
 *
 * The including file defines REAL and NAME(x), as for vectors.h.
 */
#include <stdlib.h>

#include "vectors.h"

#define PANEL (3 * LANES) /* columns per packed panel: three vectors */
#define PANEL_ROWS 4      /* rows of the result a micro-kernel call keeps in registers */

/* The REALs B (K × N) takes packed: whole panels, the last one zero-padded. A multiple of
 * PANEL (96 bytes), so packed matrices placed one after another in a block of packed_alloc
 * stay 32-byte aligned. */
static int64_t NAME(packed_size)(int64_t K, int64_t N) {
    return (N + PANEL - 1) / PANEL * K * PANEL;
}

/* Room for `size` REALs of packed weights, 32-byte aligned; NULL if the allocation fails. The
 * caller frees it. */
static REAL *NAME(packed_alloc)(int64_t size) {
    const size_t bytes = (size_t)size * sizeof(REAL);
    return aligned_alloc(32, (bytes + 31) / 32 * 32);
}

/* packed[p][k][j] = B(k, p·PANEL + j), 0 past column N, where B(k, n) is b[k·k_stride +
 * n·n_stride]: a weight matrix or its transpose, by the strides. Shares the panels among the
 * threads of the enclosing region (an OpenMP worksharing loop: the threads meet at its end). */
static void NAME(pack_panels)(const REAL *b, int64_t K, int64_t N, int64_t k_stride,
                              int64_t n_stride, REAL *packed) {
    const int64_t panels = (N + PANEL - 1) / PANEL;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < PANEL; j++) {
                const int64_t n = p * PANEL + j;
                packed[(p * K + k) * PANEL + j] = n < N ? b[k * k_stride + n * n_stride] : 0;
            }
}

/* out = add + A·panel for ROWS (a literal) rows of A (lda apart) and the first `columns` (at
 * most PANEL) columns of one packed panel; out's and add's rows ld_out and ld_add apart (0
 * broadcasts one row of add, a bias; add may be out itself, to accumulate, or NULL: out =
 * A·panel). */
static inline __attribute__((always_inline)) void NAME(panel_rows)(
    const REAL *a, int64_t lda, const REAL *panel, int64_t K, REAL *out, int64_t ld_out,
    const REAL *add, int64_t ld_add, int64_t columns, const int ROWS) {
    NAME(vec) sums[PANEL_ROWS][3];
    for (int i = 0; i < ROWS; i++)
        for (int v = 0; v < 3; v++) sums[i][v] = (NAME(vec)){0};
    for (int64_t k = 0; k < K; k++) {
        const REAL *row = panel + k * PANEL;
        const NAME(vec) b0 = NAME(load)(row), b1 = NAME(load)(row + LANES);
        const NAME(vec) b2 = NAME(load)(row + 2 * LANES);
        for (int i = 0; i < ROWS; i++) {
            const REAL x = a[i * lda + k];
            sums[i][0] += x * b0;
            sums[i][1] += x * b1;
            sums[i][2] += x * b2;
        }
    }
    for (int i = 0; i < ROWS; i++) {
        REAL *to = out + i * ld_out;
        if (add != NULL && columns == PANEL) {
            const REAL *from = add + i * ld_add;
            for (int v = 0; v < 3; v++)
                NAME(store)(to + v * LANES, NAME(load)(from + v * LANES) + sums[i][v]);
        } else if (add != NULL) {
            const REAL *from = add + i * ld_add;
            REAL sum[PANEL];
            memcpy(sum, sums[i], sizeof sum);
            for (int64_t j = 0; j < columns; j++) to[j] = from[j] + sum[j];
        } else {
            REAL sum[PANEL];
            memcpy(sum, sums[i], sizeof sum);
            memcpy(to, sum, (size_t)columns * sizeof(REAL));
        }
    }
}

/* out (M × N) = add + A (M × K) · B (add as in panel_rows), B packed by pack_panels: the
 * calling thread's share of the result's blocks of PANEL_ROWS rows × one panel, taken panel by
 * panel (a thread's blocks are consecutive, so it works on few panels) and the same share at
 * every call (so that its panels stay in its core's cache). Blocks rather than whole panels are
 * shared out so that the threads get equal work when the panels are few (R·W + R = 164 columns
 * are 7 float32 panels). Every thread of the region calls it; they do not meet at its end. */
static void NAME(product)(const REAL *a, int64_t lda, int64_t M, int64_t K, const REAL *packed,
                          int64_t N, REAL *out, int64_t ld_out, const REAL *add, int64_t ld_add) {
    const int64_t row_blocks = (M + PANEL_ROWS - 1) / PANEL_ROWS;
    const int64_t blocks = (N + PANEL - 1) / PANEL * row_blocks;
    const int64_t thread = THREAD_INDEX, threads = THREAD_COUNT;
    const int64_t first = blocks * thread / threads, end = blocks * (thread + 1) / threads;
    for (int64_t block = first; block < end; block++) {
        const int64_t p = block / row_blocks, i = block % row_blocks * PANEL_ROWS;
        const int64_t column = p * PANEL, columns = N - column < PANEL ? N - column : PANEL;
        const REAL *from = add == NULL ? NULL : add + i * ld_add + column;
#define ROWS(COUNT)                                                                               \
    NAME(panel_rows)(a + i * lda, lda, packed + p * K * PANEL, K, out + i * ld_out + column,      \
                     ld_out, from, ld_add, columns, COUNT)
        switch (M - i) {
        case 1: ROWS(1); break;
        case 2: ROWS(2); break;
        case 3: ROWS(3); break;
        default: ROWS(PANEL_ROWS); break;
        }
#undef ROWS
    }
}
