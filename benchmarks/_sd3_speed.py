"""The SD3 half of transformer_speed.py: rectiflow's MMDiT vs diffusers' SD3Transformer2DModel, same weights,
same process, calls interleaved (see transformer_speed.py for the method and the FLOP count's rules)."""

from __future__ import annotations

import torch

from _common import interleaved_medians, square_matmul
from rectiflow.convert.sd3_keys import diffusers_to_stability
from rectiflow.models.sd3 import MLP_RATIO, SD3_PRESETS, MMDiT, SD3Params

# name -> (preset, latent height, latent width, text tokens)
SD3_CONFIGS = {
    "sd3-tiny": ("sd3-tiny", 32, 32, 64),  # 256 image + 64 text tokens, 13.9M parameters
    "sd3.5-tiny": ("sd3.5-tiny", 32, 32, 64),  # QK-norm and dual attention in blocks 0-2, 15.3M
}


def sd3_forward_flops(p: SD3Params, l_img: int, l_txt: int) -> float:
    h, mlp, p2 = p.hidden_size, int(p.hidden_size * MLP_RATIO), p.patch_size ** 2
    total = 2 * l_img * p.in_channels * p2 * h + 2 * l_txt * p.context_in_dim * h  # patch embed, context
    total += 2 * l_img * h * p2 * p.out_channels  # final layer
    length = l_img + l_txt
    for i in range(p.depth):
        stream = 2 * (3 * h * h + h * h + 2 * h * mlp)  # qkv, proj, mlp per token
        total += l_img * stream + 4 * length * length * h  # image stream, joint attention
        total += l_txt * (stream if i < p.depth - 1 else 2 * 3 * h * h)  # last context stream: qkv only
        if i in p.dual_attention_layers:
            total += l_img * 2 * 4 * h * h + 4 * l_img * l_img * h  # attn2: qkv, proj, attention
    return total


def bench_sd3(name: str, runs: int, peak: float) -> dict:
    from diffusers import SD3Transformer2DModel

    preset, lh, lw, l_txt = SD3_CONFIGS[name]
    p = SD3_PRESETS[preset]
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(
        sample_size=p.sample_size, patch_size=p.patch_size, in_channels=p.in_channels, num_layers=p.depth,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        caption_projection_dim=p.hidden_size, pooled_projection_dim=p.vec_in_dim, out_channels=p.out_channels,
        pos_embed_max_size=p.pos_embed_max_size, dual_attention_layers=p.dual_attention_layers,
        qk_norm="rms_norm" if p.qk_norm else None).eval()
    with torch.no_grad():
        for t in ref.parameters():
            t.normal_(0.0, 0.02)
    ours = MMDiT(p).eval()
    ours.load_state_dict(diffusers_to_stability(ref.state_dict(), p), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, p.in_channels, lh, lw, generator=g)
    ctx = torch.randn(1, l_txt, p.context_in_dim, generator=g)
    y = torch.randn(1, p.vec_in_dim, generator=g)
    t = torch.tensor([0.7])

    def run_ours():
        return ours(x, t, y=y, context=ctx)

    def run_diffusers():
        return ref(hidden_states=x, timestep=1000 * t, pooled_projections=y, encoder_hidden_states=ctx,
                   return_dict=False)[0]

    mm, mm_flops = square_matmul(4096)
    with torch.inference_mode():
        a, b = run_ours(), run_diffusers()
        err = ((a - b).abs().max() / b.abs().max()).item()
        med = interleaved_medians({"ours": run_ours, "diffusers": run_diffusers, "matmul": mm}, runs=runs)
    l_img = lh * lw // p.patch_size ** 2
    return dict(name=name, params=sum(q.numel() for q in ours.parameters()), tokens=l_img + l_txt,
                flops=sd3_forward_flops(p, l_img, l_txt), med=med, err=err, peak=peak,
                peak_here=mm_flops / med["matmul"])
