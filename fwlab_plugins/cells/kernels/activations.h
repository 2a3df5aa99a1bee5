/* The gates' activations for the C kernels, included once per dtype like the kernel that
 * includes it (REAL is float or double, NAME(x) suffixes a symbol with it):
 *
 *     σ(x) = 1 / (1 + e^−x),   tanh(x) = 2 / (1 + e^−2x) − 1
 *
 * with e^x inline in float32, so that the compiler vectorises a loop of them without a call per
 * vector (libmvec's expf): x = n ln 2 + r with n = rint(x / ln 2), |r| ≤ ln 2 / 2, e^r by
 * Cephes' expf polynomial (below 1 ulp), times 2^n made from n's bits. x is clamped to
 * [−87, 88] first, where 2^n stays a normal float; there σ and tanh are already 0, 1 or ±1 to
 * float32's precision. (With libm's expf, e^x overflowed to inf beyond that, and what
 * -ffast-math makes of the two formulas, assuming finite values, gave NaN: tanh below −44.)
 * In float64 (the gradient checks' precision), exp, of x clamped to [−708, 709] likewise.
 */
#include <stdint.h>
#include <string.h>
#include <tgmath.h> /* exp in REAL */

static inline REAL NAME(exp_)(REAL x) {
    if (sizeof(REAL) != sizeof(float)) return exp(x < -708 ? -708 : (x > 709 ? 709 : x));
    float y = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : (float)x);
    const float n = __builtin_rintf(y * 1.44269504088896341f);
    /* r = x − n ln 2 with ln 2 in two parts, the first exact in n·ln2_hi; fused multiply-adds,
     * which -ffast-math does not reassociate (written as x − n·hi + n·lo it merged the parts and
     * lost the split: 4e-6 relative error at x = 72) */
    y = __builtin_fmaf(n, -0.693359375f, y);
    y = __builtin_fmaf(n, 2.12194440e-4f, y);
    float p = 1.9875691500e-4f;
    p = p * y + 1.3981999507e-3f;
    p = p * y + 8.3334519073e-3f;
    p = p * y + 4.1665795894e-2f;
    p = p * y + 1.6666665459e-1f;
    p = p * y + 5.0000001201e-1f;
    p = p * y * y + y + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23; /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return (REAL)(p * scale);
}

static inline REAL NAME(sigmoid)(REAL x) { return (REAL)1 / ((REAL)1 + NAME(exp_)(-x)); }
static inline REAL NAME(tanh_)(REAL x) {
    return (REAL)2 / ((REAL)1 + NAME(exp_)(-2 * x)) - (REAL)1;
}
