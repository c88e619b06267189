"""The frozen model and the new token: loading, family detection, tokens, conditioning, precision.

- ``loading``: pipeline folders and hub ids, family detection, loading the parts
- ``tokens``: the placeholder token(s) and their trainable vectors
- ``conditioning``: how captions become the UNet's inputs, per family
- ``precision``: dtype, attention, gradient checkpointing, compilation of the frozen parts
"""
