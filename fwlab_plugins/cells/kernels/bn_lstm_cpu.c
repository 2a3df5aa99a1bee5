/* The BN-LSTM's time loop on the CPU, forward and backward (see bn_lstm_cpu.py for the
 * equations and for what the driver does around it).
 *
 * Per step: the recurrent product r_t = W_h h_{t-1} (backward: δh_{t-1} = δr_t W_h +
 * ∂L/∂h_{t-1}) on all threads (step_products.h), and the step's element-wise work, two batch
 * norms, four activations and the cell update over a (B, 4H) block, on one thread. As ATen
 * calls that work is some twenty passes of at least ~10 µs each at B = 16; here it is three
 * passes over the block, which stays in L1/L2. The weight gradient, a sum over steps, is left
 * to the driver.
 *
 * Buffers are time-major, (T, B, F) for per-sample quantities and (T, F) for per-step
 * statistics; every pointer is to contiguous memory of the driver's dtype. The file is compiled
 * once per dtype: REAL is float or double, NAME(x) suffixes the symbol with the dtype.
 */
#include <tgmath.h>  /* exp, sqrt in REAL: expf and sqrtf for float */
#include <stdint.h>

#include "activations.h" /* NAME(sigmoid), NAME(tanh_) */
#include "step_products.h"

typedef struct {
    int64_t batch, hidden, training;
    /* training: the running statistics' rows are min(start + t, slots - 1) of (slots, F)
     * buffers, updated in place; evaluation: (T, F) population statistics, rows t (start 0,
     * slots T) */
    int64_t start, slots;
    int64_t threads;          /* the most threads a pass may use */
    double momentum, eps;
    const REAL *input_part;   /* u_t = BN(W_x x_t) + b, (T, B, 4H) */
    const REAL *recurrent_weights; /* W_h, (4H, H) */
    const REAL *h0;           /* (B, H) */
    REAL *recurrent;          /* r_t = W_h h_{t-1}, (T, B, 4H) */
    REAL *activations;        /* σ(f), σ(i), σ(o), tanh(g), (T, B, 4H) */
    REAL *cells;              /* c_t, (T, B, H) */
    REAL *tanh_n;             /* tanh(BN(c_t)), (T, B, H) */
    REAL *hiddens;            /* h_t, (T, B, H) */
    const REAL *c0;           /* (B, H) */
    const REAL *gamma_r, *gamma_c, *beta_c;
    REAL *mean_r, *rho_r;     /* the statistics each step normalised with, (T, 4H) */
    REAL *mean_c, *rho_c;     /* (T, H); ρ = 1/sqrt(σ² + ε) */
    REAL *stat_mean_r, *stat_var_r, *stat_mean_c, *stat_var_c;
    /* backward */
    const REAL *grad_outputs; /* ∂L/∂h_t, (T, B, H) */
    REAL *grad_h;             /* δh_t on entry (output's and carried), (B, H) */
    REAL *grad_h0;            /* δh_0, (B, H) */
    REAL *grad_c;             /* δc carried from t + 1, updated to δc_{t-1}, (B, H) */
    REAL *grad_input;         /* δu_t, (T, B, 4H) */
    REAL *grad_recurrent;     /* δr_t, (T, B, 4H) */
    REAL *grad_gamma_r;       /* (4H), summed over steps */
    REAL *grad_gamma_c, *grad_beta_c; /* (H), summed over steps */
} NAME(BNLSTMBuffers);

/* Batch statistics of x (B, F) into mean and ρ, the running averages of the row updated
 * (the variance unbiased there, as F.batch_norm); in evaluation ρ of the population's. */
static void NAME(statistics)(const NAME(BNLSTMBuffers) *p, const REAL *x, int64_t features,
                             REAL *mean, REAL *rho, REAL *stat_mean, REAL *stat_var) {
    const int64_t batch = p->batch;
    if (!p->training) {
        for (int64_t j = 0; j < features; j++) {
            mean[j] = stat_mean[j];
            rho[j] = (REAL)1 / sqrt(stat_var[j] + (REAL)p->eps);
        }
        return;
    }
    for (int64_t j = 0; j < features; j++) mean[j] = 0, rho[j] = 0;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t j = 0; j < features; j++) mean[j] += x[b * features + j];
    for (int64_t j = 0; j < features; j++) mean[j] /= (REAL)batch;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t j = 0; j < features; j++) {
            REAL d = x[b * features + j] - mean[j];
            rho[j] += d * d;  /* Σ (x − μ)², then ρ below */
        }
    const REAL keep = (REAL)(1 - p->momentum), take = (REAL)p->momentum;
    for (int64_t j = 0; j < features; j++) {
        REAL variance = rho[j] / (REAL)batch;
        stat_mean[j] = keep * stat_mean[j] + take * mean[j];
        stat_var[j] = keep * stat_var[j] + take * rho[j] / (REAL)(batch - 1);
        rho[j] = (REAL)1 / sqrt(variance + (REAL)p->eps);
    }
}

static int64_t NAME(row)(const NAME(BNLSTMBuffers) *p, int64_t t) {
    int64_t row = p->start + t;
    return row < p->slots - 1 ? row : p->slots - 1;
}

/* Step t once r_t is written: gates, c_t, h_t and the statistics (`scratch`: 2·4H REALs). */
static void NAME(forward_step)(const NAME(BNLSTMBuffers) *p, int64_t t, REAL *scratch) {
    const int64_t batch = p->batch, hidden = p->hidden, four = 4 * hidden;
    const REAL *u = p->input_part + t * batch * four, *r = p->recurrent + t * batch * four;
    REAL *act = p->activations + t * batch * four;
    REAL *c = p->cells + t * batch * hidden, *tn = p->tanh_n + t * batch * hidden;
    REAL *h = p->hiddens + t * batch * hidden;
    const REAL *c_before = t ? p->cells + (t - 1) * batch * hidden : p->c0;
    REAL *mean_r = p->mean_r + t * four, *rho_r = p->rho_r + t * four;
    REAL *mean_c = p->mean_c + t * hidden, *rho_c = p->rho_c + t * hidden;
    const int64_t row = NAME(row)(p, t);
    NAME(statistics)(p, r, four, mean_r, rho_r, p->stat_mean_r + row * four,
                     p->stat_var_r + row * four);
    REAL *scale = scratch, *shift = scratch + four;  /* BN as x·scale + shift */
    for (int64_t j = 0; j < four; j++) {
        scale[j] = p->gamma_r[j] * rho_r[j];
        shift[j] = -mean_r[j] * scale[j];
    }
    for (int64_t b = 0; b < batch; b++) {
        const REAL *rb = r + b * four, *ub = u + b * four;
        REAL *ab = act + b * four;
        for (int64_t j = 0; j < 3 * hidden; j++)
            ab[j] = NAME(sigmoid)(rb[j] * scale[j] + shift[j] + ub[j]);
        for (int64_t j = 3 * hidden; j < four; j++)
            ab[j] = NAME(tanh_)(rb[j] * scale[j] + shift[j] + ub[j]);
        const REAL *f = ab, *i = ab + hidden, *g = ab + 3 * hidden, *cb = c_before + b * hidden;
        REAL *ct = c + b * hidden;
        for (int64_t k = 0; k < hidden; k++) ct[k] = f[k] * cb[k] + i[k] * g[k];
    }
    NAME(statistics)(p, c, hidden, mean_c, rho_c, p->stat_mean_c + row * hidden,
                     p->stat_var_c + row * hidden);
    for (int64_t k = 0; k < hidden; k++) {
        scale[k] = p->gamma_c[k] * rho_c[k];
        shift[k] = p->beta_c[k] - mean_c[k] * scale[k];
    }
    for (int64_t b = 0; b < batch; b++) {
        const REAL *o = act + b * four + 2 * hidden, *ct = c + b * hidden;
        REAL *tb = tn + b * hidden, *hb = h + b * hidden;
        for (int64_t k = 0; k < hidden; k++) {
            tb[k] = NAME(tanh_)(ct[k] * scale[k] + shift[k]);
            hb[k] = o[k] * tb[k];
        }
    }
}

/* Step t backward, from δh_t (p->grad_h) and the carried δc: δu_t, δr_t, the carried δc_{t-1}
 * and the γ/β sums (`scratch`: 2·4H REALs). δh_{t-1} = δr_t W_h + ∂L/∂h_{t-1} comes after. */
static void NAME(backward_step)(const NAME(BNLSTMBuffers) *p, int64_t t, REAL *scratch) {
    const int64_t batch = p->batch, hidden = p->hidden, four = 4 * hidden;
    const REAL *r = p->recurrent + t * batch * four, *act = p->activations + t * batch * four;
    const REAL *c = p->cells + t * batch * hidden, *tn = p->tanh_n + t * batch * hidden;
    const REAL *c_before = t ? p->cells + (t - 1) * batch * hidden : p->c0;
    const REAL *mean_r = p->mean_r + t * four, *rho_r = p->rho_r + t * four;
    const REAL *mean_c = p->mean_c + t * hidden, *rho_c = p->rho_c + t * hidden;
    REAL *grad_a = p->grad_input + t * batch * four, *grad_r = p->grad_recurrent + t * batch * four;
    REAL *grad_h = p->grad_h, *grad_c = p->grad_c;
    REAL *sum = scratch, *sum_x = scratch + four;  /* Σ_b d, Σ_b d x̂ */
    const REAL inv_batch = (REAL)1 / (REAL)batch;

    /* δn = δh o (1 − tanh²n), into grad_h's place once δo is taken */
    for (int64_t k = 0; k < hidden; k++) sum[k] = 0, sum_x[k] = 0;
    for (int64_t b = 0; b < batch; b++) {
        const REAL *o = act + b * four + 2 * hidden, *tb = tn + b * hidden;
        const REAL *cb = c + b * hidden;
        REAL *gh = grad_h + b * hidden, *ga = grad_a + b * four;
        for (int64_t k = 0; k < hidden; k++) {
            REAL oo = o[k];
            ga[2 * hidden + k] = gh[k] * tb[k] * oo * ((REAL)1 - oo);  /* δõ */
            REAL dn = gh[k] * oo * ((REAL)1 - tb[k] * tb[k]);
            gh[k] = dn;
            sum[k] += dn;
            sum_x[k] += dn * (cb[k] - mean_c[k]) * rho_c[k];
        }
    }
    for (int64_t k = 0; k < hidden; k++) {
        p->grad_beta_c[k] += sum[k];
        p->grad_gamma_c[k] += sum_x[k];
    }
    /* δc = δc_carried + BN'(γ_c δn), then the gates' pre-activation gradients δa */
    for (int64_t b = 0; b < batch; b++) {
        const REAL *ab = act + b * four, *cb = c + b * hidden, *cp = c_before + b * hidden;
        const REAL *dn = grad_h + b * hidden;
        REAL *gc = grad_c + b * hidden, *ga = grad_a + b * four;
        for (int64_t k = 0; k < hidden; k++) {
            REAL d = dn[k];
            if (p->training) {
                REAL x_hat = (cb[k] - mean_c[k]) * rho_c[k];
                d -= (sum[k] + x_hat * sum_x[k]) * inv_batch;
            }
            REAL dc = gc[k] + p->gamma_c[k] * rho_c[k] * d;
            REAL f = ab[k], i = ab[hidden + k], g = ab[3 * hidden + k];
            ga[k] = dc * cp[k] * f * ((REAL)1 - f);
            ga[hidden + k] = dc * g * i * ((REAL)1 - i);
            ga[3 * hidden + k] = dc * i * ((REAL)1 - g * g);
            gc[k] = dc * f;
        }
    }
    /* δr = BN'(γ_h δa; r̂, ρ_r), δγ_h += Σ_b δa r̂ */
    for (int64_t j = 0; j < four; j++) sum[j] = 0, sum_x[j] = 0;
    for (int64_t b = 0; b < batch; b++) {
        const REAL *ga = grad_a + b * four, *rb = r + b * four;
        for (int64_t j = 0; j < four; j++) {
            sum[j] += ga[j];
            sum_x[j] += ga[j] * (rb[j] - mean_r[j]) * rho_r[j];
        }
    }
    for (int64_t j = 0; j < four; j++) p->grad_gamma_r[j] += sum_x[j];
    for (int64_t b = 0; b < batch; b++) {
        const REAL *ga = grad_a + b * four, *rb = r + b * four;
        REAL *gr = grad_r + b * four;
        for (int64_t j = 0; j < four; j++) {
            REAL d = ga[j];
            if (p->training) {
                REAL x_hat = (rb[j] - mean_r[j]) * rho_r[j];
                d -= (sum[j] + x_hat * sum_x[j]) * inv_batch;
            }
            gr[j] = p->gamma_r[j] * rho_r[j] * d;
        }
    }
}

/* The forward pass over `steps` steps: per step the product r_t = h_{t-1} W_hᵀ shared out
 * among the threads, then the step's element-wise work on one of them (a batch norm's
 * statistics take the whole batch), the threads meeting between the two. Returns 0, or −1 if
 * the packed weights and the step's scratch cannot be allocated (and then computes nothing). */
int NAME(bn_lstm_forward)(const NAME(BNLSTMBuffers) *p, int64_t steps) {
    const int64_t B = p->batch, H = p->hidden, G = 4 * H;
    const int64_t weights_size = NAME(packed_size)(H, G);
    REAL *weights = NAME(packed_alloc)(weights_size + 2 * G);
    if (weights == NULL) return -1;
    REAL *scratch = weights + weights_size; /* the same block */
#pragma omp parallel num_threads(p->threads)
    {
        NAME(pack_panels)(p->recurrent_weights, H, G, 1, H, weights); /* W_hᵀ */
        for (int64_t t = 0; t < steps; t++) {
            const REAL *h_before = t ? p->hiddens + (t - 1) * B * H : p->h0;
            NAME(product)(h_before, H, B, H, weights, G, p->recurrent + t * B * G, G, NULL, 0);
#pragma omp barrier
#pragma omp single
            NAME(forward_step)(p, t, scratch);
        }
    }
    free(weights); /* and the scratch after it */
    return 0;
}

/* The backward pass over `steps` steps, from ∂L/∂h_t (grad_outputs), δh_{T-1} (grad_h: its
 * ∂L/∂h) and the carried δc: per step in reverse the element-wise work on one thread, then
 * δh_{t-1} = ∂L/∂h_{t-1} + δr_t W_h (δh_0 = δr_0 W_h into grad_h0) shared out among the
 * threads. Returns 0, or −1 if the packed weights and the step's scratch cannot be allocated. */
int NAME(bn_lstm_backward)(const NAME(BNLSTMBuffers) *p, int64_t steps) {
    const int64_t B = p->batch, H = p->hidden, G = 4 * H;
    const int64_t weights_size = NAME(packed_size)(G, H);
    REAL *weights = NAME(packed_alloc)(weights_size + 2 * G);
    if (weights == NULL) return -1;
    REAL *scratch = weights + weights_size; /* the same block */
#pragma omp parallel num_threads(p->threads)
    {
        NAME(pack_panels)(p->recurrent_weights, G, H, H, 1, weights); /* W_h */
        for (int64_t t = steps - 1; t >= 0; t--) {
#pragma omp single
            NAME(backward_step)(p, t, scratch);
            const REAL *grad_r = p->grad_recurrent + t * B * G;
            if (t > 0)
                NAME(product)(grad_r, G, B, G, weights, H, p->grad_h, H,
                              p->grad_outputs + (t - 1) * B * H, H);
            else
                NAME(product)(grad_r, G, B, G, weights, H, p->grad_h0, H, NULL, 0);
#pragma omp barrier
        }
    }
    free(weights); /* and the scratch after it */
    return 0;
}
