"""fda-vae: Flip Distribution Alignment VAE (Kui et al., MICCAI 2025) for multi-phase contrast MRI synthesis.

Main entry points: :class:`fda_vae.model.FDAVAE` (``encode``, ``flip``, ``sample``, ``decode``, ``forward``
with named outputs, ``translate``), :func:`fda_vae.train.train`, :func:`fda_vae.infer.load_generator`,
and the ``fda-vae`` command line.
"""

__version__ = "0.1.0"
