// Autocast rules: the flora ops are matmuls, so under autocast they run in
// the autocast dtype (torch's "lower_precision_fp" policy, as for mm/linear):
// every floating operand except fp64 is cast (cached for leaf weights), and
// the op runs below the autocast key. Without this, bf16 activations from
// attention meet fp32 weights and the op raises a dtype mismatch.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "op_handles.h"

namespace flora {
namespace {

template <c10::DeviceType Dev, typename Sig>
struct Autocast;

template <c10::DeviceType Dev, typename... Args>
struct Autocast<Dev, at::Tensor(Args...)> {
  template <const c10::TypedOperatorHandle<at::Tensor(Args...)>& (*Op)()>
  static at::Tensor call(Args... args) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(
        at::autocast::get_autocast_dispatch_key_from_device_type(Dev));
    const auto dt = at::autocast::get_lower_precision_fp_from_device_type(Dev);
    return Op().call(at::autocast::cached_cast(dt, args, Dev)...);
  }
};

template <c10::DeviceType Dev>
void register_autocast(torch::Library& m) {
  m.impl("ffl", &Autocast<Dev, FflSig>::template call<&ffl_op>);
  m.impl("fbl", &Autocast<Dev, FblSig>::template call<&fbl_op>);
  m.impl("ffbl", &Autocast<Dev, FfblSig>::template call<&ffbl_op>);
}

}  // namespace

TORCH_LIBRARY_IMPL(flora, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(flora, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace flora
