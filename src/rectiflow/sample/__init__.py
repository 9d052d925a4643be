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

import importlib

_EXPORTS = {
    "DEFAULT": "rectiflow.sample.pipeline",
    "GenerationResult": "rectiflow.sample.pipeline",
    "Pipeline": "rectiflow.sample.pipeline",
    "initial_noise": "rectiflow.sample.pipeline",
    "a1111_parameters": "rectiflow.sample.png",
    "png_bytes": "rectiflow.sample.png",
    "read_png_settings": "rectiflow.sample.png",
    "save_png": "rectiflow.sample.png",
    "random_bundle": "rectiflow.sample.random_model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # lazy: `import rectiflow.sample.png` does not load torch or the models
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rectiflow.sample' has no attribute {name!r}")
