// XLA FFI handlers for the CPU backend: jsae's row-wise top-k and the sparse products of TopK
// training over each token's k active latents (jsae.saes._sparse_topk).
//
// The top-k: the k largest entries of each row of a float32 array and their indices, in the order
// jax.lax.top_k returns them: largest first, equal values by lower index first, floats in their
// total order (-0.0 below +0.0, NaN above +inf). An XLA FFI handler for the CPU backend.
//
// Per row:
//  1. split the row into max(2k, 16) strided chunks (entries j = c mod chunks; at most n; k
//     chunks where k > 128) and take each chunk's maximum; tau, the k-th largest of these, has
//     at least k entries at or above it (one per chunk of the k), so the row's top k all lie at
//     or above tau;
//  2. collect the entries >= tau (on random rows of 1024 with k = 32, about 45);
//  3. rank those against each other, which also sorts them (for k > 128, or more than 4k
//     candidates from many ties at tau: select the k best with nth_element and sort them).
// Comparisons use the float's bits mapped to an order-preserving int32, so ties and signed zeros
// resolve exactly as in lax.top_k. Rows are shared out over XLA's intra-op thread pool.
// top_k_affine does the same for (x + bias) * scale, a row at a time (TopK's pre-activations from
// the encoder product, never written out).
//
// The sparse products, for tokens t < n with k slots each (indices[t, j] < m, weights[t, j]):
//   gather_rows_dot:      out[t, j] = rows[t] . table[indices[t, j]]                 (n, k)
//   gather_rows_weighted: out[t]    = sum_j weights[t, j] table[indices[t, j]]        (n, d)
//   scatter_rows:         out[i]    = sum over indices[t, j] = i of weights[t, j] rows[t]   (m, d)
// encoder_top_k (at the end of this file) takes the top k of (x W + bias) * scale from a bf16
// product on the AMX tiles and exact float32 dot products for the few candidates.
// Leading axes of every operand are a batch (a vmap). The first two share tokens out over the
// threads; scatter_rows buckets the pairs by latent and shares out ranges of latents, each row
// summed in (t, j) order, so its sums do not depend on the thread count.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

using jsae::Elements;
using jsae::ParallelFor;
using jsae::ParallelRows;

// The float's total order as an int32: negative floats have their magnitude bits flipped.
inline int32_t OrderKey(uint32_t bits) {
  int32_t s = static_cast<int32_t>(bits);
  return s ^ ((s >> 31) & 0x7fffffff);
}

// Key in the high half and the complemented index in the low half: a larger packed value is a
// better entry (higher key, or equal key and lower index).
inline uint64_t Pack(int32_t key, int64_t index) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(key) ^ 0x80000000u) << 32) |
         (0xffffffffu - static_cast<uint32_t>(index));
}

inline int32_t Unpack(uint64_t packed) { return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(packed)); }

// How many of the c keys are larger than each: c*c branch-free comparisons, which for the few
// dozen keys seen here are cheaper than a selection's unpredictable branches. With AVX-512 the
// counts of 64 keys at a time stay in registers while every key is compared against them.
inline void CountLarger(const int32_t* keys, int64_t c, int32_t* larger) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i < c; i += 64) {
    __m512i v[4], count[4];
    __mmask16 valid[4];
    for (int b = 0; b < 4; ++b) {
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, c - i - 16 * b));
      valid[b] = static_cast<__mmask16>((1u << left) - 1u);
      v[b] = _mm512_maskz_loadu_epi32(valid[b], keys + i + 16 * b);
      count[b] = _mm512_setzero_si512();
    }
    const __m512i one = _mm512_set1_epi32(1);
    for (int64_t j = 0; j < c; ++j) {
      const __m512i other = _mm512_set1_epi32(keys[j]);
      for (int b = 0; b < 4; ++b)
        count[b] = _mm512_mask_add_epi32(count[b], _mm512_cmpgt_epi32_mask(other, v[b]), count[b], one);
    }
    for (int b = 0; b < 4; ++b) _mm512_mask_storeu_epi32(larger + i + 16 * b, valid[b], count[b]);
  }
#endif
  for (; i < c; ++i) {
    const int32_t v = keys[i];
    int32_t r = 0;
    for (int64_t j = 0; j < c; ++j) r += keys[j] > v;
    larger[i] = r;
  }
}

// The k-th largest of c keys (with repeats, k <= c): the smallest key with fewer than k above it.
inline int32_t KthLargest(const int32_t* keys, int64_t c, int64_t k, int32_t* scratch) {
  CountLarger(keys, c, scratch);
  int32_t kth = INT32_MAX;
  for (int64_t i = 0; i < c; ++i) kth = scratch[i] < k ? std::min(kth, keys[i]) : kth;
  return kth;
}

// Each key's place in lax.top_k's order, 0 the best: keys larger, plus equal keys at a lower
// index (keys are collected in index order).
inline void Ranks(const int32_t* keys, int64_t c, int32_t* rank) {
  CountLarger(keys, c, rank);
  int64_t sum = 0;
  for (int64_t i = 0; i < c; ++i) sum += rank[i];
  if (sum == c * (c - 1) / 2) return;  // no two keys equal: the counts are already a permutation
  for (int64_t i = 1; i < c; ++i) {
    int32_t before = 0;
    for (int64_t j = 0; j < i; ++j) before += keys[j] == keys[i];
    rank[i] += before;
  }
}

// The maxima of the row's entries j = c (mod chunks), for each c < chunks (<= n): column maxima
// of the row read as a (n / chunks, chunks) matrix, so the loop is vertical and vectorises.
inline void StridedMaxima(const uint32_t* bits, int64_t n, int64_t chunks, int32_t* maxima) {
  for (int64_t c = 0; c < chunks; ++c) maxima[c] = INT32_MIN;
  int64_t j = 0;
  for (; j + chunks <= n; j += chunks)
    for (int64_t c = 0; c < chunks; ++c) maxima[c] = std::max(maxima[c], OrderKey(bits[j + c]));
  for (int64_t c = 0; j + c < n; ++c) maxima[c] = std::max(maxima[c], OrderKey(bits[j + c]));
}

// The keys >= tau of the row and their indices, in index order; returns how many.
int64_t Collect(const uint32_t* bits, int64_t n, int32_t tau, int32_t* keys, int32_t* index) {
  int64_t count = 0, j = 0;
#if defined(__AVX512F__)
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), threshold = _mm512_set1_epi32(tau);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + 16 <= n; j += 16) {
    const __m512i b = _mm512_loadu_si512(bits + j);
    const __m512i key = _mm512_xor_si512(b, _mm512_and_si512(_mm512_srai_epi32(b, 31), magnitude));
    const __mmask16 keep = _mm512_cmpge_epi32_mask(key, threshold);
    _mm512_mask_compressstoreu_epi32(keys + count, keep, key);
    _mm512_mask_compressstoreu_epi32(index + count, keep, _mm512_add_epi32(lanes, _mm512_set1_epi32(int32_t(j))));
    count += __builtin_popcount(keep);
  }
#elif defined(__AVX2__)
  // The vector loop tests key > tau - 1; tau = INT32_MIN (a row whose chunks hold nothing but the
  // lowest NaN) is left to the scalar loop.
  const bool vector_filter = tau > INT32_MIN;
  const __m256i below = _mm256_set1_epi32(vector_filter ? tau - 1 : 0), magnitude = _mm256_set1_epi32(0x7fffffff);
  for (; vector_filter && j + 8 <= n; j += 8) {
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + j));
    __m256i key = _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi32(b, 31), magnitude));
    unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, below))));
    for (; mask; mask &= mask - 1) {
      const int64_t q = j + __builtin_ctz(mask);
      keys[count] = OrderKey(bits[q]);
      index[count++] = static_cast<int32_t>(q);
    }
  }
#endif
  for (; j < n; ++j) {
    const int32_t key = OrderKey(bits[j]);
    keys[count] = key;
    index[count] = static_cast<int32_t>(j);
    count += key >= tau;
  }
  return count;
}

// Up to this k rows take the ranked path: the row split into max(2k, 16) strided chunks (n if
// fewer), tau the k-th largest chunk maximum (still at least k entries at or above it, but on
// random rows of 1024 with k = 32 about 45 rather than 120), and the candidates ranked against
// each other, which also sorts them. Rows with more than kMaxRanked * k candidates (many ties at
// tau), and all rows for larger k, select the k best with nth_element and sort them.
constexpr int64_t kMaxRankedK = 128;
constexpr int64_t kMaxRanked = 4;

// The k best of `count` candidates (keys in index order): their positions, best first.
void BestOf(const int32_t* keys, int64_t count, int64_t k, int32_t* rank, std::vector<uint64_t>& packed,
            int32_t* best) {
  if (k <= kMaxRankedK && count <= kMaxRanked * k) {
    Ranks(keys, count, rank);
    for (int64_t q = 0; q < count; ++q)
      if (rank[q] < k) best[rank[q]] = static_cast<int32_t>(q);
    return;
  }
  packed.resize(count);
  for (int64_t q = 0; q < count; ++q) packed[q] = Pack(keys[q], q);
  auto best_k = packed.begin() + k;
  if (count > k) std::nth_element(packed.begin(), best_k, packed.end(), std::greater<uint64_t>());
  std::sort(packed.begin(), best_k, std::greater<uint64_t>());
  for (int64_t q = 0; q < k; ++q) best[q] = Unpack(packed[q]);
}

// Rows [first_row, end_row) of x (rows of n). With `bias` (and `scale`), the top k of each row's
// (x + bias) * scale instead, computed a row at a time and never stored: bias and scale hold one
// row of n for every `rows_per_bias` rows of x.
void TopKRows(const float* x, int64_t first_row, int64_t end_row, int64_t n, int64_t k, float* values,
              int32_t* out, const float* bias = nullptr, const float* scale = nullptr, int64_t rows_per_bias = 1) {
  const bool ranked = k <= kMaxRankedK;
  const int64_t chunks = ranked ? std::min(n, std::max<int64_t>(2 * k, 16)) : k;
  std::vector<int32_t> keys(n), index(n), maxima(chunks), rank(std::max(n, chunks));
  std::vector<int32_t> best(k);
  std::vector<uint64_t> packed;
  std::vector<float> affine(bias ? n : 0);
  for (int64_t r = first_row; r < end_row; ++r) {
    const float* row = x + r * n;
    if (r + 1 < end_row)  // the next row's first lines, while this one is worked on
      for (int64_t j = 0; j < std::min<int64_t>(n, 256); j += 16) __builtin_prefetch(row + n + j);
    if (bias) {
      const float* b = bias + (r / rows_per_bias) * n;
      const float* s = scale + (r / rows_per_bias) * n;
      for (int64_t j = 0; j < n; ++j) affine[j] = (row[j] + b[j]) * s[j];
      row = affine.data();
    }
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(row);
    int32_t* indices = out + r * k;
    StridedMaxima(bits, n, chunks, maxima.data());
    const int32_t tau = ranked ? KthLargest(maxima.data(), chunks, k, rank.data())
                               : *std::min_element(maxima.begin(), maxima.end());
    const int64_t count = Collect(bits, n, tau, keys.data(), index.data());
    BestOf(keys.data(), count, k, rank.data(), packed, best.data());
    for (int64_t q = 0; q < k; ++q) indices[q] = index[best[q]];
    for (int64_t q = 0; q < k; ++q) values[r * k + q] = row[indices[q]];  // the entry itself, bit for bit
  }
}

// The shapes both top-k handlers check: x (..., n) and the (..., k) outputs. Sets n, k and the rows.
ffi::Error TopKShapes(ffi::Span<const int64_t> dims, ffi::Span<const int64_t> out_dims, int64_t& n, int64_t& k,
                      int64_t& rows) {
  if (dims.size() == 0) return ffi::Error::InvalidArgument("top_k needs an array with at least one axis");
  n = dims.back();
  k = out_dims.back();
  if (k < 0 || k > n) return ffi::Error::InvalidArgument("top_k needs 0 <= k <= the last axis' size");
  rows = Elements(dims.first(dims.size() - 1));
  return ffi::Error::Success();
}

ffi::Error TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                ffi::ResultBuffer<ffi::S32> indices) {
  int64_t n, k, rows;
  if (auto e = TopKShapes(x.dimensions(), indices->dimensions(), n, k, rows); e.failure()) return e;
  if (k == 0 || rows == 0) return ffi::Error::Success();
  const float* data = x.typed_data();
  int32_t* out = indices->typed_data();
  float* top = values->typed_data();
  ParallelRows(pool, rows, 64, [&](int64_t first, int64_t end) { TopKRows(data, first, end, n, k, top, out); });
  return ffi::Error::Success();
}

// The top k of (x + bias) * scale along the last axis, x (..., n), bias and scale (..., n) with
// leading axes that are a prefix of x's (one row for each slice of x's remaining axes).
ffi::Error TopKAffine(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> values,
                      ffi::ResultBuffer<ffi::S32> indices) {
  int64_t n, k, rows;
  if (auto e = TopKShapes(x.dimensions(), indices->dimensions(), n, k, rows); e.failure()) return e;
  const int64_t bias_rows = n ? Elements(bias.dimensions()) / n : 0;
  if (bias.dimensions().size() == 0 || bias.dimensions().back() != n || !(scale.dimensions() == bias.dimensions()) ||
      bias_rows == 0 || rows % bias_rows)
    return ffi::Error::InvalidArgument("top_k_affine needs bias and scale of one shape (..., n) dividing x's rows");
  if (k == 0 || rows == 0) return ffi::Error::Success();
  const float* data = x.typed_data();
  const float* b = bias.typed_data();
  const float* s = scale.typed_data();
  int32_t* out = indices->typed_data();
  float* top = values->typed_data();
  ParallelRows(pool, rows, 64, [&](int64_t first, int64_t end) {
    TopKRows(data, first, end, n, k, top, out, b, s, rows / bias_rows);
  });
  return ffi::Error::Success();
}

// --------------------------------------------------------------------------- sparse products
inline float Dot(const float* a, const float* b, int64_t d) {
  float lanes[16] = {};  // 16 partial sums, so the compiler can keep them in vector registers
  int64_t c = 0;
  for (; c + 16 <= d; c += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += a[c + l] * b[c + l];
  float sum = 0;
  for (int l = 0; l < 16; ++l) sum += lanes[l];
  for (; c < d; ++c) sum += a[c] * b[c];
  return sum;
}

inline void AddScaled(float* out, float w, const float* row, int64_t d) {
  for (int64_t c = 0; c < d; ++c) out[c] += w * row[c];
}

// The shapes every sparse product checks: indices (..., n, k), and an (..., rows, d) operand with
// the same leading axes. Sets the batch size, n, k, that operand's rows and d.
ffi::Error SlotShapes(const char* name, ffi::Span<const int64_t> index_dims, ffi::Span<const int64_t> other,
                      int64_t& batch, int64_t& n, int64_t& k, int64_t& rows, int64_t& d) {
  if (index_dims.size() < 2 || other.size() != index_dims.size())
    return ffi::Error::InvalidArgument(std::string(name) + " needs (..., n, k) indices and an (..., rows, d) operand "
                                       "with the same leading axes");
  for (size_t a = 0; a + 2 < index_dims.size(); ++a)
    if (index_dims[a] != other[a])
      return ffi::Error::InvalidArgument(std::string(name) + ": the operands' leading axes differ");
  n = index_dims[index_dims.size() - 2];
  k = index_dims.back();
  rows = other[other.size() - 2];
  d = other.back();
  batch = Elements(index_dims.first(index_dims.size() - 2));
  return ffi::Error::Success();
}

ffi::Error GatherRowsDot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::S32> indices,
                         ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> out) {
  int64_t batch, n, k, m, d;
  if (auto e = SlotShapes("gather_rows_dot", indices.dimensions(), table.dimensions(), batch, n, k, m, d); e.failure())
    return e;
  if (Elements(rows.dimensions()) != batch * n * d)
    return ffi::Error::InvalidArgument("gather_rows_dot: rows must be (..., n, d)");
  const float* r = rows.typed_data();
  const int32_t* idx = indices.typed_data();
  const float* tab = table.typed_data();
  float* o = out->typed_data();
  ParallelRows(pool, batch * n, 64, [&](int64_t first, int64_t end) {
    for (int64_t t = first; t < end; ++t) {
      const float* of_batch = tab + (t / std::max<int64_t>(n, 1)) * m * d;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = idx[t * k + j];
        o[t * k + j] = (i >= 0 && i < m) ? Dot(r + t * d, of_batch + i * d, d) : 0.0f;
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error GatherRowsWeighted(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> indices,
                              ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> out) {
  int64_t batch, n, k, m, d;
  if (auto e = SlotShapes("gather_rows_weighted", indices.dimensions(), table.dimensions(), batch, n, k, m, d);
      e.failure())
    return e;
  if (Elements(weights.dimensions()) != batch * n * k)
    return ffi::Error::InvalidArgument("gather_rows_weighted: weights must have the indices' shape");
  const float* w = weights.typed_data();
  const int32_t* idx = indices.typed_data();
  const float* tab = table.typed_data();
  float* o = out->typed_data();
  ParallelRows(pool, batch * n, 64, [&](int64_t first, int64_t end) {
    std::fill(o + first * d, o + end * d, 0.0f);
    for (int64_t t = first; t < end; ++t) {
      const float* of_batch = tab + (t / std::max<int64_t>(n, 1)) * m * d;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = idx[t * k + j];
        if (i >= 0 && i < m) AddScaled(o + t * d, w[t * k + j], of_batch + i * d, d);
      }
    }
  });
  return ffi::Error::Success();
}

// Columns of `rows` summed per pass of scatter_rows: n tokens' 64 columns (1 MB for 4096 tokens)
// stay in a core's L2 cache while every latent's bucket reads them.
constexpr int64_t kScatterColumns = 64;
ffi::Error ScatterRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> indices,
                       ffi::Buffer<ffi::F32> rows, ffi::ResultBuffer<ffi::F32> out) {
  int64_t batch, n, k, n_rows, d;
  if (auto e = SlotShapes("scatter_rows", indices.dimensions(), rows.dimensions(), batch, n, k, n_rows, d); e.failure())
    return e;
  auto out_dims = out->dimensions();
  const int64_t m = out_dims.size() >= 2 ? out_dims[out_dims.size() - 2] : 0;
  if (n_rows != n || Elements(weights.dimensions()) != batch * n * k || Elements(out_dims) != batch * m * d)
    return ffi::Error::InvalidArgument("scatter_rows: rows must be (..., n, d), weights the indices' shape, "
                                       "the output (..., m, d)");
  const float* w = weights.typed_data();
  const int32_t* idx = indices.typed_data();
  const float* r = rows.typed_data();
  float* o = out->typed_data();
  if (batch * n * k == 0) {
    std::fill(o, o + Elements(out_dims), 0.0f);
    return ffi::Error::Success();
  }
  // Per batch member: its slots bucketed by latent (a stable counting sort, so each bucket keeps
  // (t, j) order), then ranges of latents shared out over the threads, each latent's row summed
  // from its bucket, kScatterColumns columns at a time.
  std::vector<int64_t> start(m + 1);
  std::vector<int32_t> order(n * k);
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t* slots = idx + b * n * k;
    std::fill(start.begin(), start.end(), 0);
    for (int64_t s = 0; s < n * k; ++s)
      if (slots[s] >= 0 && slots[s] < m) ++start[slots[s] + 1];
    for (int64_t i = 0; i < m; ++i) start[i + 1] += start[i];
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t s = 0; s < n * k; ++s)
      if (slots[s] >= 0 && slots[s] < m) order[next[slots[s]]++] = static_cast<int32_t>(s);
    const float* of_w = w + b * n * k;
    const float* of_rows = r + b * n * d;
    float* of_out = o + b * m * d;
    auto sum_into = [&](float* acc, int64_t i, int64_t column, int64_t width) {  // acc[0, width) = latent i's sum
      std::fill(acc, acc + width, 0.0f);
      for (int64_t q = start[i]; q < start[i + 1]; ++q) {
        const int64_t s = order[q];
        AddScaled(acc, of_w[s], of_rows + (s / k) * d + column, width);
      }
    };
    ParallelRows(pool, m, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t column = 0; column < d; column += kScatterColumns) {
        const int64_t width = std::min(kScatterColumns, d - column);
        for (int64_t i = lo; i < hi; ++i) sum_into(of_out + i * d + column, i, column, width);
      }
    });
  }
  return ffi::Error::Success();
}

// --------------------------------------------------------------------------- the encoder's top-k
// encoder_top_k: the top k of each token's pre-activations h[t, j] = (x[t] . W[:, j] + bias[j]) *
// scale[j], for x (n, K) and W (K, m), without the dense float32 product. Where the CPU has AMX:
//  1. an approximate product a = bf16(x) bf16(W) on the AMX tiles (float32 sums), with a bound
//     |a[t, j] - x[t] . W[:, j]| <= E[t, j] from the rounding of both operands to bf16 (8 bits)
//     and of the float32 sums, |x . w| <= |x| |w| (Cauchy-Schwarz) and a margin;
//  2. lo = approximate h - E and hi = approximate h + E bracket each exact h; tau, the k-th largest
//     lo, is at most the k-th largest exact h, so every entry of the exact top k has hi >= tau;
//  3. those candidates (about 120 of 16384 on random rows with k = 32) get their exact float32
//     dot products from a transposed copy of W, and the top k of them is the row's top k, in
//     lax.top_k's order.
// The approximate products only choose which dot products to compute; every value returned is an
// exact float32 dot product (summed in this file's order), plus bias, times scale. Entries whose
// bound is not finite (inf or NaN anywhere in their inputs) are always candidates.
#if defined(__x86_64__) && defined(__linux__) && (__GNUC__ >= 11 || __clang_major__ >= 12)
#define JSAE_AMX 1
#define JSAE_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#endif

bool AmxUsable() {
#if JSAE_AMX
  static const bool usable = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tiles = (d >> 24 & 1) && (d >> 22 & 1);         // AMX-TILE, AMX-BF16
    const bool avx512 = (b >> 16 & 1) && (b >> 17 & 1) && (b >> 30 & 1) && (b >> 31 & 1);  // F, DQ, BW, VL
    if (!tiles || !avx512 || !__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a >> 5 & 1)) return false;  // AVX512-BF16
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

#if JSAE_AMX
constexpr int64_t kEncoderTokens = 128;  // tokens per block: their bf16 rows stay in L2 while W streams past

// Cache-line aligned storage: AMX tile loads and stores that straddle lines run at half speed.
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t count) { return static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const LineAligned&) const { return true; }
  bool operator!=(const LineAligned&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, LineAligned<T>>;

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

inline __mmask16 FirstLanes(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1u);
}

// bf16 of 32 floats (zeros past `left`), in order.
JSAE_AMX_TARGET inline __m512i Bf16x32(const float* p, int64_t left) {
  const __m512 a = _mm512_maskz_loadu_ps(FirstLanes(left), p), b = _mm512_maskz_loadu_ps(FirstLanes(left - 16), p + 16);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
}

// rows of x (rows, K) as bf16 rows of K_pad (zeros past K), the AMX A tiles' layout.
JSAE_AMX_TARGET void PackRows(const float* x, int64_t rows, int64_t K, int64_t K_pad, uint16_t* a) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t s = 0; s < K_pad; s += 32) _mm512_storeu_si512(a + r * K_pad + s, Bf16x32(x + r * K + s, K - s));
}

// r[i][j] <-> r[j][i] for 16 vectors of 16 floats.
JSAE_AMX_TARGET inline void Transpose16(__m512* r) {
  __m512 a[16], b[16];
  for (int i = 0; i < 16; i += 2) a[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), a[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  for (int i = 0; i < 16; i += 4) {
    b[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[i]), _mm512_castps_pd(a[i + 2])));
    b[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[i]), _mm512_castps_pd(a[i + 2])));
    b[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[i + 1]), _mm512_castps_pd(a[i + 3])));
    b[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[i + 1]), _mm512_castps_pd(a[i + 3])));
  }
  // b[4 i + q], 128-bit lane L: rows 4i..4i+3 of column 4 L + q.
  for (int q = 0; q < 4; ++q) {
    const __m512 c0 = _mm512_shuffle_f32x4(b[q], b[4 + q], 0x88), c1 = _mm512_shuffle_f32x4(b[q], b[4 + q], 0xdd);
    const __m512 c2 = _mm512_shuffle_f32x4(b[8 + q], b[12 + q], 0x88), c3 = _mm512_shuffle_f32x4(b[8 + q], b[12 + q], 0xdd);
    r[q] = _mm512_shuffle_f32x4(c0, c2, 0x88);
    r[4 + q] = _mm512_shuffle_f32x4(c1, c3, 0x88);
    r[8 + q] = _mm512_shuffle_f32x4(c0, c2, 0xdd);
    r[12 + q] = _mm512_shuffle_f32x4(c1, c3, 0xdd);
  }
}

// Column strip [16 c, 16 c + 16) of W (K, m): into `packed` as AMX B tiles (for each pair of rows
// 2p, 2p + 1 and column j, the two bf16 side by side), into `transposed` (m, K) as float32 rows,
// and an upper bound on each column's norm into `norms`.
JSAE_AMX_TARGET void PackStrip(const float* W, int64_t K, int64_t m, int64_t K_pad, int64_t c, uint16_t* packed,
                               float* transposed, float* norms) {
  const int64_t first = 16 * c, width = std::min<int64_t>(16, m - first);
  const __mmask16 valid = FirstLanes(width);
  const __m512i interleave = _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004,
                                               0x00150005, 0x00160006, 0x00170007, 0x00180008, 0x00190009,
                                               0x001a000a, 0x001b000b, 0x001c000c, 0x001d000d, 0x001e000e,
                                               0x001f000f);
  uint16_t* out = packed + c * K_pad * 16;
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i0 = 0; i0 < K_pad; i0 += 16) {
    __m512 r[16];
    for (int q = 0; q < 16; ++q)
      r[q] = i0 + q < K ? _mm512_maskz_loadu_ps(valid, W + (i0 + q) * m + first) : _mm512_setzero_ps();
    for (int q = 0; q < 16; ++q) squares = _mm512_fmadd_ps(r[q], r[q], squares);
    for (int p = 0; p < 8; ++p)
      _mm512_storeu_si512(out + (i0 / 2 + p) * 32, _mm512_permutexvar_epi16(
          interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(r[2 * p + 1], r[2 * p]))));
    if (width > 0 && i0 < K) {
      Transpose16(r);
      const __mmask16 rows_left = FirstLanes(K - i0);
      for (int64_t j = 0; j < width; ++j) _mm512_mask_storeu_ps(transposed + (first + j) * K + i0, rows_left, r[j]);
    }
  }
  alignas(64) float sums[16];
  _mm512_store_ps(sums, squares);
  // float32 sums of K squares: relative error below K 2^-24; squares that underflow lose < 2^-60 of the norm.
  for (int64_t j = 0; j < width; ++j)
    norms[first + j] = std::sqrt(sums[j]) * float(1 + (K + 4) * std::ldexp(1.0, -23)) + 0x1p-60f;
}

// A token block's candidates, row by row: the entries whose hi reaches the row's running tau
// (the k-th largest lo seen so far), as order keys of lo and hi and the latent index, in index order.
struct Candidates {
  std::vector<int32_t> lo, hi, index;
  int64_t count = 0;
  int32_t tau = INT32_MIN;
};

// Raise the row's tau to the k-th largest lo it holds and drop the entries whose hi is below it.
void Tighten(Candidates& row, int64_t k, std::vector<int32_t>& scratch) {
  if (row.count < k) return;
  scratch.assign(row.lo.begin(), row.lo.begin() + row.count);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<int32_t>());
  row.tau = std::max(row.tau, scratch[k - 1]);
  int64_t kept = 0;
  for (int64_t q = 0; q < row.count; ++q)
    if (row.hi[q] >= row.tau) row.lo[kept] = row.lo[q], row.hi[kept] = row.hi[q], row.index[kept++] = row.index[q];
  row.count = kept;
}

JSAE_AMX_TARGET inline __m512i OrderKeys(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  return _mm512_xor_si512(b, _mm512_and_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(0x7fffffff)));
}

// The screen of one token block: approximate products on the AMX tiles, 32 tokens x 32 latents at
// a time, each bracketed as [lo, hi] and kept as a candidate where hi reaches the row's tau.
// a: the block's bf16 rows (rows_pad, K_pad); bound[r]: row r's |x| times the bound's factor.
JSAE_AMX_TARGET void Screen(const uint16_t* a, int64_t rows, int64_t rows_pad, int64_t K_pad, const uint16_t* packed,
                            int64_t m, const float* bias, const float* scale, const float* margin, const float* floor,
                            const float* bound, int64_t k, Candidates* rows_out, std::vector<int32_t>& scratch) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;
  _tile_loadconfig(&config);
  alignas(64) float tile[32][32];
  const int64_t a_stride = K_pad * 2;
  const __m512 relative = _mm512_set1_ps(0x1p-21f), minus_inf = _mm512_set1_ps(-INFINITY);
  const __m512 plus_inf = _mm512_set1_ps(INFINITY);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t c = 0; 16 * c < m; c += 2) {
    const uint16_t* b0 = packed + c * K_pad * 16;
    const uint16_t* b1 = b0 + K_pad * 16;
    __m512 b[2], s[2], g[2], f[2];
    __mmask16 valid[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t j = 16 * (c + h);
      valid[h] = FirstLanes(m - j);
      b[h] = _mm512_maskz_loadu_ps(valid[h], bias + j);
      s[h] = _mm512_maskz_loadu_ps(valid[h], scale + j);
      g[h] = _mm512_maskz_loadu_ps(valid[h], margin + j);
      f[h] = _mm512_maskz_loadu_ps(valid[h], floor + j);
    }
    for (int64_t r0 = 0; r0 < rows_pad; r0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint16_t* a0 = a + r0 * K_pad;
      const uint16_t* a1 = a0 + 16 * K_pad;
      for (int64_t step = 0; step < K_pad; step += 32) {
        _tile_loadd(4, a0 + step, a_stride);
        _tile_loadd(5, a1 + step, a_stride);
        _tile_loadd(6, b0 + step * 16, 64);
        _tile_loadd(7, b1 + step * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, &tile[0][0], 128);
      _tile_stored(1, &tile[0][16], 128);
      _tile_stored(2, &tile[16][0], 128);
      _tile_stored(3, &tile[16][16], 128);
      for (int64_t r = 0; r < 32 && r0 + r < rows; ++r) {
        Candidates& row = rows_out[r0 + r];
        if (row.count + 32 > int64_t(row.lo.size())) {
          Tighten(row, k, scratch);
          if (row.count + 32 > int64_t(row.lo.size())) {
            const size_t grown = 2 * row.lo.size() + 32;
            row.lo.resize(grown), row.hi.resize(grown), row.index.resize(grown);
          }
        }
        const __m512 row_bound = _mm512_set1_ps(bound[r0 + r]);
        const __m512i tau = _mm512_set1_epi32(row.tau);
        for (int h = 0; h < 2; ++h) {
          const __m512 key = _mm512_mul_ps(_mm512_add_ps(_mm512_load_ps(&tile[r][16 * h]), b[h]), s[h]);
          const __m512 error = _mm512_fmadd_ps(_mm512_abs_ps(key), relative, _mm512_fmadd_ps(row_bound, g[h], f[h]));
          __m512 low = _mm512_sub_ps(key, error), high = _mm512_add_ps(key, error);
          const __mmask16 bad = _mm512_fpclass_ps_mask(low, 0x99) | _mm512_fpclass_ps_mask(high, 0x99);  // NaN, inf
          low = _mm512_mask_mov_ps(low, bad, minus_inf);
          high = _mm512_mask_mov_ps(high, bad, plus_inf);
          const __m512i high_key = OrderKeys(high);
          const __mmask16 keep = valid[h] & _mm512_cmpge_epi32_mask(high_key, tau);
          if (!keep) continue;
          // Compressed in registers and stored whole (the buffers have room): a compressing
          // store to memory is several times slower.
          _mm512_storeu_si512(row.lo.data() + row.count, _mm512_maskz_compress_epi32(keep, OrderKeys(low)));
          _mm512_storeu_si512(row.hi.data() + row.count, _mm512_maskz_compress_epi32(keep, high_key));
          _mm512_storeu_si512(row.index.data() + row.count, _mm512_maskz_compress_epi32(
              keep, _mm512_add_epi32(lanes, _mm512_set1_epi32(int32_t(16 * (c + h))))));
          row.count += __builtin_popcount(keep);
        }
      }
    }
  }
  _tile_release();
}

#endif

ffi::Error EncoderTopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> values,
                       ffi::ResultBuffer<ffi::F32> pre, ffi::ResultBuffer<ffi::S32> indices) {
  auto xd = x.dimensions(), wd = W.dimensions(), id = indices->dimensions();
  if (xd.size() < 2 || wd.size() != xd.size() || id.size() != xd.size() || bias.dimensions().size() != xd.size() - 1)
    return ffi::Error::InvalidArgument("encoder_top_k needs x (..., n, K), W (..., K, m), bias and scale (..., m)");
  const int64_t n = xd[xd.size() - 2], K = xd.back(), m = wd.back(), k = id.back();
  const int64_t batch = Elements(xd.first(xd.size() - 2));
  if (wd[wd.size() - 2] != K || Elements(wd) != batch * K * m || Elements(bias.dimensions()) != batch * m ||
      !(scale.dimensions() == bias.dimensions()) || Elements(id) != batch * n * k || k < 0 || k > m)
    return ffi::Error::InvalidArgument("encoder_top_k: W must be (..., K, m) for x (..., n, K), bias and scale "
                                       "(..., m), 0 <= k <= m");
  if (!AmxUsable()) return ffi::Error(ffi::ErrorCode::kUnimplemented, "encoder_top_k needs a CPU with AMX");
#if JSAE_AMX
  if (k == 0 || n == 0) return ffi::Error::Success();
  const int64_t K_pad = (K + 31) / 32 * 32, m_pad = (m + 31) / 32 * 32;
  thread_local AlignedVector<uint16_t> packed;
  thread_local std::vector<float> transposed, margin, floor, norms;
  packed.resize(m_pad * K_pad);
  transposed.resize(m * K);
  margin.resize(m), floor.resize(m), norms.resize(m);
  // Raw pointers: a worker thread naming a thread_local would get its own, empty one.
  uint16_t* packed_w = packed.data();
  float* w_t = transposed.data();
  float* margins = margin.data();
  float* floors = floor.data();
  float* column_norms = norms.data();
  // |a - x . w| <= (2 u + u^2) sum |x_i w_i| for the operands' bf16 rounding (u = 2^-8), plus the
  // float32 sums' rounding (the tiles' and the exact dot products') <= 2 (K + 2) 2^-24 sum |x_i w_i|;
  // sum |x_i w_i| <= |x| |w|. Small absolute terms for flushed denormals; 1% for the bound's own rounding.
  const double unit = std::ldexp(1.0, -7) + std::ldexp(1.0, -16) + (K + 2) * std::ldexp(1.0, -23);
  for (int64_t b = 0; b < batch; ++b) {
    const float* Wb = W.typed_data() + b * K * m;
    const float* bb = bias.typed_data() + b * m;
    const float* sb = scale.typed_data() + b * m;
    ParallelFor(pool, m_pad / 16, [&](int64_t c) { PackStrip(Wb, K, m, K_pad, c, packed_w, w_t, column_norms); });
    for (int64_t j = 0; j < m; ++j) {
      const double s = std::fabs(double(sb[j]));
      margins[j] = float(1.01 * (double(column_norms[j]) + std::ldexp(1.0, -109)) * s);
      floors[j] = float(std::ldexp(1.0, -106) * s) + FLT_MIN;
    }
    const float* xb = x.typed_data() + b * n * K;
    float* vb = values->typed_data() + b * n * k;
    float* pb = pre->typed_data() + b * n * k;
    int32_t* ib = indices->typed_data() + b * n * k;
    const int64_t blocks = (n + kEncoderTokens - 1) / kEncoderTokens;
    ParallelFor(pool, blocks, [&](int64_t block) {
      const int64_t first = block * kEncoderTokens, rows = std::min(kEncoderTokens, n - first);
      const int64_t rows_pad = (rows + 31) / 32 * 32;
      thread_local AlignedVector<uint16_t> a;
      thread_local std::vector<float> bound, exact_pre, exact;
      thread_local std::vector<Candidates> candidates;
      thread_local std::vector<int32_t> keys, rank, best, scratch;
      thread_local std::vector<uint64_t> spill;
      a.assign(rows_pad * K_pad, 0);
      bound.resize(rows);
      candidates.resize(kEncoderTokens);
      best.resize(k);
      const size_t capacity = std::max<int64_t>(8 * k, 256) + 32;
      for (int64_t r = 0; r < rows; ++r) {
        Candidates& row = candidates[r];
        if (row.lo.size() < capacity) row.lo.resize(capacity), row.hi.resize(capacity), row.index.resize(capacity);
        row.count = 0;
        row.tau = INT32_MIN;
        const float* x_row = xb + (first + r) * K;
        double sum = 0;
        for (int64_t i = 0; i < K; ++i) sum += double(x_row[i]) * x_row[i];
        bound[r] = float(1.01 * (unit * std::sqrt(sum) + std::ldexp(1.0, -116)));
      }
      PackRows(xb + first * K, rows, K, K_pad, a.data());
      Screen(a.data(), rows, rows_pad, K_pad, packed_w, m, bb, sb, margins, floors, bound.data(), k,
             candidates.data(), scratch);
      for (int64_t r = 0; r < rows; ++r) {
        Candidates& row = candidates[r];
        Tighten(row, k, scratch);  // tau: now the k-th largest lo of the whole row
        const int64_t t = first + r, count = row.count;
        const float* x_row = xb + t * K;
        keys.resize(count), rank.resize(count), exact_pre.resize(count), exact.resize(count);
        for (int64_t q = 0; q < count; ++q) {  // the candidates' exact pre-activations
          if (q + 1 < count) {
            const float* next = w_t + int64_t(row.index[q + 1]) * K;
            for (int64_t i = 0; i < K; i += 16) __builtin_prefetch(next + i);
          }
          const int32_t j = row.index[q];
          exact_pre[q] = Dot(x_row, w_t + int64_t(j) * K, K) + bb[j];
          exact[q] = exact_pre[q] * sb[j];
          keys[q] = OrderKey(reinterpret_cast<const uint32_t*>(exact.data())[q]);
        }
        BestOf(keys.data(), count, k, rank.data(), spill, best.data());
        for (int64_t q = 0; q < k; ++q) {
          const int32_t c = best[q];
          vb[t * k + q] = exact[c];
          pb[t * k + q] = exact_pre[c];
          ib[t * k + q] = row.index[c];
        }
      }
    });
  }
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "encoder_top_k needs a CPU with AMX");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsaeTopKF32, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());


XLA_FFI_DEFINE_HANDLER_SYMBOL(JsaeTopKAffineF32, TopKAffine,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

#define JSAE_SPARSE_PRODUCT(symbol, function)                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, function,                                                \
                                ffi::Ffi::Bind()                                                 \
                                    .Ctx<ffi::ThreadPool>()                                      \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                \
                                    .Arg<ffi::Buffer<ffi::S32>>()                                \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                \
                                    .Ret<ffi::Buffer<ffi::F32>>());

JSAE_SPARSE_PRODUCT(JsaeGatherRowsDotF32, GatherRowsDot)
JSAE_SPARSE_PRODUCT(JsaeGatherRowsWeightedF32, GatherRowsWeighted)
JSAE_SPARSE_PRODUCT(JsaeScatterRowsF32, ScatterRows)

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsaeEncoderTopKF32, EncoderTopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// Whether encoder_top_k can run here (a CPU and kernel with AMX, and this process granted its tiles).
extern "C" int JsaeEncoderTopKUsable() { return AmxUsable() ? 1 : 0; }
