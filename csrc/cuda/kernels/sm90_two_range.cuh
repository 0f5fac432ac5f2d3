// A CUTLASS 3.x sm_90 mainloop over TWO operand pairs into one accumulator:
// acc = alpha2 * X2 Y2^T + X1 Y1^T (FBL: [u | f(z)] [W | B]^T with s; FFBL's
// z' = [u | f(z)] [A | C]^T). It is the builder's TMA warp-specialized
// collective (Base) with its producer and consumer loops taking k-tiles from
// pair 2 first (K2 = R, zero-filled by TMA past R), then pair 1: the consumer
// waits for pair 2's wgmmas at the boundary and scales the accumulator by
// alpha2 there, so no second accumulator is needed. The kernel sees a
// virtual K = (k-tiles of K2 + k-tiles of K1) * BLK_K, which only sets its
// k-tile count (data-parallel persistent schedule: every tile starts at k 0).
#pragma once
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/collective/collective_builder.hpp"

namespace flora::cuda::sm90 {

template <class Base>
struct TwoRangeMainloop : Base {
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TileShape;
  using typename Base::TiledMma;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::DispatchPolicy;
  static constexpr int kBlkK = cute::size<2>(TileShape{});

  struct Arguments {
    ElementA const* ptr_A = nullptr;  // X1 [M, K1]
    StrideA dA{};
    ElementB const* ptr_B = nullptr;  // Y1 [n, K1]
    StrideB dB{};
    uint32_t mma_promotion_interval = 4;
    ElementA const* ptr_A2 = nullptr;  // X2 [M, K2]
    StrideA dA2{};
    ElementB const* ptr_B2 = nullptr;  // Y2 [n, K2]
    StrideB dB2{};
    int K1 = 0, K2 = 0;
    float alpha2 = 1.f;
  };

  struct Params : Base::Params {
    typename Base::Params::TMA_A tma_load_a2;
    typename Base::Params::TMA_B tma_load_b2;
    int k2_tiles = 0;
    float alpha2 = 1.f;
  };

  // k-tiles of each pair, and the virtual K the kernel is given.
  static int k_tiles(int K) { return (K + kBlkK - 1) / kBlkK; }
  static int virtual_k(int K1, int K2) { return (k_tiles(K1) + k_tiles(K2)) * kBlkK; }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args,
                                        void* workspace) {
    const auto mnkl = cute::append<4>(problem_shape, 1);
    const auto M = cute::get<0>(mnkl), N = cute::get<1>(mnkl), L = cute::get<3>(mnkl);
    auto pair = [&](ElementA const* a, StrideA dA, ElementB const* b, StrideB dB, int Kp) {
      typename Base::Arguments base{a, dA, b, dB, args.mma_promotion_interval};
      return Base::to_underlying_arguments(cute::make_shape(M, N, Kp, L), base, workspace);
    };
    Params p;
    static_cast<typename Base::Params&>(p) = pair(args.ptr_A, args.dA, args.ptr_B, args.dB, args.K1);
    const auto p2 = pair(args.ptr_A2, args.dA2, args.ptr_B2, args.dB2, args.K2);
    p.tma_load_a2 = p2.tma_load_a;
    p.tma_load_b2 = p2.tma_load_b;
    p.k2_tiles = k_tiles(args.K2);
    p.alpha2 = args.alpha2;
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = cute::append<4>(problem_shape, 1);
    typename Base::Arguments a1{args.ptr_A, args.dA, args.ptr_B, args.dB};
    typename Base::Arguments a2{args.ptr_A2, args.dA2, args.ptr_B2, args.dB2};
    return args.K1 > 0 && args.K2 > 0 && K == virtual_k(args.K1, args.K2) &&
           Base::can_implement(cute::make_shape(M, N, args.K1, L), a1) &&
           Base::can_implement(cute::make_shape(M, N, args.K2, L), a2);
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& p) {
    Base::prefetch_tma_descriptors(p);
    cute::prefetch_tma_descriptor(p.tma_load_a2.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_load_b2.get_tma_descriptor());
  }

  // (gA1, gB1, gA2, gB2): the kernel takes M / N tile counts from the first two.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& shape, Params const& p) const {
    using X = cute::Underscore;
    const auto M = cute::get<0>(shape), N = cute::get<1>(shape), L = cute::get<3>(shape);
    const int K2 = p.k2_tiles * kBlkK;  // TMA zero-fills past the real K2
    const int K1 = cute::get<2>(shape) - K2;
    auto tile = [&](auto const& tma, auto mn, int Kp, auto step) {
      return cute::local_tile(tma.get_tma_tensor(cute::make_shape(mn, Kp, L)), TileShape{},
                              cute::make_coord(cute::_, cute::_, cute::_), step);
    };
    return cute::make_tuple(tile(p.tma_load_a, M, K1, cute::Step<cute::_1, X, cute::_1>{}),
                            tile(p.tma_load_b, N, K1, cute::Step<X, cute::_1, cute::_1>{}),
                            tile(p.tma_load_a2, M, K2, cute::Step<cute::_1, X, cute::_1>{}),
                            tile(p.tma_load_b2, N, K2, cute::Step<X, cute::_1, cute::_1>{}));
  }

  // Producer: k-tile t < k2_tiles from pair 2, else tile t - k2_tiles of pair 1.
  template <class... Ts, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& p, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<Ts...> const& load_inputs, BlockCoord const& blk_coord,
                           KTileIterator, int k_tile_count, int, uint32_t,
                           TensorStorage& shared_tensors) {
    using namespace cute;
    static_assert(size(typename DispatchPolicy::ClusterShape{}) == 1, "no multicast: 1x1 clusters");
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    const auto m = get<0>(blk_coord), n = get<1>(blk_coord), l = get<3>(blk_coord);
    auto part = [&](auto const& tma, auto const& g, auto const& s, auto mn) {
      return make_tuple(tma.get_slice(0).partition_S(g(_, _, mn, _, l)), tma.get_slice(0).partition_D(s));
    };
    auto [tAgA, tAsA] = part(p.tma_load_a, get<0>(load_inputs), sA, m);
    auto [tBgB, tBsB] = part(p.tma_load_b, get<1>(load_inputs), sB, n);
    auto [tAgA2, tAsA2] = part(p.tma_load_a2, get<2>(load_inputs), sA, m);
    auto [tBgB2, tBsB2] = part(p.tma_load_b2, get<3>(load_inputs), sB, n);
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = 0; t < k_tile_count; ++t) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* bar = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      if (t < p.k2_tiles) {
        copy(p.tma_load_a2.with(*bar, uint16_t(0)), tAgA2(_, _, _, t), tAsA2(_, _, _, stage));
        copy(p.tma_load_b2.with(*bar, uint16_t(0)), tBgB2(_, _, _, t), tBsB2(_, _, _, stage));
      } else {
        copy(p.tma_load_a.with(*bar, uint16_t(0)), tAgA(_, _, _, t - p.k2_tiles), tAsA(_, _, _, stage));
        copy(p.tma_load_b.with(*bar, uint16_t(0)), tBgB(_, _, _, t - p.k2_tiles), tBsB(_, _, _, stage));
      }
      ++smem_pipe_write;
    }
  }

  // Consumer: Base's loop (one wgmma batch in flight), plus the alpha2 scale
  // once pair 2's k-tiles have retired.
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum,
                          int k_tile_count, int thread_idx, TensorStorage& shared_tensors,
                          Params const& p) {
    using namespace cute;
    static_assert(Base::K_PIPE_MMAS == 1, "one wgmma batch in flight");
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    constexpr int kWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
    Layout wg_layout = make_layout(Int<kWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
    const int wg = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    TiledMma tiled_mma;
    auto thr = tiled_mma.get_slice(wg_layout(wg));
    Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));  // (MMA,MMA_M,MMA_K,PIPE)
    Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));

    PipelineState smem_pipe_release = smem_pipe_read;
    // k-tile 0: overwrite the accumulator.
    warpgroup_fence_operand(accum);
    {
      auto token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, token);
      const int stage = smem_pipe_read.index();
      warpgroup_arrive();
      tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
      CUTLASS_PRAGMA_UNROLL
      for (int kb = 0; kb < size<2>(tCrA); ++kb) {
        cute::gemm(tiled_mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), accum);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      ++smem_pipe_read;
    }
    warpgroup_fence_operand(accum);
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = 1; t < k_tile_count; ++t) {
      auto token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, token);
      if (t == p.k2_tiles) {  // pair 2 done: acc = alpha2 * X2 Y2^T
        warpgroup_wait<0>();
        warpgroup_fence_operand(accum);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(accum); ++i) accum(i) *= p.alpha2;
        warpgroup_fence_operand(accum);
      }
      const int stage = smem_pipe_read.index();
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      cute::gemm(tiled_mma, tCrA(_, _, _, stage), tCrB(_, _, _, stage), accum);
      warpgroup_commit_batch();
      warpgroup_wait<1>();
      warpgroup_fence_operand(accum);
      pipeline.consumer_release(smem_pipe_release);
      ++smem_pipe_read;
      ++smem_pipe_release;
    }
    warpgroup_fence_operand(accum);
  }
};

}  // namespace flora::cuda::sm90
