"""cryodask: Dask-native cryo-EM single-particle pipeline."""
__version__ = "0.1.0"
