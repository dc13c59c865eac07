// The indices of the k largest entries of each row of a float32 array, in the order
// jax.lax.top_k returns them: largest first, equal values by lower index first, floats in their
// total order (-0.0 below +0.0, NaN above +inf). An XLA FFI handler for the CPU backend.
//
// Per row:
//  1. split the row into k chunks and take each chunk's maximum; the smallest of these, tau, has
//     at least k entries at or above it (one per chunk), so the row's top k all lie at or above tau;
//  2. collect the entries >= tau (on random rows of 1024 with k = 32, about 120);
//  3. select the k best of those with nth_element and sort them.
// Comparisons use the float's bits mapped to an order-preserving int32, so ties and signed zeros
// resolve exactly as in lax.top_k. Rows are shared out over XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
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

void TopKRows(const float* x, int64_t first_row, int64_t end_row, int64_t n, int64_t k, int32_t* out) {
  std::vector<uint64_t> candidates(n);
  for (int64_t r = first_row; r < end_row; ++r) {
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(x + r * n);
    int32_t tau = INT32_MAX;
    for (int64_t c = 0; c < k; ++c) {
      int32_t chunk_max = INT32_MIN;
      for (int64_t j = c * n / k, end = (c + 1) * n / k; j < end; ++j) chunk_max = std::max(chunk_max, OrderKey(bits[j]));
      tau = std::min(tau, chunk_max);
    }
    int64_t count = 0, j = 0;
    // The vector loops test key > tau - 1; tau = INT32_MIN (a row whose chunk holds nothing but the
    // lowest NaN) is left to the scalar loop.
    const bool vector_filter = tau > INT32_MIN;
#if defined(__AVX2__)
    const __m256i below = _mm256_set1_epi32(vector_filter ? tau - 1 : 0), magnitude = _mm256_set1_epi32(0x7fffffff);
    for (; vector_filter && j + 8 <= n; j += 8) {
      __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + j));
      __m256i key = _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi32(b, 31), magnitude));
      unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, below))));
      for (; mask; mask &= mask - 1) {
        int64_t q = j + __builtin_ctz(mask);
        candidates[count++] = Pack(OrderKey(bits[q]), q);
      }
    }
#elif defined(__SSE2__)
    const __m128i below = _mm_set1_epi32(vector_filter ? tau - 1 : 0), magnitude = _mm_set1_epi32(0x7fffffff);
    for (; vector_filter && j + 4 <= n; j += 4) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + j));
      __m128i key = _mm_xor_si128(b, _mm_and_si128(_mm_srai_epi32(b, 31), magnitude));
      unsigned mask = static_cast<unsigned>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(key, below))));
      for (; mask; mask &= mask - 1) {
        int64_t q = j + __builtin_ctz(mask);
        candidates[count++] = Pack(OrderKey(bits[q]), q);
      }
    }
#endif
    for (; j < n; ++j) {
      int32_t key = OrderKey(bits[j]);
      candidates[count] = Pack(key, j);
      count += key >= tau;
    }
    auto best_k = candidates.begin() + k;
    if (count > k) std::nth_element(candidates.begin(), best_k, candidates.begin() + count, std::greater<uint64_t>());
    std::sort(candidates.begin(), best_k, std::greater<uint64_t>());
    for (int64_t q = 0; q < k; ++q) out[r * k + q] = Unpack(candidates[q]);
  }
}

// Rows handed out in blocks to whichever thread asks next; the calling thread works too and
// waits only for blocks other threads have taken, so a busy pool cannot stall it.
struct RowBlocks {
  std::atomic<int64_t> next{0};
  std::mutex mutex;
  std::condition_variable finished;
  int64_t done = 0;
};

ffi::Error TopKIndices(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> indices) {
  auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("top_k needs an array with at least one axis");
  const int64_t n = dims.back();
  const int64_t k = indices->dimensions().back();
  if (k < 0 || k > n) return ffi::Error::InvalidArgument("top_k needs 0 <= k <= the last axis' size");
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < dims.size(); ++d) rows *= dims[d];
  if (k == 0 || rows == 0) return ffi::Error::Success();
  const float* data = x.typed_data();
  int32_t* out = indices->typed_data();

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t block = std::max<int64_t>(64, (rows + 4 * threads - 1) / (4 * threads));
  const int64_t blocks = (rows + block - 1) / block;
  if (threads == 1 || blocks == 1) {
    TopKRows(data, 0, rows, n, k, out);
    return ffi::Error::Success();
  }
  auto shared = std::make_shared<RowBlocks>();
  auto work = [=]() {
    int64_t b, mine = 0;
    while ((b = shared->next.fetch_add(1)) < blocks) {
      TopKRows(data, b * block, std::min(rows, (b + 1) * block), n, k, out);
      ++mine;
    }
    if (mine) {
      std::lock_guard<std::mutex> lock(shared->mutex);
      shared->done += mine;
      shared->finished.notify_all();
    }
  };
  for (int64_t t = 1; t < std::min(threads, blocks); ++t) pool.Schedule(std::function<void()>(work));
  work();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->finished.wait(lock, [&] { return shared->done == blocks; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JsaeTopKIndicesF32, TopKIndices,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::S32>>());
