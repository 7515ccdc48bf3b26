"""napari-ppcasort: unsupervised particle sorting for cryo-EM (mixture of PPCA with online sorting)."""

__version__ = "0.1.0"
