// CPU kernels for decoding: weight-only INT8 / INT4 matrix products, y[M, N] = x[M, K] @ W[N, K]^T,
// and the attention of one new token per sequence over its cached keys and values.
//
// Decoding reads every weight once per token, so at small M the product is bound by memory
// bandwidth, not arithmetic: these loops stream the packed integers once, widen them to float in
// registers and never write a full-precision copy. Weights are in the portable layout of
// openglm/quant/linear.py (INT8 [N, K] with a bfloat16 scale per row; INT4 [N, K/2], column 2j in
// the low nibble of byte j, bfloat16 scales and optional uint8 zero points per group of columns).
// Activations stay float32: results match the float product of the dequantized weights up to
// summation order. Output rows are split across the caller's OpenMP threads (PyTorch's own pool
// when it is loaded first, as it is by openglm).
//
// Built with OPENGLM_TORCH_OPS (and PyTorch's stable C++ API headers), the file also registers
// them as the operators openglm::int8_matmul, int4_matmul, their three-product forms and
// decode_attention, so that a compiled graph calls them straight from C++.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define OPENGLM_AVX2 1
#endif

namespace {

inline float bf16(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

constexpr int64_t kRows = 16;  // output rows per task: their weights stay in L1 across row blocks of x
constexpr int64_t kAhead = 4;  // rows prefetched ahead: short streams from a far cache start late otherwise
constexpr int64_t kMaxProducts = 4;  // products of one x that one call takes (e.g. q, k, v)

#ifdef OPENGLM_AVX2
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline __m256 widen8(const int8_t* p) {  // 8 int8 -> 8 float
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// out[m] = x[m, :K] . w[:K] for MB rows of x; U independent accumulators per row hide FMA latency.
template <int MB, int U>
inline void dot_q8(const float* x, int64_t ldx, int64_t K, const int8_t* w, float* out) {
    __m256 acc[MB][U];
    for (int m = 0; m < MB; ++m)
        for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U) {
        for (int u = 0; u < U; ++u) {
            __m256 wv = widen8(w + k + 8 * u);
            for (int m = 0; m < MB; ++m)
                acc[m][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k + 8 * u), wv, acc[m][u]);
        }
    }
    for (; k < K; k += 8) {
        __m256 wv = widen8(w + k);
        for (int m = 0; m < MB; ++m) acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k), wv, acc[m][0]);
    }
    for (int m = 0; m < MB; ++m) {
        __m256 s = acc[m][0];
        for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[m][u]);
        out[m] = hsum(s);
    }
}

// INT4. x arrives quantized to int16 per (row, group): xq[m, k] = round(x / dx[m, g]), in chunks of
// 32 columns stored as the 16 even columns then the 16 odd ones (the order the nibbles unpack in);
// int16 keeps x to ~1.5e-5 of its group maximum, finer than the bfloat16 rounding of float kernels.
// Each 16-byte chunk: the nibbles (0..15) as int16 and multiplied with x pairwise into
// int32 (vpmaddwd, or VNNI's vpdpwssd: 16 products per instruction, exact); per group converted to
// float once and scaled by scale_g * dx[m, g]. The zero points come off at the end in one sum:
// sum_g scale_g * zero_g * cs[m, g], with cs[m, g] = dx[m, g] * (sum of xq over the group).
inline __m256i dot_pairs(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

template <int MB, bool ASYM, int GB>  // GB: bytes per group when known at compile time (unrolled), else 0
inline void dot_q4(const int16_t* xq, const float* dx, const float* cs, int64_t ldx, int64_t G, int64_t gb_,
                   const uint8_t* w, const uint16_t* scale, const uint8_t* zero, float* out) {
    const int64_t gb = GB ? GB : gb_;
    const __m256i low = _mm256_set1_epi16(15);
    __m256 acc[2][MB], corr[MB];  // two chains, alternate groups; the zero-point term
    for (int m = 0; m < MB; ++m) acc[0][m] = acc[1][m] = corr[m] = _mm256_setzero_ps();
    float tail[MB] = {};
    alignas(32) float sd[MB][8];  // scale_g * dx[m, g] for 8 groups
    auto group = [&](int64_t g, int64_t gi, __m256* a) __attribute__((always_inline)) {
        __m256i iacc[MB];
        for (int m = 0; m < MB; ++m) iacc[m] = _mm256_setzero_si256();
        for (int64_t j = g * gb; j < (g + 1) * gb; j += 16) {
            // 16 bytes widened once to 16-bit lanes (one shuffle); in each lane the low nibble and the byte >> 4
            const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j)));
            const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_srli_epi16(b, 4);
            for (int m = 0; m < MB; ++m) {
                const __m256i* xp = reinterpret_cast<const __m256i*>(xq + m * ldx + 2 * j);
                iacc[m] = dot_pairs(dot_pairs(iacc[m], lo, _mm256_loadu_si256(xp)), hi, _mm256_loadu_si256(xp + 1));
            }
        }
        for (int m = 0; m < MB; ++m)
            a[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m]), _mm256_broadcast_ss(&sd[m][gi]), a[m]);
    };
    for (int64_t g0 = 0; g0 < G; g0 += 8) {
        const int64_t ng = std::min<int64_t>(8, G - g0);
        if (ng == 8) {
            const __m256 sv = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + g0))), 16));
            const __m256 sz = ASYM ? _mm256_mul_ps(sv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                                           _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zero + g0)))))
                                   : _mm256_mul_ps(sv, _mm256_set1_ps(8.f));
            for (int m = 0; m < MB; ++m) {
                _mm256_store_ps(sd[m], _mm256_mul_ps(sv, _mm256_loadu_ps(dx + m * G + g0)));
                corr[m] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(cs + m * G + g0), corr[m]);
            }
        } else {
            for (int m = 0; m < MB; ++m)
                for (int64_t i = 0; i < ng; ++i) {
                    const float sc = bf16(scale[g0 + i]);
                    sd[m][i] = sc * dx[m * G + g0 + i];
                    tail[m] += sc * float(ASYM ? zero[g0 + i] : 8) * cs[m * G + g0 + i];
                }
        }
        int64_t gi = 0;
        for (; gi + 1 < ng; gi += 2) {
            group(g0 + gi, gi, acc[0]);
            group(g0 + gi + 1, gi + 1, acc[1]);
        }
        if (gi < ng) group(g0 + gi, gi, acc[0]);
    }
    for (int m = 0; m < MB; ++m) out[m] = hsum(_mm256_add_ps(acc[0][m], acc[1][m])) - hsum(corr[m]) - tail[m];
}
#else
template <int MB, int U>
inline void dot_q8(const float* x, int64_t ldx, int64_t K, const int8_t* w, float* out) {
    for (int m = 0; m < MB; ++m) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += x[m * ldx + k] * float(w[k]);
        out[m] = s;
    }
}

template <int MB, bool ASYM, int GB>
inline void dot_q4(const int16_t* xq, const float* dx, const float*, int64_t ldx, int64_t G, int64_t gb,
                   const uint8_t* w, const uint16_t* scale, const uint8_t* zero, float* out) {
    for (int m = 0; m < MB; ++m) {
        float total = 0.f;
        for (int64_t g = 0; g < G; ++g) {
            const int z = zero ? zero[g] : 8;
            int32_t s = 0;
            for (int64_t j = g * gb; j < (g + 1) * gb; ++j) {  // xq: chunks of 16 even then 16 odd columns
                const int16_t* c = xq + m * ldx + 2 * (j - j % 16);
                s += ((w[j] & 15) - z) * c[j % 16] + ((w[j] >> 4) - z) * c[16 + j % 16];
            }
            total += float(s) * bf16(scale[g]) * dx[m * G + g];
        }
        out[m] = total;
    }
}
#endif

// a . b and o += e * a over n floats.
inline float dot(const float* a, const float* b, int64_t n) {
    int64_t i = 0;
    float s = 0.f;
#ifdef OPENGLM_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    s = hsum(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

inline void axpy(float e, const float* a, float* o, int64_t n) {
    int64_t i = 0;
#ifdef OPENGLM_AVX2
    const __m256 ev = _mm256_set1_ps(e);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(ev, _mm256_loadu_ps(a + i), _mm256_loadu_ps(o + i)));
#endif
    for (; i < n; ++i) o[i] += e * a[i];
}

#ifdef OPENGLM_AVX2
// e^x for 8 floats, x <= 88 (Cephes' polynomial: within 2 ulp of expf); below -87 gives ~1e-38.
inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n ln2 in two parts
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// p[s] <- e^(p[s] - best), exactly 0 where p[s] is -inf (a hidden key); returns their sum.
inline float softmax_numerators(float* p, int64_t S, float best) {
    int64_t s = 0;
    float total = 0.f;
#ifdef OPENGLM_AVX2
    const __m256 bv = _mm256_set1_ps(best), hidden = _mm256_set1_ps(-INFINITY);
    __m256 acc = _mm256_setzero_ps();
    for (; s + 8 <= S; s += 8) {
        const __m256 x = _mm256_loadu_ps(p + s);
        const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, hidden, _CMP_EQ_OQ), exp8(_mm256_sub_ps(x, bv)));
        _mm256_storeu_ps(p + s, e);
        acc = _mm256_add_ps(acc, e);
    }
    total = hsum(acc);
#endif
    for (; s < S; ++s) {
        p[s] = p[s] == -INFINITY ? 0.f : std::exp(p[s] - best);
        total += p[s];
    }
    return total;
}

// p[s] = scale * q . k[s] for S keys (rows sks floats apart).
inline void attention_scores(const float* q, const float* k, int64_t sks, int64_t S, int64_t D, float scale, float* p) {
    int64_t s = 0;
#ifdef OPENGLM_AVX2
    if (D % 8 == 0) {  // 8 keys at a time, their 8 sums reduced together
        const __m256 sv = _mm256_set1_ps(scale);
        for (; s + 8 <= S; s += 8) {
            __m256 a[8];
            for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 qv = _mm256_loadu_ps(q + d);
                for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (s + j) * sks + d), a[j]);
            }
            const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
            const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
            _mm256_storeu_ps(p + s, _mm256_mul_ps(sum, sv));
        }
    }
#endif
    for (; s < S; ++s) p[s] = dot(q, k + s * sks, D) * scale;
}

// o = inv * sum_s p[s] v[s] (rows svs floats apart), 32 columns at a time.
inline void weighted_sum(const float* p, const float* v, int64_t svs, int64_t S, int64_t D, float inv, float* o) {
    int64_t d = 0;
#ifdef OPENGLM_AVX2
    for (; d + 32 <= D; d += 32) {  // two keys at a time into separate sums: twice the multiply-adds in flight
        __m256 a[2][4];
        for (int i = 0; i < 4; ++i) a[0][i] = a[1][i] = _mm256_setzero_ps();
        int64_t s = 0;
        for (; s + 2 <= S; s += 2)
            for (int t = 0; t < 2; ++t) {
                const __m256 e = _mm256_set1_ps(p[s + t]);  // hidden keys have p 0: adding 0 * v costs less than a branch
                for (int i = 0; i < 4; ++i)
                    a[t][i] = _mm256_fmadd_ps(e, _mm256_loadu_ps(v + (s + t) * svs + d + 8 * i), a[t][i]);
            }
        if (s < S) {
            const __m256 e = _mm256_set1_ps(p[s]);
            for (int i = 0; i < 4; ++i) a[0][i] = _mm256_fmadd_ps(e, _mm256_loadu_ps(v + s * svs + d + 8 * i), a[0][i]);
        }
        for (int i = 0; i < 4; ++i)
            _mm256_storeu_ps(o + d + 8 * i, _mm256_mul_ps(_mm256_add_ps(a[0][i], a[1][i]), _mm256_set1_ps(inv)));
    }
#endif
    std::fill(o + d, o + D, 0.f);
    for (int64_t s = 0; s < S; ++s)
        if (p[s] != 0.f) axpy(p[s], v + s * svs + d, o + d, D - d);
    for (; d < D; ++d) o[d] *= inv;
}

// Ask for a weight row's cache lines ahead of its use (a hint: addresses past the end are harmless).
inline void prefetch(const void* row, int64_t bytes) {
#ifdef OPENGLM_AVX2
    const char* p = static_cast<const char*>(row);
    for (int64_t k = 0; k < bytes; k += 64) _mm_prefetch(p + k, _MM_HINT_T0);
#else
    (void)row, (void)bytes;
#endif
}

template <int MB>
inline void rows_q8(const float* x, int64_t K, const int8_t* w, const uint16_t* scale, int64_t n0, int64_t n1,
                    int64_t N, float* y) {
    constexpr int U = MB <= 2 ? 4 : (MB <= 4 ? 2 : 1);
    float out[MB];
    for (int64_t n = n0; n < n1; ++n) {
        prefetch(w + (n + kAhead) * K, K);
        dot_q8<MB, U>(x, K, K, w + n * K, out);
        const float s = bf16(scale[n]);
        for (int m = 0; m < MB; ++m) y[m * N + n] = out[m] * s;
    }
}

template <int MB>
inline void rows_q4(const int16_t* xq, const float* dx, const float* cs, int64_t K, int64_t G, const uint8_t* w, const uint16_t* scale,
                    const uint8_t* zero, int64_t n0, int64_t n1, int64_t N, float* y) {
    const int64_t K2 = K / 2, gb = K2 / G;
    float out[MB];
    for (int64_t n = n0; n < n1; ++n) {
        prefetch(w + (n + kAhead) * K2, K2);
        const uint8_t* wn = w + n * K2;
        const uint16_t* sn = scale + n * G;
        const uint8_t* zn = zero ? zero + n * G : nullptr;
        if (zero) {
            if (gb == 16) dot_q4<MB, true, 16>(xq, dx, cs, K, G, gb, wn, sn, zn, out);
            else if (gb == 32) dot_q4<MB, true, 32>(xq, dx, cs, K, G, gb, wn, sn, zn, out);
            else dot_q4<MB, true, 0>(xq, dx, cs, K, G, gb, wn, sn, zn, out);
        } else {
            if (gb == 16) dot_q4<MB, false, 16>(xq, dx, cs, K, G, gb, wn, sn, zn, out);
            else if (gb == 32) dot_q4<MB, false, 32>(xq, dx, cs, K, G, gb, wn, sn, zn, out);
            else dot_q4<MB, false, 0>(xq, dx, cs, K, G, gb, wn, sn, zn, out);
        }
        for (int m = 0; m < MB; ++m) y[m * N + n] = out[m];
    }
}

// Several products of one x (e.g. a layer's q, k and v) in one team of threads: product i is
// y[i][M, N[i]] = x @ W_i^T, and its blocks of rows are tasks alongside the others'.
struct Tasks {
    int64_t count, first[kMaxProducts + 1];
    Tasks(int64_t n, const int64_t* N) : count(n) {
        first[0] = 0;
        for (int64_t i = 0; i < n; ++i) first[i + 1] = first[i] + (N[i] + kRows - 1) / kRows;
    }
    int64_t total() const { return first[count]; }
    int64_t product(int64_t t) const {  // which product task t belongs to
        int64_t i = 0;
        while (t >= first[i + 1]) ++i;
        return i;
    }
};

// body(i, n0, n1, m, rows) for each block of kRows output rows n0..n1 of product i and each block
// of up to 4 activation rows from m, the output blocks split across the threads.
template <typename Body>
void for_each_block(int64_t count, const int64_t* N, int64_t M, Body body) {
    const Tasks tasks(count, N);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tasks.total(); ++t) {
        const int64_t i = tasks.product(t);
        const int64_t n0 = (t - tasks.first[i]) * kRows, n1 = std::min(N[i], n0 + kRows);
        for (int64_t m = 0; m < M; m += 4) body(i, n0, n1, m, std::min<int64_t>(4, M - m));
    }
}

// Products with many activation rows (a prefill): x is quantized to int8 per (row, group) as
// llama.cpp's q8_0 does, and meets unsigned weight bytes (INT4 nibbles 0..15, or INT8 + 128) in an
// integer dot product (VNNI's vpdpbusd: 64 byte products per instruction, four times the float
// multiply-adds of a float product). A tile of kTileRows weight rows is unpacked once into the
// order the dot product reads (4 consecutive columns of 16 or 8 rows side by side) and reused over
// every row of x; the group's sum turns float once, scaled by scale_g * dx[m, g], the zero point
// coming off as zero_g * (sum of x's integers in the group).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int kLanes = 16;
using VecI = __m512i;
using VecF = __m512;
inline VecI vi_zero() { return _mm512_setzero_si512(); }
inline VecI vi_load(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline VecI vi_bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}
inline VecI dot_u8s8(VecI acc, VecI w, VecI x) { return _mm512_dpbusd_epi32(acc, w, x); }
#define OPENGLM_DPBUSD 1
inline VecF vf_zero() { return _mm512_setzero_ps(); }
inline VecF vf_load(const float* p) { return _mm512_loadu_ps(p); }
inline VecF vf_set(float v) { return _mm512_set1_ps(v); }
inline VecF vf_cvt(VecI v) { return _mm512_cvtepi32_ps(v); }
inline VecF vf_mul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF vf_fmadd(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF vf_fnmadd(VecF a, VecF b, VecF c) { return _mm512_fnmadd_ps(a, b, c); }
inline void vf_store(float* p, VecF v) { _mm512_storeu_ps(p, v); }
#define OPENGLM_Q4_BLOCKED 1
#elif defined(OPENGLM_AVX2)
constexpr int kLanes = 8;
using VecI = __m256i;
using VecF = __m256;
inline VecI vi_zero() { return _mm256_setzero_si256(); }
inline VecI vi_load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VecI vi_bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}
inline VecI dot_u8s8(VecI acc, VecI w, VecI x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define OPENGLM_DPBUSD 1
    return _mm256_dpbusd_epi32(acc, w, x);
#elif defined(__AVXVNNI__)
#define OPENGLM_DPBUSD 1
    return _mm256_dpbusd_avx_epi32(acc, w, x);
#else  // pairs of products into int16 (at most 2 * 15 * 127: never saturates), then pairs of those
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}
inline VecF vf_zero() { return _mm256_setzero_ps(); }
inline VecF vf_load(const float* p) { return _mm256_loadu_ps(p); }
inline VecF vf_set(float v) { return _mm256_set1_ps(v); }
inline VecF vf_cvt(VecI v) { return _mm256_cvtepi32_ps(v); }
inline VecF vf_mul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF vf_fmadd(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF vf_fnmadd(VecF a, VecF b, VecF c) { return _mm256_fnmadd_ps(a, b, c); }
inline void vf_store(float* p, VecF v) { _mm256_storeu_ps(p, v); }
#define OPENGLM_Q4_BLOCKED 1
#endif

#ifdef OPENGLM_Q4_BLOCKED
constexpr int kTileVecs = 2;                     // vectors of weight rows per tile
constexpr int kTileRows = kTileVecs * kLanes;    // weight rows unpacked at a time
constexpr int kRowBlock = 6;                     // rows of x per pass over the tile
constexpr int64_t kChunkBytes = 16 << 10;        // of the unpacked tile per pass: it stays in L1

// y[m0 + m, n0 : n0 + kTileRows] for MB rows of x over groups g0..g1 of one unpacked tile: wp
// [K/4][kTileRows][4] nibbles, sp / zp [G][kTileRows] scales and zero points; xq [M, K] int8, dx /
// xs [M, G] its scales and sums. Writes kTileRows floats per row to out (ldo apart), adding to
// what is there unless g0 is 0.
template <int MB>
inline void tile_dot(const int8_t* xq, const float* dx, const float* xs, int64_t K, int64_t G, int64_t g0, int64_t g1,
                    const uint8_t* wp, const float* sp, const float* zp, float* out, int64_t ldo) {
    const int64_t steps = K / G / 4;  // dot products of 4 columns per group
    VecF acc[MB][kTileVecs];
    for (int m = 0; m < MB; ++m)
        for (int v = 0; v < kTileVecs; ++v) acc[m][v] = g0 ? vf_load(out + m * ldo + v * kLanes) : vf_zero();
    for (int64_t g = g0; g < g1; ++g) {
        VecI ia[MB][kTileVecs];
        for (int m = 0; m < MB; ++m)
            for (int v = 0; v < kTileVecs; ++v) ia[m][v] = vi_zero();
        const uint8_t* wg = wp + g * steps * kTileRows * 4;
        const int8_t* xg = xq + g * steps * 4;
        for (int64_t s = 0; s < steps; ++s) {
            VecI wv[kTileVecs];
            for (int v = 0; v < kTileVecs; ++v) wv[v] = vi_load(wg + (s * kTileRows + v * kLanes) * 4);
            for (int m = 0; m < MB; ++m) {
                const VecI xb = vi_bcast4(xg + m * K + 4 * s);
                for (int v = 0; v < kTileVecs; ++v) ia[m][v] = dot_u8s8(ia[m][v], wv[v], xb);
            }
        }
        for (int v = 0; v < kTileVecs; ++v) {
            const VecF s = vf_load(sp + g * kTileRows + v * kLanes), z = vf_load(zp + g * kTileRows + v * kLanes);
            for (int m = 0; m < MB; ++m) {
                const VecF t = vf_fnmadd(z, vf_set(xs[m * G + g]), vf_cvt(ia[m][v]));  // exact: |sums| < 2^24
                acc[m][v] = vf_fmadd(t, vf_mul(s, vf_set(dx[m * G + g])), acc[m][v]);
            }
        }
    }
    for (int m = 0; m < MB; ++m)
        for (int v = 0; v < kTileVecs; ++v) vf_store(out + m * ldo + v * kLanes, acc[m][v]);
}
#endif

// x [M, K] taken to int8 per (row, group of K / G columns): q = round(x / d), d = (the group's
// largest |x|) / 127, and s the sum of the group's q.
struct RowsInt8 {
    int64_t M, K, G;
    std::vector<int8_t> q;
    std::vector<float> d, s;
    RowsInt8(const float* x, int64_t M_, int64_t K_, int64_t G_) : M(M_), K(K_), G(G_), q(M_ * K_), d(M_ * G_), s(M_ * G_) {
        const int64_t gs = K / G;
#pragma omp parallel for schedule(static)
        for (int64_t m = 0; m < M; ++m)
            for (int64_t g = 0; g < G; ++g) {
                const float* xg = x + m * K + g * gs;
                float amax = 0.f;
                for (int64_t k = 0; k < gs; ++k) amax = std::max(amax, std::fabs(xg[k]));
                const float step = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / step;
                int8_t* qg = q.data() + m * K + g * gs;
                int32_t sum = 0;
                for (int64_t k = 0; k < gs; ++k) {
                    qg[k] = int8_t(std::clamp<long>(std::lrintf(xg[k] * inv), -127, 127));
                    sum += qg[k];
                }
                d[m * G + g] = step;
                s[m * G + g] = float(sum);
            }
    }
};

#ifdef OPENGLM_Q4_BLOCKED
// y[M, N] = xq @ W^T, the weight unpacked a tile at a time by pack(n0, rows, wp, sp, zp) (rows of
// the tile that exist: from n0, at most kTileRows) into the layout of tile_dot; tiles split across threads.
template <typename Pack>
void tiled_product(const RowsInt8& xq, int64_t N, float* y, Pack pack) {
    const int64_t M = xq.M, K = xq.K, G = xq.G;
    const int64_t tiles = (N + kTileRows - 1) / kTileRows, chunk = std::max<int64_t>(1, kChunkBytes / (K / G * kTileRows));
    const int64_t rows_last = N % kTileRows ? M : 0;
#pragma omp parallel
    {
        std::vector<uint8_t> wp(K * kTileRows);
        std::vector<float> sp(G * kTileRows), zp(G * kTileRows), part(rows_last * kTileRows);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t n0 = t * kTileRows, rows = std::min<int64_t>(kTileRows, N - n0);
            pack(n0, rows, wp.data(), sp.data(), zp.data());
            const bool whole = rows == kTileRows;
            float* base = whole ? y + n0 : part.data();  // a last partial tile: all of x's rows aside, then copied
            const int64_t ldo = whole ? N : kTileRows;
            for (int64_t g0 = 0; g0 < G; g0 += chunk)
                for (int64_t m = 0; m < M; m += kRowBlock) {
                    const int64_t g1 = std::min(G, g0 + chunk);
                    const int8_t* xm = xq.q.data() + m * K;
                    const float *dm = xq.d.data() + m * G, *sm = xq.s.data() + m * G;
                    float* out = base + m * ldo;
                    switch (std::min<int64_t>(kRowBlock, M - m)) {
                        case 1: tile_dot<1>(xm, dm, sm, K, G, g0, g1, wp.data(), sp.data(), zp.data(), out, ldo); break;
                        case 2: tile_dot<2>(xm, dm, sm, K, G, g0, g1, wp.data(), sp.data(), zp.data(), out, ldo); break;
                        case 3: tile_dot<3>(xm, dm, sm, K, G, g0, g1, wp.data(), sp.data(), zp.data(), out, ldo); break;
                        case 4: tile_dot<4>(xm, dm, sm, K, G, g0, g1, wp.data(), sp.data(), zp.data(), out, ldo); break;
                        case 5: tile_dot<5>(xm, dm, sm, K, G, g0, g1, wp.data(), sp.data(), zp.data(), out, ldo); break;
                        default: tile_dot<6>(xm, dm, sm, K, G, g0, g1, wp.data(), sp.data(), zp.data(), out, ldo); break;
                    }
                }
            if (!whole)
                for (int64_t m = 0; m < M; ++m) std::copy_n(part.data() + m * kTileRows, rows, y + m * N + n0);
        }
    }
}
#endif

}  // namespace

extern "C" {

int openglm_kernels_version() { return 1; }


// y[i][M, N[i]] = x[M, K] @ (w[i][N[i], K] * scale[i][N[i], None])^T; K a multiple of 8; x, y float32, contiguous.
void openglm_q8_matmul_n(const float* x, int64_t M, int64_t K, int64_t count, const int8_t* const* w,
                         const uint16_t* const* scale, const int64_t* N, float* const* y) {
    for_each_block(count, N, M, [=](int64_t i, int64_t n0, int64_t n1, int64_t m, int64_t rows) {
        const float* xm = x + m * K;
        float* ym = y[i] + m * N[i];
        switch (rows) {
            case 1: rows_q8<1>(xm, K, w[i], scale[i], n0, n1, N[i], ym); break;
            case 2: rows_q8<2>(xm, K, w[i], scale[i], n0, n1, N[i], ym); break;
            case 3: rows_q8<3>(xm, K, w[i], scale[i], n0, n1, N[i], ym); break;
            default: rows_q8<4>(xm, K, w[i], scale[i], n0, n1, N[i], ym); break;
        }
    });
}

void openglm_q8_matmul(const float* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* scale, int64_t N,
                       float* y) {
    openglm_q8_matmul_n(x, M, K, 1, &w, &scale, &N, &y);
}

// INT4 with G groups per row: w[i][N[i], K/2] packed nibbles, scale[i][N[i], G] bfloat16, zero[i][N[i], G]
// uint8 or NULL (symmetric: 8). The group size K/G must be a multiple of 32, at most 8192 (int32 sums).
void openglm_q4_matmul_n(const float* x, int64_t M, int64_t K, int64_t count, const uint8_t* const* w,
                         const uint16_t* const* scale, const uint8_t* const* zero, int64_t G, const int64_t* N,
                         float* const* y) {
    const int64_t gs = K / G;
    std::vector<int16_t> xq(M * K);
    std::vector<float> dx(M * G), cs(M * G);
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t g = 0; g < G; ++g) {
            const float* xg = x + m * K + g * gs;
            float amax = 0.f;
            for (int64_t k = 0; k < gs; ++k) amax = std::max(amax, std::fabs(xg[k]));
            const float d = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / d;
            dx[m * G + g] = d;
            int16_t* q = xq.data() + m * K + g * gs;
            int64_t sum = 0;
            for (int64_t c = 0; c < gs; c += 32)
                for (int64_t i = 0; i < 16; ++i) {
                    q[c + i] = int16_t(std::lrintf(xg[c + 2 * i] * inv));
                    q[c + 16 + i] = int16_t(std::lrintf(xg[c + 2 * i + 1] * inv));
                    sum += q[c + i] + q[c + 16 + i];
                }
            cs[m * G + g] = d * float(sum);
        }
    }
    const int16_t* xqp = xq.data();
    const float *dxp = dx.data(), *csp = cs.data();
    for_each_block(count, N, M, [=](int64_t i, int64_t n0, int64_t n1, int64_t m, int64_t rows) {
        const int16_t* q = xqp + m * K;
        const float* d = dxp + m * G;
        const float* c = csp + m * G;
        float* ym = y[i] + m * N[i];
        switch (rows) {
            case 1: rows_q4<1>(q, d, c, K, G, w[i], scale[i], zero[i], n0, n1, N[i], ym); break;
            case 2: rows_q4<2>(q, d, c, K, G, w[i], scale[i], zero[i], n0, n1, N[i], ym); break;
            case 3: rows_q4<3>(q, d, c, K, G, w[i], scale[i], zero[i], n0, n1, N[i], ym); break;
            default: rows_q4<4>(q, d, c, K, G, w[i], scale[i], zero[i], n0, n1, N[i], ym); break;
        }
    });
}

void openglm_q4_matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scale,
                       const uint8_t* zero, int64_t G, int64_t N, float* y) {
    openglm_q4_matmul_n(x, M, K, 1, &w, &scale, &zero, G, &N, &y);
}

// Dequantize rows n0..n1 of a weight into float32 out[(n1 - n0), K]: for products with many
// activation rows (prefill), where a float matrix product on a block of weights beats the loops above.
void openglm_q8_dequant(const int8_t* w, const uint16_t* scale, int64_t K, int64_t n0, int64_t n1, float* out) {
#pragma omp parallel for schedule(static)
    for (int64_t n = n0; n < n1; ++n) {
        const float s = bf16(scale[n]);
        float* o = out + (n - n0) * K;
        for (int64_t k = 0; k < K; ++k) o[k] = float(w[n * K + k]) * s;
    }
}

void openglm_q4_dequant(const uint8_t* w, const uint16_t* scale, const uint8_t* zero, int64_t G, int64_t K,
                        int64_t n0, int64_t n1, float* out) {
    const int64_t gs = K / G;
#pragma omp parallel for schedule(static)
    for (int64_t n = n0; n < n1; ++n) {
        float* o = out + (n - n0) * K;
        const uint8_t* wn = w + n * (K / 2);
        for (int64_t g = 0; g < G; ++g) {
            const float s = bf16(scale[n * G + g]);
            const int z = zero ? zero[n * G + g] : 8;
            for (int64_t k = g * gs; k < (g + 1) * gs; k += 2) {
                const uint8_t b = wn[k / 2];
                o[k] = float((b & 15) - z) * s;
                o[k + 1] = float((b >> 4) - z) * s;
            }
        }
    }
}

// y[M, N] = x[M, K] @ W^T for the INT4 weight of openglm_q4_matmul, with x taken to int8 per (row,
// group): for products with many rows of x (a prefill), where arithmetic, not reading the weight,
// bounds the time. y differs from the float product of the dequantized weight by at most
// sum_k |w[n, k]| * dx[m, g(k)] / 2, dx = (the group's largest |x|) / 127, plus float rounding.
void openglm_q4_prefill_matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scale,
                               const uint8_t* zero, int64_t G, int64_t N, float* y) {
    const int64_t K2 = K / 2;
    const RowsInt8 xq(x, M, K, G);
#ifdef OPENGLM_Q4_BLOCKED
    tiled_product(xq, N, y, [=](int64_t n0, int64_t rows, uint8_t* wp, float* sp, float* zp) {
        for (int64_t r = 0; r < kTileRows; ++r) {  // rows past N: zeros, computed and dropped
            for (int64_t j = 0; j < K2; j += 2) {
                uint8_t* o = wp + ((j / 2) * kTileRows + r) * 4;
                const uint8_t b0 = r < rows ? w[(n0 + r) * K2 + j] : 0, b1 = r < rows ? w[(n0 + r) * K2 + j + 1] : 0;
                o[0] = b0 & 15, o[1] = b0 >> 4, o[2] = b1 & 15, o[3] = b1 >> 4;
            }
            for (int64_t g = 0; g < G; ++g) {
                sp[g * kTileRows + r] = r < rows ? bf16(scale[(n0 + r) * G + g]) : 0.f;
                zp[g * kTileRows + r] = r >= rows ? 0.f : zero ? float(zero[(n0 + r) * G + g]) : 8.f;
            }
        }
    });
#else
    const int64_t gs = K / G;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t m = 0; m < M; ++m) {
            float total = 0.f;
            for (int64_t g = 0; g < G; ++g) {
                const int z = zero ? zero[n * G + g] : 8;
                int32_t s = 0;
                for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
                    const uint8_t b = w[n * K2 + k / 2];
                    s += ((k % 2 ? b >> 4 : b & 15) - z) * xq.q[m * K + k];
                }
                total += float(s) * bf16(scale[n * G + g]) * xq.d[m * G + g];
            }
            y[m * N + n] = total;
        }
#endif
}

#ifdef OPENGLM_DPBUSD
// The same for the INT8 weight of openglm_q8_matmul (K a multiple of 32), x taken to int8 per (row,
// 32 columns). The weight is made unsigned (w + 128, what vpdpbusd multiplies) and the 128 comes
// off as a zero point. Only where the CPU has VNNI: without it, pairs of such products overflow
// the int16 sums of vpmaddubsw, and openglm_q8_prefill_available() is 0.
int openglm_q8_prefill_available() { return 1; }

void openglm_q8_prefill_matmul(const float* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* scale,
                               int64_t N, float* y) {
    const int64_t G = K / 32;
    const RowsInt8 xq(x, M, K, G);
    tiled_product(xq, N, y, [=](int64_t n0, int64_t rows, uint8_t* wp, float* sp, float* zp) {
        for (int64_t r = 0; r < kTileRows; ++r) {
            for (int64_t k = 0; k < K; k += 4) {
                uint8_t* o = wp + ((k / 4) * kTileRows + r) * 4;
                for (int i = 0; i < 4; ++i) o[i] = r < rows ? uint8_t(w[(n0 + r) * K + k + i] + 128) : 0;
            }
            const float s = r < rows ? bf16(scale[n0 + r]) : 0.f;
            for (int64_t g = 0; g < G; ++g) {
                sp[g * kTileRows + r] = s;
                zp[g * kTileRows + r] = r < rows ? 128.f : 0.f;
            }
        }
    });
}
#else
int openglm_q8_prefill_available() { return 0; }
#endif

// Attention of one query per (sequence, head) over S cached keys: out[b, h] = softmax(scale * q.K^T) V
// over the keys mask[b, s] marks visible (all when mask is NULL); head h reads key/value head
// h / (H / KH). Strides in elements; the last dim of q, k and v is contiguous. A row that sees no key
// gets zeros. Heads are split across threads from 4096 multiply-adds on (measured 1.3% faster decode
// steps for 12 heads over 96 keys than one thread).
void openglm_decode_attention(const float* q, int64_t sqb, int64_t sqh, const float* k, int64_t skb, int64_t skh,
                              int64_t sks, const float* v, int64_t svb, int64_t svh, int64_t svs, const bool* mask,
                              int64_t smb, int64_t sms, int64_t B, int64_t H, int64_t KH, int64_t S, int64_t D,
                              float scale, float* out) {
    const int64_t group = H / KH;
#pragma omp parallel for schedule(static) if (B * H * S * D >= (1 << 12))
    for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H, kh = h / group;
        const bool* mp = mask ? mask + b * smb : nullptr;
        thread_local std::vector<float> buf;
        buf.resize(S);
        float* p = buf.data();
        attention_scores(q + b * sqb + h * sqh, k + b * skb + kh * skh, sks, S, D, scale, p);
        float best = -INFINITY;
        for (int64_t s = 0; s < S; ++s) {
            if (mp && !mp[s * sms]) p[s] = -INFINITY;
            best = std::max(best, p[s]);
        }
        float* o = out + bh * D;
        if (best == -INFINITY) {
            std::fill(o, o + D, 0.f);
            continue;
        }
        const float total = softmax_numerators(p, S, best);
        weighted_sum(p, v + b * svb + kh * svh, svs, S, D, 1.f / total, o);
    }
}

}  // extern "C"


#ifdef OPENGLM_TORCH_OPS
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <tuple>

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

Tensor float32(const Tensor& x) {  // a float32 row-major copy of x where it is not one already
    const Tensor t = x.scalar_type() == ScalarType::Float ? x : torch::stable::to(x, ScalarType::Float);
    return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

template <typename T>
const T* ptr(const Tensor& t) { return static_cast<const T*>(t.data_ptr()); }

Tensor int8_matmul(Tensor x, Tensor weight, Tensor scale) {
    const Tensor xf = float32(x);
    const int64_t M = xf.size(0), K = xf.size(1), N = weight.size(0);
    Tensor y = torch::stable::new_empty(xf, {M, N});
    openglm_q8_matmul(ptr<float>(xf), M, K, ptr<int8_t>(weight), ptr<uint16_t>(scale), N,
                      static_cast<float*>(y.data_ptr()));
    return y;
}

Tensor int4_matmul(Tensor x, Tensor weight, Tensor scale, std::optional<Tensor> zero) {
    const Tensor xf = float32(x);
    const int64_t M = xf.size(0), K = xf.size(1), N = scale.size(0), G = scale.size(1);
    Tensor y = torch::stable::new_empty(xf, {M, N});
    openglm_q4_matmul(ptr<float>(xf), M, K, ptr<uint8_t>(weight), ptr<uint16_t>(scale),
                      zero ? ptr<uint8_t>(*zero) : nullptr, G, N, static_cast<float*>(y.data_ptr()));
    return y;
}

// Three products of one x, e.g. a layer's q, k and v projections: one pass over x, one team of threads.
std::tuple<Tensor, Tensor, Tensor> int8_matmul3(Tensor x, Tensor w0, Tensor s0, Tensor w1, Tensor s1, Tensor w2,
                                                Tensor s2) {
    const Tensor xf = float32(x);
    const int64_t M = xf.size(0), K = xf.size(1), N[3] = {w0.size(0), w1.size(0), w2.size(0)};
    Tensor y0 = torch::stable::new_empty(xf, {M, N[0]}), y1 = torch::stable::new_empty(xf, {M, N[1]}),
           y2 = torch::stable::new_empty(xf, {M, N[2]});
    const int8_t* w[3] = {ptr<int8_t>(w0), ptr<int8_t>(w1), ptr<int8_t>(w2)};
    const uint16_t* sc[3] = {ptr<uint16_t>(s0), ptr<uint16_t>(s1), ptr<uint16_t>(s2)};
    float* y[3] = {static_cast<float*>(y0.data_ptr()), static_cast<float*>(y1.data_ptr()),
                   static_cast<float*>(y2.data_ptr())};
    openglm_q8_matmul_n(ptr<float>(xf), M, K, 3, w, sc, N, y);
    return {y0, y1, y2};
}

std::tuple<Tensor, Tensor, Tensor> int4_matmul3(Tensor x, Tensor w0, Tensor s0, std::optional<Tensor> z0, Tensor w1,
                                                Tensor s1, std::optional<Tensor> z1, Tensor w2, Tensor s2,
                                                std::optional<Tensor> z2) {
    const Tensor xf = float32(x);
    const int64_t M = xf.size(0), K = xf.size(1), G = s0.size(1), N[3] = {s0.size(0), s1.size(0), s2.size(0)};
    Tensor y0 = torch::stable::new_empty(xf, {M, N[0]}), y1 = torch::stable::new_empty(xf, {M, N[1]}),
           y2 = torch::stable::new_empty(xf, {M, N[2]});
    const uint8_t* w[3] = {ptr<uint8_t>(w0), ptr<uint8_t>(w1), ptr<uint8_t>(w2)};
    const uint16_t* sc[3] = {ptr<uint16_t>(s0), ptr<uint16_t>(s1), ptr<uint16_t>(s2)};
    const uint8_t* z[3] = {z0 ? ptr<uint8_t>(*z0) : nullptr, z1 ? ptr<uint8_t>(*z1) : nullptr,
                           z2 ? ptr<uint8_t>(*z2) : nullptr};
    float* y[3] = {static_cast<float*>(y0.data_ptr()), static_cast<float*>(y1.data_ptr()),
                   static_cast<float*>(y2.data_ptr())};
    openglm_q4_matmul_n(ptr<float>(xf), M, K, 3, w, sc, z, G, N, y);
    return {y0, y1, y2};
}

// q [B, H, 1, D], k and v [B, KH, S, D] (any strides but the last), mask bool [B or 1, 1, 1, S] or none.
Tensor decode_attention(Tensor q, Tensor k, Tensor v, std::optional<Tensor> mask, double scale) {
    const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KH = k.size(1), S = k.size(2);
    Tensor out = torch::stable::new_empty(q, {B, H, 1, D});
    const bool* m = mask ? ptr<bool>(*mask) : nullptr;
    const int64_t smb = mask && mask->size(0) > 1 ? mask->stride(0) : 0, sms = mask ? mask->stride(3) : 0;
    openglm_decode_attention(ptr<float>(q), q.stride(0), q.stride(1), ptr<float>(k), k.stride(0), k.stride(1),
                             k.stride(2), ptr<float>(v), v.stride(0), v.stride(1), v.stride(2), m, smb, sms, B, H, KH,
                             S, D, float(scale), static_cast<float*>(out.data_ptr()));
    return out;
}

}  // namespace

extern "C" int openglm_torch_ops() { return 1; }

STABLE_TORCH_LIBRARY(openglm, m) {
    m.def("int8_matmul(Tensor x, Tensor weight, Tensor scale) -> Tensor");
    m.def("int4_matmul(Tensor x, Tensor weight, Tensor scale, Tensor? zero) -> Tensor");
    m.def("int8_matmul3(Tensor x, Tensor w0, Tensor s0, Tensor w1, Tensor s1, Tensor w2, Tensor s2) -> "
          "(Tensor, Tensor, Tensor)");
    m.def("int4_matmul3(Tensor x, Tensor w0, Tensor s0, Tensor? z0, Tensor w1, Tensor s1, Tensor? z1, Tensor w2, "
          "Tensor s2, Tensor? z2) -> (Tensor, Tensor, Tensor)");
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(openglm, CPU, m) {
    m.impl("int8_matmul", TORCH_BOX(&int8_matmul));
    m.impl("int4_matmul", TORCH_BOX(&int4_matmul));
    m.impl("int8_matmul3", TORCH_BOX(&int8_matmul3));
    m.impl("int4_matmul3", TORCH_BOX(&int4_matmul3));
    m.impl("decode_attention", TORCH_BOX(&decode_attention));
}
#endif
