// sm_90a GEMM for M > 16 on CUTLASS 3.x: CollectiveBuilder mainloop (TMA
// loads, warp-specialized cooperative wgmma, 128x128x64 tiles) and the Sm90
// epilogue visitor tree of LinearCombination (D = acc + beta * C, TMA store;
// the C load is skipped when beta = 0). Each problem (y, then z / z') is its
// own launch. K: one range when the caller passes [u | z] and [W | sB] as one
// contiguous range (s = 1, no relu); else the two-range instance
// (sm90_two_range.cuh) runs both operand pairs into one accumulator, scaling
// pair 2 (relu(z) staged by the caller) by alpha2 = s.
//
// The repeat-add (FFL: y += s * tile(z)) is a second instance for y alone,
// launched after z: its epilogue visitor tree is D = acc + RepeatZ (no C),
// where the RepeatZ node reads s * Z[m, src(n)] for each element from its
// (m, n) coordinate (plan::repeat_src_col); y is rounded once, from fp32.
#pragma once
#include <cuda_runtime.h>

#include "args.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "plan.h"
#include "sm90_two_range.cuh"

namespace flora::cuda::sm90 {

// EVT leaf: s * Z[m, src(n)] for each element of the visited fragment (0
// outside the repeat segments and the problem). Coordinates: the epilogue's
// thread partition of an identity tensor, indexed as Sm90ColBroadcast indexes
// its register fragment.
template <class Element>
struct Sm90RepeatZ {
  struct SharedStorage {};
  struct Arguments {
    const Element* z = nullptr;
    int64_t ldz = 0;
    RepeatAdd rep;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& a, void*) {
    return a;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& a) {
    return a.z != nullptr && a.rep.groups > 0 && a.rep.rc > 0;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t, cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  CUTLASS_HOST_DEVICE Sm90RepeatZ() {}
  CUTLASS_HOST_DEVICE Sm90RepeatZ(Params const& p, SharedStorage const&) : params(p) {}
  Params params;

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(
      cutlass::epilogue::fusion::detail::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::detail::EmptyProducerLoadCallbacks{};
  }

  template <class CTensor, class Shape>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(CTensor c, Shape shape, Params const& p)
        : tCcZ(c), mn(shape), params(p) {}
    CTensor tCcZ;  // (CPY, CPY_M, CPY_N, EPI_M, EPI_N) -> (m, n, l)
    Shape mn;      // (M, N, L)
    Params const& params;

    template <typename ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n) {
      cutlass::Array<float, FragmentSize> out;
      auto c = tCcZ(cute::_, cute::_, cute::_, epi_m, epi_n);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        const auto crd = c(epi_v * FragmentSize + i);
        float v = 0.f;
        if (cute::elem_less(crd, mn)) {
          const int64_t src = plan::repeat_src_col(cute::get<1>(crd), params.rep);
          if (src >= 0) v = params.rep.s * static_cast<float>(params.z[cute::get<0>(crd) * params.ldz + src]);
        }
        out[i] = v;
      }
      return out;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(
      cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto shape = cute::make_shape(M, N, L);
    auto tCcZ = cutlass::epilogue::fusion::sm90_partition_for_epilogue<ReferenceSrc>(
        cute::make_identity_tensor(shape), args.tile_shape_mnk, args.tile_coord_mnkl,
        args.epi_tile, args.tiled_copy, args.thread_idx);
    return ConsumerStoreCallbacks<decltype(tCcZ), decltype(shape)>(tCcZ, shape, params);
  }
};

// D = acc + s * tile(Z): no C operand.
template <typename T>
using RepeatFusion = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, T, float,
                                           cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90AccFetch, Sm90RepeatZ<T>>;

// LayoutB: ColumnMajor = weights stored [n, K] row-major (K-major, the
// forward ops); RowMajor = stored [K, n] (n-major: the transposed views of
// backward dx = [dy | dz] [W; A]).
template <typename T, bool kRepeat = false, typename LayoutB_ = cutlass::layout::ColumnMajor,
          bool kTwoRanges = false>
struct Config {
  using LayoutB = LayoutB_;
  static constexpr bool kTwoRange = kTwoRanges;
  static constexpr int kAlign = 8;  // TMA: 16-byte rows
  static constexpr bool kRepeatAdd = kRepeat;
  using Tile = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using ElementC = cute::conditional_t<kRepeat, void, T>;
  using Fusion = cute::conditional_t<kRepeat, RepeatFusion<T>,
                                     cutlass::epilogue::fusion::LinearCombination<T, float, T, float>>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      ElementC, cutlass::layout::RowMajor, kAlign,   // C
      T, cutlass::layout::RowMajor, kAlign,   // D
      cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;
  using BuiltMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      T, cutlass::layout::RowMajor, kAlign,     // X [M, K]
      T, LayoutB, kAlign,                       // weights
      float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Mainloop = cute::conditional_t<kTwoRanges, TwoRangeMainloop<BuiltMainloop>, BuiltMainloop>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop,
                                                      Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

template <typename Cfg>
typename Cfg::Gemm::Arguments arguments(const FusedArgs& a, const Problem& p) {
  using E = typename Cfg::Kernel::ElementA;
  using StrideA = typename Cfg::Kernel::StrideA;
  using StrideB = typename Cfg::Kernel::StrideB;
  using StrideC = typename Cfg::Kernel::StrideC;
  using StrideD = typename Cfg::Kernel::StrideD;
  // Weights K-major ([n, K] rows) or n-major ([K, n] rows); both pairs alike.
  const auto stride_b = [](int64_t ld) {
    if constexpr (cute::is_same_v<typename Cfg::LayoutB, cutlass::layout::RowMajor>)
      return StrideB{cute::Int<1>{}, ld, int64_t(0)};
    else
      return StrideB{ld, cute::Int<1>{}, int64_t(0)};
  };
  int K = static_cast<int>(a.K1);
  if constexpr (Cfg::kTwoRange) K = Cfg::Mainloop::virtual_k(K, static_cast<int>(a.K2));
  typename Cfg::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {static_cast<int>(a.M), static_cast<int>(p.n), K, 1},
      {static_cast<const E*>(a.x1), StrideA{a.ldx1, cute::Int<1>{}, int64_t(0)},
       static_cast<const E*>(p.y1), stride_b(p.ldy1)}};
  if constexpr (Cfg::kTwoRange) {  // pair 2: (x2, y2) scaled by alpha2
    args.mainloop.ptr_A2 = static_cast<const E*>(a.x2);
    args.mainloop.dA2 = StrideA{a.ldx2, cute::Int<1>{}, int64_t(0)};
    args.mainloop.ptr_B2 = static_cast<const E*>(p.y2);
    args.mainloop.dB2 = stride_b(p.ldy2);
    args.mainloop.K1 = static_cast<int>(a.K1);
    args.mainloop.K2 = static_cast<int>(a.K2);
    args.mainloop.alpha2 = p.alpha2;
  }
  args.epilogue.ptr_D = static_cast<E*>(p.d);
  args.epilogue.dD = StrideD{p.ldd, cute::Int<1>{}, int64_t(0)};
  if constexpr (Cfg::kRepeatAdd) {  // no C; Z = problem 1's output
    args.epilogue.thread = {{}, {static_cast<const E*>(a.p[1].d), a.p[1].ldd, a.rep}, {}};
  } else {
    const bool has_c = p.c != nullptr;
    args.epilogue.ptr_C = static_cast<const E*>(has_c ? p.c : p.d);
    args.epilogue.dC = StrideC{has_c ? p.ldc : p.ldd, cute::Int<1>{}, int64_t(0)};
    args.epilogue.thread.alpha = 1.f;
    args.epilogue.thread.beta = has_c ? 1.f : 0.f;
  }
  cudaGetDevice(&args.hw_info.device_id);  // the caller's device guard set it
  args.hw_info.sm_count = a.sm_count;
  return args;
}

// The repeat-add instance computes problem 0 (y) only.
template <typename Cfg>
int problems(const FusedArgs& a) {
  return Cfg::kRepeatAdd ? 1 : a.nprob;
}

template <typename Cfg>
size_t workspace(const FusedArgs& a) {
  size_t ws = 0;
  for (int i = 0; i < problems<Cfg>(a); ++i) {
    const size_t w = Cfg::Gemm::get_workspace_size(arguments<Cfg>(a, a.p[i]));
    ws = w > ws ? w : ws;
  }
  return ws;
}

template <typename Cfg>
cudaError_t launch(const FusedArgs& a, void* ws, size_t ws_bytes, cudaStream_t stream) {
  if (a.M <= 0) return cudaSuccess;
  if ((a.K2 > 0) != Cfg::kTwoRange || a.relu2 || a.M > 0x7fffffff || a.K1 > 0x7fffffff ||
      a.K2 > 0x7fffffff || (a.rep.groups > 0) != Cfg::kRepeatAdd)
    return cudaErrorNotSupported;
  for (int i = 0; Cfg::kTwoRange && i < problems<Cfg>(a); ++i)
    if (a.p[i].n > 0 && a.p[i].y2 == nullptr) return cudaErrorNotSupported;
  if (Cfg::kRepeatAdd && (a.rep.groups > kMaxRepeat || a.rep.rc <= 0 || a.p[0].c != nullptr ||
                          a.p[1].d == nullptr))
    return cudaErrorNotSupported;
  const int np = problems<Cfg>(a);
  typename Cfg::Gemm gemm[2];
  typename Cfg::Gemm::Arguments args[2];
  // Check every problem before launching any, so a refusal leaves no half.
  for (int i = 0; i < np; ++i) {
    if (a.p[i].n <= 0) continue;
    args[i] = arguments<Cfg>(a, a.p[i]);
    if (gemm[i].can_implement(args[i]) != cutlass::Status::kSuccess ||
        Cfg::Gemm::get_workspace_size(args[i]) > ws_bytes)
      return cudaErrorNotSupported;
  }
  for (int i = 0; i < np; ++i) {
    if (a.p[i].n <= 0) continue;
    if (gemm[i].initialize(args[i], ws, stream) != cutlass::Status::kSuccess)
      return cudaErrorNotSupported;
    if (gemm[i].run(stream) != cutlass::Status::kSuccess) {
      const cudaError_t e = cudaGetLastError();
      return e != cudaSuccess ? e : cudaErrorLaunchFailure;
    }
  }
  return cudaSuccess;
}

}  // namespace flora::cuda::sm90
