// Google Benchmark of the raw CPU decode kernels (csrc/cpu/kernels), one
// thread, on the Llama-3.2-1B and 1024-wide projection shapes. Counters:
// bytes/s of weights + activations, and FLOP/s.
//   flora_bench --benchmark_filter=CpuDecode
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "cpu/kernels/decode.h"

namespace k = flora::cpu::kernels;

namespace {

k::Path best_path() {
  for (k::Path p : {k::Path::kAvx512Dot, k::Path::kAvx512, k::Path::kAvx2})
    if (k::path_supported(p)) return p;
  return k::Path::kAvx2;
}

std::vector<uint8_t> random_buf(k::Dtype dt, int64_t n) {
  std::vector<uint8_t> b(static_cast<size_t>(n * k::elem_size(dt)));
  std::mt19937 g(1);
  std::normal_distribution<float> d(0.f, 0.02f);
  for (int64_t i = 0; i < n; ++i) k::store_f32(dt, b.data(), i, d(g));
  return b;
}

// args: op (0 = ffl, 1 = fbl, 2 = ffbl), N, K, M, R, dtype
void CpuDecode(benchmark::State& st) {
  const int op = static_cast<int>(st.range(0));
  const int64_t N = st.range(1), K = st.range(2), M = st.range(3), R = st.range(4);
  const auto dt = static_cast<k::Dtype>(st.range(5));
  const k::Path p = best_path();
  if (!k::path_supported(p)) {
    st.SkipWithError("no AVX2 / AVX-512 on this CPU");
    return;
  }
  auto x = random_buf(dt, M * (K + R)), W = random_buf(dt, (N + R) * (K + R)), z = random_buf(dt, M * R);
  std::vector<uint8_t> out(static_cast<size_t>(M * (N + R) * k::elem_size(dt)));
  const int64_t es = k::elem_size(dt);
  int64_t weights = 0;
  for (auto _ : st) {
    if (op == 0) {  // [W; A] storage
      k::FflArgs a;
      a.dt = dt, a.M = M, a.K = K, a.N = N, a.R = R;
      a.x = {x.data(), K}, a.W = {W.data(), K}, a.A = {W.data() + N * K * es, K};
      a.out = out.data(), a.ldo = N + R;
      k::ffl_decode(p, a, k::serial_for);
      weights = (N + R) * K;
    } else {  // [W | B] storage (ld K + R), [u | z] activations; ffbl adds [A | C]
      k::FfblArgs a;
      a.dt = dt, a.M = M, a.K = K, a.N = N, a.R = R, a.R2 = R;
      a.u = {x.data(), K + R}, a.z = {x.data() + K * es, K + R};
      a.W = {W.data(), K + R}, a.B = {W.data() + K * es, K + R};
      a.A = {W.data() + N * (K + R) * es, K + R}, a.C = {W.data() + (N * (K + R) + K) * es, K + R};
      a.out = out.data(), a.ldo = N + (op == 2 ? R : 0);
      if (op == 2) {
        k::ffbl_decode(p, a, k::serial_for);
        weights = (N + R) * (K + R);
      } else {
        k::FblArgs b;
        b.dt = dt, b.M = M, b.K = K, b.N = N, b.R = R, b.u = a.u, b.z = a.z, b.W = a.W, b.B = a.B;
        b.out = out.data(), b.ldo = N;
        k::fbl_decode(p, b, k::serial_for);
        weights = N * (K + R);
      }
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double bytes = static_cast<double>((weights + M * (K + N)) * es);
  st.counters["bytes/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["flop/s"] =
      benchmark::Counter(2.0 * M * weights, benchmark::Counter::kIsIterationInvariantRate);
  st.SetLabel(k::path_name(p));
}

void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"op", "N", "K", "M", "R", "dt"});
  // (op, N, K): Llama-3.2-1B qkv, o, gate/up, down; then the 1024-wide model
  const int64_t shapes[][3] = {{0, 3072, 2048}, {1, 2048, 2048}, {2, 2048, 2048}, {0, 16384, 2048},
                               {1, 2048, 8192}, {0, 1536, 1024}, {1, 1024, 1024}, {0, 8192, 1024},
                               {1, 1024, 4096}};
  for (const auto& s : shapes)
    for (int64_t dt : {0, 1})
      for (int64_t M : {1, 4, 16})
        for (int64_t R : {16, 64}) b->Args({s[0], s[1], s[2], M, R, dt});
}

BENCHMARK(CpuDecode)->Apply(Shapes)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
