"""The toy world: a renderer of simple scenes, an analyser that reads them back, and a tiny pretrained base.

Real Stable Diffusion weights cannot be had offline, and a random model draws noise; in this world
training a style LoRA, and blending two, can be seen and measured.
"""
