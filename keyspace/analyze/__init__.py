"""The analyze stage: PCA and spectra from a run's moments (pca, spectra), and calibration
transfer between runs (transfer)."""
