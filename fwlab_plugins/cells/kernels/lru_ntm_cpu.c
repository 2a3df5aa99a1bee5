/* The LRU-NTM's time loop on the CPU, forward and backward (see lru_ntm_node.py for what the
 * driver does around it, and lru_ntm.py / lru_addressing.py for the equations, which this file
 * follows line by line).
 *
 * lru_ntm_forward runs, per step: the controller product (step_products.h), the controller
 * step, the head product, the memory step; lru_ntm_backward, per step in reverse: the memory
 * step's backward, the head product's, the controller step's, the controller product's. The
 * products' weight gradients, sums over steps, are left to the driver. The memory step works one
 * sequence at a time, so that its memory (N x W) stays in L1 through all its passes, where the
 * batched ATen code streamed the whole batch's memory from DRAM once per operation; its hot
 * loops work on blocks of slots in vector registers (see NAME(vec) below).
 *
 * The memory is updated in place and not kept per step: the backward pass undoes each step's
 * write, M_{t-1} = M_t − Σ_r w^w_r k_rᵀ with the cleared slot put back from its saved copy, so
 * the batch's memory (B·N·W, 2.6 MB at B = 128) stays in cache instead of a history of T of
 * them going through DRAM. Undoing a write in floating point leaves a rounding error of the
 * memory's size per step (about 1e-7 relative in float32), in the memory the backward pass
 * differentiates at, not in the forward pass's outputs.
 *
 * Sizes: B batch, H controller units, R heads, N slots, W width; Z = H + R·W is the controller's
 * recurrent input [h_{t-1}, r_{t-1}], E = R·W + R the head layer's output [k̃, α], or 2·R·W + R,
 * [k̃, ã, α], where the heads write an add vector a = tanh(ã) instead of their keys
 * (model.write_vector=add; `add_vector` below). Buffers are
 * time-major and contiguous; those indexed 0..T hold the state before step 0 at index 0.
 * The file is compiled once per dtype: REAL is float or double, NAME(x) suffixes the symbol.
 *
 * A pass runs in one OpenMP parallel region of `threads` threads where the library is built
 * with OpenMP (torch's own threads, see native.py): a step's element-wise work shares out the
 * batch's sequences (each backward thread with its own scratch), a product
 * the columns of its result, and the threads meet between the parts of a step.
 */
#include <stdint.h>
#include <string.h>
#include <tgmath.h> /* exp, sqrt in REAL: expf and sqrtf for float */

#include "activations.h"   /* NAME(sigmoid), NAME(tanh_) */
#include "step_products.h" /* and vectors.h: NAME(vec), LANES, THREAD_INDEX */

#define COSINE_EPS 1e-8 /* lru_addressing.COSINE_EPS */

typedef struct {
    int64_t batch, hidden, heads, slots, width;
    int64_t threads;    /* the most threads a pass may use */
    int64_t zero_start; /* 1: the state before step 0 is 0, so z_0 W_recᵀ is skipped */
    int64_t start_gradient; /* 1: δz_0 is wanted, the backward pass's last product */
    int64_t add_vector; /* 1: the heads write a = tanh(ã), 0: their keys k (see above) */
    double usage_decay; /* γ */
    /* the driver's inputs: u = W_x x + b (T, B, 4H), W_rec (4H, Z), W_head (E, H), b_head (E) */
    const REAL *input_part, *recurrent_weights, *head_weights, *head_bias;
    REAL *gates;        /* (T, B, 4H): u_t + W_rec z_t, then σ(i), σ(f), tanh(g), σ(o) */
    REAL *cells;        /* c, (T+1, B, H) */
    REAL *tanh_c;       /* tanh(c_t), (T, B, H) */
    REAL *z;            /* [h_t, r_t], (T+1, B, Z): from index 1 the node's outputs, as they are */
    REAL *head;         /* (T, B, E): [k̃, (ã,) α] = W_head h_t + b_head, then [k, (a,) σ(α)] */
    REAL *memory;       /* M, (B, W, N), slot-minor (see memory_forward_step): M_t after step t */
    /* where a pass starts its memory (and δM), read only: each sequence's is copied in at its
     * first step, when it is about to be in cache anyway, rather than in a pass of its own */
    const REAL *initial_memory;    /* M_0, (B, W, N), for the forward pass; NULL: 0 */
    const REAL *final_memory;      /* M_T, (B, W, N), for the backward pass */
    const REAL *final_grad_memory; /* δM_T, (B, W, N), for the backward pass; NULL: 0 */
    REAL *cleared;      /* the cleared slot's M_{t-1}(i), (T, B, W) */
    REAL *read_weights; /* w^r, (T+1, B, R, N) */
    REAL *write_weights;/* w^w, (T, B, R, N) */
    REAL *usage;        /* w^u, (T+1, B, N) */
    REAL *key_norms;    /* ‖k‖, (T, B, R) */
    REAL *slot_norms;   /* ‖M_{t+1}(i)‖, (T, B, N) */
    REAL *scores;       /* k_r·M_{t+1}(i), (T, B, R, N): the cosines' numerators */
    int64_t *least_used;/* the R least-used slots of w^u_t, least first, (T, B, R) */
    /* backward: carried gradients of the state after the step being undone */
    REAL *grad_z;       /* δ[h_t, r_t], (T+1, B, Z): the outputs' on entry, products' added */
    REAL *grad_c;       /* δc, (B, H) */
    REAL *grad_memory;  /* δM, (B, W, N) */
    REAL *grad_read_weights; /* δw^r, (B, R, N) */
    REAL *grad_usage;   /* δw^u, (B, N) */
    REAL *grad_gates;   /* δ of the pre-activations, (T, B, 4H) */
    REAL *grad_head;    /* δ[k̃, (ã,) α], (T, B, E) */
} NAME(LRUNTMBuffers);

/* E, the head layer's outputs per sequence: [k̃, ã, α] with an add vector, else [k̃, α]. */
static inline int64_t NAME(head_size)(const NAME(LRUNTMBuffers) *p) {
    const int64_t RW = p->heads * p->width;
    return (p->add_vector ? 2 * RW : RW) + p->heads;
}

/* The REALs of one thread's scratch in memory_backward_step: δw^w and δK (R·N each), the slots'
 * scales (N), δk (R·W), the keys' scales and δσ(α) (R each), the keys' products with the
 * written vectors and δr's with them (R·R each), and for an add vector δa (R·W) and a·M_t(i)
 * (R·N). */
static int64_t NAME(backward_scratch_size)(const NAME(LRUNTMBuffers) *p) {
    const int64_t R = p->heads, N = p->slots, W = p->width;
    return 2 * R * N + N + R * W + 2 * R + 2 * R * R + R * W + R * N;
}

/* exp(x) of a cosine, x in [−1, 1]: in float32 a polynomial of degree 8 inline (Chebyshev
 * interpolation on [−1.05, 1.05]; relative error below 3.1e-7 there, evaluated in float32,
 * against 1.9e-7 for expf rounded to float32), which the compiler vectorises without a call:
 * with libmvec's expf the slot norms and the softmax took 15% of the memory's forward step, now
 * 9%. activations.h's NAME(exp_), for any x, costs its range reduction on top: ~35% more time
 * in that part (1,090 against 790 ticks per sequence-step). In float64 (the gradient checks'
 * precision), exp. */
static inline REAL NAME(exp_cosine)(REAL x) {
    if (sizeof(REAL) != sizeof(float)) return exp(x);
    static const float c[] = {1.000000000e+00f, 9.999998536e-01f, 4.999999854e-01f,
                              1.666684359e-01f, 4.166684295e-02f, 8.327568018e-03f,
                              1.388314252e-03f, 2.053523316e-04f, 2.549381123e-05f};
    REAL y = (REAL)c[8];
    for (int k = 7; k >= 0; k--) y = y * x + (REAL)c[k];
    return y;
}

/* A pass's start of one sequence's memory or δM: n REALs into `to` from `from` + offset, or
 * zeros where `from` is NULL. */
static inline void NAME(start_from)(REAL *to, const REAL *from, int64_t offset, int64_t n) {
    if (from != NULL)
        memcpy(to, from + offset, (size_t)n * sizeof(REAL));
    else
        memset(to, 0, (size_t)n * sizeof(REAL));
}

static inline REAL NAME(dot)(const REAL *a, const REAL *b, int64_t n) {
    REAL sum = 0;
    for (int64_t j = 0; j < n; j++) sum += a[j] * b[j];
    return sum;
}

static inline REAL NAME(lane_sum)(NAME(vec) v) {
    REAL sum = 0;
    for (int64_t l = 0; l < LANES; l++) sum += v[l];
    return sum;
}

/* Some of the memory step's short loops over the N slots (128 elements each) are written out by
 * vectors, then a scalar tail: the usage update and its backward, the write weights, δσ(α) and
 * the keys' tanh backward. Left to the compiler each came with run-time checks of its arrays'
 * overlaps and a peeled epilogue that cost more than its work (the forward pass's usage update
 * took ~415 ticks per sequence-step, ~185 written out). The softmax and the cosine backward,
 * written out the same way, measured no faster, and stay the compiler's. */

/* out = factor · in over n elements */
static inline void NAME(scale)(REAL *out, const REAL *in, REAL factor, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) NAME(store)(out + i, factor * NAME(load)(in + i));
    for (; i < n; i++) out[i] = factor * in[i];
}

/* Σ a·b over n elements, and out = factor · a in the same pass */
static inline REAL NAME(dot_and_scale)(const REAL *a, const REAL *b, REAL *out, REAL factor,
                                        int64_t n) {
    NAME(vec) sums = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const NAME(vec) x = NAME(load)(a + i);
        sums += x * NAME(load)(b + i);
        NAME(store)(out + i, factor * x);
    }
    REAL sum = NAME(lane_sum)(sums);
    for (; i < n; i++) {
        sum += a[i] * b[i];
        out[i] = factor * a[i];
    }
    return sum;
}

/* The memory passes' hot loops run on blocks of LANES slots, one 32-byte vector each (NAME(vec),
 * vectors.h), doing all heads' work on a block while it is in a register instead of one pass
 * over the memory per head; the slots after the last whole block (none at N = 128) go through
 * the scalar loops that follow. The passes that keep per-head sums of a block in registers (the
 * three functions below) run by blocks where R is at most REGISTER_HEADS (the paper's 4), called
 * through WITH_LITERAL_HEADS so that the heads' count is a literal the compiler unrolls into
 * registers, and slot by slot for more heads. */
#define REGISTER_HEADS 4
#define WITH_LITERAL_HEADS(R, CALL)                                                               \
    switch (R) {                                                                                  \
    case 1: CALL(1); break;                                                                       \
    case 2: CALL(2); break;                                                                       \
    case 3: CALL(3); break;                                                                       \
    default: CALL(4);                                                                             \
    }

/* The write M(i) += Σ_g w^w_g(i) v_g, ‖M(i)‖² and k_g·M(i) for the block of slots at `memory`
 * (slot-minor rows N apart), for the G heads (a literal) whose keys are `keys` and written
 * vectors v `written` (W apart; ADD, a literal: 0 when v = k, which is then read once) and whose
 * weights and scores are N apart: the block's G + 1 sums stay in registers through all W
 * features, and the memory is read and written once. */
static inline __attribute__((always_inline)) void NAME(write_and_score_block)(
    REAL *memory, const REAL *write, const REAL *keys, const REAL *written, REAL *scores,
    REAL *slot_norms, int64_t N, int64_t W, const int G, const int ADD) {
    NAME(vec) weights[REGISTER_HEADS], score[REGISTER_HEADS], norm = {0};
    for (int g = 0; g < G; g++) {
        weights[g] = NAME(load)(write + g * N);
        score[g] = (NAME(vec)){0};
    }
    for (int64_t j = 0; j < W; j++) {
        REAL *row = memory + j * N, key[REGISTER_HEADS], value[REGISTER_HEADS];
        for (int g = 0; g < G; g++) { /* read once, before the store */
            key[g] = keys[g * W + j];
            value[g] = ADD ? written[g * W + j] : key[g];
        }
        NAME(vec) m = NAME(load)(row);
        for (int g = 0; g < G; g++) m += weights[g] * value[g];
        NAME(store)(row, m);
        norm += m * m;
        for (int g = 0; g < G; g++) score[g] += m * key[g];
    }
    NAME(store)(slot_norms, norm);
    for (int g = 0; g < G; g++) NAME(store)(scores + g * N, score[g]);
}

/* r_g(j) = Σ_i w^r_g(i) M(j, i) for ROWS features j (a literal, 1 or 2: rows N apart from
 * `row`) over slots [0, end) by blocks, for G heads (a literal; weights N apart, reads W apart):
 * the ROWS·G sums in registers. Two features at a time give each block's weights two uses per
 * load and twice the independent sums, where one feature's G sums, one addition each per block,
 * wait on the addition before (its latency, not the multiply-adds' rate, set the pace). */
static inline __attribute__((always_inline)) void NAME(read_blocks)(
    const REAL *row, const REAL *read, REAL *reads, int64_t N, int64_t W, int64_t end,
    const int ROWS, const int G) {
    NAME(vec) sum[2][REGISTER_HEADS];
    for (int k = 0; k < ROWS; k++)
        for (int g = 0; g < G; g++) sum[k][g] = (NAME(vec)){0};
    for (int64_t i = 0; i < end; i += LANES) {
        NAME(vec) m[2];
        for (int k = 0; k < ROWS; k++) m[k] = NAME(load)(row + k * N + i);
        for (int g = 0; g < G; g++) {
            const NAME(vec) weights = NAME(load)(read + g * N + i);
            for (int k = 0; k < ROWS; k++) sum[k][g] += weights * m[k];
        }
    }
    for (int k = 0; k < ROWS; k++)
        for (int g = 0; g < G; g++) reads[g * W + k] = NAME(lane_sum)(sum[k][g]);
}

/* The backward pass's sums down the features of BLOCKS blocks of slots (a literal, 1 or 2) of a
 * slot-minor matrix X (`x`, rows N apart), for G heads (a literal; factors W apart, sums N
 * apart): sums_g(i) += Σ_j f_g(j) X(j, i), the BLOCKS·G sums in registers, nothing stored per
 * feature: δw^r_g += δr_g·M(i) with X = M_t, δw^w_g += k_g·δM(i) with X = δM. Two blocks give each
 * broadcast factor two uses: with one, the G broadcasts and the vector's load per feature
 * outnumbered its G multiply-adds on the load ports (two per cycle). */
static inline __attribute__((always_inline)) void NAME(column_sums_blocks)(
    const REAL *x, const REAL *factors, REAL *sums, int64_t N, int64_t W, const int BLOCKS,
    const int G) {
    NAME(vec) sum[2][REGISTER_HEADS];
    for (int k = 0; k < BLOCKS; k++)
        for (int g = 0; g < G; g++) sum[k][g] = (NAME(vec)){0};
    for (int64_t j = 0; j < W; j++) {
        NAME(vec) column[2];
        for (int k = 0; k < BLOCKS; k++) column[k] = NAME(load)(x + j * N + k * LANES);
        for (int g = 0; g < G; g++) {
            const REAL factor = factors[g * W + j];
            for (int k = 0; k < BLOCKS; k++) sum[k][g] += factor * column[k];
        }
    }
    for (int k = 0; k < BLOCKS; k++)
        for (int g = 0; g < G; g++) {
            REAL *to = sums + g * N + k * LANES;
            NAME(store)(to, NAME(load)(to) + sum[k][g]);
        }
}

/* The rest of the backward pass for one feature j of the memory (`row`, `grad_row`: M_t(j) and
 * the carried δM(j)), slots [0, end) by blocks, G heads (a literal; `grad_reads`, `keys`,
 * `written`: δr_g(j), k_g(j) and v_g(j), W apart; the slots' vectors N apart): δM_t's whole
 * gradient
 *     δM(i) + s(i) M(i) + Σ_g w^r_g(i) δr_g(j) + Σ_g δdot_g(i) k_g(j)
 * (s: the slot's scale from its norm) replaces δM, the write is undone, M(i) −= Σ_g w^w_g(i)
 * v_g(j), δk_g(j) += Σ_i δdot_g(i) M(i) and δv_g(j) += Σ_i w^w_g(i) δM_t(i), the sums in
 * registers. Where v = k (ADD = 0, a literal) one sum per head takes both terms, which with
 * the 2G broadcast factors fits AVX2's 16 registers (a sum per term did not, and spilled to the
 * stack in the loop); with an add vector (ADD = 1) each has its own. */
static inline __attribute__((always_inline)) void NAME(feature_row_blocks)(
    REAL *row, REAL *grad_row, const REAL *slot_scale, const REAL *read, const REAL *grad_dots,
    const REAL *write, const REAL *grad_reads, const REAL *keys, const REAL *written,
    REAL *grad_keys, REAL *grad_written, int64_t N, int64_t W, int64_t end, const int G,
    const int ADD) {
    NAME(vec) sums[REGISTER_HEADS], written_sums[REGISTER_HEADS];
    REAL grad_read[REGISTER_HEADS], key[REGISTER_HEADS], value[REGISTER_HEADS];
    for (int g = 0; g < G; g++) {
        sums[g] = (NAME(vec)){0};
        written_sums[g] = (NAME(vec)){0};
        grad_read[g] = grad_reads[g * W];
        key[g] = keys[g * W];
        value[g] = ADD ? written[g * W] : key[g];
    }
    for (int64_t i = 0; i < end; i += LANES) {
        NAME(vec) m = NAME(load)(row + i);
        NAME(vec) grad_m = NAME(load)(grad_row + i) + NAME(load)(slot_scale + i) * m;
        for (int g = 0; g < G; g++) {
            const NAME(vec) grad_dot = NAME(load)(grad_dots + g * N + i);
            grad_m += NAME(load)(read + g * N + i) * grad_read[g] + grad_dot * key[g];
            sums[g] += grad_dot * m;
        }
        for (int g = 0; g < G; g++) {
            const NAME(vec) weights = NAME(load)(write + g * N + i);
            if (ADD)
                written_sums[g] += weights * grad_m;
            else
                sums[g] += weights * grad_m;
            m -= weights * value[g];
        }
        NAME(store)(grad_row + i, grad_m);
        NAME(store)(row + i, m);
    }
    for (int g = 0; g < G; g++) {
        grad_keys[g * W] += NAME(lane_sum)(sums[g]);
        if (ADD) grad_written[g * W] += NAME(lane_sum)(written_sums[g]);
    }
}

/* δw^w's terms that need no pass over the memory (see memory_backward_step), for slots [0, end)
 * by blocks and G heads (a literal; the (R, N) arrays' rows N apart, the (R, R) products'
 * [h][g] at h·G + g): δw^w_g(i) += s(i) v_g·M_t(i) + Σ_h w^r_h(i) δr_h·v_g + δdot_h(i) k_h·v_g
 * (v the written vectors; `scores` v_g·M_t(i)), each δw^w_g read and written once per block
 * instead of once per term. */
static inline __attribute__((always_inline)) void NAME(write_terms_blocks)(
    REAL *grad_write, const REAL *slot_scale, const REAL *scores, const REAL *read,
    const REAL *grad_dots, const REAL *read_key_products, const REAL *key_products, int64_t N,
    int64_t end, const int G) {
    for (int g = 0; g < G; g++) {
        REAL by_read[REGISTER_HEADS], by_key[REGISTER_HEADS];
        for (int h = 0; h < G; h++) {
            by_read[h] = read_key_products[h * G + g];
            by_key[h] = key_products[h * G + g];
        }
        for (int64_t i = 0; i < end; i += LANES) {
            NAME(vec) sum = NAME(load)(grad_write + g * N + i);
            sum += NAME(load)(slot_scale + i) * NAME(load)(scores + g * N + i);
            for (int h = 0; h < G; h++)
                sum += NAME(load)(read + h * N + i) * by_read[h] +
                       NAME(load)(grad_dots + h * N + i) * by_key[h];
            NAME(store)(grad_write + g * N + i, sum);
        }
    }
}

/* c = f ⊙ c_before + i ⊙ g, tanh(c) and h = o ⊙ tanh(c) from the activated gates [i, f, g, o]
 * (`gates`, 4H). A function of its own for the restrict pointers (on local variables GCC ignored
 * them), without which GCC gave up vectorising the loop for the run-time checks of its five
 * arrays' overlaps. */
static void NAME(cell_update)(const REAL *restrict gates, const REAL *restrict c_before,
                              REAL *restrict c, REAL *restrict tanh_c, REAL *restrict h,
                              int64_t H) {
    for (int64_t k = 0; k < H; k++) {
        c[k] = gates[H + k] * c_before[k] + gates[k] * gates[2 * H + k];
        tanh_c[k] = NAME(tanh_)(c[k]);
        h[k] = gates[3 * H + k] * tanh_c[k];
    }
}

/* cell_update's backward: from δh (`grad_h`) and the carried δc (`grad_c`, replaced by δc of
 * c_before), the pre-activations' δ (`grad_gates`, 4H) through the activated gates [i, f, g, o]
 * (`gates`) and tanh(c) (`tanh_c`). restrict, as in cell_update, so that the loop vectorises. */
static void NAME(cell_backward)(const REAL *restrict gates, const REAL *restrict c_before,
                                const REAL *restrict tanh_c, const REAL *restrict grad_h,
                                REAL *restrict grad_c, REAL *restrict grad_gates, int64_t H) {
    for (int64_t k = 0; k < H; k++) {
        const REAL i = gates[k], f = gates[H + k], cand = gates[2 * H + k], o = gates[3 * H + k];
        const REAL tc = tanh_c[k];
        const REAL dc = grad_c[k] + grad_h[k] * o * ((REAL)1 - tc * tc);
        grad_gates[k] = dc * cand * i * ((REAL)1 - i);
        grad_gates[H + k] = dc * c_before[k] * f * ((REAL)1 - f);
        grad_gates[2 * H + k] = dc * i * ((REAL)1 - cand * cand);
        grad_gates[3 * H + k] = grad_h[k] * tc * o * ((REAL)1 - o);
        grad_c[k] = dc * f;
    }
}

/* nn.LSTMCell's update from the pre-activations (gates ordered i, f, g, o). */
static void NAME(controller_forward_step)(const NAME(LRUNTMBuffers) *p, int64_t t) {
    const int64_t B = p->batch, H = p->hidden, Z = p->heads * p->width + H;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        REAL *a = p->gates + (t * B + b) * 4 * H;
        for (int64_t k = 0; k < 2 * H; k++) a[k] = NAME(sigmoid)(a[k]);
        for (int64_t k = 2 * H; k < 3 * H; k++) a[k] = NAME(tanh_)(a[k]);
        for (int64_t k = 3 * H; k < 4 * H; k++) a[k] = NAME(sigmoid)(a[k]);
        REAL *h = p->z + ((t + 1) * B + b) * Z;
        NAME(cell_update)(a, p->cells + (t * B + b) * H, p->cells + ((t + 1) * B + b) * H,
                          p->tanh_c + (t * B + b) * H, h, H);
    }
}

/* The R smallest usages, least first, ties to the lower slot (a stable sort's order): one pass
 * keeping the smallest so far in order, a slot entering only below the largest of them. */
static void NAME(least_used_slots)(const REAL *usage, int64_t slots, int64_t count,
                                   int64_t *chosen) {
    int64_t kept = 0;
    for (int64_t i = 0; i < slots; i++) {
        if (kept == count && !(usage[i] < usage[chosen[count - 1]])) continue;
        int64_t n = kept < count ? kept++ : count - 1;
        for (; n > 0 && usage[i] < usage[chosen[n - 1]]; n--) chosen[n] = chosen[n - 1];
        chosen[n] = i;
    }
}

/* Keys and gates from the head layer, the LRU write, the content reads and the usage.
 *
 * The memory is slot-minor, (W, N) per sequence: a vector holds one feature of LANES slots, so
 * the write, the slot norms and the keys' dot products are one pass over the memory with no
 * horizontal sums (slot-major rows of W = 40 would need one per slot and head). */
static void NAME(memory_forward_step)(const NAME(LRUNTMBuffers) *p, int64_t t) {
    const int64_t B = p->batch, R = p->heads, N = p->slots, W = p->width;
    const int64_t Z = R * W + p->hidden, E = NAME(head_size)(p);
    const REAL gamma = (REAL)p->usage_decay;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const int64_t tb = t * B + b, next = (t + 1) * B + b;
        REAL *keys = p->head + tb * E, *mix = keys + E - R; /* k, (a,) σ(α) */
        const REAL *written = p->add_vector ? keys + R * W : keys; /* what the heads write */
        const REAL *usage = p->usage + tb * N, *read_before = p->read_weights + tb * R * N;
        REAL *memory = p->memory + b * W * N, *reads = p->z + next * Z + p->hidden;
        REAL *cleared = p->cleared + tb * W;
        REAL *write = p->write_weights + tb * R * N, *read = p->read_weights + next * R * N;
        REAL *usage_after = p->usage + next * N;
        REAL *key_norms = p->key_norms + tb * R, *slot_norms = p->slot_norms + tb * N;
        REAL *scores = p->scores + tb * R * N;
        int64_t *least = p->least_used + tb * R;
        if (t == 0) NAME(start_from)(memory, p->initial_memory, b * W * N, W * N);
        for (int64_t j = 0; j < E - R; j++) keys[j] = NAME(tanh_)(keys[j]); /* k (and a) */
        for (int64_t r = 0; r < R; r++) mix[r] = NAME(sigmoid)(mix[r]);
        NAME(least_used_slots)(usage, N, R, least);
        /* w^w = σ(α) w^r_{t-1} + (1 − σ(α)) w^lu_{t-1} */
        for (int64_t r = 0; r < R; r++) {
            NAME(scale)(write + r * N, read_before + r * N, mix[r], N);
            for (int64_t n = 0; n < R; n++) write[r * N + least[n]] += (REAL)1 - mix[r];
        }
        for (int64_t j = 0; j < W; j++) { /* the least-used slot is cleared */
            cleared[j] = memory[j * N + least[0]];
            memory[j * N + least[0]] = 0;
        }
        /* M_t = M_{t-1} + Σ_r w^w_r v_rᵀ (v = k, or a); with ‖M_t(i)‖² and k_r·M_t(i) (the latter
         * kept for the backward pass) in the same pass: by blocks of slots, then slot by slot */
        const int64_t blocks_end = R <= REGISTER_HEADS ? N - N % LANES : 0;
        for (int64_t i = 0; i < blocks_end; i += LANES) {
#define BLOCK(G, ADD)                                                                             \
    NAME(write_and_score_block)(memory + i, write + i, keys, written, scores + i, slot_norms + i, \
                                N, W, G, ADD)
#define KEY_BLOCK(G) BLOCK(G, 0)
#define ADD_BLOCK(G) BLOCK(G, 1)
            if (p->add_vector)
                WITH_LITERAL_HEADS(R, ADD_BLOCK)
            else
                WITH_LITERAL_HEADS(R, KEY_BLOCK)
#undef BLOCK
#undef KEY_BLOCK
#undef ADD_BLOCK
        }
        for (int64_t i = blocks_end; i < N; i++) slot_norms[i] = 0;
        for (int64_t r = 0; r < R; r++)
            for (int64_t i = blocks_end; i < N; i++) scores[r * N + i] = 0;
        for (int64_t j = 0; j < W; j++) {
            REAL *row = memory + j * N;
            for (int64_t r = 0; r < R; r++) {
                const REAL value = written[r * W + j];
                const REAL *weights = write + r * N;
                for (int64_t i = blocks_end; i < N; i++) row[i] += weights[i] * value;
            }
            for (int64_t i = blocks_end; i < N; i++) slot_norms[i] += row[i] * row[i];
            for (int64_t r = 0; r < R; r++) {
                const REAL key = keys[r * W + j];
                REAL *dots = scores + r * N;
                for (int64_t i = blocks_end; i < N; i++) dots[i] += key * row[i];
            }
        }
        for (int64_t i = 0; i < N; i++) slot_norms[i] = sqrt(slot_norms[i]);
        for (int64_t r = 0; r < R; r++)
            key_norms[r] = sqrt(NAME(dot)(keys + r * W, keys + r * W, W));
        /* w^r = softmax_i K(k_r, M(i)), K = k·M(i) / (‖k‖ ‖M(i)‖ + ε): a cosine, in [−1, 1], so
         * exp(K) needs no shift by the largest K to stay finite */
        for (int64_t r = 0; r < R; r++) {
            REAL *weights = read + r * N, total = 0;
            for (int64_t i = 0; i < N; i++) {
                const REAL denominator = key_norms[r] * slot_norms[i] + (REAL)COSINE_EPS;
                total += weights[i] = NAME(exp_cosine)(scores[r * N + i] / denominator);
            }
            const REAL scale = (REAL)1 / total;
            for (int64_t i = 0; i < N; i++) weights[i] *= scale;
        }
        /* r_t = Σ_i w^r(i) M(i): two features at a time, by blocks of slots (the heads' sums in
         * registers), then slot by slot */
        for (int64_t r = 0; r < R; r++)
            for (int64_t j = 0; j < W; j++) reads[r * W + j] = 0;
        for (int64_t j = 0; j < W; j += 2) {
            const REAL *row = memory + j * N;
            const int64_t rows = W - j < 2 ? W - j : 2;
            if (b + 1 < B) /* the next sequence's memory, which its first pass takes by columns */
                for (int64_t offset = 0; offset < rows * N; offset += 64 / sizeof(REAL))
                    __builtin_prefetch(row + W * N + offset);
#define TWO_ROWS(G) NAME(read_blocks)(row, read, reads + j, N, W, blocks_end, 2, G)
#define ONE_ROW(G) NAME(read_blocks)(row, read, reads + j, N, W, blocks_end, 1, G)
            if (blocks_end > 0 && rows == 2) WITH_LITERAL_HEADS(R, TWO_ROWS)
            if (blocks_end > 0 && rows == 1) WITH_LITERAL_HEADS(R, ONE_ROW)
#undef TWO_ROWS
#undef ONE_ROW
            for (int64_t k = 0; k < rows; k++)
                for (int64_t r = 0; r < R; r++)
                    for (int64_t i = blocks_end; i < N; i++)
                        reads[r * W + j + k] += read[r * N + i] * row[k * N + i];
        }
        /* w^u_t = γ w^u_{t-1} + Σ_r w^r_t + Σ_r w^w_t */
        const int64_t vectors_end = N - N % LANES;
        for (int64_t i = 0; i < vectors_end; i += LANES) {
            NAME(vec) sum = gamma * NAME(load)(usage + i);
            for (int64_t r = 0; r < R; r++)
                sum += NAME(load)(read + r * N + i) + NAME(load)(write + r * N + i);
            NAME(store)(usage_after + i, sum);
        }
        for (int64_t i = vectors_end; i < N; i++) {
            REAL sum = gamma * usage[i];
            for (int64_t r = 0; r < R; r++) sum += read[r * N + i] + write[r * N + i];
            usage_after[i] = sum;
        }
    }
}

/* One head's softmax and cosine backward over the N slots, from its read weights w^r, their
 * gradient δw^r and inner = Σ_i w^r(i) δw^r(i): δK(i) = w^r(i) (δw^r(i) − inner) through the
 * softmax, then K = dot / D, D = ‖k‖ ‖M(i)‖ + ε: δdot = δK / D into grad_dots, and
 * δD = −δK dot / D², whose share of δ‖M(i)‖ is added to slot_scale; returns δ‖k‖. (restrict:
 * the outputs overlap nothing else, so the compiler vectorises the loop.) */
static REAL NAME(cosine_backward)(int64_t N, const REAL *restrict weights,
                                  const REAL *restrict grad_weights, REAL inner,
                                  const REAL *restrict dot, REAL key_norm,
                                  const REAL *restrict slot_norms, REAL *restrict grad_dots,
                                  REAL *restrict slot_scale) {
    REAL grad_key_norm = 0;
    for (int64_t i = 0; i < N; i++) {
        const REAL reciprocal = (REAL)1 / (key_norm * slot_norms[i] + (REAL)COSINE_EPS);
        const REAL grad_score = weights[i] * (grad_weights[i] - inner); /* δK */
        const REAL grad_denominator = -grad_score * dot[i] * reciprocal * reciprocal;
        grad_dots[i] = grad_score * reciprocal;
        grad_key_norm += grad_denominator * slot_norms[i];
        slot_scale[i] += grad_denominator * key_norm;
    }
    return grad_key_norm;
}

/* Step t of the memory backward: from the carried δM_{t+1} (slot-minor, as the memory),
 * δw^r_{t+1}, δw^u_{t+1} and the reads' δr_t (grad_z[t+1]), δ[k̃, α]_t into grad_head[t], and
 * the carried gradients of the state before the step in place. `first`: the pass's first step
 * (t = T − 1), where each sequence's memory and δM start from final_memory and
 * final_grad_memory. `scratch`: backward_scratch_size REALs per thread of the region.
 *
 * Two passes over the memory, neither storing anything per head and slot as it goes (stores,
 * one per vector and cycle, bounded the passes that did): sums down each slot's features (δw^r
 * from the reads, and the carried δM's share of δw^w), then, after the softmax's and cosine's
 * backward, one along each feature (δM_t complete, δk and δa, the write undone). The write's
 * δw^w_g(i) = Σ_j δM_t(j, i) v_g(j) (v_g what head g writes: k_g, or a_g), with δM_t = δM +
 * s(i) M_t(i) + Σ_h w^r_h(i) δr_h + Σ_h δdot_h(i) k_h the complete gradient of M_t(i) (s: the
 * scale of M(i) from its norm), is taken apart so that only its first term needs the memory:
 *     δw^w_g(i) = Σ_j δM(j, i) v_g(j) + s(i) v_g·M_t(i)
 *                 + Σ_h w^r_h(i) δr_h·v_g + δdot_h(i) k_h·v_g,
 * where k_g·M_t(i) is the forward pass's score, and a_g·M_t(i) a third sum of the first pass. */
static void NAME(memory_backward_step)(const NAME(LRUNTMBuffers) *p, int64_t t, int first,
                                       REAL *scratch) {
    const int64_t B = p->batch, R = p->heads, N = p->slots, W = p->width;
    const int64_t Z = R * W + p->hidden, E = NAME(head_size)(p);
    const REAL gamma = (REAL)p->usage_decay;
    const int add = p->add_vector != 0;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        REAL *grad_write = scratch + THREAD_INDEX * NAME(backward_scratch_size)(p);
        REAL *grad_dots = grad_write + R * N;                              /* (R, N) each */
        REAL *slot_scale = grad_dots + R * N, *grad_keys = slot_scale + N; /* (N), (R, W) */
        REAL *key_scale = grad_keys + R * W, *grad_mix = key_scale + R;    /* (R), (R) */
        REAL *key_products = grad_mix + R;          /* k_h·v_g, (R, R) */
        REAL *read_key_products = key_products + R * R; /* δr_h·v_g, (R, R) */
        REAL *grad_adds = read_key_products + R * R;    /* δa, (R, W) */
        REAL *add_scores = grad_adds + R * W;           /* a_g·M_t(i), (R, N) */
        const int64_t tb = t * B + b, next = (t + 1) * B + b;
        const REAL *keys = p->head + tb * E, *mix = keys + E - R;
        const REAL *written = add ? keys + R * W : keys; /* v, what the heads wrote */
        REAL *grad_written = add ? grad_adds : grad_keys; /* δv */
        REAL *memory = p->memory + b * W * N; /* M_t here, M_{t-1} when the step is undone */
        const REAL *read = p->read_weights + next * R * N, *cleared = p->cleared + tb * W;
        const REAL *read_before = p->read_weights + tb * R * N;
        const REAL *write = p->write_weights + tb * R * N;
        const REAL *key_norms = p->key_norms + tb * R, *slot_norms = p->slot_norms + tb * N;
        const REAL *dots = p->scores + tb * R * N;
        const int64_t *least = p->least_used + tb * R;
        const REAL *grad_reads = p->grad_z + next * Z + p->hidden;
        REAL *grad_memory = p->grad_memory + b * W * N;
        REAL *grad_read = p->grad_read_weights + b * R * N, *grad_usage = p->grad_usage + b * N;
        REAL *grad_head = p->grad_head + tb * E;
        if (first) { /* the pass's first step: M_T and δM_T */
            NAME(start_from)(memory, p->final_memory, b * W * N, W * N);
            NAME(start_from)(grad_memory, p->final_grad_memory, b * W * N, W * N);
        }
        /* a slot the forward pass left at 0 is 0, not the rounding error of the undone writes,
         * which the cosine's gradient there (δdot = δK / ε) would multiply by 1e8 */
        int64_t zero_slots = 0; /* all but R at the first step, rarely any later */
        for (int64_t i = 0; i < N; i++) zero_slots += slot_norms[i] == 0;
        for (int64_t j = 0; zero_slots > 0 && j < W; j++) { /* along the rows: vector blends */
            REAL *row = memory + j * N;
            for (int64_t i = 0; i < N; i++) row[i] = slot_norms[i] == 0 ? (REAL)0 : row[i];
        }
        /* usage: δw^r += δw^u, δw^w = δw^u */
        const int64_t vectors_end = N - N % LANES;
        for (int64_t i = 0; i < vectors_end; i += LANES) {
            const NAME(vec) grad = NAME(load)(grad_usage + i);
            for (int64_t r = 0; r < R; r++) {
                NAME(store)(grad_write + r * N + i, grad);
                NAME(store)(grad_read + r * N + i, NAME(load)(grad_read + r * N + i) + grad);
            }
        }
        for (int64_t i = vectors_end; i < N; i++)
            for (int64_t r = 0; r < R; r++) {
                grad_write[r * N + i] = grad_usage[i];
                grad_read[r * N + i] += grad_usage[i];
            }
        /* down each slot's features: δw^r_r(i) += δr_r·M(i), δw^w_r(i) += v_r·δM(i) (and with an
         * add vector a_r·M_t(i)); by blocks of slots, up to REGISTER_HEADS heads at a time (each
         * head's sums are its own), then slot by slot */
        if (add)
            for (int64_t i = 0; i < R * N; i++) add_scores[i] = 0;
        for (int64_t first = 0; first < R; first += REGISTER_HEADS) {
            const int64_t heads = R - first < REGISTER_HEADS ? R - first : REGISTER_HEADS;
#define SUMS(BLOCKS, G)                                                                           \
    NAME(column_sums_blocks)(memory + i, grad_reads + first * W, grad_read + first * N + i, N, W, \
                             BLOCKS, G);                                                          \
    NAME(column_sums_blocks)(grad_memory + i, written + first * W, grad_write + first * N + i, N, \
                             W, BLOCKS, G);                                                       \
    if (add)                                                                                      \
    NAME(column_sums_blocks)(memory + i, written + first * W, add_scores + first * N + i, N, W,   \
                             BLOCKS, G)
#define PAIR_SUMS(G) SUMS(2, G)
#define BLOCK_SUMS(G) SUMS(1, G)
            int64_t i = 0;
            for (; i + 2 * LANES <= vectors_end; i += 2 * LANES)
                WITH_LITERAL_HEADS(heads, PAIR_SUMS)
            if (i < vectors_end) WITH_LITERAL_HEADS(heads, BLOCK_SUMS) /* an odd one out */
#undef SUMS
#undef PAIR_SUMS
#undef BLOCK_SUMS
        }
        for (int64_t j = 0; j < W; j++) {
            const REAL *row = memory + j * N, *grad_row = grad_memory + j * N;
            for (int64_t r = 0; r < R; r++) {
                const REAL grad = grad_reads[r * W + j], value = written[r * W + j];
                REAL *grad_weights = grad_read + r * N, *grad_writes = grad_write + r * N;
                for (int64_t i = vectors_end; i < N; i++) {
                    grad_weights[i] += grad * row[i];
                    grad_writes[i] += value * grad_row[i];
                    if (add) add_scores[r * N + i] += value * row[i];
                }
            }
        }
        /* the softmax's and the cosine's backward, head by head: δdot, and δ‖k‖ and δ‖M(i)‖
         * kept as the scales of k and M(i) */
        for (int64_t i = 0; i < N; i++) slot_scale[i] = 0;
        for (int64_t r = 0; r < R; r++) {
            const REAL *weights = read + r * N, *grad_weights = grad_read + r * N;
            const REAL inner = NAME(dot)(weights, grad_weights, N);
            const REAL grad_key_norm =
                NAME(cosine_backward)(N, weights, grad_weights, inner, dots + r * N, key_norms[r],
                                      slot_norms, grad_dots + r * N, slot_scale);
            /* ∂‖k‖/∂k = k/‖k‖, and 0 at k = 0 (autograd's norm) */
            key_scale[r] = key_norms[r] > 0 ? grad_key_norm / key_norms[r] : 0;
        }
        for (int64_t i = 0; i < N; i++) /* the same for a cleared slot, ‖M(i)‖ = 0 */
            slot_scale[i] = slot_norms[i] > 0 ? slot_scale[i] / slot_norms[i] : 0;
        /* δw^w's terms that need no pass over the memory (see above) */
        for (int64_t h = 0; h < R; h++)
            for (int64_t g = 0; g < R; g++) {
                key_products[h * R + g] = NAME(dot)(keys + h * W, written + g * W, W);
                read_key_products[h * R + g] = NAME(dot)(grad_reads + h * W, written + g * W, W);
            }
        const REAL *written_scores = add ? add_scores : dots; /* v_g·M_t(i) */
        const int64_t blocks_end = R <= REGISTER_HEADS ? vectors_end : 0; /* all heads at once */
#define TERMS(G)                                                                                  \
    NAME(write_terms_blocks)(grad_write, slot_scale, written_scores, read, grad_dots,             \
                             read_key_products, key_products, N, blocks_end, G)
        if (blocks_end > 0) WITH_LITERAL_HEADS(R, TERMS)
#undef TERMS
        for (int64_t g = 0; g < R; g++) {
            REAL *restrict grad_writes = grad_write + g * N;
            const REAL *restrict score = written_scores + g * N;
            for (int64_t i = blocks_end; i < N; i++) grad_writes[i] += slot_scale[i] * score[i];
            for (int64_t h = 0; h < R; h++) {
                const REAL *restrict weights = read + h * N, *restrict grad_dot = grad_dots + h * N;
                const REAL by_read = read_key_products[h * R + g], by_key = key_products[h * R + g];
                for (int64_t i = blocks_end; i < N; i++)
                    grad_writes[i] += weights[i] * by_read + grad_dot[i] * by_key;
            }
        }
        /* along each feature: δM_t complete into δM, δk_r += Σ_i δdot_r(i) M(i), δv_r += Σ_i
         * w^w_r(i) δM_t(i), the write undone (M_{t-1} = M_t − Σ_r w^w_r v_rᵀ, the cleared slot put
         * back) and the cleared slot's δ set to 0; by blocks of slots, then slot by slot */
        for (int64_t r = 0; r < R; r++)
            for (int64_t j = 0; j < W; j++) grad_keys[r * W + j] = key_scale[r] * keys[r * W + j];
        if (add)
            for (int64_t j = 0; j < R * W; j++) grad_adds[j] = 0;
        for (int64_t j = 0; j < W; j++) {
            REAL *row = memory + j * N, *grad_row = grad_memory + j * N;
            if (b + 1 < B) /* the next sequence's memory and δM, which its first pass takes by
                            * columns, a pattern the hardware's prefetcher does not follow */
                for (int64_t offset = 0; offset < N; offset += 64 / sizeof(REAL)) {
                    __builtin_prefetch(row + W * N + offset);
                    __builtin_prefetch(grad_row + W * N + offset);
                }
#define ROW(G, ADD)                                                                               \
    NAME(feature_row_blocks)(row, grad_row, slot_scale, read, grad_dots, write, grad_reads + j,   \
                             keys + j, written + j, grad_keys + j, grad_written + j, N, W,        \
                             blocks_end, G, ADD)
#define KEY_ROW(G) ROW(G, 0)
#define ADD_ROW(G) ROW(G, 1)
            if (blocks_end > 0 && add) WITH_LITERAL_HEADS(R, ADD_ROW)
            if (blocks_end > 0 && !add) WITH_LITERAL_HEADS(R, KEY_ROW)
#undef ROW
#undef KEY_ROW
#undef ADD_ROW
            for (int64_t i = blocks_end; i < N; i++) {
                REAL m = row[i], grad_m = grad_row[i] + slot_scale[i] * m;
                for (int64_t r = 0; r < R; r++)
                    grad_m += read[r * N + i] * grad_reads[r * W + j] +
                              grad_dots[r * N + i] * keys[r * W + j];
                for (int64_t r = 0; r < R; r++) {
                    const REAL weights = write[r * N + i];
                    grad_keys[r * W + j] += grad_dots[r * N + i] * row[i];
                    grad_written[r * W + j] += weights * grad_m;
                    m -= weights * written[r * W + j];
                }
                grad_row[i] = grad_m;
                row[i] = m;
            }
            grad_row[least[0]] = 0;
            row[least[0]] = cleared[j];
        }
        /* w^w = σ(α) w^r_{t-1} + (1 − σ(α)) w^lu: δσ(α), and δw^r_{t-1} replaces δw^r_t */
        for (int64_t r = 0; r < R; r++) {
            REAL sum = NAME(dot_and_scale)(grad_write + r * N, read_before + r * N,
                                           grad_read + r * N, mix[r], N);
            for (int64_t n = 0; n < R; n++) sum -= grad_write[r * N + least[n]];
            grad_mix[r] = sum;
        }
        NAME(scale)(grad_usage, grad_usage, gamma, N);
        /* through the tanh of k, and of a, which follows k in the head */
        for (int64_t part = 0; part < (add ? 2 : 1); part++) {
            const REAL *values = keys + part * R * W, *grads = part ? grad_adds : grad_keys;
            REAL *to = grad_head + part * R * W;
            const int64_t values_end = R * W - R * W % LANES;
            for (int64_t j = 0; j < values_end; j += LANES) {
                const NAME(vec) value = NAME(load)(values + j);
                NAME(store)(to + j, NAME(load)(grads + j) * ((REAL)1 - value * value));
            }
            for (int64_t j = values_end; j < R * W; j++)
                to[j] = grads[j] * ((REAL)1 - values[j] * values[j]);
        }
        for (int64_t r = 0; r < R; r++)
            grad_head[E - R + r] = grad_mix[r] * mix[r] * ((REAL)1 - mix[r]);
    }
}

/* Step t of the controller backward: δh_t (grad_z[t+1]'s h part, the head product's added) and
 * the carried δc into the pre-activations' δ (grad_gates[t]) and δc_{t-1} in place. */
static void NAME(controller_backward_step)(const NAME(LRUNTMBuffers) *p, int64_t t) {
    const int64_t B = p->batch, H = p->hidden, Z = p->heads * p->width + H;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const int64_t tb = t * B + b;
        NAME(cell_backward)(p->gates + tb * 4 * H, p->cells + tb * H, p->tanh_c + tb * H,
                            p->grad_z + (tb + B) * Z, p->grad_c + b * H,
                            p->grad_gates + tb * 4 * H, H);
    }
}

/* The forward pass over `steps` steps: per step t,
 *     gates_t = u_t + z_t W_recᵀ,  the controller step (h_{t+1} into z_{t+1}),
 *     head_t = b_head + h_{t+1} W_headᵀ,  the memory step (r_t into z_{t+1})
 * (gates_0 = u_0 from a zero start). One parallel region for the whole loop; a barrier wherever
 * a part reads what the part before wrote on another thread (a step's worksharing loop ends in
 * one). Returns 0, or −1 if the packed weights cannot be allocated (and then computes nothing).
 */
int NAME(lru_ntm_forward)(const NAME(LRUNTMBuffers) *p, int64_t steps) {
    const int64_t B = p->batch, H = p->hidden, RW = p->heads * p->width;
    const int64_t G = 4 * H, Z = RW + H, E = NAME(head_size)(p);
    const int64_t recurrent_size = NAME(packed_size)(Z, G);
    REAL *recurrent = NAME(packed_alloc)(recurrent_size + NAME(packed_size)(H, E));
    if (recurrent == NULL) return -1;
    REAL *head = recurrent + recurrent_size; /* in the same block */
#pragma omp parallel num_threads(p->threads)
    {
        NAME(pack_panels)(p->recurrent_weights, Z, G, 1, Z, recurrent); /* W_recᵀ */
        NAME(pack_panels)(p->head_weights, H, E, 1, H, head);           /* W_headᵀ */
        for (int64_t t = 0; t < steps; t++) {
            const int64_t depth = t == 0 && p->zero_start ? 0 : Z; /* 0: gates_0 = u_0 */
            NAME(product)(p->z + t * B * Z, Z, B, depth, recurrent, G, p->gates + t * B * G, G,
                          p->input_part + t * B * G, G);
#pragma omp barrier
            NAME(controller_forward_step)(p, t);
            NAME(product)(p->z + (t + 1) * B * Z, Z, B, H, head, E, p->head + t * B * E, E,
                          p->head_bias, 0);
#pragma omp barrier
            NAME(memory_forward_step)(p, t);
        }
    }
    free(recurrent); /* and what follows it in the block */
    return 0;
}

/* The backward pass over `steps` steps, from the outputs' δ in grad_z and the final state's in
 * the carried gradients: per step t in reverse, the memory step's backward (δ[k̃, α]_t),
 *     δh_{t+1} += δ[k̃, α]_t W_head,  the controller step's backward (δgates_t),
 *     δz_t += δgates_t W_rec
 * (δz_t = δ[h_{t−1}, r_{t−1}]; δz_0 only where start_gradient asks for it). Returns 0, or −1
 * if the packed weights and the threads' scratch cannot be allocated. */
int NAME(lru_ntm_backward)(const NAME(LRUNTMBuffers) *p, int64_t steps) {
    const int64_t B = p->batch, H = p->hidden, RW = p->heads * p->width;
    const int64_t G = 4 * H, Z = RW + H, E = NAME(head_size)(p);
    const int64_t recurrent_size = NAME(packed_size)(G, Z), head_size = NAME(packed_size)(E, H);
    const int64_t scratch_size = p->threads * NAME(backward_scratch_size)(p);
    REAL *recurrent = NAME(packed_alloc)(recurrent_size + head_size + scratch_size);
    if (recurrent == NULL) return -1;
    REAL *head = recurrent + recurrent_size, *scratch = head + head_size; /* the same block */
#pragma omp parallel num_threads(p->threads)
    {
        NAME(pack_panels)(p->recurrent_weights, G, Z, Z, 1, recurrent); /* W_rec */
        NAME(pack_panels)(p->head_weights, E, H, H, 1, head);           /* W_head */
        for (int64_t t = steps - 1; t >= 0; t--) {
            NAME(memory_backward_step)(p, t, t == steps - 1, scratch);
            REAL *grad_h = p->grad_z + (t + 1) * B * Z;
            NAME(product)(p->grad_head + t * B * E, E, B, E, head, H, grad_h, Z, grad_h, Z);
#pragma omp barrier
            NAME(controller_backward_step)(p, t);
            REAL *grad_z = p->grad_z + t * B * Z;
            if (t > 0 || p->start_gradient)
                NAME(product)(p->grad_gates + t * B * G, G, B, G, recurrent, Z, grad_z, Z, grad_z,
                              Z);
#pragma omp barrier
        }
    }
    free(recurrent); /* and what follows it in the block */
    return 0;
}
