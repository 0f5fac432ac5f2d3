// sm_80 GEMM for M > 16 on CUTLASS 2.x: the threadblock mainloop of
// DefaultGemm (mma.sync m16n8k16, cp.async multistage) run over the two K
// segments into ONE accumulator (segment 2, the adapter state, first: the
// accumulator is then scaled by alpha2 = s, so no second accumulator), then
// the CUTLASS epilogue D = acc + C (residual / z_in). One launch covers both
// problems (y and z' / z columns): grid.y runs over problem 0's n tiles then
// problem 1's (plan::gemm_tile). relu(z) arrives staged by the caller.
#pragma once
#include <cuda_runtime.h>

#include "args.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/default_gemm.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "plan.h"

namespace flora::cuda::sm80 {

template <typename T, int TM, int TN, int TK, int WM, int WN, int Stages>
struct Config {
  static constexpr int kAlign = 8;  // 16-byte cp.async vectors
  using OutputOp = cutlass::epilogue::thread::LinearCombination<T, kAlign, float, float>;
  using Default = typename cutlass::gemm::kernel::DefaultGemm<
      T, cutlass::layout::RowMajor, kAlign,     // X [M, K]
      T, cutlass::layout::ColumnMajor, kAlign,  // Y^T: weights [n, K] row-major
      T, cutlass::layout::RowMajor, float, cutlass::arch::OpClassTensorOp,
      cutlass::arch::Sm80, cutlass::gemm::GemmShape<TM, TN, TK>,
      cutlass::gemm::GemmShape<WM, WN, TK>, cutlass::gemm::GemmShape<16, 8, 16>, OutputOp,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>, Stages, false,
      cutlass::arch::OpMultiplyAdd>::GemmKernel;
  using Mma = typename Default::Mma;
  using Epilogue = typename Default::Epilogue;
  union SharedStorage {
    typename Mma::SharedStorage main_loop;
    typename Epilogue::SharedStorage epilogue;
  };
  static constexpr int kThreads = Mma::WarpCount::kCount * 32;
  static constexpr int kTM = TM, kTN = TN, kTK = TK;
};

template <typename Cfg>
struct Params {
  using Mma = typename Cfg::Mma;
  using OutIt = typename Cfg::Epilogue::OutputTileIterator;
  using Element = typename Mma::IteratorA::Element;
  struct Prob {
    typename Mma::IteratorB::Params pb1, pb2;
    Element* b1 = nullptr;
    Element* b2 = nullptr;
    float alpha2 = 1.f;
    typename OutIt::Params pc, pd;
    Element* c = nullptr;
    Element* d = nullptr;
    int n = 0;
    typename Cfg::OutputOp::Params op;
  };
  typename Mma::IteratorA::Params pa1, pa2;
  Element* a1 = nullptr;
  Element* a2 = nullptr;
  int M = 0, K1 = 0, K2 = 0;
  int64_t tiles_n0 = 0;
  Prob p[2];
};

template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) gemm_kernel(const Params<Cfg> P) {
  using Mma = typename Cfg::Mma;
  using Epilogue = typename Cfg::Epilogue;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);

  const plan::GemmTile t = plan::gemm_tile(blockIdx.x, blockIdx.y, P.tiles_n0, Cfg::kTM, Cfg::kTN);
  // By value: a dynamic index into the parameters would go through local memory.
  const typename Params<Cfg>::Prob q = t.prob == 0 ? P.p[0] : P.p[1];
  const int tid = threadIdx.x, warp = cutlass::canonical_warp_idx_sync(), lane = threadIdx.x % 32;
  const int m0 = static_cast<int>(t.m0), n0 = static_cast<int>(t.n0);

  typename Mma::FragmentC acc;
  acc.clear();
  if (P.K2 > 0 && q.b2 != nullptr) {
    typename Mma::IteratorA ia(P.pa2, P.a2, {P.M, P.K2}, tid, {m0, 0});
    typename Mma::IteratorB ib(q.pb2, q.b2, {P.K2, q.n}, tid, {0, n0});
    Mma mma(ss.main_loop, tid, warp, lane);
    mma(static_cast<int>(plan::ceil_div(P.K2, Cfg::kTK)), acc, ia, ib, acc);
#pragma unroll
    for (int i = 0; i < Mma::FragmentC::kElements; ++i) acc[i] *= q.alpha2;
    __syncthreads();  // the next mainloop refills the same stages
  }
  if (P.K1 > 0) {
    typename Mma::IteratorA ia(P.pa1, P.a1, {P.M, P.K1}, tid, {m0, 0});
    typename Mma::IteratorB ib(q.pb1, q.b1, {P.K1, q.n}, tid, {0, n0});
    Mma mma(ss.main_loop, tid, warp, lane);
    mma(static_cast<int>(plan::ceil_div(P.K1, Cfg::kTK)), acc, ia, ib, acc);
  }
  __syncthreads();  // shared storage turns into the epilogue's

  typename Cfg::OutputOp op(q.op);
  typename Epilogue::OutputTileIterator it_c(q.pc, q.c != nullptr ? q.c : q.d, {P.M, q.n}, tid,
                                             {m0, n0});
  typename Epilogue::OutputTileIterator it_d(q.pd, q.d, {P.M, q.n}, tid, {m0, n0});
  Epilogue epilogue(ss.epilogue, tid, warp, lane);
  epilogue(op, it_d, acc, it_c);
}

template <typename Cfg>
cudaError_t launch(const FusedArgs& a, cudaStream_t stream) {
  using P_t = Params<Cfg>;
  using E = typename P_t::Element;
  using Layout = cutlass::layout::RowMajor;
  if (a.M <= 0) return cudaSuccess;
  if (a.rep.groups > 0 || a.relu2 || a.M > 0x7fffffff || a.K1 > 0x7fffffff)
    return cudaErrorNotSupported;
  P_t P;
  P.M = static_cast<int>(a.M), P.K1 = static_cast<int>(a.K1), P.K2 = static_cast<int>(a.K2);
  P.a1 = const_cast<E*>(static_cast<const E*>(a.x1));
  P.pa1 = typename Cfg::Mma::IteratorA::Params(Layout(a.ldx1));
  if (a.K2 > 0) {
    P.a2 = const_cast<E*>(static_cast<const E*>(a.x2));
    P.pa2 = typename Cfg::Mma::IteratorA::Params(Layout(a.ldx2));
  }
  int64_t tiles_n[2] = {0, 0};
  for (int i = 0; i < a.nprob; ++i) {
    const Problem& s = a.p[i];
    auto& d = P.p[i];
    d.n = static_cast<int>(s.n);
    d.b1 = const_cast<E*>(static_cast<const E*>(s.y1));
    d.pb1 = typename Cfg::Mma::IteratorB::Params(cutlass::layout::ColumnMajor(s.ldy1));
    if (a.K2 > 0 && s.y2 != nullptr) {
      d.b2 = const_cast<E*>(static_cast<const E*>(s.y2));
      d.pb2 = typename Cfg::Mma::IteratorB::Params(cutlass::layout::ColumnMajor(s.ldy2));
    }
    d.alpha2 = s.alpha2;
    d.d = static_cast<E*>(s.d);
    d.pd = typename P_t::OutIt::Params(Layout(s.ldd));
    d.c = const_cast<E*>(static_cast<const E*>(s.c));
    d.pc = typename P_t::OutIt::Params(Layout(s.c != nullptr ? s.ldc : s.ldd));
    d.op = typename Cfg::OutputOp::Params(1.f, s.c != nullptr ? 1.f : 0.f);
    tiles_n[i] = plan::ceil_div(s.n, Cfg::kTN);
  }
  P.tiles_n0 = tiles_n[0];
  const dim3 grid(static_cast<unsigned>(plan::ceil_div(a.M, Cfg::kTM)),
                  static_cast<unsigned>(tiles_n[0] + tiles_n[1]));
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  if (grid.y > 65535) return cudaErrorNotSupported;
  constexpr int smem = sizeof(typename Cfg::SharedStorage);
  if constexpr (smem > 48 * 1024) {  // per call: the attribute is per device
    const cudaError_t attr = cudaFuncSetAttribute(
        gemm_kernel<Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (attr != cudaSuccess) return attr;
  }
  gemm_kernel<Cfg><<<grid, Cfg::kThreads, smem, stream>>>(P);
  return cudaGetLastError();
}

}  // namespace flora::cuda::sm80
