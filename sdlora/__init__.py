"""sdlora: Stable Diffusion LoRA trainer and blending studio."""
__version__ = "0.1.0"
