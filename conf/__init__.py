# Hydra configs of reprlens, importable as the package `reprlens.conf` (pkg://reprlens.conf).
