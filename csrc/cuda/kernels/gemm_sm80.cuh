// sm_80 GEMM for M > 16 on CUTLASS 2.x: the threadblock mainloop of
// DefaultGemm (mma.sync m16n8k16, cp.async multistage) run over the two K
// segments into ONE accumulator (segment 2, the adapter state, first: the
// accumulator is then scaled by alpha2 = s, so no second accumulator), then
// the CUTLASS epilogue D = acc + C (residual / z_in). One launch covers both
// problems (y and z' / z columns): grid.y runs over problem 0's n tiles then
// problem 1's (plan::gemm_tile). relu(z) arrives staged by the caller.
//
// The repeat-add (FFL: y += s * tile(z)) is a second kernel for y alone, run
// after z is written: the same mainloop, then CUTLASS's 2.x epilogue visitor
// tree D = acc + RepeatZ, where the RepeatZ node reads s * Z[m, src(n)] for
// each output element from its (m, n) coordinate (plan::repeat_src_col), so
// y is rounded once, from fp32.
#pragma once
#include <cuda_runtime.h>

#include "args.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/default_gemm.h"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "plan.h"
// After the GEMM headers: the 2.x visitors use their types without including them.
#include "cutlass/epilogue/threadblock/default_thread_map_tensor_op.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"

namespace flora::cuda::sm80 {

constexpr int kAlign = 8;  // 16-byte cp.async vectors

// What the kernels take from a CUTLASS default kernel: its mainloop and
// epilogue, their shared memory (one union: the epilogue reuses the stages)
// and the tile.
template <typename Default, int TM, int TN, int TK>
struct Parts {
  using Mma = typename Default::Mma;
  using Epilogue = typename Default::Epilogue;
  union SharedStorage {
    typename Mma::SharedStorage main_loop;
    typename Epilogue::SharedStorage epilogue;
  };
  static constexpr int kThreads = Mma::WarpCount::kCount * 32;
  static constexpr int kTM = TM, kTN = TN, kTK = TK;
};

template <typename T>
using LinearOp = cutlass::epilogue::thread::LinearCombination<T, kAlign, float, float>;

// LayoutB: ColumnMajor = weights stored [n, K] row-major (the forward ops);
// RowMajor = stored [K, n] (the transposed views of backward dx = dy W + dz A).
template <typename T, int TM, int TN, int TK, int WM, int WN, int Stages, typename LayoutB>
using DefaultGemm = typename cutlass::gemm::kernel::DefaultGemm<
    T, cutlass::layout::RowMajor, kAlign,  // X [M, K]
    T, LayoutB, kAlign,                    // Y^T
    T, cutlass::layout::RowMajor, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    cutlass::gemm::GemmShape<TM, TN, TK>, cutlass::gemm::GemmShape<WM, WN, TK>,
    cutlass::gemm::GemmShape<16, 8, 16>, LinearOp<T>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>, Stages, false,
    cutlass::arch::OpMultiplyAdd>::GemmKernel;

template <typename T, int TM, int TN, int TK, int WM, int WN, int Stages,
          typename LayoutB_ = cutlass::layout::ColumnMajor>
struct Config : Parts<DefaultGemm<T, TM, TN, TK, WM, WN, Stages, LayoutB_>, TM, TN, TK> {
  using LayoutB = LayoutB_;
  using OutputOp = LinearOp<T>;
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

// Both K segments into one accumulator (segment 2 first, scaled by alpha2).
template <typename Cfg, typename P_t, typename Prob>
__device__ __forceinline__ void mainloop(typename Cfg::Mma::SharedStorage& smem, const P_t& P,
                                         const Prob& q, int m0, int n0,
                                         typename Cfg::Mma::FragmentC& acc) {
  using Mma = typename Cfg::Mma;
  const int tid = threadIdx.x, warp = cutlass::canonical_warp_idx_sync(), lane = threadIdx.x % 32;
  acc.clear();
  if (P.K2 > 0 && q.b2 != nullptr) {
    typename Mma::IteratorA ia(P.pa2, P.a2, {P.M, P.K2}, tid, {m0, 0});
    typename Mma::IteratorB ib(q.pb2, q.b2, {P.K2, q.n}, tid, {0, n0});
    Mma mma(smem, tid, warp, lane);
    mma(static_cast<int>(plan::ceil_div(P.K2, Cfg::kTK)), acc, ia, ib, acc);
#pragma unroll
    for (int i = 0; i < Mma::FragmentC::kElements; ++i) acc[i] *= q.alpha2;
    __syncthreads();  // the next mainloop refills the same stages
  }
  if (P.K1 > 0) {
    typename Mma::IteratorA ia(P.pa1, P.a1, {P.M, P.K1}, tid, {m0, 0});
    typename Mma::IteratorB ib(q.pb1, q.b1, {P.K1, q.n}, tid, {0, n0});
    Mma mma(smem, tid, warp, lane);
    mma(static_cast<int>(plan::ceil_div(P.K1, Cfg::kTK)), acc, ia, ib, acc);
  }
  __syncthreads();  // shared storage turns into the epilogue's
}

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
  mainloop<Cfg>(ss.main_loop, P, q, m0, n0, acc);

  typename Cfg::OutputOp op(q.op);
  typename Epilogue::OutputTileIterator it_c(q.pc, q.c != nullptr ? q.c : q.d, {P.M, q.n}, tid,
                                             {m0, n0});
  typename Epilogue::OutputTileIterator it_d(q.pd, q.d, {P.M, q.n}, tid, {m0, n0});
  Epilogue epilogue(ss.epilogue, tid, warp, lane);
  epilogue(op, it_d, acc, it_c);
}

template <typename Kernel, typename P_t, int smem>
cudaError_t launch_grid(Kernel kernel, dim3 grid, int threads, const P_t& P, cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  if (grid.y > 65535) return cudaErrorNotSupported;
  if constexpr (smem > 48 * 1024) {  // per call: the attribute is per device
    const cudaError_t attr =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (attr != cudaSuccess) return attr;
  }
  kernel<<<grid, threads, smem, stream>>>(P);
  return cudaGetLastError();
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
    d.pb1 = typename Cfg::Mma::IteratorB::Params(typename Cfg::LayoutB(s.ldy1));
    if (a.K2 > 0 && s.y2 != nullptr) {
      d.b2 = const_cast<E*>(static_cast<const E*>(s.y2));
      d.pb2 = typename Cfg::Mma::IteratorB::Params(typename Cfg::LayoutB(s.ldy2));
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
  return launch_grid<decltype(&gemm_kernel<Cfg>), P_t, sizeof(typename Cfg::SharedStorage)>(
      gemm_kernel<Cfg>, grid, Cfg::kThreads, P, stream);
}

// ---- repeat-add: y = x W^T + s * tile(z), z already in memory ---------------

// EVT leaf: s * Z[m, src(n)] for each element of the visited fragment (0
// outside the repeat segments and outside the problem). The coordinates come
// from the thread map's partition of an identity tensor, indexed exactly as
// VisitorAuxStore indexes its fragments (host-tested: tests/cpp/test_cuda_cute.cpp).
template <class ThreadMap, class Element>
struct VisitorRepeatZ {
  struct Arguments {
    const Element* z = nullptr;
    int64_t ldz = 0;
    RepeatAdd rep;
  };
  using Params = Arguments;
  struct SharedStorage {};

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& a, void*) {
    return a;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }

  CUTLASS_HOST_DEVICE VisitorRepeatZ() {}
  CUTLASS_HOST_DEVICE VisitorRepeatZ(Params const& params, SharedStorage const&) : params_ptr(&params) {}
  Params const* params_ptr = nullptr;

  template <class CTensor, class ProblemShape>
  struct Callbacks : cutlass::epilogue::threadblock::EmptyCallbacks {
    CUTLASS_DEVICE Callbacks(CTensor&& c, ProblemShape shape, Params const* p)
        : tC_c(cute::forward<CTensor>(c)), problem_shape(shape), params_ptr(p) {}
    CTensor tC_c;  // (VECTOR, FRAGMENT_COLUMN, FRAGMENT_ROW, STEP) -> (m, n, l)
    ProblemShape problem_shape;
    Params const* params_ptr;

    template <class ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(
        int iter_idx, int, int, int frg_idx,
        cutlass::Array<ElementAccumulator, FragmentSize> const&) {
      static_assert(FragmentSize == ThreadMap::kElementsPerAccess, "one vector per fragment");
      cutlass::Array<float, FragmentSize> out;
      auto c = tC_c(cute::_, cute::_, cute::_, iter_idx);
      const Params& p = *params_ptr;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        const auto crd = c(frg_idx * FragmentSize + i);
        float v = 0.f;
        if (cute::elem_less(crd, problem_shape)) {
          const int64_t src = plan::repeat_src_col(cute::get<1>(crd), p.rep);
          if (src >= 0) v = p.rep.s * static_cast<float>(p.z[cute::get<0>(crd) * p.ldz + src]);
        }
        out[i] = v;
      }
      return out;
    }
  };

  template <class ProblemShape>
  CUTLASS_DEVICE auto get_callbacks(cutlass::gemm::GemmCoord tile_offset, int thread_idx,
                                    ProblemShape problem_shape) {
    auto tC_c = cute::group_modes<3, 6>(
        ThreadMap::partition(cute::make_identity_tensor(problem_shape), thread_idx, tile_offset));
    return Callbacks<decltype(tC_c), ProblemShape>(cute::move(tC_c), problem_shape, params_ptr);
  }
};

// The repeat-add epilogue's visitor tree: D = acc + RepeatZ, stored as T.
template <typename T, int TM, int TN, int TK, int WM, int WN, int Stages>
struct RepeatTree {
  using TB = cutlass::gemm::GemmShape<TM, TN, TK>;
  using Warp = cutlass::gemm::GemmShape<WM, WN, TK>;
  using ThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<TB, Warp, T, kAlign, 1>;
  using Rep = VisitorRepeatZ<ThreadMap, T>;
  using Sum = cutlass::epilogue::threadblock::Sm80EVT<
      cutlass::epilogue::threadblock::VisitorCompute<cutlass::plus, float, float,
                                                     cutlass::FloatRoundStyle::round_to_nearest>,
      cutlass::epilogue::threadblock::VisitorAccFetch, Rep>;
  using Store = cutlass::epilogue::threadblock::VisitorAuxStore<
      ThreadMap, T, cutlass::FloatRoundStyle::round_to_nearest,
      cute::Stride<int64_t, cute::_1, int64_t>>;
  using Fusion = cutlass::epilogue::threadblock::Sm80EVT<Store, Sum>;
  using Default = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      T, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlign,
      T, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlign,
      T, cutlass::layout::RowMajor, kAlign, float, float, cutlass::arch::OpClassTensorOp,
      cutlass::arch::Sm80, TB, Warp, cutlass::gemm::GemmShape<16, 8, 16>, Fusion,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>, Stages,
      cutlass::arch::OpMultiplyAdd, 1>::GemmKernel;
};

template <typename T, int TM, int TN, int TK, int WM, int WN, int Stages>
struct RepeatConfig
    : RepeatTree<T, TM, TN, TK, WM, WN, Stages>,
      Parts<typename RepeatTree<T, TM, TN, TK, WM, WN, Stages>::Default, TM, TN, TK> {
  using LayoutB = cutlass::layout::ColumnMajor;
};

template <typename Cfg>
struct RepeatParams {
  using Mma = typename Cfg::Mma;
  using Element = typename Mma::IteratorA::Element;
  struct Prob {  // the mainloop's view of problem 0 (one K segment)
    typename Mma::IteratorB::Params pb1, pb2;
    Element* b1 = nullptr;
    Element* b2 = nullptr;
    float alpha2 = 1.f;
    int n = 0;
  };
  typename Mma::IteratorA::Params pa1, pa2;
  Element* a1 = nullptr;
  Element* a2 = nullptr;
  int M = 0, K1 = 0, K2 = 0;
  Prob q;
  typename Cfg::Epilogue::Params fusion;
};

// By reference into the parameter space (__grid_constant__): the visitor
// nodes keep pointers to their params.
template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    gemm_repeat_kernel(const __grid_constant__ RepeatParams<Cfg> P) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename Cfg::SharedStorage*>(smem_raw);
  const int tid = threadIdx.x, warp = cutlass::canonical_warp_idx_sync(), lane = threadIdx.x % 32;
  typename Cfg::Mma::FragmentC acc;
  mainloop<Cfg>(ss.main_loop, P, P.q, static_cast<int>(blockIdx.x) * Cfg::kTM,
                static_cast<int>(blockIdx.y) * Cfg::kTN, acc);
  typename Cfg::Epilogue epilogue(P.fusion, ss.epilogue, tid, warp, lane);
  epilogue(acc, cutlass::gemm::GemmCoord(blockIdx.x, blockIdx.y, 0),
           cute::make_shape(P.M, P.q.n, 1), tid);
}

// y (problem 0, one K segment, no C) with the repeat-add of Z = a.p[1].d,
// which the caller has written before (stream order).
template <typename Cfg>
cudaError_t launch_repeat(const FusedArgs& a, cudaStream_t stream) {
  using P_t = RepeatParams<Cfg>;
  using E = typename P_t::Element;
  const Problem& y = a.p[0];
  if (a.M <= 0 || y.n <= 0) return cudaSuccess;
  if (a.rep.groups <= 0 || a.rep.groups > kMaxRepeat || a.rep.rc <= 0 || a.K2 > 0 ||
      a.relu2 || y.c != nullptr || a.p[1].d == nullptr || a.M > 0x7fffffff ||
      a.K1 > 0x7fffffff || y.n > 0x7fffffff)
    return cudaErrorNotSupported;
  P_t P;
  P.M = static_cast<int>(a.M), P.K1 = static_cast<int>(a.K1);
  P.a1 = const_cast<E*>(static_cast<const E*>(a.x1));
  P.pa1 = typename Cfg::Mma::IteratorA::Params(cutlass::layout::RowMajor(a.ldx1));
  P.q.n = static_cast<int>(y.n);
  P.q.b1 = const_cast<E*>(static_cast<const E*>(y.y1));
  P.q.pb1 = typename Cfg::Mma::IteratorB::Params(cutlass::layout::ColumnMajor(y.ldy1));
  typename Cfg::Fusion::Arguments args{
      {{}, {static_cast<const E*>(a.p[1].d), a.p[1].ldd, a.rep}, {}},
      {static_cast<E*>(y.d), {y.ldd, cute::_1{}, int64_t(0)}}};
  P.fusion = Cfg::Fusion::to_underlying_arguments(
      cutlass::gemm::GemmCoord(P.M, P.q.n, P.K1), args, nullptr);
  const dim3 grid(static_cast<unsigned>(plan::ceil_div(a.M, Cfg::kTM)),
                  static_cast<unsigned>(plan::ceil_div(y.n, Cfg::kTN)));
  return launch_grid<decltype(&gemm_repeat_kernel<Cfg>), P_t, sizeof(typename Cfg::SharedStorage)>(
      gemm_repeat_kernel<Cfg>, grid, Cfg::kThreads, P, stream);
}

}  // namespace flora::cuda::sm80
