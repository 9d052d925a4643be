"""rectiflow.data: image + caption sources, datasets and samplers, `data check`, latent/text caches.

Names are imported lazily (importing a submodule such as rectiflow.data.shapes does not pull torch).
"""

from __future__ import annotations

from rectiflow.lazy_exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "Sample": ".sources", "Problem": ".sources", "Source": ".sources", "open_source": ".sources",
    "ImageFolderSource": ".sources", "TextCaptionSource": ".sources", "WebDatasetSource": ".sources",
    "ClassFolderSource": ".sources", "ManifestSource": ".sources", "ArraySource": ".sources",
    "shapes_source": ".sources",
    "CaptionPolicy": ".captions", "class_caption": ".captions",
    "CenterCrop": ".transforms", "Buckets": ".transforms", "make_buckets": ".transforms",
    "ImageCaptionDataset": ".datasets", "ResumableSampler": ".datasets", "BucketBatchSampler": ".datasets",
    "check_dataset": ".check", "CheckReport": ".check", "phash": ".check",
    "build_cache": ".cache_writer", "LatentCache": ".cache_reader",
})
