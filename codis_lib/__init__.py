"""CODIS: multimodal alignment with a representation codebook, on top of ALBEF."""
__version__ = "0.1.0"
