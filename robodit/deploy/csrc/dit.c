/* The DiT's whole denoising loop in one C call: the `--format native` runtime of `robodit export`.

   Why it exists: at batch 1 a small DiT's chunk is ~700 tiny operators, and every graph runtime spends ~2 us
   dispatching each one, more than the arithmetic (dit/tiny: 716 ONNX nodes, 0.05 ms of GEMM per step). Here a
   step is straight-line code over one workspace: no dispatch, no allocation, no shape checks.

   It computes what `DiTPolicy.denoise` computes on its inference fast path (`AdaLNZeroBlock.infer`,
   `AdaLNFinal.infer`) inside DDPM's DDIM loop (`DDPMFormulation._ddim`, the (a, b, c, d, e) step table),
   then un-normalises the actions. The condition (observation tokens -> each block's cross-attention K/V) is
   computed once per chunk outside (an ONNX graph) and passed in. Parameters come as one float buffer and a
   table of offsets (-1 = absent), laid out by robodit/deploy/native.py; GEMM weights [in x out], packed
   in column groups (`gemm_any`).

   The GEMM micro-kernel uses AVX2/FMA where the compiler targets them (-march=native), portable C elsewhere. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ROBODIT_AVX2 1
#else
#define ROBODIT_AVX2 0
#endif

/* integer dims (then, when the condition runs here, one state width per observation key) */
enum { D_TOKENS, D_WIDTH, D_HEADS, D_DEPTH, D_ACTION, D_STEPS, D_CTX, D_HIDDEN, D_RMSNORM, D_QKNORM, D_CLIP,
       D_KEYS, D_OBS_T, D_STATE_HIDDEN, D_ENC_DEPTH, D_ENC_HIDDEN, D_TASK_TOKEN, D_COUNT };
/* float params */
enum { F_NORM_EPS, F_QK_EPS, F_CLIP, F_COUNT };
/* global tensors */
enum { G_ACTION_W, G_ACTION_ADD, G_TABLE, G_HEAD_MOD, G_HEAD_W, G_HEAD_B, G_UN_SCALE, G_UN_OFFSET, G_POS, G_TASK_EMB,
       G_COUNT };
/* per decoder block tensors (the last three: the cross-attention's K/V projection, for the condition) */
enum { B_MOD, B_QKV_W, B_QKV_B, B_QN, B_KN, B_OUT_W, B_OUT_B, B_NX_W, B_NX_B, B_CQ_W, B_CQ_B, B_CQN, B_COUT_W,
       B_COUT_B, B_CGATE, B_M1_W, B_M1_B, B_M2_W, B_M2_B, B_KV_W, B_KV_B, B_CKN, B_COUNT };
/* per observation key (a state vector: normalise, Linear, SiLU, Linear) */
enum { K_OFFSET, K_SCALE, K_W1, K_B1, K_W2, K_B2, K_COUNT };
/* per context-encoder block (pre-norm self-attention + MLP, affine LayerNorms) */
enum { E_N1_W, E_N1_B, E_QKV_W, E_QKV_B, E_QN, E_KN, E_OUT_W, E_OUT_B, E_N2_W, E_N2_B, E_M1_W, E_M1_B, E_M2_W,
       E_M2_B, E_COUNT };

int robodit_abi_version(void) { return 2; }
int robodit_simd(void) { return ROBODIT_AVX2; }
int robodit_layout(int *counts) {
    counts[0] = D_COUNT; counts[1] = F_COUNT; counts[2] = G_COUNT; counts[3] = B_COUNT; counts[4] = K_COUNT;
    counts[5] = E_COUNT;
    return 6;
}

/* ---- GEMM: y[M x N] (row stride ldy) = x[M x K] (ldx) @ w[K x N] (ldw) + b[N] (b may be NULL) ---------------- */

#if ROBODIT_AVX2
static inline __attribute__((always_inline)) void tile16(const int MR, int K, const float *x, int ldx,
                                                         const float *w, int ldw, const float *b, float *y,
                                                         int ldy) {
    __m256 acc[6][2];
    const __m256 b0 = b ? _mm256_loadu_ps(b) : _mm256_setzero_ps();
    const __m256 b1 = b ? _mm256_loadu_ps(b + 8) : _mm256_setzero_ps();
    for (int r = 0; r < MR; r++) { acc[r][0] = b0; acc[r][1] = b1; }
    for (int k = 0; k < K; k++) {
        const __m256 w0 = _mm256_loadu_ps(w + (size_t)k * ldw), w1 = _mm256_loadu_ps(w + (size_t)k * ldw + 8);
        for (int r = 0; r < MR; r++) {
            const __m256 a = _mm256_broadcast_ss(x + (size_t)r * ldx + k);
            acc[r][0] = _mm256_fmadd_ps(a, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < MR; r++) {
        _mm256_storeu_ps(y + (size_t)r * ldy, acc[r][0]);
        _mm256_storeu_ps(y + (size_t)r * ldy + 8, acc[r][1]);
    }
}

static inline __attribute__((always_inline)) void tile8(const int MR, int K, const float *x, int ldx,
                                                        const float *w, int ldw, const float *b, float *y,
                                                        int ldy) {
    __m256 acc[6];
    const __m256 b0 = b ? _mm256_loadu_ps(b) : _mm256_setzero_ps();
    for (int r = 0; r < MR; r++) acc[r] = b0;
    for (int k = 0; k < K; k++) {
        const __m256 w0 = _mm256_loadu_ps(w + (size_t)k * ldw);
        for (int r = 0; r < MR; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + (size_t)r * ldx + k), w0, acc[r]);
    }
    for (int r = 0; r < MR; r++) _mm256_storeu_ps(y + (size_t)r * ldy, acc[r]);
}

#define ROWS_DISPATCH(fn, mr, ...)                                                                              \
    switch (mr) {                                                                                               \
    case 6: fn(6, __VA_ARGS__); break;                                                                          \
    case 5: fn(5, __VA_ARGS__); break;                                                                          \
    case 4: fn(4, __VA_ARGS__); break;                                                                          \
    case 3: fn(3, __VA_ARGS__); break;                                                                          \
    case 2: fn(2, __VA_ARGS__); break;                                                                          \
    default: fn(1, __VA_ARGS__); break;                                                                         \
    }
#endif

/* Columns come in groups of 16 (then one of 8, then the rest); a weight matrix is stored group by group ("packed":
   the group at column j is [K x width] contiguous at w + j*K), so each tile streams contiguous memory. A plain
   [K x N] matrix with a row stride of 256 B or more maps its rows onto a few L1 sets and thrashes them: packed, the
   MLP's 64x256 down-projection ran 1.8x faster on this CPU. Activations (attention's K^T and V) stay strided. */
static void gemm_any(int M, int N, int K, const float *x, int ldx, const float *w, int packed, int ldw,
                     const float *b, float *y, int ldy) {
    int j = 0;
#if ROBODIT_AVX2
/* every whole group of WIDTH columns from j on, through TILE (rows 6 at a time) */
#define COLUMN_GROUPS(WIDTH, TILE)                                                                              \
    for (; j + WIDTH <= N; j += WIDTH) {                                                                        \
        const float *wj = packed ? w + (size_t)j * K : w + j;                                                   \
        const int ld = packed ? WIDTH : ldw;                                                                    \
        for (int i = 0; i < M; i += 6) {                                                                        \
            const int mr = M - i < 6 ? M - i : 6;                                                               \
            ROWS_DISPATCH(TILE, mr, K, x + (size_t)i * ldx, ldx, wj, ld, b ? b + j : NULL,                      \
                          y + (size_t)i * ldy + j, ldy)                                                         \
        }                                                                                                       \
    }
    COLUMN_GROUPS(16, tile16)
    COLUMN_GROUPS(8, tile8)
#undef COLUMN_GROUPS
#else
    if (packed) {  /* the portable build walks the same groups */
        for (; j < N;) {
            const int gw = N - j >= 16 ? 16 : (N - j >= 8 ? 8 : N - j);
            const float *wj = w + (size_t)j * K;
            for (int i = 0; i < M; i++) {
                float *yi = y + (size_t)i * ldy + j;
                for (int c = 0; c < gw; c++) yi[c] = b ? b[j + c] : 0.0f;
                for (int k = 0; k < K; k++) {
                    const float a = x[(size_t)i * ldx + k];
                    for (int c = 0; c < gw; c++) yi[c] += a * wj[(size_t)k * gw + c];
                }
            }
            j += gw;
        }
        return;
    }
#endif
    if (j == N) return;
    const float *wj = packed ? w + (size_t)j * K : w + j;
    const int ld = packed ? N - j : ldw;
    for (int i = 0; i < M; i++) {
        float *yi = y + (size_t)i * ldy;
        for (int jj = j; jj < N; jj++) yi[jj] = b ? b[jj] : 0.0f;
        for (int k = 0; k < K; k++) {
            const float a = x[(size_t)i * ldx + k];
            const float *wk = wj + (size_t)k * ld - j;
            for (int jj = j; jj < N; jj++) yi[jj] += a * wk[jj];
        }
    }
}

/* y = x @ W + b for a packed weight W [K x N] */
static inline void gemm_w(int M, int N, int K, const float *x, int ldx, const float *w, const float *b, float *y,
                          int ldy) {
    gemm_any(M, N, K, x, ldx, w, 1, 0, b, y, ldy);
}

/* y = x @ w for a strided w (row stride ldw) */
static inline void gemm(int M, int N, int K, const float *x, int ldx, const float *w, int ldw, float *y, int ldy) {
    gemm_any(M, N, K, x, ldx, w, 0, ldw, NULL, y, ldy);
}

/* ---- elementwise ---------------------------------------------------------------------------------------------- */

#if ROBODIT_AVX2
/* e^x for 8 lanes: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n through the exponent bits
   (the classic single-precision range reduction; ~1 ulp over the clamped range). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* torch's GELU(approximate="tanh"): 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3) */
static void gelu_tanh(float *x, int n) {
    int i = 0;
#if ROBODIT_AVX2
    const __m256 c0 = _mm256_set1_ps(-2.0f * 0.7978845608028654f), c1 = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 u = _mm256_mul_ps(c0, _mm256_fmadd_ps(_mm256_mul_ps(c1, v), _mm256_mul_ps(v, v), v));
        /* 1 / d by the reciprocal estimate and one Newton step (~23 bits): the division was half of GELU's time */
        const __m256 d = _mm256_add_ps(one, exp8(u)), r0 = _mm256_rcp_ps(d);
        const __m256 r = _mm256_mul_ps(r0, _mm256_fnmadd_ps(d, r0, _mm256_set1_ps(2.0f)));
        _mm256_storeu_ps(x + i, _mm256_mul_ps(v, r));
    }
#endif
    for (; i < n; i++) {
        const float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
}

/* SiLU in place: x / (1 + e^-x) */
static void silu(float *x, int n) {
    int i = 0;
#if ROBODIT_AVX2
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 d = _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, v))), r0 = _mm256_rcp_ps(d);
        _mm256_storeu_ps(x + i, _mm256_mul_ps(v, _mm256_mul_ps(r0, _mm256_fnmadd_ps(d, r0, _mm256_set1_ps(2.0f)))));
    }
#endif
    for (; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i]));
}

/* softmax over each of `rows` rows of length n (row stride ld), in place */
static void softmax_rows(float *s, int rows, int n, int ld) {
    for (int i = 0; i < rows; i++) {
        float *row = s + (size_t)i * ld, mx = row[0], sum = 0.0f;
        int j = 0;
#if ROBODIT_AVX2
        if (n >= 8) {
            __m256 m = _mm256_loadu_ps(row);
            for (j = 8; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(row + j));
            float lanes[8];
            _mm256_storeu_ps(lanes, m);
            for (int l = 0; l < 8; l++) mx = lanes[l] > mx ? lanes[l] : mx;
        }
#endif
        for (; j < n; j++) mx = row[j] > mx ? row[j] : mx;
        j = 0;
#if ROBODIT_AVX2
        const __m256 m8 = _mm256_set1_ps(mx);
        __m256 acc = _mm256_setzero_ps();
        for (; j + 8 <= n; j += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), m8));
            _mm256_storeu_ps(row + j, e);
            acc = _mm256_add_ps(acc, e);
        }
        sum = hsum8(acc);
#endif
        for (; j < n; j++) { row[j] = expf(row[j] - mx); sum += row[j]; }
        const float inv = 1.0f / sum;
        for (j = 0; j < n; j++) row[j] *= inv;
    }
}

/* sum of x and sum of (x - c)^2 over n floats: vectorised (a float reduction is never auto-vectorised without
   -ffast-math, and a scalar one is a chain of dependent adds: at width 64 the norms were a fifth of a step) */
static inline float sum_n(const float *x, int n) {
    float s = 0.0f;
    int j = 0;
#if ROBODIT_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + j));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + j + 8));
    }
    for (; j + 8 <= n; j += 8) a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + j));
    s = hsum8(_mm256_add_ps(a0, a1));
#endif
    for (; j < n; j++) s += x[j];
    return s;
}

static inline float sumsq_n(const float *x, int n, float c) {
    float s = 0.0f;
    int j = 0;
#if ROBODIT_AVX2
    const __m256 c8 = _mm256_set1_ps(c);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + j), c8), d1 = _mm256_sub_ps(_mm256_loadu_ps(x + j + 8), c8);
        a0 = _mm256_fmadd_ps(d0, d0, a0);
        a1 = _mm256_fmadd_ps(d1, d1, a1);
    }
    for (; j + 8 <= n; j += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + j), c8);
        a0 = _mm256_fmadd_ps(d, d, a0);
    }
    s = hsum8(_mm256_add_ps(a0, a1));
#endif
    for (; j < n; j++) s += (x[j] - c) * (x[j] - c);
    return s;
}

/* y = (x - c) * r * scale + shift over n floats; scale/shift may be NULL */
static inline void affine_n(const float *x, float *y, int n, float c, float r, const float *scale,
                            const float *shift) {
    int j = 0;
#if ROBODIT_AVX2
    const __m256 c8 = _mm256_set1_ps(c), r8 = _mm256_set1_ps(r);
    for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), c8), r8);
        if (scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(scale + j));
        if (shift) v = _mm256_add_ps(v, _mm256_loadu_ps(shift + j));
        _mm256_storeu_ps(y + j, v);
    }
#endif
    for (; j < n; j++) {
        float v = (x[j] - c) * r;
        if (scale) v *= scale[j];
        if (shift) v += shift[j];
        y[j] = v;
    }
}

/* y = norm(x) * scale + shift per row of width w (LayerNorm without affine, or RMSNorm); scale/shift may be NULL */
static void norm_rows(const float *x, float *y, int rows, int w, int rms, float eps, const float *scale,
                      const float *shift) {
    for (int i = 0; i < rows; i++) {
        const float *xi = x + (size_t)i * w;
        const float mean = rms ? 0.0f : sum_n(xi, w) / (float)w;
        const float rstd = 1.0f / sqrtf(sumsq_n(xi, w, mean) / (float)w + eps);
        affine_n(xi, y + (size_t)i * w, w, mean, rstd, scale, shift);
    }
}

/* RMSNorm over each head_dim slice of `heads` heads in each of `rows` rows (row stride ld), times weight, times
   `post` (the attention's 1/sqrt(d) folded into the queries); in place */
static void head_rms(float *x, int rows, int heads, int hd, int ld, const float *weight, float eps, float post) {
    for (int i = 0; i < rows; i++)
        for (int h = 0; h < heads; h++) {
            float *v = x + (size_t)i * ld + h * hd;
            const float r = post / sqrtf(sumsq_n(v, hd, 0.0f) / (float)hd + eps);
            affine_n(v, v, hd, 0.0f, r, weight, NULL);
        }
}

static void scale_rows(float *x, int rows, int n, int ld, float s) {
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < n; j++) x[(size_t)i * ld + j] *= s;
}

/* x += gate (per channel) * y, rows x w */
static void gated_add(float *x, const float *y, const float *gate, int rows, int w) {
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < w; j++) x[(size_t)i * w + j] += gate[j] * y[(size_t)i * w + j];
}

/* ---- attention ------------------------------------------------------------------------------------------------ */

/* softmax(q k^T) v per head (q already scaled), T queries against n keys; q/k/v rows at strides ldq/ldk/ldv with
   head h at column h*hd; output y [T x heads*hd]. kt: hd x n scratch, s: T x n scratch. */
static void attention(const float *q, int ldq, const float *k, int ldk, const float *v, int ldv, int T, int n,
                      int heads, int hd, float *y, int ldy, float *kt, float *s) {
    for (int h = 0; h < heads; h++) {
        for (int j = 0; j < n; j++)
            for (int d = 0; d < hd; d++) kt[(size_t)d * n + j] = k[(size_t)j * ldk + h * hd + d];
        gemm(T, n, hd, q + h * hd, ldq, kt, n, s, n);
        softmax_rows(s, T, n, n);
        gemm(T, hd, n, s, n, v + h * hd, ldv, y + h * hd, ldy);
    }
}

/* Self-attention of n tokens from their stacked projection qkv [n x 3W] (Q, K, V; head h at column h*hd of each):
   Q and K RMS-normalised per head when the block has QK-norm (weights qn, kn), Q scaled by 1/sqrt(hd); output
   y [n x W]. */
static void self_attention(float *qkv, int n, int W, int heads, int qknorm, const float *qn, const float *kn,
                           float qk_eps, float *y, float *kt, float *s) {
    const int hd = W / heads;
    const float qscale = 1.0f / sqrtf((float)hd);
    if (qknorm) {
        head_rms(qkv, n, heads, hd, 3 * W, qn, qk_eps, qscale);
        head_rms(qkv + W, n, heads, hd, 3 * W, kn, qk_eps, 1.0f);
    } else {
        scale_rows(qkv, n, W, 3 * W, qscale);
    }
    attention(qkv, 3 * W, qkv + W, 3 * W, qkv + 2 * W, 3 * W, n, n, heads, hd, y, W, kt, s);
}

/* Cross-attention to a few condition tokens (C <= 8), per query row and head: C dot products, one 8-lane exp,
   C axpys. Through `attention` (a K transpose, two GEMMs of width C, C scalar exps per row) it took 12% of dit/tiny's
   loop for 3% of its FLOPs. K and V are head-major: [heads x C x hd]. */
static void attention_few(const float *q, int ldq, const float *k, const float *v, int T, int C, int heads, int hd,
                          float *y, int ldy, float *kt, float *s) {
#if ROBODIT_AVX2
    if (C <= 8 && hd % 8 == 0) {
        const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 live = _mm256_cmp_ps(lane, _mm256_set1_ps((float)C), _CMP_LT_OQ);
        for (int h = 0; h < heads; h++) {
            const float *kh = k + (size_t)h * C * hd, *vh = v + (size_t)h * C * hd;
            for (int i = 0; i < T; i++) {
                const float *qi = q + (size_t)i * ldq + h * hd;
                float sc[8] = {0}, mx = -INFINITY;
                for (int j = 0; j < C; j++) {
                    __m256 acc = _mm256_setzero_ps();
                    for (int d = 0; d < hd; d += 8)
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d), _mm256_loadu_ps(kh + (size_t)j * hd + d), acc);
                    sc[j] = hsum8(acc);
                    mx = sc[j] > mx ? sc[j] : mx;
                }
                const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(sc), _mm256_set1_ps(mx))), live);
                _mm256_storeu_ps(sc, _mm256_mul_ps(e, _mm256_set1_ps(1.0f / hsum8(e))));
                float *yi = y + (size_t)i * ldy + h * hd;
                for (int d = 0; d < hd; d += 8) {
                    __m256 acc = _mm256_setzero_ps();
                    for (int j = 0; j < C; j++)
                        acc = _mm256_fmadd_ps(_mm256_set1_ps(sc[j]), _mm256_loadu_ps(vh + (size_t)j * hd + d), acc);
                    _mm256_storeu_ps(yi + d, acc);
                }
            }
        }
        return;
    }
#endif
    for (int h = 0; h < heads; h++)
        attention(q + h * hd, ldq, k + (size_t)h * C * hd, hd, v + (size_t)h * C * hd, hd, T, C, 1, hd, y + h * hd,
                  ldy, kt, s);
}

/* ---- the chunk -------------------------------------------------------------------------------------------------- */

static const float *at(const float *params, const int64_t *off, int index) {
    return off[index] < 0 ? NULL : params + off[index];
}

/* floats of scratch `robodit_dit_chunk` needs */
int64_t robodit_dit_workspace(const int32_t *dims) {
    const int64_t T = dims[D_TOKENS], W = dims[D_WIDTH], H = dims[D_HIDDEN], A = dims[D_ACTION];
    const int64_t n = T > dims[D_CTX] ? T : dims[D_CTX], hd = W / dims[D_HEADS];
    return T * W * 3 + T * 3 * W + T * H + T * n + hd * n + T * A * 2 + 64;
}

/* Denoise x ([T x A] unit noise in, actions in the robot's units out). kv: per block, K then V, each
   [heads x ctx x head_dim] (normalised K, as `Attention.keys_values` returns them). */
int robodit_dit_chunk(const int32_t *dims, const float *fp, const float *P, const int64_t *off, const float *kv,
                      float *x, float *work) {
    const int T = dims[D_TOKENS], W = dims[D_WIDTH], heads = dims[D_HEADS], depth = dims[D_DEPTH];
    const int A = dims[D_ACTION], steps = dims[D_STEPS], C = dims[D_CTX], H = dims[D_HIDDEN];
    const int rms = dims[D_RMSNORM], qknorm = dims[D_QKNORM], clip = dims[D_CLIP], hd = W / heads;
    const float eps = fp[F_NORM_EPS], qk_eps = fp[F_QK_EPS], clip_v = fp[F_CLIP];
    const float qscale = 1.0f / sqrtf((float)hd);
    const int n = T > C ? T : C;
    float *tok = work, *hbuf = tok + (size_t)T * W, *ybuf = hbuf + (size_t)T * W, *qkv = ybuf + (size_t)T * W;
    float *mlp = qkv + (size_t)T * 3 * W, *s = mlp + (size_t)T * H, *kt = s + (size_t)T * n;
    float *raw = kt + (size_t)hd * n;
    const float *table = at(P, off, G_TABLE);
    const int64_t *boff = off + G_COUNT;

    for (int step = 0; step < steps; step++) {
        /* tokens = x @ action_in + (bias + positions) */
        gemm_w(T, W, A, x, A, at(P, off, G_ACTION_W), NULL, tok, W);
        const float *add = at(P, off, G_ACTION_ADD);
        for (int i = 0; i < T * W; i++) tok[i] += add[i];

        for (int blk = 0; blk < depth; blk++) {
            const int64_t *o = boff + (size_t)blk * B_COUNT;
            const float *mod = at(P, o, B_MOD) + (size_t)step * 6 * W;
            const float *sh1 = mod, *sc1 = mod + W, *g1 = mod + 2 * W, *sh2 = mod + 3 * W, *sc2 = mod + 4 * W,
                        *g2 = mod + 5 * W;
            /* self-attention */
            norm_rows(tok, hbuf, T, W, rms, eps, sc1, sh1);
            gemm_w(T, 3 * W, W, hbuf, W, at(P, o, B_QKV_W), at(P, o, B_QKV_B), qkv, 3 * W);
            self_attention(qkv, T, W, heads, qknorm, at(P, o, B_QN), at(P, o, B_KN), qk_eps, ybuf, kt, s);
            gemm_w(T, W, W, ybuf, W, at(P, o, B_OUT_W), at(P, o, B_OUT_B), hbuf, W);
            gated_add(tok, hbuf, g1, T, W);
            /* cross-attention to the chunk's condition */
            if (C > 0 && o[B_CQ_W] >= 0) {
                const float *kblk = kv + (size_t)blk * 2 * heads * C * hd, *vblk = kblk + (size_t)heads * C * hd;
                norm_rows(tok, hbuf, T, W, rms, eps, at(P, o, B_NX_W), at(P, o, B_NX_B));
                gemm_w(T, W, W, hbuf, W, at(P, o, B_CQ_W), at(P, o, B_CQ_B), qkv, W);
                if (qknorm) head_rms(qkv, T, heads, hd, W, at(P, o, B_CQN), qk_eps, qscale);
                else scale_rows(qkv, T, W, W, qscale);
                attention_few(qkv, W, kblk, vblk, T, C, heads, hd, ybuf, W, kt, s);
                gemm_w(T, W, W, ybuf, W, at(P, o, B_COUT_W), at(P, o, B_COUT_B), hbuf, W);
                gated_add(tok, hbuf, at(P, o, B_CGATE), T, W);
            }
            /* MLP */
            norm_rows(tok, hbuf, T, W, rms, eps, sc2, sh2);
            gemm_w(T, H, W, hbuf, W, at(P, o, B_M1_W), at(P, o, B_M1_B), mlp, H);
            gelu_tanh(mlp, T * H);
            gemm_w(T, W, H, mlp, H, at(P, o, B_M2_W), at(P, o, B_M2_B), hbuf, W);
            gated_add(tok, hbuf, g2, T, W);
        }
        /* head */
        const float *hm = at(P, off, G_HEAD_MOD) + (size_t)step * 2 * W;
        norm_rows(tok, hbuf, T, W, rms, eps, hm + W, hm);
        gemm_w(T, A, W, hbuf, W, at(P, off, G_HEAD_W), at(P, off, G_HEAD_B), raw, A);
        /* DDIM: x0 = a x + b raw (clamped when clipping); x <- c x + d raw + e x0 */
        const float a = table[step * 5], b = table[step * 5 + 1], c = table[step * 5 + 2],
                    d = table[step * 5 + 3], e = table[step * 5 + 4];
        for (int i = 0; i < T * A; i++) {
            float next = c * x[i] + d * raw[i];
            if (clip) {
                float x0 = a * x[i] + b * raw[i];
                x0 = x0 > clip_v ? clip_v : (x0 < -clip_v ? -clip_v : x0);
                next += e * x0;
            }
            x[i] = next;
        }
    }
    const float *un_scale = at(P, off, G_UN_SCALE), *un_off = at(P, off, G_UN_OFFSET);
    for (int i = 0; i < T; i++)
        for (int j = 0; j < A; j++) x[i * A + j] = x[i * A + j] * un_scale[j] + un_off[j];
    return 0;
}

/* ---- the condition: state observations -> every decoder block's cross-attention K/V -------------------------- */

int64_t robodit_dit_condition_workspace(const int32_t *dims) {
    const int64_t W = dims[D_WIDTH], C = dims[D_CTX], hd = W / dims[D_HEADS];
    const int64_t hidden = dims[D_ENC_HIDDEN] > dims[D_STATE_HIDDEN] ? dims[D_ENC_HIDDEN] : dims[D_STATE_HIDDEN];
    int64_t widest = 0;
    for (int k = 0; k < dims[D_KEYS]; k++) widest = dims[D_COUNT + k] > widest ? dims[D_COUNT + k] : widest;
    return C * W * 3 + C * 3 * W + C * hidden + C * C + hd * C + widest + 64;
}

/* What `DiTPolicy.encode` computes for state-only observations: each key normalised ((x - offset) / scale) and
   embedded (Linear, SiLU, Linear) per time step, tokens ordered time-major (t * keys + k) plus their positions, the
   task token first when the policy has one, the context-encoder blocks, then each decoder block's normalised K
   and V. obs: the keys' [obs_horizon x width] rows back to back, in the policy's (sorted) key order. kv: as
   `robodit_dit_chunk` reads it. Returns -1 when this export holds no condition weights (image observations). */
int robodit_dit_condition(const int32_t *dims, const float *fp, const float *P, const int64_t *off,
                          const float *obs, int64_t task, float *kv, float *work) {
    const int W = dims[D_WIDTH], heads = dims[D_HEADS], depth = dims[D_DEPTH], C = dims[D_CTX];
    const int keys = dims[D_KEYS], To = dims[D_OBS_T], Hs = dims[D_STATE_HIDDEN], He = dims[D_ENC_HIDDEN];
    const int qknorm = dims[D_QKNORM], hd = W / heads, base = dims[D_TASK_TOKEN] ? 1 : 0;
    const float eps = fp[F_NORM_EPS], qk_eps = fp[F_QK_EPS];
    if (keys <= 0 || off[G_POS] < 0) return -1;
    const int64_t *boff = off + G_COUNT, *koff = boff + (size_t)depth * B_COUNT;
    const int64_t *eoff = koff + (size_t)keys * K_COUNT;
    const int hidden = He > Hs ? He : Hs;
    float *ctx = work, *hbuf = ctx + (size_t)C * W, *ybuf = hbuf + (size_t)C * W, *qkv = ybuf + (size_t)C * W;
    float *mlp = qkv + (size_t)C * 3 * W, *s = mlp + (size_t)C * hidden, *kt = s + (size_t)C * C;
    float *xn = kt + (size_t)hd * C;

    if (base) memcpy(ctx, at(P, off, G_TASK_EMB) + (size_t)task * W, sizeof(float) * W);
    const float *pos = at(P, off, G_POS);
    for (int k = 0, col = 0; k < keys; k++) {
        const int64_t *o = koff + (size_t)k * K_COUNT;
        const int d = dims[D_COUNT + k];
        const float *offset = at(P, o, K_OFFSET), *scale = at(P, o, K_SCALE);
        for (int t = 0; t < To; t++) {
            const float *x = obs + (size_t)col * To + (size_t)t * d;
            for (int j = 0; j < d; j++) xn[j] = (x[j] - offset[j]) / scale[j];
            gemm_w(1, Hs, d, xn, d, at(P, o, K_W1), at(P, o, K_B1), mlp, Hs);
            silu(mlp, Hs);
            float *row = ctx + (size_t)(base + t * keys + k) * W;
            gemm_w(1, W, Hs, mlp, Hs, at(P, o, K_W2), at(P, o, K_B2), row, W);
            for (int j = 0; j < W; j++) row[j] += pos[(size_t)(t * keys + k) * W + j];
        }
        col += d;
    }
    for (int e = 0; e < dims[D_ENC_DEPTH]; e++) {
        const int64_t *o = eoff + (size_t)e * E_COUNT;
        norm_rows(ctx, hbuf, C, W, 0, eps, at(P, o, E_N1_W), at(P, o, E_N1_B));
        gemm_w(C, 3 * W, W, hbuf, W, at(P, o, E_QKV_W), at(P, o, E_QKV_B), qkv, 3 * W);
        self_attention(qkv, C, W, heads, qknorm, at(P, o, E_QN), at(P, o, E_KN), qk_eps, ybuf, kt, s);
        gemm_w(C, W, W, ybuf, W, at(P, o, E_OUT_W), at(P, o, E_OUT_B), hbuf, W);
        for (int i = 0; i < C * W; i++) ctx[i] += hbuf[i];
        norm_rows(ctx, hbuf, C, W, 0, eps, at(P, o, E_N2_W), at(P, o, E_N2_B));
        gemm_w(C, He, W, hbuf, W, at(P, o, E_M1_W), at(P, o, E_M1_B), mlp, He);
        gelu_tanh(mlp, C * He);
        gemm_w(C, W, He, mlp, He, at(P, o, E_M2_W), at(P, o, E_M2_B), hbuf, W);
        for (int i = 0; i < C * W; i++) ctx[i] += hbuf[i];
    }
    for (int blk = 0; blk < depth; blk++) {
        const int64_t *o = boff + (size_t)blk * B_COUNT;
        gemm_w(C, 2 * W, W, ctx, W, at(P, o, B_KV_W), at(P, o, B_KV_B), qkv, 2 * W);
        if (qknorm) head_rms(qkv, C, heads, hd, 2 * W, at(P, o, B_CKN), qk_eps, 1.0f);
        float *kb = kv + (size_t)blk * 2 * heads * C * hd, *vb = kb + (size_t)heads * C * hd;
        for (int h = 0; h < heads; h++)
            for (int c = 0; c < C; c++) {
                memcpy(kb + ((size_t)h * C + c) * hd, qkv + (size_t)c * 2 * W + h * hd, sizeof(float) * hd);
                memcpy(vb + ((size_t)h * C + c) * hd, qkv + (size_t)c * 2 * W + W + h * hd, sizeof(float) * hd);
            }
    }
    return 0;
}
