import torch, torch.nn.functional as F
from torch import nn
from fastseg3d.profile import activation_memory, _autocast_on_meta
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.lin = nn.Linear(8, 8); s.ln = nn.LayerNorm(8); s.conv = nn.Conv3d(2, 2, 1); s.bn = nn.BatchNorm3d(2); s.gn = nn.GroupNorm(1, 2)
    def forward(s, x):
        out = {}
        c = s.conv(x); out['conv'] = c.dtype
        b = s.bn(c); out['bn'] = b.dtype
        g = s.gn(b); out['gn'] = g.dtype
        u = F.interpolate(c, scale_factor=2, mode="trilinear"); out['interp'] = u.dtype
        un = F.interpolate(c, scale_factor=2); out['interp_nearest'] = un.dtype
        ua = F.interpolate(c, size=(2,2,2), mode="area"); out['interp_area'] = ua.dtype
        t = x.flatten(2)  # (B, 2, 512)
        t = t.reshape(-1, 8)
        l = s.lin(t); out['linear'] = l.dtype
        n = s.ln(l); out['ln'] = n.dtype
        sm = l.softmax(-1); out['softmax'] = sm.dtype
        e = l.exp(); out['exp'] = e.dtype
        su = l.sum(); out['sum'] = su.dtype
        mm = l @ l.t(); out['matmul'] = mm.dtype
        ge = F.gelu(l); out['gelu'] = ge.dtype
        ad = l + n; out['add(bf16,fp32)'] = ad.dtype
        with torch.autocast("cuda", enabled=False):
            l2 = s.lin(t); out['linear_in_disabled_region'] = l2.dtype
        sd = F.scaled_dot_product_attention(l[None,None], l[None,None], l[None,None]); out['sdpa'] = sd.dtype
        ce = F.cross_entropy(l, torch.zeros(l.shape[0], dtype=torch.long, device=l.device)); out['ce'] = ce.dtype
        print(out)
        return su + ce
for dt in (torch.float32, torch.bfloat16, torch.float16):
    r = activation_memory(M(), (1, 2, 8, 8, 8), dt); print(dt, r)
print("cuda autocast flag after:", torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
