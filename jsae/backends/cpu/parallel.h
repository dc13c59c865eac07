// Work sharing over XLA's intra-op thread pool, for jsae's FFI handlers (cpu_kernels.cc, dense_kernels.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jsae {

namespace ffi = xla::ffi;

inline int64_t Elements(ffi::Span<const int64_t> dims) {
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

}  // namespace jsae
