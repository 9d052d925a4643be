"""rectiflow.recipes: whole paths from data to a model, composed of the library's stages
(`quickstart`: your own images -> data check, autoencoder, cache, transformer, sample grid, bundle)."""
