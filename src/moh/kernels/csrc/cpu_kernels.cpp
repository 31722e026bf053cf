// moh's CPU kernels, fp32 (moh/kernels/cpu.py builds and
// loads them; kernels.py and backend.py choose them):
//
// * moh_rows_forward / moh_rows_backward: causal attention of gathered query rows, each row at
//   its own key index (its causal horizon);
// * moh_decode_token: one decode step of one sequence for its active heads only: their queries
//   (their rows of W_Q; qk-norm, RoPE), their attention over their KV cache (read in place), their
//   gated output projection (their columns of W_O), in one call;
// * moh_two_stage_router: the paper's two-stage router for a few tokens (decode steps), or its
//   softmaxes and top-k after the logits of many tokens were computed as one product;
// * moh_scatter_mm / moh_gather_mm: the per-head projections of gathered rows (query projection
//   and its gradients, output projection and its gradients), token block by token block, as
//   register tiles (or sgemm on gathered copies).
//
// Rows attention:
// For every (item, head) the M rows are sorted by key index. A block of up to `qblock` rows
// reads keys [0, first row's index] whole (every row sees them: chunks of `kblock` keys, no
// mask) and then the diagonal keys up to its last row's index in chunks of `dblock`, each chunk
// with only the rows that see any of its keys, each row up to its own index. Scores never leave
// a (rows x chunk) scratch buffer: an online softmax (flash attention) keeps a running maximum,
// sum and output per row. The products are the BLAS sgemm of the process (torch's MKL); the
// softmax is vectorised by the compiler. The backward recomputes the probabilities from the
// saved log-sum-exp, chunk by chunk, with the same blocks.
//
// Layout: q (BP, M, hd) with strides (q_sb per item-head, q_sm per row, 1); k and v (BP, S, hd)
// likewise; qpos (BP, M) int64 ascending along M, each in [0, S); out and dq (BP, M, hd), lse
// (BP, M), dk and dv (BP, S, hd) contiguous. All row-major; BLAS is column-major, so every
// product below is written transposed.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>
#include <omp.h>

extern "C" void sgemv_(const char* trans, const int* m, const int* n, const float* alpha, const float* a,
                       const int* lda, const float* x, const int* incx, const float* beta, float* y, const int* incy);
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// C (row-major, rows x cols, ldc) = alpha * op(A) op(B) + beta * C, in row-major terms:
// op(A) is rows x inner, op(B) inner x cols; ta/tb say whether A/B are stored transposed
// (A stored inner x rows with lda, ...). Row-major C = column-major C^T = op(B)^T op(A)^T.
inline void gemm_rm(bool ta, bool tb, int rows, int cols, int inner, float alpha, const float* a, int lda,
                    const float* b, int ldb, float beta, float* c, int ldc) {
    // column-major: C^T (cols x rows) = B' (cols x inner) * A' (inner x rows)
    // B' is op(B)^T: B row-major (inner x cols) is column-major B^T (cols x inner) -> 'N';
    // B stored transposed (cols x inner row-major) is column-major (inner x cols) -> 'T'.
    const char tB = tb ? 'T' : 'N';
    const char tA = ta ? 'T' : 'N';
    sgemm_(&tB, &tA, &cols, &rows, &inner, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Rows of the scratch buffers are padded to whole vectors of W floats (GCC vector extensions:
// the compiler maps them to the CPU's vector registers, two or four per vector if narrower).
constexpr int64_t W = 16;
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(float))));

inline int64_t padded(int64_t n) { return (n + W - 1) / W * W; }
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{} + x; }

// exp(x) for x <= 0 (differences to a row's maximum or log-sum-exp), ~2 ulp; exactly 0 below
// -87 (also for -inf, the masked keys). Cephes' expf polynomial, n rounded by the 1.5 * 2^23 trick.
inline vf exp_neg(vf x) {
    const vf magic = splat(12582912.0f);
    const vf xc = x < -87.0f ? splat(-87.0f) : x;
    const vf t = xc * 1.44269504088896341f + magic;
    const vf n = t - magic;
    const vf r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vi bits = ((reinterpret_cast<const vi&>(t) - reinterpret_cast<const vi&>(magic)) + 127) << 23;
    const vf y = p * reinterpret_cast<const vf&>(bits);
    return x < -87.0f ? vf{} : y;
}

inline float exp_neg1(float x) { return x < -87.0f ? 0.0f : std::exp(x); }

// Keys past the row's horizon (and the vector padding) get -inf: exp_neg makes them 0.
inline void mask_tail(float* s, int64_t seen, int64_t width) {
    for (int64_t c = seen; c < width; ++c) s[c] = -INFINITY;
}

// The maximum of a row of ld floats (ld a multiple of W).
inline float row_max(const float* s, int64_t ld) {
    vf vm = load(s);
    for (int64_t c = W; c < ld; c += W) {
        const vf x = load(s + c);
        vm = x > vm ? x : vm;
    }
    float m = vm[0];
    for (int64_t w = 1; w < W; ++w) m = std::max(m, vm[w]);
    return m;
}

// s[c] = exp(s[c] - m) in place over ld floats; returns their sum.
inline float exp_sum(float* s, int64_t ld, float m) {
    vf vl{};
    for (int64_t c = 0; c < ld; c += W) {
        const vf e = exp_neg(load(s + c) - m);
        store(s + c, e);
        vl += e;
    }
    float l = 0.0f;
    for (int64_t w = 0; w < W; ++w) l += vl[w];
    return l;
}

struct Job {
    const float *q, *k, *v;
    int64_t q_sb, q_sm, k_sb, k_ss, v_sb, v_ss;
    const int64_t* qpos;
    int64_t qpos_sb;
    int64_t M, S, hd;
    float scale;
    int64_t qblock, kblock, dblock;
};

// The key chunks of the row block [r0, r1): (key start, key count, first row that sees it).
template <typename F>
inline void for_chunks(const Job& j, const int64_t* pos, int64_t r0, int64_t r1, F&& f) {
    const int64_t whole = pos[r0] + 1, end = pos[r1 - 1] + 1;
    for (int64_t c0 = 0; c0 < whole; c0 += j.kblock) f(c0, std::min(j.kblock, whole - c0), r0);
    int64_t first = r0;
    for (int64_t c0 = whole; c0 < end; c0 += j.dblock) {
        while (pos[first] < c0) ++first;  // rows before `first` end before this chunk
        f(c0, std::min(j.dblock, end - c0), first);
    }
}

void forward_block(const Job& j, int64_t bp, int64_t r0, int64_t r1, float* out, float* lse, float* scores,
                   float* acc, float* mx, float* sum) {
    const float* q = j.q + bp * j.q_sb;
    const float* k = j.k + bp * j.k_sb;
    const float* v = j.v + bp * j.v_sb;
    const int64_t* pos = j.qpos + bp * j.qpos_sb;
    const int64_t hd = j.hd, R = r1 - r0;
    std::fill(acc, acc + R * hd, 0.0f);
    std::fill(mx, mx + R, -INFINITY);
    std::fill(sum, sum + R, 0.0f);
    for_chunks(j, pos, r0, r1, [&](int64_t c0, int64_t n, int64_t first) {
        const int64_t rows = r1 - first, off = first - r0;
        const int64_t ld = padded(n);
        // scores (rows x n, rows ld apart) = scale * q[first:r1] k[c0:c0+n]^T
        gemm_rm(false, true, rows, n, hd, j.scale, q + first * j.q_sm, j.q_sm, k + c0 * j.k_ss, j.k_ss, 0.0f,
                scores, ld);
        for (int64_t i = 0; i < rows; ++i) {
            float* s = scores + i * ld;
            mask_tail(s, std::min<int64_t>(n, pos[first + i] - c0 + 1), ld);  // >= 1 key seen
            const float m = mx[off + i], mnew = std::max(m, row_max(s, ld));
            const float alpha = exp_neg1(m - mnew);  // 0 on the first chunk (m = -inf)
            sum[off + i] = sum[off + i] * alpha + exp_sum(s, ld, mnew);
            mx[off + i] = mnew;
            if (alpha != 1.0f) {
                float* a = acc + (off + i) * hd;
                for (int64_t d = 0; d < hd; ++d) a[d] *= alpha;
            }
        }
        // acc[off:] (rows x hd) += p (rows x n) v[c0:c0+n]
        gemm_rm(false, false, rows, hd, n, 1.0f, scores, ld, v + c0 * j.v_ss, j.v_ss, 1.0f, acc + off * hd, hd);
    });
    for (int64_t i = 0; i < R; ++i) {
        const float inv = 1.0f / sum[i];
        float* o = out + (bp * j.M + r0 + i) * hd;
        const float* a = acc + i * hd;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) o[d] = a[d] * inv;
        lse[bp * j.M + r0 + i] = mx[i] + std::log(sum[i]);
    }
}

void backward_block(const Job& j, int64_t bp, int64_t r0, int64_t r1, const float* lse, const float* delta,
                    const float* dout, float* dq, float* dk, float* dv, float* p, float* dp) {
    const float* q = j.q + bp * j.q_sb;
    const float* k = j.k + bp * j.k_sb;
    const float* v = j.v + bp * j.v_sb;
    const int64_t* pos = j.qpos + bp * j.qpos_sb;
    const int64_t hd = j.hd;
    const float* L = lse + bp * j.M;
    const float* Dl = delta + bp * j.M;
    const float* dO = dout + bp * j.M * hd;
    float* dQ = dq + bp * j.M * hd;
    float* dK = dk + bp * j.S * hd;
    float* dV = dv + bp * j.S * hd;
    for_chunks(j, pos, r0, r1, [&](int64_t c0, int64_t n, int64_t first) {
        const int64_t rows = r1 - first, ld = padded(n);
        gemm_rm(false, true, rows, n, hd, j.scale, q + first * j.q_sm, j.q_sm, k + c0 * j.k_ss, j.k_ss, 0.0f, p, ld);
        // dp = dout v^T
        gemm_rm(false, true, rows, n, hd, 1.0f, dO + first * hd, hd, v + c0 * j.v_ss, j.v_ss, 0.0f, dp, ld);
        for (int64_t i = 0; i < rows; ++i) {
            float* pi = p + i * ld;
            float* di = dp + i * ld;
            mask_tail(pi, std::min<int64_t>(n, pos[first + i] - c0 + 1), ld);
            const float l = L[first + i], dl = Dl[first + i];
            for (int64_t c = 0; c < ld; c += W) {
                const vf pr = exp_neg(load(pi + c) - l);
                store(pi + c, pr);
                store(di + c, pr * (load(di + c) - dl));  // 0 where masked (dp there is finite)
            }
        }
        // dv[c0:] (n x hd) += p^T dout ; dk[c0:] += scale ds^T q ; dq[first:] += scale ds k
        gemm_rm(true, false, n, hd, rows, 1.0f, p, ld, dO + first * hd, hd, 1.0f, dV + c0 * hd, hd);
        gemm_rm(true, false, n, hd, rows, j.scale, dp, ld, q + first * j.q_sm, j.q_sm, 1.0f, dK + c0 * hd, hd);
        gemm_rm(false, false, rows, hd, n, j.scale, dp, ld, k + c0 * j.k_ss, j.k_ss, 1.0f, dQ + first * hd, hd);
    });
}

// The end of the real rows of row block [r0, r1) of item-head bp: rows from count[bp] on are
// padding (a chunk's heads padded to its largest count), skipped (count null: none).
inline int64_t live_end(const int64_t* count, int64_t bp, int64_t r0, int64_t r1) {
    return count ? std::min(r1, std::max(r0, count[bp])) : r1;
}

}  // namespace

extern "C" {

int moh_rows_abi() { return 10; }

void moh_rows_forward(const float* q, int64_t q_sb, int64_t q_sm, const float* k, int64_t k_sb, int64_t k_ss,
                      const float* v, int64_t v_sb, int64_t v_ss, const int64_t* qpos, int64_t qpos_sb,
                      const int64_t* count, float* out, float* lse, int64_t BP, int64_t M, int64_t hd, float scale,
                      int64_t qblock, int64_t kblock, int64_t dblock, int threads) {
    const Job j{q, k, v, q_sb, q_sm, k_sb, k_ss, v_sb, v_ss, qpos, qpos_sb, M, 0, hd, scale, qblock, kblock, dblock};
    const int64_t nblk = (M + qblock - 1) / qblock, tasks = BP * nblk;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> scores(qblock * padded(std::max(kblock, dblock))), acc(qblock * hd), mx(qblock), sum(qblock);
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; ++t) {
            // the longest blocks (last rows) first: better balance
            const int64_t bp = t % BP, b = nblk - 1 - t / BP;
            const int64_t r0 = b * qblock, r1 = std::min(M, r0 + qblock), live = live_end(count, bp, r0, r1);
            if (live > r0)
                forward_block(j, bp, r0, live, out, lse, scores.data(), acc.data(), mx.data(), sum.data());
            std::fill(out + (bp * M + live) * hd, out + (bp * M + r1) * hd, 0.0f);  // padding rows: 0
            std::fill(lse + bp * M + live, lse + bp * M + r1, 0.0f);
        }
    }
}

// dq, dk, dv: zero-filled on entry. Rows' delta = sum(dout * out) is computed here.
void moh_rows_backward(const float* q, int64_t q_sb, int64_t q_sm, const float* k, int64_t k_sb, int64_t k_ss,
                       const float* v, int64_t v_sb, int64_t v_ss, const int64_t* qpos, int64_t qpos_sb,
                       const int64_t* count, const float* out, const float* dout, const float* lse, float* dq,
                       float* dk, float* dv,
                       int64_t BP, int64_t M, int64_t S, int64_t hd, float scale, int64_t qblock, int64_t kblock,
                       int64_t dblock, int threads) {
    const Job j{q, k, v, q_sb, q_sm, k_sb, k_ss, v_sb, v_ss, qpos, qpos_sb, M, S, hd, scale, qblock, kblock, dblock};
    std::vector<float> delta(BP * M);
    for (int64_t r = 0; r < BP * M; ++r) {
        const float* o = out + r * hd;
        const float* g = dout + r * hd;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < hd; ++d) s += o[d] * g[d];
        delta[r] = s;
    }
    const int64_t nblk = (M + qblock - 1) / qblock, chunk = std::max(kblock, dblock);
    const int64_t kv_size = BP * S * hd;
    // item-heads in parallel when there are enough of them (each owns its dk/dv); else row
    // blocks in parallel, each thread adding into its own dk/dv, summed at the end
    const bool by_head = BP >= threads || threads == 1;
    const int nbuf = by_head ? 0 : threads - 1;
    std::vector<float> extra(static_cast<size_t>(nbuf) * 2 * kv_size, 0.0f);
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> p(qblock * padded(chunk)), dp(qblock * padded(chunk));  // zeros: padding stays finite
        const int tid = omp_get_thread_num();
        float* mdk = (by_head || tid == 0) ? dk : extra.data() + (tid - 1) * 2 * kv_size;
        float* mdv = (by_head || tid == 0) ? dv : mdk + kv_size;
        if (by_head) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t bp = 0; bp < BP; ++bp)
                for (int64_t b = 0; b < nblk; ++b) {
                    const int64_t r0 = b * qblock, live = live_end(count, bp, r0, std::min(M, r0 + qblock));
                    if (live > r0)
                        backward_block(j, bp, r0, live, lse, delta.data(), dout, dq, mdk, mdv, p.data(), dp.data());
                }
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < BP * nblk; ++t) {
                const int64_t bp = t % BP, b = nblk - 1 - t / BP;
                const int64_t r0 = b * qblock, live = live_end(count, bp, r0, std::min(M, r0 + qblock));
                if (live > r0)
                    backward_block(j, bp, r0, live, lse, delta.data(), dout, dq, mdk, mdv, p.data(), dp.data());
            }
        }
    }
    for (int b = 0; b < nbuf; ++b) {
        const float* e = extra.data() + b * 2 * kv_size;
        for (int64_t i = 0; i < kv_size; ++i) dk[i] += e[i];
        for (int64_t i = 0; i < kv_size; ++i) dv[i] += e[kv_size + i];
    }
}

// Decode, one token of one sequence, its active heads only (active[h] != 0), in one parallel
// region: per head (split over threads) its query q_h = W_Q[head h block] x + b_Q (or row h of the
// raw projection a router already made), RMSNorm of q_h (norm_w given), RoPE rotate-half (cos/sin
// given, the token's), y_h = gates[h] * softmax(scale * K[h / r] q_h) V[h / r] over the S cached
// keys (key_mask[s] = 0: not seen; a head that sees no key gives y_h = 0); then, rows split over
// threads, out (Dout) = sum_h W_O[:, head h block] y_h + b_O. x (D); W_Q (H*hd, D) row stride
// ldwq; raw (H, hd) row stride ld_raw; K, V (G, S, hd) strides (k_sg, k_ss, 1), read in place;
// W_O (Dout, H*hd) row stride ldwo. Nothing but the active heads' weight rows/columns and cache
// is read.
void moh_decode_token(const float* x, int64_t D, const float* wq, int64_t ldwq, const float* bq, const float* raw,
                      int64_t ld_raw, const uint8_t* active, const float* gates, int64_t H, int64_t r, int64_t hd,
                      const float* norm_w, float norm_eps, const float* cos, const float* sin, const float* k,
                      int64_t k_sg, int64_t k_ss, const float* v, int64_t v_sg, int64_t v_ss, int64_t S,
                      const uint8_t* key_mask, float scale, const float* wo, int64_t ldwo, const float* bo,
                      int64_t Dout, float* out, int threads) {
    std::vector<int64_t> heads;
    for (int64_t h = 0; h < H; ++h)
        if (active[h]) heads.push_back(h);
    const int64_t P = static_cast<int64_t>(heads.size()), ld = padded(S), half = hd / 2;
    std::vector<float> y(P * hd, 0.0f);
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> scores(ld), q(hd), rot(hd);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; ++p) {
            const int64_t h = heads[p];
            const int one = 1, m = static_cast<int>(hd), n = static_cast<int>(S), d = static_cast<int>(D);
            const float unit = 1.0f, zero = 0.0f;
            if (raw != nullptr) {
                std::memcpy(q.data(), raw + h * ld_raw, hd * sizeof(float));
            } else {  // row-major (hd x D) block = column-major (D x hd): q = block x = A^T x
                const int lda = static_cast<int>(ldwq);
                sgemv_("T", &d, &m, &unit, wq + h * hd * ldwq, &lda, x, &one, &zero, q.data(), &one);
                if (bq != nullptr)
                    for (int64_t j = 0; j < hd; ++j) q[j] += bq[h * hd + j];
            }
            if (norm_w != nullptr) {
                float ss = 0.0f;
                for (int64_t j = 0; j < hd; ++j) ss += q[j] * q[j];
                const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hd) + norm_eps);
                for (int64_t j = 0; j < hd; ++j) q[j] = q[j] * inv * norm_w[j];
            }
            if (cos != nullptr) {
                for (int64_t j = 0; j < half; ++j) rot[j] = -q[j + half];
                for (int64_t j = half; j < hd; ++j) rot[j] = q[j - half];
                for (int64_t j = 0; j < hd; ++j) q[j] = q[j] * cos[j] + rot[j] * sin[j];
            }
            // scores = scale * K q: K row-major (S x hd) = column-major (hd x S)
            const int ldk = static_cast<int>(k_ss), ldv = static_cast<int>(v_ss);
            float* s = scores.data();
            sgemv_("T", &m, &n, &scale, k + (h / r) * k_sg, &ldk, q.data(), &one, &zero, s, &one);
            if (key_mask != nullptr)
                for (int64_t c = 0; c < S; ++c)
                    if (!key_mask[c]) s[c] = -INFINITY;
            mask_tail(s, S, ld);
            const float mx = row_max(s, ld);
            if (mx == -INFINITY) continue;  // sees no key: y_h stays 0
            const float alpha = gates[h] / exp_sum(s, ld, mx);
            // y_h = gate V^T p / l: V row-major (S x hd) = column-major (hd x S)
            sgemv_("N", &m, &n, &alpha, v + (h / r) * v_sg, &ldv, s, &one, &zero, y.data() + p * hd, &one);
        }
        // out[d0:d1], each thread its own rows, in one pass over them (a row's head blocks read
        // together), two rows at a time with two accumulators each (independent FMA chains)
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t d0 = Dout * tid / nt, d1 = Dout * (tid + 1) / nt, vec = hd / W * W;
        auto finish = [&](int64_t row, vf a, vf b, float tail) {
            const vf both = a + b;
            float t = tail + (bo != nullptr ? bo[row] : 0.0f);
            for (int64_t w = 0; w < W; ++w) t += both[w];
            out[row] = t;
        };
        int64_t row = d0;
        for (; row + 1 < d1; row += 2) {
            const float* w0 = wo + row * ldwo;
            const float* w1 = w0 + ldwo;
            vf a0{}, a1{}, b0{}, b1{};
            float t0 = 0.0f, t1 = 0.0f;
            for (int64_t p = 0; p < P; ++p) {
                const int64_t off = heads[p] * hd;
                const float* yp = y.data() + p * hd;
                int64_t j = 0;
                for (; j + 2 * W <= vec; j += 2 * W) {
                    const vf ya = load(yp + j), yb = load(yp + j + W);
                    a0 += load(w0 + off + j) * ya;
                    a1 += load(w0 + off + j + W) * yb;
                    b0 += load(w1 + off + j) * ya;
                    b1 += load(w1 + off + j + W) * yb;
                }
                for (; j < vec; j += W) {
                    const vf ya = load(yp + j);
                    a0 += load(w0 + off + j) * ya;
                    b0 += load(w1 + off + j) * ya;
                }
                for (; j < hd; ++j) {
                    t0 += w0[off + j] * yp[j];
                    t1 += w1[off + j] * yp[j];
                }
            }
            finish(row, a0, a1, t0);
            finish(row + 1, b0, b1, t1);
        }
        if (row < d1) {
            const float* w0 = wo + row * ldwo;
            vf a0{};
            float t0 = 0.0f;
            for (int64_t p = 0; p < P; ++p) {
                const int64_t off = heads[p] * hd;
                const float* yp = y.data() + p * hd;
                for (int64_t j = 0; j < vec; j += W) a0 += load(w0 + off + j) * load(yp + j);
                for (int64_t j = vec; j < hd; ++j) t0 += w0[off + j] * yp[j];
            }
            finish(row, a0, vf{}, t0);
        }
    }
}

// The two-stage router (paper Eqs. 4-6; moh/core/routers.py TwoStageRouter) for n tokens x (n, D):
// probs = softmax(W_r x) over the E routed heads; the top K (ties: the lower index, as the torch
// path's stable sort), renormalised to sum K; shared gates softmax(W_s x) * S (w_shared null: 1);
// with w_balance, [a1, a2] = softmax(W_h x) * 2 scale the shared and the routed gates. Writes gates
// (n, S + E) (0 where unused), active (n, S + E) as 0/1 bytes, probs (n, E). Weights row-major.
void moh_two_stage_router(const float* x, int64_t n, int64_t D, const float* w_routed, int64_t E,
                          const float* w_shared, int64_t S, const float* w_balance, int64_t K, const float* logits,
                          int64_t ldl, float* gates, uint8_t* active, float* probs, int threads) {
    const int64_t H = S + E;
    auto dot = [D](const float* w, const float* v) {
        float t = 0.0f;
#pragma omp simd reduction(+ : t)
        for (int64_t d = 0; d < D; ++d) t += w[d] * v[d];
        return t;
    };
    auto softmax = [](float* z, int64_t m) {
        float mx = z[0];
        for (int64_t i = 1; i < m; ++i) mx = std::max(mx, z[i]);
        float sum = 0.0f;
        for (int64_t i = 0; i < m; ++i) sum += (z[i] = std::exp(z[i] - mx));
        for (int64_t i = 0; i < m; ++i) z[i] /= sum;
    };
    // tokens split over threads where there are many (a prefill or training batch; a decode
    // step's one token stays on the calling thread)
#pragma omp parallel num_threads(n >= 256 ? threads : 1)
    {
    std::vector<float> logit(E + S + 2);
    std::vector<uint8_t> taken(E);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t) {
        const float* xt = x + t * D;
        float* g = gates + t * H;
        uint8_t* a = active + t * H;
        float* p = probs + t * E;
        // logits given (a row of ldl: routed, then shared where w_shared, then balance where
        // w_balance), or the products here
        const float* lt = logits != nullptr ? logits + t * ldl : nullptr;
        const float* lb = lt != nullptr ? lt + E + (w_shared != nullptr ? S : 0) : nullptr;
        for (int64_t e = 0; e < E; ++e) p[e] = lt != nullptr ? lt[e] : dot(w_routed + e * D, xt);
        softmax(p, E);
        float* sh = logit.data();
        for (int64_t i = 0; i < S; ++i)
            sh[i] = w_shared == nullptr ? 0.0f : lt != nullptr ? lt[E + i] : dot(w_shared + i * D, xt);
        if (w_shared != nullptr) {
            softmax(sh, S);
            for (int64_t i = 0; i < S; ++i) sh[i] *= static_cast<float>(S);
        } else {
            for (int64_t i = 0; i < S; ++i) sh[i] = 1.0f;
        }
        float bal[2] = {1.0f, 1.0f};
        if (w_balance != nullptr) {
            bal[0] = lb != nullptr ? lb[0] : dot(w_balance, xt);
            bal[1] = lb != nullptr ? lb[1] : dot(w_balance + D, xt);
            softmax(bal, 2);
            bal[0] *= 2.0f;
            bal[1] *= 2.0f;
        }
        std::fill(g, g + H, 0.0f);
        std::fill(a, a + H, 0);
        std::fill(taken.begin(), taken.end(), 0);
        float chosen = 0.0f;
        for (int64_t k = 0; k < K; ++k) {  // top-K by selection: K is small
            int64_t best = -1;
            for (int64_t e = 0; e < E; ++e)
                if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
            taken[best] = 1;
            chosen += p[best];
        }
        const float norm = static_cast<float>(K) / std::max(chosen, 1.17549435e-38f);
        for (int64_t i = 0; i < S; ++i) {
            g[i] = sh[i] * bal[0];
            a[i] = 1;
        }
        for (int64_t e = 0; e < E; ++e)
            if (taken[e]) {
                g[S + e] = p[e] * norm * bal[1];
                a[S + e] = 1;
            }
    }
    }
}

// ---- per-head products of gathered rows --------------------------------------------------
//
// A "piece" j is one head's rows: count_j row indices rows_j into the n rows of a (n, D) matrix,
// ascending (repeats allowed: padding rows, whose operand rows are 0), or rows_j null for all n
// rows in order; a (count_j x k_j) operand and a weight block op(B_j) of k_j x D (scatter) or
// D x k_j (gather), given by pointer, leading dimension and whether it is stored transposed.
// Both kernels walk the n rows in blocks of `tblock` and, inside a block, every piece's rows
// that fall in it: the block of the (n, D) matrix stays in cache while all pieces read or add
// to it (one pass over it instead of one per head), and the products are the process's sgemm
// on at most `mblock` rows at a time (or the register tiles below). Pointer arguments of the
// pieces arrive as int64 arrays.

}  // extern "C"

namespace {

inline int64_t first_at_least(const int64_t* rows, int64_t count, int64_t t) {
    return std::lower_bound(rows, rows + count, t) - rows;
}

// ---- register tiles: C rows [+]= A rows @ B, rows given by pointer ----
//
// With `tiles` on, both kernels compute their products with these instead of sgemm (and gather
// its weight gradients with the rank-1 tiles further down): up to MR rows of A, each a pointer
// (the rows of x where they lie, no gathered copy; or the operand's rows), times B (inner x N),
// into up to MR rows of C, each a pointer (the rows of out where they lie, no product written out
// and added back). A register tile is MR rows x NV vectors of C, summed over the whole inner
// dimension, then stored or added once. B is panel-major (tile_row): packed once per call, or
// read in place where it is one panel stored row-major. N = 64 (the query projection of a
// 64-wide head): 6 x 4 vectors; otherwise 8 x 3, then 8 x 1, then scalar columns. Panels,
// against W_O read row-major (its rows 3 KB apart: a tile's 64 x 48 block fell on a few of L1's
// sets): the output projection of the bench's layer alone (N=2048, 2 shared + 10 x 820 rows,
// 1 thread) 9.3-9.7 ms against 10.0-10.4. One head's products (N=2048 tokens, 820
// rows, 768 x 64, 1 thread, Xeon VM with AVX-512): 5.3 ms for the queries of 10 heads against
// 6.7 ms for gathered rows with sgemm (which copies and packs them); hot in cache both reach
// ~160 GFLOP/s.

// *p in every lane, loaded straight into a vector (a scalar add and broadcast would take the
// FMA ports' time)
inline vf broadcast(const float* p) {
    const float x = *p;
    return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}
static_assert(W == 16, "broadcast() lists W lanes");

template <int MR, int NV>
inline void tile(const float* const* a, int64_t K, const float* B, int64_t ldb, int64_t c0, float* const* c,
                 bool add, const float* scale) {
    vf acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = vf{};
    const float* b = B;  // the first of the tile's columns
    for (int64_t k = 0; k < K; ++k, b += ldb) {
        vf bv[NV];
        for (int v = 0; v < NV; ++v) bv[v] = load(b + W * v);
        for (int i = 0; i < MR; ++i) {
            const vf x = broadcast(a[i] + k);
            for (int v = 0; v < NV; ++v) acc[i][v] += x * bv[v];
        }
    }
    if (scale)  // a factor per row of A (the router's gate of each row)
        for (int i = 0; i < MR; ++i)
            for (int v = 0; v < NV; ++v) acc[i][v] *= scale[i];
    if (add) {
        for (int i = 0; i < MR; ++i)
            for (int v = 0; v < NV; ++v) store(c[i] + c0 + W * v, load(c[i] + c0 + W * v) + acc[i][v]);
    } else {
        for (int i = 0; i < MR; ++i)
            for (int v = 0; v < NV; ++v) store(c[i] + c0 + W * v, acc[i][v]);
    }
}

// columns [c0, N) of m rows, one at a time (N not a multiple of W); B at column c0
inline void tile_tail(int m, const float* const* a, int64_t K, const float* B, int64_t ldb, int64_t c0, int64_t N,
                      float* const* c, bool add, const float* scale) {
    for (int i = 0; i < m; ++i)
        for (int64_t col = c0; col < N; ++col) {
            float sum = 0.0f;
            for (int64_t k = 0; k < K; ++k) sum += a[i][k] * B[k * ldb + col - c0];
            if (scale) sum *= scale[i];
            c[i][col] = add ? c[i][col] + sum : sum;
        }
}

// the width of the column panel of an (inner x N) operand that starts at column c0: all 4 vectors
// where N is 4 vectors, else 3 vectors, then 1, then the scalar rest. The one partition that
// packing (pack_panels) and both kinds of tiles (tile_row, outer_acc) walk.
inline int64_t panel_width(int64_t N, int64_t c0) {
    if (N == 4 * W) return N;
    if (c0 + 3 * W <= N) return 3 * W;
    if (c0 + W <= N) return W;
    return N - c0;
}

// B (inner K x N) panel-major, as tile_operands packs it: each column panel (panel_width) a
// contiguous (K x width) block at B + c0 * K, read by its tile in order. (Read in place from a
// row-major B, rows ldb apart, the tiles of the output projection ran at ~110 GFLOP/s: W_O's
// rows 3 KB apart fall on a few of L1's sets, so a tile's 64 x 48 block missed L1.)
template <int MR>
void tile_row(const float* const* a, int64_t K, const float* B, int64_t N, float* const* c, bool add,
              const float* scale) {
    for (int64_t c0 = 0; c0 < N; c0 += panel_width(N, c0)) {
        const int64_t w = panel_width(N, c0);
        const float* P = B + c0 * K;
        if constexpr (MR <= 6) {
            if (w == 4 * W) {
                tile<MR, 4>(a, K, P, w, c0, c, add, scale);
                continue;
            }
        }
        if (w == 3 * W)
            tile<MR, 3>(a, K, P, w, c0, c, add, scale);
        else if (w == W)
            tile<MR, 1>(a, K, P, w, c0, c, add, scale);
        else
            tile_tail(MR, a, K, P, w, c0, c0 + w, c, add, scale);
    }
}

// rows per tile: 6 where N is 4 vectors (6 x 4 vectors of C), else 8 (8 x 3)
inline int tile_rows(int64_t N) { return N == 4 * W ? 6 : 8; }

// C rows [+]= (A rows @ B) [* scale rows] for m <= tile_rows(N) rows; scale: m factors or null
inline void tile_rows_any(int m, const float* const* a, int64_t K, const float* B, int64_t N,
                          float* const* c, bool add, const float* scale = nullptr) {
    switch (m) {
        case 8: tile_row<8>(a, K, B, N, c, add, scale); break;
        case 7: tile_row<7>(a, K, B, N, c, add, scale); break;
        case 6: tile_row<6>(a, K, B, N, c, add, scale); break;
        case 5: tile_row<5>(a, K, B, N, c, add, scale); break;
        case 4: tile_row<4>(a, K, B, N, c, add, scale); break;
        case 3: tile_row<3>(a, K, B, N, c, add, scale); break;
        case 2: tile_row<2>(a, K, B, N, c, add, scale); break;
        case 1: tile_row<1>(a, K, B, N, c, add, scale); break;
        default: break;
    }
}

// ---- register tiles for weight gradients: C [rows x N] += sum over k of a_k b_k^T ----
//
// Each k (a gathered row) gives a column of A (MR consecutive floats at a0 + row(k) * lda) and a
// row of B (N consecutive floats at b0 + row(k) * ldb), row(k) = rk[k] (rows given: the gathered
// rows of x, read where they lie) or k; the rank-1 updates are summed in registers and added to C
// once. dW_Q[h] (64 x D) += E^T X_rows: A = E (a0 + k * 64 + r), B = x's rows; dW_O[:, h] (D x 64)
// += X_rows^T E: A = x's rows, B = E. sgemm needs the rows gathered into a copy first. Alone (10
// heads x 820 of 2048 rows, D=768, hd=64; tiles / sgemm, ms): dW_Q 6.1-6.5 / 6.4, dW_O with its
// product dY 11.9-12.5 / 12.9 at 1 thread; 3.2 / 3.5 and 6.3 / 7.7 at 2 threads.
template <int MR, int NV, bool RA, bool RB>
inline void outer_tile(int64_t k0, int64_t k1, const int64_t* rk, const float* a0, int64_t lda, const float* b0,
                       int64_t ldb, float* const* c) {
    vf acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = vf{};
    for (int64_t k = k0; k < k1; ++k) {
        const float* a = a0 + (RA ? rk[k] : k) * lda;
        const float* b = b0 + (RB ? rk[k] : k) * ldb;
        vf bv[NV];
        for (int v = 0; v < NV; ++v) bv[v] = load(b + W * v);
        for (int i = 0; i < MR; ++i) {
            const vf x = broadcast(a + i);
            for (int v = 0; v < NV; ++v) acc[i][v] += x * bv[v];
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) store(c[i] + W * v, load(c[i] + W * v) + acc[i][v]);
}

template <int MR, bool RA, bool RB>
inline void outer_panel(int64_t w, int64_t k0, int64_t k1, const int64_t* rk, const float* a0, int64_t lda,
                        const float* b0, int64_t ldb, float* const* c) {
    if constexpr (MR <= 6) {
        if (w == 4 * W) return outer_tile<MR, 4, RA, RB>(k0, k1, rk, a0, lda, b0, ldb, c);
    }
    if (w == 3 * W) return outer_tile<MR, 3, RA, RB>(k0, k1, rk, a0, lda, b0, ldb, c);
    if (w == W) return outer_tile<MR, 1, RA, RB>(k0, k1, rk, a0, lda, b0, ldb, c);
    for (int i = 0; i < MR; ++i)  // fewer than W columns: one at a time
        for (int64_t col = 0; col < w; ++col) {
            float sum = 0.0f;
            for (int64_t k = k0; k < k1; ++k)
                sum += a0[(RA ? rk[k] : k) * lda + i] * b0[(RB ? rk[k] : k) * ldb + col];
            c[i][col] += sum;
        }
}

template <bool RA, bool RB>
void outer_rows(int m, int64_t w, int64_t k0, int64_t k1, const int64_t* rk, const float* a0, int64_t lda,
                const float* b0, int64_t ldb, float* const* c) {
    switch (m) {
        case 8: outer_panel<8, RA, RB>(w, k0, k1, rk, a0, lda, b0, ldb, c); break;
        case 7: outer_panel<7, RA, RB>(w, k0, k1, rk, a0, lda, b0, ldb, c); break;
        case 6: outer_panel<6, RA, RB>(w, k0, k1, rk, a0, lda, b0, ldb, c); break;
        case 5: outer_panel<5, RA, RB>(w, k0, k1, rk, a0, lda, b0, ldb, c); break;
        case 4: outer_panel<4, RA, RB>(w, k0, k1, rk, a0, lda, b0, ldb, c); break;
        case 3: outer_panel<3, RA, RB>(w, k0, k1, rk, a0, lda, b0, ldb, c); break;
        case 2: outer_panel<2, RA, RB>(w, k0, k1, rk, a0, lda, b0, ldb, c); break;
        case 1: outer_panel<1, RA, RB>(w, k0, k1, rk, a0, lda, b0, ldb, c); break;
        default: break;
    }
}

// C (rows x N, ldc) += sum over k in [k0, k1) of A's column k (rows floats) times B's row k (N
// floats), A's and B's k-th at a0 / b0 + row(k) * ld, row(k) = rk[k] for the operand marked
// (`rows_of_a`: A, else B) and k for the other; k in chunks of 256 (a chunk's operand rows stay
// near while every tile of C reads them; 64 / 128 / 256: dW_Q above 6.5 / 6.3 / 6.1 ms), each tile
// of C updated once per chunk.
void outer_acc(int64_t rows, int64_t N, int64_t k0, int64_t k1, const int64_t* rk, bool rows_of_a, const float* a0,
               int64_t lda, const float* b0, int64_t ldb, float* C, int64_t ldc) {
    float* cr[8];
    for (int64_t kc = k0; kc < k1; kc += 256) {
        const int64_t kd = std::min(k1, kc + 256);
        for (int64_t c0 = 0; c0 < N; c0 += panel_width(N, c0)) {
            const int64_t w = panel_width(N, c0);
            const int mr = tile_rows(w);
            for (int64_t r0 = 0; r0 < rows; r0 += mr) {
                const int m = static_cast<int>(std::min<int64_t>(mr, rows - r0));
                for (int i = 0; i < m; ++i) cr[i] = C + (r0 + i) * ldc + c0;
                if (rk == nullptr)
                    outer_rows<false, false>(m, w, kc, kd, rk, a0 + r0, lda, b0 + c0, ldb, cr);
                else if (rows_of_a)
                    outer_rows<true, false>(m, w, kc, kd, rk, a0 + r0, lda, b0 + c0, ldb, cr);
                else
                    outer_rows<false, true>(m, w, kc, kd, rk, a0 + r0, lda, b0 + c0, ldb, cr);
            }
        }
    }
}

// dst = op(src) (inner x N) panel-major (tile_row): src stored (inner x N) with ld (trans 0) or
// (N x inner) with ld (trans 1, a weight block stored the other way: 16 source rows read at a time,
// each in order)
void pack_panels(const float* src, int64_t ld, bool trans, int64_t inner, int64_t N, float* dst) {
    for (int64_t c0 = 0; c0 < N;) {
        const int64_t w = panel_width(N, c0);
        float* d = dst + c0 * inner;
        for (int64_t s0 = c0; s0 < c0 + w; s0 += 16) {
            const int64_t s1 = std::min(c0 + w, s0 + 16);
            for (int64_t k = 0; k < inner; ++k)
                for (int64_t col = s0; col < s1; ++col)
                    d[k * w + col - c0] = trans ? src[col * ld + k] : src[k * ld + col];
        }
        c0 += w;
    }
}

// n floats of this thread's scratch memory, 64-byte aligned, kept between calls (grown as
// needed): a fresh block of megabytes per call is fresh pages from the system (page faults: in a
// layer's output projection at N=2048, ~2100 faults and ~4 ms per call). Slot 0: the packed
// weight blocks (the calling thread), slot 1: a thread's row buffer inside a parallel region.
float* scratch(int slot, int64_t n) {
    thread_local std::unique_ptr<float, decltype(&std::free)> buf[2] = {{nullptr, std::free}, {nullptr, std::free}};
    thread_local int64_t size[2] = {0, 0};
    if (n > size[slot]) {
        const int64_t grown = padded(std::max<int64_t>(n, 2 * size[slot]));
        buf[slot].reset(static_cast<float*>(std::aligned_alloc(64, grown * sizeof(float))));
        if (!buf[slot]) throw std::bad_alloc();
        size[slot] = grown;
    }
    return buf[slot].get();
}

// B of every piece as (inner x N) panel-major (tile_row): in place where stored so (one panel,
// row-major, not transposed: the query projection's 64 columns of a head), else packed into this
// thread's scratch (pieces in parallel). `use[j]` false: not needed.
void tile_operands(int64_t J, const int64_t* b, const int64_t* ldb, const int64_t* b_trans,
                   const std::vector<int64_t>& inner, const std::vector<int64_t>& N, const std::vector<char>& use,
                   std::vector<const float*>& out, int threads) {
    std::vector<int64_t> off(J + 1, 0), same(J, -1);
    std::vector<char> pack(J, 0);
    for (int64_t j = 0; j < J; ++j)
        pack[j] = use[j] && (b_trans[j] || ldb[j] != N[j] || panel_width(N[j], 0) != N[j]);
    // pieces with the same weight block (one head's rows of several items) share one packed copy
    for (int64_t j = 0; j < J; ++j)
        for (int64_t i = j - 1; i >= 0 && pack[j]; --i)
            if (pack[i] && b[i] == b[j] && ldb[i] == ldb[j] && b_trans[i] == b_trans[j] && inner[i] == inner[j] &&
                N[i] == N[j]) {
                same[j] = same[i] >= 0 ? same[i] : i;
                break;
            }
    // each piece's block on a 64-byte boundary, as a tensor's: vector loads that straddle two
    // cache lines made the tiles ~18% slower
    for (int64_t j = 0; j < J; ++j) off[j + 1] = off[j] + (pack[j] && same[j] < 0 ? padded(inner[j] * N[j]) : 0);
    float* buf = scratch(0, off[J]);
    out.assign(J, nullptr);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t j = 0; j < J; ++j) {
        if (!use[j] || same[j] >= 0) continue;
        const float* B = reinterpret_cast<const float*>(b[j]);
        if (pack[j]) {
            pack_panels(B, ldb[j], b_trans[j] != 0, inner[j], N[j], buf + off[j]);
            out[j] = buf + off[j];
        } else {
            out[j] = B;
        }
    }
    for (int64_t j = 0; j < J; ++j)
        if (same[j] >= 0) out[j] = out[same[j]];
}

}  // namespace

extern "C" {

// out (n, D) row-major (ld D) [+]= sum_j scatter of A_j op(B_j): out[rows_j[i]] += A_j[i] op(B_j)
// [* scale_j[i * scale_stride_j]]; A_j (count_j x k_j, lda_j); op(B_j) (k_j x D): B_j stored
// (k_j x D) with ldb_j (b_trans 0) or (D x k_j) with ldb_j (b_trans 1); scale_j null: no factor.
// zero: out starts at 0 (else it is added to). Token blocks in parallel: each thread owns its
// blocks of out.
void moh_scatter_mm(float* out, int64_t n, int64_t D, int64_t J, const int64_t* rows, const int64_t* count,
                    const int64_t* a, const int64_t* lda, const int64_t* k, const int64_t* b, const int64_t* ldb,
                    const int64_t* b_trans, const int64_t* scale, const int64_t* scale_stride, int zero,
                    int64_t tblock, int64_t mblock, int tiles, int threads) {
    const int64_t nblk = (n + tblock - 1) / tblock;
    std::vector<const float*> bt;
    if (tiles)
        tile_operands(J, b, ldb, b_trans, std::vector<int64_t>(k, k + J), std::vector<int64_t>(J, D),
                      std::vector<char>(J, 1), bt, threads);
    const int mr = tile_rows(D);
    // with tiles, a first piece of every row writes the zeroed block instead of adding to zeros
    const bool assign_first = tiles && zero && J > 0 && rows[0] == 0;
#pragma omp parallel num_threads(threads)
    {
        float* tmp = tiles ? nullptr : scratch(1, mblock * D);
#pragma omp for schedule(dynamic, 1)
        for (int64_t tb = 0; tb < nblk; ++tb) {
            const int64_t t0 = tb * tblock, t1 = std::min(n, t0 + tblock);
            if (zero && !assign_first) std::fill(out + t0 * D, out + t1 * D, 0.0f);
            for (int64_t j = 0; j < J; ++j) {
                const float* A = reinterpret_cast<const float*>(a[j]);
                const float* B = reinterpret_cast<const float*>(b[j]);
                const int kk = static_cast<int>(k[j]);
                const int64_t* R = reinterpret_cast<const int64_t*>(rows[j]);
                const int64_t r0 = R ? first_at_least(R, count[j], t0) : t0;
                const int64_t r1 = R ? first_at_least(R, count[j], t1) : t1;
                if (r1 <= r0) continue;
                const float* G = reinterpret_cast<const float*>(scale[j]);  // row factors or null
                if (tiles) {  // A's rows in place, added to out's rows where they lie
                    const float* ar[8];
                    float* cr[8];
                    float gr[8];
                    for (int64_t s = r0; s < r1; s += mr) {
                        const int m = static_cast<int>(std::min<int64_t>(mr, r1 - s));
                        for (int i = 0; i < m; ++i) {
                            ar[i] = A + (s + i) * lda[j];
                            cr[i] = out + (R ? R[s + i] : s + i) * D;
                            if (G) gr[i] = G[(s + i) * scale_stride[j]];
                        }
                        tile_rows_any(m, ar, kk, bt[j], D, cr, !(assign_first && j == 0), G ? gr : nullptr);
                    }
                    continue;
                }
                if (!R && !G) {  // every row, in order: straight into out
                    gemm_rm(false, b_trans[j] != 0, t1 - t0, D, kk, 1.0f, A + t0 * lda[j], lda[j], B, ldb[j], 1.0f,
                            out + t0 * D, D);
                    continue;
                }
                for (int64_t s = r0; s < r1; s += mblock) {
                    const int64_t m = std::min(mblock, r1 - s);
                    gemm_rm(false, b_trans[j] != 0, m, D, kk, 1.0f, A + s * lda[j], lda[j], B, ldb[j], 0.0f,
                            tmp, D);
                    for (int64_t i = 0; i < m; ++i) {
                        float* o = out + (R ? R[s + i] : s + i) * D;
                        const float* c = tmp + i * D;
                        const float f = G ? G[(s + i) * scale_stride[j]] : 1.0f;
#pragma omp simd
                        for (int64_t d = 0; d < D; ++d) o[d] += f * c[d];
                    }
                }
            }
        }
    }
}

// For every piece j, with X_j = the rows rows_j of x (n, D) row-major (ld D):
//   c_j (count_j x k_j, ldc_j) = X_j op(B_j), op(B_j) D x k_j: B_j stored (D x k_j) with ldb_j
//   (b_trans 0) or (k_j x D) (b_trans 1); skipped where c_j is null;
//   g_j += E_j^T X_j (k_j x D, g_trans 0) or X_j^T E_j (D x k_j, g_trans 1), E_j (count_j x k_j,
//   lde_j), g_j with ldg_j; skipped where g_j is null (the weight gradient of a head).
// Pieces in parallel (each thread owns its pieces' c and g), each thread walking the row blocks
// of x in order for all of its pieces; with fewer pieces than threads, the row blocks in parallel
// and g summed over the threads at the end.
void moh_gather_mm(const float* x, int64_t n, int64_t D, int64_t J, const int64_t* rows, const int64_t* count,
                   const int64_t* c, const int64_t* ldc, const int64_t* k, const int64_t* b, const int64_t* ldb,
                   const int64_t* b_trans, const int64_t* e, const int64_t* lde, const int64_t* g, const int64_t* ldg,
                   const int64_t* g_trans, int64_t tblock, int64_t mblock, int tiles, int threads) {
    const int64_t nblk = (n + tblock - 1) / tblock;
    // with tiles: products and weight gradients read x's rows in place (no gathered copy)
    std::vector<char> tiled(J, 0);
    for (int64_t j = 0; j < J; ++j) tiled[j] = tiles && c[j] != 0;
    std::vector<const float*> bt;
    if (tiles)
        tile_operands(J, b, ldb, b_trans, std::vector<int64_t>(J, D), std::vector<int64_t>(k, k + J), tiled, bt,
                      threads);
    const bool by_piece = J >= threads || threads == 1;
    // per extra thread, a private weight gradient per piece (only when row blocks run in parallel)
    std::vector<int64_t> goff(J + 1, 0);
    for (int64_t j = 0; j < J; ++j) goff[j + 1] = goff[j] + (g[j] != 0 ? k[j] * D : 0);
    const int nbuf = by_piece ? 0 : threads - 1;
    std::vector<float> extra(static_cast<size_t>(nbuf) * goff[J], 0.0f);
    auto block = [&](int64_t tb, int64_t j, float* xtmp, float* gpriv) {
        const int64_t t0 = tb * tblock, t1 = std::min(n, t0 + tblock);
        const int64_t* R = reinterpret_cast<const int64_t*>(rows[j]);
        const int64_t r0 = R ? first_at_least(R, count[j], t0) : t0;
        const int64_t r1 = R ? first_at_least(R, count[j], t1) : t1;
        const int kk = static_cast<int>(k[j]);
        if (tiles) {
            if (tiled[j]) {
                const int mr = tile_rows(kk);
                const float* ar[8];
                float* cr[8];
                float* C = reinterpret_cast<float*>(c[j]);
                for (int64_t s = r0; s < r1; s += mr) {
                    const int m = static_cast<int>(std::min<int64_t>(mr, r1 - s));
                    for (int i = 0; i < m; ++i) {
                        ar[i] = x + (R ? R[s + i] : s + i) * D;
                        cr[i] = C + (s + i) * ldc[j];
                    }
                    tile_rows_any(m, ar, D, bt[j], kk, cr, false);
                }
            }
            if (g[j] != 0 && r1 > r0) {  // this block's rows' share of the weight gradient
                // operand row s: E's row s and x's row R[s] (R null: s)
                const float* E = reinterpret_cast<const float*>(e[j]);
                float* G = gpriv ? gpriv + goff[j] : reinterpret_cast<float*>(g[j]);
                const int64_t ld = gpriv ? (g_trans[j] ? kk : D) : ldg[j];
                if (g_trans[j])  // G (D x k) += X^T E: A = x's rows, B = E's rows
                    outer_acc(D, kk, r0, r1, R, true, x, D, E, lde[j], G, ld);
                else  // G (k x D) += E^T X: A = E's rows, B = x's rows
                    outer_acc(kk, D, r0, r1, R, false, E, lde[j], x, D, G, ld);
            }
            return;
        }
        for (int64_t s = r0; s < r1; s += mblock) {
            const int64_t m = std::min(mblock, r1 - s);
            const float* X = x + s * D;  // rows in order: the operand in place
            if (R) {
                for (int64_t i = 0; i < m; ++i) std::memcpy(xtmp + i * D, x + R[s + i] * D, D * sizeof(float));
                X = xtmp;
            }
            if (c[j] != 0)
                gemm_rm(false, b_trans[j] != 0, m, kk, D, 1.0f, X, D, reinterpret_cast<const float*>(b[j]), ldb[j],
                        0.0f, reinterpret_cast<float*>(c[j]) + s * ldc[j], ldc[j]);
            if (g[j] != 0) {
                const float* E = reinterpret_cast<const float*>(e[j]) + s * lde[j];
                float* G = gpriv ? gpriv + goff[j] : reinterpret_cast<float*>(g[j]);
                const int64_t ld = gpriv ? (g_trans[j] ? kk : D) : ldg[j];
                if (g_trans[j])
                    gemm_rm(true, false, D, kk, m, 1.0f, X, D, E, lde[j], 1.0f, G, ld);
                else
                    gemm_rm(true, false, kk, D, m, 1.0f, E, lde[j], X, D, 1.0f, G, ld);
            }
        }
    };
#pragma omp parallel num_threads(threads)
    {
        float* xtmp = tiles ? nullptr : scratch(1, mblock * D);
        if (by_piece) {
            const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
            for (int64_t tb = 0; tb < nblk; ++tb)
                for (int64_t j = tid; j < J; j += nt) block(tb, j, xtmp, nullptr);
        } else {
            const int tid = omp_get_thread_num();
            float* gpriv = tid == 0 ? nullptr : extra.data() + (tid - 1) * goff[J];
#pragma omp for schedule(dynamic, 1)
            for (int64_t tb = 0; tb < nblk; ++tb)
                for (int64_t j = 0; j < J; ++j) block(tb, j, xtmp, gpriv);
        }
    }
    for (int t = 0; t < nbuf; ++t)
        for (int64_t j = 0; j < J; ++j) {
            if (g[j] == 0) continue;
            const float* src = extra.data() + t * goff[J] + goff[j];
            float* G = reinterpret_cast<float*>(g[j]);
            const int64_t rws = g_trans[j] ? D : k[j], cols = g_trans[j] ? k[j] : D;
            for (int64_t r = 0; r < rws; ++r)
                for (int64_t q = 0; q < cols; ++q) G[r * ldg[j] + q] += src[r * cols + q];
        }
}

// The tokens that use each of P heads, per item: active (B, T, H) 0/1 bytes with strides (sb,
// st, 1); for item b and head heads[p], its tokens in ascending order into tokens[(b * P + p) * M
// ...], then T - 1 up to M (rows stay ascending), and their number into counts[b * P + p]. M must
// be at least every count. Also per row: flat = b * T + token, its position (positions (B, T)
// int64 with strides (psb, pst)), valid (1 for a real row, 0 for padding), and gidx = flat * H +
// heads[p] (the row's gate in (B, T, H), row-major). The sparse backend's row lists, where
// torch's operations (index, nonzero, cumsum, index_put, gather, ...) took ~0.8 ms for 10 heads of
// 2048 tokens on one thread.
void moh_head_rows(const uint8_t* active, int64_t B, int64_t T, int64_t H, int64_t sb, int64_t st,
                   const int64_t* heads, int64_t P, int64_t M, const int64_t* positions, int64_t psb, int64_t pst,
                   int64_t* tokens, int64_t* counts, int64_t* flat, int64_t* pos, uint8_t* valid, int64_t* gidx,
                   int threads) {
#pragma omp parallel num_threads(B * P * T >= (1 << 20) ? threads : 1)
    {
    std::vector<int64_t> buf(T + 1);  // every token written, the count advanced by its flag: no branch
#pragma omp for schedule(static)
    for (int64_t bp = 0; bp < B * P; ++bp) {
        const int64_t b = bp / P, h = heads[bp % P];
        const uint8_t* a = active + b * sb + h;
        int64_t c = 0;
        for (int64_t t = 0; t < T; ++t) {
            buf[c] = t;
            c += a[t * st] != 0;
        }
        c = std::min(c, M);
        counts[bp] = c;
        for (int64_t i = 0; i < M; ++i) {
            const int64_t t = i < c ? buf[i] : T - 1, r = bp * M + i;
            tokens[r] = t;
            flat[r] = b * T + t;
            pos[r] = positions[b * psb + t * pst];
            valid[r] = i < c;
            gidx[r] = (b * T + t) * H + h;
        }
    }
    }
}

}  // extern "C"
