"""meddiffusion3d: 3D MedDiffusion (patch-volume VQ autoencoder; BiFlowNet latent diffusion in part 2)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
