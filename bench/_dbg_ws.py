import sys

import torch

sys.path.insert(0, "bench")
import probe_ws_decode as p
from probe_gemm import operands

from svdquant.kernels import reference as ref

d = int(sys.argv[1])
m, n, k = (int(v) for v in sys.argv[2:5])
x, layer, s, xq, lora, wq, s_ch = operands(m, n, k)
c = ref.widen_row_scale(layer.wscales, layer.fmt)
regs = int(sys.argv[5]) if len(sys.argv) > 5 else 96
y = p.ws_decode_gemm(xq, layer.qweight, layer.wscales, 1.0 / c, s_ch, s, debug=d, decode_regs=regs)
torch.cuda.synchronize()
print("variant", d, m, n, k, "ok", y.float().abs().sum().item())
