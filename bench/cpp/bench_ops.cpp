// The flora ops through the dispatcher vs at::mm on W alone (the base), for
// Llama-3.2-1B projection shapes at decode and prefill row counts.
// Run: build/flora_bench --benchmark_filter=Ops
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <benchmark/benchmark.h>

namespace {

struct Shape {
  const char* name;
  int64_t N, K;
};
constexpr Shape kShapes[] = {{"qkv", 3072, 2048}, {"o", 2048, 2048},
                             {"gate_up", 16384, 2048}, {"down", 2048, 8192}};
constexpr int64_t kRank = 32;

void set_rates(benchmark::State& st, int64_t M, int64_t N, int64_t K, int64_t elt) {
  const double bytes = double(elt) * (N * K + M * K + M * N);
  st.counters["GB/s"] = benchmark::Counter(bytes * st.iterations(), benchmark::Counter::kIsRate);
  st.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * M * N * K * st.iterations(), benchmark::Counter::kIsRate);
}

void BM_OpsBaseMatmul(benchmark::State& st) {
  const Shape& sh = kShapes[st.range(0)];
  const int64_t M = st.range(1);
  at::Tensor x = at::randn({M, sh.K}), W = at::randn({sh.N, sh.K});
  for (auto _ : st) benchmark::DoNotOptimize(at::mm(x, W.t()));
  set_rates(st, M, sh.N, sh.K, 4);
  st.SetLabel(sh.name);
}

void BM_OpsFfl(benchmark::State& st) {
  const Shape& sh = kShapes[st.range(0)];
  const int64_t M = st.range(1);
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("flora::ffl", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         double, at::IntArrayRef, int64_t,
                                         const c10::optional<at::Tensor>&)>();
  at::Tensor x = at::randn({M, sh.K}), st_ = at::randn({sh.N + kRank, sh.K});
  at::Tensor W = st_.narrow(0, 0, sh.N), A = st_.narrow(0, sh.N, kRank);
  for (auto _ : st) benchmark::DoNotOptimize(op.call(x, W, A, 1.0, {}, 0, c10::nullopt));
  set_rates(st, M, sh.N + kRank, sh.K, 4);
  st.SetLabel(sh.name);
}

void BM_OpsFbl(benchmark::State& st) {
  const Shape& sh = kShapes[st.range(0)];
  const int64_t M = st.range(1);
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("flora::fbl", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double,
                                         const c10::optional<at::Tensor>&, bool)>();
  at::Tensor uz = at::randn({M, sh.K + kRank}), WB = at::randn({sh.N, sh.K + kRank});
  at::Tensor u = uz.narrow(1, 0, sh.K), z = uz.narrow(1, sh.K, kRank);
  at::Tensor W = WB.narrow(1, 0, sh.K), B = WB.narrow(1, sh.K, kRank);
  for (auto _ : st) benchmark::DoNotOptimize(op.call(u, z, W, B, 1.0, c10::nullopt, false));
  set_rates(st, M, sh.N, sh.K + kRank, 4);
  st.SetLabel(sh.name);
}

void Args(benchmark::internal::Benchmark* b) {
  for (int64_t s = 0; s < 4; ++s)
    for (int64_t M : {1, 16, 256}) b->Args({s, M});
  b->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_OpsBaseMatmul)->Apply(Args);
BENCHMARK(BM_OpsFfl)->Apply(Args);
BENCHMARK(BM_OpsFbl)->Apply(Args);

}  // namespace
