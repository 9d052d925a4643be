"""Score the autoencoder's reconstructions of shapes-world images with the shapes scorer (a ceiling for any
model that samples through this autoencoder): python recipes/shapes/score_ae.py AE DATA [--n 400] [--out F]

Uses the last N images of DATA (an imagefolder from `rectiflow data shapes`; the autoencoder trains on the
first 30000 of 100000), scores each reconstruction against the caption it was drawn for ("text").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rectiflow.convert.autoencoder import load_autoencoder
from rectiflow.eval.shapes import score_image, summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ae")
    ap.add_argument("data")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--out", default=None, help="write the summary JSON here")
    args = ap.parse_args()
    data = Path(args.data)
    recs = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()[-args.n:]]
    imgs = np.stack([np.asarray(Image.open(data / r["file_name"]).convert("RGB")) for r in recs])  # [N,H,W,3]
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, H, W] in [-1, 1]
    ae = load_autoencoder(args.ae).eval()
    with torch.no_grad():
        y = torch.cat([ae.decode(ae.encode(x[i:i + 100])) for i in range(0, len(x), 100)])
    rec = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    summary = summarize((r["task"], bool(score_image(r["text"], im))) for r, im in zip(recs, rec))
    truth = summarize((r["task"], bool(score_image(r["text"], im))) for r, im in zip(recs, imgs))
    result = {"reconstructions": summary, "originals": truth, "n": len(recs)}
    print(f"reconstructions: overall {summary['overall']:.3f} ("
          + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in summary["per_task"].items())
          + f"); originals: {truth['overall']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
