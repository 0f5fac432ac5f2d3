// sm_90a GEMM for M > 16 on CUTLASS 3.x: CollectiveBuilder mainloop (TMA
// loads, warp-specialized cooperative wgmma, 128x128x64 tiles) and the Sm90
// epilogue visitor tree of LinearCombination (D = acc + beta * C, TMA store;
// the C load is skipped when beta = 0). One K range per problem: the caller
// passes [u | z] and [W | sB] as one contiguous range (dispatch.h), and each
// problem (y, then z / z') is its own launch.
#pragma once
#include <cuda_runtime.h>

#include "args.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "plan.h"

namespace flora::cuda::sm90 {

template <typename T>
struct Config {
  static constexpr int kAlign = 8;  // TMA: 16-byte rows
  using Tile = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using Fusion = cutlass::epilogue::fusion::LinearCombination<T, float, T, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      T, cutlass::layout::RowMajor, kAlign,   // C
      T, cutlass::layout::RowMajor, kAlign,   // D
      cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      T, cutlass::layout::RowMajor, kAlign,     // X [M, K]
      T, cutlass::layout::ColumnMajor, kAlign,  // weights [n, K] row-major
      float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
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
  const bool has_c = p.c != nullptr;
  typename Cfg::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {static_cast<int>(a.M), static_cast<int>(p.n), static_cast<int>(a.K1), 1},
      {static_cast<const E*>(a.x1), StrideA{a.ldx1, cute::Int<1>{}, int64_t(0)},
       static_cast<const E*>(p.y1), StrideB{p.ldy1, cute::Int<1>{}, int64_t(0)}},
      {{},
       static_cast<const E*>(has_c ? p.c : p.d), StrideC{has_c ? p.ldc : p.ldd, cute::Int<1>{}, int64_t(0)},
       static_cast<E*>(p.d), StrideD{p.ldd, cute::Int<1>{}, int64_t(0)}}};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = has_c ? 1.f : 0.f;
  cudaGetDevice(&args.hw_info.device_id);  // the caller's device guard set it
  args.hw_info.sm_count = a.sm_count;
  return args;
}

template <typename Cfg>
size_t workspace(const FusedArgs& a) {
  size_t ws = 0;
  for (int i = 0; i < a.nprob; ++i) {
    const size_t w = Cfg::Gemm::get_workspace_size(arguments<Cfg>(a, a.p[i]));
    ws = w > ws ? w : ws;
  }
  return ws;
}

template <typename Cfg>
cudaError_t launch(const FusedArgs& a, void* ws, size_t ws_bytes, cudaStream_t stream) {
  if (a.M <= 0) return cudaSuccess;
  if (a.K2 > 0 || a.rep.groups > 0 || a.relu2 || a.M > 0x7fffffff || a.K1 > 0x7fffffff)
    return cudaErrorNotSupported;
  typename Cfg::Gemm gemm[2];
  typename Cfg::Gemm::Arguments args[2];
  // Check every problem before launching any, so a refusal leaves no half.
  for (int i = 0; i < a.nprob; ++i) {
    if (a.p[i].n <= 0) continue;
    args[i] = arguments<Cfg>(a, a.p[i]);
    if (gemm[i].can_implement(args[i]) != cutlass::Status::kSuccess ||
        Cfg::Gemm::get_workspace_size(args[i]) > ws_bytes)
      return cudaErrorNotSupported;
  }
  for (int i = 0; i < a.nprob; ++i) {
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
