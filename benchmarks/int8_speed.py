"""int8 vs fp32 on the CPU: transformer forward speed and the PSNR of the decoded image after 4 steps.

    python benchmarks/int8_speed.py [--model PATH] [--preset small] [--size 256] [--runs 7] [--steps 4]

--model: a bundle directory; default: the bundled default model when it exists, else a bundle with random
weights built from --preset (transformer; autoencoder "tiny", text encoder "minilm"). PSNR on random weights
is only indicative: a trained model's activations (outliers, scales) decide the real quantisation error.

Speed: one forward of the transformer at --size x --size (batch 1), fp32 model vs its int8 copy
(`quantize_int8`), same process, interleaved, median of --runs (>= 7) after warm-up, inference mode.
Quality: the same prompt and seed through the fp32 and the int8 pipeline (--steps, Euler); PSNR of the
int8 image against the fp32 one (uint8 pixels, peak 255). Target: int8 >= 2x at PSNR >= 30 dB.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import interleaved_medians, print_machine_info  # noqa: E402
from rectiflow.convert.bundle import CARD_FILE, SamplingDefaults, default_bundle_path  # noqa: E402
from rectiflow.models.quantize import quantize_int8  # noqa: E402
from rectiflow.models.transformer import image_ids, text_ids  # noqa: E402
from rectiflow.sample import Pipeline, random_bundle  # noqa: E402

PROMPT = "a photo of a red circle above a blue square"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="bundle directory (default: bundled model, else random --preset)")
    ap.add_argument("--preset", default="small", help="transformer preset for random weights (small)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (256)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    if args.runs < 7:
        ap.error("--runs must be >= 7 (median of at least 7)")
    print_machine_info()

    tmp = None
    model = args.model
    if model is None and (default_bundle_path() / CARD_FILE).is_file():
        model = str(default_bundle_path())
    if model is None:
        tmp = tempfile.TemporaryDirectory()
        model = str(random_bundle(Path(tmp.name) / "random", transformer=args.preset,
                                  defaults=SamplingDefaults(steps=args.steps, width=args.size,
                                                            height=args.size)))
        print(f"{'model':>26}: random weights, transformer preset {args.preset!r} (PSNR only indicative)")
    else:
        print(f"{'model':>26}: {model}")

    fp32 = Pipeline.from_bundle(model, "cpu", torch.float32)
    int8 = Pipeline.from_bundle(model, "cpu", torch.float32, int8=True)
    assert int8.transformer is not fp32.transformer

    # -- transformer forward speed
    p = fp32.transformer.params
    lat = args.size // fp32.downsample  # latent side
    g = torch.Generator().manual_seed(0)
    txt, vec = fp32.encode_prompts([PROMPT])
    x = dict(img=torch.randn(1, (lat // 2) ** 2, p.in_channels, generator=g), img_ids=image_ids(1, lat, lat),
             txt=txt, txt_ids=text_ids(1, txt.shape[1]), timesteps=torch.tensor([0.5]), y=vec,
             guidance=torch.tensor([3.5]) if p.guidance_embed else None)
    q = quantize_int8(fp32.transformer)  # a third copy, only for the timing (the pipeline's is the same)
    with torch.inference_mode():
        t = interleaved_medians({"fp32": lambda: fp32.transformer(**x), "int8": lambda: q(**x)},
                                runs=args.runs)
    n_params = sum(v.numel() for v in fp32.transformer.parameters())
    print(f"\ntransformer {n_params / 1e6:.1f}M params, {(lat // 2) ** 2} image + {txt.shape[1]} text "
          f"tokens, batch 1, median of {args.runs}")
    print(f"  fp32 forward: {t['fp32'] * 1e3:8.1f} ms")
    print(f"  int8 forward: {t['int8'] * 1e3:8.1f} ms")
    print(f"  speed-up int8 / fp32: {t['fp32'] / t['int8']:.2f}x")

    # -- quality after the full pipeline
    kw = dict(steps=args.steps, width=args.size, height=args.size, seed=0, sampler="euler", progress=False)
    a = np.asarray(fp32(PROMPT, **kw).images[0])
    b = np.asarray(int8(PROMPT, **kw).images[0])
    print(f"  PSNR int8 vs fp32 image ({args.steps} steps, {args.size}x{args.size}): {psnr(a, b):.1f} dB")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
