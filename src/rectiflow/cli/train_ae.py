"""`rectiflow train-ae --data PATH --out DIR [--preset small] [--size 64] [--steps N] ...`."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-ae",
        help="train a FLUX-style autoencoder (reconstruction + KL) on a dataset",
        description="Train a FLUX-style autoencoder (16 latent channels, 8x down by default) with L1 + MSE "
        "reconstruction and a small KL term. Writes OUT/ae.safetensors whose scale/shift factors come from "
        "the training latents, OUT/report.json (held-out PSNR) and OUT/recon.png. Resumable with --resume.",
    )
    p.add_argument("--data", required=True,
                   help="image dataset (imagefolder, .txt captions, webdataset, class folders) or the "
                        "manifest .jsonl written by `rectiflow data check --write-manifest`")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", default="small",
                   help="autoencoder preset (flux, small, tiny) or a JSON object of AutoEncoderParams fields "
                        "(default small)")
    p.add_argument("--size", type=int, default=64, help="training resolution (multiple of 8; default 64)")
    p.add_argument("--crop", type=int, default=0,
                   help="train on random CROP x CROP windows (multiple of 8; cheaper per image); 0 = whole")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW learning rate after a 100-step warmup (default 1e-3)")
    p.add_argument("--kl-weight", type=float, default=1e-6,
                   help="weight of the KL term (default 1e-6, as LDM's KL-f8 autoencoders)")
    p.add_argument("--max-images", type=int, default=None,
                   help="use at most this many images of the dataset (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the batches")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="steps between checkpoints (default 500)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from rectiflow.train.autoencoder import AETrainConfig, train_autoencoder

    preset = json.loads(args.preset) if args.preset.lstrip().startswith("{") else args.preset
    cfg = AETrainConfig(data=args.data, out=args.out, preset=preset, size=args.size, crop=args.crop,
                        steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl_weight,
                        max_images=args.max_images, seed=args.seed, checkpoint_every=args.checkpoint_every)
    report = train_autoencoder(cfg, resume=args.resume, progress=not args.no_progress)
    psnr = report.get("heldout_psnr_db")
    print(f"wrote {report['path']} (scale_factor {report['params']['scale_factor']}, shift_factor "
          f"{report['params']['shift_factor']}, held-out PSNR {psnr} dB)")
    return 0
