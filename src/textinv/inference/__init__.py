"""Using a learned word: ``generation`` (images from a model and embeddings) and ``evaluation``
(the Textual Inversion paper's CLIP image and text similarity)."""
