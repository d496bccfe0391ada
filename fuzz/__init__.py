"""Fuzz targets (atheris) for every parser of untrusted bytes; see README.md, "Fuzzing"."""
