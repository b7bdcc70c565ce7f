"""The console scripts (index-images, search-images, serve-images, evaluate-index, fine-tune, model-info) and the demo: thin shells over the library, the pipeline and the app."""
