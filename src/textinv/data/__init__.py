"""Training data: the images and their checks, views, the latent cache, the example stream, captions.

- ``images``: find and check the training images, load them, make the resized/cropped views
- ``latents``: each view's VAE latent distribution, encoded once and sampled every step
- ``examples``: the reproducible stream of (view, flip, caption, noise seed) examples
- ``templates``: the caption templates (English and ppdiffusers' Chinese lists)
"""
