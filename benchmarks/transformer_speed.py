"""Forward latency of rectiflow's Flux vs diffusers' FluxTransformer2DModel with the same weights (CPU, fp32),
and of rectiflow's SD3 MMDiT vs diffusers' SD3Transformer2DModel (configs sd3-tiny, sd3.5-tiny).

    python benchmarks/transformer_speed.py [--runs 7] [--configs tiny,small,sd3-tiny,sd3.5-tiny] [--compile]

Same process, calls interleaved (ours, diffusers, a 4096^3 fp32 matmul, ours, ...), median of >= 7 runs
after warm-up, under torch.inference_mode. Prints the machine, torch version and thread count, the speed
ratio, and the achieved FLOP/s of our forward as a fraction of this machine's fp32 matmul peak: both the
matmul rate measured interleaved with the forwards (same conditions; the shared machine's load varies) and
the best matmul rate seen at the start.
FLOPs counted: 2*M*N*K for every linear layer plus 4*L^2*D per head for attention (QK^T and AV);
elementwise work is not counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import interleaved_medians, matmul_peak_flops, print_machine_info, square_matmul  # noqa: E402
from _sd3_speed import SD3_CONFIGS, bench_sd3  # noqa: E402
from rectiflow.convert.flux_keys import diffusers_to_bfl  # noqa: E402
from rectiflow.models.transformer import TRANSFORMER_PRESETS, Flux, FluxParams, image_ids, text_ids  # noqa: E402

# name -> (preset, latent height, latent width, text tokens); tokens = h*w/4 + text
CONFIGS = {
    "tiny": ("tiny", 32, 32, 64),  # 256 image + 64 text = 320 tokens, ~9M parameters
    "small": ("small", 64, 48, 256),  # 768 image + 256 text = 1024 tokens, ~159M parameters
}


def forward_flops(p: FluxParams, l_img: int, l_txt: int) -> float:
    h, mlp, length = p.hidden_size, int(p.hidden_size * p.mlp_ratio), l_img + l_txt
    attn = 4 * length * length * h  # QK^T and AV over all heads
    double = 2 * (l_img + l_txt) * (3 * h * h + h * h + 2 * h * mlp) + attn  # qkv, proj, mlp (both streams)
    single = 2 * length * (h * (3 * h + mlp) + (h + mlp) * h) + attn  # linear1, linear2
    embed = 2 * (l_img * p.in_channels * h + l_txt * p.context_in_dim * h + l_img * h * p.out_channels)
    return p.depth * double + p.depth_single_blocks * single + embed  # modulation matmuls ([B, h]) ignored


def diffusers_model(p: FluxParams):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
        num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed, axes_dims_rope=p.axes_dim,
    ).eval()


def bench(name: str, runs: int, peak: float, compile_too: bool) -> dict:
    preset, lh, lw, l_txt = CONFIGS[name]
    p = TRANSFORMER_PRESETS[preset]
    torch.manual_seed(0)
    ref = diffusers_model(p)
    with torch.no_grad():
        for t in ref.parameters():
            t.normal_(0.0, 0.02)
    ours = Flux(p).eval()
    ours.load_state_dict(diffusers_to_bfl(ref.state_dict(), p), strict=True)
    g = torch.Generator().manual_seed(1)
    l_img = lh * lw // 4
    img = torch.randn(1, l_img, p.in_channels, generator=g)
    txt = torch.randn(1, l_txt, p.context_in_dim, generator=g)
    y = torch.randn(1, p.vec_in_dim, generator=g)
    t = torch.tensor([0.7])
    iid, tid = image_ids(1, lh, lw), text_ids(1, l_txt)

    def run_ours(model=ours):
        return model(img, iid, txt, tid, t, y)

    def run_diffusers():
        return ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                   img_ids=iid[0], txt_ids=tid[0], return_dict=False)[0]

    mm, mm_flops = square_matmul(4096)
    fns = {"ours": run_ours, "diffusers": run_diffusers, "matmul": mm}
    with torch.inference_mode():
        a, b = run_ours(), run_diffusers()
        err = ((a - b).abs().max() / b.abs().max()).item()
        if compile_too:
            compiled = torch.compile(ours)
            fns["ours (torch.compile)"] = lambda: run_ours(compiled)
        med = interleaved_medians(fns, runs=runs)
    flops = forward_flops(p, l_img, l_txt)
    n_params = sum(q.numel() for q in ours.parameters())
    return dict(name=name, params=n_params, tokens=l_img + l_txt, flops=flops, med=med, err=err, peak=peak,
                peak_here=mm_flops / med["matmul"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours), reported apart")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.runs < 7:
        ap.error("--runs must be >= 7 (median of at least 7 runs)")
    print_machine_info()
    peak = matmul_peak_flops()
    print(f"{'fp32 matmul, best of 7':>26}: {peak / 1e9:.1f} GFLOP/s (4096^3)\n")
    rows = [bench_sd3(name, args.runs, peak) if name in SD3_CONFIGS
            else bench(name, args.runs, peak, args.compile) for name in args.configs.split(",")]
    print("| config | params | tokens | ours (ms) | diffusers (ms) | speed-up | ours GFLOP/s "
          "| % of interleaved matmul | % of best matmul | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = r["med"]["diffusers"]
        for label, key in (("", "ours"), (" (ours compiled)", "ours (torch.compile)")):
            if key not in r["med"]:
                continue
            o = r["med"][key]
            rate = r["flops"] / o
            print(f"| {r['name']}{label} | {r['params'] / 1e6:.1f}M | {r['tokens']} | {o * 1e3:.1f} "
                  f"| {d * 1e3:.1f} | {d / o:.2f}x | {rate / 1e9:.0f} | {100 * rate / r['peak_here']:.0f}% "
                  f"| {100 * rate / r['peak']:.0f}% | {r['err']:.1e} |")
        print(f"|   interleaved 4096^3 matmul: {r['peak_here'] / 1e9:.0f} GFLOP/s | | | | | | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
