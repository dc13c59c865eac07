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
// Leading axes of every operand are a batch (a vmap). The first two share tokens out over the
// threads; scatter_rows buckets the pairs by latent and shares out ranges of latents, each row
// summed in (t, j) order, so its sums do not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

// Rows [first_row, end_row) of x (rows of n). With `bias` (and `scale`), the top k of each row's
// (x + bias) * scale instead, computed a row at a time and never stored: bias and scale hold one
// row of n for every `rows_per_bias` rows of x.
void TopKRows(const float* x, int64_t first_row, int64_t end_row, int64_t n, int64_t k, float* values,
              int32_t* out, const float* bias = nullptr, const float* scale = nullptr, int64_t rows_per_bias = 1) {
  const bool ranked = k <= kMaxRankedK;
  const int64_t chunks = ranked ? std::min(n, std::max<int64_t>(2 * k, 16)) : k;
  std::vector<int32_t> keys(n), index(n), maxima(chunks), rank(std::max(n, chunks));
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
    if (ranked && count <= kMaxRanked * k) {
      Ranks(keys.data(), count, rank.data());
      for (int64_t q = 0; q < count; ++q)
        if (rank[q] < k) indices[rank[q]] = index[q];
    } else {
      packed.resize(count);
      for (int64_t q = 0; q < count; ++q) packed[q] = Pack(keys[q], index[q]);
      auto best_k = packed.begin() + k;
      if (count > k) std::nth_element(packed.begin(), best_k, packed.end(), std::greater<uint64_t>());
      std::sort(packed.begin(), best_k, std::greater<uint64_t>());
      for (int64_t q = 0; q < k; ++q) indices[q] = Unpack(packed[q]);
    }
    for (int64_t q = 0; q < k; ++q) values[r * k + q] = row[indices[q]];  // the entry itself, bit for bit
  }
}

int64_t Elements(ffi::Span<const int64_t> dims) {
  int64_t size = 1;
  for (int64_t d : dims) size *= d;
  return size;
}

// Blocks [0, blocks) handed out to whichever thread asks next; the calling thread works too and
// waits only for blocks other threads have taken, so a busy pool cannot stall it.
struct Blocks {
  std::atomic<int64_t> next{0};
  std::mutex mutex;
  std::condition_variable finished;
  int64_t done = 0;
};

template <typename Body>  // body(block)
void ParallelFor(ffi::ThreadPool& pool, int64_t blocks, const Body& body) {
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), blocks);
  if (threads <= 1) {
    for (int64_t b = 0; b < blocks; ++b) body(b);
    return;
  }
  auto shared = std::make_shared<Blocks>();
  // `body` is used only by threads holding a block, and this call returns after every block is done.
  const Body* run = &body;
  auto work = [shared, run, blocks]() {
    int64_t b, mine = 0;
    while ((b = shared->next.fetch_add(1)) < blocks) {
      (*run)(b);
      ++mine;
    }
    if (mine) {
      std::lock_guard<std::mutex> lock(shared->mutex);
      shared->done += mine;
      shared->finished.notify_all();
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(std::function<void()>(work));
  work();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->finished.wait(lock, [&] { return shared->done == blocks; });
}

// Rows [0, rows) in blocks of at least `min_block`, about four per thread.
template <typename Body>  // body(first_row, end_row)
void ParallelRows(ffi::ThreadPool& pool, int64_t rows, int64_t min_block, const Body& body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t block = std::max<int64_t>(min_block, (rows + 4 * threads - 1) / (4 * threads));
  const int64_t blocks = (rows + block - 1) / block;
  ParallelFor(pool, blocks, [&](int64_t b) { body(b * block, std::min(rows, (b + 1) * block)); });
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
