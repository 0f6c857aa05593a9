// Quantized expert projections for few rows on CPU: y = x · deq(W)ᵀ for the experts one call hits.
//
// Reads moepass's portable layout (moepass/quantize/layout.py) as it is, so the bytes the expert store
// and the exports hold are the bytes this kernel streams:
//   int4: codes uint8 [E, N, K/2] (column 2j in the low nibble of byte j, 2j+1 in the high one),
//         scales float32 [E, N, K/G], zero points uint8 [E, N, K/G] (absent: 8)
//   int8: codes int8 [E, N, K], scales float32 [E, N] (one per output channel)
//   weight[e, n, k] = (q − z) · s
// and computes in float32:
//   int4  y[n] = Σ_g s[n,g] · (Σ_{k∈g} q[n,k]·x[k]  −  z[n,g] · Σ_{k∈g} x[k])
//   int8  y[n] = s[n] · Σ_k q[n,k]·x[k]
// Each product of a code (an integer) and an activation is exact in float32, so the result differs from
// x · deq(W)ᵀ computed in float32 by summation order only.
//
// Paths (chosen at run time by what the CPU has; a caller may ask for a lower one, for tests):
//   2  AVX-512 BW + BF16, bfloat16 activations, int4: 128 codes (64 bytes) per step; nibbles become
//      bfloat16 words by one vpermw each from a 32-entry table; vdpbf16ps against the activations
//      permuted once per call into the order the nibbles come out in.
//   1  AVX2 + FMA: codes widened to float32, FMA against float32 activations (int4: even/odd columns
//      split once per call).  Also AVX-512 machines' path for float32 / float16 activations.
//   0  portable C++.
// Output rows are split over the threads (OpenMP: the runtime torch already loaded).
#include <cstdint>
#include <cstring>
#include <cmath>
#include <vector>
#include <algorithm>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QG_X86 1
#endif

namespace {

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

inline float f16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int shift = 0;
      while (!(mantissa & 0x400)) { mantissa <<= 1; ++shift; }
      mantissa &= 0x3ff;
      bits = sign | (uint32_t(113 - shift) << 23) | (mantissa << 13);
    }
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_f16(float f) {  // round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint32_t sign = (bits >> 16) & 0x8000;
  uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return uint16_t(sign | 0x7e00);      // NaN
  if (magnitude >= 0x477ff000u) return uint16_t(sign | 0x7c00);     // overflows to infinity
  if (magnitude < 0x38800000u) {                                    // subnormal or zero
    if (magnitude < 0x33000000u) return uint16_t(sign);
    uint32_t exponent = magnitude >> 23, mantissa = (magnitude & 0x7fffff) | 0x800000;
    uint32_t shift = 126 - exponent;  // 14 … 24
    uint32_t half = mantissa >> shift, rest = mantissa & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (half & 1))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
}

inline float load_value(const void* base, int dtype, int64_t i) {
  if (dtype == DT_F32) return static_cast<const float*>(base)[i];
  if (dtype == DT_BF16) return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  return f16_to_float(static_cast<const uint16_t*>(base)[i]);
}

inline void store_value(void* base, int dtype, int64_t i, float v) {
  if (dtype == DT_F32) static_cast<float*>(base)[i] = v;
  else if (dtype == DT_BF16) static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
  else static_cast<uint16_t*>(base)[i] = float_to_f16(v);
}

struct Problem {
  int bits, group, isa, x_dtype, out_dtype, bias_dtype;
  int64_t K, N, groups;            // groups per row (int4: K / group; int8: 1)
  const void* x;                   // [rows, K]
  const int64_t* task_expert;      // per task: expert, first row, rows
  const int64_t* task_row;
  const int64_t* task_rows;
  int64_t tasks;
  const uint8_t* codes;            // expert e at codes + e * codes_stride (bytes)
  int64_t codes_stride;
  const float* scales;             // expert e at scales + e * scales_stride
  int64_t scales_stride;
  const uint8_t* zeros;            // may be null (int4: z = 8)
  int64_t zeros_stride;
  const void* bias;                // [E, N] or null
  int64_t bias_stride;
  void* out;                       // [rows, N]
  // prepared activations
  int64_t prepared_width;          // elements per prepared row
  const void* prepared;            // bf16 (path 2 int4) or float32
  const float* group_sums;         // [rows, groups] (int4)
};

constexpr int ROW_BLOCK = 4;
#ifndef QG_PREFETCH_TILES
#define QG_PREFETCH_TILES 1
#endif
#ifndef QG_PREFETCH
#define QG_PREFETCH 0
#endif
#ifndef QG_PREFETCH_FAR
#define QG_PREFETCH_FAR 8192
#endif  // tokens sharing one pass over a weight row

// ---------------------------------------------------------------- activations, prepared once per call

// Path 2 int4 order: in each chunk of 128 columns c0 …, element 32j + i holds column c0 + 4i + j.
void prepare_bf16_quad(const Problem& p, int64_t row, uint16_t* dst) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x) + row * p.K;
  for (int64_t c0 = 0; c0 < p.prepared_width; c0 += 128)
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 32; ++i) {
        int64_t column = c0 + 4 * i + j;
        dst[c0 + 32 * j + i] = column < p.K ? x[column] : 0;
      }
}

// Path 1 int4 order: in each chunk of 32 columns, the 16 even columns then the 16 odd ones.
void prepare_f32_pairs(const Problem& p, int64_t row, float* dst) {
  for (int64_t c0 = 0; c0 < p.prepared_width; c0 += 32)
    for (int i = 0; i < 16; ++i) {
      int64_t even = c0 + 2 * i, odd = even + 1;
      dst[c0 + i] = even < p.K ? load_value(p.x, p.x_dtype, row * p.K + even) : 0.f;
      dst[c0 + 16 + i] = odd < p.K ? load_value(p.x, p.x_dtype, row * p.K + odd) : 0.f;
    }
}

void prepare_f32_plain(const Problem& p, int64_t row, float* dst) {
  for (int64_t k = 0; k < p.prepared_width; ++k) dst[k] = k < p.K ? load_value(p.x, p.x_dtype, row * p.K + k) : 0.f;
}

void prepare_group_sums(const Problem& p, int64_t row, float* dst) {
  const int64_t group = p.K / p.groups;
  for (int64_t g = 0; g < p.groups; ++g) {
    float sum = 0.f;
    for (int64_t k = g * group; k < (g + 1) * group; ++k) sum += load_value(p.x, p.x_dtype, row * p.K + k);
    dst[g] = sum;
  }
}

// ---------------------------------------------------------------- portable path

void int4_rows_portable(const Problem& p, int64_t expert, int64_t row0, int64_t rows, int64_t n0, int64_t n1) {
  const float* xp = static_cast<const float*>(p.prepared);
  const int64_t group = p.K / p.groups;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* codes = p.codes + expert * p.codes_stride + n * (p.K / 2);
    const float* scales = p.scales + expert * p.scales_stride + n * p.groups;
    const uint8_t* zeros = p.zeros ? p.zeros + expert * p.zeros_stride + n * p.groups : nullptr;
    for (int64_t r = row0; r < row0 + rows; ++r) {
      const float* x = xp + r * p.prepared_width;
      const float* sums = p.group_sums + r * p.groups;
      float total = 0.f;
      for (int64_t g = 0; g < p.groups; ++g) {
        float acc = 0.f;
        for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
          uint8_t byte = codes[k / 2];
          acc += float(byte & 15) * x[k] + float(byte >> 4) * x[k + 1];
        }
        float zero = zeros ? float(zeros[g]) : 8.f;
        total += scales[g] * (acc - zero * sums[g]);
      }
      if (p.bias) total += load_value(p.bias, p.bias_dtype, expert * p.bias_stride + n);
      store_value(p.out, p.out_dtype, r * p.N + n, total);
    }
  }
}

void int8_rows_portable(const Problem& p, int64_t expert, int64_t row0, int64_t rows, int64_t n0, int64_t n1) {
  const float* xp = static_cast<const float*>(p.prepared);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* codes = reinterpret_cast<const int8_t*>(p.codes + expert * p.codes_stride + n * p.K);
    const float scale = p.scales[expert * p.scales_stride + n];
    for (int64_t r = row0; r < row0 + rows; ++r) {
      const float* x = xp + r * p.prepared_width;
      float acc = 0.f;
      for (int64_t k = 0; k < p.K; ++k) acc += float(codes[k]) * x[k];
      float total = scale * acc;
      if (p.bias) total += load_value(p.bias, p.bias_dtype, expert * p.bias_stride + n);
      store_value(p.out, p.out_dtype, r * p.N + n, total);
    }
  }
}

#ifdef QG_X86
// ---------------------------------------------------------------- AVX2 + FMA path (float32 activations)

#define QG_AVX2 __attribute__((target("avx2,fma")))

QG_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

QG_AVX2 void int4_rows_avx2(const Problem& p, int64_t expert, int64_t row0, int64_t rows, int64_t n0, int64_t n1) {
  const float* xp = static_cast<const float*>(p.prepared);
  const int64_t group = p.K / p.groups, chunks_per_group = group / 32;
  const __m128i low_mask = _mm_set1_epi8(0x0f);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* codes = p.codes + expert * p.codes_stride + n * (p.K / 2);
    const float* scales = p.scales + expert * p.scales_stride + n * p.groups;
    const uint8_t* zeros = p.zeros ? p.zeros + expert * p.zeros_stride + n * p.groups : nullptr;
    for (int64_t r0 = row0; r0 < row0 + rows; r0 += ROW_BLOCK) {
      const int block = int(std::min<int64_t>(ROW_BLOCK, row0 + rows - r0));
      __m256 total[ROW_BLOCK];
      for (int t = 0; t < ROW_BLOCK; ++t) total[t] = _mm256_setzero_ps();
      for (int64_t g = 0; g < p.groups; ++g) {
        __m256 acc[ROW_BLOCK];
        for (int t = 0; t < ROW_BLOCK; ++t) acc[t] = _mm256_setzero_ps();
        for (int64_t c = 0; c < chunks_per_group; ++c) {
          const int64_t column = g * group + 32 * c;
          if ((column & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + column / 2 + QG_PREFETCH_FAR), _MM_HINT_T1);
          __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + column / 2));
          __m128i even = _mm_and_si128(bytes, low_mask), odd = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
          __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(even));
          __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(even, 8)));
          __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(odd));
          __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(odd, 8)));
          for (int t = 0; t < block; ++t) {
            const float* x = xp + (r0 + t) * p.prepared_width + column;
            acc[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc[t]);
            acc[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), acc[t]);
            acc[t] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + 16), acc[t]);
            acc[t] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + 24), acc[t]);
          }
        }
        const __m256 scale = _mm256_set1_ps(scales[g]);
        for (int t = 0; t < block; ++t) total[t] = _mm256_fmadd_ps(acc[t], scale, total[t]);
      }
      for (int t = 0; t < block; ++t) {
        const float* sums = p.group_sums + (r0 + t) * p.groups;
        float offset = 0.f;
        for (int64_t g = 0; g < p.groups; ++g) offset += scales[g] * (zeros ? float(zeros[g]) : 8.f) * sums[g];
        float value = hsum256(total[t]) - offset;
        if (p.bias) value += load_value(p.bias, p.bias_dtype, expert * p.bias_stride + n);
        store_value(p.out, p.out_dtype, (r0 + t) * p.N + n, value);
      }
    }
  }
}

QG_AVX2 void int8_rows_avx2(const Problem& p, int64_t expert, int64_t row0, int64_t rows, int64_t n0, int64_t n1) {
  const float* xp = static_cast<const float*>(p.prepared);
  const int64_t full = p.K / 8 * 8;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* codes = reinterpret_cast<const int8_t*>(p.codes + expert * p.codes_stride + n * p.K);
    const float scale = p.scales[expert * p.scales_stride + n];
    for (int64_t r0 = row0; r0 < row0 + rows; r0 += ROW_BLOCK) {
      const int block = int(std::min<int64_t>(ROW_BLOCK, row0 + rows - r0));
      __m256 acc[ROW_BLOCK];
      for (int t = 0; t < ROW_BLOCK; ++t) acc[t] = _mm256_setzero_ps();
      for (int64_t k = 0; k < full; k += 8) {
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + k + QG_PREFETCH_FAR), _MM_HINT_T1);
        int64_t eight;
        std::memcpy(&eight, codes + k, 8);
        __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(eight)));
        for (int t = 0; t < block; ++t)
          acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp + (r0 + t) * p.prepared_width + k), acc[t]);
      }
      for (int t = 0; t < block; ++t) {
        const float* x = xp + (r0 + t) * p.prepared_width;
        float value = hsum256(acc[t]);
        for (int64_t k = full; k < p.K; ++k) value += float(codes[k]) * x[k];
        value *= scale;
        if (p.bias) value += load_value(p.bias, p.bias_dtype, expert * p.bias_stride + n);
        store_value(p.out, p.out_dtype, (r0 + t) * p.N + n, value);
      }
    }
  }
}

// ---------------------------------------------------------------- AVX-512 path (bfloat16 activations for int4)

#define QG_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))

// The sums of the 16 lanes of R vectors (R = 1, 2 or 4), in out[0 … R).
template <int R>
QG_AVX512 inline void reduce_rows(const __m512* v, float* out) {
  if (R == 4) {
    __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
    __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
    // each 128-bit lane: [v0 v1 v0 v1] and [v2 v3 v2 v3] partials
    __m512 c = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 d = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
    __m128 e = _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
    _mm_storeu_ps(out, e);
  } else {
    for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(v[r]);
  }
}

// R weight rows from n, T tokens from r0: R·T outputs.  128 columns (64 code bytes) per step.
template <int R, int T>
QG_AVX512 void int4_tile_avx512(const Problem& p, int64_t expert, int64_t n, int64_t r0, const __m512i table,
                                const __m512i lane_groups) {
  const uint16_t* xp = static_cast<const uint16_t*>(p.prepared);
  const int64_t group = p.K / p.groups, bytes_per_row = p.K / 2, chunks = (p.K + 127) / 128;
  const int64_t groups_per_chunk = group >= 128 ? 1 : 128 / group;
  const uint8_t* codes = p.codes + expert * p.codes_stride + n * bytes_per_row;
  const float* scales = p.scales + expert * p.scales_stride + n * p.groups;
  const uint8_t* zeros = p.zeros ? p.zeros + expert * p.zeros_stride + n * p.groups : nullptr;
#if !QG_PREFETCH
  // The same code bytes of the next tile (prefetched a line at a time: the hardware prefetcher alone leaves
  // a single-row stream at about half the bandwidth it reaches with these hints).
  const int64_t ahead = QG_PREFETCH_TILES * R * bytes_per_row;
#endif
  __m512 total[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) total[r][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t left = bytes_per_row - 64 * c;
    const __mmask64 byte_mask = left >= 64 ? ~0ull : (1ull << left) - 1;
    const int64_t first = group >= 128 ? (128 * c) / group : c * groups_per_chunk;
    const __mmask16 group_mask = (__mmask16)((1u << std::min<int64_t>(groups_per_chunk, p.groups - first)) - 1);
    __m512i x0[T], x1[T], x2[T], x3[T];
    for (int t = 0; t < T; ++t) {
      const uint16_t* x = xp + (r0 + t) * p.prepared_width + 128 * c;
      x0[t] = _mm512_loadu_si512(x); x1[t] = _mm512_loadu_si512(x + 32);
      x2[t] = _mm512_loadu_si512(x + 64); x3[t] = _mm512_loadu_si512(x + 96);
    }
    for (int r = 0; r < R; ++r) {
#if QG_PREFETCH
      _mm_prefetch(reinterpret_cast<const char*>(codes + r * bytes_per_row + 64 * c + QG_PREFETCH), _MM_HINT_T0);
#else
      _mm_prefetch(reinterpret_cast<const char*>(codes + r * bytes_per_row + 64 * c + ahead), _MM_HINT_T0);
#endif
      // and into L2 from QG_PREFETCH_FAR bytes ahead: the rows of an expert are one contiguous stream, and a
      // single core reading DRAM needs more lines in flight than the hint above and the hardware's own
      // prefetcher keep (on the 2-core EPYC, 2 threads: 19 → 25 GB/s for a 5632×1024 expert)
      _mm_prefetch(reinterpret_cast<const char*>(codes + r * bytes_per_row + 64 * c + QG_PREFETCH_FAR), _MM_HINT_T1);
      const __m512i w = _mm512_maskz_loadu_epi8(byte_mask, codes + r * bytes_per_row + 64 * c);
      const __m512i v0 = _mm512_permutexvar_epi16(w, table);
      const __m512i v1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
      const __m512i v2 = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), table);
      const __m512i v3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), table);
      const float* row_scales = scales + r * p.groups;
      const __m512 scale = group >= 128 ? _mm512_set1_ps(row_scales[first])
                                        : _mm512_permutexvar_ps(lane_groups, _mm512_maskz_loadu_ps(group_mask, row_scales + first));
      for (int t = 0; t < T; ++t) {
        __m512 even = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)v0, (__m512bh)x0[t]);
        __m512 odd = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)v1, (__m512bh)x1[t]);
        even = _mm512_dpbf16_ps(even, (__m512bh)v2, (__m512bh)x2[t]);
        odd = _mm512_dpbf16_ps(odd, (__m512bh)v3, (__m512bh)x3[t]);
        total[r][t] = _mm512_fmadd_ps(_mm512_add_ps(even, odd), scale, total[r][t]);
      }
    }
  }
  // − Σ_g s·z·(Σ_{k∈g} x), 16 groups per step, folded into the lanes before they are summed.
  for (int64_t g = 0; g < p.groups; g += 16) {
    const __mmask16 mask = (__mmask16)(p.groups - g >= 16 ? 0xffff : (1u << (p.groups - g)) - 1);
    for (int r = 0; r < R; ++r) {
      __m512 s = _mm512_maskz_loadu_ps(mask, scales + r * p.groups + g);
      __m512 z = zeros ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, zeros + r * p.groups + g)))
                       : _mm512_set1_ps(8.f);
      __m512 sz = _mm512_mul_ps(s, z);
      for (int t = 0; t < T; ++t)
        total[r][t] = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(mask, p.group_sums + (r0 + t) * p.groups + g), total[r][t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    __m512 column[R];
    float values[R];
    for (int r = 0; r < R; ++r) column[r] = total[r][t];
    reduce_rows<R>(column, values);
    for (int r = 0; r < R; ++r) {
      float value = values[r];
      if (p.bias) value += load_value(p.bias, p.bias_dtype, expert * p.bias_stride + n + r);
      store_value(p.out, p.out_dtype, (r0 + t) * p.N + n + r, value);
    }
  }
}

template <int R, int T>
QG_AVX512 void int4_rows_avx512_t(const Problem& p, int64_t expert, int64_t r0, int64_t n0, int64_t n1,
                                  const __m512i table, const __m512i lane_groups) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) int4_tile_avx512<R, T>(p, expert, n, r0, table, lane_groups);
  for (; n < n1; ++n) int4_tile_avx512<1, T>(p, expert, n, r0, table, lane_groups);
}

QG_AVX512 void int4_rows_avx512(const Problem& p, int64_t expert, int64_t row0, int64_t rows, int64_t n0, int64_t n1) {
  // bfloat16 of 0 … 15, twice: vpermw reads the low 5 bits of each index word, so the bit above the nibble
  // (the next nibble's lowest) needs no mask.
  alignas(64) static const uint16_t table_words[32] = {
      0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170,
      0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
  const __m512i table = _mm512_load_si512(table_words);
  // float32 lane m of a step's dot products covers its columns 8m … 8m+7: group (8m) / group of the step's.
  const int64_t group = p.K / p.groups;
  alignas(64) int32_t lane_group[16];
  for (int m = 0; m < 16; ++m) lane_group[m] = group >= 128 ? 0 : int32_t(8 * m / group);
  const __m512i lane_groups = _mm512_load_si512(lane_group);
  int64_t r = row0;
  for (; r + 4 <= row0 + rows; r += 4) int4_rows_avx512_t<2, 4>(p, expert, r, n0, n1, table, lane_groups);
  if (row0 + rows - r == 3) int4_rows_avx512_t<2, 3>(p, expert, r, n0, n1, table, lane_groups);
  else if (row0 + rows - r == 2) int4_rows_avx512_t<4, 2>(p, expert, r, n0, n1, table, lane_groups);
  else if (row0 + rows - r == 1) int4_rows_avx512_t<4, 1>(p, expert, r, n0, n1, table, lane_groups);
}

template <int R, int T>
QG_AVX512 void int8_tile_avx512(const Problem& p, int64_t expert, int64_t n, int64_t r0) {
  const float* xp = static_cast<const float*>(p.prepared);
  const int64_t steps = (p.K + 15) / 16;
  const int8_t* codes = reinterpret_cast<const int8_t*>(p.codes + expert * p.codes_stride + n * p.K);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t left = p.K - 16 * s;
    const __mmask16 mask = (__mmask16)(left >= 16 ? 0xffff : (1u << left) - 1);
    __m512 x[T];
    for (int t = 0; t < T; ++t) x[t] = _mm512_loadu_ps(xp + (r0 + t) * p.prepared_width + 16 * s);  // zero past K
    for (int r = 0; r < R; ++r) {
      if ((s & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + r * p.K + 16 * s + QG_PREFETCH_FAR), _MM_HINT_T1);
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, codes + r * p.K + 16 * s)));
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(w, x[t], acc[r][t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    __m512 column[R];
    float values[R];
    for (int r = 0; r < R; ++r) column[r] = acc[r][t];
    reduce_rows<R>(column, values);
    for (int r = 0; r < R; ++r) {
      float value = p.scales[expert * p.scales_stride + n + r] * values[r];
      if (p.bias) value += load_value(p.bias, p.bias_dtype, expert * p.bias_stride + n + r);
      store_value(p.out, p.out_dtype, (r0 + t) * p.N + n + r, value);
    }
  }
}

template <int R, int T>
QG_AVX512 void int8_rows_avx512_t(const Problem& p, int64_t expert, int64_t r0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) int8_tile_avx512<R, T>(p, expert, n, r0);
  for (; n < n1; ++n) int8_tile_avx512<1, T>(p, expert, n, r0);
}

QG_AVX512 void int8_rows_avx512(const Problem& p, int64_t expert, int64_t row0, int64_t rows, int64_t n0, int64_t n1) {
  int64_t r = row0;
  for (; r + 4 <= row0 + rows; r += 4) int8_rows_avx512_t<2, 4>(p, expert, r, n0, n1);
  if (row0 + rows - r == 3) int8_rows_avx512_t<2, 3>(p, expert, r, n0, n1);
  else if (row0 + rows - r == 2) int8_rows_avx512_t<4, 2>(p, expert, r, n0, n1);
  else if (row0 + rows - r == 1) int8_rows_avx512_t<4, 1>(p, expert, r, n0, n1);
}

#endif  // QG_X86

// ---------------------------------------------------------------- dequantizing whole experts (prefill)
//
// Every weight of a group is one of 16 values (q − z)·s, q = 0 … 15: each group builds that table once, in
// float32 and rounded once into the destination dtype, and each code is a lookup — the same value as computing
// (q − z)·s in float32 and rounding it (the reference), at a fraction of the work per weight.

void dequantize_int4_rows(const uint8_t* codes, const float* scales, const uint8_t* zeros, int64_t K, int group,
                          void* dst, int dst_dtype, int64_t n0, int64_t n1) {
  const int64_t groups = K / group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * (K / 2);
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scales[n * groups + g], z = zeros ? float(zeros[n * groups + g]) : 8.f;
      if (dst_dtype == DT_F32) {
        float table[16];
        for (int q = 0; q < 16; ++q) table[q] = (float(q) - z) * s;
        float* out = static_cast<float*>(dst) + n * K;
        for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
          const uint8_t byte = row[k / 2];
          out[k] = table[byte & 15]; out[k + 1] = table[byte >> 4];
        }
      } else {
        uint16_t table[16];
        for (int q = 0; q < 16; ++q) table[q] = dst_dtype == DT_BF16 ? float_to_bf16((float(q) - z) * s) : float_to_f16((float(q) - z) * s);
        uint16_t* out = static_cast<uint16_t*>(dst) + n * K;
        for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
          const uint8_t byte = row[k / 2];
          out[k] = table[byte & 15]; out[k + 1] = table[byte >> 4];
        }
      }
    }
  }
}

void dequantize_int8_rows(const int8_t* codes, const float* scales, int64_t K, void* dst, int dst_dtype,
                          int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = codes + n * K;
    const float s = scales[n];
    if (dst_dtype == DT_F32) {
      float* out = static_cast<float*>(dst) + n * K;
      for (int64_t k = 0; k < K; ++k) out[k] = float(row[k]) * s;
    } else {
      uint16_t table[256];  // every code's value, rounded once
      for (int q = -128; q < 128; ++q) table[q & 255] = dst_dtype == DT_BF16 ? float_to_bf16(float(q) * s) : float_to_f16(float(q) * s);
      uint16_t* out = static_cast<uint16_t*>(dst) + n * K;
      for (int64_t k = 0; k < K; ++k) out[k] = table[uint8_t(row[k])];
    }
  }
}

#ifdef QG_X86
// 32 columns (16 code bytes) per step.  bfloat16: the group's table rounded by vcvtneps2bf16 (round to nearest
// even, as float_to_bf16) and doubled to 32 words; each dword of the widened bytes becomes the index pair
// (low nibble | high nibble << 16) by one shift and OR (vpermw reads 5 bits: the doubled table makes the
// low word's fifth bit harmless), one vpermw gives 32 bfloat16 in column order.  float32: two vpermps of the
// 16-entry table (they read 4 bits) and two vpermt2ps that interleave low and high nibbles into column order.
QG_AVX512 void dequantize_int4_rows_avx512(const uint8_t* codes, const float* scales, const uint8_t* zeros, int64_t K,
                                           int group, void* dst, int dst_dtype, int64_t n0, int64_t n1) {
  const int64_t groups = K / group;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i first_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second_half = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * (K / 2);
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scales[n * groups + g], z = zeros ? float(zeros[n * groups + g]) : 8.f;
      const __m512 table = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s));
      if (dst_dtype == DT_BF16) {
        const __m256i half = (__m256i)_mm512_cvtneps_pbh(table);
        const __m512i words = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
        uint16_t* out = static_cast<uint16_t*>(dst) + n * K;
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
          const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
          const __m512i index = _mm512_or_si512(d, _mm512_slli_epi32(d, 12));
          _mm512_storeu_si512(out + k, _mm512_permutexvar_epi16(index, words));
        }
      } else {
        float* out = static_cast<float*>(dst) + n * K;
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
          const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
          const __m512 low = _mm512_permutexvar_ps(d, table);
          const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table);
          _mm512_storeu_ps(out + k, _mm512_permutex2var_ps(low, first_half, high));
          _mm512_storeu_ps(out + k + 16, _mm512_permutex2var_ps(low, second_half, high));
        }
      }
    }
  }
}

QG_AVX512 void dequantize_int8_rows_avx512(const int8_t* codes, const float* scales, int64_t K, void* dst, int dst_dtype,
                                           int64_t n0, int64_t n1) {
  const int64_t full = K / 32 * 32;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = codes + n * K;
    const __m512 s = _mm512_set1_ps(scales[n]);
    for (int64_t k = 0; k < full; k += 32) {
      const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)))), s);
      const __m512 b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16)))), s);
      if (dst_dtype == DT_BF16) {
        _mm512_storeu_si512(static_cast<uint16_t*>(dst) + n * K + k, (__m512i)_mm512_cvtne2ps_pbh(b, a));
      } else {
        _mm512_storeu_ps(static_cast<float*>(dst) + n * K + k, a);
        _mm512_storeu_ps(static_cast<float*>(dst) + n * K + k + 16, b);
      }
    }
    for (int64_t k = full; k < K; ++k) store_value(dst, dst_dtype, n * K + k, float(row[k]) * scales[n]);
  }
}
#endif  // QG_X86

// rows(n0, n1) on an even share of [0, N) per thread (OpenMP, the runtime torch already loaded).
template <class Rows>
void split_rows(int64_t N, int threads, Rows rows) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
#endif
  {
#ifdef _OPENMP
    const int id = omp_get_thread_num(), count = omp_get_num_threads();
#else
    const int id = 0, count = 1;
    (void)threads;
#endif
    const int64_t per = (N + count - 1) / count, n0 = std::min<int64_t>(N, per * id), n1 = std::min<int64_t>(N, n0 + per);
    rows(n0, n1);
  }
}

int best_isa() {
#ifdef QG_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16"))
    return ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
  return ISA_PORTABLE;
}

// ---------------------------------------------------------------- SwiGLU of the fused path

// a[r, i] = silu(gate)·up from h [rows, 2I] float32 (act 0: [gate; up], 1: interleaved), rounded once into
// dst's dtype.  silu(g) = g / (1 + e^−g); the vector path's e^x is Cephes' single-precision polynomial (≤ 2 ulp).
void swiglu_rows_portable(const float* h, int64_t rows, int64_t I, int act, void* dst, int dst_dtype, int64_t i0) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* hr = h + size_t(r) * 2 * I;
    for (int64_t i = i0; i < I; ++i) {
      const float gate = act == 0 ? hr[i] : hr[2 * i], up = act == 0 ? hr[I + i] : hr[2 * i + 1];
      store_value(dst, dst_dtype, r * I + i, gate / (1.f + std::exp(-gate)) * up);
    }
  }
}

#ifdef QG_X86
QG_AVX512 inline __m512 exp_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

QG_AVX512 void swiglu_rows_avx512(const float* h, int64_t rows, int64_t I, int act, void* dst, int dst_dtype) {
  const int64_t full = I / 16 * 16;
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t r = 0; r < rows; ++r) {
    const float* hr = h + size_t(r) * 2 * I;
    for (int64_t i = 0; i < full; i += 16) {
      __m512 gate, up;
      if (act == 0) {
        gate = _mm512_loadu_ps(hr + i); up = _mm512_loadu_ps(hr + I + i);
      } else {
        const __m512 lo = _mm512_loadu_ps(hr + 2 * i), hi = _mm512_loadu_ps(hr + 2 * i + 16);
        gate = _mm512_permutex2var_ps(lo, evens, hi); up = _mm512_permutex2var_ps(lo, odds, hi);
      }
      const __m512 denominator = _mm512_add_ps(_mm512_set1_ps(1.f), exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), gate)));
      const __m512 value = _mm512_mul_ps(_mm512_div_ps(gate, denominator), up);
      if (dst_dtype == DT_F32) {
        _mm512_storeu_ps(static_cast<float*>(dst) + r * I + i, value);
      } else if (dst_dtype == DT_BF16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(dst) + r * I + i), (__m256i)_mm512_cvtneps_pbh(value));
      } else {
        alignas(64) float lanes[16];
        _mm512_store_ps(lanes, value);
        for (int l = 0; l < 16; ++l) store_value(dst, dst_dtype, r * I + i + l, lanes[l]);
      }
    }
  }
  if (full < I) swiglu_rows_portable(h, rows, I, act, dst, dst_dtype, full);
}
#endif  // QG_X86

void swiglu_rows(const float* h, int64_t rows, int64_t I, int act, void* dst, int dst_dtype, int isa) {
#ifdef QG_X86
  if ((isa < 0 || isa > best_isa() ? best_isa() : isa) == ISA_AVX512) return swiglu_rows_avx512(h, rows, I, act, dst, dst_dtype);
#endif
  swiglu_rows_portable(h, rows, I, act, dst, dst_dtype, 0);
}


using RowsKernel = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t, int64_t);

}  // namespace

extern "C" {

// The best path this CPU runs (2: AVX-512 BF16, 1: AVX2 + FMA, 0: portable).
int moepass_qgemv_isa() { return best_isa(); }

// Whether the build used OpenMP (threads split output rows).
int moepass_qgemv_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// out[rows of task i, :] = x[rows of task i, :] · deq(W[expert of task i])ᵀ (+ bias[expert]) for every task.
// Returns 0, or a positive code for arguments this build cannot take (nothing written).
int moepass_qgemv(int bits, int group, int isa, const void* x, int x_dtype, int64_t total_rows, int64_t K,
                  const int64_t* task_expert, const int64_t* task_row, const int64_t* task_rows, int64_t tasks,
                  const uint8_t* codes, int64_t codes_stride, const float* scales, int64_t scales_stride,
                  const uint8_t* zeros, int64_t zeros_stride, const void* bias, int bias_dtype, int64_t bias_stride,
                  void* out, int out_dtype, int64_t N, int threads) {
  if (bits != 4 && bits != 8) return 1;
  if (bits == 4 && (K % 2 || group <= 0 || K % group)) return 2;
  if (isa < 0 || isa > best_isa()) isa = best_isa();
  Problem p{};
  p.bits = bits; p.group = group; p.x_dtype = x_dtype; p.out_dtype = out_dtype; p.bias_dtype = bias_dtype;
  p.K = K; p.N = N; p.groups = bits == 4 ? K / group : 1; p.x = x;
  p.task_expert = task_expert; p.task_row = task_row; p.task_rows = task_rows; p.tasks = tasks;
  p.codes = codes; p.codes_stride = codes_stride; p.scales = scales; p.scales_stride = scales_stride;
  p.zeros = zeros; p.zeros_stride = zeros_stride; p.bias = bias; p.bias_stride = bias_stride; p.out = out;
  // Which path: the vector paths need whole 32-column chunks and groups they can scale per lane.
  if (bits == 4) {
    const bool lanes = group % 32 == 0 && (group <= 128 ? 128 % group == 0 : group % 128 == 0);
    if (isa == ISA_AVX512 && !(x_dtype == DT_BF16 && lanes)) isa = ISA_AVX2;
    if (isa == ISA_AVX2 && group % 32) isa = ISA_PORTABLE;
  }
  p.isa = isa;
  RowsKernel kernel;
  void (*prepare)(const Problem&, int64_t, void*);
  size_t element;
  if (bits == 4 && isa == ISA_AVX512) {
    p.prepared_width = (K + 127) / 128 * 128; element = 2;
    prepare = [](const Problem& q, int64_t r, void* d) { prepare_bf16_quad(q, r, static_cast<uint16_t*>(d)); };
  } else if (bits == 4 && isa == ISA_AVX2) {
    p.prepared_width = (K + 31) / 32 * 32; element = 4;
    prepare = [](const Problem& q, int64_t r, void* d) { prepare_f32_pairs(q, r, static_cast<float*>(d)); };
  } else {
    p.prepared_width = (K + 15) / 16 * 16; element = 4;
    prepare = [](const Problem& q, int64_t r, void* d) { prepare_f32_plain(q, r, static_cast<float*>(d)); };
  }
#ifdef QG_X86
  if (bits == 4) kernel = isa == ISA_AVX512 ? int4_rows_avx512 : isa == ISA_AVX2 ? int4_rows_avx2 : int4_rows_portable;
  else kernel = isa == ISA_AVX512 ? int8_rows_avx512 : isa == ISA_AVX2 ? int8_rows_avx2 : int8_rows_portable;
#else
  kernel = bits == 4 ? int4_rows_portable : int8_rows_portable;
#endif
  // Per-call scratch of the calling thread (a Python thread may call while another runs).
  thread_local std::vector<uint8_t> scratch;
  const size_t prepared_bytes = size_t(total_rows) * size_t(p.prepared_width) * element;
  const size_t sums_bytes = bits == 4 ? size_t(total_rows) * size_t(p.groups) * sizeof(float) : 0;
  if (scratch.size() < prepared_bytes + sums_bytes + 64) scratch.resize(prepared_bytes + sums_bytes + 64);
  uint8_t* base = scratch.data();
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  p.prepared = base;
  p.group_sums = reinterpret_cast<const float*>(base + prepared_bytes);
  // Output rows of all tasks, split evenly over the threads in blocks of 8 rows.
  std::vector<int64_t> first_unit(size_t(tasks) + 1, 0);
  for (int64_t i = 0; i < tasks; ++i) first_unit[i + 1] = first_unit[i] + N;
  const int64_t units = first_unit[tasks];
  if (threads < 1) threads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
#ifdef _OPENMP
    const int id = omp_get_thread_num(), count = omp_get_num_threads();
#else
    const int id = 0, count = 1;
#endif
    for (int64_t r = id; r < total_rows; r += count) {
      prepare(p, r, base + size_t(r) * size_t(p.prepared_width) * element);
      if (bits == 4) prepare_group_sums(p, r, const_cast<float*>(p.group_sums) + r * p.groups);
    }
#ifdef _OPENMP
#pragma omp barrier
#endif
    const int64_t per = ((units + count - 1) / count + 7) / 8 * 8;
    const int64_t begin = std::min<int64_t>(units, per * id), end = std::min<int64_t>(units, begin + per);
    for (int64_t i = 0; i < tasks && begin < end; ++i) {
      const int64_t lo = std::max(begin, first_unit[i]), hi = std::min(end, first_unit[i + 1]);
      if (lo < hi && task_rows[i] > 0)
        kernel(p, task_expert[i], task_row[i], task_rows[i], lo - first_unit[i], hi - first_unit[i]);
    }
  }
  return 0;
}

// The whole experts op for a few tokens, in one call (decode): route → first projection → activation → second
// projection → weighted sum, with no step back in Python between them.
//   x [T, H], ids [T, K] int64 (ids outside [0, E) are empty slots), weights [T, K];
//   w1 [E, N1, H] (N1 = 2·I: gate and up, "concat" [gate; up] or "interleaved" [g0, u0, g1, u1, …]), b1 [E, N1];
//   w2 [E, H, I], b2 [E, H]; out [T, H] in x's dtype.
// Rows are grouped by expert (slot order within an expert, as the op's other paths), the projections run as
// moepass_qgemv with float32 outputs, a = silu(gate)·up in float32 rounded once to x's dtype (the second
// projection's input, as the op's other paths keep it), and out[t] = Σ_k w[t,k]·y[row of (t,k)] accumulated in
// float32 in slot order and rounded once.  counts [E] (may be null) receives each expert's rows.
// act: 0 = gated SiLU, concat layout; 1 = gated SiLU, interleaved.  Returns 0, or moepass_qgemv's code.
int moepass_qmoe(int bits, int group, int isa, const void* x, int x_dtype, int64_t T, int64_t H, const int64_t* ids,
                 int64_t K, const void* weights, int w_dtype, int64_t E, int act,
                 const uint8_t* codes1, int64_t codes1_stride, const float* scales1, int64_t scales1_stride,
                 const uint8_t* zeros1, int64_t zeros1_stride, const void* bias1, int bias1_dtype, int64_t bias1_stride,
                 const uint8_t* codes2, int64_t codes2_stride, const float* scales2, int64_t scales2_stride,
                 const uint8_t* zeros2, int64_t zeros2_stride, const void* bias2, int bias2_dtype, int64_t bias2_stride,
                 int64_t I, void* out, int64_t* counts, int threads) {
  if (act != 0 && act != 1) return 3;
  const int64_t N1 = 2 * I;
  // rows grouped by expert, in slot order
  thread_local std::vector<int64_t> count, first, row_slot, slot_row, task_expert, task_row, task_rows;
  count.assign(size_t(E) + 1, 0);
  for (int64_t i = 0; i < T * K; ++i) {
    const int64_t e = ids[i];
    ++count[(e >= 0 && e < E) ? e : E];
  }
  const int64_t S = T * K - count[E];
  first.assign(size_t(E) + 1, 0);
  for (int64_t e = 0; e < E; ++e) first[e + 1] = first[e] + count[e];
  row_slot.resize(size_t(std::max<int64_t>(S, 1)));
  slot_row.resize(size_t(T * K));
  {
    std::vector<int64_t> cursor(first.begin(), first.end() - 1);
    for (int64_t i = 0; i < T * K; ++i) {
      const int64_t e = ids[i];
      if (e >= 0 && e < E) { row_slot[cursor[e]] = i; slot_row[i] = cursor[e]++; }
      else slot_row[i] = -1;
    }
  }
  task_expert.clear(); task_row.clear(); task_rows.clear();
  for (int64_t e = 0; e < E; ++e)
    if (count[e]) { task_expert.push_back(e); task_row.push_back(first[e]); task_rows.push_back(count[e]); }
  if (counts)
    for (int64_t e = 0; e < E; ++e) counts[e] = count[e];
  const size_t x_size = x_dtype == DT_F32 ? 4 : 2;
  // gathered rows, first projection's output, activations, second projection's output
  thread_local std::vector<uint8_t> xs, a;
  thread_local std::vector<float> h, y;
  xs.resize(size_t(std::max<int64_t>(S, 1)) * size_t(H) * x_size);
  for (int64_t r = 0; r < S; ++r)
    std::memcpy(xs.data() + size_t(r) * H * x_size, static_cast<const uint8_t*>(x) + size_t(row_slot[r] / K) * H * x_size,
                size_t(H) * x_size);
  h.resize(size_t(std::max<int64_t>(S, 1)) * size_t(N1));
  const int64_t tasks = int64_t(task_expert.size());
  int status = tasks ? moepass_qgemv(bits, group, isa, xs.data(), x_dtype, S, H, task_expert.data(), task_row.data(),
                                     task_rows.data(), tasks, codes1, codes1_stride, scales1, scales1_stride, zeros1,
                                     zeros1_stride, bias1, bias1_dtype, bias1_stride, h.data(), DT_F32, N1, threads)
                     : 0;
  if (status) return status;
  a.resize(size_t(std::max<int64_t>(S, 1)) * size_t(I) * x_size);
  swiglu_rows(h.data(), S, I, act, a.data(), x_dtype, isa);
  y.resize(size_t(std::max<int64_t>(S, 1)) * size_t(H));
  status = tasks ? moepass_qgemv(bits, group, isa, a.data(), x_dtype, S, I, task_expert.data(), task_row.data(),
                                 task_rows.data(), tasks, codes2, codes2_stride, scales2, scales2_stride, zeros2,
                                 zeros2_stride, bias2, bias2_dtype, bias2_stride, y.data(), DT_F32, H, threads)
                 : 0;
  if (status) return status;
  std::vector<float> total(static_cast<size_t>(H), 0.f);
  for (int64_t t = 0; t < T; ++t) {
    std::fill(total.begin(), total.end(), 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = slot_row[t * K + k];
      if (r < 0) continue;
      const float w = load_value(weights, w_dtype, t * K + k);
      const float* yr = y.data() + size_t(r) * H;
      for (int64_t j = 0; j < H; ++j) total[j] += w * yr[j];
    }
    for (int64_t j = 0; j < H; ++j) store_value(out, x_dtype, t * H + j, total[j]);
  }
  return 0;
}

// Writes back and evicts [data, data + bytes) from every cache level (clflush per 64-byte line), so that the
// next read of it comes from memory — how measurements time a kernel on weights a model reads cold, without
// evicting everything else (the interpreter's state stays warm, as in a model).  Returns 0 where this CPU has
// no such instruction here (nothing done).
int moepass_flush(const void* data, int64_t bytes) {
#ifdef QG_X86
  const char* p = static_cast<const char*>(data);
  for (int64_t offset = 0; offset < bytes; offset += 64) _mm_clflush(p + offset);
  if (bytes > 0) _mm_clflush(p + bytes - 1);
  _mm_mfence();
  return 1;
#else
  (void)data; (void)bytes;
  return 0;
#endif
}

// dst[n, k] = (q[n, k] − z[n, k / group]) · s[n, k / group] of one expert's int4 codes, in float32, bfloat16 or
// float16: each value computed in float32 and rounded once (see dequantize_int4_rows).  isa: as moepass_qgemv's.
void moepass_dequantize_int4(const uint8_t* codes, const float* scales, const uint8_t* zeros, int64_t N, int64_t K,
                             int group, void* dst, int dst_dtype, int threads, int isa) {
  if (isa < 0 || isa > best_isa()) isa = best_isa();
  const bool vector = isa == ISA_AVX512 && group % 32 == 0 && dst_dtype != DT_F16;
  split_rows(N, threads, [&](int64_t n0, int64_t n1) {
#ifdef QG_X86
    if (vector) return dequantize_int4_rows_avx512(codes, scales, zeros, K, group, dst, dst_dtype, n0, n1);
#endif
    dequantize_int4_rows(codes, scales, zeros, K, group, dst, dst_dtype, n0, n1);
  });
}

// dst[n, k] = q[n, k] · s[n] of one expert's int8 codes (per-output-channel scales), rounded once into dst's dtype.
void moepass_dequantize_int8(const int8_t* codes, const float* scales, int64_t N, int64_t K, void* dst, int dst_dtype,
                             int threads, int isa) {
  if (isa < 0 || isa > best_isa()) isa = best_isa();
  const bool vector = isa == ISA_AVX512 && dst_dtype != DT_F16;
  split_rows(N, threads, [&](int64_t n0, int64_t n1) {
#ifdef QG_X86
    if (vector) return dequantize_int8_rows_avx512(codes, scales, K, dst, dst_dtype, n0, n1);
#endif
    dequantize_int8_rows(codes, scales, K, dst, dst_dtype, n0, n1);
  });
}

}  // extern "C"
