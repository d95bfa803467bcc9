"""lit_fewstep: a PyTorch Lightning zoo of few-step diffusion generation."""

__version__ = "0.1.0"
