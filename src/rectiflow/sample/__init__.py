"""rectiflow.sample: the generation pipeline (prompts -> images) and PNG files that carry their settings.

    Pipeline(transformer, autoencoder, text_encoder, defaults, name=..., model_hash=...)
    Pipeline.from_bundle(path, device, dtype, int8=False, offload=False)
    pipe(prompts, steps=, width=, height=, seed=, sampler=, shift=, guidance=, cfg_scale=,
         negative_prompt=, num_images_per_prompt=, generator=, batch_size=, progress=, callback=)
        -> GenerationResult(images, latents, settings)
    save_png(image, path, settings), png_bytes(image, settings) -> bytes,
    read_png_settings(path or file) -> (a1111_text, settings_dict)
    random_bundle(path, ...) -> a tiny bundle with random weights (tests, benchmarks)
    model_ids.load_pipelines(["default", "ID=PATH", "PATH"], device, dtype) -> {id: Pipeline}
"""

from __future__ import annotations

from rectiflow.lazy_exports import lazy_exports

# lazy: `import rectiflow.sample.png` does not load torch or the models
__getattr__, __all__ = lazy_exports(__name__, {
    "DEFAULT": ".pipeline",
    "GenerationResult": ".pipeline",
    "Pipeline": ".pipeline",
    "initial_noise": ".pipeline",
    "a1111_parameters": ".png",
    "png_bytes": ".png",
    "read_png_settings": ".png",
    "save_png": ".png",
    "random_bundle": ".random_model",
})
